"""Column units stay exact under the tools users bring (the column counterpart of test_trust.py / test_quantized.py).

References, all independent of the tuner's code:
* a dense copy of the base model holding ``W0 + rows + columns`` as full trainable weights whose gradients are
  masked to the adapter's entries (`masked_reference`), trained by the same optimizer: ordinary autograd and SGD;
* the pristine base weights (W0) and hand-computed SWA / EMA averages of the deltas;
* for quantized bases, the dequantized weight plus the rows and columns added by hand, re-quantized by hand.
"""

from __future__ import annotations

import pytest
import test_quantized
import torch
from peft import get_peft_model
from test_columns import assert_base_is_w0, build_columns, dense_reference, other_rows
from test_quantized import (
    FakeBackend,
    FakeQuantLinear,
    bnb_quantize,
    dequantized_reference,
    fake_quant_model,
    inputs,
    logits,
    rel_err,
)
from testing_utils import accelerate_offload, adapted, expected_average
from tiny_models import make_loss_inputs, tiny_llama

from neuron_peft import NeuronSelectConfig, NeuronSelectLayer

# test_quantized's fixtures, shared: the fake int8 backend taught to PEFT, and the bitsandbytes device (or a skip)
fake_backend = test_quantized.fake_backend
bnb_device = test_quantized.bnb_device


def out_in(t, layer):
    """A weight-shaped tensor in (out, in) layout (GPT-2's Conv1D stores (in, out))."""
    return t.t() if layer.fan_in_fan_out else t


def unit_mask(layer, name="default"):
    """(out, in) 0/1 mask of the weight entries an adapter trains: its rows, and its columns in the other rows."""
    mask = torch.zeros(layer.out_features, layer.in_features)
    mask[layer.neuron_select_indices[name]] = 1.0
    if name in layer.neuron_select_col_indices:
        mask[other_rows(layer, name).unsqueeze(1), layer.neuron_select_col_indices[name].unsqueeze(0)] = 1.0
    return mask


def masked_reference(base, model):
    """`dense_reference` whose weight (and, where the rows train it, bias) gradients are masked to the adapter's
    entries, so any optimizer without weight decay moves exactly the entries the adapter owns."""
    ref = dense_reference(base, model)
    modules = dict(ref.named_modules())
    for name, layer in adapted(model).items():
        target = modules[name]
        mask = out_in(unit_mask(layer), layer)
        target.weight.register_hook(lambda g, m=mask: g * m)
        if "default" in layer.neuron_select_bias_delta:
            bias_mask = torch.zeros(layer.out_features)
            bias_mask[layer.neuron_select_indices["default"]] = 1.0
            target.bias.requires_grad_(True)
            target.bias.register_hook(lambda g, m=bias_mask: g * m)
    return ref


def assert_deltas_equal_reference_moves(model, ref, base, atol=1e-6):
    """Each delta equals how far the masked reference moved its entries from W0; nothing else moved."""
    ref_modules, base_modules = dict(ref.named_modules()), dict(base.named_modules())
    for name, layer in adapted(model).items():
        moved = out_in(ref_modules[name].weight - base_modules[name].weight, layer).detach()
        rows = layer.neuron_select_indices["default"]
        torch.testing.assert_close(layer.neuron_select_delta["default"].detach(), moved[rows], atol=atol, rtol=0)
        cols = layer.neuron_select_col_indices["default"]
        want = moved[other_rows(layer)][:, cols]
        torch.testing.assert_close(layer.neuron_select_col_delta["default"].detach(), want, atol=atol, rtol=0, msg=name)
        assert torch.count_nonzero(moved * (1 - unit_mask(layer))) == 0, name
        if "default" in layer.neuron_select_bias_delta:
            b_moved = (ref_modules[name].bias - base_modules[name].bias).detach()
            torch.testing.assert_close(layer.neuron_select_bias_delta["default"].detach(), b_moved[rows], atol=atol,
                                       rtol=0)  # fmt: skip


def eval_logits(model, arch, seed=4):
    model.eval()
    with torch.no_grad():
        return model(**make_loss_inputs(arch, seed=seed)).logits


def train_step(model, arch, seed):
    model.train()
    model(**make_loss_inputs(arch, batch=2, seq=7, seed=seed)).loss.backward()


# ---------------------------------------------------------------------------------------------------- optimizers
def manual_sgd(params, lr=0.1):
    """The hand-written loop: over every parameter that got a gradient, a write through ``.data``."""
    params = list(params)

    def step():
        for p in params:
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-lr)

    return step


def foreach_sgd(params, lr=0.1):
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=lr, momentum=0.9, foreach=True).step


SETUPS = {  # (arch, rows_too)
    "llama columns": ("llama", False),
    "llama rows and columns": ("llama", True),
    "gpt2 rows and columns": ("gpt2", True),
}


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("path", ["auto", "additive"])
@pytest.mark.parametrize("optimizer", ["manual_sgd", "foreach_sgd"])
def test_training_equals_the_dense_reference_trained_the_same_way(optimizer, path, setup):
    arch, rows_too = SETUPS[setup]
    base, model = build_columns(arch, path=path, rows_too=rows_too)
    ref = masked_reference(base, model)
    make = {"manual_sgd": manual_sgd, "foreach_sgd": foreach_sgd}[optimizer]
    model_step, ref_step = make(model.parameters()), make(ref.parameters())
    for step in range(3):
        for m, stepper in ((model, model_step), (ref, ref_step)):
            m.zero_grad()
            train_step(m, arch, seed=step)
            stepper()
        eval_logits(model, arch)  # a forward between updates, as an evaluation loop would do
    assert_deltas_equal_reference_moves(model, ref, base, atol=1e-5)
    torch.testing.assert_close(eval_logits(model, arch), eval_logits(ref, arch), atol=1e-5, rtol=1e-5)
    assert_base_is_w0(model, base)


# ---------------------------------------------------------------------------------------------------- AveragedModel
@pytest.mark.parametrize("rows_too", [False, True])
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_averaged_model_averages_column_deltas_and_keeps_w0(kind, rows_too):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    base, model = build_columns("llama", rows_too=rows_too)
    decay = 0.5
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay) if kind == "ema" else None)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    history = []
    for step in range(3):
        opt.zero_grad()
        train_step(model, "llama", seed=step)
        opt.step()
        eval_logits(model, "llama")
        avg.update_parameters(model)
        history.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert any("neuron_select_col_delta" in n for n in history[0])
    expected = expected_average(history, kind, decay)  # hand-computed average of the deltas
    averaged = dict(avg.module.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, atol=1e-6, rtol=1e-6, msg=name)
    assert_base_is_w0(avg.module, base)  # the frozen base weights were averaged as W0, never W0 + units
    want = eval_logits(dense_reference(base, avg.module), "llama")
    torch.testing.assert_close(eval_logits(avg.module, "llama"), want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- offloading
@pytest.mark.parametrize("rows_too", [False, True])
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device_map"])
def test_accelerate_offloaded_column_adapter_is_exact_or_refuses_training(how, rows_too, tmp_path):
    base, model = build_columns("llama", rows_too=rows_too)
    expected = eval_logits(dense_reference(base, model), "llama")
    accelerate_offload(model, how, tmp_path)
    offloaded = [layer for layer in adapted(model).values() if layer.neuron_select_col_delta["default"].is_meta]
    assert offloaded, "the test set-up offloaded no column delta"
    torch.testing.assert_close(eval_logits(model, "llama"), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="offloaded"):
        train_step(model, "llama", seed=1)


# ---------------------------------------------------------------------------------------------------- quantized bases
QUANT_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # the layers test_quantized.replace_linears quantizes


def quant_column_config(init_weights=False, rows_too=True) -> NeuronSelectConfig:
    """Every quantized layer: 3 agnostic columns, 2 per group (fr, de) and, with ``rows_too``, 2 agnostic rows."""
    gen = torch.Generator().manual_seed(0)
    probe = get_peft_model(tiny_llama(0), NeuronSelectConfig(target_modules=QUANT_TARGETS))
    columns, language, neurons = {}, {"fr": {}, "de": {}}, {}
    for name, layer in adapted(probe).items():
        perm = torch.randperm(layer.in_features, generator=gen).tolist()
        columns[name], language["fr"][name], language["de"][name] = perm[:3], perm[3:5], perm[5:7]
        if rows_too:
            neurons[name] = torch.randperm(layer.out_features, generator=gen)[:2].tolist()
    return NeuronSelectConfig(target_modules=QUANT_TARGETS, columns=columns, language_columns=language,
                              neurons=neurons or None, init_weights=init_weights)  # fmt: skip


def add_units(layer, w, sign=1.0):
    """``w`` (out, in) plus the adapter's rows and columns, written by hand (on ``w``'s device)."""
    w = w.clone()
    rows = layer.neuron_select_indices["default"].to(w.device)
    w[rows] += sign * layer.neuron_select_delta["default"].detach().to(w)
    others = torch.ones(layer.out_features, dtype=torch.bool, device=w.device)
    others[rows] = False
    cols = layer.neuron_select_col_indices["default"].to(w.device)
    col_delta = layer.neuron_select_col_delta["default"].detach().to(w)
    w[others.nonzero().flatten().unsqueeze(1), cols.unsqueeze(0)] += sign * col_delta
    return w


def scale_column_deltas(model, factor):
    with torch.no_grad():
        for layer in adapted(model).values():
            for store in (layer.neuron_select_delta, layer.neuron_select_col_delta):
                for p in store.values():
                    p.mul_(factor)


@pytest.mark.parametrize("rows_too", [False, True])
def test_fake_quantized_columns_are_additive_and_exact(fake_backend, rows_too):
    model = get_peft_model(fake_quant_model(), quant_column_config(rows_too=rows_too))
    scale_column_deltas(model, 10.0)
    layers = adapted(model)
    assert all(isinstance(m.quantization_backend, FakeBackend) and not m._live_allowed() for m in layers.values())
    q_before = {n: b.clone() for n, b in model.named_buffers() if n.endswith("base_layer.weight")}
    batch = inputs()
    ref = dequantized_reference(model, add_units)  # plain Linears: dequantized W + rows + columns
    ref.requires_grad_(False)
    for name in layers:
        ref.get_submodule(name).weight.requires_grad_(True)
    model.train()
    model(**batch, labels=batch["input_ids"], neuron_groups=["fr", "fr", "fr", "fr"]).loss.backward()
    ref(**batch, labels=batch["input_ids"]).loss.backward()  # every sample is "fr": fr and agnostic columns see all
    for name, layer in layers.items():
        g = ref.get_submodule(name).weight.grad
        col_groups = layer.neuron_select_col_groups["default"]
        keep = col_groups != model.peft_config["default"].groups.index("de")  # de columns: no gradient
        got = layer.neuron_select_col_delta["default"].grad
        want = g[other_rows(layer)][:, layer.neuron_select_col_indices["default"]]
        torch.testing.assert_close(got[:, keep], want[:, keep], atol=1e-6, rtol=1e-4, msg=name)
        assert torch.count_nonzero(got[:, ~keep]) == 0
        rows = layer.neuron_select_indices["default"]
        if rows.numel():
            torch.testing.assert_close(layer.neuron_select_delta["default"].grad, g[rows], atol=1e-6, rtol=1e-4)
    for n, b in model.named_buffers():
        if n.endswith("base_layer.weight"):
            assert torch.equal(b, q_before[n]), n  # nothing written into the quantized weights
    torch.testing.assert_close(logits(model, batch), logits(ref, batch), rtol=1e-5, atol=1e-5)


def test_fake_quantized_column_merge_unmerge_through_backend(fake_backend):
    calls, _ = fake_backend
    model = get_peft_model(fake_quant_model(), quant_column_config())
    scale_column_deltas(model, 10.0)
    layers = list(adapted(model).values())
    batch = inputs()
    unmerged = logits(model, batch)
    base_out = logits(dequantized_reference(model), batch)
    original = {id(m): m.get_base_layer().dequantize() for m in layers}
    with pytest.warns(UserWarning, match="re-quantizes"):
        model.merge_adapter()
    assert calls.count("get") == calls.count("set") == len(layers)
    for layer in layers:
        q, _ = FakeQuantLinear.quantize(add_units(layer, original[id(layer)]))  # re-quantize(dequantize(W) + units)
        assert torch.equal(layer.get_base_layer().weight, q)
    merged = logits(model, batch)
    assert rel_err(merged, unmerged) < 0.25 * rel_err(base_out, unmerged)  # lossy, but it carries the adapter

    merged_scale = {id(m): m.get_base_layer().scale.clone() for m in layers}
    model.unmerge_adapter()
    for layer in layers:
        restored = layer.get_base_layer().dequantize()
        bound = (merged_scale[id(layer)] + layer.get_base_layer().scale)[:, None] / 2 + 1e-6  # two roundings
        assert ((restored - original[id(layer)]).abs() <= bound).all()
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_bnb_columns_add_exact_updates_to_the_quantized_output(bnb_device, kind):
    model = get_peft_model(bnb_quantize(tiny_llama(0), kind, bnb_device), quant_column_config())
    for layer in adapted(model).values():
        assert isinstance(layer, NeuronSelectLayer) and not layer._live_allowed()
        x = torch.randn(2, 3, layer.in_features, device=bnb_device)
        with torch.no_grad():
            added = (layer(x) - layer.get_base_layer()(x)).float().cpu()
        dense = add_units(layer, torch.zeros(layer.out_features, layer.in_features))  # rows + columns, by hand
        expected = x.float().cpu() @ dense.t()
        torch.testing.assert_close(added, expected, rtol=1e-4, atol=1e-4)
    ids = inputs(bnb_device)["input_ids"]
    model.train()
    model(input_ids=ids, labels=ids, neuron_groups=["fr", "de", "de", "fr"]).loss.backward()
    assert all(layer.neuron_select_col_delta["default"].grad is not None for layer in adapted(model).values())
