"""PEFT parity: the generic tuner behaviours PEFT's own test-suite checks, on tiny models of six architectures."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from tiny_models import TARGETS, make_inputs, make_loss_inputs, make_model

from neuron_peft import NeuronSelectConfig, NeuronSelectLayer


def peft_model(arch, init_weights=False, seed=0, **kw):
    base = make_model(arch, seed)
    kw.setdefault("target_modules", TARGETS[arch])
    kw.setdefault("fan_in_fan_out", arch == "gpt2")
    cfg = NeuronSelectConfig(init_weights=init_weights, neuron_ratio=kw.pop("neuron_ratio", 0.25), **kw)
    return base, get_peft_model(copy.deepcopy(base), cfg)


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def layers(model):
    return [m for m in model.modules() if isinstance(m, NeuronSelectLayer)]


def test_identity_at_init(arch):
    base, model = peft_model(arch, init_weights=True)
    inputs = make_inputs(arch)
    torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=0)


def test_attributes_and_features(arch):
    base, model = peft_model(arch)
    found = layers(model)
    assert found, "no layer was adapted"
    for layer in found:
        k = layer.num_rows("default")
        assert layer.neuron_select_delta["default"].shape == (k, layer.in_features)
        assert layer.neuron_select_indices["default"].dtype == torch.long
        assert layer.in_features > 0 and layer.out_features > 0
    out = logits(model, make_inputs(arch))
    assert torch.isfinite(out).all()
    # init_weights=False must be a non-identity adapter
    assert not torch.allclose(out, logits(base, make_inputs(arch)))


def _dense_reference_output(base, model, inputs):
    """Independent reference: copy the base model and add every delta into full weight rows by hand."""
    ref = copy.deepcopy(base)
    ref_modules = dict(ref.named_modules())
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, NeuronSelectLayer):
            target = ref_modules[name]
            rows = layer.neuron_select_indices["default"]
            delta = layer.neuron_select_delta["default"].detach()
            with torch.no_grad():
                w = target.weight
                if layer.fan_in_fan_out:
                    w[:, rows] += delta.t().to(w.dtype)
                else:
                    w[rows] += delta.to(w.dtype)
                if "default" in layer.neuron_select_bias_delta:
                    target.bias[rows] += layer.neuron_select_bias_delta["default"].detach().to(target.bias.dtype)
    return logits(ref, inputs)


def test_forward_equals_dense_reference(arch):
    base, model = peft_model(arch)
    inputs = make_inputs(arch)
    torch.testing.assert_close(
        logits(model, inputs), _dense_reference_output(base, model, inputs), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("path", ["live", "additive"])
def test_merge_unmerge_and_unload(arch, path):
    base, model = peft_model(arch, update_path=path)
    inputs = make_inputs(arch)
    expected = logits(model, inputs)
    base_out = logits(base, inputs)
    weights_before = {k: v.clone() for k, v in base.state_dict().items()}
    fresh = copy.deepcopy(model)

    model.merge_adapter()
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    model.merge_adapter()  # idempotent: warns, does not merge twice
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    restored = model.get_base_model().state_dict()
    for key, value in weights_before.items():
        mkey = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        got = restored.get(key, restored.get(mkey))
        torch.testing.assert_close(got, value, rtol=0, atol=1e-6)

    merged = copy.deepcopy(model).merge_and_unload()
    assert not layers(merged)
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)
    unloaded = fresh.unload()
    torch.testing.assert_close(logits(unloaded, inputs), base_out, rtol=0, atol=0)


def test_safe_merge_detects_nan():
    _, model = peft_model("llama")
    inputs = make_inputs("llama")
    expected = logits(model, inputs)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    layer = layers(model)[0]
    with torch.no_grad():
        layer.neuron_select_delta["default"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)


def test_merge_fp16():
    base, model = peft_model("llama")
    model = model.to(torch.float16)
    layer = layers(model)[0]
    before = layer.get_base_layer().weight.clone()
    model.merge_adapter()
    rows = layer.neuron_select_indices["default"]
    expected = (before[rows].float() + layer.neuron_select_delta["default"].float()).half()
    torch.testing.assert_close(layer.get_base_layer().weight[rows], expected, rtol=0, atol=0)
    other = torch.ones(layer.out_features, dtype=torch.bool)
    other[rows] = False
    assert torch.equal(layer.get_base_layer().weight[other], before[other])


def test_disable_adapter(arch):
    base, model = peft_model(arch)
    inputs = make_inputs(arch)
    adapted = logits(model, inputs)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=0, atol=0)
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=0, atol=0)
    model.merge_adapter()
    with model.disable_adapter():  # disabling a merged adapter unmerges it
        torch.testing.assert_close(logits(model, inputs), logits(base, inputs), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip(arch, tmp_path):
    base, model = peft_model(arch)
    inputs = make_inputs(arch)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    files = sorted(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, NeuronSelectConfig)
    assert config.neurons == model.peft_config["default"].neurons  # picks are saved as explicit indices
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    # the saved file holds only deltas and indices
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert all("neuron_select_" in key for key in tensors)
    numel = sum(t.numel() for t in tensors.values())
    rows = sum(layer.num_rows("default") for layer in layers(model))
    max_in = max(layer.in_features for layer in layers(model))
    assert numel <= rows * (max_in + 2)


def test_save_with_selected_adapter_name_and_pickle(tmp_path):
    base, _ = peft_model("llama")
    cfg = NeuronSelectConfig(target_modules=TARGETS["llama"], init_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="fr")
    inputs = make_inputs("llama")
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "fr" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fr", adapter_name="fr")
    torch.testing.assert_close(logits(loaded, inputs), expected, rtol=0, atol=0)
    clone = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(logits(clone, inputs), expected, rtol=0, atol=0)


def test_multiple_adapters_set_and_delete(tmp_path):
    base, model = peft_model("llama", seed=0)
    inputs = make_inputs("llama")
    out_a = logits(model, inputs)
    model.add_adapter("other", NeuronSelectConfig(target_modules=["q_proj", "up_proj"], init_weights=False, seed=3))
    assert model.active_adapter == "default"
    torch.testing.assert_close(logits(model, inputs), out_a, rtol=0, atol=0)
    model.set_adapter("other")
    out_b = logits(model, inputs)
    assert not torch.allclose(out_a, out_b)
    # adapters trained separately can be loaded side by side
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(logits(loaded, inputs), out_a, rtol=0, atol=0)
    loaded.set_adapter("other")
    torch.testing.assert_close(logits(loaded, inputs), out_b, rtol=0, atol=0)

    with pytest.raises(ValueError):
        model.add_adapter("other", NeuronSelectConfig(target_modules=["q_proj"]))
    assert model.peft_config["other"].target_modules == {"q_proj", "up_proj"}  # not mutated

    model.delete_adapter("default")
    assert "default" not in model.peft_config
    for layer in layers(model):
        assert "default" not in layer.neuron_select_delta
        assert "default" not in layer.neuron_select_indices
    torch.testing.assert_close(logits(model, inputs), out_b, rtol=0, atol=0)
    with pytest.raises(ValueError):
        model.delete_adapter("nope")


def test_two_active_adapters_add_up():
    base, model = peft_model("llama")
    model.add_adapter(
        "b", NeuronSelectConfig(target_modules=TARGETS["llama"], init_weights=False, seed=7, neuron_ratio=0.3)
    )
    inputs = make_inputs("llama")
    model.base_model.set_adapter(["default", "b"])
    both = logits(model, inputs)
    merged = copy.deepcopy(model).merge_and_unload(adapter_names=["default", "b"])
    torch.testing.assert_close(both, logits(merged, inputs), rtol=1e-5, atol=1e-5)


def test_delete_merged_adapter_raises():
    _, model = peft_model("llama")
    model.add_adapter("b", NeuronSelectConfig(target_modules=TARGETS["llama"], init_weights=False))
    model.merge_adapter()
    with pytest.raises(ValueError):
        model.delete_adapter("default")


def test_training_updates_only_adapter_parameters(arch):
    base, model = peft_model(arch)
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("neuron_select_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        loss = model(**make_loss_inputs(arch)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p, before[n]), n
        else:
            assert p.grad is None, n
            # base weights read through state_dict: the live rows must not leak out
    state = model.state_dict()
    for n, p in before.items():
        if n not in trainable:
            torch.testing.assert_close(state[n], p, rtol=0, atol=0)


def test_modules_to_save_and_requires_grad():
    base = make_model("llama")
    cfg = NeuronSelectConfig(target_modules=["q_proj"], modules_to_save=["lm_head"], init_weights=False)
    model = get_peft_model(base, cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in n for n in names)
    assert any("neuron_select_delta" in n for n in names)
    model.add_adapter("b", NeuronSelectConfig(target_modules=["q_proj"], init_weights=False))
    # the inactive adapter does not train
    assert not any(".b" in n and "neuron_select" in n for n, p in model.named_parameters() if p.requires_grad)
    model.set_adapter("b")
    assert any(n.endswith(".b") for n, p in model.named_parameters() if p.requires_grad and "neuron_select" in n)
    assert not any(
        n.endswith(".default") for n, p in model.named_parameters() if p.requires_grad and "neuron_select" in n
    )


def test_layers_to_transform_and_exclude():
    cfg = NeuronSelectConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers")
    model = get_peft_model(make_model("llama"), cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, NeuronSelectLayer)]
    assert names and all(".layers.1." in n for n in names)
    cfg = NeuronSelectConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    model = get_peft_model(make_model("llama"), cfg)
    names = [n for n, m in model.named_modules() if isinstance(m, NeuronSelectLayer)]
    assert names and all(n.endswith("q_proj") for n in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_base_with_fp32_adapter(dtype, autocast):
    base = make_model("llama").to(dtype)
    model = get_peft_model(base, NeuronSelectConfig(target_modules=TARGETS["llama"], init_weights=False))
    for layer in layers(model):
        assert layer.neuron_select_delta["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype
        assert layer.get_base_layer().weight.dtype == dtype
    model.train()
    inputs = make_loss_inputs("llama")
    with torch.autocast("cpu", dtype=dtype, enabled=autocast):
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    out.loss.backward()
    for layer in layers(model):
        assert layer.neuron_select_delta["default"].grad.dtype == torch.float32
        assert torch.isfinite(layer.neuron_select_delta["default"].grad).all()


def test_fp32_base_under_bf16_autocast():
    base = make_model("llama")
    model = get_peft_model(base, NeuronSelectConfig(target_modules=TARGETS["llama"], init_weights=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**make_loss_inputs("llama"))
    assert out.logits.dtype in (torch.bfloat16, torch.float32)
    out.loss.backward()
    assert all(layer.neuron_select_delta["default"].grad is not None for layer in layers(model))


def test_neuron_init_magnitude_and_random():
    base = make_model("llama")
    cfg = NeuronSelectConfig(target_modules=["up_proj"], neuron_ratio=0.25, neuron_init="magnitude")
    model = get_peft_model(copy.deepcopy(base), cfg)
    w = base.model.layers[0].mlp.up_proj.weight
    expected = sorted(torch.topk(w.norm(dim=1), 16).indices.tolist())
    assert model.peft_config["default"].neurons["model.layers.0.mlp.up_proj"] == expected
    picks = []
    for _ in range(2):
        cfg = NeuronSelectConfig(target_modules=["up_proj"], neuron_ratio=0.25, neuron_init="random", seed=5)
        picks.append(get_peft_model(copy.deepcopy(base), cfg).peft_config["default"].neurons)
    assert picks[0] == picks[1]  # seeded
    other = NeuronSelectConfig(target_modules=["up_proj"], neuron_ratio=0.25, neuron_init="random", seed=6)
    assert get_peft_model(copy.deepcopy(base), other).peft_config["default"].neurons != picks[0]


def test_explicit_rows_and_language_rows_kept_apart():
    base = make_model("llama")
    cfg = NeuronSelectConfig(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        neurons={"model.layers.0.mlp.up_proj": [3, 17, 42]},
        language_neurons={"fr": {"model.layers.0.mlp.up_proj": [5]}, "de": {"model.layers.0.mlp.up_proj": [8, 9]}},
    )
    model = get_peft_model(base, cfg)
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    assert layer.neuron_select_indices["default"].tolist() == [3, 17, 42, 8, 9, 5]
    # groups in sorted order: de=0, fr=1; -1 = agnostic
    assert layer.neuron_select_row_groups["default"].tolist() == [-1, -1, -1, 0, 0, 1]


def test_train_bias_false_has_no_bias_delta():
    model = get_peft_model(make_model("qwen2"), NeuronSelectConfig(target_modules=["q_proj"], train_bias=False))
    assert all(not layer.neuron_select_bias_delta for layer in layers(model))
    model = get_peft_model(make_model("qwen2"), NeuronSelectConfig(target_modules=["q_proj"], train_bias=True))
    assert all("default" in layer.neuron_select_bias_delta for layer in layers(model))


def test_tied_lm_head_uses_additive_path():
    base = make_model("gemma3")  # ties lm_head to the embeddings
    assert base.lm_head.weight is base.model.embed_tokens.weight
    emb = base.model.embed_tokens.weight.clone()
    model = get_peft_model(base, NeuronSelectConfig(target_modules=["lm_head"], init_weights=False))
    layer = model.base_model.model.lm_head
    assert layer.weight_is_shared
    model.train()
    model(**make_loss_inputs("gemma3")).loss.backward()
    torch.testing.assert_close(model.base_model.model.model.embed_tokens.weight, emb, rtol=0, atol=0)
