"""MMIL-Transformer: batched model vs an explicit per-sub-bag reference, API, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmil.models import MILModel

from sparsemil.errors import SparsemilError
from sparsemil.mil import MMILTransformer
from sparsemil.mil.grouping import group_index_lists, sequential_groups

SMALL = {"in_dim": 12, "embed_dim": 16, "num_subbags": 3, "num_msg": 2, "num_layers": 2}


def small(**kw):
    return MMILTransformer(**{**SMALL, "seed": 0, **kw})


def _explicit_attention(mod, z):
    """(n, D) -> (attn(z) (n, D), probabilities (H, n, n)): matmul + softmax, no tricks."""
    q, k, v = (z @ mod.to_qkv.weight.T).chunk(3, dim=-1)
    q, k, v = (t.reshape(z.shape[0], mod.heads, mod.dim_head).transpose(0, 1) for t in (q, k, v))
    p = torch.softmax(q @ k.transpose(-1, -2) * mod.dim_head**-0.5, dim=-1)
    o = (p @ v).transpose(0, 1).reshape(z.shape[0], mod.inner)
    return o @ mod.to_out.weight.T + mod.to_out.bias, p


def reference(model, x, groups):
    """Official semantics written out with a Python loop over sub-bags.

    x: (N, C); groups: list of index arrays. Returns (logits (n_classes,), att (N,)).
    """
    with torch.no_grad():
        h = model.proj(x) if model.proj is not None else x.clone()
        if model.absolute_pos_embed is not None:
            h = h + model.absolute_pos_embed
        m = model.num_msg
        subs = [torch.cat([model.msg_tokens, h[torch.as_tensor(g)]]) for g in groups]
        cls = model.msgcls_token[None]
        for layer in model.layers:
            outs = [_explicit_attention(layer.subbag_attn, z) for z in subs]
            p_sub = [p for _, p in outs]
            subs = [z + o for z, (o, _) in zip(subs, outs, strict=True)]
            seq = torch.cat([cls] + [z[:m] for z in subs])
            o, p_msg = _explicit_attention(layer.msg_attn, seq)
            seq = seq + o
            cls = seq[:1]
            subs = [
                torch.cat([seq[1 + i * m : 1 + (i + 1) * m], z[m:]]) for i, z in enumerate(subs)
            ]
        att = torch.zeros(x.shape[0])
        w = p_msg[:, 0, 1:].mean(0).reshape(len(groups), m).sum(-1)
        for i, g in enumerate(groups):
            att[torch.as_tensor(g)] = w[i] * p_sub[i][:, :m, m:].mean(dim=(0, 1))
        return model.classifier(cls)[0], att


def _bag(n, c=12, seed=0):
    return torch.randn(1, n, c, generator=torch.Generator().manual_seed(seed))


def test_is_torchmil_model_and_config_rebuilds():
    model = small(grouping="sequential")
    assert isinstance(model, MILModel)
    clone = MMILTransformer(**model.config)
    clone.load_state_dict(model.state_dict())
    x = _bag(50)
    assert model.config == clone.config
    assert torch.equal(model.eval()(x), clone.eval()(x))
    assert small().state_dict().keys() == model.state_dict().keys()
    for k, v in small().state_dict().items():  # seeded initialisation
        assert torch.equal(v, small().state_dict()[k])


@pytest.mark.parametrize("grad", [True, False])
def test_matches_reference_on_uneven_sub_bags(grad):
    """Uneven sizes (padding + key mask), a singleton sub-bag, 2 message tokens."""
    model = small(grouping="precomputed").eval()
    n = 41
    rng = np.random.default_rng(1)
    ids = np.concatenate([np.zeros(25), np.ones(15), [2]]).astype(np.int64)[rng.permutation(n)]
    x = _bag(n)
    ref_logits, ref_att = reference(model, x[0], group_index_lists(ids))
    with torch.set_grad_enabled(grad):
        logits, att = model(x, group_ids=torch.from_numpy(ids)[None], return_att=True)
    assert torch.allclose(logits[0], ref_logits, atol=1e-5)
    assert torch.allclose(att[0], ref_att, atol=1e-6)
    assert (att >= 0).all() and att.sum() <= 1 + 1e-6
    model._full_last_layer = True
    with torch.set_grad_enabled(grad):
        assert torch.allclose(
            model(x, group_ids=torch.from_numpy(ids)[None])[0], ref_logits, atol=1e-5
        )


def test_head_chunked_inference_equals_single_call():
    model = small(grouping="sequential", num_layers=3).eval()
    x = _bag(90)
    with torch.no_grad():
        a = model(x)
        model.max_chunk_bytes = 1
        b = model(x)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(a, model(x), atol=1e-6)  # autograd path


def test_fewer_instances_than_sub_bags():
    model = small(grouping="sequential", num_subbags=10).eval()
    x = _bag(3)
    ref, _ = reference(model, x[0], [np.array([0]), np.array([1]), np.array([2])])
    assert torch.allclose(model(x)[0], ref, atol=1e-5)


def test_padded_batch_equals_per_bag():
    sizes = [30, 7, 55]
    bags = [_bag(n, seed=i)[0] for i, n in enumerate(sizes)]
    x = torch.zeros(3, max(sizes), 12)
    mask = torch.zeros(3, max(sizes), dtype=torch.bool)
    for i, b in enumerate(bags):
        x[i, : len(b)] = b
        mask[i, : len(b)] = True
    for grouping in ("sequential", "random"):
        model = small(grouping=grouping).eval()
        model.reseed(5)
        batched, att = model(x, mask=mask, return_att=True)
        model.reseed(5)  # the per-bag calls draw the same random groupings in order
        single = [model(b[None], return_att=True) for b in bags]
        for i, (lg, a) in enumerate(single):
            assert torch.allclose(batched[i], lg[0], atol=1e-5), grouping
            assert torch.allclose(att[i, : sizes[i]], a[0], atol=1e-6)
            assert (att[i, sizes[i] :] == 0).all()
    # a padded tail of garbage is ignored
    x[1, 7:] = float("nan")
    model.reseed(5)
    assert torch.allclose(model(x, mask=mask)[0], batched[0], atol=1e-5)


def test_output_invariant_to_sub_bag_and_instance_order():
    model = small(grouping="precomputed").eval()
    x = _bag(60)
    ids = torch.from_numpy(sequential_groups(60, 3))[None]
    a = model(x, group_ids=ids)
    b = model(x, group_ids=(2 - ids) * 7)  # relabelled and reordered sub-bags
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(0))
    c = model(x[:, perm], group_ids=ids[:, perm])  # instances shuffled
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-5)


def test_mask_ratio_drops_sub_bags_in_training_only():
    model = small(grouping="sequential", num_subbags=4, mask_ratio=0.5)
    x = _bag(40)
    model.train()
    seen = set()
    for _ in range(6):
        _, att = model(x, return_att=True)
        alive = tuple(bool(a) for a in (att[0].reshape(4, 10) > 0).any(dim=1))
        assert sum(alive) == 2
        seen.add(alive)
    assert len(seen) > 1  # different sub-bags dropped on different passes
    model.eval()
    _, att = model(x, return_att=True)
    assert (att > 0).all()
    harsh = small(grouping="sequential", num_subbags=3, mask_ratio=0.9).train()
    _, att = harsh(x, return_att=True)
    assert torch.isfinite(att).all() and (att > 0).sum() in (13, 14)  # one sub-bag kept


def test_max_subbag_size_caps_and_default_keeps_all():
    x = _bag(100)
    model = small(grouping="sequential", num_subbags=2, max_subbag_size=20).eval()
    _, att = model(x, return_att=True)
    assert (att[0, :50] > 0).sum() == 20 and (att[0, 50:] > 0).sum() == 20
    _, att = small(grouping="sequential", num_subbags=2).eval()(x, return_att=True)
    assert (att > 0).all()


def test_no_global_rng_use():
    x = _bag(40)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    model = small(grouping="random", mask_ratio=0.3, max_subbag_size=8).train()
    model(x)
    model.eval()(x)
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(np_state[1], np.random.get_state()[1])


@pytest.mark.parametrize(
    ("kwargs", "inputs", "match"),
    [
        ({}, {"X": torch.zeros(1, 0, 12)}, "empty bag"),
        (
            {},
            {"X": torch.zeros(2, 5, 12), "mask": torch.tensor([[1, 1, 0, 0, 0], [0] * 5])},
            r"empty bag.*\[1\]",
        ),
        ({}, {"X": torch.zeros(1, 5, 11)}, "feature dimension 11.*in_dim = 12"),
        ({}, {"X": torch.zeros(5, 12, 3, 1)}, "shape"),
        ({}, {"X": torch.zeros(1, 5, 12), "mask": torch.ones(1, 4)}, "mask must have shape"),
        ({"grouping": "kmeans_coords"}, {"X": torch.zeros(1, 5, 12)}, "needs coords"),
        (
            {"grouping": "kmeans_coords"},
            {"X": torch.zeros(1, 5, 12), "coords": torch.zeros(1, 5, 3)},
            "coords must have shape",
        ),
        ({"grouping": "precomputed"}, {"X": torch.zeros(1, 5, 12)}, "needs group_ids"),
        (
            {"grouping": "precomputed"},
            {"X": torch.zeros(1, 2, 12), "group_ids": torch.tensor([[0, -1]])},
            ">= 0",
        ),
    ],
)
def test_bad_input(kwargs, inputs, match):
    with pytest.raises(SparsemilError, match=match):
        small(**kwargs)(**inputs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features(bad):
    x = torch.zeros(2, 6, 12)
    x[1, 4, 3] = bad
    with pytest.raises(SparsemilError, match=r"NaN or Inf \(bag 1, instance 4\)"):
        small()(x)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"grouping": "clusters"}, "grouping 'clusters'"),
        ({"attention": "linear"}, "attention"),
        ({"project": False}, "in_dim .* must equal embed_dim"),
        ({"num_msg": 0}, "num_msg"),
        ({"max_subbag_size": 0}, "max_subbag_size"),
        ({"ape": "False"}, "ape"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(SparsemilError, match=match):
        small(**kwargs)


def test_runtime_grouping_switch_and_official_aliases():
    model = small(grouping="seq").eval()
    assert model.grouping == "sequential"
    x = _bag(30)
    a = model(x)
    model.grouping = "precomputed"
    b = model(x, group_ids=torch.from_numpy(sequential_groups(30, 3))[None])
    assert torch.allclose(a, b, atol=1e-6)
    model.grouping = "nope"
    with pytest.raises(SparsemilError, match="grouping 'nope'"):
        model(x)


def test_nystrom_attention():
    x = _bag(60)
    exact = small(grouping="sequential", num_layers=3).eval()
    ny = MMILTransformer(
        **{**exact.config, "attention": "nystrom", "num_landmarks": 64, "pinv_iterations": 30}
    )
    ny.load_state_dict(exact.state_dict())
    ny.eval()
    with torch.no_grad():
        # landmarks >= sub-bag length: every token is a landmark -> exact attention
        assert torch.allclose(ny(x), exact(x), atol=1e-4)
    ny.num_landmarks = 4
    out = ny(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, exact(x), atol=1e-4)
    ny.train()
    _, losses = ny.compute_loss(torch.tensor([1]), x)
    losses["CrossEntropyLoss"].backward()
    assert ny.layers[0].subbag_attn.to_qkv.weight.grad.abs().sum() > 0


def test_compute_loss_predict_and_wrapper():
    from tensordict import TensorDict
    from torchmil.models import MILModelWrapper

    model = small(grouping="sequential")
    x = torch.randn(2, 9, 12)
    y = torch.tensor([0, 1])
    logits, losses = model.compute_loss(y, x)
    assert set(losses) == {"CrossEntropyLoss"}
    assert torch.allclose(losses["CrossEntropyLoss"], torch.nn.functional.cross_entropy(logits, y))
    pred = model.predict(x, return_inst_pred=False)
    assert not pred.requires_grad and torch.allclose(pred, logits.detach(), atol=1e-6)
    pred, att = model.predict(x)  # torchmil's default: instance predictions too
    assert att.shape == (2, 9)
    out = MILModelWrapper(model)(TensorDict({"X": x, "mask": torch.ones(2, 9)}, batch_size=[2]))
    assert torch.allclose(out, logits, atol=1e-6)


def test_flash_path_is_not_twice_differentiable_without_the_flag():
    model = small(grouping="sequential")
    model.math_attention_bytes = 0  # force the SDPA kernel, as for a large bag
    loss = model.compute_loss(torch.tensor([1]), _bag(20))[1]["CrossEntropyLoss"]
    (g,) = torch.autograd.grad(loss, [model.layers[0].subbag_attn.to_qkv.weight], create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(g.sum(), [model.layers[0].subbag_attn.to_qkv.weight])


@pytest.mark.parametrize("flag", [True, False])
def test_hessian_vector_product(flag):
    """Double backward: forced by the flag, automatic for small sub-bags."""
    torch.manual_seed(0)
    model = small(grouping="sequential", twice_differentiable=flag).double()
    if flag:
        model.math_attention_bytes = 0
    x, y = _bag(20).double(), torch.tensor([1])
    params = [p for p in model.parameters()]
    v = [torch.randn_like(p) for p in params]

    def grads():
        return torch.autograd.grad(
            model.compute_loss(y, x)[1]["CrossEntropyLoss"], params, create_graph=True
        )

    g = grads()
    hv = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v, strict=True)), params)
    eps = 1e-5
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.add_(eps * d)
    gp = [t.detach() for t in grads()]
    with torch.no_grad():
        for p, d in zip(params, v, strict=True):
            p.sub_(2 * eps * d)
    gm = [t.detach() for t in grads()]
    fd = torch.cat([((a - b) / (2 * eps)).flatten() for a, b in zip(gp, gm, strict=True)])
    hv = torch.cat([t.flatten() for t in hv])
    assert torch.allclose(hv, fd, rtol=1e-4, atol=1e-6)


def test_gradient_flow_on_musk1(mil_csv_dir):
    data = np.loadtxt(mil_csv_dir / "musk1.csv", delimiter=",")
    labels, bag_ids, feats = data[:, 0], data[:, 1], data[:, 2:]
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-8)
    uniq = np.unique(bag_ids)
    sizes = [int((bag_ids == b).sum()) for b in uniq]
    x = torch.zeros(len(uniq), max(sizes), feats.shape[1])
    mask = torch.zeros(len(uniq), max(sizes), dtype=torch.bool)
    y = torch.zeros(len(uniq), dtype=torch.long)
    for i, b in enumerate(uniq):
        sel = bag_ids == b
        x[i, : sel.sum()] = torch.tensor(feats[sel], dtype=torch.float32)
        mask[i, : sel.sum()] = True
        y[i] = int(labels[sel][0])
    assert len(uniq) == 92 and set(y.tolist()) == {0, 1}
    model = MMILTransformer(
        in_dim=feats.shape[1],
        embed_dim=32,
        num_subbags=2,
        grouping="random",
        seed=0,
        heads=4,
        dim_head=16,
    )
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    first = None
    for _ in range(10):
        opt.zero_grad()
        _, losses = model.compute_loss(y, x, mask=mask)
        losses["CrossEntropyLoss"].backward()
        opt.step()
        first = first if first is not None else losses["CrossEntropyLoss"].item()
    model.eval()
    with torch.no_grad():
        final = model.compute_loss(y, x, mask=mask)[1]["CrossEntropyLoss"].item()
    assert final < 0.8 * first


def test_positional_arguments_follow_torchmil():
    """``forward(X, mask, return_att)``, ``predict(X, mask, return_inst_pred)``,
    ``compute_loss(Y, X, mask)``; coords / group_ids are keyword-only."""
    import inspect

    from torchmil.models import ABMIL

    for method in ("forward", "predict", "compute_loss"):
        ours = inspect.signature(getattr(MMILTransformer, method)).parameters.values()
        positional = [p.name for p in ours if p.kind is p.POSITIONAL_OR_KEYWORD]
        theirs = list(inspect.signature(getattr(ABMIL, method)).parameters)
        assert positional == theirs, method
    model = small(grouping="sequential").eval()
    x = torch.randn(2, 9, 12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    logits, att = model.predict(x, mask, True)
    assert logits.shape == (2, 2) and att.shape == (2, 9) and (att[1, 6:] == 0).all()
    assert torch.equal(model.predict(x, mask, False), logits)
    with torch.no_grad():
        out, att2 = model(x, mask, True)
    assert torch.equal(out, logits) and torch.equal(att2, att)
    with pytest.raises(TypeError, match="positional"):
        model(x, mask, False, torch.zeros(2, 9, 2))


def test_compute_loss_takes_a_criterion():
    model = small(grouping="sequential")
    x, y = torch.randn(2, 9, 12), torch.tensor([0, 1])
    logits, losses = model.compute_loss(y, x, criterion=torch.nn.MultiMarginLoss())
    assert set(losses) == {"MultiMarginLoss"}
    torch.testing.assert_close(
        losses["MultiMarginLoss"], torch.nn.functional.multi_margin_loss(logits, y)
    )

    def half_ce(out, target):
        return 0.5 * torch.nn.functional.cross_entropy(out, target)

    _, losses = model.compute_loss(y, x, None, criterion=half_ce)
    torch.testing.assert_close(
        losses["half_ce"], 0.5 * torch.nn.functional.cross_entropy(logits, y)
    )


def test_generator_state_roundtrip():
    model = small(grouping="random", num_subbags=4)
    x = _bag(40)
    state = model.get_rng_state()
    _, a = model(x, return_att=True)
    model.set_rng_state(state)
    _, b = model(x, return_att=True)
    assert torch.equal(a, b)
