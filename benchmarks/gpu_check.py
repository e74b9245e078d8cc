"""One-shot CUDA check: the same science on a GPU as on the CPU (run on a GPU machine).

    python benchmarks/gpu_check.py [--ref ../shared/reference/mmil_official] [--out DIR]

1. MMIL-Transformer against the official reference logits on ``cuda`` (TF32 off), autograd
   and inference paths; max |difference| per case (the CPU tests require < 1e-5).
2. MMIL (CAMELYON16 configuration: 1024 -> 512, 10 sub-bags, 2 layers) on whole-slide-sized
   bags, no instance cap: inference seconds and peak GPU memory for N = 10k..200k, and one
   training step (forward + backward, sub-bag masking 0.6) at N = 100k.
3. ``sparsemil mil cv`` on Musk1 (2 folds, 3 epochs) with ``--accelerator gpu`` for MMIL and
   ABMIL: the Lightning trainer on a GPU end to end.
4. ``sparsemil prune run`` (FC5 on digits: L1 training, sweep, SLQ, prediction) with
   ``--device cuda``: the pruning-limit pipeline on a GPU end to end.

Prints one JSON summary at the end (also written to ``--out/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def official_cases(ref: Path, dev: torch.device) -> dict[str, float]:
    from safetensors.torch import load_file

    from sparsemil.mil import MMILTransformer

    cases = json.loads((ref / "cases.json").read_text())
    out = {}
    for name, case in sorted(cases.items()):
        data = load_file(str(ref / f"{name}.safetensors"))
        state = {k[len("state.") :]: v for k, v in data.items() if k.startswith("state.")}
        model = MMILTransformer.from_official(state, case["config"]).eval().to(dev)
        x, expected = data["input"].to(dev), data["expected_logits"].to(dev)
        d_grad = (model(x) - expected).abs().max().item()
        with torch.inference_mode():
            d_inf = (model(x) - expected).abs().max().item()
        out[name] = max(d_grad, d_inf)
        print(f"official {name}: max |diff| {out[name]:.2e}", flush=True)
    return out


def mmil_speed(dev: torch.device, sizes: tuple[int, ...]) -> dict[str, object]:
    from sparsemil.mil import MMILTransformer

    cfg = {"in_dim": 1024, "embed_dim": 512, "num_subbags": 10, "num_msg": 1, "num_layers": 2}
    model = MMILTransformer(**cfg, grouping="sequential", seed=0).to(dev).eval()
    res: dict[str, object] = {}
    for n in sizes:
        x = torch.randn(1, n, 1024, device=dev)
        _reset_peak(dev)
        with torch.inference_mode():
            model(x)
            _sync()
            t = time.perf_counter()
            for _ in range(5):
                model(x)
            _sync()
        sec = (time.perf_counter() - t) / 5
        peak = _peak_gib(dev)
        res[f"infer_N{n}"] = {"seconds": sec, "peak_GiB": peak}
        print(f"MMIL inference N={n}: {1e3 * sec:.1f} ms, peak {peak} GiB", flush=True)
    train = MMILTransformer(**cfg, grouping="random", mask_ratio=0.6, seed=0).to(dev).train()
    opt = torch.optim.AdamW(train.parameters(), lr=2e-4, weight_decay=1e-5)
    n = max(sizes[-1] // 2, 1)
    x = torch.randn(1, n, 1024, device=dev)
    y = torch.tensor([1], device=dev)
    _reset_peak(dev)
    for i in range(4):  # 1 warm-up + 3 timed
        if i == 1:
            _sync()
            t = time.perf_counter()
        loss = train.compute_loss(y, x)[1]["CrossEntropyLoss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    _sync()
    sec = (time.perf_counter() - t) / 3
    peak = _peak_gib(dev)
    res[f"train_step_N{n}_mask0.6"] = {"seconds": sec, "peak_GiB": peak}
    print(f"MMIL train step N={n} (mask 0.6): {1e3 * sec:.1f} ms, peak {peak} GiB")
    return res


def mil_cv(out: Path, dev: torch.device) -> dict[str, object]:
    from sparsemil.cli.main import main

    res: dict[str, object] = {}
    for model in ("mmil", "abmil"):
        d = out / f"cv_{model}"
        t = time.perf_counter()
        acc = "gpu" if dev.type == "cuda" else "cpu"
        rc = main(["mil", "cv", "--data", "musk1", "--model", model, "--folds", "2",
                   "--seed", "0", "--max-epochs", "3", "--accelerator", acc, "--no-progress",
                   "--out", str(d)])  # fmt: skip
        m = json.loads((d / "metrics.json").read_text()) if rc == 0 else {}
        res[model] = {
            "rc": rc,
            "seconds": time.perf_counter() - t,
            "accuracy": m.get("accuracy"),
            "auc": m.get("auc"),
        }
        print(f"mil cv {model} on {acc}: rc {rc}, {res[model]}", flush=True)
    return res


def prune_run(out: Path, dev: torch.device, epochs: int) -> dict[str, object]:
    import yaml

    from sparsemil.cli.main import main

    cfg = dict(model="fc", dataset="digits", batch_size=64, lr=0.02, epoch=epochs, lmbda=1e-3,
               seed=0, sparse_epoch=200, lanczos_iter=128, lanczos_num=1)  # fmt: skip
    path = out / "prune_fc5.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t = time.perf_counter()
    rc = main(["prune", "run", "--config", str(path), "--out", str(out / "prune_fc5"),
               "--device", str(dev)])  # fmt: skip
    res: dict[str, object] = {"rc": rc, "seconds": time.perf_counter() - t}
    if rc == 0:
        lim = json.loads((out / "prune_fc5" / "limit.json").read_text())
        res.update(
            predicted=lim["predicted_ratio"],
            actual=lim["actual_ratio"],
            timings=lim["timings"],
            D=lim.get("D"),
        )
    print(f"prune run on {dev}: {res}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description="CUDA check")
    ap.add_argument("--ref", type=Path, default=Path("../shared/reference/mmil_official"))
    ap.add_argument("--out", type=Path, default=Path("runs/gpu_check"))
    ap.add_argument("--device", default="cuda", help="cpu only to dry-run this script")
    ap.add_argument("--sizes", default="10000,40000,100000,200000", help="MMIL bag sizes")
    ap.add_argument("--prune-epochs", type=int, default=20)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    if (args.ref / "cases.json").is_file():
        summary["official_max_abs_diff"] = official_cases(args.ref, dev)
    summary["mmil"] = mmil_speed(dev, tuple(int(n) for n in args.sizes.split(",")))
    summary["mil_cv"] = mil_cv(args.out, dev)
    summary["prune_run"] = prune_run(args.out, dev, args.prune_epochs)
    text = json.dumps(summary, indent=1, default=str)
    (args.out / "gpu_check.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
