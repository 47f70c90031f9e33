"""Calibration-driven neuron selection: streamed Taylor scores vs an independent autograd reference, the layer /
row decision, persistence, the config it produces, and clear errors on bad input."""

from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import peft
import pytest
import torch
import torch.nn.functional as F
from testing_utils import calibration, make_batch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import neuron_peft  # noqa: F401  (registers the PEFT method)
from neuron_peft import AdapterMismatchError, NeuronSelectLayer
from neuron_peft.selection import NeuronSelection, model_part, resolve_target_modules, select_neurons

VOCAB = 64


def tiny_llama(layers=2, intermediate=64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def reference_scores(model, calib, names):
    """Independent reference: retain_grad on each layer output of a copy, backward of the summed token loss,
    then mean over loss positions (t with labels[t+1] != -100; other shapes: all positions) of |a * dL/da|."""
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    out = {}
    for group, batches in calib.items():
        sums = {n: 0.0 for n in names}
        counts = {n: 0 for n in names}
        for batch in batches:
            acts = {}

            def keep(module, args, output, name, acts=acts):
                output.retain_grad()
                acts[name] = output

            hooks = [modules[n].register_forward_hook(lambda m, a, o, n=n: keep(m, a, o, n)) for n in names]
            shift = batch["labels"][:, 1:] != -100
            loss = model(**batch).loss * int(shift.sum())
            loss.backward()
            for h in hooks:
                h.remove()
            for n in names:
                a = acts[n]
                per_pos = (a * a.grad).abs()
                if a.dim() == 3 and a.shape[:2] == batch["labels"].shape:
                    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
                    mask[:, :-1] = shift
                    sums[n] = sums[n] + per_pos[mask].sum(0)
                    counts[n] += int(mask.sum())
                else:
                    sums[n] = sums[n] + per_pos.reshape(-1, a.shape[-1]).sum(0)
                    counts[n] += per_pos.reshape(-1, a.shape[-1]).shape[0]
            model.zero_grad(set_to_none=True)
        out[group] = {n: sums[n] / counts[n] for n in names}
    return out


class TinyVLM(nn.Module):
    """A vision tower + projector + language stack with HF-style names and a causal loss."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.vision_tower = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        self.multi_modal_projector = nn.Linear(16, 32)
        self.embed = nn.Embedding(VOCAB, 32)
        self.layers = nn.ModuleList(nn.Linear(32, 32) for _ in range(4))
        self.lm_head = nn.Linear(32, VOCAB)

    def forward(self, input_ids, labels, pixel_values, attention_mask=None):
        image = self.multi_modal_projector(self.vision_tower(pixel_values)).mean(1, keepdim=True)
        h = self.embed(input_ids) + image
        for layer in self.layers:
            h = torch.tanh(layer(h))
        logits = self.lm_head(h)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def vlm_batch(seed, **kw):
    g = torch.Generator().manual_seed(seed + 100)
    return make_batch(seed, pixel_values=torch.randn(2, 5, 8, generator=g), **kw)


VLM_TARGETS = r".*(vision_tower\.[02]|multi_modal_projector|layers\.\d+)"


# ---------------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_streamed_scores_match_reference(arch):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    calib = calibration()
    sel = select_neurons(model, calib, target_modules="all-linear", progress=False)
    ref = reference_scores(model, calib, sel.layers)
    assert "lm_head" not in sel.layers and len(sel.layers) == (14 if arch == "llama" else 8)
    for g, group in enumerate(sel.groups):
        for name in sel.layers:
            torch.testing.assert_close(sel.neuron_scores[name][g], ref[group][name].float(), rtol=1e-4, atol=1e-7)
    assert all(s.dtype == torch.float32 for s in sel.neuron_scores.values())
    assert sel.loss_tokens == {"fr": 20, "de": 10}  # per batch: 6 + 4 labelled positions


def test_vision_positions_and_parts_budgeted_separately():
    model = TinyVLM()
    calib = {"fr": [vlm_batch(0), vlm_batch(1)], "de": [vlm_batch(2)]}
    ratios = {"vision": 0.5, "projector": 1.0, "language": 0.5}
    sel = select_neurons(model, calib, target_modules=VLM_TARGETS, layer_ratio=ratios, row_selection="layers",
                         progress=False)  # fmt: skip
    assert sel.parts == ["vision", "vision", "projector"] + ["language"] * 4
    ref = reference_scores(model, calib, sel.layers)
    for g, group in enumerate(sel.groups):
        for name in sel.layers:
            torch.testing.assert_close(sel.neuron_scores[name][g], ref[group][name].float(), rtol=1e-4, atol=1e-7)
    kept_parts = [p for n, p in zip(sel.layers, sel.parts) if n in sel.kept_layers]
    assert kept_parts.count("vision") == 1 and kept_parts.count("projector") == 1 and kept_parts.count("language") == 2
    # layer scores are normalised per part and group
    for part in ("vision", "language"):
        idx = [i for i, p in enumerate(sel.parts) if p == part]
        torch.testing.assert_close(sel.layer_scores[idx].sum(0), torch.ones(2))
    with pytest.raises(ValueError, match="no entry for part"):
        select_neurons(model, calib, target_modules=VLM_TARGETS, layer_ratio={"language": 0.5}, progress=False)
    assert model_part("visual.merger.mlp.0") == "projector" and model_part("model.vision_model.fc1") == "vision"


def test_model_state_restored_and_no_grads():
    model = tiny_llama().train()
    model.model.layers[0].eval()
    model.model.embed_tokens.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    select_neurons(model, calibration(), target_modules=["q_proj", "down_proj"], progress=False)
    for n, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[n] and torch.equal(p, before[n])
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert not any(m._forward_hooks for m in model.modules())


# ---------------------------------------------------------------------------------------------------- decision
def test_ratios_disjointness_and_ownership():
    model = tiny_llama()
    sel = select_neurons(
        model, calibration(), target_modules="all-linear", layer_ratio=0.4, neuron_ratio=0.5, specific_ratio=0.25,
        row_selection="layers", progress=False,
    )  # fmt: skip
    assert len(sel.kept_layers) == round(0.4 * 14)
    imp = sel.layer_importance()
    kept_idx = [sel.layers.index(n) for n in sel.kept_layers]
    dropped = [i for i in range(len(sel.layers)) if i not in kept_idx]
    assert imp[kept_idx].min() >= imp[dropped].max()
    norm, var = sel.normalised_scores(), sel.neuron_variance()
    for name in sel.kept_layers:
        n_out = sel.out_features[sel.layers.index(name)]
        agn = sel.neurons.get(name, [])
        spec = {g: sel.language_neurons.get(g, {}).get(name, []) for g in sel.groups}
        rows = agn + [r for rs in spec.values() for r in rs]
        k = round(0.5 * n_out)
        assert len(rows) == len(set(rows)) == k
        assert sum(len(r) for r in spec.values()) == round(0.25 * k)
        importance = norm[name].mean(0)
        assert importance[rows].min() >= importance[[r for r in range(n_out) if r not in rows]].max()
        all_spec = [r for rs in spec.values() for r in rs]
        if agn and all_spec:
            assert var[name][all_spec].min() >= var[name][agn].max()
        for g, rs in spec.items():
            for r in rs:
                assert sel.groups[int(norm[name][:, r].argmax())] == g
    assert set(sel.neurons) | {n for rs in sel.language_neurons.values() for n in rs} == set(sel.kept_layers)


def test_single_group_is_all_agnostic():
    sel = select_neurons(tiny_llama(), {"en-fr": [make_batch(0)]}, layer_ratio=1.0, neuron_ratio=1.0, progress=False)
    assert sel.language_neurons == {}
    assert all(len(sel.neurons[n]) == sel.out_features[i] for i, n in enumerate(sel.layers))
    assert sel.to_config().language_neurons is None


def test_deterministic_and_generators_accepted():
    model = tiny_llama()
    a = select_neurons(model, calibration(), neuron_ratio=0.5, progress=False)
    gen = {g: (b for b in batches) for g, batches in calibration().items()}
    b = select_neurons(model, gen, neuron_ratio=0.5, progress=False)
    assert a.kept_layers == b.kept_layers and a.neurons == b.neurons and a.language_neurons == b.language_neurons
    for n in a.layers:
        assert torch.equal(a.neuron_scores[n], b.neuron_scores[n])


# ---------------------------------------------------------------------------------------------------- activation similarity
def test_activation_similarity_finds_changed_layer():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.model.layers[1].mlp.down_proj.weight.add_(torch.randn(32, 64) * 0.5)
    sel = select_neurons(
        model, calibration(), layer_ratio=1 / 14, layer_scoring="activation_similarity", reference_model=reference,
        progress=False,
    )  # fmt: skip
    assert sel.kept_layers == ["model.layers.1.mlp.down_proj"]
    others = [i for i, n in enumerate(sel.layers) if n != "model.layers.1.mlp.down_proj"]
    assert sel.layer_scores[others].abs().max() < 1e-5
    # a LoRA PeftModel reference is looked up under base_model.model.
    lora = peft.get_peft_model(
        copy.deepcopy(model), peft.LoraConfig(target_modules=["v_proj"], init_lora_weights=False, r=2)
    )
    sel2 = select_neurons(
        model, calibration(), target_modules=["v_proj", "q_proj"], layer_ratio=0.5,
        layer_scoring="activation_similarity", reference_model=lora, progress=False,
    )  # fmt: skip
    assert all(n.endswith("v_proj") for n in sel2.kept_layers)


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_config_trains_exactly_the_selected_rows(arch):
    model = tiny_llama() if arch == "llama" else tiny_gpt2()
    sel = select_neurons(model, calibration(), layer_ratio=0.5, neuron_ratio=0.5, specific_ratio=0.3, progress=False)
    cfg = sel.to_config(copy.deepcopy(model), train_bias=True)
    assert cfg.fan_in_fan_out == (arch == "gpt2")
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    pm(**make_batch(5), neuron_groups=["fr", "de"]).loss.backward()  # one sample per group: every row learns
    layers = {n.removeprefix("base_model.model."): m for n, m in pm.named_modules() if isinstance(m, NeuronSelectLayer)}
    assert sorted(layers) == sorted(sel.kept_layers)
    groups = cfg.groups
    for name, layer in layers.items():
        idx = layer.neuron_select_indices["default"].tolist()
        row_groups = layer.neuron_select_row_groups["default"].tolist()
        expected = {r: -1 for r in sel.neurons.get(name, [])}
        for g, rows in sel.language_neurons.items():
            expected.update({r: groups.index(g) for r in rows.get(name, [])})
        assert dict(zip(idx, row_groups)) == expected
        grad = layer.neuron_select_delta["default"].grad
        assert grad is not None and (grad.abs().sum(1) > 0).all()
    assert all(p.grad is None for n, p in pm.named_parameters() if "neuron_select_" not in n)
    # routed to "fr" only: "de"-owned rows get no gradient, "fr" and agnostic rows do
    pm.zero_grad(set_to_none=True)
    pm(**make_batch(6), neuron_groups=["fr", "fr"]).loss.backward()
    de = groups.index("de")
    for layer in layers.values():
        owned = layer.neuron_select_row_groups["default"] == de
        nonzero = layer.neuron_select_delta["default"].grad.abs().sum(1) > 0
        assert torch.equal(nonzero, ~owned)


def test_save_load_roundtrip(tmp_path):
    model = tiny_llama()
    sel = select_neurons(model, calibration(), neuron_ratio=0.5, specific_ratio=0.2, progress=False)
    sel.save(tmp_path / "sel")
    assert sorted(os.listdir(tmp_path / "sel")) == ["neuron_selection.json", "neuron_selection.safetensors"]
    json.loads((tmp_path / "sel" / "neuron_selection.json").read_text())
    back = NeuronSelection.load(tmp_path / "sel")
    for f in ("groups", "layers", "parts", "out_features", "kept_layers", "neurons", "language_neurons", "layer_ratio"):
        assert getattr(back, f) == getattr(sel, f), f
    assert torch.equal(back.layer_scores, sel.layer_scores)
    assert all(torch.equal(back.neuron_scores[n], sel.neuron_scores[n]) for n in sel.layers)
    assert back.to_config(model).to_dict()["neurons"] == sel.to_config(model).to_dict()["neurons"]
    with pytest.raises(FileNotFoundError, match="NeuronSelection.save"):
        NeuronSelection.load(tmp_path / "nothing")


def test_selection_on_wrong_model_fails_clearly(tmp_path):
    sel = select_neurons(tiny_llama(layers=2), calibration(), layer_ratio=1.0, progress=False)
    sel.save(tmp_path)
    sel = NeuronSelection.load(tmp_path)
    with pytest.raises(AdapterMismatchError, match="output rows"):
        sel.check_model(tiny_llama(intermediate=48))
    with pytest.raises(AdapterMismatchError, match="not a module"):
        sel.to_config(tiny_llama(layers=1))
    with pytest.raises(AdapterMismatchError, match="unknown module"):
        peft.get_peft_model(tiny_llama(layers=1), sel.to_config())
    with pytest.raises(TypeError, match="target_modules"):
        sel.to_config(target_modules=["q_proj"])


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_calibration_errors():
    model = tiny_llama()
    with pytest.raises(ValueError, match="'de' is empty"):
        select_neurons(model, {"fr": [make_batch(0)], "de": []}, progress=False)
    silent = make_batch(0)
    silent["labels"][:, 1:] = -100  # only position 0 has a label: nothing to predict after the shift
    with pytest.raises(ValueError, match="'de' has no loss tokens"):
        select_neurons(model, {"fr": [make_batch(0)], "de": [silent]}, progress=False)
    with pytest.raises(ValueError, match="non-empty dict"):
        select_neurons(model, {}, progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        select_neurons(model, {"fr": make_batch(0)}, progress=False)
    with pytest.raises(ValueError, match="group 'fr' batch 0: missing tensor 'labels'"):
        select_neurons(model, {"fr": [{"input_ids": make_batch(0)["input_ids"]}]}, progress=False)
    with pytest.raises(ValueError, match="missing tensor 'input_ids'"):
        select_neurons(model, {"fr": [{"labels": make_batch(0)["labels"]}]}, progress=False)


def test_non_finite_loss_names_group_and_batch():
    model = TinyVLM()
    bad = vlm_batch(3)
    bad["pixel_values"][0, 0, 0] = float("nan")
    calib = {"fr": [vlm_batch(0)], "de": [vlm_batch(1), bad]}
    with pytest.raises(FloatingPointError, match="group 'de' batch 1"):
        select_neurons(model, calib, target_modules=VLM_TARGETS, progress=False)
    assert all(p.requires_grad for p in model.parameters())  # state restored after the error
    assert not any(m._forward_hooks for m in model.modules())


def test_reference_model_mismatch():
    model = tiny_llama()
    with pytest.raises(AdapterMismatchError, match="no module"):
        select_neurons(model, calibration(), layer_scoring="activation_similarity", reference_model=tiny_llama(layers=1),
                       progress=False)  # fmt: skip
    with pytest.raises(AdapterMismatchError, match="output rows"):
        select_neurons(model, calibration(), layer_scoring="activation_similarity",
                       reference_model=tiny_llama(intermediate=48), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="needs reference_model"):
        select_neurons(model, calibration(), layer_scoring="activation_similarity", progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"layer_ratio": 0.0}, {"layer_ratio": 1.5}, {"neuron_ratio": -0.1}, {"neuron_ratio": 0},
        {"specific_ratio": 1.2}, {"layer_ratio": {"language": 0.0}}, {"layer_ratio": {"audio": 0.5}},
        {"layer_ratio": float("nan")}, {"layer_scoring": "magnitude"},
    ],
)  # fmt: skip
def test_bad_ratios(kwargs):
    with pytest.raises(ValueError):
        select_neurons(tiny_llama(), calibration(), progress=False, **kwargs)


def test_target_modules_resolution():
    model = tiny_llama()
    assert resolve_target_modules(model, ["up_proj"]) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert resolve_target_modules(model, r".*\.0\.mlp\.(up|down)_proj") == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"
    ]  # fmt: skip
    with pytest.raises(ValueError, match="matches no Linear"):
        resolve_target_modules(model, ["nope"])
    with pytest.raises(TypeError, match="not a Linear"):
        resolve_target_modules(model, ["mlp"])


# ---------------------------------------------------------------------------------------------------- reporting
def test_summary_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    sel = select_neurons(tiny_llama(), calibration(), neuron_ratio=0.5, progress=False)
    text = sel.summary()
    assert all(n in text for n in sel.layers) and "spec:fr" in text
    sel.plot_layers(tmp_path / "layers.png")
    sel.plot_neurons(tmp_path / "neurons.png")
    for f in ("layers.png", "neurons.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
