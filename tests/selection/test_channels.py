"""Selection units other than rows (issue 26): input channels of output projections (``unit="channel"``) and whole
MLP neurons (``unit="mlp_neuron"``). Scores are checked against plain autograd (``retain_grad`` on the projection's
input), the split and budgets against hand-computed picks on crafted scores, and the produced dicts against the
`NeuronSelectConfig` contract (``columns`` / ``language_columns``); the end-to-end tests run once the tuner has
those fields."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from testing_utils import calibration, make_batch
from tiny_models import tiny_gemma3, tiny_gpt2, tiny_llama, tiny_qwen2, tiny_t5
from torch import nn
from transformers import LlamaForCausalLM

from neuron_peft import AdapterMismatchError
from neuron_peft.selection import UNITS, NeuronSelection, resolve_target_modules, select_neurons
from neuron_peft.selection.channels import unit_layers

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# output projections of the tiny models, in module order
PROJECTIONS = {
    "llama": [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.down_proj")],
    "gpt2": [f"transformer.h.{i}.{s}" for i in range(2) for s in ("attn.c_proj", "mlp.c_proj")],
}
READERS = {
    "llama": {f"model.layers.{i}.mlp.down_proj": [f"model.layers.{i}.mlp.{r}_proj" for r in ("gate", "up")]
              for i in range(2)},
    "gpt2": {f"transformer.h.{i}.mlp.c_proj": [f"transformer.h.{i}.mlp.c_fc"] for i in range(2)},
}  # fmt: skip


def reference_input_scores(model, calib, names):
    """Independent reference: a copy with trainable parameters, ``retain_grad`` on each layer's input (the tensor
    the model itself passes), backward of the summed token loss, then the mean over loss positions (t with
    labels[t+1] != -100) of |x * dL/dx| per input channel."""
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    out = {}
    for group, batches in calib.items():
        sums, count = {n: 0.0 for n in names}, 0
        for batch in batches:
            inputs = {}

            def keep(module, args, name, inputs=inputs):
                args[0].retain_grad()
                inputs[name] = args[0]

            hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: keep(m, a, n)) for n in names]
            shift = batch["labels"][:, 1:] != -100
            (model(**batch).loss * int(shift.sum())).backward()
            for h in hooks:
                h.remove()
            mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
            mask[:, :-1] = shift
            for n in names:
                x = inputs[n]
                sums[n] = sums[n] + (x * x.grad).abs()[mask].sum(0)
            count += int(mask.sum())
            model.zero_grad(set_to_none=True)
        out[group] = {n: sums[n] / count for n in names}
    return out


# ---------------------------------------------------------------------------------------------------- scores
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_channel_scores_and_top_columns_match_autograd(arch):
    """unit="channel" scores exactly the output projections' input channels (GPT-2: Conv1D, in = weight.shape[0]),
    and per layer the chosen columns are the top share by the group-normalised importance of the reference."""
    model = MODELS[arch]()
    sel = select_neurons(model, calibration(), unit="channel", neuron_ratio=0.5, specific_ratio=0.25, progress=False)
    assert sel.unit == "channel" and sel.layers == PROJECTIONS[arch]  # all-linear: q/k/v, gate/up, c_attn, c_fc left
    ref = reference_input_scores(model, calibration(), sel.layers)
    for g, group in enumerate(sel.groups):
        for name in sel.layers:
            torch.testing.assert_close(sel.neuron_scores[name][g], ref[group][name].float(), rtol=1e-4, atol=1e-7)
    widths = {n: int(s.shape[1]) for n, s in sel.neuron_scores.items()}
    if arch == "gpt2":
        assert list(widths.values()) == [32, 128, 32, 128] and all(sel.conv1d)
    # the top round(0.4 * 0.5 * in) columns by the reference's group-normalised importance
    mean = {g: torch.cat([ref[g][n] for n in sel.layers]).mean() for g in sel.groups}
    for name in sel.layers:
        importance = torch.stack([ref[g][name] / mean[g] for g in sel.groups]).mean(0)
        k = round(0.2 * widths[name])
        chosen = sel.columns.get(name, []) + [c for cols in sel.language_columns.values() for c in cols.get(name, [])]
        assert sorted(chosen) == sorted(torch.topk(importance, k).indices.tolist()), name
        assert sum(len(c.get(name, [])) for c in sel.language_columns.values()) == round(0.25 * k)
    assert sel.neurons == {} and sel.language_neurons == {}
    out = dict(zip(sel.layers, sel.out_features))
    assert sel.trained_weights() == sum(round(0.2 * widths[n]) * out[n] for n in sel.layers)  # a column: out weights


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_mlp_neuron_trains_the_same_j_in_readers_and_writer(arch):
    """mlp_neuron: one score per MLP neuron j (its writer's input channel j, the same as unit="channel"'s), and a
    chosen j is row j of every reader and column j of the writer, agnostic and per group alike."""
    model = MODELS[arch]()
    sel = select_neurons(model, calibration(), unit="mlp_neuron", neuron_ratio=0.5, specific_ratio=0.25,
                         progress=False)  # fmt: skip
    channel = select_neurons(model, calibration(), unit="channel", progress=False)
    assert sel.layers == list(READERS[arch]) and {w: list(r) for w, r in sel.readers.items()} == READERS[arch]
    for name in sel.layers:
        assert torch.equal(sel.neuron_scores[name], channel.neuron_scores[name])
    for writer, readers in READERS[arch].items():
        for reader in readers:
            assert sel.neurons[reader] == sel.columns[writer]
            for g in sel.groups:
                assert sel.language_neurons.get(g, {}).get(reader) == sel.language_columns.get(g, {}).get(writer)
        k = len(sel.columns[writer]) + sum(len(c.get(writer, [])) for c in sel.language_columns.values())
        assert k == round(0.2 * sel.neuron_scores[writer].shape[1])
    assert set(sel.language_columns) == {"fr", "de"}
    kw = sel.config_kwargs(model)
    assert kw["target_modules"] == [m for w, rs in READERS[arch].items() for m in [*rs, w]]
    assert kw.get("fan_in_fan_out", False) == (arch == "gpt2")
    hidden = 32
    per_neuron = hidden + hidden * len(next(iter(READERS[arch].values())))  # writer column + one row per reader
    n_units = sum(len(c) for c in sel.columns.values())
    n_units += sum(len(c) for lang in sel.language_columns.values() for c in lang.values())
    assert sel.trained_weights() == n_units * per_neuron


def tiny_mistral():
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return MistralForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [tiny_gemma3, tiny_qwen2, tiny_mistral], ids=["gemma3", "qwen2", "mistral"])
def test_blocks_found_by_name_in_gemma_qwen_mistral(make):
    """The Llama-style names hold in Gemma 3, Qwen2 and Mistral: o_proj/down_proj are the output projections, and
    every down_proj has gate_proj and up_proj (64 outputs = down_proj's 64 inputs) beside it."""
    names = resolve_target_modules(make(), "all-linear")
    layers, readers = unit_layers(make(), names, "channel")
    assert layers == PROJECTIONS["llama"] and readers == {}
    layers, readers = unit_layers(make(), names, "mlp_neuron")
    assert {w: list(r) for w, r in readers.items()} == READERS["llama"] and layers == list(READERS["llama"])
    assert all(r == {n: 32 for n in rs} for rs, r in zip(READERS["llama"].values(), readers.values()))


# ---------------------------------------------------------------------------------------------------- decision
O0 = "model.layers.0.self_attn.o_proj"
# each group's scores average 1 over the layer's channels, so the group normalisation leaves them as they are
CRAFTED = {"de": [2.0, 0.5, 1.0, 1.5, 0.2, 0.8], "fr": [1.0, 0.5, 2.6, 1.5, 0.1, 0.3]}


def crafted_selection(unit="channel", **options) -> NeuronSelection:
    """One o_proj with 4 outputs and 6 input channels; two groups with the CRAFTED channel scores."""
    options.setdefault("row_selection", "per_layer")
    sel = NeuronSelection(
        groups=["de", "fr"], layers=[O0], parts=["language"], out_features=[4], in_features=[6],
        neuron_scores={O0: torch.tensor([CRAFTED["de"], CRAFTED["fr"]])}, layer_scores=torch.ones(1, 2),
        layer_ratio={"language": 1.0}, unit=unit, **options,
    )  # fmt: skip
    sel.decide()
    return sel


def test_variance_split_and_owners_on_crafted_scores():
    """Hand-computed: importance (mean over groups) [1.5, .5, 1.8, 1.5, .15, .55] -> top 4 channels {2, 0, 3, 5};
    variance over groups ((de - fr) / 2)^2 = [.25, -, .64, 0, -, .0625] -> the 2 most variable (specific_ratio .5)
    are 2 (fr scores it higher) and 0 (de); 3 and 5 stay agnostic. 4 columns x 4 outputs = 16 weights."""
    sel = crafted_selection(weight_ratio=4 / 6, specific_ratio=0.5)
    assert sel.columns == {O0: [3, 5]}
    assert sel.language_columns == {"de": {O0: [0]}, "fr": {O0: [2]}}
    assert sel.neurons == {} and sel.language_neurons == {} and sel.kept_layers == [O0]
    assert sel.trained_weights() == 16
    kw = sel.config_kwargs()
    assert kw == {"target_modules": [O0], "neurons": None, "language_neurons": None, "columns": {O0: [3, 5]},
                  "language_columns": {"de": {O0: [0]}, "fr": {O0: [2]}}}  # fmt: skip
    # the same scores read as rows: the same picks land in neurons=, and no columns= is passed at all
    rows = NeuronSelection(groups=["de", "fr"], layers=[O0], parts=["language"], out_features=[6], in_features=[4],
                           neuron_scores={O0: torch.tensor([CRAFTED["de"], CRAFTED["fr"]])},
                           layer_scores=torch.ones(1, 2), layer_ratio={"language": 1.0}, weight_ratio=4 / 6,
                           specific_ratio=0.5, row_selection="per_layer")  # fmt: skip
    rows.decide()
    assert rows.unit == "row" and rows.neurons == {O0: [3, 5]} and rows.columns == {}
    assert "columns" not in rows.config_kwargs()


def test_budgets_count_a_column_as_out_features_weights():
    """global: 6 columns of 4 weights = 24; weight_ratio 0.5 buys 12 weights = the 3 most important columns (2, 0, 3);
    the 'layers' ranking with neuron_ratio 0.5 takes round(3) columns too."""
    sel = crafted_selection(row_selection="global", weight_ratio=0.5, specific_ratio=0.0)
    assert sel.columns == {O0: [0, 2, 3]} and sel.trained_weights() == 12
    sel = crafted_selection(row_selection="layers", neuron_ratio=0.5, specific_ratio=0.0)
    assert sel.columns == {O0: [0, 2, 3]}


def test_unit_validation():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"unit must be one of \('row', 'channel', 'mlp_neuron'\), got 'head'"):
        select_neurons(model, calibration(), unit="head", progress=False)
    for unit in ("channel", "mlp_neuron"):
        with pytest.raises(ValueError, match="activation_similarity.*unit='row' only"):
            select_neurons(model, calibration(), unit=unit, layer_scoring="activation_similarity",
                           reference_model=copy.deepcopy(model), progress=False)  # fmt: skip
    sel = crafted_selection()
    sel.unit = "head"
    with pytest.raises(ValueError, match="unit must be one of"):
        sel.decide()
    sel.unit = "mlp_neuron"  # an MLP-neuron decision without the readers of its writer
    with pytest.raises(ValueError, match="no readers recorded"):
        sel.decide()
    assert UNITS == ("row", "channel", "mlp_neuron")


class OddNames(nn.Module):
    """A causal LM whose MLP writer is called ``mlp.down_proj`` but has no gate/up projections beside it."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.mlp = nn.ModuleDict({"wi": nn.Linear(16, 32), "down_proj": nn.Linear(32, 16)})
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids, labels, attention_mask=None):
        h = self.embed(input_ids)
        logits = self.head(h + self.mlp["down_proj"](torch.relu(self.mlp["wi"](h))))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
        return {"loss": loss}


def test_models_without_the_blocks_fail_clearly():
    t5 = tiny_t5()
    with pytest.raises(ValueError, match=r"no output projection .*'o_proj', 'down_proj'.*suffixes are \[.*'wo'"):
        select_neurons(t5, calibration(), unit="channel", progress=False)
    with pytest.raises(ValueError, match=r"no MLP block .*mlp\.c_fc \(GPT-2\).*suffixes are \[.*'wi'"):
        select_neurons(t5, calibration(), unit="mlp_neuron", progress=False)
    with pytest.raises(ValueError, match=r"no output projection.*suffixes are \['q_proj'\]"):
        select_neurons(tiny_llama(), calibration(), target_modules=["q_proj"], unit="channel", progress=False)
    odd = OddNames()
    with pytest.raises(ValueError, match=r"'mlp.down_proj' has no Linear \['mlp.gate_proj', 'mlp.up_proj'\] beside"):
        select_neurons(odd, calibration(), target_modules=["down_proj"], unit="mlp_neuron", progress=False)
    # its down_proj is an output projection by name: the channel unit works there
    sel = select_neurons(odd, calibration(), unit="channel", progress=False)
    assert sel.layers == ["mlp.down_proj"] and sel.neuron_scores["mlp.down_proj"].shape == (2, 32)


# ---------------------------------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("unit", ["channel", "mlp_neuron"])
def test_save_load_roundtrip_keeps_the_unit(tmp_path, unit):
    model = tiny_llama()
    sel = select_neurons(model, calibration(), unit=unit, neuron_ratio=0.5, specific_ratio=0.25, progress=False)
    sel.save(tmp_path)
    back = NeuronSelection.load(tmp_path)
    for f in ("unit", "layers", "columns", "language_columns", "neurons", "language_neurons", "readers"):
        assert getattr(back, f) == getattr(sel, f), f
    assert all(torch.equal(back.neuron_scores[n], sel.neuron_scores[n]) for n in sel.layers)
    assert back.config_kwargs(model) == sel.config_kwargs(model)
    narrow = LlamaForCausalLM(model.config.__class__(**{**model.config.to_dict(), "intermediate_size": 48}))
    # channel: down_proj has its 32 rows but 48 input channels; mlp_neuron: gate_proj (checked first) has 48 rows
    with pytest.raises(AdapterMismatchError, match="64 input channels" if unit == "channel" else "64 output rows"):
        back.check_model(narrow)
    back.decide()  # re-deciding from the loaded scores gives the same units
    assert (back.columns, back.language_columns, back.neurons) == (sel.columns, sel.language_columns, sel.neurons)
    assert f"unit {unit!r}" in back.summary() and "spec:fr" in back.summary()


def test_older_files_load_as_rows_and_the_default_unit_is_row(tmp_path):
    model = tiny_llama()
    sel = select_neurons(model, calibration(), neuron_ratio=0.5, progress=False)
    assert sel.unit == "row" and sel.columns == {} and sel.language_columns == {} and sel.readers == {}
    explicit = select_neurons(model, calibration(), neuron_ratio=0.5, unit="row", progress=False)
    assert (explicit.neurons, explicit.language_neurons) == (sel.neurons, sel.language_neurons)
    assert "columns" not in sel.config_kwargs(model)
    sel.save(tmp_path)
    meta_path = tmp_path / "neuron_selection.json"
    meta = json.loads(meta_path.read_text())
    for key in ("unit", "columns", "language_columns", "readers"):  # a file written before units existed
        del meta[key]
    meta_path.write_text(json.dumps(meta))
    old = NeuronSelection.load(tmp_path)
    assert old.unit == "row" and old.columns == {} and old.neurons == sel.neurons
    old.decide()
    assert old.neurons == sel.neurons and old.language_neurons == sel.language_neurons


# ---------------------------------------------------------------------------------------------------- config
def test_to_config_refuses_the_fields_it_sets_from_the_selection():
    sel = select_neurons(tiny_llama(), calibration(), unit="channel", progress=False)
    with pytest.raises(TypeError, match="columns"):
        sel.to_config(columns={})


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("unit", ["channel", "mlp_neuron"])
def test_config_trains_exactly_the_selected_columns(arch, unit):
    """With the tuner: the config carries the chosen columns (and mlp_neuron's reader rows), adapts exactly the
    trained modules, and its trainable weights are `trained_weights()` (train_bias=False)."""
    import peft

    model = MODELS[arch]()
    sel = select_neurons(model, calibration(), unit=unit, neuron_ratio=0.5, specific_ratio=0.25, progress=False)
    cfg = sel.to_config(copy.deepcopy(model), train_bias=False)
    assert cfg.columns == sel.columns and cfg.language_columns == sel.language_columns
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable == sel.trained_weights()
    pm(**make_batch(5), neuron_groups=["fr", "de"]).loss.backward()
    assert all(p.grad is not None for p in pm.parameters() if p.requires_grad)
