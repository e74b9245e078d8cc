"""DistributedHessianOperator on 2 CPU processes (gloo) equals the one-process operator."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn


def _save_digits(path: Path) -> None:
    from sklearn.datasets import load_digits  # parent only: children skip the sklearn import

    d = load_digits()
    x = torch.tensor(d.data[:500] / 16.0, dtype=torch.float32)
    torch.save({"x": x, "y": torch.tensor(d.target[:500])}, path)


def _setup(path: Path):
    data = torch.load(path, weights_only=True)
    x, y = data["x"], data["y"]
    # uneven batch sizes on purpose (the weights must be global sample shares)
    cuts = [0, 60, 150, 230, 380, 500]
    batches = [(x[a:b], y[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    V = torch.randn(64 * 12 + 12 + 12 * 10 + 10, 3, generator=torch.Generator().manual_seed(1))
    return model, batches, V.double()


def _loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    from sparsemil.curvature.hvp import DistributedHessianOperator

    torch.set_num_threads(1)
    store = Path(out_dir) / "store"  # file rendezvous: no TCP port to race for
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, batches, V = _setup(Path(out_dir) / "digits.pt")
        for shard in (True, False):
            # shard=False: each rank passes only its own batches
            mine = batches if shard else batches[rank::world]
            op = DistributedHessianOperator(model, _loss, mine, shard=shard)
            torch.save(op.matmat(V), Path(out_dir) / f"rank{rank}_{shard}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_hvp_equals_single_process():
    from sparsemil.curvature.hvp import HessianOperator

    with tempfile.TemporaryDirectory() as tmp:
        _save_digits(Path(tmp) / "digits.pt")
        old = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, batches, V = _setup(Path(tmp) / "digits.pt")
            ref = HessianOperator(model, _loss, batches).matmat(V)
        finally:
            torch.set_num_threads(old)
        # 2 real processes; "fork" avoids re-importing torch in each child (spawn also works)
        mp.start_processes(_worker, args=(2, tmp), nprocs=2, join=True, start_method="fork")
        results = {
            (r, shard): torch.load(Path(tmp) / f"rank{r}_{shard}.pt", weights_only=True)
            for r in range(2)
            for shard in (True, False)
        }
    for shard in (True, False):
        outs = [results[(0, shard)], results[(1, shard)]]
        for out in outs:
            rel = (out - ref).abs().max() / ref.abs().max()
            assert rel < 1e-5, (shard, float(rel))
        assert torch.equal(outs[0], outs[1])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(test_two_process_hvp_equals_single_process())
