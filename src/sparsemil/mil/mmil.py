"""MMIL-Transformer (Multiple MIL Transformer, Zhang et al. 2023), torchmil-compatible.

Architecture (as the official hustvl/MMIL-Transformer code):

1. optional input projection ``proj: Linear(C, D)`` (official ``fc1``);
2. + ``absolute_pos_embed``: one learnable D-vector added to every instance (the
   official "absolute position embedding" is a single broadcast vector; kept);
3. grouping of the instances into ``num_subbags`` sub-bags (see :mod:`.grouping`);
4. ``num_msg`` message tokens prepended to every sub-bag, and one global ``msgcls`` token;
5. ``num_layers`` x [sub-bag self-attention (weights shared by all sub-bags) with
   residual -> attention over ``[msgcls; all message tokens]`` (own weights) with residual,
   the updated message tokens written back into their sub-bags];
6. ``logits = classifier(msgcls)``.

All sub-bags of all bags in a batch go through one batched attention call (zero-padded,
key-padding mask); there is no Python loop over sub-bags. In the last layer only the
message tokens' outputs are used, so only their queries are computed (exact, O(N)).
See ``docs/mmil.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmil.models import MILModel

import sparsemil.mil.grouping as grp
from sparsemil.errors import SparsemilError
from sparsemil.mil.attention import MultiHeadAttention, check_mode

_ROW_CHUNK = 16384  # rows per chunk of the NaN/Inf check (bounded temporary memory)


def _reset_linear(lin: nn.Linear, gen: torch.Generator | None) -> None:
    """``nn.Linear.reset_parameters``, drawing from ``gen``."""
    nn.init.kaiming_uniform_(lin.weight, a=math.sqrt(5), generator=gen)
    if lin.bias is not None:
        bound = 1 / math.sqrt(lin.in_features) if lin.in_features > 0 else 0
        nn.init.uniform_(lin.bias, -bound, bound, generator=gen)


class MMILLayer(nn.Module):
    """One MMIL layer: sub-bag attention + message-token attention (official BasicLayer)."""

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64) -> None:
        super().__init__()
        self.subbag_attn = MultiHeadAttention(dim, heads, dim_head)
        self.msg_attn = MultiHeadAttention(dim, heads, dim_head)


class _Layout:
    """Index bookkeeping of the padded sub-bag batch ``(S, T = m + Lmax, D)``.

    Attributes (torch tensors unless noted):
        rows: ``(K,)`` rows of the projected valid-instance matrix, sorted by sub-bag.
        dst: ``(K,)`` flat row in the ``(S * T, D)`` buffer of each of those instances.
        orig: ``(K,)`` flat index ``b * N + n`` into the input, for attention maps.
        identity_rows: bool (python), ``rows == arange(K)``.
        sizes: ``(S,)`` instances per sub-bag; S, T, lmax: ints.
        key_mask: ``(S, T)`` bool or None (None when every sub-bag has ``lmax``).
        msg_dst: ``(S * m,)`` flat row of each message token in the ``(B * Tm, D)``
            message sequence (``Tm = 1 + Gmax * m``, row ``b * Tm`` is ``msgcls``).
        msg_key_mask: ``(B, Tm)`` bool or None. subbag_bag: ``(S,)`` bag of each sub-bag.
    """

    def __init__(
        self, ids_per_bag: list[np.ndarray], valid_per_bag: list[np.ndarray], n: int, m: int, device
    ):
        gid_parts, row_parts, orig_parts = [], [], []
        g_per_bag, row_off, gid_off = [], 0, 0
        for b, (ids, valid) in enumerate(zip(ids_per_bag, valid_per_bag, strict=True)):
            keep = ids >= 0
            g = int(ids[keep].max()) + 1
            gid_parts.append(ids[keep] + gid_off)
            row_parts.append(np.flatnonzero(keep) + row_off)
            orig_parts.append(b * n + valid[keep])
            g_per_bag.append(g)
            row_off += ids.shape[0]
            gid_off += g
        gid = np.concatenate(gid_parts)
        rows = np.concatenate(row_parts)
        orig = np.concatenate(orig_parts)
        order = np.argsort(gid, kind="stable")
        gid, rows, orig = gid[order], rows[order], orig[order]
        s = gid_off
        sizes = np.bincount(gid, minlength=s)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        pos = np.arange(gid.shape[0]) - starts[gid]
        lmax = int(sizes.max())
        t = m + lmax
        self.S, self.T, self.lmax, self.m = s, t, lmax, m
        self.B = len(ids_per_bag)
        self.identity_rows = bool(
            rows.shape[0] == row_off and np.array_equal(rows, np.arange(row_off))
        )
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)  # noqa: E731
        self.rows = as_t(rows)
        self.dst = as_t(gid * t + m + pos)
        self.inst_flat = as_t(gid * lmax + pos)  # flat index into (S, lmax)
        self.orig = as_t(orig)
        self.sizes = as_t(sizes)
        self.key_mask = None
        if (sizes != lmax).any():
            self.key_mask = torch.arange(t, device=device)[None, :] < (self.sizes + m)[:, None]
        g_arr = np.asarray(g_per_bag)
        gmax = int(g_arr.max())
        tm = 1 + gmax * m
        self.Tm, self.gmax = tm, gmax
        bag = np.repeat(np.arange(self.B), g_arr)
        local = np.arange(s) - np.repeat(np.concatenate([[0], np.cumsum(g_arr)[:-1]]), g_arr)
        msg_rows = (bag * tm + 1 + local * m)[:, None] + np.arange(m)[None, :]
        self.msg_dst = as_t(msg_rows.reshape(-1))
        self.subbag_bag = as_t(bag)
        self.subbag_local = as_t(local)
        self.msg_key_mask = None
        if (g_arr != gmax).any():
            lens = torch.from_numpy(1 + g_arr * m).to(device)
            self.msg_key_mask = torch.arange(tm, device=device)[None, :] < lens[:, None]


class MMILTransformer(MILModel):
    """MMIL-Transformer for bags ``X (B, N, C)`` -> logits ``(B, n_classes)``.

    Args:
        in_dim: C, instance feature dimension.
        n_classes: number of bag classes.
        embed_dim: D, model width.
        num_subbags: number of sub-bags G per bag (``min(N, G)`` for bags with N < G).
        num_msg: message tokens per sub-bag (>= 1).
        num_layers: L.
        grouping: ``random`` | ``sequential`` | ``kmeans_embed`` | ``kmeans_coords`` |
            ``precomputed`` (official aliases ``seq``, ``embed``, ``coords``, ``idx``).
            A plain attribute: may be reassigned at run time.
        mask_ratio: fraction of sub-bags dropped (in the first layer, hence for the whole
            pass) during training; at least one sub-bag is always kept.
        attention: ``exact`` or ``nystrom`` for the sub-bag self-attention.
        max_subbag_size: randomly keep at most this many instances per sub-bag
            (None = keep all; the official code caps at 4300).
        project: use the input projection C -> D (else C must equal D).
        ape: add the learnable broadcast position vector.
        seed: seeds the model's own numpy Generator (random grouping, sub-bag masking,
            capping) and, if given, the parameter initialisation (without touching the
            global RNG state). None = fresh OS entropy.
        heads, dim_head: attention layout (official 8 x 64, regardless of D).
        num_landmarks, pinv_iterations: Nystroem options.
        kmeans_seed: ``random_state`` of the k-means groupings (official 0).
        twice_differentiable: use matmul+softmax attention instead of the SDPA kernel
            when autograd is on, so double backward (Hessian-vector products) works.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int = 2,
        embed_dim: int = 512,
        num_subbags: int = 10,
        num_msg: int = 1,
        num_layers: int = 2,
        grouping: str = "random",
        mask_ratio: float = 0.0,
        attention: str = "exact",
        max_subbag_size: int | None = None,
        project: bool = True,
        ape: bool = True,
        seed: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        kmeans_seed: int = 0,
        twice_differentiable: bool = False,
    ) -> None:
        super().__init__()
        for name, v, lo in (
            ("in_dim", in_dim, 1),
            ("n_classes", n_classes, 1),
            ("embed_dim", embed_dim, 1),
            ("num_subbags", num_subbags, 1),
            ("num_msg", num_msg, 1),
            ("num_layers", num_layers, 1),
            ("heads", heads, 1),
            ("dim_head", dim_head, 1),
            ("num_landmarks", num_landmarks, 1),
            ("pinv_iterations", pinv_iterations, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or int(v) < lo:
                raise SparsemilError(
                    f"MMILTransformer: {name} must be an integer >= {lo} (got {v!r})"
                )
        if not isinstance(project, bool) or not isinstance(ape, bool):
            raise SparsemilError("MMILTransformer: project and ape must be True or False")
        if not project and int(in_dim) != int(embed_dim):
            raise SparsemilError(
                f"MMILTransformer: project=False feeds features in as they are, so in_dim "
                f"({in_dim}) must equal embed_dim ({embed_dim})"
            )
        if max_subbag_size is not None and (
            isinstance(max_subbag_size, bool) or int(max_subbag_size) < 1
        ):
            raise SparsemilError(f"max_subbag_size must be None or >= 1 (got {max_subbag_size})")
        grp.num_kept(1, mask_ratio)  # validates mask_ratio
        grouping = grp.check_strategy(grouping)
        check_mode(attention)
        self._init_kwargs = {
            "in_dim": int(in_dim),
            "n_classes": int(n_classes),
            "embed_dim": int(embed_dim),
            "num_subbags": int(num_subbags),
            "num_msg": int(num_msg),
            "num_layers": int(num_layers),
            "grouping": grouping,
            "mask_ratio": float(mask_ratio),
            "attention": attention,
            "max_subbag_size": None if max_subbag_size is None else int(max_subbag_size),
            "project": project,
            "ape": ape,
            "seed": None if seed is None else int(seed),
            "heads": int(heads),
            "dim_head": int(dim_head),
            "num_landmarks": int(num_landmarks),
            "pinv_iterations": int(pinv_iterations),
            "kmeans_seed": int(kmeans_seed),
            "twice_differentiable": bool(twice_differentiable),
        }
        k = self._init_kwargs
        self.in_dim, self.n_classes, self.embed_dim = k["in_dim"], k["n_classes"], k["embed_dim"]
        self.num_subbags, self.num_msg, self.num_layers = (
            k["num_subbags"],
            k["num_msg"],
            k["num_layers"],
        )
        self.grouping = grouping
        self.mask_ratio = k["mask_ratio"]
        self.attention = attention
        self.max_subbag_size = k["max_subbag_size"]
        self.num_landmarks, self.pinv_iterations = k["num_landmarks"], k["pinv_iterations"]
        self.kmeans_seed = k["kmeans_seed"]
        self.twice_differentiable = k["twice_differentiable"]
        self.max_chunk_bytes = 256 * 2**20  # q/k/v memory per attention call at inference
        self.math_attention_bytes = 64 * 2**20  # autograd: explicit scores up to this size
        self._full_last_layer = False  # testing/benchmark: run the full last layer
        self.criterion = nn.CrossEntropyLoss()
        self.reseed(seed)

        # Modules are laid out on the meta device (no RNG draws), then every parameter is
        # drawn from ``gen`` -- a private Generator when seeded (the global RNG is never
        # touched), else torch's default generator -- in the order torch's own
        # initialisation would use.
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        d = self.embed_dim
        with torch.device("meta"):
            self.proj = nn.Linear(self.in_dim, d) if project else None
            self.absolute_pos_embed = nn.Parameter(torch.empty(d)) if ape else None
            # distinct, randomly initialised message tokens (official: one zero vector)
            self.msg_tokens = nn.Parameter(torch.empty(self.num_msg, d))
            self.msgcls_token = nn.Parameter(torch.empty(d))
            self.layers = nn.ModuleList(
                MMILLayer(d, k["heads"], k["dim_head"]) for _ in range(self.num_layers)
            )
            self.classifier = nn.Linear(d, self.n_classes)
        self.to_empty(device="cpu")
        self._init_parameters(gen)

    @torch.no_grad()
    def _init_parameters(self, gen: torch.Generator | None) -> None:
        """Draw every parameter from ``gen`` (None = torch's default generator)."""
        if self.proj is not None:
            _reset_linear(self.proj, gen)
        if self.absolute_pos_embed is not None:
            self.absolute_pos_embed.zero_()
        self.msg_tokens.copy_(torch.randn(self.msg_tokens.shape, generator=gen) * 0.02)
        self.msgcls_token.copy_(torch.randn(self.msgcls_token.shape, generator=gen))
        for layer in self.layers:
            for attn in (layer.subbag_attn, layer.msg_attn):
                _reset_linear(attn.to_qkv, gen)
                _reset_linear(attn.to_out, gen)
        _reset_linear(self.classifier, gen)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def config(self) -> dict[str, Any]:
        """JSON-able kwargs that rebuild this model: ``MMILTransformer(**model.config)``."""
        cfg = dict(self._init_kwargs)
        cfg.update(
            grouping=self.grouping,
            mask_ratio=self.mask_ratio,
            attention=self.attention,
            max_subbag_size=self.max_subbag_size,
            num_landmarks=self.num_landmarks,
            pinv_iterations=self.pinv_iterations,
            kmeans_seed=self.kmeans_seed,
            twice_differentiable=self.twice_differentiable,
        )
        return cfg

    def reseed(self, seed: int | None) -> None:
        """Restart the model's own Generator (random grouping, masking, capping)."""
        self._rng = np.random.default_rng(seed)

    def get_rng_state(self) -> dict[str, Any]:
        """State of the model's own Generator (plain ints and strings; for checkpoints)."""
        return self._rng.bit_generator.state

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore a state returned by :meth:`get_rng_state`."""
        self._rng.bit_generator.state = dict(state)

    @classmethod
    def from_official(
        cls, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], **overrides: Any
    ) -> MMILTransformer:
        """Build from an official checkpoint's state_dict and official config.

        ``config`` uses the official argparse names (type, mode, in_chans, num_subbags,
        embed_dim, num_msg, ape, n_classes, num_layers); ``overrides`` are extra
        MMILTransformer kwargs (e.g. ``max_subbag_size=4300`` to mimic the official cap).
        """
        from sparsemil.mil.official import convert_official_state_dict, official_config_to_kwargs

        kwargs = official_config_to_kwargs(config)
        kwargs.update(overrides)
        ours = convert_official_state_dict(state_dict, kwargs)
        model = cls(**kwargs)
        model.load_state_dict(ours, strict=True)
        return model

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, X, mask, coords, group_ids, grouping):
        if not isinstance(X, torch.Tensor):
            raise SparsemilError(
                f"X must be a torch.Tensor of shape (B, N, C), got {type(X).__name__}"
            )
        squeeze = X.ndim == 2
        if squeeze:
            X = X.unsqueeze(0)
            mask = None if mask is None else torch.as_tensor(mask).reshape(1, -1)
            coords = None if coords is None else torch.as_tensor(coords).unsqueeze(0)
            group_ids = None if group_ids is None else torch.as_tensor(group_ids).reshape(1, -1)
        if X.ndim != 3:
            raise SparsemilError(f"X must have shape (B, N, C), got {tuple(X.shape)}")
        b, n, c = X.shape
        if b == 0:
            raise SparsemilError("X is an empty batch (B = 0)")
        if n == 0:
            raise SparsemilError("empty bag: X has N = 0 instances")
        if c != self.in_dim:
            raise SparsemilError(
                f"X has feature dimension {c}, but the model expects in_dim = {self.in_dim}"
            )
        param = self.msgcls_token
        if not X.is_floating_point() or X.dtype != param.dtype:
            X = X.to(param.dtype)
        if mask is not None:
            mask = torch.as_tensor(mask, device=X.device)
            if tuple(mask.shape) != (b, n):
                raise SparsemilError(
                    f"mask must have shape (B, N) = {(b, n)}, got {tuple(mask.shape)}"
                )
            mask = mask.bool()
            empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
            if empty:
                raise SparsemilError(f"empty bag: mask selects no instance in bag(s) {empty}")
            if bool(mask.all()):
                mask = None
        lo, hi = torch.aminmax(X)  # one pass; NaN propagates, so finite <=> no NaN/Inf
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            step = max(1, _ROW_CHUNK // b)
            for start in range(0, n, step):  # locate it (rows chunked: bounded memory)
                bad = ~torch.isfinite(X[:, start : start + step]).all(dim=-1)
                if mask is not None:
                    bad &= mask[:, start : start + step]
                if bool(bad.any()):
                    bi, ni = bad.nonzero()[0].tolist()
                    raise SparsemilError(f"X contains NaN or Inf (bag {bi}, instance {start + ni})")
        if grouping == "kmeans_coords":
            if coords is None:
                raise SparsemilError("grouping 'kmeans_coords' needs coords of shape (B, N, 2)")
            coords = torch.as_tensor(coords)
            if tuple(coords.shape) != (b, n, 2):
                raise SparsemilError(
                    f"coords must have shape (B, N, 2) = {(b, n, 2)}, got {tuple(coords.shape)}"
                )
        if grouping == "precomputed":
            if group_ids is None:
                raise SparsemilError("grouping 'precomputed' needs group_ids of shape (B, N)")
            group_ids = torch.as_tensor(group_ids)
            if tuple(group_ids.shape) != (b, n):
                raise SparsemilError(
                    f"group_ids must have shape (B, N) = {(b, n)}, got {tuple(group_ids.shape)}"
                )
        return X, mask, coords, group_ids

    # ------------------------------------------------------------------ grouping
    def _group(self, b, valid, h_rows, coords, group_ids, grouping):
        """Group ids (numpy, -1 = in no sub-bag) of bag ``b``'s valid instances."""
        nb = valid.shape[0]
        if grouping == "sequential":
            ids = grp.sequential_groups(nb, self.num_subbags)
        elif grouping == "random":
            ids = grp.random_groups(nb, self.num_subbags, self._rng)
        elif grouping == "kmeans_embed":
            ids = grp.kmeans_groups(
                h_rows.detach().cpu().numpy(), self.num_subbags, self.kmeans_seed
            )
        elif grouping == "kmeans_coords":
            ids = grp.kmeans_groups(
                coords[b].detach().cpu().numpy()[valid], self.num_subbags, self.kmeans_seed
            )
        else:
            ids = grp.precomputed_groups(group_ids[b].detach().cpu().numpy()[valid])
        if self.training and self.mask_ratio > 0:
            ids = grp.drop_groups(ids, self.mask_ratio, self._rng)
        return grp.cap_group_sizes(ids, self.max_subbag_size, self._rng)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_att: bool = False,
        *,
        coords: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Bag logits (torchmil's ``forward(X, mask, return_att)``).

        Args:
            X: ``(B, N, C)`` instance features (``(N, C)`` is read as one bag).
            mask: ``(B, N)`` bool/0-1, True = real instance (padded batches), or None.
            return_att: also return per-instance attention scores.
            coords: ``(B, N, 2)`` instance coordinates (``kmeans_coords`` grouping).
            group_ids: ``(B, N)`` integer sub-bag ids (``precomputed`` grouping).

        Returns:
            logits ``(B, n_classes)``, or ``(logits, att (B, N))`` where ``att[b, n]`` =
            (last layer, mean over heads and message tokens) attention of instance n's
            sub-bag message tokens to n, times the msgcls token's attention to that
            sub-bag's message tokens; 0 for padded/dropped instances.

        With autograd on, the layers run out of place (:meth:`_forward_train`); without it,
        in place and memory-bounded (:meth:`_forward_eval`); the logits agree up to rounding.
        """
        grouping = grp.check_strategy(self.grouping)
        check_mode(self.attention)
        X, mask, coords, group_ids = self._check_inputs(X, mask, coords, group_ids, grouping)
        b, n, _ = X.shape
        x, lay = self._subbag_batch(X, mask, coords, group_ids, grouping)
        run = self._forward_train if torch.is_grad_enabled() else self._forward_eval
        cls, p_inst, p_msg = run(x, lay, return_att)
        logits = self.classifier(cls)
        if not return_att:
            return logits
        if p_inst is None:
            raise SparsemilError("return_att needs the message-query path of the last layer")
        return logits, self._attention_map(p_inst, p_msg, lay, b, n)

    def _subbag_batch(self, X, mask, coords, group_ids, grouping) -> tuple[torch.Tensor, _Layout]:
        """Padded sub-bag batch ``x (S, T, D)``: message tokens, then the sub-bag's instances."""
        m, d = self.num_msg, self.embed_dim
        h, valid_per_bag = self._embed(X, mask)
        ids_per_bag, off = [], 0
        for i, valid in enumerate(valid_per_bag):  # per bag (grouping is per bag)
            nb = valid.shape[0]
            ids_per_bag.append(
                self._group(i, valid, h[off : off + nb], coords, group_ids, grouping)
            )
            off += nb
        lay = _Layout(ids_per_bag, valid_per_bag, X.shape[1], m, X.device)
        src = h if lay.identity_rows else h.index_select(0, lay.rows)
        if torch.is_grad_enabled():
            inst = h.new_zeros(lay.S * lay.lmax, d).index_copy(0, lay.inst_flat, src)
            return torch.cat([self.msg_tokens.expand(lay.S, m, d), inst.view(lay.S, -1, d)], 1), lay
        x = h.new_zeros(lay.S * lay.T, d).index_copy_(0, lay.dst, src).view(lay.S, lay.T, d)
        x[:, :m] = self.msg_tokens
        return x, lay

    def _embed(self, X, mask) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Projection (+ position vector) of exactly the valid rows ``(K, D)``, and the
        valid instance indices of every bag."""
        b, n, c = X.shape
        grad = torch.is_grad_enabled()
        if mask is None:
            valid_per_bag = [np.arange(n)] * b
            xv = X.reshape(b * n, c)
        else:
            mask_np = mask.cpu().numpy()
            valid_per_bag = [np.flatnonzero(mask_np[i]) for i in range(b)]
            xv = X.reshape(b * n, c)[mask.reshape(-1)]
        h = self.proj(xv) if self.proj is not None else (xv if grad else xv.clone())
        if self.absolute_pos_embed is not None:
            h = h + self.absolute_pos_embed if grad else h.add_(self.absolute_pos_embed)
        return h, valid_per_bag

    def _body_layers(self) -> nn.ModuleList:
        """The layers run in full; the last one runs message queries only, unless
        ``_full_last_layer`` (testing/benchmarks)."""
        return self.layers if self._full_last_layer else self.layers[:-1]

    def _forward_train(self, x, lay: _Layout, return_att: bool):
        """Autograd path: out-of-place residuals; matmul+softmax attention where it is
        small or ``twice_differentiable`` asks for it. Returns ``(cls, p_inst, p_msg)``."""
        m = self.num_msg
        sub_math = self._math_path(True, lay.S, lay.T)
        msg_math = self._math_path(True, lay.B, lay.Tm)
        cls = self.msgcls_token.expand(lay.B, self.embed_dim)
        for layer in self._body_layers():
            x = x + layer.subbag_attn(
                x, lay.key_mask, self.attention, self.num_landmarks, self.pinv_iterations, sub_math
            )
            seq = self._message_seq(x[:, :m], cls, lay)
            seq = seq + layer.msg_attn(seq, lay.msg_key_mask, math_path=msg_math)
            cls = seq[:, 0]
            x = torch.cat([self._messages_of(seq, lay), x[:, m:]], dim=1)
        return self._last_layer(x, cls, lay, return_att)

    def _forward_eval(self, x, lay: _Layout, return_att: bool):
        """Inference path (no autograd): in-place residuals, q/k/v chunked by heads to at
        most ``max_chunk_bytes``. Returns ``(cls, p_inst, p_msg)``."""
        m = self.num_msg
        cls = self.msgcls_token.expand(lay.B, self.embed_dim)
        for layer in self._body_layers():
            layer.subbag_attn.residual_(
                x, lay.key_mask, self.attention, self.num_landmarks, self.pinv_iterations,
                self.max_chunk_bytes,
            )  # fmt: skip
            seq = self._message_seq(x[:, :m], cls, lay)
            seq = seq + layer.msg_attn(seq, lay.msg_key_mask, math_path=False)
            cls = seq[:, 0]
            x[:, :m] = self._messages_of(seq, lay)
        return self._last_layer(x, cls, lay, return_att)

    def _last_layer(self, x, cls, lay: _Layout, return_att: bool):
        """Last layer, exact and O(N): only the message tokens' (sub-bag attention) and
        msgcls's (message attention) queries are computed."""
        if self._full_last_layer:
            return cls, None, None
        layer, m = self.layers[-1], self.num_msg
        o, p_inst = layer.subbag_attn.query_attention(x, m, lay.key_mask, need_weights=return_att)
        seq = self._message_seq(x[:, :m] + o, cls, lay)
        o, p_msg = layer.msg_attn.query_attention(seq, 1, lay.msg_key_mask, need_weights=return_att)
        return seq[:, 0] + o[:, 0], p_inst, p_msg

    def _message_seq(self, msgs, cls, lay: _Layout) -> torch.Tensor:
        """``(B, Tm, D)``: ``[msgcls; every sub-bag's message tokens]`` of each bag."""
        b, d = lay.B, self.embed_dim
        seq = torch.cat([cls[:, None, :], msgs.new_zeros(b, lay.Tm - 1, d)], dim=1)
        seq = seq.reshape(b * lay.Tm, d)
        return seq.index_copy(0, lay.msg_dst, msgs.reshape(lay.S * lay.m, d)).view(b, lay.Tm, d)

    def _messages_of(self, seq, lay: _Layout) -> torch.Tensor:
        """The sub-bags' message tokens ``(S, m, D)`` back out of a message sequence."""
        d = self.embed_dim
        return seq.reshape(lay.B * lay.Tm, d).index_select(0, lay.msg_dst).view(lay.S, lay.m, d)

    def _math_path(self, grad: bool, rows: int, t: int) -> bool:
        """Matmul+softmax attention (twice differentiable) instead of the SDPA kernel?

        Only with autograd on, and either forced (``twice_differentiable``) or when the
        score matrices are small (<= ``math_attention_bytes``), where it is as fast and
        lets double backward (Hessian-vector products) work without any flag.
        """
        if not grad:
            return False
        size = rows * self.layers[0].subbag_attn.heads * t * t * self.msgcls_token.element_size()
        return self.twice_differentiable or size <= self.math_attention_bytes

    @staticmethod
    def _attention_map(p_inst, p_msg, lay: _Layout, b: int, n: int) -> torch.Tensor:
        m = lay.m
        inst = p_inst.mean(dim=(1, 2))[:, m:]  # (S, lmax): msg tokens -> instances
        msg = p_msg.mean(dim=1)[:, 0, 1:]  # (B, Tm - 1): msgcls -> message tokens
        per_sub = msg.reshape(b, lay.gmax, m).sum(-1)[lay.subbag_bag, lay.subbag_local]  # (S,)
        score = (inst * per_sub[:, None]).reshape(-1).index_select(0, lay.inst_flat)
        att = score.new_zeros(b * n).index_copy(0, lay.orig, score)
        return att.view(b, n)

    # ------------------------------------------------------------------ torchmil API
    def compute_loss(
        self,
        Y: torch.Tensor,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        coords: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(logits (B, n_classes), {name: loss})`` for labels ``Y (B,)``.

        ``criterion(logits, y)`` defaults to ``self.criterion`` (cross-entropy); the loss is
        keyed by its class name (``"CrossEntropyLoss"``) or, for a function, its name.
        """
        logits = self.forward(X, mask, coords=coords, group_ids=group_ids)
        y = torch.as_tensor(Y, device=logits.device).reshape(-1).long()
        if y.shape[0] != logits.shape[0]:
            raise SparsemilError(f"Y has {y.shape[0]} labels for {logits.shape[0]} bags")
        crit = self.criterion if criterion is None else criterion
        name = type(crit).__name__ if isinstance(crit, nn.Module) else crit.__name__
        return logits, {name: crit(logits, y)}

    def predict(
        self,
        X: torch.Tensor,
        mask: torch.Tensor | None = None,
        return_inst_pred: bool = True,
        *,
        coords: torch.Tensor | None = None,
        group_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without autograd (torchmil's ``predict(X, mask, return_inst_pred=True)``):
        ``(logits (B, n_classes), attention scores (B, N))``, or the logits alone when
        ``return_inst_pred`` is False."""
        with torch.no_grad():
            return self.forward(X, mask, return_inst_pred, coords=coords, group_ids=group_ids)
