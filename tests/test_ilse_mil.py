"""Ilse et al. (2018) attention / gated-attention MIL: torchmil's ABMIL with the paper's
embedding network, the protocol runner and its table (issue 16, section 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparsemil.data.mil_benchmarks import (
    CLASSIC_BENCHMARKS,
    load_classic_benchmark,
    mil_mat_path,
    read_prtools_mil_mat,
)
from sparsemil.errors import SparsemilError
from sparsemil.experiments.ilse_benchmark import (
    ENTRIES,
    ILSE_ATT_DIM,
    PUBLISHED,
    Protocol,
    collect,
    run_ilse_benchmark,
)
from sparsemil.mil.factory import build_mil_model
from sparsemil.mil.registry import spec_of

C = 166  # Musk features


def _ilse(name: str, in_dim: int = C, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    e = ENTRIES[name]
    return build_mil_model(e.model, in_dim, 2, **e.model_kwargs).eval()


def test_forward_follows_the_torchmil_contract():
    model = _ilse("ilse_attention")
    assert spec_of(model).name == "abmil"  # the registry's torchmil ABMIL, not a copy
    x = torch.randn(3, 7, C)
    mask = torch.ones(3, 7)
    out = model(x, mask)
    assert out.shape == (3,)
    out2, att = model(x, mask, return_att=True)
    assert att.shape == (3, 7)
    torch.testing.assert_close(out, out2)
    y_pred, losses = model.compute_loss(torch.tensor([0, 1, 1]), x, mask)
    assert list(losses) == ["BCEWithLogitsLoss"] and losses["BCEWithLogitsLoss"].ndim == 0
    torch.testing.assert_close(y_pred, out)
    pred, inst = model.predict(x, mask)
    assert pred.shape == (3,) and inst.shape == (3, 7)


@pytest.mark.parametrize("name", ["ilse_attention", "ilse_gated"])
def test_the_embedding_network_sits_in_front_of_the_pooling(name):
    """fc-256 + ReLU -> fc-128 + ReLU, then attention (width 128) on the 128-d embeddings,
    then fc-1: layers and parameter count as in the paper's architecture."""
    model = _ilse(name)
    lin = [m for m in model.feat_ext if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(C, 256), (256, 128)]
    kinds = [type(m).__name__ for m in model.feat_ext]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout"]
    assert all(m.p == 0 for m in model.feat_ext if isinstance(m, torch.nn.Dropout))
    fc1, head_fc = model.pool.fc1.module, model.classifier.module  # torchmil's LazyLinear
    assert (fc1.in_features, fc1.out_features) == (128, ILSE_ATT_DIM)
    assert (head_fc.in_features, head_fc.out_features) == (128, 1)
    embed = (C * 256 + 256) + (256 * 128 + 128)
    attention = (128 * ILSE_ATT_DIM + ILSE_ATT_DIM) + ILSE_ATT_DIM  # V (+ bias), w (no bias)
    gate = (128 * ILSE_ATT_DIM + ILSE_ATT_DIM) if name == "ilse_gated" else 0  # U
    head = 128 + 1
    assert sum(p.numel() for p in model.parameters()) == embed + attention + gate + head
    # the attention sees the embeddings, not the raw features
    x = torch.randn(1, 5, C)
    seen = {}
    model.pool.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
    model(x)
    torch.testing.assert_close(seen["x"], model.feat_ext(x))


def test_gated_and_plain_attention_differ():
    plain, gated = _ilse("ilse_attention"), _ilse("ilse_gated")
    assert not plain.pool.gated and gated.pool.gated and not hasattr(plain.pool, "fc_gated")
    # same weights everywhere they share: only the gate changes the output
    gated.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 6, C)
    _, a_plain = plain(x, return_att=True)
    _, a_gated = gated(x, return_att=True)
    assert not torch.allclose(a_plain, a_gated)


@pytest.mark.parametrize("name", ["ilse_attention", "ilse_gated"])
def test_a_padded_bag_gives_the_unpadded_output(name):
    model = _ilse(name)
    x = torch.randn(1, 5, C)
    padded = torch.cat([x, 100 * torch.randn(1, 3, C)], dim=1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.float32)
    out, att = model(x, return_att=True)
    out_p, att_p = model(padded, mask, return_att=True)
    torch.testing.assert_close(out_p, out)
    torch.testing.assert_close(att_p[:, :5], att)
    # and in a batch with a longer bag
    other = torch.randn(1, 8, C)
    both = model(torch.cat([padded, other]), torch.cat([mask, torch.ones(1, 8)]))
    torch.testing.assert_close(both[:1], out)


def test_feat_ext_dim_lists_are_checked():
    with pytest.raises(SparsemilError, match="feat_ext_dim must be an integer >= 1 or a non-empty"):
        build_mil_model("abmil", 12, 2, feat_ext_dim=[])
    with pytest.raises(SparsemilError, match=r"feat_ext_dim must be .*\(got \[8, 0\]\)"):
        build_mil_model("abmil", 12, 2, feat_ext_dim=[8, 0])
    one = build_mil_model("abmil", 12, 2, feat_ext_dim=8)  # the old single-layer form
    assert [k for k in one.state_dict() if k.startswith("feat_ext")] == [
        "feat_ext.0.weight",
        "feat_ext.0.bias",
    ]


def test_fox_and_tiger_are_reachable():
    try:
        mil_mat_path("fox")
    except SparsemilError:
        pytest.skip("shared/data/mil/fox.mat not present")
    assert CLASSIC_BENCHMARKS == ("musk1", "musk2", "fox", "tiger", "elephant")
    for name in ("fox", "tiger"):
        bags = load_classic_benchmark(name)
        assert len(bags) == 200 and sum(b.label for b in bags) == 100
        assert {b.dim for b in bags} == {230}
        assert all(b.features.dtype == np.float32 and b.n_instances >= 1 for b in bags)


def test_a_broken_mat_file_is_named(tmp_path):
    from scipy.io import savemat

    bad = tmp_path / "bad.mat"
    savemat(bad, {"y": np.zeros(3)})
    with pytest.raises(SparsemilError, match=r"bad\.mat: not a PRTools MIL dataset"):
        read_prtools_mil_mat(bad)
    with pytest.raises(SparsemilError, match="unknown MIL benchmark 'foxy'"):
        load_classic_benchmark("foxy")


def test_musk1_smoke_beats_chance_and_resumes(tmp_path):
    """Real data, tiny protocol: 2 folds x 4 epochs; every model above chance; the table
    states Ilse's figures; a second call trains nothing; another protocol is refused."""
    protocol = Protocol(repetitions=1, folds=2, max_epochs=4, patience=10)
    table = tmp_path / "mil_ilse.md"
    logged: list[str] = []
    rows = run_ilse_benchmark(
        ["musk1"], list(ENTRIES), tmp_path / "runs", table, protocol, log=logged.append
    )
    assert len(logged) == 3
    by = {r["model"]: r for r in rows}
    assert set(by) == set(ENTRIES)
    for name, r in by.items():
        assert r["n"] == 2
        assert r["acc_mean"] > 0.6, (name, r["acc_mean"])  # 47/92 positive: chance ~0.51
    res = json.loads((tmp_path / "runs/musk1/ilse_gated/rep_0.json").read_text())
    assert res["registry_model"] == "abmil" and res["model_kwargs"]["gated"] is True
    assert res["recipe"]["optimizer"] == "adam" and res["recipe"]["lr"] == 5e-4
    assert {f["fold"] for f in res["folds"]} == {0, 1}
    text = table.read_text()
    pub = PUBLISHED["ilse_attention"]["musk1"]
    assert "| Musk1 | ilse_attention |" in text and f"{pub[0]:.3f} ± {pub[1]:.3f}" in text
    assert "MMIL vs the Ilse models, like for like" in text
    # resumed: nothing trains again
    run_ilse_benchmark(
        ["musk1"], list(ENTRIES), tmp_path / "runs", table, protocol, log=logged.append
    )
    assert len(logged) == 3
    assert collect(tmp_path / "runs")[0]["acc_mean"] == rows[0]["acc_mean"]
    with pytest.raises(SparsemilError, match="was run with protocol"):
        run_ilse_benchmark(
            ["musk1"], ["ilse_attention"], tmp_path / "runs", table, Protocol(folds=2, max_epochs=5)
        )
    with pytest.raises(SparsemilError, match="unknown model 'abmil'"):
        run_ilse_benchmark(["musk1"], ["abmil"], tmp_path / "x", table, protocol)


def test_reuse_refuses_a_result_of_another_recipe(tmp_path):
    import dataclasses
    import json

    from sparsemil.errors import SparsemilError
    from sparsemil.experiments import ilse_benchmark as ib

    entry = ib.ENTRIES["ilse_attention"]
    rec = {"registry_model": entry.model, "model_kwargs": entry.model_kwargs,
           "recipe": dataclasses.asdict(entry.recipe), "num_test": entry.num_test}  # fmt: skip
    path = tmp_path / "rep_0.json"
    path.write_text(json.dumps(rec))
    ib._check_entry(path, entry)  # the same settings: reused
    path.write_text(json.dumps({**rec, "recipe": {**rec["recipe"], "lr": 1e-2}}))
    with pytest.raises(SparsemilError, match="another recipe"):
        ib._check_entry(path, entry)


def test_paired_difference_uses_the_nadeau_bengio_corrected_se():
    import math

    from sparsemil.experiments import ilse_benchmark as ib

    mm = [0.8, 0.9, 0.7, 0.85]
    il = [0.9, 0.9, 0.8, 0.8]
    rows = [{"dataset": "musk1", "model": "mmil", "fold_acc": {(0, i): a for i, a in enumerate(mm)}},
            {"dataset": "musk1", "model": "ilse_attention",
             "fold_acc": {(0, i): a for i, a in enumerate(il)}}]  # fmt: skip
    d = np.array(mm) - np.array(il)
    se = math.sqrt((1 / 4 + 1 / 9) * d.var(ddof=1))  # 10-fold: n_test / n_train = 1/9
    line = ib._mmil_lines(rows, folds=10)[2]
    assert f"difference {d.mean():+.3f} ± {se:.3f}" in line


def test_table_script_refuses_bad_options_and_empty_results(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "ilse_table.py"
    spec = importlib.util.spec_from_file_location("ilse_table", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    table = tmp_path / "t.md"
    table.write_text("kept")
    for argv in (["--reps", "0"], ["--datasets", ","], ["--max-epochs", "0"],
                 ["--report-only", "--out", str(tmp_path / "none")]):  # fmt: skip
        assert mod.main([*argv, "--table", str(table)]) == 2, argv
        assert capsys.readouterr().err.startswith("error: ")
    assert table.read_text() == "kept"
