"""Drawing the explain figures with matplotlib, from the arrays `analysis.py` computes.

Every function returns a `matplotlib.figure.Figure` built without pyplot, so nothing here touches
the global backend or a notebook's open figures; `to_png` renders one to bytes.
"""

from __future__ import annotations

import io
import math

import numpy as np

# Patch-number labels smaller than this (points) are unreadable; beyond it only some are drawn.
_MIN_LABEL_PT = 5.0
_SEQUENCE_MAX_TOKENS = 64


def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a runtime dependency
        raise ImportError("vitkit explain draws with matplotlib: pip install matplotlib") from None
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def to_png(figure) -> bytes:
    """Render a figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _fit_title(title: str, figure_width: float, fontsize: float = 10) -> str:
    """Wrap a title to the figure's width: long file names must not run off the edge."""
    import textwrap

    chars_per_line = max(20, int(figure_width * 72 / (0.6 * fontsize)))
    return textwrap.fill(title, chars_per_line)


def _outlined(text):
    from matplotlib import patheffects

    text.set_path_effects([patheffects.withStroke(linewidth=2, foreground="black")])
    return text


def _display_size(rows: int, cols: int, longest: float) -> tuple[float, float]:
    """Figure inches for a rows x cols picture whose longer side is `longest` inches."""
    scale = longest / max(rows, cols)
    return cols * scale, rows * scale


def draw_patch_grid(image: np.ndarray, *, patch_size: tuple[int, int], first_index: int = 1,
                    title: str = "") -> object:
    """The input image with its patch grid, each patch labelled with its position in the sequence:
    `first_index` (the number of prefix tokens before it) for the top-left patch, then raster
    order. image: (H, W, 3) in [0, 1]."""
    H, W = image.shape[:2]
    P, Q = patch_size
    gh, gw = H // P, W // Q
    width, height = _display_size(H, W, 6.0)
    fig = _figure(width + 0.4, height + 0.8)
    ax = fig.add_subplot()
    ax.imshow(image, extent=(0, W, H, 0), interpolation="nearest")
    for r in range(1, gh):
        ax.axhline(r * P, color="white", linewidth=0.8, alpha=0.9)
    for c in range(1, gw):
        ax.axvline(c * Q, color="white", linewidth=0.8, alpha=0.9)
    cell_pt = width * 72 / gw
    fontsize = min(12.0, cell_pt * 0.32)
    # On fine grids number only each row's first patch and every k-th, so labels stay legible.
    step = 1 if fontsize >= _MIN_LABEL_PT else math.ceil(_MIN_LABEL_PT / fontsize)
    fontsize = max(fontsize, _MIN_LABEL_PT)
    for r in range(gh):
        for c in range(gw):
            if c % step == 0:
                _outlined(ax.text(c * Q + Q / 2, r * P + P / 2, str(first_index + r * gw + c), color="white",
                                  ha="center", va="center", fontsize=fontsize, fontweight="bold"))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{H}x{W} input cut into {gh}x{gw} = {gh * gw} patches of {P}x{Q} px", fontsize=11)
    return fig


def draw_patch_sequence(patches: np.ndarray, *, prefix_names: list[str], title: str = "") -> object:
    """The flattened sequence the encoder reads: prefix tokens ([class], registers), then the
    patches in raster order, each with its position index. patches: (gh, gw, P, Q, 3)."""
    gh, gw, P, Q = patches.shape[:4]
    flat = patches.reshape(gh * gw, P, Q, -1)
    total = len(prefix_names) + len(flat)
    # Long sequences are cut, but never by just a few tokens: then the cut hides nothing useful.
    shown = total if total <= _SEQUENCE_MAX_TOKENS + 16 else _SEQUENCE_MAX_TOKENS
    per_row = min(shown, 16)
    rows = math.ceil(shown / per_row)
    gap = 0.25
    tile_w = 1.0
    tile_h = P / Q
    width = min(12.0, 0.72 * per_row + 0.6)
    data_w, data_h = per_row * (tile_w + gap), rows * (tile_h + 0.55)
    fig = _figure(width, width * data_h / data_w + 0.6)
    ax = fig.add_subplot()
    for t in range(shown):
        r, c = divmod(t, per_row)
        x0, y0 = c * (tile_w + gap), r * (tile_h + 0.55)
        if t < len(prefix_names):
            ax.add_patch(_rectangle(x0, y0, tile_w, tile_h, color="#d95f02"))
            ax.text(x0 + tile_w / 2, y0 + tile_h / 2, prefix_names[t], ha="center", va="center",
                    fontsize=7, color="white", fontweight="bold", rotation=90 if tile_h > 1.3 else 0)
        else:
            ax.imshow(flat[t - len(prefix_names)], extent=(x0, x0 + tile_w, y0 + tile_h, y0), interpolation="nearest")
        ax.text(x0 + tile_w / 2, y0 + tile_h + 0.08, str(t), ha="center", va="top", fontsize=7)
    ax.set_xlim(-0.1, per_row * (tile_w + gap))
    ax.set_ylim(rows * (tile_h + 0.55), -0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    more = f"; {total - shown} more not shown" if total > shown else ""
    ax.set_title(title or f"The sequence: {len(prefix_names)} prefix token(s), then {len(flat)} patches "
                          f"(number = position index{more})", fontsize=10)
    return fig


def _rectangle(x: float, y: float, w: float, h: float, *, color: str):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, facecolor=color, edgecolor="none")


def _to_display(filter_chw: np.ndarray) -> np.ndarray:
    """A (C, P, Q) filter -> an image in [0, 1]: min-max scaled, RGB if it has 3 channels."""
    low, high = float(filter_chw.min()), float(filter_chw.max())
    scaled = (filter_chw - low) / (high - low) if high > low else np.full_like(filter_chw, 0.5)
    return scaled.transpose(1, 2, 0) if scaled.shape[0] == 3 else scaled[0]


def draw_filters(components: np.ndarray, *, explained: np.ndarray, title: str = "") -> object:
    """Principal components of the patch-embedding filters as small images (paper Fig. 7 left).
    components: (k, C, P, Q); explained: (k,) fraction of variance each explains."""
    k = len(components)
    cols = min(7, k)
    rows = math.ceil(k / cols)
    fig = _figure(1.15 * cols + 0.3, 1.3 * rows + 0.7)
    grid = fig.add_gridspec(rows, cols)
    for i in range(k):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        ax.imshow(_to_display(components[i]), cmap="gray", interpolation="nearest")
        ax.set_title(f"PC {i + 1}: {100 * explained[i]:.1f}%", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or f"Patch-embedding filters: first {k} principal components (Fig. 7 left)",
                 fontsize=11)
    return fig


def _mosaic(maps: np.ndarray) -> np.ndarray:
    """(R, C, h, w) panels -> one (R*(h+1)-1, C*(w+1)-1) image with NaN gutters between panels."""
    R, C, h, w = maps.shape
    out = np.full((R * (h + 1) - 1, C * (w + 1) - 1), np.nan, dtype=np.float32)
    for r in range(R):
        for c in range(C):
            out[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = maps[r, c]
    return out


def _panel_ticks(ax, *, rows: int, cols: int, h: int, w: int, row_label: str, col_label: str) -> None:
    """Label mosaic panels at their centres, 1-based, thinning labels on big mosaics."""
    row_step = max(1, math.ceil(rows / 16))
    col_step = max(1, math.ceil(cols / 16))
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(0, rows, row_step)],
                  [str(r + 1) for r in range(0, rows, row_step)], fontsize=8)
    ax.set_xticks([c * (w + 1) + (w - 1) / 2 for c in range(0, cols, col_step)],
                  [str(c + 1) for c in range(0, cols, col_step)], fontsize=8)
    ax.tick_params(length=0)
    ax.set_ylabel(row_label)
    ax.set_xlabel(col_label)
    for spine in ax.spines.values():
        spine.set_visible(False)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="white")


def draw_position_similarity(similarity: np.ndarray, *, title: str = "", cell_aspect: float = 1.0) -> object:
    """Cosine similarity of each position's embedding with all others (paper Fig. 7 centre).
    similarity: (gh, gw, gh, gw); panel (i, j) is position (i, j)'s map over the grid.
    cell_aspect: a patch's height over its width, as in `draw_class_attention`."""
    gh, gw = similarity.shape[:2]
    mosaic = _mosaic(similarity)
    # Sized as drawn, cells cell_aspect times as tall as wide, so no blank band frames the mosaic.
    width, height = _display_size(mosaic.shape[0] * cell_aspect, mosaic.shape[1], 6.5)
    fig = _figure(width + 1.6, height + 1.0)
    ax = fig.add_subplot()
    image = ax.imshow(mosaic, cmap=_colormap("viridis"), vmin=-1, vmax=1, interpolation="nearest",
                      aspect=cell_aspect)
    _panel_ticks(ax, rows=gh, cols=gw, h=gh, w=gw, row_label="input patch row", col_label="input patch column")
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine similarity")
    ax.set_title(title or "Position embedding similarity (Fig. 7 centre)", fontsize=11)
    return fig


def draw_attention_distance(distance: np.ndarray, *, grid: tuple[int, int], patch_size: tuple[int, int],
                            num_images: int, title: str = "") -> object:
    """Mean attention distance of every head against depth (paper Fig. 7 right).
    distance: (L, heads) in pixels."""
    import matplotlib

    L, heads = distance.shape
    fig = _figure(7.5 if heads <= 16 else 6.5, 4.5)
    ax = fig.add_subplot()
    colours = matplotlib.colormaps["tab20" if heads > 10 else "tab10"]
    rng = np.random.default_rng(0)
    for h in range(heads):
        # A little horizontal jitter keeps heads with equal distances apart.
        x = np.arange(1, L + 1) + rng.uniform(-0.12, 0.12, size=L)
        ax.scatter(x, distance[:, h], s=22, color=colours(h % colours.N), label=f"head {h + 1}",
                   edgecolors="black", linewidths=0.3)
    from .analysis import uniform_attention_distance

    uniform = uniform_attention_distance(grid=grid, patch_size=patch_size)
    ax.axhline(uniform, color="gray", linestyle="--", linewidth=1)
    ax.text(L + 0.4, uniform, "uniform\nattention", va="center", ha="left", fontsize=8, color="gray")
    ax.set_xlim(0.4, L + 1.6)
    ax.set_ylim(0, max(float(distance.max()), uniform) * 1.12 + 1e-6)
    ax.set_xticks(range(1, L + 1))
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=7, ncol=2 if heads > 8 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  frameon=False)
    ax.set_title(title or f"Mean attention distance per head (Fig. 7 right), over {num_images} image(s)",
                 fontsize=11)
    return fig


def draw_class_attention(maps: np.ndarray, *, grid: tuple[int, int], title: str, cell_aspect: float = 1.0) -> object:
    """Attention to every patch, one panel per layer (rows) and head (columns), each panel scaled
    to its own maximum so weak layers stay visible. maps: (L, heads, N). cell_aspect: a patch's
    height over its width, so that non-square patches keep the image's proportions."""
    L, heads, _ = maps.shape
    panels = maps.reshape(L, heads, grid[0], grid[1]).astype(np.float64)
    peak = panels.max(axis=(2, 3), keepdims=True)
    panels = panels / np.where(peak > 0, peak, 1.0)
    mosaic = _mosaic(panels)
    width, height = _display_size(mosaic.shape[0] * cell_aspect, mosaic.shape[1], min(11.0, 0.9 * max(L, heads) + 2.0))
    fig = _figure(width + 1.6, height + 1.0)
    ax = fig.add_subplot()
    image = ax.imshow(mosaic, cmap=_colormap("inferno"), vmin=0, vmax=1, interpolation="nearest", aspect=cell_aspect)
    _panel_ticks(ax, rows=L, cols=heads, h=grid[0], w=grid[1], row_label="layer", col_label="head")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention / the panel's maximum")
    fig.suptitle(_fit_title(title, width + 1.6), fontsize=10)
    return fig


def _upsample(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (gh, gw) map -> (H, W) by bilinear resizing, for overlays on the image."""
    from PIL import Image

    resized = Image.fromarray(values.astype(np.float32), mode="F").resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(resized)


def draw_rollout(image: np.ndarray, rollout: np.ndarray, *, grid: tuple[int, int], title: str) -> object:
    """Attention rollout (paper Fig. 6): the image, the rollout map on the patch grid, and the
    map overlaid on the image. image: (H, W, 3) in [0, 1]; rollout: (N,)."""
    H, W = image.shape[:2]
    heat = rollout.reshape(grid).astype(np.float64)
    # The residual identity makes every patch's rollout similar; stretching min..max to 0..1 shows
    # where the [class] token looks more, which is what the figure is for.
    spread = heat.max() - heat.min()
    heat = (heat - heat.min()) / spread if spread > 0 else np.zeros_like(heat)
    width, height = _display_size(H, W, 3.2)
    fig = _figure(3 * width + 1.4, height + 0.9)
    axes = fig.subplots(1, 3)
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("input", fontsize=9)
    # Cells as tall and wide as the patches (16x8 patches are not squares), beside the image.
    shown = axes[1].imshow(heat, cmap="inferno", vmin=0, vmax=1, interpolation="nearest",
                           aspect=(H / grid[0]) / (W / grid[1]))
    axes[1].set_title("rollout on the patch grid", fontsize=9)
    smooth = _upsample(heat, (H, W))
    axes[2].imshow(image * (0.25 + 0.75 * smooth[..., None]), interpolation="bilinear")
    axes[2].set_title("image weighted by the rollout", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes, shrink=0.85, label="rollout, its range scaled to 0..1")
    fig.suptitle(_fit_title(title, 3 * width + 1.4), fontsize=10)
    return fig


def draw_predictions(probabilities: np.ndarray, labels: list[str], *, title: str = "") -> object:
    """The top-k predictions as horizontal bars, most probable at the top. probabilities: (k,)."""
    k = len(labels)
    fig = _figure(6.0, 0.42 * k + 1.2)
    ax = fig.add_subplot()
    y = np.arange(k)[::-1]
    ax.barh(y, 100 * probabilities, color="#1b9e77")
    ax.set_yticks(y, labels, fontsize=9)
    for yi, p in zip(y, probabilities):
        ax.text(100 * p + 1, yi, f"{100 * p:.1f}%", va="center", fontsize=8)
    ax.set_xlim(0, 112)
    ax.set_xlabel("probability (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(_fit_title(title or f"Top-{k} predictions", 6.0 * 0.8), fontsize=10)
    return fig


__all__ = ["to_png", "draw_patch_grid", "draw_patch_sequence", "draw_filters", "draw_position_similarity",
           "draw_attention_distance", "draw_class_attention", "draw_rollout", "draw_predictions"]
