"""Training curves of a run directory: loss.png, accuracy.png and lr.png, from metrics.jsonl."""

from __future__ import annotations

from pathlib import Path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw the curves of RUN/metrics.jsonl into RUN/{loss,accuracy,lr}.png; return their paths.
    Per-step values are drawn thin, per-epoch values as marked lines, against the optimiser step."""
    try:
        # The Figure API, not pyplot: nothing here changes the backend of a notebook or GUI
        # the caller runs in, and no figure is left registered with pyplot.
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install matplotlib") from error
    from .train import METRICS_FILE, read_metrics
    from .weights import atomic_write

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / METRICS_FILE)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]

    def series(rows, key):
        return [r["step"] for r in rows if r.get(key) is not None], [r[key] for r in rows if r.get(key) is not None]

    figures = {
        "loss.png": ("loss", [(steps, "loss", "train (per step)", 0.6), (epochs, "train_loss", "train (epoch mean)", 2),
                              (epochs, "val_loss", "validation", 2)]),
        "accuracy.png": ("accuracy", [(epochs, "train_acc", "train", 2), (epochs, "val_acc", "validation", 2)]),
        "lr.png": ("learning rate", [(steps, "lr", "learning rate", 1.5)]),
    }
    written = []
    for filename, (ylabel, lines) in figures.items():
        fig = Figure(figsize=(7, 4.2), dpi=110)
        ax = fig.subplots()
        for rows, key, label, width in lines:
            x, y = series(rows, key)
            if x:
                ax.plot(x, y, label=label, linewidth=width, marker="o" if rows is epochs and len(x) < 60 else None,
                        markersize=3)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{run_dir.name}: {ylabel}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        if ylabel == "accuracy":
            ax.set_ylim(0, 1)
        fig.tight_layout()
        path = run_dir / filename
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
        written.append(path)
    return written


__all__ = ["plot_run"]
