"""The numbers behind the paper's analysis figures (Sec. 4.5, Fig. 6 and 7), as numpy arrays.

Nothing here draws; `figures.py` turns these arrays into pictures, and a notebook can use them
directly. Attention arrays are laid out (L, B, heads, T, T): layer, image, head, query, key, with
the prefix tokens ([class], distillation, registers) first in T, as the model orders them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..config import Preprocessing
from ..errors import VitkitError
from ..model import VisionTransformer, resample_pos_embed

FUSIONS = ("mean", "max", "min")


class AttentionRecord(NamedTuple):
    """One forward pass with every layer's attention kept."""

    attentions: np.ndarray  # (L, B, heads, T, T), rows sum to 1
    logits: np.ndarray  # (B, num_classes)
    grid: tuple[int, int]  # the patch grid (H/P, W/P) of this input


def unnormalize(x: Tensor, preprocessing: Preprocessing) -> np.ndarray:
    """Undo the model's normalisation for display: (3, H, W) model input -> (H, W, 3) in [0, 1]."""
    mean = torch.tensor(preprocessing.mean).view(3, 1, 1)
    std = torch.tensor(preprocessing.std).view(3, 1, 1)
    image = x.detach().float().cpu() * std + mean
    return image.clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)


def patch_grid(image: np.ndarray, *, patch_size: tuple[int, int]) -> np.ndarray:
    """Cut a display image (H, W, C) into patches as the model does (paper Eq. 1).

    Returns (gh, gw, P, Q, C); flattening the first two axes gives the sequence order, raster
    order from the top left, which is how PatchEmbed numbers the tokens.
    """
    P, Q = patch_size
    H, W, C = image.shape
    if H % P or W % Q:
        raise VitkitError(f"image size {H}x{W} is not divisible by the patch size {P}x{Q}")
    patches = image.reshape(H // P, P, W // Q, Q, C)  # (gh, P, gw, Q, C)
    return patches.transpose(0, 2, 1, 3, 4).copy()  # (gh, gw, P, Q, C)


def embedding_filters(model: VisionTransformer, *, k: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of the patch projection E (paper Fig. 7 left).

    Each of the D filters of `patch_embed.proj` is a (C, P, Q) image; the components are the
    directions of greatest variance among those D filters. Returns (components (k', C, P, Q),
    explained variance ratio (k',)), k' = min(k, D, C*P*Q). A component's sign is arbitrary; it
    is fixed so that its largest-magnitude entry is positive, to make figures reproducible.
    """
    if model.config.hybrid_stem:
        raise VitkitError("a hybrid model's patch projection acts on CNN features, not pixels: "
                          "it has no image-space filters to show")
    weight = model.patch_embed.proj.weight.detach().float().cpu().numpy()  # (D, C, P, Q)
    D = weight.shape[0]
    flat = weight.reshape(D, -1).astype(np.float64)  # (D, C*P*Q)
    flat = flat - flat.mean(axis=0, keepdims=True)
    _, singular, vt = np.linalg.svd(flat, full_matrices=False)  # vt: (r, C*P*Q)
    k = min(k, vt.shape[0])
    components = vt[:k]
    signs = np.sign(components[np.arange(k), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    variance = singular ** 2
    explained = variance[:k] / max(variance.sum(), 1e-30)
    return components.reshape(k, *weight.shape[1:]).astype(np.float32), explained.astype(np.float32)


def position_similarity(model: VisionTransformer, *, grid: tuple[int, int] | None = None) -> np.ndarray:
    """Cosine similarity between the position embeddings of all patch positions (Fig. 7 centre).

    Returns (gh, gw, gh, gw): entry [i, j] is the (gh, gw) map of how similar position (i, j)'s
    embedding is to every other's. Prefix tokens' embeddings are left out. `grid` resamples the
    embeddings as the model does for another input size; None uses the trained grid.
    """
    config = model.config
    num_prefix = config.num_prefix_tokens if config.prefix_pos_embed else 0
    grid = tuple(grid) if grid is not None else config.grid_size
    pos = resample_pos_embed(model.pos_embed.detach().float().cpu(), old_grid=config.grid_size,
                             new_grid=grid, num_prefix=num_prefix, mode=config.pos_embed_interpolation)
    patches = pos[0, num_prefix:].double()  # (N, D)
    unit = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similarity = (unit @ unit.T).numpy()  # (N, N)
    return similarity.reshape(grid[0], grid[1], grid[0], grid[1]).astype(np.float32)


@torch.no_grad()
def collect_attention(model: VisionTransformer, x: Tensor) -> AttentionRecord:
    """Run `model` on a batch x (B, C, H, W), keeping every layer's attention probabilities.

    Uses `forward_intermediates`, so only this call leaves the fused attention kernel; ordinary
    inference is untouched.
    """
    was_training = model.training
    model.eval()
    try:
        out = model.forward_intermediates(x, attention_layers=range(model.config.depth))
        logits = model.forward_head(out.features)
    finally:
        model.train(was_training)
    attentions = torch.stack([out.attentions[i] for i in range(model.config.depth)])  # (L, B, h, T, T)
    return AttentionRecord(attentions.float().cpu().numpy(), logits.float().cpu().numpy(), tuple(out.grid_size))


def _split_prefix(attentions: np.ndarray, grid: tuple[int, int]) -> int:
    T = attentions.shape[-1]
    num_prefix = T - grid[0] * grid[1]
    if num_prefix < 0 or attentions.shape[-2] != T:
        raise VitkitError(f"attention over {T} tokens does not fit a {grid[0]}x{grid[1]} patch grid")
    return num_prefix


def _patch_distances(*, grid: tuple[int, int], patch_size: tuple[int, int]) -> np.ndarray:
    """Pixel distances between all pairs of patch centres, (N, N) in sequence order."""
    rows, cols = np.meshgrid(np.arange(grid[0]) * patch_size[0], np.arange(grid[1]) * patch_size[1], indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.float64)  # (N, 2)
    return np.linalg.norm(centres[:, None, :] - centres[None, :, :], axis=-1)


def uniform_attention_distance(*, grid: tuple[int, int], patch_size: tuple[int, int]) -> float:
    """The mean attention distance, in pixels, of a head that attends to all patches equally:
    the reference line of the distance figure."""
    return float(_patch_distances(grid=grid, patch_size=patch_size).mean())


def mean_attention_distance(attentions: np.ndarray, *, grid: tuple[int, int],
                            patch_size: tuple[int, int]) -> np.ndarray:
    """Mean attention distance per layer and head, in input pixels (paper Fig. 7 right, Fig. 11).

    For each patch query, the distance between its centre and every patch key's centre, weighted
    by the attention; averaged over queries and images. Prefix tokens have no place in the image,
    so they are dropped as queries and keys, and each query's attention over the patch keys is
    renormalised to sum to 1 (the distance is then a proper weighted mean).

    attentions: (L, B, heads, T, T); patch_size: pixels per token along (H, W) (for a hybrid,
    the stem's stride). Returns (L, heads).
    """
    num_prefix = _split_prefix(attentions, grid)
    distance = _patch_distances(grid=grid, patch_size=patch_size)  # (N, N)
    patch = attentions[..., num_prefix:, num_prefix:].astype(np.float64)  # (L, B, h, N, N)
    patch = patch / np.clip(patch.sum(axis=-1, keepdims=True), 1e-12, None)
    per_query = (patch * distance).sum(axis=-1)  # (L, B, h, N)
    return per_query.mean(axis=(1, 3)).astype(np.float32)  # (L, h)


def _query_rows(matrix: np.ndarray, *, num_prefix: int, class_token: bool, dist_token: bool = False) -> np.ndarray:
    """From (..., T, T) matrices, the patch-key row that stands for "what the model looks at":
    the [class] token's row (averaged with the [dist] token's, right after it, for DeiT's distilled
    models, whose prediction is the mean of the two heads), or without a class token the mean over
    patch queries (average pooling reads every patch token equally). Returns (..., N)."""
    if class_token:
        return matrix[..., 0:2 if dist_token else 1, num_prefix:].mean(axis=-2)
    return matrix[..., num_prefix:, num_prefix:].mean(axis=-2)


def class_attention(attentions: np.ndarray, *, num_prefix: int, class_token: bool = True,
                    dist_token: bool = False) -> np.ndarray:
    """The [class] token's attention to each patch, per layer and head (the raw maps behind Fig. 6).

    Without a class token (average pooling), the mean attention of all patch queries. Returns
    (L, B, heads, N); a row sums to 1 less what went to prefix tokens.
    """
    return _query_rows(attentions, num_prefix=num_prefix, class_token=class_token,
                       dist_token=dist_token).astype(np.float32)


def rollout_matrix(attentions: np.ndarray, *, fusion: str = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema, 2020): how much each output token draws on each input
    token through all layers, counting the residual path.

    Per layer the heads are fused (mean, max or min), the `discard_ratio` smallest weights of each
    row are zeroed (Gildenblat's refinement; 0 keeps Abnar & Zuidema's method), the identity is
    added for the residual connection (A' = 0.5 A + 0.5 I) and rows are renormalised; the layers'
    matrices are then multiplied, last layer leftmost. attentions: (L, B, heads, T, T).
    Returns (B, T, T) with rows summing to 1.
    """
    if fusion not in FUSIONS:
        raise VitkitError(f"--rollout-fusion must be one of {', '.join(FUSIONS)}, got {fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise VitkitError(f"--discard-ratio must lie in [0, 1), got {discard_ratio}")
    attentions = attentions.astype(np.float64)
    fused = getattr(attentions, fusion)(axis=2)  # (L, B, T, T)
    L, B, T, _ = fused.shape
    eye = np.eye(T)
    result = np.broadcast_to(eye, (B, T, T)).copy()
    for layer in fused:  # (B, T, T)
        if discard_ratio > 0:
            drop = int(T * discard_ratio)
            if drop:
                # argsort, not a threshold, so ties (a uniform row) lose exactly `drop` weights.
                smallest = np.argsort(layer, axis=-1, kind="stable")[..., :drop]  # (B, T, drop)
                layer = layer.copy()
                np.put_along_axis(layer, smallest, 0.0, axis=-1)
        layer = 0.5 * layer + 0.5 * eye
        layer = layer / layer.sum(axis=-1, keepdims=True)
        result = layer @ result
    return result


def attention_rollout(attentions: np.ndarray, *, num_prefix: int, class_token: bool = True,
                      fusion: str = "mean", discard_ratio: float = 0.0, dist_token: bool = False) -> np.ndarray:
    """The rollout map over patches (paper Fig. 6): the [class] token's row of `rollout_matrix`,
    or without a class token the mean over patch queries. Returns (B, N), N patch tokens in
    sequence order; reshape to the grid to draw it."""
    matrix = rollout_matrix(attentions, fusion=fusion, discard_ratio=discard_ratio)
    return _query_rows(matrix, num_prefix=num_prefix, class_token=class_token,
                       dist_token=dist_token).astype(np.float32)


class TopPredictions(NamedTuple):
    probabilities: np.ndarray  # (B, k), softmax probabilities, highest first
    indices: np.ndarray  # (B, k) class indices
    labels: list[list[str]]  # class names, or the indices as text


def top_predictions(logits: np.ndarray, *, k: int = 5, class_names: list[str] | None = None) -> TopPredictions:
    """The k most probable classes per image from logits (B, num_classes)."""
    if k < 1:
        raise VitkitError(f"--top-k must be at least 1, got {k}")
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise VitkitError("top predictions need a model with a classification head (num_classes > 0)")
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(probs, order, axis=1)
    labels = [[class_names[i] if class_names else str(i) for i in row] for row in order]
    return TopPredictions(top.astype(np.float32), order, labels)


__all__ = ["AttentionRecord", "TopPredictions", "FUSIONS", "unnormalize", "patch_grid", "embedding_filters",
           "position_similarity", "collect_attention", "mean_attention_distance", "uniform_attention_distance",
           "class_attention", "rollout_matrix", "attention_rollout", "top_predictions"]
