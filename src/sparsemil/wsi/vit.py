"""One plain-torch Vision Transformer for the pathology patch encoders.

The layouts of UNI, UNI2-h, Prov-GigaPath and Virchow differ only in a few switches of
:class:`ViTConfig`; parameter names are timm's (``cls_token``, ``reg_token``,
``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.norm1.*``, ``blocks.{i}.attn.qkv.*``,
``blocks.{i}.attn.proj.*``, ``blocks.{i}.ls1.gamma``, ``blocks.{i}.norm2.*``,
``blocks.{i}.mlp.fc1.*``, ``blocks.{i}.mlp.fc2.*``, ``blocks.{i}.ls2.gamma``, ``norm.*``),
so the checkpoints the authors publish load as they are.

The computation (B = batch, D = width, p = patch side, h × w = token grid, R = register
tokens, P = 1 + R prefix tokens)::

    x   (B, 3, H, W)
    Conv2d(3, D, kernel = stride = p), tokens row by row         -> (B, h·w, D)
    prepend [class token, R register tokens]                     -> (B, P + h·w, D)
      class_pos_embed=True  (timm no_embed_class=False): add pos_embed to all P + h·w tokens
      class_pos_embed=False (timm no_embed_class=True):  add pos_embed to the h·w patch
                                                         tokens only, before prepending
    depth × block: x = x + ls1 * attn(norm1(x)); x = x + ls2 * mlp(norm2(x))
    norm                                                         -> (B, P + h·w, D)
    pool "cls": the class token                                  -> (B, D)
    pool "cls_mean": [class token, mean of the h·w patch tokens] -> (B, 2D)

Attention: ``qkv`` (with bias) split into heads, ``softmax(q kᵀ / sqrt(head_dim)) v``,
output projection with bias. MLP ``"gelu"``: ``fc2(gelu(fc1(x)))`` with the exact (erf)
GELU. MLP ``"swiglu"`` (timm ``SwiGLUPacked``): ``a, b = fc1(x).chunk(2, -1)``;
``fc2(silu(a) * b)``, so ``fc1`` has ``mlp_hidden`` outputs and ``fc2`` ``mlp_hidden / 2``
inputs. LayerNorm eps 1e-6.

Other input sizes: the stored position embedding covers a ``grid × grid`` token grid
(``grid = img_size // patch_size``); for an ``h × w`` grid its patch rows are resampled
with bicubic interpolation (``antialias=True``, ``align_corners=False``) and the rows of
prefix tokens are kept, as timm's ``dynamic_img_size=True`` does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ViTConfig:
    """Shape and layout of a :class:`VisionTransformer`.

    Attributes:
        embed_dim: token width D.
        depth: number of blocks.
        num_heads: attention heads (head_dim = D / num_heads).
        mlp_hidden: output features of ``mlp.fc1`` (timm's ``int(D * mlp_ratio)``).
        patch_size: p.
        img_size: input side the stored position embedding was trained for.
        mlp: ``"gelu"`` or ``"swiglu"`` (packed, SiLU gate on the first half).
        layer_scale: ``ls1``/``ls2`` LayerScale vectors in each block.
        reg_tokens: register tokens R after the class token.
        class_pos_embed: the prefix tokens get position-embedding rows (timm
            ``no_embed_class=False``); otherwise only the patch tokens do.
        pool: ``"cls"`` (class token) or ``"cls_mean"`` ([class token, mean of patch tokens]).
        eps: LayerNorm epsilon.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    patch_size: int = 16
    img_size: int = 224
    mlp: str = "gelu"
    layer_scale: bool = True
    reg_tokens: int = 0
    class_pos_embed: bool = True
    pool: str = "cls"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by {self.num_heads}")
        if self.mlp not in ("gelu", "swiglu") or self.pool not in ("cls", "cls_mean"):
            raise ValueError(f"mlp {self.mlp!r} / pool {self.pool!r}: unknown")
        if self.mlp == "swiglu" and self.mlp_hidden % 2:
            raise ValueError(f"swiglu needs an even mlp_hidden, got {self.mlp_hidden}")

    @property
    def grid(self) -> int:
        """Side of the token grid the stored position embedding covers."""
        return self.img_size // self.patch_size

    @property
    def num_prefix(self) -> int:
        """Class token + register tokens."""
        return 1 + self.reg_tokens

    @property
    def pos_rows(self) -> int:
        """Rows of ``pos_embed``."""
        return self.grid**2 + (self.num_prefix if self.class_pos_embed else 0)

    @property
    def feature_dim(self) -> int:
        """Width of the pooled output."""
        return self.embed_dim * (2 if self.pool == "cls_mean" else 1)

    def fit_state_dict(self, sd: dict[str, torch.Tensor]) -> ViTConfig:
        """This config with ``img_size`` set to the grid stored in ``sd["pos_embed"]``.

        A checkpoint trained at another resolution thus loads (its position embedding is
        resampled at run time like any other grid); every other shape is checked on loading.
        """
        pos = sd.get("pos_embed")
        if pos is None or pos.dim() != 3:
            return self
        patches = pos.shape[1] - (self.num_prefix if self.class_pos_embed else 0)
        side = math.isqrt(max(patches, 0))
        if side < 1 or side * side != patches:
            return self
        return replace(self, img_size=side * self.patch_size)


def resample_pos_embed(
    pos: torch.Tensor, n_prefix: int, old_grid: int, new_hw: tuple[int, int]
) -> torch.Tensor:
    """(1, n_prefix + old_grid², D) -> (1, n_prefix + h·w, D).

    The patch rows, seen as a ``old_grid × old_grid`` image of D channels, are resized to
    ``h × w`` (bicubic, antialias, align_corners=False, in float32); the first ``n_prefix``
    rows are kept.
    """
    if new_hw == (old_grid, old_grid):
        return pos
    dim = pos.shape[-1]
    prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
    grid = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_hw, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim).to(pos.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, h·w, D) tokens (row by row) and the grid (h, w) = (H/p, W/p)."""

    def __init__(self, patch_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, h, w)
        h, w = x.shape[-2:]
        return x.flatten(2).transpose(1, 2), (int(h), int(w))


class Attention(nn.Module):
    """Multi-head self-attention. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ / sqrt(head_dim)) v
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class GeluMlp(nn.Module):
    """``fc2(gelu(fc1(x)))``, exact GELU. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLUPacked(nn.Module):
    """``a, b = fc1(x).chunk(2, -1)``; ``fc2(silu(a) * b)``. (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class LayerScale(nn.Module):
    """``x * gamma`` with a learned (D,) vector ``gamma``."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block. (B, N, D) -> (B, N, D)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=cfg.eps)
        self.attn = Attention(dim, cfg.num_heads)
        self.ls1 = LayerScale(dim) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps)
        mlp = SwiGLUPacked if cfg.mlp == "swiglu" else GeluMlp
        self.mlp = mlp(dim, cfg.mlp_hidden)
        self.ls2 = LayerScale(dim) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Pooled ViT features. (B, 3, H, W) -> (B, ``cfg.feature_dim``); see the module doc.

    H and W need not be ``cfg.img_size``: the position embedding is resampled to the
    ``H/p × W/p`` grid (a remainder of H or W beyond a whole patch is ignored).
    """

    # a classifier head is no part of the encoder: its keys are ignored when loading
    ignored_prefixes = ("head.",)
    key_hint = "timm ViT names such as cls_token, pos_embed, blocks.0.attn.qkv.weight"

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.feature_dim = cfg.feature_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.reg_token = (
            nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim)) if cfg.reg_tokens else None
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_rows, dim))
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(dim, eps=cfg.eps)
        self._init_weights()

    def _init_weights(self) -> None:
        """Random initialisation (only used without weights): timm-like scales."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> every token after the final norm, (B, P + h·w, D)."""
        cfg = self.cfg
        patches, hw = self.patch_embed(x)  # (B, h·w, D)
        b = patches.shape[0]
        n_pos_prefix = cfg.num_prefix if cfg.class_pos_embed else 0
        pos = resample_pos_embed(self.pos_embed, n_pos_prefix, cfg.grid, hw).to(patches.dtype)
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        prefix = [t.to(patches.dtype) for t in prefix]
        if cfg.class_pos_embed:
            x = torch.cat([*prefix, patches], dim=1) + pos
        else:
            x = torch.cat([*prefix, patches + pos], dim=1)
        x = self.blocks(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        cls = tokens[:, 0]
        if self.cfg.pool == "cls":
            return cls
        return torch.cat([cls, tokens[:, self.cfg.num_prefix :].mean(dim=1)], dim=-1)
