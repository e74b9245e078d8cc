"""Multi-head attention of MMIL-Transformer (official layout), batched over sub-bags.

Layout as in the official code: ``heads`` x ``dim_head`` (8 x 64 = inner 512) regardless
of the model width ``dim``; ``to_qkv`` is ``Linear(dim, 3 * inner, bias=False)`` whose
output is split ``[q | k | v]`` and each part into heads ``(h d)``; ``to_out`` is
``Linear(inner, dim)`` with bias; scale ``dim_head ** -0.5``; no LayerNorm, no MLP, and
the residual ``x + attn(x)`` is applied by the caller.

A batch of sequences ``x (S, T, dim)`` (the S sub-bags of one or more bags, each
zero-padded to the longest, T tokens) goes through one
``torch.nn.functional.scaled_dot_product_attention`` call with a boolean key-padding
mask ``(S, T)`` (True = real token; the real tokens of a row are a prefix). On CPU,
torch's flash-attention kernel accepts that mask, so the ``T x T`` attention matrix is
never materialised.

Modes: ``exact`` (softmax attention) and ``nystrom`` (Nystroem approximation with
segment-mean landmarks and an iterative Moore-Penrose pseudo-inverse, as in
Nystroemformer; it uses the same weights, so a model can switch modes at run time).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsemil.errors import SparsemilError

ATTENTION_MODES: tuple[str, ...] = ("exact", "nystrom")


def check_mode(mode: str) -> str:
    if mode not in ATTENTION_MODES:
        raise SparsemilError(
            f"attention must be one of {', '.join(ATTENTION_MODES)} (got '{mode}')"
        )
    return mode


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    math_path: bool = False,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for ``(S, H, Tq, d)`` tensors.

    ``key_mask``: bool ``(S, Tk)`` or None. ``math_path`` spells the attention out with
    matmul + softmax (twice differentiable, materialises ``Tq x Tk`` scores); otherwise
    one ``scaled_dot_product_attention`` call (flash kernel on CPU, once differentiable).
    """
    if math_path:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def iterative_pinv(x: torch.Tensor, iters: int = 6) -> torch.Tensor:
    """Moore-Penrose pseudo-inverse of a batch of square matrices ``(..., M, M)``.

    The iteration of Razavi et al. (2014) used by Nystroemformer:
    ``Z <- 1/4 Z (13 I - XZ (15 I - XZ (7 I - XZ)))`` from
    ``Z0 = X^T / (max row-sum |X| * max col-sum |X|)`` (per matrix).
    """
    absx = x.abs()
    denom = absx.sum(-1).amax(-1) * absx.sum(-2).amax(-1)
    z = x.transpose(-1, -2) / denom[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    for _ in range(int(iters)):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


def nystrom_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
    num_landmarks: int = 256,
    pinv_iterations: int = 6,
    math_path: bool = False,
) -> torch.Tensor:
    """Nystroem approximation of softmax attention, ``(S, H, T, d)`` in and out.

    Landmarks are means of ``M`` contiguous segments of each row's real tokens (the real
    tokens are a prefix of length ``n_s``; token ``p`` falls in segment
    ``floor(p * M / n_s)``), ``M = min(num_landmarks, min_s n_s)``. Then
    ``out = softmax(q kL^T) pinv(softmax(qL kL^T)) softmax(qL k^T + mask) v``, evaluated
    right to left with two attention calls, so nothing of size ``T x T`` (or ``T x M``)
    is materialised. With ``M = n_s`` for every row it equals exact attention (up to the
    pseudo-inverse iteration's accuracy).
    """
    s, _, t, _ = q.shape
    if key_mask is None:
        lengths = torch.full((s,), t, dtype=torch.long, device=q.device)
    else:
        lengths = key_mask.sum(-1)
    m = int(min(int(num_landmarks), int(lengths.min())))
    pos = torch.arange(t, device=q.device)
    seg = torch.div(pos[None, :] * m, lengths[:, None], rounding_mode="floor")  # (S, T)
    seg = torch.where(pos[None, :] < lengths[:, None], seg, m)  # padding -> dummy segment
    avg = F.one_hot(seg, m + 1)[..., :m].to(q.dtype)  # (S, T, M)
    avg = avg / avg.sum(1, keepdim=True).clamp_min(1.0)
    avg_t = avg.transpose(1, 2)[:, None]  # (S, 1, M, T)
    q_l = avg_t @ q  # (S, H, M, d)
    k_l = avg_t @ k
    z = _sdpa(q_l, k, v, key_mask, scale, math_path)  # (S, H, M, d)
    kernel = torch.softmax((q_l @ k_l.transpose(-1, -2)) * scale, dim=-1)  # (S, H, M, M)
    w = iterative_pinv(kernel, pinv_iterations) @ z
    return _sdpa(q, k_l, w, None, scale, math_path)


class MultiHeadAttention(nn.Module):
    """Official-layout multi-head attention (no residual).

    Args:
        dim: model width D.
        heads: number of heads H (official: 8).
        dim_head: width of one head (official: 64); inner width ``H * dim_head``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        self.dim, self.heads, self.dim_head = int(dim), int(heads), int(dim_head)
        self.inner = self.heads * self.dim_head
        self.scale = self.dim_head**-0.5
        self.to_qkv = nn.Linear(self.dim, 3 * self.inner, bias=False)
        self.to_out = nn.Linear(self.inner, self.dim)

    # -- helpers ---------------------------------------------------------------------
    def _core(self, q, k, v, key_mask, mode, num_landmarks, pinv_iterations, math_path):
        if mode == "nystrom":
            return nystrom_attention(
                q, k, v, key_mask, self.scale, num_landmarks, pinv_iterations, math_path
            )
        return _sdpa(q, k, v, key_mask, self.scale, math_path)

    def _qkv_weight(self, h0: int, h1: int) -> torch.Tensor:
        """Rows of ``to_qkv.weight`` for heads ``h0..h1-1``: ``(3 * (h1-h0) * d, D)``."""
        w = self.to_qkv.weight
        if h0 == 0 and h1 == self.heads:
            return w
        d = self.dim_head
        parts = [w[j * self.inner + h0 * d : j * self.inner + h1 * d] for j in range(3)]
        return torch.cat(parts, dim=0)

    # -- full self-attention ---------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        mode: str = "exact",
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        math_path: bool = False,
    ) -> torch.Tensor:
        """Self-attention of every row of ``x (S, T, D)``; returns ``(S, T, D)``.

        ``key_mask``: bool ``(S, T)``, True = real token (a prefix of each row).
        """
        s, t, _ = x.shape
        qkv = F.linear(x, self.to_qkv.weight).view(s, t, 3, self.heads, self.dim_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (S, H, T, d)
        out = self._core(q, k, v, key_mask, mode, num_landmarks, pinv_iterations, math_path)
        return self.to_out(out.transpose(1, 2).reshape(s, t, self.inner))

    @torch.no_grad()
    def residual_(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        mode: str = "exact",
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        max_chunk_bytes: int = 256 * 2**20,
    ) -> torch.Tensor:
        """In place ``x += attn(x)`` for inference; memory-bounded.

        Heads are processed in the fewest equal chunks whose q/k/v fit in
        ``max_chunk_bytes`` (all sub-bags in every call); the output projection is
        accumulated per chunk, so the full ``(S, T, 3 * inner)`` q/k/v tensor and the
        ``(S, T, inner)`` attention output are never held at once for large bags.
        """
        s, t, dm = x.shape
        per_head = s * t * 3 * self.dim_head * x.element_size()
        n_chunks = self.heads
        for c in range(1, self.heads + 1):
            if self.heads % c == 0 and per_head * self.heads / c <= max_chunk_bytes:
                n_chunks = c
                break
        hc = self.heads // n_chunks
        x2 = x.view(s * t, dm)
        acc = torch.zeros_like(x2) if n_chunks > 1 else None
        w_out = self.to_out.weight
        for h0 in range(0, self.heads, hc):  # loop over head chunks, never over sub-bags
            h1 = h0 + hc
            qkv = F.linear(x2, self._qkv_weight(h0, h1)).view(s, t, 3, hc, self.dim_head)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            o = self._core(q, k, v, key_mask, mode, num_landmarks, pinv_iterations, False)
            del qkv, q, k, v
            o = o.transpose(1, 2).reshape(s * t, hc * self.dim_head)
            w = w_out[:, h0 * self.dim_head : h1 * self.dim_head]
            if acc is None:
                acc = F.linear(o, w)
            else:
                acc.addmm_(o, w.t())
            del o
        x2.add_(acc).add_(self.to_out.bias)
        return x

    # -- a few queries (message tokens) against all tokens -------------------------
    def query_attention(
        self,
        x: torch.Tensor,
        num_queries: int,
        key_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Exact attention of the first ``num_queries`` tokens of each row over all.

        Returns ``(out (S, nq, D), weights (S, H, nq, T) or None)`` -- equal to
        ``forward(x)[:, :nq]`` but O(T) instead of O(T^2): keys and values are never
        formed. With ``q_h = W_q,h x_i`` the score ``q_h . (W_k,h x_t)`` is
        ``(W_k,h^T q_h) . x_t``, and ``sum_t p_t W_v,h x_t = W_v,h (sum_t p_t x_t)``.
        """
        s, t, dm = x.shape
        nq, h, d = int(num_queries), self.heads, self.dim_head
        w_q, w_k, w_v = self.to_qkv.weight.split(self.inner, dim=0)  # each (inner, D)
        q = F.linear(x[:, :nq], w_q).view(s, nq, h, d)
        u = torch.einsum("sjhd,hdc->shjc", q, w_k.view(h, d, dm)) * self.scale  # (S,H,nq,D)
        scores = torch.bmm(u.reshape(s, h * nq, dm), x.transpose(1, 2))  # (S, H*nq, T)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
        p = torch.softmax(scores, dim=-1)
        pooled = torch.bmm(p, x).view(s, h, nq, dm)  # (S, H, nq, D)
        o = torch.einsum("shjc,hdc->sjhd", pooled, w_v.view(h, d, dm)).reshape(s, nq, self.inner)
        out = self.to_out(o)
        weights = p.view(s, h, nq, t) if need_weights else None
        return out, weights
