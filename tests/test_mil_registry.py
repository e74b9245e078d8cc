"""The model registry: one entry per model, consistent with the classes it describes."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from sparsemil.errors import SparsemilError
from sparsemil.mil.factory import BINARY_ONLY, MODEL_NAMES, build_mil_model
from sparsemil.mil.registry import MODELS, get_model_spec, spec_of

SMALL = {"mmil": {"embed_dim": 16, "num_subbags": 2}, "transmil": {"att_dim": 16}}


def _params(cls: type, method: str) -> set[str]:
    return set(inspect.signature(getattr(cls, method)).parameters)


@pytest.mark.parametrize("name", list(MODELS))
def test_capabilities_match_the_classes(name):
    """The registry is the one source of model facts; check it against the signatures."""
    spec = MODELS[name]
    cls = spec.model_class()
    for method in ("forward", "predict", "compute_loss"):
        params = _params(cls, method)
        assert ("mask" in params) == spec.accepts_mask, method
        assert ("coords" in params) == spec.accepts_coords, method
        assert ("group_ids" in params) == spec.accepts_group_ids, method
    init = _params(cls, "__init__")
    assert ("seed" in init) == spec.seeded
    if spec.seeded:
        assert all(hasattr(cls, m) for m in ("reseed", "get_rng_state", "set_rng_state"))
    assert spec.supports_batch <= spec.accepts_mask
    assert bool(spec.batch_note) != spec.supports_batch
    assert (spec.default_num_test > 1) == spec.stochastic_eval
    model = build_mil_model(name, 6, 3 if spec.multiclass else 2, **SMALL.get(name, {}))
    assert spec_of(model) is spec and isinstance(model, cls)


def test_factory_tables_come_from_the_registry():
    assert (
        MODEL_NAMES == tuple(MODELS) == ("mmil", "abmil", "transmil", "dsmil", "clam_sb", "dtfdmil")
    )
    assert BINARY_ONLY == {n for n in MODELS if n != "mmil"}
    assert [n for n, s in MODELS.items() if s.supports_batch] == ["mmil", "abmil"]
    assert {n: s.default_num_test for n, s in MODELS.items() if s.default_num_test > 1} == {
        "mmil": 5,
        "dtfdmil": 5,
    }


def test_unknown_names_and_models():
    with pytest.raises(
        SparsemilError, match=r"^model: unknown model 'abmill'; did you mean 'abmil'"
    ):
        get_model_spec("abmill")
    with pytest.raises(SparsemilError, match="unknown model 3"):
        get_model_spec(3)
    assert spec_of(torch.nn.Linear(2, 2)) is None
    with pytest.raises(
        SparsemilError, match=r"n_classes: model 'dsmil' is binary only.*model mmil"
    ):
        build_mil_model("dsmil", 4, 3)


def test_specs_are_read_only():
    spec = get_model_spec("mmil")
    with pytest.raises(dataclasses.FrozenInstanceError, match="supports_batch"):
        spec.supports_batch = False  # type: ignore[misc]
    with pytest.raises(TypeError, match="does not support item assignment"):
        MODELS["new"] = spec  # type: ignore[index]


def test_training_module_needs_a_registered_model():
    from sparsemil.mil.registry import model_inputs
    from sparsemil.train.module import MILModule

    with pytest.raises(SparsemilError, match="Linear is not a registered MIL model"):
        MILModule(torch.nn.Linear(2, 2))
    batch = {"mask": torch.ones(1, 3, dtype=torch.bool), "coords": torch.zeros(1, 3, 2)}
    assert set(model_inputs(build_mil_model("mmil", 4, **SMALL["mmil"]), batch)) == {
        "mask",
        "coords",
    }
    assert set(model_inputs(build_mil_model("abmil", 4), batch)) == {"mask"}
