"""SLQ speed: our implementation vs a PyHessian-style one, on FC5 with the digits data.

    python benchmarks/bench_slq.py [--steps 128] [--threads 1] [--epochs 10] [--device cuda]

Both run ``--steps`` Lanczos steps from the same Rademacher probe on the Hessian of the mean
training cross-entropy of FC5 (64-1000-600-300-100-10, D = 877,010) trained briefly with L1
on the digits training split.

* reference ("PyHessian style", written here in that style): parameters as a list of
  tensors; every Hessian-vector product loops over mini-batches of ``batch_size`` (128, the
  official config), ``loss.backward(create_graph=True)`` then ``torch.autograd.grad`` with
  the vector as ``grad_outputs``, summed weighted by batch size in a Python loop; Lanczos in
  float32 with one reorthogonalisation pass vector by vector; a dense symmetric eig of T.
* ours: :class:`~sparsemil.curvature.hvp.HessianOperator` (the whole split in one batch,
  ``torch.func.linearize`` caching the primal pass) and :func:`~sparsemil.curvature.slq.slq`
  (float64 recurrence, CGS2 reorthogonalisation in matrix form, ``eigh_tridiagonal``).

It prints the wall times, the speed-up and the Ritz-value agreement (max relative difference
of each Ritz value, and of all of them relative to the spectral radius). Also times the
three HVP backends and, with ``--eigenthings`` (if installed),
``hessian_eigenthings.spectral_density``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F


def pyhessian_style_slq(model, x, y, batch_size: int, v0: torch.Tensor, steps: int):
    params = [p for p in model.parameters() if p.requires_grad]

    def group_product(xs, ys):
        return sum(torch.sum(a * b) for a, b in zip(xs, ys, strict=True))

    def group_add(xs, ys, alpha):
        return [a + b * alpha for a, b in zip(xs, ys, strict=True)]

    def normalise(vs):
        s = float(group_product(vs, vs)) ** 0.5
        return [v / s for v in vs]

    def hvp(vs):
        total = [torch.zeros_like(p) for p in params]
        n = 0
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size], y[i : i + batch_size]
            model.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward(create_graph=True)
            grads = [p.grad for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=False)
            total = [t + h.detach() * xb.shape[0] for t, h in zip(total, hv, strict=True)]
            n += xb.shape[0]
        model.zero_grad(set_to_none=True)
        return [t / n for t in total]

    def split(flat):
        out, pos = [], 0
        for p in params:
            out.append(flat[pos : pos + p.numel()].reshape(p.shape).to(p.dtype))
            pos += p.numel()
        return out

    model.eval()
    v = normalise(split(v0))
    basis = [v]
    alphas, betas = [], []
    w = None
    for i in range(steps):
        if i > 0:
            beta = float(group_product(w, w)) ** 0.5
            betas.append(beta)
            for b in basis:  # one reorthogonalisation pass, vector by vector
                w = group_add(w, b, -group_product(w, b))
            v = normalise(w)
            basis.append(v)
        hv = hvp(v)
        alpha = float(group_product(hv, v))
        alphas.append(alpha)
        w = group_add(hv, v, -alpha)
        if i > 0:
            w = group_add(w, basis[-2], -betas[-1])
    T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    return np.sort(np.linalg.eigvalsh(T))


def _forward_and_grad_seconds(model, x, y, reps: int = 3) -> tuple[float, float]:
    """Wall seconds of one forward pass and of one loss gradient over ``(x, y)``."""
    with torch.no_grad():
        model(x)
        _sync(x.device)
        t = time.perf_counter()
        for _ in range(reps):
            model(x)
        _sync(x.device)
        t_fwd = (time.perf_counter() - t) / reps
    params = [p for p in model.parameters() if p.requires_grad]
    t = time.perf_counter()
    for _ in range(reps):
        torch.autograd.grad(F.cross_entropy(model(x), y), params)
    _sync(x.device)
    return t_fwd, (time.perf_counter() - t) / reps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="SLQ benchmark (FC5, digits)")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (the model is trained on cpu)"
    )
    ap.add_argument("--eigenthings", action="store_true", help="also time hessian_eigenthings")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from sparsemil.curvature.hvp import HessianOperator, cross_entropy_loss, fixed_batches
    from sparsemil.curvature.slq import rademacher, slq
    from sparsemil.data.vision import load_vision_dataset
    from sparsemil.experiments.vision.config import config_from_dict
    from sparsemil.experiments.vision.models import build_model
    from sparsemil.experiments.vision.train import train_l1

    data = load_vision_dataset("digits", seed=args.seed)
    cfg = config_from_dict(
        dict(
            model="fc",
            dataset="digits",
            epoch=args.epochs,
            lr=0.02,
            batch_size=64,
            lmbda=5e-4,
            seed=args.seed,
            device="cpu",
        )
    )
    cfg.validate()
    model = build_model("fc", data.in_shape, data.num_classes, seed=args.seed)
    train_l1(model, data, cfg, progress=False)
    device = torch.device(args.device)
    model.to(device).eval()
    x, y = data.x_train.to(device), data.y_train.to(device)
    name = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"FC5 on digits: N = {len(y)} training samples, device {device}{name}, "
        f"threads = {args.threads}"
    )

    # HVP backends, one product each (after a warm-up)
    V = rademacher(sum(p.numel() for p in model.parameters()), 1, 7)
    hvp_seconds: dict[str, float] = {}
    for method in ("linearize", "func", "autograd"):
        op = HessianOperator(model, cross_entropy_loss, fixed_batches(x, y, 2048), method=method)
        op.matvec(V[:, 0])
        _sync(device)
        t = time.perf_counter()
        for _ in range(3):
            op.matvec(V[:, 0])
        _sync(device)
        hvp_seconds[method] = (time.perf_counter() - t) / 3
        print(f"  HVP backend {method:9s}: {hvp_seconds[method]:.3f} s per product")

    # Cost floor: an exact HVP needs ~6 matmuls per layer for the tangent forward/backward
    # (a forward pass needs 1, a gradient 3); double backward also re-runs forward + backward.
    t_fwd, t_grad = _forward_and_grad_seconds(model, x, y)
    print(
        f"  one forward pass {t_fwd:.3f} s, one gradient {t_grad:.3f} s (whole split): the "
        f"linearize HVP costs {hvp_seconds['linearize'] / t_fwd:.1f} forward passes"
    )

    op = HessianOperator(model, cross_entropy_loss, fixed_batches(x, y, 2048))
    t = time.perf_counter()
    ours = slq(op, num_runs=1, num_steps=args.steps, seed=args.seed)
    t_ours = time.perf_counter() - t
    ritz_ours = np.sort(ours.ritz_values[0][np.isfinite(ours.ritz_values[0])])

    v0 = rademacher(op.dim, 1, args.seed)[:, 0].float().to(device)
    t = time.perf_counter()
    ritz_ref = pyhessian_style_slq(model, x, y, args.batch_size, v0, args.steps)
    t_ref = time.perf_counter() - t

    scale = np.max(np.abs(ritz_ref))
    rel_each = np.abs(ritz_ours - ritz_ref) / np.maximum(np.abs(ritz_ref), 1e-30)
    rel_scale = np.max(np.abs(ritz_ours - ritz_ref)) / scale
    top = np.argsort(-np.abs(ritz_ref))[:5]
    print(f"ours (slq, {args.steps} steps):           {t_ours:8.1f} s ({op.backend})")
    print(f"PyHessian style ({args.steps} steps, bs {args.batch_size}): {t_ref:8.1f} s")
    print(f"speed-up: {t_ref / t_ours:.2f}x (target >= 3x)")
    print(
        f"per Lanczos step: ours {t_ours / args.steps:.3f} s = {t_ours / args.steps / t_fwd:.1f} "
        f"forward passes, PyHessian style {t_ref / args.steps:.3f} s = "
        f"{t_ref / args.steps / t_fwd:.1f} forward passes"
    )
    print(f"Ritz values: max |diff| / spectral radius = {rel_scale:.2e}")
    print(f"Ritz values: max relative diff, 5 largest |theta| = {rel_each[top].max():.2e}")
    print(
        f"Ritz values: max relative diff, all {len(ritz_ref)} = {rel_each.max():.2e} "
        f"(at theta = {ritz_ref[np.argmax(rel_each)]:.3e})"
    )
    print(
        f"lambda_max {ritz_ours[-1]:.6f} vs {ritz_ref[-1]:.6f}; "
        f"lambda_min {ritz_ours[0]:.6f} vs {ritz_ref[0]:.6f}"
    )

    if not args.eigenthings:
        return 0
    try:
        import hessian_eigenthings as he
    except ImportError:
        print("hessian_eigenthings not installed: skipped")
        return 0
    loader = [
        (x[i : i + args.batch_size], y[i : i + args.batch_size])
        for i in range(0, len(y), args.batch_size)
    ]
    heop = he.HessianOperator(model, loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    t = time.perf_counter()
    res = he.spectral_density(heop, num_runs=1, lanczos_steps=args.steps, seed=args.seed)
    t_he = time.perf_counter() - t
    r_he = np.sort(res.raw_eigenvalues[0].double().numpy())
    print(
        f"hessian_eigenthings.spectral_density ({args.steps} steps, bs {args.batch_size}): "
        f"{t_he:.1f} s; its batches are equally weighted and its probe differs, so only "
        f"lambda_max is comparable: {r_he[-1]:.6f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
