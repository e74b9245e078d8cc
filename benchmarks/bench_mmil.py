"""Speed and memory of MMIL-Transformer on whole-slide-sized bags (CPU, fp32).

CAMELYON16 configuration: in 1024 -> 512, 10 sub-bags, 1 message token, 2 layers, eval,
sequential grouping, no cap. For every N one fresh subprocess (so peak RSS is per N):
it times a plain 4096 x 4096 fp32 matmul (before and after the model, the higher
figure is used: a conservative ratio), then the forward pass under
``torch.inference_mode``, and prints

- seconds (best of ``--repeats``),
- GFLOP/s with the issue's FLOP count ("nominal"): input projection + per layer
  (qkv, QK^T and AV per sub-bag -- sub-bag length includes its message tokens --,
  output projection); the small message-token attention is not counted,
- GFLOP/s with the FLOPs actually executed ("executed"): the last layer only needs the
  message tokens' queries, so its QK^T/AV/qkv are O(N) (exact, see docs/mmil.md),
- the same-run matmul GFLOP/s and both ratios, and the peak RSS of the process,
- the same two ratios from process CPU time per thread instead of wall time
  (``r_*_cpu``): on a machine shared with other jobs they are steadier.

``--full-last-layer`` also runs the model with the full last layer (nominal = executed),
``--official-style`` a per-sub-bag Python loop with explicit attention matrices like the
official code (N <= 40k; it materialises one sub-bag's H x n x n matrix).

    python benchmarks/bench_mmil.py                  # N in 10k, 20k, 40k, 200k
    python benchmarks/bench_mmil.py --sizes 40000 --full-last-layer --official-style
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CFG = {"in_dim": 1024, "embed_dim": 512, "num_subbags": 10, "num_msg": 1, "num_layers": 2}


def matmul_gflops(n: int = 4096, reps: int = 3) -> tuple[float, float]:
    """(wall, cpu) GFLOP/s of an fp32 n x n matmul: best of ``reps``.

    "cpu" divides by the process CPU time spread over the threads in use
    (``process_time / threads``): steadier than wall time when other jobs share the cores.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best_wall = best_cpu = float("inf")
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        a @ b
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, (time.process_time() - c0) / torch.get_num_threads())
    return 2 * n**3 / best_wall / 1e9, 2 * n**3 / best_cpu / 1e9


def flop_counts(n: int) -> tuple[float, float]:
    """(nominal, executed) FLOPs of one forward pass, CAMELYON16 config."""
    import numpy as np

    c, d, g, m, layers = (
        CFG[k] for k in ("in_dim", "embed_dim", "num_subbags", "num_msg", "num_layers")
    )
    inner, heads = 512, 8
    sizes = np.array([len(a) for a in np.array_split(np.arange(n), min(n, g))], dtype=np.float64)
    t = sizes + m
    ntok = float(t.sum())
    s = len(sizes)
    proj = 2.0 * n * c * d
    full_layer = (
        2 * ntok * d * 3 * inner + 2 * 2 * float((t**2).sum()) * inner + 2 * ntok * inner * d
    )
    # last layer, message queries only: q, folded k (u), scores, pooling, folded v, out
    last = (
        s
        * m
        * (
            2 * d * inner
            + 2 * heads * 64 * d
            + 2 * 2 * heads * d * t.mean()
            + 2 * heads * 64 * d
            + 2 * inner * d
        )
    )
    nominal = proj + layers * full_layer
    executed = proj + (layers - 1) * full_layer + last
    return nominal, executed


def official_style_forward(model, x):
    """Per-sub-bag Python loop with explicit attention matrices (official-code style)."""
    import numpy as np
    import torch

    def attn(mod, z):  # z (n, D) -> (n, D), explicit (H, n, n) scores
        qkv = mod.to_qkv(z).view(z.shape[0], 3, mod.heads, mod.dim_head).permute(1, 2, 0, 3)
        p = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) * mod.scale, dim=-1)
        return mod.to_out((p @ qkv[2]).transpose(0, 1).reshape(z.shape[0], mod.inner))

    h = model.proj(x[0]) + model.absolute_pos_embed
    m = model.num_msg
    groups = [
        torch.cat([model.msg_tokens, h[i]])
        for i in np.array_split(np.arange(h.shape[0]), model.num_subbags)
    ]
    cls = model.msgcls_token[None]
    for layer in model.layers:
        groups = [g + attn(layer.subbag_attn, g) for g in groups]
        seq = torch.cat([cls] + [g[:m] for g in groups])
        seq = seq + attn(layer.msg_attn, seq)
        cls = seq[:1]
        groups = [
            torch.cat([seq[1 + i * m : 1 + (i + 1) * m], g[m:]]) for i, g in enumerate(groups)
        ]
    return model.classifier(cls)


def child(n: int, variant: str, repeats: int) -> dict:
    import torch

    from sparsemil.mil import MMILTransformer

    mm_before = matmul_gflops()
    model = MMILTransformer(**CFG, grouping="sequential", seed=0).eval()
    model._full_last_layer = variant == "full_last_layer"
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        x = torch.randn(1, n, CFG["in_dim"], generator=gen)

        def fwd(inp):
            if variant == "official_style":
                return official_style_forward(model, inp)
            return model(inp)

        if n <= 40000:  # warm up kernels / allocator on a small bag
            model(x[:, :2000])
        best, best_cpu, logits = float("inf"), float("inf"), None
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            logits = fwd(x)
            best = min(best, time.perf_counter() - t0)
            best_cpu = min(best_cpu, (time.process_time() - c0) / torch.get_num_threads())
            if variant == "official_style":
                ref = model(x)
                assert torch.allclose(logits, ref, atol=1e-4), (logits, ref)
        del x
    mm_after = matmul_gflops()
    nominal, executed = flop_counts(n)
    if variant != "model":
        executed = nominal
    mm = max(mm_before[0], mm_after[0])
    mm_cpu = max(mm_before[1], mm_after[1])
    return {
        "N": n,
        "variant": variant,
        "seconds": best,
        "nominal_gflops": nominal / best / 1e9,
        "executed_gflops": executed / best / 1e9,
        "matmul_gflops": mm,
        "matmul_before_after": [mm_before, mm_after],
        "ratio_nominal": nominal / best / 1e9 / mm,
        "ratio_executed": executed / best / 1e9 / mm,
        "cpu_seconds_per_thread": best_cpu,
        "matmul_gflops_cpu": mm_cpu,
        "ratio_nominal_cpu": nominal / best_cpu / 1e9 / mm_cpu,
        "ratio_executed_cpu": executed / best_cpu / 1e9 / mm_cpu,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "threads": torch.get_num_threads(),
        "logits": [float(v) for v in logits.flatten()],
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000, 200000])
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per N (1 for N > 40k)")
    ap.add_argument(
        "--full-last-layer", action="store_true", help="also run the full last layer (N <= 40k)"
    )
    ap.add_argument(
        "--official-style", action="store_true", help="also run a per-sub-bag loop (N <= 40k)"
    )
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.variant, args.repeats)))
        return
    runs = [(n, "model") for n in args.sizes]
    if args.full_last_layer:
        runs += [(n, "full_last_layer") for n in args.sizes if n <= 40000]
    if args.official_style:
        runs += [(n, "official_style") for n in args.sizes if n <= 40000]
    head = (
        f"{'N':>7} {'variant':<16} {'sec':>7} {'nomGF/s':>8} {'exeGF/s':>8} {'mmGF/s':>7} "
        f"{'r_nom':>6} {'r_exe':>6} {'r_nom_cpu':>9} {'r_exe_cpu':>9} {'RSS GB':>6}"
    )
    print(head)
    for n, variant in runs:
        reps = args.repeats if n <= 40000 else 1
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            str(n),
            "--variant",
            variant,
            "--repeats",
            str(reps),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{n:>7} {variant:<16} FAILED: {out.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{n:>7} {variant:<16} {r['seconds']:7.2f} {r['nominal_gflops']:8.1f} {r['executed_gflops']:8.1f} "
            f"{r['matmul_gflops']:7.1f} {r['ratio_nominal']:6.2f} {r['ratio_executed']:6.2f} "
            f"{r['ratio_nominal_cpu']:9.2f} {r['ratio_executed_cpu']:9.2f} {r['peak_rss_gb']:6.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
