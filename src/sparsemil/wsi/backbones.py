"""Patch encoders in plain torch (no torchvision/timm), their preprocessing and weights.

Encoders (``--encoder``, :data:`ENCODERS`):

- ``resnet50_trunc`` -- ResNet-50 (v1.5: stride on the 3x3 conv) cut after ``layer3``,
  followed by global average pooling: 1024-d, as CLAM's ``resnet50_trunc``. Parameter
  names are torchvision's (``conv1.weight``, ``bn1.*``, ``layer3.5.downsample.1.running_var``,
  ...), so an ImageNet torchvision/timm ``resnet50`` state_dict loads as is (its
  ``layer4.*`` and ``fc.*`` are ignored). Patches go in as read (no resize).
- ``uni`` -- UNI (Chen et al., Nat Med 2024; huggingface.co/MahmoodLab/UNI): ViT-L/16,
  LayerScale, GELU MLP, class token with a position embedding; 1024-d class token.
- ``uni2h`` -- UNI2-h (huggingface.co/MahmoodLab/UNI2-h): ViT-H/14 (width 1536, depth 24,
  24 heads), packed SwiGLU, 8 register tokens, position embedding on the patch tokens only
  (timm ``no_embed_class=True``); 1536-d class token.
- ``gigapath`` -- Prov-GigaPath tile encoder (Xu et al., Nature 2024;
  huggingface.co/prov-gigapath/prov-gigapath): timm ``vit_giant_patch14_dinov2`` with patch
  16 (width 1536, depth 40, 24 heads, LayerScale, packed SwiGLU); 1536-d class token.
- ``virchow`` -- Virchow (Vorontsov et al., Nat Med 2024; huggingface.co/paige-ai/Virchow):
  ViT-H/14 (width 1280, depth 32, 16 heads, LayerScale, packed SwiGLU); embedding =
  [class token, mean of the patch tokens], 2560-d.
- ``tiny`` -- three stride-2 3x3 convolutions (3->16->32->64) + ReLU + global average
  pooling: 64-d. Only for quick pipeline checks and tests.
- ``torchscript`` -- any TorchScript module given by ``--weights``; it receives the
  normalised (B, 3, H, W) float batch and must return (B, C) or (B, C, h, w) (pooled).

The ViTs are one module, :class:`sparsemil.wsi.vit.VisionTransformer`, configured by
:class:`~sparsemil.wsi.vit.ViTConfig` (:data:`ENCODERS` holds the published full sizes).
Their position-embedding grid is read off the checkpoint, and the embedding is resampled
for other input sizes.

Preprocessing (:class:`Preprocess`, each encoder's published transform; the h5 records it):
uint8 RGB (B, 3, H, W) -> [0, 1] -> resize (shorter side, antialiased) -> centre crop ->
``(x - mean) / std``. All four ViTs use the ImageNet mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225) at 224 px:

- ``uni``: ``Resize(224)`` (bilinear) -- UNI model card (torchvision transform) and its
  timm ``pretrained_cfg`` (bilinear, ``crop_pct`` 1);
- ``uni2h``: ``Resize(224)`` (bilinear) + ``CenterCrop(224)`` -- UNI2-h model card;
- ``gigapath``: ``Resize(256, bicubic)`` + ``CenterCrop(224)`` -- Prov-GigaPath model card
  and ``demo/3_load_tile_encoder.py``: a 256-px patch is cropped to its central 224 px;
- ``virchow``: ``Resize(224, bicubic)`` + ``CenterCrop(224)`` -- timm's eval transform of
  its ``pretrained_cfg`` (input 224, bicubic, ``crop_pct`` 1.0, centre crop);
- ``resnet50_trunc``, ``tiny``, ``torchscript``: no resize, ImageNet mean/std.

The resize runs on float tensors in [0, 1] (``F.interpolate``, antialias) and is clamped
back to [0, 1], where torchvision resizes the uint8 PIL image: the two differ by about
one grey level. ``input_size`` (``--input-size``) replaces the resize and crop with a
plain resize to that side.

Weights (``--weights PATH``): a ``.safetensors`` file, a torch ``state_dict`` read with
``torch.load(weights_only=True)`` (a dict nested under ``state_dict``/``model`` and a
common ``module.``/``model.``/``backbone.``/``encoder.`` prefix are accepted), or a
TorchScript archive (recognised by its content, whatever ``--encoder`` says; it keeps the
named encoder's preprocessing). Keys must match exactly (timm/torchvision names; only a
ResNet's ``layer4.*``/``fc.*`` and a ViT's classifier ``head.*`` are ignored); a mismatch
is a one-line error naming the file, the first missing/unexpected keys and, when the file
fits another encoder, that encoder. Nothing is ever downloaded. Without weights the
network is randomly initialised from a fixed seed and a loud warning says the features
are for pipeline checks only; the h5 files record it (``pretrained = False``).

Precision (:func:`resolve_precision`): fp32 on the CPU by default (bf16 autocast on
request); on a GPU the network runs under ``torch.autocast`` in fp16 (the default) or
bf16, or in fp32. Preprocessing and the returned features are fp32.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from sparsemil.errors import SparsemilError, suggest
from sparsemil.wsi.vit import VisionTransformer, ViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")
RANDOM_INIT_WARNING = (
    "features computed with RANDOMLY INITIALISED weights (no 'weights' given): "
    "for pipeline checks only, meaningless for training or evaluating a MIL model"
)


@dataclass(frozen=True)
class Preprocess:
    """An encoder's input transform: uint8 RGB patches -> the network's float input.

    Attributes:
        resize: side the shorter image side is resized to (torchvision ``Resize(int)``),
            None = as read.
        interpolation: ``"bilinear"`` or ``"bicubic"`` (antialiased).
        crop: side of the centre crop after resizing, None = none.
        mean, std: per-channel normalisation of the [0, 1] image.
    """

    resize: int | None = None
    interpolation: str = "bilinear"
    crop: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def with_input_size(self, size: int | None) -> Preprocess:
        """``size`` given: a plain resize to ``size`` (no crop) replaces resize and crop."""
        return self if size is None else replace(self, resize=int(size), crop=None)

    def output_side(self, side: int) -> int:
        """Side of the network input for a square patch of ``side`` pixels."""
        return int(self.crop or self.resize or side)

    def describe(self) -> str:
        """JSON text of the transform (written into the h5 attributes)."""
        return json.dumps(
            {
                "resize": self.resize,
                "interpolation": self.interpolation,
                "antialias": True,
                "center_crop": self.crop,
                "mean": list(self.mean),
                "std": list(self.std),
            }
        )


@dataclass(frozen=True)
class EncoderSpec:
    """A named encoder: architecture, published preprocessing and weight files.

    Attributes:
        name: the ``--encoder`` name.
        architecture: one-line description.
        preprocess: the published input transform.
        vit: full-size ViT configuration (None for the CNNs and TorchScript).
        weight_files: the file names the authors publish.
    """

    name: str
    architecture: str
    preprocess: Preprocess
    vit: ViTConfig | None = None
    weight_files: str = ""


_NO_RESIZE = Preprocess()
ENCODERS: dict[str, EncoderSpec] = {
    spec.name: spec
    for spec in (
        EncoderSpec(
            "resnet50_trunc",
            "ResNet-50 (torchvision v1.5) conv1..layer3 + global average pooling (CLAM)",
            _NO_RESIZE,
            weight_files="torchvision resnet50-0676ba61.pth (ImageNet V1) or any "
            "torchvision-named resnet50 state_dict",
        ),
        EncoderSpec(
            "uni",
            "UNI: ViT-L/16 (1024 wide, 24 blocks, 16 heads), LayerScale, GELU MLP",
            Preprocess(resize=224, interpolation="bilinear"),
            ViTConfig(1024, 24, 16, 4096, patch_size=16),
            "pytorch_model.bin from huggingface.co/MahmoodLab/UNI",
        ),
        EncoderSpec(
            "uni2h",
            "UNI2-h: ViT-H/14 (1536 wide, 24 blocks, 24 heads), LayerScale, packed SwiGLU, "
            "8 register tokens, position embedding on patches only",
            Preprocess(resize=224, interpolation="bilinear", crop=224),
            ViTConfig(
                1536,
                24,
                24,
                8192,
                patch_size=14,
                mlp="swiglu",
                reg_tokens=8,
                class_pos_embed=False,
            ),  # fmt: skip
            "pytorch_model.bin from huggingface.co/MahmoodLab/UNI2-h",
        ),
        EncoderSpec(
            "gigapath",
            "Prov-GigaPath tile encoder: ViT-g/16 (1536 wide, 40 blocks, 24 heads), "
            "LayerScale, packed SwiGLU",
            Preprocess(resize=256, interpolation="bicubic", crop=224),
            ViTConfig(1536, 40, 24, 8192, patch_size=16, mlp="swiglu"),
            "pytorch_model.bin from huggingface.co/prov-gigapath/prov-gigapath",
        ),
        EncoderSpec(
            "virchow",
            "Virchow: ViT-H/14 (1280 wide, 32 blocks, 16 heads), LayerScale, packed SwiGLU; "
            "[class token, mean of patch tokens]",
            Preprocess(resize=224, interpolation="bicubic", crop=224),
            ViTConfig(1280, 32, 16, 6832, patch_size=14, mlp="swiglu", pool="cls_mean"),
            "pytorch_model.bin or model.safetensors from huggingface.co/paige-ai/Virchow",
        ),
        EncoderSpec("tiny", "three stride-2 3x3 convs + pooling (tests only)", _NO_RESIZE),
        EncoderSpec(
            "torchscript",
            "any TorchScript module (--weights)",
            _NO_RESIZE,
            weight_files="a torch.jit.save archive",
        ),  # fmt: skip
    )
}
BACKBONES: tuple[str, ...] = tuple(ENCODERS)  # the names, as before the ViTs came


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
    # keys of a full classification ResNet that the truncated one does not use
    ignored_prefixes = ("layer4.", "fc.")
    key_hint = "torchvision ResNet names such as conv1.weight, layer3.5.bn3.running_var"

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
    ignored_prefixes: tuple[str, ...] = ()
    key_hint = "conv1.weight, conv2.weight, conv3.weight and their biases"

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
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "network", "net")
_STRIP_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
_AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


class PatchEncoder(nn.Module):
    """uint8 RGB patches -> features.

    ``forward(x: uint8 (B, 3, H, W)) -> float32 (B, C)``: applies ``preprocess`` (see
    :class:`Preprocess`), runs the network -- under ``torch.autocast`` when ``precision``
    is ``"fp16"``/``"bf16"`` -- and global-average-pools a 4-D output.

    Args:
        net: the network.
        preprocess: the input transform; an ``int`` means a plain bilinear resize to that
            side with the ImageNet mean/std (the former ``input_size`` argument).
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (set by :meth:`Backbone.prepare`).
    """

    def __init__(
        self,
        net: nn.Module,
        preprocess: Preprocess | int | None = None,
        precision: str = "fp32",
    ) -> None:
        super().__init__()
        if preprocess is None or isinstance(preprocess, int):
            preprocess = _NO_RESIZE.with_input_size(preprocess)
        self.net = net
        self.transform = preprocess
        self.precision = precision
        self.register_buffer(
            "mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> normalised float32 (B, 3, S, S)."""
        t = self.transform
        x = x.float().div_(255.0)
        if t.resize is not None:
            h, w = x.shape[-2:]
            if h <= w:
                size = (t.resize, int(t.resize * w / h))
            else:
                size = (int(t.resize * h / w), t.resize)
            if size != (h, w):
                x = F.interpolate(
                    x, size=size, mode=t.interpolation, align_corners=False, antialias=True
                ).clamp_(0.0, 1.0)
        if t.crop is not None:
            h, w = x.shape[-2:]
            if h < t.crop or w < t.crop:
                raise SparsemilError(
                    f"input_size: a {h}x{w} patch is smaller than the {t.crop}-px centre crop; "
                    "use a larger patch_size or set input_size"
                )
            top, left = int(round((h - t.crop) / 2.0)), int(round((w - t.crop) / 2.0))
            x = x[..., top : top + t.crop, left : left + t.crop]
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(x)
        dtype = _AUTOCAST.get(self.precision)
        if dtype is None:
            y = self.net(x)
        else:
            with torch.autocast(device_type=x.device.type, dtype=dtype):
                y = self.net(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        if y.dim() == 4:
            y = torch.flatten(F.adaptive_avg_pool2d(y.float(), 1), 1)
        if y.dim() != 2:
            raise SparsemilError(
                f"encoder output has shape {tuple(y.shape)}; expected (B, C) or (B, C, h, w)"
            )
        return y.float()


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """``"fp32"``, ``"fp16"`` or ``"bf16"`` for ``precision`` on ``device``.

    ``"auto"`` is fp16 autocast on CUDA (as the Virchow model card recommends, and as UNI
    was trained) and fp32 elsewhere. fp16 needs a GPU; bf16 on CUDA needs a GPU that
    supports it.
    """
    dev = torch.device(device)
    if precision not in PRECISIONS:
        raise SparsemilError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if dev.type == "cuda" else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        raise SparsemilError("precision 'fp16' needs a GPU; on the CPU use fp32 or bf16")
    if precision == "bf16" and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SparsemilError("precision 'bf16': this GPU does not support bfloat16; use fp16")
    return precision


@dataclass
class Backbone:
    """A ready patch encoder and its provenance (written into the h5 attributes).

    Attributes:
        encoder: the :class:`PatchEncoder` (eval mode, on CPU until :meth:`prepare`).
        name: encoder name (a key of :data:`ENCODERS`).
        feature_dim: C, or ``None`` for TorchScript until the first batch.
        pretrained: True when user weights were loaded.
        weights: the weights path, or ``"none"``.
        weights_sha256: SHA-256 of the weights file ("" without weights).
        warning: the random-init warning, or "".
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (set by :meth:`prepare`).
    """

    encoder: PatchEncoder
    name: str
    feature_dim: int | None
    pretrained: bool
    weights: str
    weights_sha256: str
    warning: str
    precision: str = "fp32"

    @property
    def preprocess(self) -> Preprocess:
        return self.encoder.transform

    def prepare(self, device: torch.device | str, precision: str = "auto") -> Backbone:
        """Move the encoder to ``device`` and set its precision (see :func:`resolve_precision`)."""
        self.precision = resolve_precision(precision, device)
        self.encoder.precision = self.precision
        self.encoder.to(device)
        return self

    def attrs(self) -> dict:
        """Provenance attributes for the h5 file."""
        t = self.preprocess
        imagenet = (tuple(t.mean), tuple(t.std)) == (IMAGENET_MEAN, IMAGENET_STD)
        return {
            "encoder": self.name,
            "backbone": self.name,
            "pretrained": bool(self.pretrained),
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "warning": self.warning,
            "normalization": "imagenet" if imagenet else "custom",
            "preprocessing": t.describe(),
            "precision": self.precision,
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


def encoder_spec(name: str) -> EncoderSpec:
    """The :class:`EncoderSpec` of ``name``; an unknown name says the nearest one."""
    spec = ENCODERS.get(name)
    if spec is None:
        tail = suggest(name, ENCODERS)
        near = tail if tail.startswith("; did you mean") else ""
        raise SparsemilError(
            f"encoder {name!r}: unknown{near}; choose one of {', '.join(ENCODERS)}"
        )
    return spec


def _new_net(name: str, vit: ViTConfig | None, meta: bool) -> nn.Module:
    """The network of encoder ``name`` (``vit`` for the ViTs), on the meta device if asked."""
    device = torch.device("meta") if meta else torch.device("cpu")
    with device:
        return VisionTransformer(vit) if vit is not None else _BUILDERS[name]()


def _mismatch(net: nn.Module, sd: dict[str, torch.Tensor]):
    """(missing, unexpected, wrong-shape) keys of ``sd`` for ``net``."""
    own = net.state_dict()
    ignored = tuple(getattr(net, "ignored_prefixes", ()))
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own and not k.startswith(ignored)]
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, bad


def guess_encoder(sd: dict[str, torch.Tensor], exclude: str | None = None) -> str | None:
    """The first named encoder (full size) whose keys and shapes ``sd`` matches, else None."""
    for name, spec in ENCODERS.items():
        if name == exclude or (spec.vit is None and name not in _BUILDERS):
            continue
        vit = spec.vit.fit_state_dict(sd) if spec.vit is not None else None
        if not any(_mismatch(_new_net(name, vit, meta=True), sd)):
            return name
    return None


def load_weights(
    net: nn.Module,
    sd: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    name: str | None = None,
) -> None:
    """Load ``sd`` into ``net`` (in place; strict but for the net's ``ignored_prefixes``).

    ``net`` may live on the meta device: its tensors are then replaced by the file's
    (``assign=True``), so a large encoder is never held twice. Tensors are cast to the
    net's dtype (fp16/bf16 checkpoints load as fp32).

    Raises:
        SparsemilError: one line naming ``path``, the first missing/unexpected keys or the
            first wrong shape, and the fix (another ``--encoder`` when the file fits one).
    """
    missing, unexpected, bad = _mismatch(net, sd)
    what = f"encoder {name}" if name else "this encoder"
    if missing or unexpected or bad:
        guess = guess_encoder(sd, exclude=name)
        if guess is not None:
            fix = f"the file fits encoder {guess}: set 'encoder' to {guess}"
        else:
            spec = ENCODERS.get(name or "")
            files = f" ({spec.weight_files})" if spec is not None and spec.weight_files else ""
            fix = (
                f"pass the weights published for {what}{files}, with "
                f"{getattr(net, 'key_hint', 'its original key names')}"
            )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise SparsemilError(f"weights {path}: keys do not match {what}: {'; '.join(parts)}; {fix}")
    own = net.state_dict()
    if bad:
        k = bad[0]
        raise SparsemilError(
            f"weights {path}: shape mismatch for {k}: file {tuple(sd[k].shape)}, "
            f"model {tuple(own[k].shape)} ({len(bad)} tensors differ); {fix}"
        )
    new = {}
    for k, v in own.items():
        if k in sd:
            new[k] = sd[k].to(dtype=v.dtype, device="cpu")
        else:  # num_batches_tracked: unused in eval mode
            new[k] = torch.zeros((), dtype=v.dtype) if v.is_meta else v
    net.load_state_dict(new, strict=True, assign=True)
    left = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left:  # a tensor outside the state_dict (non-persistent buffer) was not loaded
        raise RuntimeError(f"encoder tensors left on the meta device: {left[:3]}")


def build_backbone(
    name: str = "resnet50_trunc",
    weights: str | os.PathLike[str] | None = None,
    input_size: int | None = None,
    seed: int = 0,
    warn: bool = True,
    config: ViTConfig | None = None,
) -> Backbone:
    """Build a patch encoder (eval mode, CPU, fp32; see :meth:`Backbone.prepare`).

    Args:
        name: one of :data:`ENCODERS`.
        weights: optional weights file (see module doc).
        input_size: resize patches to this side instead of the encoder's published resize
            and crop (None = the published transform).
        seed: seed of the random initialisation used when there are no weights.
        warn: print the random-init warning to stderr.
        config: a ViT configuration replacing the named one's (e.g. a reduced one in
            tests); the position-embedding grid is still read off the weights.
    """
    spec = encoder_spec(name)
    if config is not None and spec.vit is None:
        raise SparsemilError(f"encoder {name}: not a ViT, so a ViT config does not apply")
    preprocess = spec.preprocess.with_input_size(input_size)
    wpath = Path(weights) if weights is not None else None
    if wpath is not None and not wpath.is_file():
        raise SparsemilError(f"weights {wpath}: no such file")
    if name == "torchscript" and wpath is None:
        raise SparsemilError("encoder torchscript needs 'weights' PATH to a TorchScript file")
    if wpath is not None and (name == "torchscript" or is_torchscript(wpath)):
        try:
            net = torch.jit.load(str(wpath), map_location="cpu")
        except Exception as err:
            msg = " ".join(str(err).split())[:200]
            raise SparsemilError(
                f"weights {wpath}: not a loadable TorchScript file ({msg})"
            ) from None
        enc = PatchEncoder(net, preprocess).eval()
        return Backbone(enc, "torchscript", None, True, str(wpath), _sha256(wpath), "")
    vit = config or spec.vit
    warning = ""
    if wpath is not None:
        sd = read_state_dict(wpath)
        if vit is not None:
            vit = vit.fit_state_dict(sd)
        net = _new_net(name, vit, meta=True)
        load_weights(net, sd, wpath, name)
        sha = _sha256(wpath)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _new_net(name, vit, meta=False)
        sha = ""
        warning = RANDOM_INIT_WARNING + f" (encoder {name}, init seed {seed})"
        if warn:
            bar = "!" * 78
            files = spec.weight_files or "the encoder's published weights"
            print(
                f"{bar}\nsparsemil: WARNING: {warning}.\n"
                f"sparsemil: WARNING: pass 'weights' PATH ({files}) for real features.\n{bar}",
                file=sys.stderr,
            )
    enc = PatchEncoder(net.eval(), preprocess).eval()
    return Backbone(
        encoder=enc,
        name=name,
        feature_dim=int(net.feature_dim),
        pretrained=wpath is not None,
        weights=str(wpath) if wpath is not None else "none",
        weights_sha256=sha,
        warning=warning,
    )
