"""Hessian-vector products of a training loss over a fixed list of batches.

The operator represents ``H = sum_b w_b * d^2 L_b / dtheta^2`` where ``L_b = loss_fn(model, b)``
is the (mean) loss of batch ``b`` and ``w_b`` is that batch's share of the total
(``sum_b w_b = 1``). By default ``w_b`` is proportional to the batch's size -- the leading
dimension shared by all of its tensors (a batch without one, or whose tensors disagree, needs
explicit ``weights=``) -- so for mean-reduced losses ``H`` is the Hessian of the mean loss over
*samples*; for MIL with one bag per batch it is the mean over bags. Bags of different sizes
need no padding: each bag is its own batch.

``theta`` is the flat concatenation of the selected parameters (default: every trainable
parameter except those of BatchNorm layers, as in the official pruning code; frozen ones are
left out and a tied tensor counts once -- the same rule as the pruning and the L1 penalty).
The model is put in eval mode for every product (its previous mode is restored afterwards), so
dropout is off and BatchNorm uses its running statistics (which no product changes). Products
are plain detached tensors. A parameter that ``forward`` never touches has zero curvature in
every backend. Batches are used as given: build them from a fixed, non-shuffled,
non-augmented dataset. With the same inputs the products are bitwise deterministic on CPU;
the constructor checks that two products of one vector agree and that ``u.Hv = v.Hu``
(:meth:`HessianOperator.check_determinism`) and refuses the model otherwise (e.g. dropout
left on in eval mode).

The L1 penalty ``lambda * sum |theta|`` has zero curvature wherever no weight is exactly
zero, so it is left out of ``loss_fn`` (adding it changes nothing but cost).

Three backends compute one product (``method``):

* ``"linearize"``: forward-over-reverse with ``torch.func`` -- ``grad`` of
  ``functional_call``, linearised once per batch with ``torch.func.linearize`` so the
  primal forward/backward pass is traced and cached; every later product only runs the
  tangent computation. Several vectors go through one ``vmap`` (``matmat``). The cache
  holds the weights at first use: call :meth:`HessianOperator.reset` if they change.
* ``"func"``: the same without caching -- ``vmap`` over ``jvp(grad(...))``.
* ``"autograd"``: double backward (``torch.autograd.grad`` with ``create_graph=True``);
  the first-order graph is built once per batch and reused for every vector of a block.

``benchmarks/bench_slq.py`` measures them on CPU (FC5, digits, one thread: ``linearize``
1.2-1.5x faster per product than ``func`` or ``autograd``; batching vectors with ``vmap``
pays off only for small nets, where per-call overhead dominates). ``"auto"`` (the default) times
the first product with ``autograd``, ``linearize`` (traced, then cached) and ``func``, and keeps
the first traced backend that agrees with ``autograd`` (rtol 1e-4) *and* whose saving over the
``expected_products`` pays for tracing every batch, else ``autograd`` (on a large CNN tracing
can cost more than the whole spectrum; ``backend_choice`` records the timings). A traced
backend is not even tried on a CPU when its trial would not fit in half of the available memory
(:data:`TRACE_PEAK_FACTOR` times the measured ``autograd`` peak). Models with data-dependent
control flow or ``.item()`` calls cannot be traced, and a traced masked softmax can give NaN
tangents for some vectors. A non-finite product is an error, never a spectrum.

:class:`DistributedHessianOperator` shards the batches over ``torch.distributed`` ranks
and all-reduces the per-shard weighted sums, so every rank gets the full-data product.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparsemil.curvature.operator import LinearOperatorBase
from sparsemil.errors import SparsemilError

LossFn = Callable[[nn.Module, Any], Tensor]

_BN_TYPES = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)
METHODS = ("auto", "linearize", "func", "autograd")

#: elements cast to float64 at a time when summing per-batch products (32 MiB)
_CAST_CHUNK = 1 << 22

#: ``auto``: a traced backend's trial peak memory, as a multiple of the ``autograd`` product's
#: peak on the same batch, allowed for before the trial is started. Measured on this
#: project's CNNs (CPU, 3x32x32 inputs, one vector): ``linearize`` 3.0x (VGG16, 32 samples)
#: to 4.8x (ResNet18, 48 samples), ``func`` 1.7x (ResNet18, 16 samples); with a margin.
TRACE_PEAK_FACTOR = {"linearize": 6, "func": 3}
#: Relative tolerance of the determinism / symmetry check at construction.
CHECK_RTOL = 1e-3


def hessian_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable ``(name, parameter)`` pairs of ``model`` minus BatchNorm parameters, each
    tensor once (a tied tensor under its first name; frozen ones left out)."""
    bn_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, _BN_TYPES)
        for p in m.parameters(recurse=False)
    }
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in bn_ids]


def resolve_hessian_params(
    model: nn.Module, params: Any, where: str = "HessianOperator params"
) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` pairs for ``params`` (``None``: :func:`hessian_parameters`).

    ``params`` may hold parameters of ``model``, ``(name, parameter)`` pairs (as
    ``model.named_parameters()`` yields) or ``(module, attribute)`` pairs (as
    :func:`sparsemil.prune.magnitude.prunable_parameters` returns); a tensor given twice (or
    tied) counts once.

    Raises:
        SparsemilError: another type, a tensor that is not a parameter of ``model``, a frozen
            parameter (``requires_grad=False``: outside the pruning and the L1 penalty too),
            or nothing at all.
    """
    if params is None:
        named = hessian_parameters(model)
        if not named:
            raise SparsemilError("HessianOperator: the model has no trainable parameters")
        return named
    if isinstance(params, nn.Module | Tensor | str | bytes | Mapping) or not isinstance(
        params, Iterable
    ):
        raise SparsemilError(
            f"{where}: expected a list of parameters of the model, got {type(params).__name__}"
        )
    by_id = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    named: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for i, item in enumerate(params):
        p: Any = None
        if isinstance(item, Tensor):
            p = item
        elif isinstance(item, tuple) and len(item) == 2:
            if isinstance(item[1], Tensor):
                p = item[1]
            elif isinstance(item[0], nn.Module) and isinstance(item[1], str):
                p = item[0]._parameters.get(item[1])
        if p is None:
            raise SparsemilError(
                f"{where}[{i}]: expected a parameter of the model, a (name, parameter) or a "
                f"(module, name) pair, got {type(item).__name__}"
            )
        if id(p) not in by_id:
            raise SparsemilError(f"{where}[{i}]: not a parameter of the model")
        if not p.requires_grad:
            raise SparsemilError(
                f"{where}[{i}]: {by_id[id(p)]!r} is frozen (requires_grad=False); frozen "
                "parameters are left out of the Hessian, the pruning and the L1 penalty alike"
            )
        if id(p) not in seen:
            seen.add(id(p))
            named.append((by_id[id(p)], p))
    if not named:
        raise SparsemilError(f"{where}: empty; give at least one parameter")
    return named


def _leading_dims(batch: Any, out: list[int]) -> None:
    """Append the leading dimension of every tensor (with at least one dimension) in
    ``batch`` (a tensor or nested tuples/lists/dicts)."""
    if isinstance(batch, Tensor):
        if batch.dim() > 0:
            out.append(int(batch.shape[0]))
    elif isinstance(batch, Mapping):
        for item in batch.values():
            _leading_dims(item, out)
    elif isinstance(batch, list | tuple):
        for item in batch:
            _leading_dims(item, out)


def batch_size_of(batch: Any) -> int:
    """The number of samples in ``batch``: the leading dimension shared by all of its tensors
    (a tensor, or tuples/lists/dicts of them; 0-dim tensors and non-tensors are ignored).

    Raises:
        SparsemilError: no tensor with a batch dimension, or tensors whose leading dimensions
            differ -- pass ``weights=`` (one share per batch) to the operator instead.
    """
    dims: list[int] = []
    _leading_dims(batch, dims)
    if not dims:
        raise SparsemilError(
            f"HessianOperator: cannot infer the size of a batch of type {type(batch).__name__} "
            "(no tensor with a batch dimension); pass weights= (one share per batch)"
        )
    if len(set(dims)) > 1:
        raise SparsemilError(
            f"HessianOperator: cannot infer the size of a batch whose tensors have different "
            f"leading dimensions {sorted(set(dims))}; pass weights= (one share per batch)"
        )
    return dims[0]


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``functional_call`` can swap params."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self._loss_fn(self.model, batch)


def _agrees(a: Tensor, b: Tensor, rtol: float = 1e-4) -> bool:
    """Finite and equal to ``b`` up to ``rtol`` of ``b``'s largest entry."""
    if not bool(torch.isfinite(a).all()):
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return float((a - b).abs().max()) <= rtol * max(scale, 1e-30) if b.numel() else True


def _clock(device: torch.device) -> float:
    """``time.perf_counter()`` after the device's queued work (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one reduction (a NaN or Inf makes the sum
    non-finite); the entry-wise test runs only when the sum itself is not finite, which
    finite entries can also give by overflow."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _memory_in_use(device: torch.device) -> int:
    """Bytes in use now: the CUDA allocator's on a GPU, the process's resident set on CPU
    (0 where neither can be read)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _release_free_heap() -> None:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim(0)``; a no-op
    elsewhere), so that a rise of the resident set measures new memory, not pages glibc had
    kept from earlier work and would have reused (without it, a process that trained first
    reads a product's peak 40-60 % low)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak extra resident bytes while a ``with`` block runs on the CPU, over the level at
    entry: ``/proc/self/statm`` polled every 2 ms by a thread that lives only inside the block,
    after :func:`_release_free_heap`. ``peak`` is 0 where memory cannot be read, and on a GPU,
    where it is not measured: there running out of memory is an exception that ``auto``'s
    trial catches and falls back from (and resetting the allocator's peak statistics would
    erase a caller's)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type != "cpu":
            return self
        _release_free_heap()
        self._start = self._top = _memory_in_use(self.device)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.002):
            self._top = max(self._top, _memory_in_use(self.device))

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        top = max(self._top, _memory_in_use(self.device))
        self.peak = max(top - self._start, 0)


def _memory_available(device: torch.device) -> int:
    """Bytes still available: free CUDA memory on a GPU, ``MemAvailable`` on CPU (a large
    number where neither can be read, so the memory rule never refuses blindly)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 50


def _trace_error(backend: str, err: Exception) -> SparsemilError:
    """One line for a traced backend (``linearize``/``func``) that failed on this model."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "random" in first.lower():
        return SparsemilError(
            f"HessianOperator: the loss is random under model.eval() ({backend} backend: "
            f"{first[:120]}) -- e.g. dropout with training=True in forward "
            "(F.dropout(x, p, training=True)) or random sampling; make forward deterministic "
            "in eval mode"
        )
    return SparsemilError(
        f"HessianOperator: the {backend} backend cannot trace this model ({type(err).__name__}: "
        f"{first[:120]}); use method='autograd' (config key limit.hvp_method)"
    )


class HessianOperator(LinearOperatorBase):
    """Matrix-free Hessian of the weighted mean of ``loss_fn`` over ``batches``.

    A linear operator in the manner of SciPy: ``shape`` ``(D, D)``, ``dtype`` (the
    parameters'), ``op @ v`` for ``v`` of shape ``(D,)`` or ``(D, k)`` (same shape out, a
    detached tensor), :meth:`matmat`, and :meth:`to_scipy` for ``scipy.sparse.linalg``
    (e.g. ``eigsh(op.to_scipy(), k=5)``). It implements
    :class:`~sparsemil.curvature.operator.PerBatchCurvatureOperator`.

    Args:
        model: the network at the weights w* (not modified; mode restored after each call).
        loss_fn: ``(model, batch) -> scalar`` loss of one batch (mean over its samples).
        batches: fixed sequence of batches (tensors / tuples / dicts), already on the
            model's device; iterated in order for every product.
        params: parameters to differentiate (default: :func:`hessian_parameters`); see
            :func:`resolve_hessian_params` for the accepted forms. Frozen parameters are
            refused, tied ones counted once.
        weights: each batch's share (normalised to sum 1). Default: proportional to
            :func:`batch_size_of`.
        method: ``"auto"``, ``"func"`` or ``"autograd"`` (see the module docstring).
        chunk_size: most vectors pushed through one vmapped/grouped product.
        vmap_max_dim: vectors are batched with ``vmap`` only when D is at most this (on CPU
            large nets are compute-bound and ``vmap`` gains nothing; small nets are
            overhead-bound and gain a lot).
        check: run :meth:`check_determinism` now (three products): two products of one
            vector must agree and ``u.Hv = v.Hu``, else a one-line error naming the cause.
        expected_products: how many products the caller will ask for (SLQ: probes x steps);
            ``auto`` keeps a traced backend only when its saving over this many products
            pays for tracing every batch (:attr:`backend_choice` records the timings).

    Attributes:
        dim: D, the number of parameters in ``theta``.
        names: the parameters' names, in the order of ``theta``.
        determinism: the result of :meth:`check_determinism` (None when not run).
        dtype: the parameters' dtype (products are computed in it, accumulated in float64).
        num_products: how many Hessian-vector products have been computed.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: Sequence[nn.Parameter] | None = None,
        weights: Sequence[float] | None = None,
        method: str = "auto",
        chunk_size: int = 16,
        vmap_max_dim: int = 100_000,
        check: bool = True,
        expected_products: int = 512,
    ) -> None:
        if method not in METHODS:
            raise SparsemilError(f"HessianOperator method={method!r}: use one of {METHODS}")
        batches = list(batches)
        if not batches:
            raise SparsemilError("HessianOperator needs at least one batch")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = batches
        named = resolve_hessian_params(model, params)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.dim = int(sum(self.numels))
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.weights = self._normalise_weights(weights, batches)
        self.method = method
        self.chunk_size = max(1, int(chunk_size))
        self.vmap_max_dim = int(vmap_max_dim)
        self.num_products = 0
        self.expected_products = max(int(expected_products), 1)
        self.backend_choice: dict[str, Any] | None = None
        self._resolved: str | None = None if method == "auto" else method
        self._wrapper = _LossModule(model, loss_fn)
        self._linear_cache: dict[int, Callable] = {}
        self.determinism: dict[str, Any] | None = None
        if check:
            self.check_determinism()

    # ------------------------------------------------------------------ helpers
    def _normalise_weights(
        self, weights: Sequence[float] | None, batches: list[Any]
    ) -> list[float]:
        if weights is None:
            raw = [float(batch_size_of(b)) for b in batches]
        else:
            try:
                raw = [float(w) for w in weights]
            except (TypeError, ValueError):
                raise SparsemilError(
                    "HessianOperator weights: must be a list of numbers (one per batch)"
                ) from None
            if len(raw) != len(batches):
                raise SparsemilError(
                    f"HessianOperator weights: {len(raw)} values for {len(batches)} batches"
                )
        total = sum(raw)
        if not all(math.isfinite(w) for w in raw) or total <= 0 or any(w < 0 for w in raw):
            raise SparsemilError("HessianOperator weights must be non-negative with a positive sum")
        return [w / total for w in raw]

    def flat_params(self) -> Tensor:
        """theta = the selected parameters flattened, shape (D,)."""
        return torch.cat([p.detach().reshape(-1) for p in self.params])

    def split(self, v: Tensor) -> tuple[Tensor, ...]:
        """(D,) or (k, D) -> tuple of per-parameter tensors ((k,)+shape)."""
        lead = v.shape[:-1]
        chunks = torch.split(v, self.numels, dim=-1)
        return tuple(c.reshape(*lead, *s) for c, s in zip(chunks, self.shapes, strict=True))

    def _flatten(self, parts: Sequence[Tensor], k: int | None) -> Tensor:
        if k is None:
            return torch.cat([t.reshape(-1) for t in parts])
        return torch.cat([t.reshape(k, -1) for t in parts], dim=1)

    # --------------------------------------------------------------- per batch
    def _grad_fn(self, batch: Any) -> Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]]:
        wrapper, names = self._wrapper, ["model." + n for n in self.names]

        def loss_of(ps: tuple[Tensor, ...]) -> Tensor:
            return torch.func.functional_call(wrapper, dict(zip(names, ps, strict=True)), (batch,))

        return torch.func.grad(loss_of)

    def _apply_tangent_fn(self, fn: Callable, V: Tensor) -> Tensor:
        """Apply a per-vector tangent map to the rows of V (k, D) -> (k, D), detached (model
        parameters outside the Hessian, e.g. BatchNorm's, would otherwise leave a graph)."""
        k = V.shape[0]
        if k > 1 and self.dim <= self.vmap_max_dim:
            return self._flatten(torch.func.vmap(fn)(self.split(V)), k).detach()
        return torch.stack([self._flatten(fn(self.split(V[i])), None) for i in range(k)]).detach()

    def _hvp_linearize(self, index: int, V: Tensor) -> Tensor:
        fn = self._linear_cache.get(index)
        if fn is None:
            primals = tuple(p.detach() for p in self.params)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                _, fn = torch.func.linearize(self._grad_fn(self.batches[index]), primals)
            self._linear_cache[index] = fn
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self._apply_tangent_fn(fn, V)

    def _hvp_func(self, index: int, V: Tensor) -> Tensor:
        primals = tuple(p.detach() for p in self.params)
        grad_fn = self._grad_fn(self.batches[index])

        def hvp_one(tangent: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return torch.func.jvp(grad_fn, (primals,), (tangent,))[1]

        return self._apply_tangent_fn(hvp_one, V)

    def _hvp_autograd(self, index: int, V: Tensor) -> Tensor:
        """Double backward; the first-order graph is shared by the k vectors."""
        with torch.enable_grad():
            loss = self.loss_fn(self.model, self.batches[index])
            if not loss.requires_grad:  # no parameter reaches the loss: zero curvature
                return torch.zeros_like(V)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            # a parameter that forward never touches (grad None), or whose gradient does not
            # depend on the parameters, contributes nothing to H v
            live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            if not live:
                return torch.zeros_like(V)
            out = torch.empty_like(V)
            for i in range(V.shape[0]):
                tangent = self.split(V[i])
                hv = torch.autograd.grad(
                    [grads[j] for j in live],
                    self.params,
                    grad_outputs=[tangent[j] for j in live],
                    retain_graph=i < V.shape[0] - 1,
                    allow_unused=True,
                )
                parts = [
                    torch.zeros_like(p) if h is None else h
                    for h, p in zip(hv, self.params, strict=True)
                ]
                torch.cat([t.detach().reshape(-1) for t in parts], out=out[i])
        return out

    def _hvp_batch(self, index: int, V: Tensor) -> Tensor:
        """(k, D) -> H_b V (k, D) for batch ``index``, in the parameter dtype."""
        impl = {
            "linearize": self._hvp_linearize,
            "func": self._hvp_func,
            "autograd": self._hvp_autograd,
        }
        if self._resolved is None:  # "auto": time and compare the backends on this batch
            return self._choose_backend(impl, index, V)
        try:
            out = impl[self._resolved](index, V)
        except SparsemilError:
            raise
        except Exception as err:  # noqa: BLE001 - tracing failures come in many types
            if self._resolved == "autograd":
                raise
            if self.method != "auto":
                raise _trace_error(self._resolved, err) from None
            self._resolved = "autograd"  # a traced backend failed on a later batch
            self._linear_cache.clear()
            out = impl["autograd"](index, V)
        finite = _all_finite(out)
        if not finite and self.method == "auto":
            self._resolved = "autograd"  # a traced backend failed on a later vector
            self._linear_cache.clear()
            out = impl["autograd"](index, V)
            finite = _all_finite(out)
        if not finite:
            raise SparsemilError(
                f"Hessian-vector product ({self._resolved} backend) is not finite; the loss "
                "or its gradient is NaN/Inf at these weights, or the backend cannot trace "
                "this model (try method='autograd', config key limit.hvp_method)"
            )
        return out

    def _choose_backend(self, impl: dict[str, Callable], index: int, V: Tensor) -> Tensor:
        """``auto``: the cheapest backend that agrees with ``autograd`` over the expected work.

        On the first batch: the ``autograd`` product (the reference) is timed, then
        ``linearize`` twice (the first call traces; the second must repeat the reference, as
        a cached linearisation that mutates captured state drifts) and ``func``. A traced
        backend is kept when it agrees (rtol 1e-4), its saving per product over
        ``expected_products`` products pays for tracing every other batch, and (``linearize``)
        the cache of every batch's linearisation -- measured on this batch -- fits in half of
        the memory available; else ``autograd``. Before any trial on a CPU, its peak is estimated as
        :data:`TRACE_PEAK_FACTOR` times the ``autograd`` product's measured peak; a trial that
        would not fit in half of the available memory is skipped (an out-of-memory kill
        cannot be caught and fallen back from). (On ResNet18 with 64 CIFAR-sized samples the
        cache holds ~4.6 GB, against 1.6 GB for the whole ``autograd`` process.) The timings
        and the reason go to :attr:`backend_choice`.
        """
        k = max(int(V.shape[0]), 1)
        with _PeakMemory(self.device) as ref_mem:
            t0 = _clock(self.device)
            reference = impl["autograd"](index, V)
            t_ref = (_clock(self.device) - t0) / k
        choice: dict[str, Any] = {
            "autograd_s_per_vector": t_ref,
            "autograd_peak_bytes": ref_mem.peak,
        }
        others = max(len(self.batches) - 1, 0)
        for name in ("linearize", "func"):
            # a trial that does not fit must not be started: the OS kills a process that
            # runs out of memory, with no exception to fall back from
            need = TRACE_PEAK_FACTOR[name] * ref_mem.peak
            free = _memory_available(self.device)
            if need > 0.5 * free:
                choice[name] = (
                    f"not tried: its trial would need ~{need / 2**30:.1f} GiB "
                    f"({TRACE_PEAK_FACTOR[name]}x autograd's peak), "
                    f"{free / 2**30:.1f} GiB available"
                )
                continue
            try:
                _release_free_heap()
                mem0 = _memory_in_use(self.device)
                t0 = _clock(self.device)
                out = impl[name](index, V)
                t_first = (_clock(self.device) - t0) / k
                cached = max(_memory_in_use(self.device) - mem0, 0)
                again, t_next = out, t_first
                if name == "linearize":
                    t0 = _clock(self.device)
                    again = impl[name](index, V)
                    t_next = (_clock(self.device) - t0) / k
            except Exception as err:  # noqa: BLE001 - tracing failures come in many types
                self._linear_cache.clear()
                choice[name] = f"failed to trace ({type(err).__name__})"
                continue
            if not (_agrees(out, reference) and _agrees(again, reference)):
                # e.g. a masked softmax traced into NaN tangents for some vectors
                self._linear_cache.clear()
                choice[name] = "disagrees with autograd"
                continue
            if name == "linearize":
                need, free = cached * len(self.batches), _memory_available(self.device)
                choice["linearize_cache_bytes"] = need
                if need > 0.5 * (free + cached):
                    self._linear_cache.clear()
                    choice[name] = (
                        f"its cache would hold {need / 2**30:.1f} GiB for {len(self.batches)} "
                        f"batches, {(free + cached) / 2**30:.1f} GiB available"
                    )
                    continue
            trace_cost = max(t_first - t_next, 0.0) * k * others
            # every product visits every batch: the saving per batch times the batches
            saving = (t_ref - t_next) * self.expected_products * len(self.batches)
            choice[f"{name}_s_per_vector"] = t_next
            choice[f"{name}_trace_s"] = max(t_first - t_next, 0.0) * k
            if saving > trace_cost:
                choice["chosen"], choice["reason"] = (
                    name,
                    (
                        f"saves {saving:.3g}s over {self.expected_products} products, "
                        f"tracing {others} more batches costs {trace_cost:.3g}s"
                    ),
                )
                self._resolved, self.backend_choice = name, choice
                return again
            self._linear_cache.clear()
            choice[name] = "slower over the expected products (tracing included)"
        choice["chosen"] = "autograd"
        choice["reason"] = "no traced backend was usable (see the entry of each)"
        self._resolved, self.backend_choice = "autograd", choice
        return reference

    @property
    def backend(self) -> str | None:
        """The backend in use (``None`` until the first product under ``"auto"``)."""
        return self._resolved

    def check_determinism(self, rtol: float = CHECK_RTOL, seed: int = 0) -> dict[str, Any]:
        """Check that the operator behaves like a symmetric matrix; store and return the result.

        Two seeded Gaussian vectors u, v: ``H u`` is computed twice and must agree
        (``||Hu - Hu'|| <= rtol ||Hu||``), and ``|u.Hv - v.Hu| <= rtol max(|u||Hv|, |v||Hu|)``.
        Three products, not counted in :attr:`num_products`. Run by the constructor unless
        ``check=False``. Under ``method="auto"`` a traced backend that fails is replaced by
        ``autograd`` and the check repeated (``"fallback_from"`` in the result).

        Raises:
            SparsemilError: one line naming the likely cause (a random forward in eval mode
                such as dropout with ``training=True``; or a loss that is not twice
                differentiable as traced).
        """
        result = self._measure_determinism(rtol, seed)
        if not result["passed"] and self.method == "auto" and self._resolved != "autograd":
            # a traced backend that passed the first-product comparison may still misbehave
            # (e.g. a cached linearisation that mutates captured state): fall back
            traced = self._resolved
            self._resolved = "autograd"
            self._linear_cache.clear()
            if self.backend_choice is not None:
                self.backend_choice["chosen"] = "autograd"
                self.backend_choice["reason"] = f"{traced} failed the determinism check"
            result = {**self._measure_determinism(rtol, seed), "fallback_from": traced}
        self.determinism = result
        backend = f"{self._resolved} backend"
        if result["repeat_rel_diff"] > rtol:
            hint = (
                "or the backend cannot trace it (try method='autograd', config key "
                "limit.hvp_method)"
                if self._resolved != "autograd"
                else "make forward deterministic in eval mode"
            )
            raise SparsemilError(
                f"HessianOperator: two products of one vector differ (relative "
                f"{result['repeat_rel_diff']:.2g} > {rtol:g}, {backend}): the loss is random "
                "under model.eval() -- e.g. dropout with training=True in forward "
                f"(F.dropout(x, p, training=True)) or random sampling; {hint}"
            )
        if result["symmetry_rel_diff"] > rtol:
            raise SparsemilError(
                f"HessianOperator: the products are not symmetric (|u.Hv - v.Hu| relative "
                f"{result['symmetry_rel_diff']:.2g} > {rtol:g}, {backend}): the loss is not "
                "twice differentiable as traced (a detach/stop-gradient, a custom autograd "
                "Function or state changed by forward), or the backend cannot trace it (try "
                "method='autograd', config key limit.hvp_method)"
            )
        return result

    def _measure_determinism(self, rtol: float, seed: int) -> dict[str, Any]:
        """Three products (not counted): the repeat and symmetry errors, see
        :meth:`check_determinism`."""
        gen = torch.Generator().manual_seed(int(seed))
        UV = torch.randn(self.dim, 2, generator=gen, dtype=torch.float64)
        before = self.num_products
        HUV = self.matmat(UV).to(device="cpu", dtype=torch.float64)
        again = self.matmat(UV[:, :1]).to(device="cpu", dtype=torch.float64)[:, 0]
        self.num_products = before
        u, v, Hu, Hv = UV[:, 0], UV[:, 1], HUV[:, 0], HUV[:, 1]
        tiny = torch.finfo(torch.float64).tiny
        repeat = float((again - Hu).norm() / max(float(Hu.norm()), tiny))
        scale = max(float(u.norm() * Hv.norm()), float(v.norm() * Hu.norm()), tiny)
        symmetry = abs(float(u @ Hv) - float(v @ Hu)) / scale
        return {
            "repeat_rel_diff": repeat,
            "symmetry_rel_diff": symmetry,
            "rtol": rtol,
            "products": 3,
            "backend": self._resolved,
            "passed": repeat <= rtol and symmetry <= rtol,
        }

    def reset(self) -> None:
        """Drop the cached linearisations (call after changing the model's weights)."""
        self._linear_cache.clear()

    def _local_matmat(self, V: Tensor) -> Tensor:
        """(k, D) in the parameter dtype -> sum_b w_b H_b V (k, D) in float64."""
        total = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
        # with many small batches (one bag each), fresh (k, D) float64 temporaries or a
        # mixed-dtype add_ cost as much as the products themselves: cast through one small
        # reused float64 buffer instead (its size bounds the extra memory on a large net)
        flat = total.view(-1)
        step = min(flat.numel(), _CAST_CHUNK)
        buf = (
            None
            if V.dtype == torch.float64
            else torch.empty(step, dtype=torch.float64, device=V.device)
        )
        for index, w in enumerate(self.weights):
            if w == 0.0:
                continue
            hv = self._hvp_batch(index, V)
            if buf is None:
                total.add_(hv, alpha=w)
                continue
            hv = hv.reshape(-1)
            for a in range(0, flat.numel(), step):
                part = buf[: min(step, flat.numel() - a)]
                flat[a : a + part.numel()].add_(part.copy_(hv[a : a + part.numel()]), alpha=w)
        return total

    def _reduce(self, out: Tensor) -> Tensor:
        return out

    # ------------------------------------------------------------------ public
    def matmat(self, V: Tensor) -> Tensor:
        """H @ V for V of shape (D, k); returns (D, k) in V's dtype on the operator's device."""
        if V.dim() != 2 or V.shape[0] != self.dim:
            raise SparsemilError(f"matmat expects shape ({self.dim}, k), got {tuple(V.shape)}")
        rows = V.detach().T.to(device=self.device, dtype=self.dtype)
        was_training = self.model.training
        self.model.eval()
        try:
            outs = [
                self._local_matmat(rows[i : i + self.chunk_size].contiguous())
                for i in range(0, rows.shape[0], self.chunk_size)
            ]
        finally:
            self.model.train(was_training)
        out = self._reduce(torch.cat(outs, dim=0))
        self.num_products += V.shape[1]
        return out.T.to(V.dtype).contiguous()

    def per_batch_matmat(self, V: Tensor) -> Iterator[tuple[float, Tensor]]:
        """Yield ``(w_b, H_b @ V)`` batch by batch (V: (D, k) -> (D, k), float64)."""
        rows = V.detach().T.to(device=self.device, dtype=self.dtype).contiguous()
        was_training = self.model.training
        self.model.eval()
        try:
            for index, w in enumerate(self.weights):
                parts = [
                    self._hvp_batch(index, rows[i : i + self.chunk_size]).to(torch.float64)
                    for i in range(0, rows.shape[0], self.chunk_size)
                ]
                yield w, torch.cat(parts, dim=0).T
        finally:
            self.model.train(was_training)

    def gradient(self) -> Tensor:
        """g = sum_b w_b dL_b/dtheta at the current weights: the gradient of the same loss
        the operator is the Hessian of, shape (D,), float64, detached, on the operator's
        device (model in eval mode, as for the products). Not counted in
        :attr:`num_products`."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        try:
            for batch, w in zip(self.batches, self.weights, strict=True):
                if w == 0.0:
                    continue
                with torch.enable_grad():
                    loss = self.loss_fn(self.model, batch)
                    grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                flat = [
                    torch.zeros(n, dtype=torch.float64, device=self.device)
                    if g is None
                    else g.detach().reshape(-1).to(torch.float64)
                    for g, n in zip(grads, self.numels, strict=True)
                ]
                total += w * torch.cat(flat)
        finally:
            self.model.train(was_training)
        return self._reduce(total[None])[0]

    def dense(self) -> Tensor:
        """The full (D, D) Hessian in float64 (only for small D: tests and checks)."""
        if self.dim > 20_000:
            raise SparsemilError(f"dense Hessian of D={self.dim} is too large (max 20000)")
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
        return self.matmat(eye)


class DistributedHessianOperator(HessianOperator):
    """:class:`HessianOperator` whose batches are sharded over ``torch.distributed`` ranks.

    With ``shard=True`` (default) every rank passes the same full batch list; rank ``r``
    keeps batches ``r, r + W, r + 2W, ...`` and the weights are computed over the full
    list first, so the result equals the single-process operator. With ``shard=False``
    each rank passes its own batches and (default) weights are normalised by the global
    sample count obtained with an all-reduce. Each product all-reduces (SUM) the per-rank
    weighted float64 sums; every rank receives the same result.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Sequence[Any],
        params: Sequence[nn.Parameter] | None = None,
        weights: Sequence[float] | None = None,
        method: str = "auto",
        chunk_size: int = 16,
        shard: bool = True,
        group: Any = None,
        check: bool = True,
        expected_products: int = 512,
    ) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise SparsemilError(
                "DistributedHessianOperator needs torch.distributed initialised "
                "(dist.init_process_group); use HessianOperator for one process"
            )
        self.group = group
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        batches = list(batches)
        local = list(range(rank, len(batches), world))
        own = ([batches[i] for i in local] or batches[:1]) if shard else batches
        super().__init__(
            model,
            loss_fn,
            own,
            params,
            None,
            method,
            chunk_size,
            check=False,
            expected_products=expected_products,
        )
        if shard:
            full = HessianOperator._normalise_weights(self, weights, batches)
            # global shares; a rank without batches contributes zero
            self.weights = [full[i] for i in local] if local else [0.0]
        else:
            raw = (
                [float(batch_size_of(b)) for b in batches]
                if weights is None
                else [float(w) for w in weights]
            )
            tot = torch.tensor([sum(raw)], dtype=torch.float64)
            dist.all_reduce(tot, group=group)
            self.weights = [w / float(tot.item()) for w in raw]
        if check:  # collective: every rank runs the same products
            self.check_determinism()

    def _reduce(self, out: Tensor) -> Tensor:
        import torch.distributed as dist

        out = out.contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out


def cross_entropy_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``loss_fn`` for classifiers: mean cross-entropy of ``(x, y)``."""
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x), y)


def fixed_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, samples: int | None = None, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive batches of a fixed (optionally seeded-subset, order-preserving) dataset."""
    n = int(y.shape[0])
    if samples is not None and samples < n:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.sort(torch.randperm(n, generator=gen)[:samples]).values.to(x.device)
        x, y = x[idx], y[idx]
        n = samples
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
