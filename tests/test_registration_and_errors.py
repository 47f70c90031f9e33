"""Registration with PEFT/transformers entry points, and clear errors for every kind of bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TARGETS, make_inputs, make_model
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file, save_file

import neuron_peft
from neuron_peft import AdapterMismatchError, NeuronSelectConfig
from neuron_peft.registration import AdapterFileError


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def saved_adapter(tmp_path, arch="llama", **kw):
    base = make_model(arch)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir)
    cfg = NeuronSelectConfig(target_modules=TARGETS[arch], init_weights=False, **kw)
    model = get_peft_model(copy.deepcopy(base), cfg)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return base, model, out


def test_peft_type_member_and_config_file(tmp_path):
    assert PeftType("NEURON_SELECT") is neuron_peft.NEURON_SELECT_PEFT_TYPE
    assert PeftType.NEURON_SELECT.value.lower() + "_" == "neuron_select_"
    _, _, out = saved_adapter(tmp_path)
    data = json.loads((out / "adapter_config.json").read_text())
    assert data["peft_type"] == "NEURON_SELECT"
    assert isinstance(PeftConfig.from_pretrained(out), NeuronSelectConfig)
    neuron_peft.register()  # idempotent


def test_auto_peft_model_causal(tmp_path):
    base, model, out = saved_adapter(tmp_path)
    inputs = make_inputs("llama")
    loaded = AutoPeftModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_auto_peft_model_seq2seq(tmp_path):
    base, model, out = saved_adapter(tmp_path, arch="t5")
    inputs = make_inputs("t5")
    loaded = AutoPeftModelForSeq2SeqLM.from_pretrained(out)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_transformers_load_adapter(tmp_path):
    base, model, out = saved_adapter(tmp_path)
    inputs = make_inputs("llama")
    fresh = copy.deepcopy(base)
    fresh.load_adapter(str(out))
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), rtol=0, atol=0)
    fresh.disable_adapters()
    torch.testing.assert_close(logits(fresh, inputs), logits(base, inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input
def test_unknown_module_name():
    cfg = NeuronSelectConfig(target_modules=["up_proj"], neurons={"model.layers.9.mlp.up_proj": [1]})
    with pytest.raises(AdapterMismatchError, match="unknown module 'model.layers.9.mlp.up_proj'"):
        get_peft_model(make_model("llama"), cfg)


def test_row_index_out_of_range():
    cfg = NeuronSelectConfig(target_modules=["up_proj"], neurons={"model.layers.0.mlp.up_proj": [1, 64]})
    with pytest.raises(AdapterMismatchError, match=r"model.layers.0.mlp.up_proj.*row index 64 out of range.*64"):
        get_peft_model(make_model("llama"), cfg)


def test_module_not_targeted():
    cfg = NeuronSelectConfig(target_modules=["q_proj"], neurons={"model.layers.0.mlp.up_proj": [1]})
    with pytest.raises(AdapterMismatchError, match="not targeted"):
        get_peft_model(make_model("llama"), cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"neurons": {"m": [1, 1]}}, "duplicate"),
        ({"neurons": {"m": [1, 2]}, "language_neurons": {"fr": {"m": [2]}}}, "both"),
        ({"language_neurons": {"fr": {"m": [3]}, "de": {"m": [3]}}}, "both"),
        ({"neurons": {"m": [-1]}}, "negative"),
        ({"neurons": {"m": [1.5]}}, "not an integer"),
        ({"language_neurons": {"": {"m": [1]}}}, "non-empty"),
        ({"language_neurons": {"  ": {"m": [1]}}}, "non-empty"),
        ({"neuron_ratio": 0.0}, r"\(0, 1\]"),
        ({"neuron_ratio": 1.5}, r"\(0, 1\]"),
        ({"neuron_ratio": -0.1}, r"\(0, 1\]"),
        ({"neuron_init": "taylor"}, "neuron_init"),
        ({"update_path": "fast"}, "update_path"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NeuronSelectConfig(target_modules=["m"], **kwargs)


def test_empty_row_lists_rejected():
    cfg = NeuronSelectConfig(target_modules=["up_proj"], neurons={"model.layers.0.mlp.up_proj": []})
    with pytest.raises(AdapterMismatchError, match="no rows"):
        get_peft_model(make_model("llama"), cfg)


def test_corrupt_and_truncated_adapter_file(tmp_path):
    base, _, out = saved_adapter(tmp_path)
    path = out / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupt or truncated adapter file"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)


def test_adapter_missing_tensor_is_not_a_partial_load(tmp_path):
    base, _, out = saved_adapter(tmp_path)
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = next(k for k in tensors if k.endswith("up_proj.neuron_select_delta"))
    del tensors[dropped]
    save_file(tensors, path)
    with pytest.raises(AdapterMismatchError, match=r"up_proj.*incomplete adapter"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)


def test_adapter_indices_disagreeing_with_config(tmp_path):
    base, _, out = saved_adapter(tmp_path)
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.neuron_select_indices"))
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, path)
    with pytest.raises(AdapterMismatchError, match="differ from adapter_config.json"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)


def test_adapter_for_a_different_model(tmp_path):
    _, _, out = saved_adapter(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    smaller = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises(AdapterMismatchError, match=r"mlp\.(up|down)_proj"):
        PeftModel.from_pretrained(smaller, out)
    wider = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises((AdapterMismatchError, RuntimeError), match=r"proj"):
        PeftModel.from_pretrained(wider, out)


def test_push_to_hub_goes_through_peft(tmp_path, monkeypatch):
    """push_to_hub uploads exactly what save_pretrained writes (the Hub client is replaced: no network)."""
    import transformers.utils.hub as hub
    from huggingface_hub import ModelCard, ModelCardData

    pushed = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as f:
                    pushed[op.path_in_repo] = f.read()
            return "ok"

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: ModelCard.from_template(ModelCardData()))
    base, model, out = saved_adapter(tmp_path)
    model.push_to_hub("me/neuron-select-test")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(pushed)
    assert pushed["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert json.loads(pushed["adapter_config.json"])["peft_type"] == "NEURON_SELECT"


def test_model_card_has_selection_summary(tmp_path):
    _, _, out = saved_adapter(tmp_path)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "neuron-select" in card
    assert "base_model:" in card
    assert "## NeuronSelect adapter" in card and "selected rows" in card and "trainable parameters" in card
