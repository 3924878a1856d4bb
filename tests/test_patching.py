"""sparsify_model / unsparsify_model: exactness at s = 1, unit layouts and costs, target selection, the
explicit-architecture escape hatch, PEFT LoRA, and all-or-nothing failure on every bad input."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import (ARCHS, HIDDEN, INTERMEDIATE, LAYERS, assert_grads_close, assert_same_state,
                      random_group_masks, state_snapshot, tiny_inputs, tiny_model)
from torch import nn

import hf_sparse as hs
from hf_sparse.layers import MaskedWeightLinear, SparseLinear
from hf_sparse.structure import UnitGroup

# (units, cost per unit) of one layer's head group and neuron group, by hand from the tiny configs
# (hidden 32, 4 heads of 8, 2 key/value heads for GQA, intermediate 64). A unit's cost counts the weights
# it spans plus its producers' biases.
HEAD_DIM = 8
EXPECTED_UNITS = {
    # BERT/RoBERTa/OPT head: q,k,v rows (3 * 8 * 32) + their biases (3 * 8) + o columns (8 * 32) = 1048
    # plain MLP neuron: up row (32) + up bias (1) + down column (32) = 65
    "bert": {"head": (4, 1048), "neuron": (64, 65)},
    "roberta": {"head": (4, 1048), "neuron": (64, 65)},
    "opt": {"head": (4, 1048), "neuron": (64, 65)},
    # GPT-2: fused c_attn (3 segments of 8 rows, with bias) + c_proj rows of the Conv1D: same numbers
    "gpt2": {"head": (4, 1048), "neuron": (64, 65)},
    # GQA unit (one kv head + its 2 query heads): q 16*32 + k 8*32 + v 8*32 + o 16*32 = 1536, no biases
    # gated MLP neuron: gate row + up row + down column = 96
    "llama": {"head": (2, 1536), "neuron": (64, 96)},
    "mistral": {"head": (2, 1536), "neuron": (64, 96)},
    # Qwen2 has q/k/v biases: + 16 + 8 + 8
    "qwen2": {"head": (2, 1568), "neuron": (64, 96)},
}


def _logits(model, arch, seed=0):
    with torch.no_grad():
        return model(**tiny_inputs(arch, seed=seed)).logits


# --- exactness at s = 1 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("compute", ["gather", "mask"])
def test_fresh_sparsify_keeps_logits(arch, compute):
    model = tiny_model(arch)
    ref = _logits(model, arch)
    out = hs.sparsify_model(model, hs.SparseConfig(sparsity=0.7, compute=compute))
    assert out is model and hs.is_sparsified(model)
    structure = hs.SparseStructure(model)
    assert torch.all(structure.scores() == 1) and torch.all(structure.masks() == 1)
    torch.testing.assert_close(_logits(model, arch), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "opt"])
def test_fresh_sparsify_keeps_classifier_logits(arch):
    model = tiny_model(arch, head="classification")
    ref = _logits(model, arch)
    hs.sparsify_model(model, hs.SparseConfig(granularity=["neuron", "head"]))
    torch.testing.assert_close(_logits(model, arch), ref, rtol=0, atol=1e-5)
    # the classifier is never pruned
    assert not any(isinstance(m, SparseLinear) for n, m in model.named_modules() if "classifier" in n or "score" in n)


@pytest.mark.parametrize("arch", ARCHS)
def test_units_costs_and_state_dict(arch):
    model = tiny_model(arch)
    keys = set(model.state_dict())
    values = {k: v.clone() for k, v in model.state_dict().items()}
    hs.sparsify_model(model, hs.SparseConfig())
    structure = hs.SparseStructure(model)
    assert [g.kind for g in structure].count("head") == LAYERS
    assert [g.kind for g in structure].count("neuron") == LAYERS
    for g in structure:
        units, cost = EXPECTED_UNITS[arch][g.kind]
        assert g.num_units == units
        assert torch.all(g.params_per_unit == cost), (g.kind, g.params_per_unit[0].item(), cost)
        assert not g.scores.requires_grad
    # the costs add up to the targeted projections' weights plus their producers' biases
    total = 0
    for layer in model.modules():
        if isinstance(layer, SparseLinear):
            total += layer.weight.numel() + (layer.bias.numel() if layer.role == "out" and layer.bias is not None else 0)
    assert structure.total_budget("params") == total
    assert structure.total_budget("units") == structure.num_units
    # original keys and values, plus the groups' scores and masks
    new = model.state_dict()
    extra = set(new) - keys
    assert keys <= set(new)
    assert extra == {f"{n}.{k}" for n, g in zip(structure.names, structure.groups) for k in g.state_dict()}
    assert {f"{n}.{s}" for n in structure.names for s in ("scores", "mask")} <= extra
    for k in keys:
        assert torch.equal(new[k], values[k]), k
    # embeddings, norms and heads are never touched
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.LayerNorm)) or re.search(r"(lm_head|norm|embed|wte|wpe)$", name):
            assert not isinstance(module, SparseLinear), name


@pytest.mark.parametrize("granularity", [["neuron"], ["head"]])
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "opt"])
def test_single_granularity(arch, granularity):
    model = tiny_model(arch)
    ref = _logits(model, arch)
    hs.sparsify_model(model, hs.SparseConfig(granularity=granularity))
    structure = hs.SparseStructure(model)
    assert {g.kind for g in structure} == set(granularity) and len(structure.groups) == LAYERS
    torch.testing.assert_close(_logits(model, arch), ref, rtol=0, atol=1e-5)
    # a random mask still agrees with the mask-compute reference
    other = tiny_model(arch)
    hs.sparsify_model(other, hs.SparseConfig(granularity=granularity, compute="mask"))
    mask = random_group_masks(structure, seed=11, all_dropped=None, all_kept=None)
    structure.set_masks(mask)
    hs.SparseStructure(other).set_masks(mask)
    torch.testing.assert_close(_logits(model, arch), _logits(other, arch), rtol=1e-5, atol=1e-5)


# --- target selection -----------------------------------------------------------------------------------


def _group_names(model):
    return hs.SparseStructure(model).names


def test_target_modules_list_suffix():
    model = tiny_model("llama")
    hs.sparsify_model(model, hs.SparseConfig(target_modules=["mlp.down_proj"]))
    assert _group_names(model) == ["model.layers.0.mlp.sparse_neurons", "model.layers.1.mlp.sparse_neurons"]
    model = tiny_model("llama")
    hs.sparsify_model(model, hs.SparseConfig(target_modules=["layers.1.self_attn.k_proj", "layers.0.mlp.up_proj"]))
    assert _group_names(model) == ["model.layers.0.mlp.sparse_neurons", "model.layers.1.self_attn.sparse_heads"]


def test_target_modules_regex():
    model = tiny_model("bert")
    hs.sparsify_model(model, hs.SparseConfig(target_modules=r".*layer\.1\.attention\.self\.(query|key)"))
    assert _group_names(model) == ["bert.encoder.layer.1.attention.sparse_heads"]
    # a regex must match the full name: a bare suffix matches nothing
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="matched no module"):
        hs.sparsify_model(model, hs.SparseConfig(target_modules=r"query"))


def test_exclude_modules():
    model = tiny_model("opt")
    hs.sparsify_model(model, hs.SparseConfig(exclude_modules=["layers.0.self_attn.q_proj"]))
    assert _group_names(model) == [
        "model.decoder.layers.0.sparse_neurons", "model.decoder.layers.1.self_attn.sparse_heads",
        "model.decoder.layers.1.sparse_neurons",
    ]
    assert type(model.model.decoder.layers[0].self_attn.q_proj) is nn.Linear
    model = tiny_model("gpt2")
    hs.sparsify_model(model, hs.SparseConfig(exclude_modules=r"transformer\.h\.0\..*"))
    assert _group_names(model) == ["transformer.h.1.attn.sparse_heads", "transformer.h.1.mlp.sparse_neurons"]
    # target and exclude together
    model = tiny_model("llama")
    hs.sparsify_model(model, hs.SparseConfig(target_modules=["o_proj"], exclude_modules=["layers.1.self_attn"]))
    assert _group_names(model) == ["model.layers.0.self_attn.sparse_heads"]


def test_filter_fn():
    model = tiny_model("llama")
    hs.sparsify_model(model, hs.SparseConfig(), filter_fn=lambda module, name: name.endswith("mlp"))
    assert all(g.kind == "neuron" for g in hs.SparseStructure(model))


# --- explicit architectures -----------------------------------------------------------------------------


LLAMA_MLP_SPEC = {
    "mlp": {
        "anchor": r"layers\.\d+\.mlp",
        "members": [{"path": "gate_proj", "role": "out"}, {"path": "up_proj", "role": "out"},
                    {"path": "down_proj", "role": "in"}],
    }
}


def test_explicit_architecture_for_a_known_model():
    model = tiny_model("llama")
    ref = _logits(model, "llama")
    hs.sparsify_model(model, hs.SparseConfig(granularity=["neuron"], architecture=LLAMA_MLP_SPEC))
    structure = hs.SparseStructure(model)
    assert [g.num_units for g in structure] == [INTERMEDIATE] * LAYERS
    assert torch.all(structure.params_per_unit() == 3 * HIDDEN)
    torch.testing.assert_close(_logits(model, "llama"), ref, rtol=0, atol=1e-5)


def test_explicit_architecture_attention_with_head_attrs():
    spec = {"attention": {
        "anchor": r"layers\.\d+\.self_attn",
        "members": [{"path": "q_proj", "role": "out", "width": "head"}, {"path": "k_proj", "role": "out", "width": "head"},
                    {"path": "v_proj", "role": "out", "width": "head"}, {"path": "out_proj", "role": "in", "width": "head"}],
        "head_attrs": [["num_heads", "1"]],
    }}
    model = tiny_model("opt")
    other = tiny_model("opt")
    hs.sparsify_model(model, hs.SparseConfig(granularity=["head"], architecture=spec))
    hs.sparsify_model(other, hs.SparseConfig(granularity=["head"], compute="mask"))
    structure = hs.SparseStructure(model)
    mask = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    structure.set_masks(mask)
    hs.SparseStructure(other).set_masks(mask)
    assert model.model.decoder.layers[0].self_attn.num_heads == 2
    torch.testing.assert_close(_logits(model, "opt"), _logits(other, "opt"), rtol=1e-5, atol=1e-5)


class _FakeConfig:
    model_type = "my-net"


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.ff = nn.ModuleDict({"up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})

    def forward(self, x):
        return x + self.ff["down"](torch.relu(self.ff["up"](self.norm(x))))


class _MyNet(nn.Module):
    """A model hf_sparse has never heard of, with a fake config."""

    def __init__(self):
        super().__init__()
        self.config = _FakeConfig()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x)
        return x


MYNET_SPEC = {"mlp": {"anchor": r"blocks\.\d+\.ff", "members": [{"path": "up", "role": "out"}, {"path": "down", "role": "in"}]}}


def test_explicit_architecture_for_a_custom_module():
    torch.manual_seed(0)
    net = _MyNet()
    ids = torch.randint(0, 10, (2, 5))
    ref = net(ids).detach()
    hs.sparsify_model(net, hs.SparseConfig(granularity=["neuron"], architecture=MYNET_SPEC))
    structure = hs.SparseStructure(net)
    assert structure.names == ["blocks.0.ff.sparse_neurons", "blocks.1.ff.sparse_neurons"]
    assert torch.all(structure.params_per_unit() == 8 + 1 + 8)
    torch.testing.assert_close(net(ids), ref, rtol=0, atol=1e-6)
    mask = torch.zeros(32)
    mask[[0, 3, 5, 17, 30]] = 1
    structure.set_masks(mask)
    with torch.no_grad():  # reference: dropped neurons zeroed by hand in the consumer
        expected_net = _MyNet()
        expected_net.load_state_dict({k: v for k, v in net.state_dict().items() if "sparse" not in k})
        for i, b in enumerate(expected_net.blocks):
            b.ff["down"].weight[:, mask[16 * i:16 * (i + 1)] == 0] = 0
    torch.testing.assert_close(net(ids), expected_net(ids), rtol=1e-6, atol=1e-6)


def test_t5_with_explicit_mlp_layout():
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                   dropout_rate=0.0)).eval()
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = t5(input_ids=ids, decoder_input_ids=ids).logits
    spec = {"mlp": {"anchor": r"layer\.\d+\.DenseReluDense", "members": [{"path": "wi", "role": "out"}, {"path": "wo", "role": "in"}]}}
    hs.sparsify_model(t5, hs.SparseConfig(granularity=["neuron"], architecture=spec))
    assert len(hs.SparseStructure(t5).groups) == 4  # 2 encoder + 2 decoder blocks
    with torch.no_grad():
        torch.testing.assert_close(t5(input_ids=ids, decoder_input_ids=ids).logits, ref, rtol=0, atol=1e-5)


# --- weight granularity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_weight_granularity(arch):
    model = tiny_model(arch)
    base = copy.deepcopy(model)
    ref = _logits(model, arch)
    hs.sparsify_model(model, hs.SparseConfig(granularity="weight", compute="gather"))
    structure = hs.SparseStructure(model)
    layers = [m for m in model.modules() if isinstance(m, MaskedWeightLinear)]
    assert len(layers) == len(structure.groups) == LAYERS * (7 if arch == "llama" else 6 if arch == "bert" else 4)
    assert all(g.kind == "weight" and g.compute == "mask" for g in structure)
    assert structure.num_units == sum(layer.weight.numel() for layer in layers)
    torch.testing.assert_close(_logits(model, arch), ref, rtol=0, atol=1e-5)
    mask = (torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)) < 0.5).float()
    structure.set_masks(mask)
    # reference: the masks multiplied into the dense weights by hand
    layer_names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        for layer in layers:
            base.get_submodule(layer_names[id(layer)]).weight.mul_(layer.group.mask.view_as(layer.weight))
    torch.testing.assert_close(_logits(model, arch), _logits(base, arch), rtol=1e-5, atol=1e-5)
    model(**tiny_inputs(arch)).logits.pow(2).sum().backward()
    for layer in layers:
        assert torch.all(layer.weight.grad.reshape(-1)[layer.group.mask == 0] == 0)


def test_weight_granularity_with_explicit_targets_on_unknown_model():
    net = _MyNet()
    hs.sparsify_model(net, hs.SparseConfig(granularity=["weight"], target_modules=["up"]))
    assert hs.SparseStructure(net).names == ["blocks.0.ff.sparse_weights_up", "blocks.1.ff.sparse_weights_up"]
    assert isinstance(net.blocks[0].ff["up"], MaskedWeightLinear) and type(net.blocks[0].ff["down"]) is nn.Linear


# --- PEFT LoRA ------------------------------------------------------------------------------------------


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                          lora_dropout=0.0))
    with torch.no_grad():  # lora_B starts at zero; make both adapter matrices matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_lora_gather_matches_mask_and_dropped_adapter_grads_are_zero():
    peft_model = _lora_llama()
    ref = _logits(peft_model, "llama")
    trainable_before = sorted(n for n, p in peft_model.named_parameters() if p.requires_grad)
    models = {}
    for compute in ("gather", "mask"):
        m = copy.deepcopy(peft_model)
        hs.sparsify_model(m, hs.SparseConfig(compute=compute))
        torch.testing.assert_close(_logits(m, "llama"), ref, rtol=0, atol=1e-5)
        assert sorted(n for n, p in m.named_parameters() if p.requires_grad) == trainable_before
        for n, p in m.named_parameters():  # also compare the frozen base weights' gradients
            if "scores" not in n:
                p.requires_grad_(True)
        models[compute] = m
    structure = hs.SparseStructure(models["gather"])
    mask = random_group_masks(structure, seed=5, all_dropped=None, all_kept=None)
    for m in models.values():
        hs.SparseStructure(m).set_masks(mask)
    outs = {}
    for compute, m in models.items():
        out = m(**tiny_inputs("llama")).logits
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        outs[compute] = out.detach()
    torch.testing.assert_close(outs["gather"], outs["mask"], rtol=1e-5, atol=1e-5)
    assert_grads_close(dict(models["gather"].named_parameters()), dict(models["mask"].named_parameters()))

    m = models["gather"]
    checked = set()
    for layer_idx in range(LAYERS):
        attn = m.base_model.model.model.layers[layer_idx].self_attn
        heads = attn.sparse_heads.mask
        rows = heads.repeat_interleave(2 * HEAD_DIM)  # q rows of a GQA unit: 2 query heads
        q_b = attn.q_proj.lora_B["default"]
        assert isinstance(q_b, SparseLinear) and type(attn.q_proj.lora_A["default"]) is nn.Linear
        assert torch.all(q_b.weight.grad[rows == 0] == 0) and q_b.weight.grad[rows == 1].abs().max() > 0
        v_b = attn.v_proj.lora_B["default"]
        v_rows = heads.repeat_interleave(HEAD_DIM)
        assert torch.all(v_b.weight.grad[v_rows == 0] == 0) and v_b.weight.grad[v_rows == 1].abs().max() > 0
        mlp = m.base_model.model.model.layers[layer_idx].mlp
        neurons = mlp.sparse_neurons.mask
        d_a = mlp.down_proj.lora_A["default"]
        assert isinstance(d_a, SparseLinear) and type(mlp.down_proj.lora_B["default"]) is nn.Linear
        assert torch.all(d_a.weight.grad[:, neurons == 0] == 0) and d_a.weight.grad[:, neurons == 1].abs().max() > 0
        base_down = mlp.down_proj.base_layer
        assert torch.all(base_down.weight.grad[:, neurons == 0] == 0)
        checked.add(layer_idx)
    assert checked == {0, 1}


# --- unsparsify, copies, state dicts, score init --------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "opt"])
def test_unsparsify_restores_types_and_keeps_the_masked_function(arch):
    model = tiny_model(arch)
    before = state_snapshot(model)
    hs.sparsify_model(model, hs.SparseConfig())
    structure = hs.SparseStructure(model)
    structure.set_masks(random_group_masks(structure, seed=1, all_dropped=None, all_kept=None))
    masked = _logits(model, arch)
    hs.unsparsify_model(model)
    after = state_snapshot(model)
    assert after["types"] == before["types"] and after["state"].keys() == before["state"].keys()
    assert after["head_attrs"] == before["head_attrs"]
    assert not hs.is_sparsified(model) and not hasattr(model, "hf_sparse_config")
    torch.testing.assert_close(_logits(model, arch), masked, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not sparsified"):
        hs.unsparsify_model(model)


def test_deepcopy_of_a_sparse_model_has_its_own_groups():
    model = hs.sparsify_model(tiny_model("llama"), hs.SparseConfig())
    clone = copy.deepcopy(model)
    layer = clone.model.layers[0].mlp.down_proj
    assert layer.group is clone.model.layers[0].mlp.sparse_neurons
    assert layer.group is not model.model.layers[0].mlp.sparse_neurons
    clone.model.layers[0].mlp.sparse_neurons.set_mask(torch.zeros(INTERMEDIATE))
    assert model.model.layers[0].mlp.sparse_neurons.all_kept
    assert not torch.equal(_logits(clone, "llama"), _logits(model, "llama"))


def test_state_dict_round_trip_restores_masks():
    model = hs.sparsify_model(tiny_model("gpt2"), hs.SparseConfig())
    structure = hs.SparseStructure(model)
    structure.set_masks(random_group_masks(structure, seed=2))
    structure.set_scores(torch.rand(structure.num_units, generator=torch.Generator().manual_seed(0)))
    expected = _logits(model, "gpt2")
    fresh = hs.sparsify_model(tiny_model("gpt2", seed=1), hs.SparseConfig())
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(hs.SparseStructure(fresh).scores(), structure.scores())
    assert fresh.transformer.h[0].attn.num_heads == int(fresh.transformer.h[0].attn.sparse_heads.mask.sum()) or \
        fresh.transformer.h[0].attn.sparse_heads.none_kept
    torch.testing.assert_close(_logits(fresh, "gpt2"), expected, rtol=0, atol=0)


def test_score_init_modes():
    model = hs.sparsify_model(tiny_model("llama"), hs.SparseConfig(sparsity=0.3, score_init="budget"))
    assert torch.allclose(hs.SparseStructure(model).scores(), torch.full((2 * 66,), 0.7))
    model = hs.sparsify_model(tiny_model("llama"), hs.SparseConfig(sparsity=0.6, score_init="magnitude"))
    structure = hs.SparseStructure(model)
    s, c = structure.scores().double(), structure.costs("params").double()
    assert s.min() >= 0 and s.max() <= 1
    budget = 0.4 * float(c.sum())
    assert abs(float((s * c).sum()) - budget) / budget < 1e-6
    # larger magnitude -> larger score within a group of equal costs
    mags = hs.unit_magnitudes(model)
    neurons = slice(2, 2 + INTERMEDIATE)
    order = torch.argsort(mags[neurons], descending=True)
    assert torch.all(s[neurons][order].diff() <= 1e-7)


def test_unit_magnitudes_by_hand():
    model = hs.sparsify_model(tiny_model("bert"), hs.SparseConfig(granularity=["neuron"]))
    layer = model.bert.encoder.layer[0]
    up, down = layer.intermediate.dense, layer.output.dense
    u = 5
    sq = up.weight[u].double().pow(2).sum() + up.bias[u].double() ** 2 + down.weight[:, u].double().pow(2).sum()
    expected = (sq / (2 * HIDDEN + 1)).sqrt()
    assert abs(hs.unit_magnitudes(model)[u].item() - expected.item()) < 1e-6


# --- bad input: clear errors, model untouched -----------------------------------------------------------


def _assert_fails_cleanly(model, config, exc, *needles, filter_fn=None):
    before = state_snapshot(model)
    with pytest.raises(exc) as info:
        hs.sparsify_model(model, config, filter_fn=filter_fn)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in error message: {message}"
    assert_same_state(model, before)
    assert not hs.is_sparsified(model) and not hasattr(model, "hf_sparse_config")
    return message


def test_targets_matching_nothing_lists_candidates():
    model = tiny_model("llama")
    message = _assert_fails_cleanly(model, hs.SparseConfig(target_modules=["nonexistent_proj"]), ValueError,
                                    "target_modules=['nonexistent_proj']", "model.layers.0.mlp.down_proj",
                                    "model.layers.1.self_attn.q_proj")
    assert "Candidate module names" in message
    _assert_fails_cleanly(model, hs.SparseConfig(target_modules=r"^nothing.*"), ValueError, "'^nothing.*'",
                          "model.layers.0.mlp.gate_proj")
    _assert_fails_cleanly(model, hs.SparseConfig(exclude_modules=r".*"), ValueError, "exclude_modules='.*'")
    _assert_fails_cleanly(model, hs.SparseConfig(granularity="weight", target_modules=["nope"]), ValueError,
                          "['nope']", "model.layers.0.self_attn.o_proj")
    _assert_fails_cleanly(model, hs.SparseConfig(), ValueError, "matched no module", filter_fn=lambda m, n: False)


@pytest.mark.parametrize("bad_path", ["embed_tokens", "norm"])
def test_unsupported_layer_type(bad_path):
    model = tiny_model("llama")
    spec = {"mlp": {"anchor": r"model", "members": [{"path": bad_path, "role": "out"},
                                                    {"path": "layers.0.mlp.down_proj", "role": "in"}]}}
    kind = "Embedding" if bad_path == "embed_tokens" else "LlamaRMSNorm"
    _assert_fails_cleanly(model, hs.SparseConfig(granularity=["neuron"], architecture=spec), TypeError, kind,
                          f"model.{bad_path}", "nn.Linear")


def test_unsupported_layer_type_layernorm_bert():
    model = tiny_model("bert")
    spec = {"mlp": {"anchor": r"layer\.\d+", "members": [{"path": "intermediate.dense", "role": "out"},
                                                        {"path": "output.LayerNorm", "role": "in"}]}}
    _assert_fails_cleanly(model, hs.SparseConfig(granularity=["neuron"], architecture=spec), TypeError, "LayerNorm",
                          "bert.encoder.layer.0.output.LayerNorm")


def test_unknown_architecture_without_targets():
    import transformers as tf

    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    _assert_fails_cleanly(t5, hs.SparseConfig(), ValueError, "model_type='t5'", "architecture=", "target_modules")
    _assert_fails_cleanly(t5, hs.SparseConfig(granularity="weight"), ValueError, "model_type='t5'")
    _assert_fails_cleanly(_MyNet(), hs.SparseConfig(), ValueError, "model_type='my-net'")
    _assert_fails_cleanly(nn.Sequential(nn.Linear(4, 4)), hs.SparseConfig(), ValueError, "model_type=None")


def test_bad_architecture_specs():
    model = tiny_model("llama")
    _assert_fails_cleanly(model, hs.SparseConfig(architecture={"mlp": {"anchor": "x"}}), ValueError, "architecture['mlp']")
    _assert_fails_cleanly(model, hs.SparseConfig(architecture={"ffn": {}}), ValueError, "unknown keys ['ffn']")
    only_out = {"mlp": {"anchor": r"layers\.\d+\.mlp", "members": [{"path": "up_proj", "role": "out"}]}}
    _assert_fails_cleanly(model, hs.SparseConfig(architecture=only_out), ValueError, "'in'")
    _assert_fails_cleanly(model, hs.SparseConfig(granularity=["head"], architecture=LLAMA_MLP_SPEC), ValueError,
                          "['head']")
    wrong_width = {"mlp": {"anchor": r"layers\.\d+\.mlp", "members": [{"path": "gate_proj", "role": "out"},
                                                                      {"path": "up_proj", "role": "in"}]}}
    _assert_fails_cleanly(model, hs.SparseConfig(granularity=["neuron"], architecture=wrong_width), ValueError,
                          "model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "opt"])
def test_already_sparsified(arch):
    model = hs.sparsify_model(tiny_model(arch), hs.SparseConfig())
    structure = hs.SparseStructure(model)
    structure.set_masks(random_group_masks(structure, seed=0))
    _assert_fails_cleanly_sparse(model)


def _assert_fails_cleanly_sparse(model):
    before = state_snapshot(model)
    config = model.hf_sparse_config
    with pytest.raises(ValueError, match="already sparsified"):
        hs.sparsify_model(model, hs.SparseConfig(sparsity=0.9))
    assert_same_state(model, before)
    assert model.hf_sparse_config is config


@pytest.mark.parametrize("arch", ["gpt2", "opt", "llama"])
def test_failure_midway_rolls_back_everything(arch):
    """A clash on the last block's attention: every earlier group and layer swap (and the head attributes
    they track) must be undone."""
    model = tiny_model(arch)
    last_attn = {"gpt2": "transformer.h.1.attn", "opt": "model.decoder.layers.1.self_attn",
                 "llama": "model.layers.1.self_attn"}[arch]
    model.get_submodule(last_attn).sparse_heads = "taken"
    _assert_fails_cleanly(model, hs.SparseConfig(), ValueError, "sparse_heads", last_attn)


def test_failure_in_score_init_rolls_back(monkeypatch):
    import hf_sparse.patching as patching

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(patching, "init_scores", boom)
    model = tiny_model("gpt2")
    ref = _logits(model, "gpt2")
    _assert_fails_cleanly(model, hs.SparseConfig(), RuntimeError, "boom")
    torch.testing.assert_close(_logits(model, "gpt2"), ref, rtol=0, atol=0)


def test_config_type_is_checked():
    model = tiny_model("bert")
    _assert_fails_cleanly(model, {"sparsity": 0.5}, TypeError, "SparseConfig", "dict")


def test_get_sparse_config():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="not sparsified"):
        hs.get_sparse_config(model)
    config = hs.SparseConfig(sparsity=0.25)
    hs.sparsify_model(model, config)
    assert hs.get_sparse_config(model) is config
    assert isinstance(model.bert.encoder.layer[0].sparse_neurons, UnitGroup)
