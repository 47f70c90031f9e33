"""PEFT >= 0.22's ``convert_to_lora`` on a NeuronSelect adapter: the LoRA it writes computes what ours does.

Downstream tools that take only LoRA (diffusers, some serving stacks) get a NeuronSelect adapter through PEFT's
converter, which factorises each layer's additive delta by SVD. A row + column delta of k rows and c columns has
rank <= k + c, so a LoRA of that rank must reproduce the adapter exactly. The reference is independent of our
conversion hooks: the dense ``W0 + rows + columns`` model built by hand in test_columns.py, and PEFT's own LoRA
layers loaded from the converted state dict.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from test_columns import build_columns, column_config, dense_reference
from tiny_models import make_loss_inputs, make_model

from neuron_peft import NeuronSelectConfig

lora_conversion = pytest.importorskip("peft.tuners.lora.conversion", reason="convert_to_lora needs peft >= 0.22")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_converted_lora_computes_the_adapter(arch):
    # 2 rows + 3 columns per layer, random non-zero deltas; no bias entries (LoRA has no bias to hold them)
    base = make_model(arch)
    config = dataclasses.replace(column_config(arch, rows_too=True), train_bias=False)
    model = get_peft_model(copy.deepcopy(base), config)
    assert model.supports_lora_conversion()
    ref = dense_reference(base, model)
    lora_config, state_dict = lora_conversion.convert_to_lora(model, rank=5)

    lora = get_peft_model(copy.deepcopy(base), lora_config)
    result = set_peft_model_state_dict(lora, state_dict)
    assert not result.unexpected_keys
    inputs = make_loss_inputs(arch)
    with torch.no_grad():
        expected = ref(**inputs).logits
        torch.testing.assert_close(lora(**inputs).logits, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-4, rtol=1e-4)


def test_lower_rank_is_an_approximation_not_an_error():
    base, model = build_columns("llama", rows_too=True)
    _, state_dict = lora_conversion.convert_to_lora(model, rank=1)
    assert {t.shape[0] for k, t in state_dict.items() if k.endswith("lora_A.weight")} == {1}


def test_adapter_with_bias_entries_is_refused():
    """LoRA has no bias: converting an adapter that trains bias entries would drop them silently, so PEFT is told
    the layers do not support conversion and raises."""
    base = make_model("gpt2")  # c_attn / c_proj carry a bias
    config = NeuronSelectConfig(target_modules=["c_proj"], neuron_ratio=0.25, fan_in_fan_out=True, init_weights=False)
    model = get_peft_model(base, config)
    assert not model.supports_lora_conversion()
    with pytest.raises(TypeError, match="do not support LoRA conversion"):
        lora_conversion.convert_to_lora(model, rank=4)

    no_bias = NeuronSelectConfig(target_modules=["c_proj"], neuron_ratio=0.25, fan_in_fan_out=True, train_bias=False)
    assert get_peft_model(make_model("gpt2"), no_bias).supports_lora_conversion()


def test_merged_adapter_is_refused():
    _, model = build_columns("llama")
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        lora_conversion.convert_to_lora(model, rank=3)
    model.unmerge_adapter()
    lora_config, _ = lora_conversion.convert_to_lora(model, rank=3)
    assert isinstance(lora_config, LoraConfig)
