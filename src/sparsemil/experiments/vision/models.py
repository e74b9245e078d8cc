"""The pruning model zoo in plain torch (no torchvision), following the official code.

``build_model(name, in_shape, num_classes, widths=None, init="kaiming_normal", seed=0)``

=========  ===============================================================================
name       architecture (``in`` = prod(in_shape))
=========  ===============================================================================
fc / fc5   in -> 1000 -> 600 -> 300 -> 100 -> classes, ReLU
fc12       in -> 1000 -> 900 -> 800 -> 750 -> 700 -> 650 -> 600 -> 500 -> 400 -> 200 -> 100
           -> classes, ReLU
fc2        in -> 100 -> classes
mlp        in -> widths[0] -> ... -> widths[-1] -> classes, ReLU (``widths`` required)
lenet      conv5(16) relu pool2, conv5(32) relu pool2, 120, 84, classes
alexnet    the official CIFAR variant: nearest upsampling x7 (32 -> 224) inside ``forward``,
           conv11/4(96) pool, conv5(256) pool, conv3(384), conv3(384), conv3(256) pool,
           4096, 4096, classes
vgg16      VGG16 with BatchNorm, one Linear(512 -> classes) head
resnet18   CIFAR-style ResNet (3x3 stem, no stem pooling), BasicBlock [2, 2, 2, 2]
resnet50   CIFAR-style ResNet, BottleNeck [3, 4, 6, 3]
=========  ===============================================================================

Every model maps ``x (B, *in_shape)`` to logits ``(B, num_classes)`` (never squeezed). Weights of
``Conv2d`` and ``Linear`` layers are initialised with ``kaiming_normal_`` (``a=0, mode="fan_in",
nonlinearity="leaky_relu"``, as the official configs' ``init: kaiming_normal``) from a seeded
``torch.Generator``, biases with zeros, BatchNorm with weight 1 / bias 0. Sizes of the first
fully-connected layer after convolutions are inferred with a dummy forward pass, so e.g. LeNet
works on 28x28 and 32x32 inputs alike.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from sparsemil.errors import SparsemilError
from sparsemil.io import read_safetensors_meta
from sparsemil.prune.export import CHECKPOINT_KEY, SPARSE_KEY, load_sparse

MODELS = ("fc", "fc12", "fc2", "mlp", "lenet", "alexnet", "vgg16", "resnet18", "resnet50")
_ALIASES = {"fc5": "fc", "vgg": "vgg16"}
FC5_WIDTHS = (1000, 600, 300, 100)
FC12_WIDTHS = (1000, 900, 800, 750, 700, 650, 600, 500, 400, 200, 100)
FC2_WIDTHS = (100,)
INITS = ("kaiming_normal", "kaiming_uniform")


def canonical_model_name(name: str) -> str:
    """Lower-case, alias-resolved model name; unknown names raise with a suggestion."""
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in MODELS:
        near = difflib.get_close_matches(key, MODELS + tuple(_ALIASES), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise SparsemilError(
            f"model: unknown name {name!r}{hint}; choose one of {', '.join(MODELS)}"
        )
    return key


class MLP(nn.Module):
    """Fully-connected ReLU network; ``x (B, *in_shape) -> logits (B, num_classes)``.

    Layers live in ``self.linear`` (an ``nn.Sequential``) as in the official FC models.
    """

    def __init__(self, in_features: int, widths: Sequence[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_features
        for w in widths:
            layers += [nn.Linear(prev, int(w)), nn.ReLU()]
            prev = int(w)
        layers.append(nn.Linear(prev, num_classes))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class ConvNet(nn.Module):
    """A conv feature extractor ``self.conv`` followed by a classifier ``self.linear``.

    ``upsample`` > 1 applies nearest-neighbour interpolation by that factor first (the official
    AlexNet-on-CIFAR does ``F.interpolate(images, scale_factor=7)``).
    """

    def __init__(
        self,
        conv: nn.Sequential,
        hidden: Sequence[int],
        in_shape: tuple[int, ...],
        num_classes: int,
        upsample: int = 1,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.upsample = int(upsample)
        flat = _flat_size(self._features, in_shape)
        layers: list[nn.Module] = []
        prev = flat
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        layers.append(nn.Linear(prev, num_classes))
        self.linear = nn.Sequential(*layers)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample)
        return self.conv(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self._features(x))


def _flat_size(features, in_shape: tuple[int, ...]) -> int:
    try:
        with torch.no_grad():
            return int(features(torch.zeros(1, *in_shape)).shape[1])
    except (RuntimeError, ValueError) as err:  # ValueError: BatchNorm on a 1x1 map
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SparsemilError(
            f"model: input shape {tuple(in_shape)} is too small for this architecture ({first}); "
            "for 28x28 images set config key image_size: 32"
        ) from None


def _lenet(in_shape: tuple[int, ...], num_classes: int) -> ConvNet:
    c = in_shape[0]
    conv = nn.Sequential(
        nn.Conv2d(c, 16, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2, 2),
    )  # fmt: skip
    return ConvNet(conv, [120, 84], in_shape, num_classes)


def _alexnet(in_shape: tuple[int, ...], num_classes: int) -> ConvNet:
    c = in_shape[0]
    conv = nn.Sequential(
        nn.Conv2d(c, 96, kernel_size=11, stride=4, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )  # fmt: skip
    return ConvNet(conv, [4096, 4096], in_shape, num_classes, upsample=7)


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _vgg16(in_shape: tuple[int, ...], num_classes: int) -> ConvNet:
    layers: list[nn.Module] = []
    prev = in_shape[0]
    for v in _VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(prev, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU()]
            prev = int(v)
    return ConvNet(nn.Sequential(*layers), [], in_shape, num_classes)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs); ``x (B, C_in, H, W) -> (B, C_out, H/s, W/s)``."""

    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        out = ch * self.expansion
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_ch, ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(ch),
            nn.ReLU(),
            nn.Conv2d(ch, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
        )  # fmt: skip
        self.shortcut = _shortcut(in_ch, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x))


class BottleNeck(nn.Module):
    """ResNet bottleneck block (1x1, 3x3, 1x1; expansion 4)."""

    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int = 1) -> None:
        super().__init__()
        out = ch * self.expansion
        self.residual_function = nn.Sequential(
            nn.Conv2d(in_ch, ch, 1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),
            nn.Conv2d(ch, ch, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(ch),
            nn.ReLU(),
            nn.Conv2d(ch, out, 1, bias=False), nn.BatchNorm2d(out),
        )  # fmt: skip
        self.shortcut = _shortcut(in_ch, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual_function(x) + self.shortcut(x))


def _shortcut(in_ch: int, out: int, stride: int) -> nn.Sequential:
    if stride == 1 and in_ch == out:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_ch, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))


class ResNet(nn.Module):
    """CIFAR-style ResNet; ``x (B, C, H, W) -> logits (B, num_classes)``."""

    def __init__(self, block, num_blocks: Sequence[int], in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        self._in = 64
        stages = []
        for i, (ch, n) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            blocks = []
            for s in strides:
                blocks.append(block(self._in, ch, s))
                self._in = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.conv2_x, self.conv3_x, self.conv4_x, self.conv5_x = stages
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.conv5_x(self.conv4_x(self.conv3_x(self.conv2_x(x))))
        return self.fc(self.avg_pool(x).flatten(1))


def initialize_weights(
    model: nn.Module, init: str = "kaiming_normal", seed: int | None = 0
) -> None:
    """Official initialisation: kaiming (fan_in, leaky_relu, a=0) weights, zero biases, BN=1/0."""
    if init not in INITS:
        raise SparsemilError(f"init: must be one of {', '.join(INITS)}, got {init!r}")
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    fn = nn.init.kaiming_normal_ if init == "kaiming_normal" else nn.init.kaiming_uniform_
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fn(m.weight, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=gen)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.fill_(1.0)
                m.bias.zero_()


def build_model(
    name: str,
    in_shape: Sequence[int],
    num_classes: int,
    widths: Sequence[int] | None = None,
    init: str = "kaiming_normal",
    seed: int | None = 0,
) -> nn.Module:
    """Build and initialise a model of the zoo (see the module docstring).

    Args:
        name: model name (case-insensitive), one of :data:`MODELS` (``fc5`` = ``fc``).
        in_shape: per-sample input shape, e.g. ``(1, 28, 28)`` or ``(64,)``.
        num_classes: number of output logits.
        widths: hidden widths for ``mlp`` (required there; overrides FC widths if given for
            ``fc``/``fc12``/``fc2``).
        init: ``kaiming_normal`` (official default) or ``kaiming_uniform``.
        seed: seed of the initialisation generator (``None``: torch's global RNG).
    """
    key = canonical_model_name(name)
    in_shape = tuple(int(s) for s in in_shape)
    if not in_shape or any(s < 1 for s in in_shape):
        raise SparsemilError(f"model: invalid input shape {in_shape}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise SparsemilError(f"model: num_classes must be an integer >= 2, got {num_classes!r}")
    in_features = math.prod(in_shape)
    if key in ("fc", "fc12", "fc2", "mlp"):
        default = {"fc": FC5_WIDTHS, "fc12": FC12_WIDTHS, "fc2": FC2_WIDTHS, "mlp": None}[key]
        ws = widths if widths is not None else default
        if ws is None:
            raise SparsemilError("widths: the 'mlp' model needs widths, e.g. widths: [256, 128]")
        if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in ws):
            raise SparsemilError(f"widths: must be positive integers, got {list(ws)}")
        model: nn.Module = MLP(in_features, ws, num_classes)
    else:
        if len(in_shape) != 3:
            raise SparsemilError(
                f"model {key!r}: needs image input (C, H, W), got shape {in_shape}"
            )
        if key == "lenet":
            model = _lenet(in_shape, num_classes)
        elif key == "alexnet":
            model = _alexnet(in_shape, num_classes)
        elif key == "vgg16":
            model = _vgg16(in_shape, num_classes)
        elif key == "resnet18":
            model = ResNet(BasicBlock, [2, 2, 2, 2], in_shape[0], num_classes)
        else:
            model = ResNet(BottleNeck, [3, 4, 6, 3], in_shape[0], num_classes)
    initialize_weights(model, init=init, seed=seed)
    return model


def check_finite_weights(model: nn.Module, where: str) -> None:
    """Raise when a parameter or buffer of ``model`` holds NaN/Inf (one line naming it)."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise SparsemilError(
                f"{where}: {name!r} has NaN/Inf entries; a non-finite model cannot be pruned "
                "or analysed (retrain with a lower config key 'lr')"
            )


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint written by :func:`save_checkpoint`.

    Returns ``(model in eval mode, meta)``; a sparse export (:func:`save_sparse` with ``meta``) is
    read as well.

    Raises:
        SparsemilError: not a sparsemil checkpoint, weights that do not match the model, or
            NaN/Inf weights (a diverged training: nothing downstream may use it).
    """
    path = Path(path)
    meta = read_safetensors_meta(path, CHECKPOINT_KEY)  # missing / unreadable: its own error
    if meta is None:
        raise SparsemilError(
            f"checkpoint {path}: not a sparsemil prune checkpoint; create one "
            f"with 'sparsemil prune train'"
        )
    model = build_model(
        meta["model"],
        meta["in_shape"],
        int(meta["num_classes"]),
        widths=meta.get("widths"),
        init=meta.get("init", "kaiming_normal"),
    )
    with safe_open(str(path), framework="pt") as fh:
        is_sparse = SPARSE_KEY in (fh.metadata() or {})
    if is_sparse:
        load_sparse(path, model)
    else:
        from safetensors.torch import load_file

        state = load_file(str(path))
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise SparsemilError(
                f"checkpoint {path}: weights do not match the model ({err})"
            ) from None
    check_finite_weights(model, f"checkpoint {path}")
    return model.to(device).eval(), meta
