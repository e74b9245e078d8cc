"""The full ``prune run`` on a CNN: ResNet18 on 32x32 Fashion-MNIST, time split by stage.

    python benchmarks/bench_prune_cnn.py [--n-train 2000] [--n-test 500] [--epochs 1]
        [--steps 16] [--probes 4] [--ratios 20] [--threads 2] [--device cpu|cuda] [--hvp auto]

Runs :func:`sparsemil.experiments.vision.run.run_limit` (train with L1 -> epsilon -> sweep ->
Hessian set-up -> SLQ -> premise checks) on a seeded subset of Fashion-MNIST (Debian package
``dataset-fashion-mnist``), padded to 32x32 and replicated to 3 channels, the official
ResNet18 config otherwise (lr 0.1, lambda 5e-5, batch 128). It prints the wall time of each
stage from ``limit.json`` ``"timings"``, the share of the whole, the Hessian products of each
stage, and the two ratios the issue sets as goals, measured in this one run:

* diagnostics / SLQ (goal <= 0.20): the premise checks against the spectrum;
* Hessian set-up / SLQ: the HVP backend choice under ``auto`` plus the determinism check.

Nothing is asserted; the figures go into the closing note and docs/pruning_limit.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=500, help="test images for the sweep")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--steps", type=int, default=16, help="Lanczos steps (lanczos_iter)")
    ap.add_argument("--probes", type=int, default=4, help="SLQ probes (lanczos_num)")
    ap.add_argument("--ratios", type=int, default=20, help="sweep ratios (sparse_epoch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hvp", default="auto", help="limit.hvp_method")
    ap.add_argument("--hessian-batch", type=int, default=256)
    ap.add_argument("--hessian-samples", type=int, default=512, help="limit.hessian_samples")
    ap.add_argument("--out", default=None, help="keep the run's files here")
    args = ap.parse_args()

    import torch

    from sparsemil.experiments.vision.config import config_from_dict
    from sparsemil.experiments.vision.run import run_limit

    torch.set_num_threads(args.threads)
    cfg = config_from_dict(
        {
            "model": args.model,
            "dataset": "fashion-mnist",
            "image_size": 32,
            "channels": 3,
            "subset": args.n_train,
            "test_subset": args.n_test,
            "epoch": args.epochs,
            "lr": 0.1,
            "lmbda": 5e-5,
            "batch_size": 128,
            "sparse_epoch": args.ratios,
            "lanczos_iter": args.steps,
            "lanczos_num": args.probes,
            "device": args.device,
            "eval_batch_size": 512,
            "limit": {
                "hvp_method": args.hvp,
                "hessian_batch_size": args.hessian_batch,
                "hessian_samples": args.hessian_samples,
            },
        },
        where="bench_prune_cnn",
    )
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_prune_cnn_"))
    t0 = time.perf_counter()
    doc = run_limit(cfg, out, progress=False)
    total = time.perf_counter() - t0
    t = doc["timings"]
    print(
        f"{args.model} on Fashion-MNIST 3x32x32, {args.n_train} training images, "
        f"{args.epochs} epoch(s), D = {doc['D']:,}, {args.probes} probes x {args.steps} "
        f"steps, {args.ratios} ratios, device {args.device}, {args.threads} threads, "
        f"HVP backend {doc['hessian']['hvp_backend']}"
    )
    print(f"{'stage':<18}{'seconds':>10}{'share':>8}")
    for key in ("train_s", "epsilon_s", "sweep_s", "hessian_setup_s", "important_s",
                "spectrum_s", "diagnostics_s"):  # fmt: skip
        if key in t:
            print(f"{key[:-2]:<18}{t[key]:>10.1f}{t[key] / total:>8.1%}")
    print(f"{'total':<18}{total:>10.1f}")
    spec = doc["spectrum"]
    prem = doc.get("premises") or {}
    print(
        f"products: SLQ {spec['num_products']}, diagnostics {prem.get('products')}, "
        f"determinism check {doc['hessian']['determinism']['products']}"
    )
    print(f"ratio diagnostics / SLQ:      {t.get('diagnostics_s', 0) / t['spectrum_s']:.3f}")
    print(f"ratio Hessian set-up / SLQ:   {t['hessian_setup_s'] / t['spectrum_s']:.3f}")
    spread = doc.get("uncertainty") or {}
    print(
        f"predicted {doc['predicted_ratio']} (90% interval {spread.get('interval_90')}), "
        f"actual {json.dumps(doc['actual_ratio'])}; premises: {prem.get('verdict')}"
    )


if __name__ == "__main__":
    main()
