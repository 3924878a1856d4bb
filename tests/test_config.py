"""SparseConfig: defaults, JSON round trip, save_pretrained / from_pretrained, and clear validation errors."""

from __future__ import annotations

import json
import math

import pytest

import hf_sparse as hs
from hf_sparse.config import CONFIG_NAME


def test_defaults():
    c = hs.SparseConfig()
    assert c.sparsity == 0.5 and c.granularity == ["neuron", "head"] and c.budget == "params"
    assert c.compute == "gather" and c.target_modules is None and c.exclude_modules is None
    assert not c.uses_weights and hs.SparseConfig(granularity="weight").uses_weights


def test_normalisation():
    c = hs.SparseConfig(sparsity=0, granularity="head", target_modules=("q_proj", "v_proj"), exclude_modules=("o",))
    assert c.sparsity == 0.0 and isinstance(c.sparsity, float)
    assert c.granularity == ["head"] and c.target_modules == ["q_proj", "v_proj"] and c.exclude_modules == ["o"]
    assert hs.SparseConfig(granularity=["head", "neuron", "head"]).granularity == ["head", "neuron"]


ARCH = {"mlp": {"anchor": r"blocks\.\d+\.ff", "members": [{"path": "up", "role": "out"}, {"path": "down", "role": "in"}]}}


@pytest.mark.parametrize("kwargs", [
    {},
    {"sparsity": 0.9, "granularity": ["head"], "target_modules": ["q_proj"], "exclude_modules": r".*\.0\..*",
     "budget": "units", "compute": "mask", "score_init": "magnitude"},
    {"granularity": "weight", "target_modules": r".*dense", "score_init": "budget"},
    {"granularity": ["neuron"], "architecture": ARCH},
])
def test_json_round_trip_and_save_load(tmp_path, kwargs):
    c = hs.SparseConfig(**kwargs)
    text = c.to_json_string()
    assert hs.SparseConfig.from_dict(json.loads(text)) == c
    path = c.save_pretrained(tmp_path / "out")
    assert path.endswith(CONFIG_NAME) and (tmp_path / "out" / CONFIG_NAME).is_file()
    loaded = hs.SparseConfig.from_pretrained(tmp_path / "out")
    assert loaded == c and loaded.to_dict() == c.to_dict()
    assert json.loads((tmp_path / "out" / CONFIG_NAME).read_text())["sparsity"] == c.sparsity


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, math.nan, math.inf])
def test_sparsity_out_of_range(value):
    with pytest.raises(ValueError) as info:
        hs.SparseConfig(sparsity=value)
    message = str(info.value)
    assert "SparseConfig.sparsity" in message and str(value) in message and "[0, 1)" in message


@pytest.mark.parametrize("value", ["0.5", True, None, [0.5]])
def test_sparsity_wrong_type(value):
    with pytest.raises(ValueError, match=r"SparseConfig\.sparsity.*" + repr(value).replace("[", r"\[").replace("]", r"\]")):
        hs.SparseConfig(sparsity=value)


def test_granularity_errors():
    with pytest.raises(ValueError, match=r"SparseConfig\.granularity.*'block'.*neuron"):
        hs.SparseConfig(granularity=["neuron", "block"])
    with pytest.raises(ValueError, match=r"SparseConfig\.granularity.*empty"):
        hs.SparseConfig(granularity=[])
    with pytest.raises(ValueError, match=r"SparseConfig\.granularity.*'weight'"):
        hs.SparseConfig(granularity=["weight", "neuron"])


@pytest.mark.parametrize("field,value", [("budget", "flops"), ("compute", "sparse"), ("score_init", "random")])
def test_choice_errors(field, value):
    with pytest.raises(ValueError) as info:
        hs.SparseConfig(**{field: value})
    assert f"SparseConfig.{field}" in str(info.value) and repr(value) in str(info.value)


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_target_type_errors(field):
    with pytest.raises(ValueError, match=rf"SparseConfig\.{field}.*42"):
        hs.SparseConfig(**{field: 42})


def test_version_and_unknown_fields(tmp_path):
    with pytest.raises(ValueError, match="version"):
        hs.SparseConfig(version=99)
    with pytest.raises(ValueError, match=r"unknown fields \['lr', 'sparsty'\]"):
        hs.SparseConfig.from_dict({"sparsty": 0.5, "lr": 1.0})


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        hs.SparseConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hs.SparseConfig.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"sparsity": 2.0}))
    with pytest.raises(ValueError, match="sparsity"):
        hs.SparseConfig.from_pretrained(tmp_path)


def test_loaded_config_sparsifies_like_the_original(tmp_path):
    from conftest import tiny_model

    c = hs.SparseConfig(sparsity=0.25, granularity=["neuron"], target_modules=["down_proj"], budget="units")
    c.save_pretrained(tmp_path)
    a = hs.sparsify_model(tiny_model("llama"), c)
    b = hs.sparsify_model(tiny_model("llama"), hs.SparseConfig.from_pretrained(tmp_path))
    assert hs.SparseStructure(a).names == hs.SparseStructure(b).names
    assert hs.get_sparse_config(b) == c
