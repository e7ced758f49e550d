"""`vitkit explain`: run a model on images and write the figures plus one self-contained HTML
report that walks through the model in the paper's order (Sec. 3.1, then the analysis of 4.5)."""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import VitkitError
from ..images import ImageReadError, list_images, preprocess, read_image, require_rgb
from ..infer import label_names, resolve_device
from ..model import VisionTransformer
from . import analysis, figures

# Attention for all layers is held per chunk of images; 8 ViT-B/16 images are ~180 MB of float32.
_CHUNK = 8


@dataclass
class ExplainResult:
    report: Path  # report.html
    figures: list[Path] = field(default_factory=list)  # every PNG written, in report order
    skipped: list[str] = field(default_factory=list)  # "file: why" for each image that could not be read


@dataclass
class _ImageFigures:
    name: str
    png: dict[str, tuple[Path, bytes]] = field(default_factory=dict)  # figure kind -> (file, bytes)
    top: list[tuple[str, float]] = field(default_factory=list)


def _safe_stem(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:40] or "image"


def _token_names(model: VisionTransformer) -> list[str]:
    config = model.config
    names = ["[class]"] if config.class_token else []
    names += ["[dist]"] if config.distill_token else []
    return names + [f"[reg {i + 1}]" for i in range(config.reg_tokens)]


def _why_unreadable(path: str | Path) -> str:
    """What `read_image` says about a path that is not an image file."""
    try:
        read_image(path)
    except ImageReadError as error:
        return str(error)
    return str(path)


def explain(*, images: list[str | Path], model: VisionTransformer, out_dir: str | Path,
            fusion: str = "mean", discard_ratio: float = 0.0, top_k: int = 5,
            device: str | torch.device = "cpu", source: str = "") -> ExplainResult:
    """Write every explain figure for `model` on `images` into `out_dir`, plus `report.html`
    with the figures embedded (base64), so the report is one file that opens anywhere.

    images: files, folders or globs (as `vitkit predict` takes them). fusion: how rollout merges
    heads (mean, max, min). discard_ratio: fraction of each row's weakest attention dropped before
    rollout. top_k: predictions shown per image. source: how the model was named, for the report.
    """
    require_rgb(model, what="explain")
    if fusion not in analysis.FUSIONS:
        raise VitkitError(f"--rollout-fusion must be one of {', '.join(analysis.FUSIONS)}, got {fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitkitError(f"--discard-ratio must lie in [0, 1), got {discard_ratio}")
    if top_k < 1:
        raise VitkitError(f"--top-k must be at least 1, got {top_k}")
    paths = list_images(list(images))
    if not paths:
        raise VitkitError("no images given")
    # The same check as predict and eval: a device vitkit cannot run on (meta, mps) is refused
    # before any output is written, not met as a traceback halfway through the figures.
    device = resolve_device(device)
    model = model.to(device).eval()
    if not any(Path(p).is_file() for p in paths):  # before any figure is written: no half-made report
        first = _why_unreadable(paths[0])
        raise VitkitError(f"no image to explain: {first}" + (f" (and {len(paths) - 1} more)" if len(paths) > 1 else ""))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    stride = config.stem_stride
    num_prefix = config.num_prefix_tokens
    # The maps follow what the head reads: the [class] token (and, in DeiT's distilled models, the
    # [dist] token, whose head's logits are averaged with it), or (average pooling) every patch token.
    reads_class = config.global_pool == "token"
    reads_dist = reads_class and config.class_token and config.distill_token
    reader = "[class] and [dist] tokens (their mean)" if reads_dist else "[class] token"
    no_class = "no [class] token" if not config.class_token else "its head reads the patches' mean, not the [class] token"
    pooling_note = (f"the attention of the {reader}" if reads_class else
                    f"the mean attention of all patch queries ({no_class}: it averages its patch tokens, "
                    "so this map shows what the average of the queries reads)")

    written: list[Path] = []

    def save(name: str, figure) -> tuple[Path, bytes]:
        data = figures.to_png(figure)
        path = out / f"{name}.png"
        path.write_bytes(data)
        written.append(path)
        return path, data

    # Model-level figures: they depend on the weights only.
    model_png: dict[str, tuple[Path, bytes]] = {}
    notes: dict[str, str] = {}
    try:
        components, explained = analysis.embedding_filters(model, k=28)
        model_png["filters"] = save("filters", figures.draw_filters(components, explained=explained))
    except VitkitError as error:
        notes["filters"] = str(error)
    model_png["position"] = save("position_similarity", figures.draw_position_similarity(
        analysis.position_similarity(model), cell_aspect=stride[0] / stride[1]))

    # Image-level figures, computed a chunk of images at a time.
    per_image: list[_ImageFigures] = []
    distance_sum = None
    grid = None
    skipped: list[str] = []
    for start in range(0, len(paths), _CHUNK):
        chunk, pixels = [], []
        for path in paths[start:start + _CHUNK]:
            try:
                pixels.append(preprocess(read_image(path), model.preprocessing))
                chunk.append(path)
            except ImageReadError as error:  # reported, and the other images still explained
                skipped.append(str(error))
        if not chunk:
            continue
        batch = torch.stack(pixels)  # (B, 3, H, W)
        record = analysis.collect_attention(model, batch.to(device))
        grid = record.grid
        distance = analysis.mean_attention_distance(record.attentions, grid=grid, patch_size=stride)
        distance_sum = distance * len(chunk) if distance_sum is None else distance_sum + distance * len(chunk)
        cls_maps = analysis.class_attention(record.attentions, num_prefix=num_prefix, class_token=reads_class,
                                            dist_token=reads_dist)
        rollout = analysis.attention_rollout(record.attentions, num_prefix=num_prefix, class_token=reads_class,
                                             fusion=fusion, discard_ratio=discard_ratio, dist_token=reads_dist)
        top = (analysis.top_predictions(record.logits, k=top_k, class_names=label_names(model))
               if config.num_classes else None)
        for b, path in enumerate(chunk):
            index = len(per_image)
            stem = f"{index + 1:02d}-{_safe_stem(path)}"
            item = _ImageFigures(name=path.name)
            display = analysis.unnormalize(batch[b], model.preprocessing)
            item.png["grid"] = save(f"{stem}-patches", figures.draw_patch_grid(
                display, patch_size=stride, first_index=num_prefix))
            patches = analysis.patch_grid(display, patch_size=stride)
            item.png["sequence"] = save(f"{stem}-sequence",
                                        figures.draw_patch_sequence(patches, prefix_names=_token_names(model)))
            who = f"{reader} attention" if reads_class else f"mean patch-query attention ({no_class})"
            item.png["class_attention"] = save(f"{stem}-class_attention", figures.draw_class_attention(
                cls_maps[:, b], grid=grid, title=f"{path.name}: {who} to each patch, per layer and head",
                cell_aspect=stride[0] / stride[1]))
            what = reader if reads_class else f"mean over patch queries ({no_class})"
            item.png["rollout"] = save(f"{stem}-rollout", figures.draw_rollout(
                display, rollout[b], grid=grid,
                title=f"{path.name}: attention rollout, {fusion} over heads, of the {what}"
                      + (f", {discard_ratio:.0%} weakest discarded" if discard_ratio else "")))
            if top is not None:
                item.png["predictions"] = save(f"{stem}-predictions", figures.draw_predictions(
                    top.probabilities[b], top.labels[b], title=f"{path.name}: top-{len(top.labels[b])} predictions"))
                item.top = list(zip(top.labels[b], top.probabilities[b].tolist()))
            per_image.append(item)
    if not per_image:
        raise VitkitError(f"no readable image among the {len(paths)} given: {skipped[0]}")
    distance = distance_sum / len(per_image)
    model_png["distance"] = save("attention_distance", figures.draw_attention_distance(
        distance, grid=grid, patch_size=stride, num_images=len(per_image)))
    if skipped:
        notes["skipped"] = f"{len(skipped)} image(s) could not be read and are left out: " + "; ".join(skipped)
    if not config.num_classes:
        notes["predictions"] = "this model has no classification head (num_classes = 0)"

    report = out / "report.html"
    report.write_text(_render(model=model, source=source, images=per_image, model_png=model_png, notes=notes,
                              pooling_note=pooling_note, fusion=fusion, discard_ratio=discard_ratio,
                              grid=grid, distance=distance), encoding="utf-8")
    _replace_manifest(out, written)
    return ExplainResult(report=report, figures=written, skipped=skipped)


_MANIFEST = "explain-figures.txt"  # the PNGs the last run wrote, one name a line


def _replace_manifest(out: Path, written: list[Path]) -> None:
    """Remove the figures an earlier run into `out` wrote and this one did not (images since
    removed from the input), so the folder holds this report's figures; only names that run
    recorded are touched, never the user's other files. Then record this run's."""
    manifest = out / _MANIFEST
    names = {p.name for p in written}
    if manifest.is_file():
        for name in manifest.read_text(encoding="utf-8").splitlines():
            if name.endswith(".png") and Path(name).name == name and name not in names:
                (out / name).unlink(missing_ok=True)
    manifest.write_text("".join(f"{name}\n" for name in sorted(names)), encoding="utf-8")


# ---------------------------------------------------------------------------- the HTML report
_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.5; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; } pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; }
.note { background: #fff6dd; padding: 0.5em 0.8em; border-left: 4px solid #e6a700; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; border-bottom: 1px solid #eee; text-align: left; }
"""

# Lets a headless browser (and the tests) confirm every embedded image decoded.
_LOAD_CHECK = """
window.addEventListener("load", function () {
  var images = document.images, ok = 0;
  for (var i = 0; i < images.length; i++) { if (images[i].complete && images[i].naturalWidth > 0) ok++; }
  document.body.setAttribute("data-images-loaded", ok + "/" + images.length);
});
"""


def _img(png: tuple[Path, bytes], alt: str, caption: str = "") -> str:
    data = base64.b64encode(png[1]).decode("ascii")
    text = f"<figcaption>{html.escape(caption)} <code>{html.escape(png[0].name)}</code></figcaption>"
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">{text}</figure>'


def _render(*, model: VisionTransformer, source: str, images: list[_ImageFigures], model_png: dict,
            notes: dict[str, str], pooling_note: str, fusion: str, discard_ratio: float,
            grid: tuple[int, int], distance: np.ndarray) -> str:
    from ..info import describe

    config = model.config
    P, Q = config.stem_stride
    H, W = model.preprocessing.crop
    parts = [f"<h1>Inside a Vision Transformer: {html.escape(source or 'model')}</h1>",
             "<p>A walk through the model in the order of Dosovitskiy et al. (2021), <i>An Image is Worth "
             "16x16 Words</i>: the patches and the sequence (Sec. 3.1), then the analysis of Sec. 4.5 "
             "(Fig. 6 and 7), computed from this model's weights on the given images.</p>",
             f"<pre>{html.escape(describe(model))}</pre>"]
    if "skipped" in notes:
        parts.append(f'<p class="note">{html.escape(notes["skipped"])}</p>')

    parts.append("<h2>1. The image becomes a sequence of patches</h2>"
                 f"<p>Each image is preprocessed as the model expects (resize, centre-crop to {H}x{W}, "
                 f"normalise; shown here un-normalised) and cut into a {grid[0]}x{grid[1]} grid of "
                 f"{P}x{Q}-pixel patches. Flattened in raster order they form the sequence; "
                 f"{len(_token_names(model))} learned prefix token(s) ({html.escape(', '.join(_token_names(model)) or 'none')}) "
                 "come first, and a learned position embedding is added to "
                 f"{'every token' if model.config.prefix_pos_embed or not _token_names(model) else 'every patch token (the prefix tokens get none)'}.</p>")
    for item in images:
        parts.append(f"<h3>{html.escape(item.name)}</h3>")
        parts.append(_img(item.png["grid"], f"{item.name} with its patch grid",
                          "Each patch is labelled with its position in the sequence (the prefix tokens come first)."))
        parts.append(_img(item.png["sequence"], f"{item.name} as a token sequence"))

    parts.append("<h2>2. Patch embedding: what the linear projection looks for</h2>"
                 "<p>The projection E maps each flattened patch to a D-dimensional token. Its filters' "
                 "principal components (paper Fig. 7 left) resemble plausible basis functions for a "
                 "low-dimensional representation of each patch's fine structure, once trained.</p>")
    parts.append(_img(model_png["filters"], "patch-embedding filter components") if "filters" in model_png
                 else f'<p class="note">{html.escape(notes["filters"])}</p>')

    parts.append("<h2>3. Position embeddings learn the 2-D grid</h2>"
                 "<p>Each panel is one patch position; its colours show the cosine similarity of that "
                 "position's embedding with every other's (Fig. 7 centre). Trained models show nearby "
                 "positions, and the same row or column, as similar: the 1-D embeddings learn 2-D "
                 "topology. A randomly initialised model shows no structure.</p>")
    parts.append(_img(model_png["position"], "position embedding similarity"))

    num = len(images)
    parts.append("<h2>4. How far each head looks</h2>"
                 "<p>The mean attention distance is the image-space distance between a query patch and "
                 "the patches it attends to, weighted by attention and averaged over queries "
                 f"(Fig. 7 right; here over {num} image(s); prefix tokens excluded). Some heads look "
                 "far already in the first layers; others stay local, like early convolutions. "
                 f"Per layer, the mean over heads (pixels): "
                 f"{html.escape(', '.join(f'{d:.1f}' for d in distance.mean(axis=1)))}.</p>")
    parts.append(_img(model_png["distance"], "mean attention distance against depth"))

    discard = f"; the {discard_ratio:.0%} weakest weights of each row are dropped first" if discard_ratio else ""
    parts.append("<h2>5. What the model attends to</h2>"
                 f"<p>The first figure for each image shows {html.escape(pooling_note)} to each patch, "
                 "per layer (rows) and head (columns). Attention rollout (Abnar &amp; Zuidema, 2020) "
                 "follows the attention through all layers: per layer the heads are fused "
                 f"(<b>{html.escape(fusion)}</b>){html.escape(discard)}, the identity is added for the "
                 "residual path (0.5 A + 0.5 I, rows renormalised) and the layers' matrices are "
                 "multiplied (Fig. 6).</p>")
    if config.global_pool != "token":
        has = "has no [class] token" if not config.class_token else "does not read its [class] token"
        parts.append(f'<p class="note">This model {has}: it classifies the mean of its patch '
                     "tokens, so the maps show the attention of the average patch query, not of a single token.</p>")
    for item in images:
        parts.append(f"<h3>{html.escape(item.name)}</h3>")
        parts.append(_img(item.png["class_attention"], f"{item.name}: attention per layer and head"))
        parts.append(_img(item.png["rollout"], f"{item.name}: attention rollout"))

    parts.append("<h2>6. The prediction</h2>")
    if "predictions" in notes:
        parts.append(f'<p class="note">{html.escape(notes["predictions"])}</p>')
    for item in images:
        if "predictions" in item.png:
            rows = "".join(f"<tr><td>{html.escape(label)}</td><td>{100 * p:.1f}%</td></tr>" for label, p in item.top)
            parts.append(f"<h3>{html.escape(item.name)}</h3><table><tr><th>class</th><th>probability</th></tr>"
                         f"{rows}</table>")
            parts.append(_img(item.png["predictions"], f"{item.name}: top predictions"))

    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>vitkit explain: '
            f"{html.escape(source or 'model')}</title><style>{_STYLE}</style></head>\n<body>\n{body}\n"
            f"<script>{_LOAD_CHECK}</script>\n</body></html>\n")


__all__ = ["explain", "ExplainResult"]
