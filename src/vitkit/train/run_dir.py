"""The run directory: preparing it (new or resumed), its config, metrics log and plots."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..checkpoint import load_train_state, recover
from ..errors import VitkitError
from .config import TrainConfig, absolute_paths, check_values, resolve_config

RUN_CONFIG = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
# Fields a resumed run may change: where and how fast it runs, not what it computes.
# The checkpoint holds full, unsharded states, so DDP <-> FSDP may change too.
_RESUMABLE_CHANGES = {"resume", "device", "workers", "out", "compile", "checkpoint_every", "progress", "epochs",
                      "fsdp"}


def prepare_run(config: TrainConfig) -> tuple[TrainConfig, Path, dict[str, Any] | None]:
    """Resolve the config and the run directory; on --resume, read the saved config and state."""
    # (--data '' is vitkit.data's to refuse, as for every command that reads data.)
    for flag, value in (("--resume", config.resume), ("--init", config.init), ("--distill-from", config.distill_from),
                        ("--out", config.out)):
        if value is not None and not str(value).strip():
            raise VitkitError(f"{flag} '': an empty path (an unset variable?)")
    if config.resume:
        run_dir = Path(config.resume)
        config_file = run_dir / RUN_CONFIG
        if not config_file.is_file():
            raise VitkitError(f"--resume {run_dir}: not a training run directory (no {RUN_CONFIG})")
        try:
            saved = TrainConfig.from_dict(json.loads(config_file.read_text()), source=str(config_file))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as error:
            raise VitkitError(f"{config_file}: not a readable training config ({error})") from None
        try:
            check_values(saved)
        except VitkitError as error:
            raise VitkitError(f"{config_file}: {error}") from None
        if config.fsdp and saved.ema is not None:
            raise VitkitError("--fsdp: this run keeps an EMA of the weights, which FSDP does not support")
        if config.out is not None and Path(config.out).resolve() != run_dir.resolve():
            raise VitkitError(f"--out {config.out}: a resumed run continues in its own directory {run_dir}; "
                              "leave --out out")
        for key, value in absolute_paths(config).to_dict().items():
            if key in _RESUMABLE_CHANGES or value is None or value == getattr(saved, key):
                continue
            raise VitkitError(f"--resume {run_dir}: the run was trained with {key}={getattr(saved, key)!r}, "
                              f"not {key}={value!r}; start a new run (--out) to change it")
        for key in _RESUMABLE_CHANGES - {"resume", "out", "compile"}:
            if getattr(config, key) is not None:
                setattr(saved, key, getattr(config, key))
        saved.compile = saved.compile or config.compile  # a flag: leaving it out does not turn it off
        saved.resume = str(run_dir)
        check_values(saved)  # the changed settings too, before any of them reaches config.json
        recover(run_dir)
        if not (run_dir / "last").exists():
            # Stopped before its first checkpoint: nothing was learnt yet, so it starts again from step 0.
            print(f"--resume {run_dir}: no checkpoint yet; starting the run from the beginning", file=sys.stderr)
            return saved, run_dir, None
        state = load_train_state(run_dir)
        done = state.get("progress", {}).get("epoch", 0)
        if config.epochs is not None and config.epochs < done:
            raise VitkitError(f"--epochs {config.epochs}: the run in {run_dir} has already trained {done} epochs")
        return saved, run_dir, state
    resolved = resolve_config(config)
    if resolved.out:
        run_dir = Path(resolved.out)
    else:
        name = (resolved.model or Path(str(resolved.init)).name or "model").replace("/", "_").replace(":", "_")
        run_dir = Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    if any((run_dir / name).exists() for name in ("last", "best", RUN_CONFIG)):
        from ..pretrained import _is_model_config

        if _is_model_config(run_dir / RUN_CONFIG):  # RUN/best, a saved model: not a run to --resume
            raise VitkitError(f"--out {run_dir}: holds a saved model; choose another directory")
        raise VitkitError(f"--out {run_dir}: already holds a training run; continue it with --resume {run_dir} "
                          "or choose another directory")
    resolved.out = str(run_dir)
    return resolved, run_dir, None


def write_json(path: Path, data: Any) -> None:
    from ..weights import atomic_write

    text = json.dumps(data, indent=2)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


class MetricsLog:
    """metrics.jsonl: one JSON object a line, {"kind": "step"|"epoch"|"event", ...}."""

    def __init__(self, path: Path, *, keep_until_step: int | None, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and keep_until_step is not None and path.exists():
            # A resumed run redoes the steps after its checkpoint: drop their records (and a
            # line a kill cut short), so the log reads as one uninterrupted run.
            kept = [r for r in read_metrics(path) if r.get("step", 0) <= keep_until_step]
            write_metrics(path, kept)
        self.handle = open(path, "a") if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self.handle:
            try:
                self.handle.write(json.dumps(record) + "\n")
                self.handle.flush()
            except OSError as error:  # a full disk: say which file, the checkpoints are not touched
                from ..checkpoint import write_failure

                raise VitkitError(f"{self.path}: cannot be written ({write_failure(error, where=self.path.parent)})") from None

    def close(self) -> None:
        if self.handle:
            self.handle.close()


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace a metrics.jsonl with `records`, atomically (a resumed run drops redone steps)."""
    from ..weights import atomic_write

    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, skipping a last line cut short by a crash."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def last_epoch_value(run_dir: Path, key: str) -> float | None:
    epochs = [r for r in read_metrics(run_dir / METRICS_FILE) if r.get("kind") == "epoch"]
    return epochs[-1][key] if epochs else None


def write_plots(run_dir: Path) -> None:
    from ..plots import plot_run

    try:
        plot_run(run_dir)
    except ImportError as error:
        print(f"vitkit train: no plots ({error})", file=sys.stderr)
