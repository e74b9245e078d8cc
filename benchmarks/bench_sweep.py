"""Benchmark: our pruning sweep vs the official-style naive loop (FC5 on digits).

Both evaluate the globally magnitude-pruned FC5 (64 -> 1000 -> 600 -> 300 -> 100 -> 10,
L1-trained for a few epochs) at the same ``--n-ratios`` ratios ``i/n`` with the *same* evaluation
function (test accuracy/loss and training loss/accuracy over the full sets, one large batch,
inference mode):

- naive: per ratio ``copy.deepcopy(model)``, ``torch.sort`` of all |w|, threshold, mask every
  layer, evaluate (what the official ``get_sparse_model`` loop does, minus its checkpoint saving);
- ours: :func:`sparsemil.prune.sweep.pruning_sweep` (one sort, in-place incremental updates);
  with ``--chunk K`` > 1 (default on CUDA: 32)
  :func:`sparsemil.prune.batched_sweep.batched_pruning_sweep`, K ratios per vmapped pass
  (accuracies identical, losses to float32 rounding: the batched products sum in another
  order).

Prints wall times, the overall speed ratio, and the ratio of the pruning machinery alone (time
outside the evaluation calls), then asserts that accuracy and loss curves are identical.

    python benchmarks/bench_sweep.py [--n-ratios 1000] [--epochs 5] [--threads N] [--device cuda]
        [--chunk K]
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
import torch

from sparsemil.data.vision import load_vision_dataset
from sparsemil.experiments.vision.config import PruneConfig
from sparsemil.experiments.vision.models import build_model
from sparsemil.experiments.vision.train import train_l1
from sparsemil.prune.magnitude import num_to_prune, prunable_parameters
from sparsemil.prune.sweep import pruning_sweep, sweep_ratios, vision_evaluator


class TimedEval:
    """Wraps an evaluation function and accumulates the time spent inside it."""

    def __init__(self, fn):
        self.fn = fn
        self.seconds = 0.0

    def __call__(self, *args):
        t = time.perf_counter()
        out = self.fn(*args)
        self.seconds += time.perf_counter() - t
        return out


def naive_sweep(model, evaluate, ratios):
    """Official-style loop: deepcopy + full sort + threshold + mask per ratio."""
    rows = []
    for r in ratios:
        cp = copy.deepcopy(model)
        layers = [m for m, _ in prunable_parameters(cp)]
        mags = torch.cat([m.weight.detach().abs().reshape(-1) for m in layers])
        k = num_to_prune(r, mags.numel())
        thr = torch.sort(mags).values[k - 1].item()
        with torch.no_grad():
            for m in layers:
                m.weight.mul_(torch.gt(m.weight.abs(), thr).to(m.weight.dtype))
        rows.append(evaluate(cp))
    return rows


def _arg(argv: list[str], name: str, default):
    if name in argv:
        return type(default)(argv[argv.index(name) + 1])
    return default


def main(argv: list[str]) -> int:
    n_ratios = _arg(argv, "--n-ratios", 1000)
    epochs = _arg(argv, "--epochs", 5)
    threads = _arg(argv, "--threads", 0)
    device = torch.device(_arg(argv, "--device", "cpu"))
    chunk = _arg(argv, "--chunk", 32 if device.type == "cuda" else 1)
    if threads > 0:
        torch.set_num_threads(threads)
    data = load_vision_dataset("digits", seed=0)
    cfg = PruneConfig(model="fc", epoch=epochs, lr=0.01, lmbda=5e-5, batch_size=128, seed=0)
    model = build_model("fc", data.in_shape, data.num_classes, seed=0)
    t = time.perf_counter()
    train_l1(model, data, cfg, progress=False, device="cpu")  # same trained w* on any device
    model.to(device)
    n_w = sum(m.weight.numel() for m, _ in prunable_parameters(model))
    print(
        f"FC5 on digits: {n_w} prunable weights, trained {epochs} epochs in "
        f"{time.perf_counter() - t:.1f}s; {n_ratios} ratios; device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; torch threads {torch.get_num_threads()}"
    )

    ratios = sweep_ratios(n_ratios)
    base = vision_evaluator(data, device, batch_size=8192)

    if chunk > 1:
        from sparsemil.prune.batched_sweep import batched_pruning_sweep, vision_evaluator_many

        ev_ours = TimedEval(vision_evaluator_many(data, device, batch_size=8192 * chunk))
        t = time.perf_counter()
        ours = batched_pruning_sweep(model, ev_ours, ratios, chunk=chunk, progress=False)
        t_ours = time.perf_counter() - t
        calls = -(-n_ratios // chunk) + 1
    else:
        ev_ours = TimedEval(base)
        t = time.perf_counter()
        ours = pruning_sweep(model, ev_ours, ratios, progress=False)
        t_ours = time.perf_counter() - t
        calls = n_ratios + 1
    print(
        "ours: "
        + (f"batched, {chunk} ratios per pass" if chunk > 1 else "in-place, one ratio per pass")
    )

    ev_naive = TimedEval(base)
    t = time.perf_counter()
    naive = naive_sweep(model, ev_naive, ratios)
    t_naive = time.perf_counter() - t

    same_acc = ours.test_acc.tolist() == [r["test_acc"] for r in naive]
    same_loss = ours.test_loss.tolist() == [r["test_loss"] for r in naive]
    same_train = ours.train_loss.tolist() == [r["train_loss"] for r in naive]
    loss_rel = max(
        float(
            np.max(
                np.abs(ours.test_loss - [r["test_loss"] for r in naive]) / np.abs(ours.test_loss)
            )
        ),
        float(
            np.max(
                np.abs(ours.train_loss - [r["train_loss"] for r in naive]) / np.abs(ours.train_loss)
            )
        ),
    )
    mach_ours = t_ours - ev_ours.seconds
    mach_naive = t_naive - ev_naive.seconds
    print(
        f"naive loop : {t_naive:8.2f} s  ({1e3 * t_naive / n_ratios:.2f} ms/ratio; "
        f"machinery {1e3 * mach_naive / n_ratios:.3f} ms/ratio)"
    )
    print(
        f"our sweep  : {t_ours:8.2f} s  ({1e3 * t_ours / n_ratios:.2f} ms/ratio; "
        f"machinery {1e3 * mach_ours / n_ratios:.3f} ms/ratio)"
    )
    print(
        f"evaluation : {1e3 * ev_ours.seconds / calls:.2f} ms per call (ours, {calls} calls), "
        f"{1e3 * ev_naive.seconds / n_ratios:.2f} ms per call (naive)"
    )
    print(f"speed ratio (overall)        : {t_naive / t_ours:.1f}x  (target >= 20x)")
    print(f"speed ratio (machinery only) : {mach_naive / max(mach_ours, 1e-9):.1f}x")
    ceiling = t_naive / max(ev_ours.seconds, 1e-9)
    print(
        f"ceiling with free pruning    : {ceiling:.1f}x  (naive time / our evaluation time: "
        "the most any sweep can gain while evaluating every ratio in full)"
    )
    print(f"identical curves: test_acc={same_acc} test_loss={same_loss} train_loss={same_train}")
    print(f"losses: max relative difference {loss_rel:.1e}")
    ks = [num_to_prune(r, n_w) for r in ratios]
    assert np.all(ours.num_pruned >= ks)
    assert same_acc, "accuracy curves differ"
    if chunk > 1:
        assert loss_rel < 1e-5, "loss curves differ beyond float32 rounding"
    else:
        assert same_loss and same_train, "loss curves differ"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
