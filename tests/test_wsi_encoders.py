"""Patch encoders against the timm/torchvision reference cases (../shared/reference/encoders).

Each case holds random weights under timm/torchvision key names, normalised input batches
and the reference outputs. The encoder is built by name, with the case's reduced width and
depth, and loaded from a weights file through the same path ``--weights`` takes.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsemil.cli.main import main
from sparsemil.errors import SparsemilError
from sparsemil.wsi.backbones import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    _new_net,
    build_backbone,
    resolve_precision,
)
from torch_helpers import no_onednn

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REF = "reference/encoders"
CASE_ENCODER = {
    "resnet50_trunc": "resnet50_trunc",
    "uni_like": "uni",
    "uni2h_like": "uni2h",
    "gigapath_like": "gigapath",
    "virchow_like": "virchow",
}
# timm's defaults for what a case's kwargs leave out: the builders' patch size and mlp_ratio
_TIMM_DEFAULTS = {
    "vit_large_patch16_224": {"patch_size": 16, "mlp_ratio": 4.0},
    "vit_huge_patch14_224": {"patch_size": 14, "mlp_ratio": 4.0},
    "vit_giant_patch14_224": {"patch_size": 14, "mlp_ratio": 48 / 11},
    "vit_giant_patch14_dinov2": {"patch_size": 14, "mlp_ratio": 2.66667 * 2},
}
_DINOV2_GIANT = "vit_giant_patch14_dinov2"  # LayerScale and packed SwiGLU by default


def _case_meta(case: str, shared_dir: Path) -> dict:
    """The case's entry of ``cases.json`` (builder, kwargs, output, sizes, shape)."""
    return json.loads((shared_dir / REF / "cases.json").read_text())["cases"][case]


def _case_tensors(shared_dir: Path, case: str) -> dict[str, torch.Tensor]:
    return load_file(str(shared_dir / REF / f"{case}.safetensors"))


def _weights_file(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    """The case's ``state.<key>`` tensors saved under their original names, as published."""
    sd = {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}
    save_file(sd, str(path))
    return path


def _case_config(name: str, case: dict):
    """The named encoder's full-size ViTConfig with the case's width, depth and heads.

    The layout switches are the named encoder's own: they are checked against the case's
    timm builder and kwargs, so the case tests the layout ``--encoder name`` builds.
    """
    kw = case["kwargs"]
    builder = case["builder"].split("'")[1]
    defaults = _TIMM_DEFAULTS[builder]
    full = ENCODERS[name].vit
    swiglu = "SwiGLUPacked" in kw.get("mlp_layer", "") or builder == _DINOV2_GIANT
    assert full.mlp == ("swiglu" if swiglu else "gelu")
    assert full.layer_scale == ("init_values" in kw or builder == _DINOV2_GIANT)
    assert full.patch_size == kw.get("patch_size", defaults["patch_size"])
    assert full.reg_tokens == kw.get("reg_tokens", 0)
    assert full.class_pos_embed == (not kw.get("no_embed_class", False))
    assert full.pool == ("cls_mean" if case["output"] == "cls+mean_patch" else "cls")
    assert full.img_size == kw["img_size"] == 224
    dim = kw["embed_dim"]
    hidden = int(dim * kw.get("mlp_ratio", defaults["mlp_ratio"]))
    return replace(
        full, embed_dim=dim, depth=kw["depth"], num_heads=kw["num_heads"], mlp_hidden=hidden
    )


@pytest.mark.parametrize("case", list(CASE_ENCODER))
def test_reference_case(case, shared_dir, tmp_path, capsys):
    name = CASE_ENCODER[case]
    spec = _case_meta(case, shared_dir)
    t = _case_tensors(shared_dir, case)
    config = _case_config(name, spec) if ENCODERS[name].vit is not None else None
    weights = _weights_file(t, tmp_path / f"{case}.safetensors")
    bb = build_backbone(name, weights, config=config)
    assert bb.pretrained and bb.warning == "" and "WARNING" not in capsys.readouterr().err
    net = bb.encoder.net
    assert not net.training
    sizes = spec.get("input_sizes", [224])
    for s in sizes:
        x, want = t[f"input_{s}"], t[f"expected_{s}"]
        with torch.inference_mode(), no_onednn():
            got = net(x)  # inputs are already normalised: the network alone
        assert tuple(got.shape) == tuple(spec["expected_shape"]) == tuple(want.shape)
        err = (got - want).abs().max().item()
        tol = 1e-4 * max(1.0, want.abs().max().item())
        assert err <= tol, f"{case} at {s}px: max |out - expected| = {err:.3g} > {tol:.3g}"
    assert bb.feature_dim == spec["expected_shape"][1]


def test_full_size_architectures():
    """Full sizes: parameter count of each layout and its output width (the model cards
    give UNI 0.3B / ViT-L, UNI2-h ~681M, Prov-GigaPath ~1.1B, Virchow 632M)."""
    published = {
        "uni": (303_350_784, 1024),
        "uni2h": (681_394_176, 1536),
        "gigapath": (1_134_953_984, 1536),
        "virchow": (631_229_184, 2560),
    }
    for name, (params, dim) in published.items():
        net = _new_net(name, ENCODERS[name].vit, meta=True)
        assert sum(p.numel() for p in net.parameters()) == params, name
        assert net.feature_dim == dim, name
    assert not any(
        k.startswith("reg_token") for k in _new_net("uni", ENCODERS["uni"].vit, True).state_dict()
    )
    uni2h = _new_net("uni2h", ENCODERS["uni2h"].vit, meta=True).state_dict()
    assert uni2h["reg_token"].shape == (1, 8, 1536) and uni2h["pos_embed"].shape == (1, 256, 1536)


def test_wrong_keys_are_a_one_line_error(shared_dir, tmp_path):
    t = _case_tensors(shared_dir, "uni_like")
    cfg = _case_config("uni", _case_meta("uni_like", shared_dir))
    sd = {k[len("state.") :]: v for k, v in t.items() if k.startswith("state.")}
    sd["blocks.0.ls1.scale"] = sd.pop("blocks.0.ls1.gamma")
    sd["head.weight"] = torch.zeros(3, 96)  # a classifier head is ignored
    p = tmp_path / "renamed.safetensors"
    save_file(sd, str(p))
    with pytest.raises(SparsemilError, match="keys do not match encoder uni") as info:
        build_backbone("uni", p, config=cfg)
    msg = str(info.value)
    assert "\n" not in msg and str(p) in msg
    assert "1 missing (e.g. blocks.0.ls1.gamma)" in msg
    assert "1 unexpected (e.g. blocks.0.ls1.scale)" in msg
    assert "pytorch_model.bin from huggingface.co/MahmoodLab/UNI)" in msg  # the fix
    # a uni2h-like file given to uni: its register tokens are unexpected
    other = _weights_file(_case_tensors(shared_dir, "uni2h_like"), tmp_path / "u2.safetensors")
    with pytest.raises(SparsemilError, match=r"uni: 1 unexpected \(e.g. reg_token\)"):
        build_backbone("uni", other, config=cfg)
    # same keys, other shapes: a virchow-like (patch 14) file given to gigapath (patch 16)
    other = _weights_file(_case_tensors(shared_dir, "virchow_like"), tmp_path / "v.safetensors")
    gcfg = _case_config("gigapath", _case_meta("gigapath_like", shared_dir))
    with pytest.raises(
        SparsemilError,
        match=r"shape mismatch for patch_embed.proj.weight: file \(96, 3, 14, 14\), "
        r"model \(96, 3, 16, 16\)",
    ):
        build_backbone("gigapath", other, config=gcfg)
    # a file that fits another named encoder says so
    tiny = tmp_path / "tiny.pt"
    torch.save(build_backbone("tiny", warn=False).encoder.net.state_dict(), tiny)
    with pytest.raises(SparsemilError, match="the file fits encoder tiny: set 'encoder' to tiny"):
        build_backbone("resnet50_trunc", tiny)


def test_pt_state_dict_loads_weights_only(shared_dir, tmp_path):
    t = _case_tensors(shared_dir, "virchow_like")
    cfg = _case_config("virchow", _case_meta("virchow_like", shared_dir))
    sd = {k[len("state.") :]: v for k, v in t.items() if k.startswith("state.")}
    pt = tmp_path / "pytorch_model.bin"
    torch.save(sd, pt)  # what the authors publish: a plain state_dict
    bb = build_backbone("virchow", pt, config=cfg)
    assert bb.weights_sha256 and bb.attrs()["weights_sha256"] == bb.weights_sha256
    with torch.inference_mode():
        got = bb.encoder.net(t["input_252"])
    torch.testing.assert_close(got, t["expected_252"], atol=1e-4, rtol=0)
    # an fp16 checkpoint loads into fp32 tensors
    half = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in sd.items()}, half)
    net = build_backbone("virchow", half, config=cfg).encoder.net
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert not any(p.is_meta for p in net.parameters())


def test_unknown_encoder_suggests_the_nearest(shared_dir, tmp_path, capsys):
    with pytest.raises(SparsemilError, match="encoder 'uni2': unknown; did you mean 'uni2h'"):
        build_backbone("uni2")
    with pytest.raises(SparsemilError, match="choose one of resnet50_trunc, uni, uni2h"):
        build_backbone("vit_giant")
    slide = shared_dir / "data" / "wsi" / "CMU-1-Small-Region.svs"
    rc = main(["wsi", "extract", "--slide", str(slide), "--out", str(tmp_path), "--encoder",
               "virchov"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "did you mean 'virchow'" in err and "--encoder" in err


def _small(name: str):
    """The named layout at width 32, depth 1 (fast random init)."""
    full = ENCODERS[name].vit
    return replace(full, embed_dim=32, depth=1, num_heads=2, mlp_hidden=64)


def test_published_preprocessing():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=g)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    unit = x.float() / 255
    # Prov-GigaPath: Resize(256, bicubic) is a no-op on 256 px, CenterCrop(224) keeps 16..240
    enc = build_backbone("gigapath", warn=False, config=_small("gigapath")).encoder
    torch.testing.assert_close(enc.preprocess(x), (unit[..., 16:240, 16:240] - mean) / std)
    # UNI: Resize(224) bilinear (antialiased), no crop
    enc = build_backbone("uni", warn=False, config=_small("uni")).encoder
    want = torch.nn.functional.interpolate(unit, size=(224, 224), mode="bilinear", antialias=True)
    torch.testing.assert_close(enc.preprocess(x), (want - mean) / std)
    # Virchow / UNI2-h: 224 px (bicubic / bilinear)
    for name in ("virchow", "uni2h"):
        bb = build_backbone(name, warn=False, config=_small(name))
        assert tuple(bb.encoder.preprocess(x).shape) == (2, 3, 224, 224)
        with torch.inference_mode():
            assert bb.encoder(x).shape == (2, bb.feature_dim)
    spec = {n: json.loads(ENCODERS[n].preprocess.describe()) for n in ENCODERS}
    assert spec["virchow"]["interpolation"] == "bicubic" and spec["virchow"]["center_crop"] == 224
    assert spec["uni2h"]["center_crop"] == 224 and spec["uni"]["resize"] == 224
    assert spec["resnet50_trunc"]["resize"] is None
    assert all(spec[n]["mean"] == list(IMAGENET_MEAN) for n in ENCODERS)
    # input_size replaces resize and crop; the network resamples its position embedding
    bb = build_backbone("gigapath", warn=False, config=_small("gigapath"), input_size=256)
    assert tuple(bb.encoder.preprocess(x).shape[-2:]) == (256, 256)
    with torch.inference_mode():
        assert torch.isfinite(bb.encoder(x)).all()


def test_precision_and_attrs(shared_dir, tmp_path):
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(SparsemilError, match="precision 'fp16' needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(SparsemilError, match="choose one of auto, fp32, fp16, bf16"):
        resolve_precision("half", "cpu")
    t = _case_tensors(shared_dir, "uni2h_like")
    cfg = _case_config("uni2h", _case_meta("uni2h_like", shared_dir))
    w = _weights_file(t, tmp_path / "pytorch_model.safetensors")
    bb = build_backbone("uni2h", w, config=cfg)
    x = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    with torch.inference_mode():
        ref = bb.encoder(x)
        bb.prepare("cpu", "bf16")
        low = bb.encoder(x)
    assert low.dtype == torch.float32
    assert (low - ref).abs().max() <= 0.1 * ref.abs().max()
    a = bb.attrs()
    assert a["encoder"] == a["backbone"] == "uni2h" and a["precision"] == "bf16"
    assert len(a["weights_sha256"]) == 64 and a["pretrained"] is True
    assert json.loads(a["preprocessing"])["center_crop"] == 224


def test_extract_records_the_encoder(shared_dir, tmp_path, capsys):
    slide = shared_dir / "data" / "wsi" / "CMU-1-Small-Region.svs"
    out = tmp_path / "o"
    rc = main(["wsi", "extract", "--slide", str(slide), "--out", str(out), "--encoder", "tiny",
               "--precision", "fp32", "--max-patches", "2", "--workers", "0", "--no-progress",
               "--device", "cpu"])  # fmt: skip
    capsys.readouterr()
    assert rc == 0
    with h5py.File(out / "CMU-1-Small-Region.h5") as f:
        fa = dict(f["features"].attrs)
        assert f["features"].shape == (2, 64)
        assert f.attrs["encoder"] == "tiny" and f.attrs["precision"] == "fp32"
    assert fa["encoder"] == fa["backbone"] == "tiny" and int(fa["input_size"]) == 256
    assert json.loads(fa["preprocessing"]) == json.loads(ENCODERS["tiny"].preprocess.describe())
    rc = main(["wsi", "extract", "--slide", str(slide), "--out", str(tmp_path / "p"),
               "--encoder", "tiny", "--precision", "fp16", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "precision 'fp16' needs a GPU" in err and "--precision" in err
