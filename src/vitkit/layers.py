"""The building blocks of a Vision Transformer: patch embedding, attention, MLP, encoder block.

Parameter names follow the checkpoints in the world (timm's, which follow the JAX reference):
`patch_embed.proj`, `attn.qkv`, `attn.proj`, `mlp.fc1`, `mlp.fc2`, `norm1`, `norm2`, `ls1.gamma`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PatchEmbed(nn.Module):
    """Cut an image into P x P patches and project each to width D (paper Eq. 1, the matrix E).

    A convolution with kernel = stride = P is exactly "flatten each patch, multiply by E":
    tests/test_model.py checks the two forms agree. Patches come out in raster order,
    top-left to bottom-right, as the paper numbers them.
    """

    def __init__(self, *, patch_size: tuple[int, int], in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        H, W = x.shape[-2:]
        P, Q = self.patch_size
        if H % P or W % Q:
            raise ValueError(f"image size {H}x{W} is not divisible by the patch size {P}x{Q}")
        x = self.proj(x)  # (B, D, H/P, W/Q)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), N = HW / PQ


class LayerScale(nn.Module):
    """Per-channel learnable scale on a residual branch (Touvron et al., CaiT, 2021)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample (Huang et al., 2016)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention (paper Eq. 2 and Appendix A) with one fused qkv projection.

    The fused kernel (`scaled_dot_product_attention`) never materialises the N x N attention
    matrix; asking for the probabilities (`return_attention=True`) computes them explicitly,
    for this layer only, so other layers keep the fast path.
    """

    def __init__(self, dim: int, *, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, *, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        dropout = self.attn_drop if self.training else 0.0
        if return_attention:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            attn = attn.softmax(dim=-1)
            x = F.dropout(attn, dropout, self.training) @ v  # (B, H, N, Dh)
        else:
            attn = None
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D): heads concatenated
        return self.proj_drop(self.proj(x)), attn


class Mlp(nn.Module):
    """The transformer MLP: two layers with a GELU between (paper Sec. 3.1)."""

    def __init__(self, dim: int, hidden_dim: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """One pre-LN encoder layer (paper Eq. 2 and 3)."""

    def __init__(self, dim: int, *, num_heads: int, mlp_dim: int, qkv_bias: bool = True,
                 qk_norm: bool = False, norm_eps: float = 1e-6, init_values: float | None = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm,
                              attn_drop=attn_drop, proj_drop=drop, norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, *, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        attended, attn = self.attn(self.norm1(x), return_attention=return_attention)
        x = x + self.drop_path(self.ls1(attended))  # Eq. 2: z' = MSA(LN(z)) + z
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))  # Eq. 3: z = MLP(LN(z')) + z'
        return x, attn
