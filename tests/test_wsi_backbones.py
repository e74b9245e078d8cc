"""Patch encoders: architecture, weight loading (state_dict / safetensors / TorchScript)."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch

from sparsemil.errors import SparsemilError
from sparsemil.wsi.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ResNet50Trunc,
    build_backbone,
    is_torchscript,
)
from torch_helpers import no_onednn

# torchvision's resnet50 has 25,557,032 parameters, of which layer4 holds 14,964,736
# and fc 2,049,000: the truncated network keeps the other 8,543,296.
RESNET50_TRUNC_PARAMS = 25_557_032 - 14_964_736 - 2_049_000


def test_resnet50_trunc_architecture():
    net = ResNet50Trunc()
    assert sum(p.numel() for p in net.parameters()) == RESNET50_TRUNC_PARAMS
    keys = set(net.state_dict())
    assert "layer3.5.bn3.running_var" in keys and "layer3.0.downsample.1.weight" in keys
    assert "layer2.0.conv2.weight" in keys and not any(k.startswith("layer4") for k in keys)
    # stride 16 at layer3: a 64x64 input gives a 4x4 map of 1024 channels, pooled
    with torch.inference_mode(), no_onednn():
        y = net.eval()(torch.zeros(2, 3, 64, 64))
    assert y.shape == (2, 1024)


def _imagenet_like_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """A torchvision-style full resnet50 state_dict: trunk + random layer4/fc tensors.

    Values are scaled like a trained network (He-scaled convs, BN near identity) so that
    activations stay finite through 13 bottlenecks.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in ResNet50Trunc().state_dict().items():
        r = torch.randn(v.shape, generator=g)
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif v.dim() == 4:  # conv
            sd[k] = r * (1.0 / v[0].numel()) ** 0.5
        elif k.endswith("running_var"):
            sd[k] = 1.0 + 0.1 * r.abs()
        elif k.endswith("bn3.weight"):
            sd[k] = 0.2 + 0.05 * r  # small residual branch, as trained ResNets have
        elif k.endswith("weight"):
            sd[k] = 1.0 + 0.1 * r
        else:  # bias, running_mean
            sd[k] = 0.1 * r
    sd["layer4.0.conv1.weight"] = torch.randn(512, 1024, 1, 1, generator=g)
    sd["fc.weight"] = torch.randn(1000, 2048, generator=g)
    sd["fc.bias"] = torch.zeros(1000)
    return sd


def test_torchvision_state_dict_loads_and_normalises(tmp_path, capsys):
    sd = _imagenet_like_state_dict()
    pt = tmp_path / "resnet50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, pt)
    bb = build_backbone("resnet50_trunc", pt)
    assert bb.pretrained and bb.weights_sha256 and bb.warning == ""
    assert "WARNING" not in capsys.readouterr().err
    for k, v in bb.encoder.net.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k].float()), k
    # independent forward: normalise by hand and run a plain ResNet50Trunc with the weights
    ref = ResNet50Trunc()
    ref.load_state_dict({k: sd[k] for k in ref.state_dict()})
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.inference_mode(), no_onednn():
        want = ref.eval()((x.float() / 255 - mean) / std)
        got = bb.encoder(x)
    assert torch.isfinite(want).all() and want.abs().max() > 0
    torch.testing.assert_close(got, want)
    # the same tensors as safetensors give the same encoder
    from safetensors.torch import save_file

    st = tmp_path / "resnet50.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    with torch.inference_mode(), no_onednn():
        got2 = build_backbone("resnet50_trunc", st).encoder(x)
    torch.testing.assert_close(got2, want)


def test_bad_weights_are_refused(tmp_path):
    sd = _imagenet_like_state_dict()
    del sd["layer3.5.conv3.weight"]
    p = tmp_path / "missing.pt"
    torch.save(sd, p)
    with pytest.raises(SparsemilError, match="1 missing"):
        build_backbone("resnet50_trunc", p)
    sd = _imagenet_like_state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, p)
    with pytest.raises(SparsemilError, match="shape mismatch for conv1.weight"):
        build_backbone("resnet50_trunc", p)
    pickled = tmp_path / "pickled.pt"
    torch.save({"when": datetime.datetime(2020, 1, 1)}, pickled)  # not weights-only loadable
    with pytest.raises(SparsemilError, match="weights_only=True"):
        build_backbone("resnet50_trunc", pickled)
    with pytest.raises(SparsemilError, match="no such file"):
        build_backbone("tiny", tmp_path / "absent.pt")
    with pytest.raises(SparsemilError, match="choose one of"):
        build_backbone("vit_giant")


def test_random_init_is_loud_and_deterministic(capsys):
    a = build_backbone("tiny")
    err = capsys.readouterr().err
    assert "WARNING" in err and "RANDOMLY INITIALISED" in err and "pipeline checks only" in err
    assert not a.pretrained and a.attrs()["pretrained"] is False and a.attrs()["warning"]
    b = build_backbone("tiny", warn=False)
    assert capsys.readouterr().err == ""
    x = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    state = torch.random.get_rng_state()
    with torch.inference_mode():
        assert torch.equal(a.encoder(x), b.encoder(x))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert a.feature_dim == 64


def test_torchscript_backbone(tmp_path):
    tiny = build_backbone("tiny", warn=False)
    scripted = torch.jit.script(tiny.encoder.net)
    p = tmp_path / "enc.pt"
    scripted.save(str(p))
    assert is_torchscript(p) and not is_torchscript(tmp_path)
    # recognised by content even with --backbone resnet50_trunc
    bb = build_backbone("resnet50_trunc", p)
    assert bb.name == "torchscript" and bb.pretrained
    x = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    with torch.inference_mode():
        np.testing.assert_allclose(bb.encoder(x).numpy(), tiny.encoder(x).numpy(), rtol=1e-5)
    with pytest.raises(SparsemilError, match="needs .weights. PATH"):
        build_backbone("torchscript")


def test_input_size_resizes():
    bb = build_backbone("tiny", warn=False, input_size=32)
    x = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    seen = {}
    hook = bb.encoder.net.conv1.register_forward_hook(lambda m, i, o: seen.update(s=i[0].shape))
    with torch.inference_mode():
        bb.encoder(x)
    hook.remove()
    assert tuple(seen["s"]) == (1, 3, 32, 32)
