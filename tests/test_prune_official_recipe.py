"""The official training recipe: per-iteration LR schedule, CIFAR augmentation, 32x32 inputs."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsemil.data.vision import augment_batch, check_augment, load_vision_dataset
from sparsemil.errors import SparsemilError
from sparsemil.experiments.vision.config import PruneConfig, config_from_dict
from sparsemil.experiments.vision.models import build_model
from sparsemil.experiments.vision.train import (
    lr_at,
    model_metadata,
    train_from_config,
    train_l1,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- LR schedule


def _lrs(cfg: PruneConfig, iters: int, gs) -> list[float]:
    return [lr_at(cfg, g // iters, g % iters, iters) for g in gs]


def test_defaults_are_official() -> None:
    cfg = PruneConfig()
    assert cfg.scheduler_step == "iteration" and cfg.augment == "none"
    assert cfg.image_size is None and cfg.channels is None


def test_multistep_counts_iterations_or_epochs() -> None:
    # 10 iterations per epoch, milestones [3, 5]
    it = PruneConfig(lr=0.1, schedu=True, milestones=[3, 5], gamma=0.5)
    assert _lrs(it, 10, range(7)) == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    assert _lrs(it, 10, [10, 59]) == pytest.approx([0.025, 0.025])
    ep = PruneConfig(lr=0.1, schedu=True, milestones=[3, 5], gamma=0.5, scheduler_step="epoch")
    assert _lrs(ep, 10, [0, 9, 29, 30, 49, 50, 59]) == pytest.approx(
        [0.1, 0.1, 0.1, 0.05, 0.05, 0.025, 0.025]
    )


def test_multistep_with_warmup_per_iteration() -> None:
    # warm = 1 epoch of 10 iterations (T = 10): the warm-up sets lr * k / (T + 1e-8) after step k
    # and overwrites the milestone decay of iteration 3; milestone 15 > T decays for good.
    cfg = PruneConfig(lr=0.1, schedu=True, milestones=[3, 15], gamma=0.5, warm=1)
    t = 10 + 1e-8
    got = _lrs(cfg, 10, [0, 2, 3, 4, 10, 14, 15, 40])
    want = [0.0, 0.2 / t, 0.15 / t, 0.4 / t, 1.0 / t, 1.0 / t, 0.5 / t, 0.5 / t]
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    # per epoch: the warm-up factor times the epoch's schedule
    ep = PruneConfig(
        lr=0.1, schedu=True, milestones=[3, 15], gamma=0.5, warm=1, scheduler_step="epoch"
    )
    assert _lrs(ep, 10, [0, 3, 10, 30, 150]) == pytest.approx([0.0, 0.03, 0.1, 0.05, 0.025])


def test_cosine_per_iteration_and_per_epoch() -> None:
    # T_max = epoch = 4 counts iterations (and keeps cycling); per epoch it counts epochs
    it = PruneConfig(lr=0.1, schedu=True, schedumode="cos", epoch=4)
    assert _lrs(it, 10, [0, 2, 4, 6, 8, 12]) == pytest.approx(
        [0.1, 0.05, 0.0, 0.05, 0.1, 0.0], abs=1e-15
    )
    ep = PruneConfig(lr=0.1, schedu=True, schedumode="cos", epoch=4, scheduler_step="epoch")
    assert _lrs(ep, 10, [0, 9, 20, 27, 30]) == pytest.approx(
        [0.1, 0.1, 0.05, 0.05, 0.1 * (1 + math.cos(3 * math.pi / 4)) / 2]
    )


def test_cosine_with_warmup_hand_computed() -> None:
    # lr 1, T_max = 2, warm-up T = 1 * 3 iterations; c(k) = 1 + cos(pi k / 2) = 2, 1, 0, 1, 2, ...
    # k=1: w1 c1/c0 = 1/6; k=2: 0; k=3 (restart: (3-1-2) % 4 == 0): w3 + (1 - cos(pi/2))/2 = 1.5
    # then 1.5 c(k)/c(3) until the restart at k=7, then c(k)/2.
    cfg = PruneConfig(lr=1.0, schedu=True, schedumode="cos", epoch=2, warm=1)
    t = 3 + 1e-8
    got = _lrs(cfg, 3, range(9))
    want = [0.0, 1 / t / 2, 0.0, 3 / t + 0.5, 2 * (3 / t + 0.5), 3 / t + 0.5, 0.0, 0.5, 1.0]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)


class _WarmUp(torch.optim.lr_scheduler.LRScheduler):
    """Linear warm-up with the official closed form ``base * step / (total + 1e-8)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total: int) -> None:
        self.total = total
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [b * self.last_epoch / (self.total + 1e-8) for b in self.base_lrs]


def _torch_official(cfg: PruneConfig, iters: int) -> list[float]:
    """The rates of the official loop, with torch's own schedulers on one optimiser."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    if cfg.schedumode == "multistep":
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, cfg.milestones, gamma=cfg.gamma)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epoch)
    warm = _WarmUp(opt, iters * cfg.warm) if cfg.warm > 0 else None
    out = []
    for epoch in range(cfg.epoch):
        for _ in range(iters):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            if warm is not None and epoch < cfg.warm:
                warm.step()
            if cfg.schedu:
                sched.step()
    return out


@pytest.mark.parametrize(
    "kw",
    [
        {"schedumode": "multistep", "milestones": [0, 4, 21, 25, 25, 40], "warm": 3},
        {"schedumode": "multistep", "milestones": [0, 4, 25], "warm": 0},
        {"schedumode": "cos", "warm": 3},
        {"schedumode": "cos", "warm": 0},
        {"schedumode": "cos", "warm": 2, "epoch": 6},
        {"schedumode": "multistep", "warm": 2, "schedu": False},
    ],
)
def test_iteration_mode_matches_torch_schedulers(kw: dict) -> None:
    kw = {"lr": 0.1, "schedu": True, "gamma": 0.5, "epoch": 7, **kw}
    cfg = PruneConfig(**kw)
    want = _torch_official(cfg, iters=7)
    got = _lrs(cfg, 7, range(len(want)))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_history_records_the_applied_rates() -> None:
    data = load_vision_dataset("digits", subset=64, seed=0)
    cfg = PruneConfig(
        model="mlp",
        widths=[8],
        epoch=3,
        batch_size=16,
        lr=0.05,
        schedu=True,
        milestones=[2, 5],
        gamma=0.5,
    )  # 4 iterations per epoch: decays after iterations 2 and 5
    model = build_model("mlp", data.in_shape, 10, widths=[8], seed=0)
    hist = train_l1(model, data, cfg, progress=False, device="cpu")
    assert hist["lr"] == pytest.approx([0.05, 0.025, 0.0125])
    assert hist["lr_last"] == pytest.approx([0.025, 0.0125, 0.0125])


def test_config_validation_of_new_keys() -> None:
    with pytest.raises(SparsemilError, match="scheduler_step"):
        config_from_dict({"scheduler_step": "batch"})
    with pytest.raises(SparsemilError, match="'augment'"):
        config_from_dict({"augment": "cifar"})
    with pytest.raises(SparsemilError, match="'augment'.*image_size: 32"):
        config_from_dict({"augment": "official", "image_size": 28})
    with pytest.raises(SparsemilError, match="channels"):
        config_from_dict({"channels": 2})
    cfg = config_from_dict({"augment": "official", "image_size": 32, "channels": 3})
    assert (cfg.augment, cfg.image_size, cfg.channels) == ("official", 32, 3)


# --------------------------------------------------------------------------- augmentation


def _reference(x: torch.Tensor, fill: list[float], seed: int) -> torch.Tensor:
    """Loop reference: pad by 4 with ``fill``, crop at the drawn offsets, flip when drawn."""
    b, c, h, w = x.shape
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(0, 9, (b,), generator=g)
    left = torch.randint(0, 9, (b,), generator=g)
    flip = torch.rand(b, generator=g) < 0.5
    out = torch.empty_like(x)
    for i in range(b):
        padded = torch.empty(c, h + 8, w + 8)
        for ch in range(c):
            padded[ch].fill_(fill[ch])
        padded[:, 4 : 4 + h, 4 : 4 + w] = x[i]
        crop = padded[:, int(top[i]) : int(top[i]) + h, int(left[i]) : int(left[i]) + w]
        out[i] = crop.flip(-1) if bool(flip[i]) else crop
    return out


def test_augment_matches_loop_reference_and_is_seeded() -> None:
    x = torch.randn(40, 2, 5, 6, generator=torch.Generator().manual_seed(1))
    x0 = x.clone()
    fill = [-1.5, -2.25]
    out = augment_batch(x, "official", torch.Generator().manual_seed(7), fill=fill)
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(x, x0)
    assert torch.equal(out, _reference(x, fill, 7))
    again = augment_batch(x, "official", torch.Generator().manual_seed(7), fill=fill)
    other = augment_batch(x, "official", torch.Generator().manual_seed(8), fill=fill)
    assert torch.equal(out, again) and not torch.equal(out, other)
    # every output is one of the 81 crops x 2 flips of its padded input
    padded = torch.tensor(fill).view(1, 2, 1, 1).repeat(40, 1, 13, 14)
    padded[:, :, 4:9, 4:10] = x
    for i in range(len(x)):
        crops = [
            padded[i, :, t : t + 5, s : s + 6].flip(-1) if f else padded[i, :, t : t + 5, s : s + 6]
            for t in range(9)
            for s in range(9)
            for f in (False, True)
        ]
        assert any(torch.equal(out[i], c) for c in crops)


def test_augment_flip_and_offset_frequencies() -> None:
    n, fill = 4000, -9.0
    x = torch.arange(12.0).repeat(n, 1, 9, 1)  # (n, 1, 9, 12): every row is 0, 1, ..., 11
    out = augment_batch(x, "official", torch.Generator().manual_seed(0), fill=fill)
    # a 9-row crop of the 17 padded rows always shows image rows, each with >= 4 image pixels
    row = out[:, 0, 4]
    inner = (row[:, 1:] != fill) & (row[:, :-1] != fill)
    assert bool(inner.any(1).all())
    flipped = ((row[:, 1:] < row[:, :-1]) & inner).any(1).float().mean()
    assert abs(float(flipped) - 0.5) < 0.03
    # the top offset t in 0..8 leaves max(0, 4 - t) fill rows above, max(0, t - 4) below
    fill_rows = (out[:, 0] == fill).all(-1)  # (n, 9)
    above = fill_rows.int().cumprod(1).sum(1)
    below = fill_rows.flip(1).int().cumprod(1).sum(1)
    top = torch.where(above > 0, 4 - above, 4 + below)
    freq = torch.bincount(top, minlength=9).float() / n
    assert freq.shape == (9,) and float((freq - 1 / 9).abs().max()) < 0.03


def test_augment_none_and_errors() -> None:
    x = torch.zeros(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    assert augment_batch(x, "none", g) is x
    with pytest.raises(SparsemilError, match="fill"):
        augment_batch(x, "official", g)
    with pytest.raises(SparsemilError, match="unknown mode"):
        augment_batch(x, "cutout", g, fill=0.0)
    with pytest.raises(SparsemilError, match=r"\(B, C, H, W\)"):
        augment_batch(torch.zeros(2, 16), "official", g, fill=0.0)


# --------------------------------------------------------------------------- 32x32 inputs


def _write_idx(path: Path, arr: np.ndarray) -> None:
    code = 0x08
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path: Path) -> Path:
    """A 32/16-image Fashion-MNIST-shaped idx folder with black backgrounds."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for split, n in (("train", 32), ("t10k", 16)):
        img = np.zeros((n, 28, 28), np.uint8)
        img[:, 6:22, 8:20] = rng.integers(1, 256, (n, 16, 12))
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", img)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_image_size_pads_with_black_and_channels_replicate(fake_fashion: Path) -> None:
    plain = load_vision_dataset("fashion-mnist", fake_fashion)
    black = plain.black
    assert black is not None and len(black) == 1
    assert float(plain.x_train[0, 0, 0, 0]) == black[0]  # a black pixel of the data
    d = load_vision_dataset("fashion-mnist", fake_fashion, image_size=32, channels=3)
    assert d.in_shape == (3, 32, 32) and d.x_test.shape == (16, 3, 32, 32)
    assert d.black == black * 3
    for x, x0 in ((d.x_train, plain.x_train), (d.x_test, plain.x_test)):
        assert torch.equal(x[:, :, 2:30, 2:30], x0.expand(-1, 3, -1, -1))  # pixels exact
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert bool((x[:, :, border] == black[0]).all())
    grey = load_vision_dataset("fashion-mnist", fake_fashion, image_size=32)
    assert grey.in_shape == (1, 32, 32)
    with pytest.raises(SparsemilError, match="'image_size'.*never resized"):
        load_vision_dataset("fashion-mnist", fake_fashion, image_size=24)
    with pytest.raises(SparsemilError, match="'image_size'.*per pixel"):
        load_vision_dataset("digits", image_size=32)
    assert load_vision_dataset("digits", channels=3).in_shape == (3, 8, 8)  # grey -> 3
    rgb = fake_fashion / "rgb.npz"
    arr = np.zeros((4, 3, 8, 8), np.uint8)
    np.savez(rgb, x_train=arr, y_train=np.arange(4), x_test=arr, y_test=np.arange(4))
    with pytest.raises(SparsemilError, match="'channels'.*grey"):
        load_vision_dataset("npz", rgb, channels=1)
    assert load_vision_dataset("npz", rgb, image_size=10).black == (0.0, 0.0, 0.0)
    check_augment("official", d)
    with pytest.raises(SparsemilError, match="'augment'.*set image_size: 32") as err:
        check_augment("official", plain)
    assert "\n" not in str(err.value)


def test_cifar_layout_training_with_augmentation(fake_fashion: Path) -> None:
    kw = {
        "model": "lenet",
        "dataset": "fashion-mnist",
        "data_path": str(fake_fashion),
        "image_size": 32,
        "channels": 3,
        "augment": "official",
        "epoch": 1,
        "batch_size": 16,
        "lr": 0.01,
        "device": "cpu",
    }
    model, data, hist = train_from_config(config_from_dict(kw), progress=False)
    assert data.in_shape == (3, 32, 32) and len(hist["test_acc"]) == 1
    meta = model_metadata(config_from_dict(kw), data)
    assert meta["in_shape"] == [3, 32, 32] and meta["config"]["image_size"] == 32
    again, _, _ = train_from_config(config_from_dict(kw), progress=False)
    plain, _, _ = train_from_config(config_from_dict({**kw, "augment": "none"}), progress=False)
    a, b, c = (dict(m.named_parameters()) for m in (model, again, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)  # seeded
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the augmentation is applied
    with pytest.raises(SparsemilError, match="'augment'"):
        train_from_config(config_from_dict({**kw, "image_size": None}), progress=False)


def test_vgg16_needs_32x32_with_a_hint() -> None:
    with pytest.raises(SparsemilError, match="image_size: 32") as err:
        build_model("vgg16", (1, 28, 28), 10)
    assert "\n" not in str(err.value)
