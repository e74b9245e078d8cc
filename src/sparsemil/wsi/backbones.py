"""Patch encoders in plain torch (no torchvision) and their weight loading.

Backbones (``--backbone``):

- ``resnet50_trunc`` -- ResNet-50 (v1.5: stride on the 3x3 conv) cut after ``layer3``,
  followed by global average pooling: 1024-d features, as CLAM's ``resnet50_trunc``.
  Parameter names are torchvision's (``conv1.weight``, ``bn1.*``,
  ``layer3.5.downsample.1.running_var``, ...), so an ImageNet torchvision/timm
  ``resnet50`` state_dict loads as is (its ``layer4.*`` and ``fc.*`` are ignored).
- ``tiny`` -- three stride-2 3x3 convolutions (3->16->32->64) + ReLU + global average
  pooling: 64-d. Only for quick pipeline checks and tests.
- ``torchscript`` -- any TorchScript module given by ``--weights``; it receives the
  normalised (B, 3, H, W) float batch and must return (B, C) or (B, C, h, w) (pooled).

Weights (``--weights PATH``): a ``.safetensors`` file, a torch ``state_dict`` read with
``torch.load(weights_only=True)`` (a dict nested under ``state_dict``/``model`` and a
common ``module.``/``model.``/``backbone.``/``encoder.`` prefix are accepted), or a
TorchScript archive (recognised by its content, whatever ``--backbone`` says).
Nothing is ever downloaded. Without weights the network is randomly initialised from a
fixed seed and a loud warning says the features are for pipeline checks only; the h5
files record it (``pretrained = False``).

Inputs are uint8 RGB (B, 3, H, W); :class:`PatchEncoder` scales them to [0, 1] and applies
the ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from sparsemil.errors import SparsemilError

BACKBONES: tuple[str, ...] = ("resnet50_trunc", "tiny", "torchscript")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_INIT_WARNING = (
    "features computed with RANDOMLY INITIALISED weights (no 'weights' given): "
    "for pipeline checks only, meaningless for training or evaluating a MIL model"
)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision layout). (B, C_in, H, W) -> (B, 4 planes, H/s, W/s)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + identity)


class ResNet50Trunc(nn.Module):
    """ResNet-50 up to ``layer3`` + global average pooling. (B, 3, H, W) -> (B, 1024)."""

    feature_dim = 1024

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._layer(64, 64, 3, 1)
        self.layer2 = self._layer(256, 128, 4, 2)
        self.layer3 = self._layer(512, 256, 6, 2)
        self._init_weights()

    @staticmethod
    def _layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [Bottleneck(inplanes, planes, stride)]
        layers += [Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class TinyConv(nn.Module):
    """Three stride-2 convs + ReLU + global average pooling. (B, 3, H, W) -> (B, 64)."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(32, 64, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


_BUILDERS = {"resnet50_trunc": ResNet50Trunc, "tiny": TinyConv}
# keys of a full classification ResNet that the truncated one does not use
_IGNORED_PREFIXES = ("layer4.", "fc.")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "network", "net")
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")


class PatchEncoder(nn.Module):
    """uint8 RGB patches -> features.

    ``forward(x: uint8 (B, 3, H, W)) -> float32 (B, C)``: scales to [0, 1], resizes to
    ``input_size`` (bilinear, antialiased) when given, normalises with the ImageNet mean/std,
    runs the network and global-average-pools a 4-D output.
    """

    def __init__(self, net: nn.Module, input_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if self.input_size is not None and tuple(x.shape[-2:]) != (self.input_size,) * 2:
            x = F.interpolate(
                x, size=(self.input_size,) * 2, mode="bilinear", align_corners=False, antialias=True
            )
        x = (x - self.mean) / self.std
        y = self.net(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        if y.dim() == 4:
            y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        if y.dim() != 2:
            raise SparsemilError(
                f"backbone output has shape {tuple(y.shape)}; expected (B, C) or (B, C, h, w)"
            )
        return y.float()


@dataclass
class Backbone:
    """A ready patch encoder and its provenance (written into the h5 attributes).

    Attributes:
        encoder: the :class:`PatchEncoder` (eval mode, on CPU).
        name: backbone name (``resnet50_trunc``, ``tiny``, ``torchscript``).
        feature_dim: C, or ``None`` for TorchScript until the first batch.
        pretrained: True when user weights were loaded.
        weights: the weights path, or ``"none"``.
        weights_sha256: SHA-256 of the weights file ("" without weights).
        warning: the random-init warning, or "".
    """

    encoder: PatchEncoder
    name: str
    feature_dim: int | None
    pretrained: bool
    weights: str
    weights_sha256: str
    warning: str

    def attrs(self) -> dict:
        """Provenance attributes for the h5 file."""
        return {
            "backbone": self.name,
            "pretrained": bool(self.pretrained),
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "warning": self.warning,
            "normalization": "imagenet",
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_torchscript(path: str | os.PathLike[str]) -> bool:
    """True for a TorchScript archive (a zip holding ``constants.pkl`` or ``code/``)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save``d state_dict (weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise SparsemilError(f"weights {path}: no such file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise SparsemilError(
                f"weights {path}: not a readable safetensors file ({err})"
            ) from None
    else:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:
            msg = " ".join(str(err).split())[:200]
            raise SparsemilError(
                f"weights {path}: cannot read it as a torch state_dict with weights_only=True "
                f"({type(err).__name__}: {msg}); save plain tensors with "
                "torch.save(model.state_dict(), path) or use .safetensors"
            ) from None
    for _ in range(2):
        if isinstance(sd, dict):
            inner = [k for k in _WRAPPER_KEYS if isinstance(sd.get(k), dict)]
            if inner and not any(isinstance(v, torch.Tensor) for v in sd.values()):
                sd = sd[inner[0]]
    if not isinstance(sd, dict) or not sd:
        raise SparsemilError(f"weights {path}: holds no tensors (expected a state_dict)")
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    changed = True
    while changed:
        changed = False
        for pre in _STRIP_PREFIXES:
            if sd and all(k.startswith(pre) for k in sd):
                sd = {k[len(pre) :]: v for k, v in sd.items()}
                changed = True
    return sd


def load_weights(net: nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Copy ``sd`` into ``net`` (strict on what ``net`` needs; ``layer4.*``/``fc.*`` ignored)."""
    own = net.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not k.startswith(_IGNORED_PREFIXES)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise SparsemilError(
            f"weights {path}: keys do not match this backbone: {'; '.join(parts)}; "
            "expected torchvision ResNet names such as conv1.weight, layer3.5.bn3.running_var"
        )
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if bad:
        k = bad[0]
        raise SparsemilError(
            f"weights {path}: shape mismatch for {k}: file {tuple(sd[k].shape)}, "
            f"model {tuple(own[k].shape)} ({len(bad)} tensors differ)"
        )
    new = {k: (sd[k] if k in sd else own[k]).to(own[k].dtype) for k in own}
    net.load_state_dict(new, strict=True)


def build_backbone(
    name: str = "resnet50_trunc",
    weights: str | os.PathLike[str] | None = None,
    input_size: int | None = None,
    seed: int = 0,
    warn: bool = True,
) -> Backbone:
    """Build a patch encoder (eval mode, CPU).

    Args:
        name: one of :data:`BACKBONES`.
        weights: optional weights file (see module doc).
        input_size: resize patches to this side before the network (None = as read).
        seed: seed of the random initialisation used when there are no weights.
        warn: print the random-init warning to stderr.
    """
    if name not in BACKBONES:
        raise SparsemilError(f"backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    wpath = Path(weights) if weights is not None else None
    if wpath is not None and not wpath.is_file():
        raise SparsemilError(f"weights {wpath}: no such file")
    if name == "torchscript" and wpath is None:
        raise SparsemilError("backbone torchscript needs 'weights' PATH to a TorchScript file")
    if wpath is not None and (name == "torchscript" or is_torchscript(wpath)):
        try:
            net = torch.jit.load(str(wpath), map_location="cpu")
        except Exception as err:
            msg = " ".join(str(err).split())[:200]
            raise SparsemilError(
                f"weights {wpath}: not a loadable TorchScript file ({msg})"
            ) from None
        enc = PatchEncoder(net, input_size).eval()
        return Backbone(enc, "torchscript", None, True, str(wpath), _sha256(wpath), "")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _BUILDERS[name]()
    warning = ""
    if wpath is not None:
        load_weights(net, read_state_dict(wpath), wpath)
        sha = _sha256(wpath)
    else:
        sha = ""
        warning = RANDOM_INIT_WARNING + f" (backbone {name}, init seed {seed})"
        if warn:
            bar = "!" * 78
            print(
                f"{bar}\nsparsemil: WARNING: {warning}.\n"
                "sparsemil: WARNING: pass 'weights' PATH (e.g. an ImageNet torchvision resnet50 "
                f"state_dict) for real features.\n{bar}",
                file=sys.stderr,
            )
    enc = PatchEncoder(net, input_size).eval()
    return Backbone(
        encoder=enc,
        name=name,
        feature_dim=int(net.feature_dim),
        pretrained=wpath is not None,
        weights=str(wpath) if wpath is not None else "none",
        weights_sha256=sha,
        warning=warning,
    )
