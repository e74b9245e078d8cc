"""Vision loaders on small real data: digits, Fashion-MNIST idx, npz, CIFAR batches (safe pickle)."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from sparsemil.data.vision import FASHION_MNIST_DEFAULT, load_vision_dataset, safe_load_batch
from sparsemil.errors import SparsemilError


def test_digits_split_and_standardisation() -> None:
    d = load_vision_dataset("digits", seed=0)
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.in_shape == (1, 8, 8) and d.num_classes == 10 and d.name == "digits"
    raw = load_digits()
    # stratified: test class counts follow the full-data proportions to within one sample
    full = np.bincount(raw.target, minlength=10) * 360 / 1797
    assert np.all(np.abs(np.bincount(d.y_test.numpy(), minlength=10) - full) <= 1)
    # per-pixel standardisation with training statistics
    xt = d.x_train.numpy().reshape(1437, 64)
    nonconst = raw.data.std(axis=0) > 0
    np.testing.assert_allclose(xt.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(
        xt.std(axis=0)[nonconst[: xt.shape[1]] & (xt.std(0) > 0)], 1, rtol=1e-4
    )
    # same seed -> same split; another seed -> another split
    again = load_vision_dataset("digits", seed=0)
    assert np.array_equal(again.y_test.numpy(), d.y_test.numpy())
    other = load_vision_dataset("digits", seed=1)
    assert not np.array_equal(other.x_test.numpy(), d.x_test.numpy())
    sub = load_vision_dataset("digits", subset=100, seed=0)
    assert len(sub.y_train) == 100 and len(sub.y_test) == 360


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def _raw_idx_head(path: Path, n: int, item: int) -> np.ndarray:
    """First n records of a real idx.gz file, decoded independently with struct."""
    with gzip.open(path, "rb") as fh:
        head = fh.read(4)
        ndim = head[3]
        dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
        assert dims[1:] == (28, 28)[: ndim - 1]
        return np.frombuffer(fh.read(n * item), dtype=np.uint8).reshape(n, *dims[1:])


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    if not (FASHION_MNIST_DEFAULT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FASHION_MNIST_DEFAULT} missing (apt-get install dataset-fashion-mnist)")
    return FASHION_MNIST_DEFAULT


def test_fashion_mnist_few_samples(tmp_path, fashion_dir: Path) -> None:
    folder = tmp_path / "fashion-mnist"  # official-style layout: data_path/<dataset>/
    folder.mkdir()
    n_tr, n_te = 40, 20
    x_tr = _raw_idx_head(fashion_dir / "train-images-idx3-ubyte.gz", n_tr, 784)
    y_tr = _raw_idx_head(fashion_dir / "train-labels-idx1-ubyte.gz", n_tr, 1)
    x_te = _raw_idx_head(fashion_dir / "t10k-images-idx3-ubyte.gz", n_te, 784)
    y_te = _raw_idx_head(fashion_dir / "t10k-labels-idx1-ubyte.gz", n_te, 1)
    assert y_tr[:4].tolist() == [9, 0, 0, 3] and y_te[:4].tolist() == [9, 2, 1, 1]
    for name, arr in (
        ("train-images-idx3-ubyte", x_tr),
        ("train-labels-idx1-ubyte", y_tr),
        ("t10k-images-idx3-ubyte", x_te),
        ("t10k-labels-idx1-ubyte", y_te),
    ):
        _write_idx(folder / f"{name}.gz", arr)
    d = load_vision_dataset("fashion_mnist", data_path=tmp_path)
    assert d.x_train.shape == (n_tr, 1, 28, 28) and d.x_test.shape == (n_te, 1, 28, 28)
    assert d.y_train.tolist() == y_tr.tolist() and d.y_test.tolist() == y_te.tolist()
    scaled = x_tr.astype(np.float64) / 255.0
    expected = (scaled - scaled.mean()) / scaled.std()
    np.testing.assert_allclose(d.x_train.numpy()[:, 0], expected, atol=1e-5)


def test_fashion_mnist_default_location(fashion_dir: Path) -> None:
    d = load_vision_dataset("fashion-mnist", subset=500, seed=0)
    assert d.x_test.shape == (10000, 1, 28, 28) and len(d.y_train) == 500
    assert np.bincount(d.y_test.numpy()).tolist() == [1000] * 10


def test_npz_from_digits(tmp_path) -> None:
    raw = load_digits()
    path = tmp_path / "digits.npz"
    np.savez(
        path,
        x_train=raw.data[:1000],
        y_train=raw.target[:1000],
        x_test=raw.data[1000:],
        y_test=raw.target[1000:],
    )
    d = load_vision_dataset("npz", data_path=path)
    assert d.in_shape == (64,) and d.num_classes == 10
    np.testing.assert_array_equal(d.x_test.numpy(), raw.data[1000:].astype(np.float32))
    np.testing.assert_array_equal(d.y_train.numpy(), raw.target[:1000])
    # images (N, H, W) uint8 get a channel axis and are scaled to [0, 1]
    img = tmp_path / "img.npz"
    u8 = (raw.images * 15).astype(np.uint8)
    np.savez(
        img, x_train=u8[:50], y_train=raw.target[:50], x_test=u8[50:60], y_test=raw.target[50:60]
    )
    d2 = load_vision_dataset("npz", data_path=img)
    assert d2.in_shape == (1, 8, 8)
    np.testing.assert_allclose(d2.x_train.numpy()[:, 0], u8[:50] / 255.0, rtol=1e-6)
    # object arrays need pickle: refused
    evil = tmp_path / "evil.npz"
    obj = np.empty(2, dtype=object)
    np.savez(evil, x_train=obj, y_train=raw.target[:2], x_test=obj, y_test=raw.target[:2])
    with pytest.raises(SparsemilError, match="evil.npz: not a readable .npz without pickles"):
        load_vision_dataset("npz", data_path=evil)
    missing = tmp_path / "partial.npz"
    np.savez(missing, x_train=raw.data[:5], y_train=raw.target[:5])
    with pytest.raises(SparsemilError, match="x_test"):
        load_vision_dataset("npz", data_path=missing)


def _digits_as_cifar(raw, idx: np.ndarray) -> np.ndarray:
    img = (raw.images[idx] * 15).astype(np.uint8)  # (n, 8, 8) 0..240
    img = np.kron(img, np.ones((4, 4), dtype=np.uint8))  # (n, 32, 32)
    return np.repeat(img[:, None], 3, axis=1).reshape(len(idx), 3072)


def test_cifar_batches_with_safe_unpickler(tmp_path) -> None:
    raw = load_digits()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    parts = np.array_split(np.arange(250), 5)
    for i, idx in enumerate(parts, start=1):
        batch = {
            b"batch_label": b"training batch",
            b"labels": raw.target[idx].tolist(),
            b"data": _digits_as_cifar(raw, idx),
            b"filenames": [b"x.png"] * len(idx),
        }
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=3))
    te = np.arange(250, 300)
    (folder / "test_batch").write_bytes(
        pickle.dumps(
            {b"labels": raw.target[te].tolist(), b"data": _digits_as_cifar(raw, te)}, protocol=3
        )
    )
    d = load_vision_dataset("cifar10", data_path=tmp_path)
    assert d.x_train.shape == (250, 3, 32, 32) and d.num_classes == 10
    assert d.y_train.tolist() == raw.target[:250].tolist()
    x = _digits_as_cifar(raw, np.arange(250)).reshape(250, 3, 32, 32) / 255.0
    expected = (x - x.mean(axis=(0, 2, 3), keepdims=True)) / x.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(d.x_train.numpy(), expected, atol=1e-5)

    c100 = tmp_path / "c100" / "cifar-100-python"
    c100.mkdir(parents=True)
    for name, idx in (("train", np.arange(60)), ("test", np.arange(60, 80))):
        (c100 / name).write_bytes(
            pickle.dumps(
                {
                    "fine_labels": raw.target[idx].tolist(),
                    "coarse_labels": [0] * len(idx),
                    "data": _digits_as_cifar(raw, idx),
                },
                protocol=4,
            )
        )
    d100 = load_vision_dataset("cifar100", data_path=tmp_path / "c100")
    assert d100.num_classes == 100 and d100.y_test.tolist() == raw.target[60:80].tolist()


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": evil, b"labels": [0]}, protocol=2))
    with pytest.raises(SparsemilError, match="not allowed"):
        safe_load_batch(path)
    assert not marker.exists()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    path.rename(folder / "data_batch_1")
    with pytest.raises(SparsemilError, match="not allowed"):
        load_vision_dataset("cifar10", data_path=tmp_path)
    assert not marker.exists()
    # an allowed-looking module with a forbidden name is refused too
    sneaky = tmp_path / "sneaky"
    sneaky.write_bytes(b"\x80\x02cnumpy\nload\nq\x00.")
    with pytest.raises(SparsemilError, match="numpy.load"):
        safe_load_batch(sneaky)


def test_missing_dataset_messages(tmp_path) -> None:
    with pytest.raises(SparsemilError, match="data_path") as err:
        load_vision_dataset("mnist")
    assert "data_path" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SparsemilError, match="fashion-mnist|idx") as err:
        load_vision_dataset("fashion-mnist", data_path=tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(SparsemilError, match="cifar-10-batches-py"):
        load_vision_dataset("cifar10", data_path=tmp_path)
    with pytest.raises(SparsemilError, match="did you mean 'mnist'"):
        load_vision_dataset("mnsit")
