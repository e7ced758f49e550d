"""Using a trained model: accuracy on a dataset (`evaluate`) and labels for images (`predict`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .data import BatchLoader, build_eval_loader
from .errors import VitkitError
from .images import ImageReadError, preprocess, read_image, require_rgb
from .model import VisionTransformer


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`--device` as a torch.device vitkit can run on: None picks CUDA when there is one; anything
    but cpu, cuda or cuda:N, or a GPU that is not there, is a one-line user error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected cpu, cuda or cuda:N"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise VitkitError(f"--device {device!r}: {expected}") from None
    if dev.type not in ("cpu", "cuda"):
        raise VitkitError(f"--device {device!r}: {expected}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise VitkitError(f"--device {device}: CUDA is not available here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise VitkitError(f"--device {device}: there are {torch.cuda.device_count()} CUDA device(s), "
                              f"numbered from 0")
    return dev


def label_names(model: VisionTransformer) -> list[str]:
    """The model's class names, or class_0 ... class_{K-1} for a model saved without them."""
    return list(model.class_names) if model.class_names else [f"class_{i}" for i in range(model.config.num_classes)]


def check_class_names(model: VisionTransformer, data_classes: list[str], *, source: str, data: str | None) -> None:
    """Refuse to score a model on a dataset whose labels mean something else."""
    where = data or "the built-in sample"
    if model.config.num_classes != len(data_classes):
        raise VitkitError(f"{source}: the model has {model.config.num_classes} classes but {where} has "
                          f"{len(data_classes)} ({', '.join(data_classes[:5])}{', ...' if len(data_classes) > 5 else ''})")
    if model.class_names and list(model.class_names) != list(data_classes):
        diff = [(i, m, d) for i, (m, d) in enumerate(zip(model.class_names, data_classes)) if m != d]
        i, m, d = diff[0]
        raise VitkitError(f"{source}: class {i} of the model is {m!r} but of {where} is {d!r} "
                          f"({len(diff)} of {len(data_classes)} class names differ)")


@torch.no_grad()
def evaluate(model: VisionTransformer, loader: BatchLoader, *, class_names: list[str] | None = None) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (fractions in [0, 1]), per-class accuracy and the confusion
    matrix (rows: true class, columns: predicted) of `model` over one pass of `loader`.
    The model runs on the loader's device, in eval mode."""
    names = class_names or label_names(model)
    K = model.config.num_classes
    model = model.to(loader.device).eval()
    confusion = torch.zeros(K, K, dtype=torch.int64, device=loader.device)
    top5_hits = 0
    k = min(5, K)
    for x, y in loader.iterate(0):
        if len(y) == 0:
            continue
        logits = model(x)
        top = logits.topk(k, dim=1).indices  # (B, k)
        top5_hits += int((top == y[:, None]).any(1).sum())
        confusion += torch.bincount(y * K + top[:, 0], minlength=K * K).view(K, K)
    confusion = confusion.cpu()
    n = int(confusion.sum())
    if n == 0:
        raise VitkitError("the evaluation split holds no readable images")
    per_class_total = confusion.sum(1).tolist()
    # Python ints: dividing int64 tensors gives float32, and 1/20 printed as 0.05000000074505806.
    per_class = {names[i]: (int(confusion[i, i]) / per_class_total[i] if per_class_total[i] else None)
                 for i in range(K)}
    return {"n": n, "top1": float(confusion.diag().sum()) / n, "top5": top5_hits / n,
            "per_class": per_class, "confusion": confusion.tolist()}


def confusion_figure(confusion: list[list[int]], class_names: list[str], path: str | Path, *,
                     title: str = "") -> Path:
    """Save the confusion matrix as a PNG: rows normalised to the fraction of each true class,
    counts written in the cells when there is room, a colour bar, and the class names."""
    try:
        # The Figure API, not pyplot, as plots.py and explain draw: pyplot's matplotlib.use("Agg")
        # switched the backend of the notebook or GUI that called this.
        from matplotlib.figure import Figure
    except ImportError:
        raise VitkitError("the confusion-matrix figure needs matplotlib: pip install matplotlib") from None
    import numpy as np

    counts = np.asarray(confusion, dtype=np.int64)
    K = len(class_names)
    fractions = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = min(4 + 0.45 * K, 30)
    fig = Figure(figsize=(size + 1.5, size), dpi=100)
    ax = fig.subplots()
    shown = ax.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(K), class_names, rotation=45 if K <= 30 else 90, ha="right", fontsize=max(5, 10 - K // 20))
    ax.set_yticks(range(K), class_names, fontsize=max(5, 10 - K // 20))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if K <= 30:
        for i in range(K):
            for j in range(K):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if fractions[i, j] > 0.5 else "black")
    ax.set_title(title or f"top-1 {counts.trace() / max(counts.sum(), 1):.1%} on {counts.sum()} images")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def evaluate_source(model: VisionTransformer, *, source: str, data: str | None, batch_size: int = 256,
                    device: str | torch.device | None = None, split: str = "val", out: str | Path | None = None,
                    strict: bool = False, workers: int = 0) -> dict[str, Any]:
    """`vitkit eval`: evaluate `model` (loaded from `source`) on a split of `data` with the
    model's own preprocessing; with `out`, write metrics.json and confusion.png there."""
    require_rgb(model, what=f"eval {source}")
    device = resolve_device(device)
    # Labelled by the model's class names, a split that holds only some of the classes still scores.
    loader, data_classes, skipped = build_eval_loader(data, preprocessing=model.preprocessing, batch_size=batch_size,
                                                      device=device, split=split, workers=workers, strict=strict,
                                                      class_names=list(model.class_names) if model.class_names else None)
    check_class_names(model, data_classes, source=source, data=data)
    if out is not None:
        # After the checks, before the pass, which may take hours: an --out that is a file must not waste it.
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    result = evaluate(model, loader, class_names=data_classes)
    result["skipped"] = skipped
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        result["confusion_png"] = str(confusion_figure(result["confusion"], data_classes, out / "confusion.png",
                                                       title=f"{Path(source).name}: top-1 {result['top1']:.1%} "
                                                             f"on {result['n']} images"))
    return result


def predict(model: VisionTransformer, paths: list[str | Path], *, top_k: int = 5,
            device: str | torch.device | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
    """Classify each image file with the model's stored preprocessing. Returns one dict per
    path, in order: {"path", "predictions": [{"label", "prob"}, ...]} (top_k, most likely first),
    or {"path", "error"} for a file that cannot be read; one bad file never stops the others."""
    return list(iter_predict(model, paths, top_k=top_k, device=device, batch_size=batch_size))


def iter_predict(model: VisionTransformer, paths: list[str | Path], *, top_k: int = 5,
                 device: str | torch.device | None = None, batch_size: int = 32) -> Iterator[dict[str, Any]]:
    """`predict`'s results one at a time, in the order of `paths`, each as soon as its batch has
    run: a folder of thousands shows its first lines at once, and an interrupted run keeps them.
    The arguments are checked at the call, not at the first result."""
    if top_k < 1:
        raise VitkitError(f"--top-k must be at least 1 (got {top_k})")
    require_rgb(model, what="predict")
    if not model.config.num_classes:
        # Its forward returns features, not logits: a softmax over them would be no prediction.
        raise VitkitError("the model has no classification head (num_classes = 0, e.g. an MAE encoder); "
                          "fine-tune it first: vitkit train --init SOURCE --data DIR")
    device = resolve_device(device)
    return _predictions(model.to(device).eval(), paths, top_k=top_k, device=device, batch_size=batch_size)


@torch.no_grad()
def _predictions(model: VisionTransformer, paths: list[str | Path], *, top_k: int, device: torch.device,
                 batch_size: int) -> Iterator[dict[str, Any]]:
    names = label_names(model)
    k = min(top_k, len(names))
    results: list[dict[str, Any] | None] = [None] * len(paths)
    pending: list[tuple[int, torch.Tensor]] = []
    shown = 0  # results[:shown] have been yielded

    def flush() -> None:
        if not pending:
            return
        x = torch.stack([t for _, t in pending]).to(device)  # (B, 3, H, W)
        probs = model(x).float().softmax(dim=1)
        values, indices = probs.topk(k, dim=1)
        for (i, _), vals, idx in zip(pending, values.tolist(), indices.tolist()):
            results[i] = {"path": str(paths[i]),
                          "predictions": [{"label": names[j], "prob": round(v, 6)} for v, j in zip(vals, idx)]}
        pending.clear()

    for i, path in enumerate(paths):
        try:
            pending.append((i, preprocess(read_image(path), model.preprocessing)))
        except ImageReadError as error:
            results[i] = {"path": str(path), "error": str(error)}
        if len(pending) >= batch_size or i == len(paths) - 1:
            flush()
        while shown < len(results) and results[shown] is not None:
            yield results[shown]
            shown += 1


__all__ = ["evaluate", "evaluate_source", "predict", "iter_predict", "confusion_figure", "check_class_names", "resolve_device"]
