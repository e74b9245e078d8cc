"""Small torch helpers shared by several test modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def no_onednn() -> Iterator[None]:
    """oneDNN's first-call kernel setup costs seconds for 53 conv shapes: not needed here."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def summed_hessian_rows(model: torch.nn.Module, batches, idx):
    """Exact ``sum_b ||H_b[i, :]||_1`` for the flat parameter indices ``idx``: the Hessian of
    each batch's mean cross-entropy by float64 autograd over all of ``model``'s parameters
    (a float64 copy of ``model`` is differentiated; ``model`` is untouched)."""
    import copy

    import numpy as np
    import torch.nn.functional as F

    md = copy.deepcopy(model).double()
    names = [n for n, _ in md.named_parameters()]
    shapes = [p.shape for p in md.parameters()]
    sizes = [p.numel() for p in md.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in md.parameters()])
    rows = np.zeros(len(idx))
    for bx, by in batches:

        def loss(th, bx=bx, by=by):
            parts = [c.reshape(s) for c, s in zip(torch.split(th, sizes), shapes, strict=True)]
            ps = dict(zip(names, parts, strict=True))
            return F.cross_entropy(torch.func.functional_call(md, ps, (bx.double(),)), by)

        Hb = torch.autograd.functional.hessian(loss, theta, vectorize=True).numpy()
        rows += np.abs(Hb[idx]).sum(axis=1)
    return rows


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` imported as a module (the benchmark scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
