"""Sparse backward: every path's delta gradients equal the selected rows of a dense autograd reference, and no
(out, in) weight gradient is ever formed."""

from __future__ import annotations

import pytest
import torch
from testing_utils import ShapeRecorder, adapted, assert_grads_match, build, dense_reference
from tiny_models import make_loss_inputs


def run_loss(model, arch, micro=1, seed=1):
    total = 0.0
    for i in range(micro):
        loss = model(**make_loss_inputs(arch, batch=2, seq=7, seed=seed + i)).loss / micro
        loss.backward()
        total += loss.item()
    return total


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "t5"])
@pytest.mark.parametrize("path", ["live", "additive"])
@pytest.mark.parametrize("ratio", [0.25, 1.0])
def test_delta_grad_equals_dense_rows(arch, path, ratio):
    base, model = build(arch, ratio=ratio, path=path)
    ref = dense_reference(base, model)
    model.train()
    ref.train()
    loss = run_loss(model, arch)
    ref_loss = run_loss(ref, arch)
    assert abs(loss - ref_loss) < 1e-5
    assert_grads_match(model, ref, atol=1e-6)
    for p in model.parameters():
        if not p.requires_grad:
            assert p.grad is None


@pytest.mark.parametrize("path", ["live", "additive"])
def test_without_bias_training(path):
    base, model = build("qwen2", path=path, train_bias=False)
    ref = dense_reference(base, model)
    model.train()
    ref.train()
    run_loss(model, "qwen2")
    run_loss(ref, "qwen2")
    assert_grads_match(model, ref, atol=1e-6)
    assert all(not layer.neuron_select_bias_delta for layer in adapted(model).values())


@pytest.mark.parametrize("path", ["live", "additive"])
def test_gradient_accumulation_two_micro_batches(path):
    base, model = build("llama", path=path)
    ref = dense_reference(base, model)
    model.train()
    ref.train()
    run_loss(model, "llama", micro=2)
    run_loss(ref, "llama", micro=2)
    assert_grads_match(model, ref, atol=1e-6)


@pytest.mark.parametrize("path", ["live", "additive"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(path, reentrant):
    base, model = build("llama", path=path)
    ref = dense_reference(base, model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    model.train()
    ref.train()
    run_loss(model, "llama", micro=2)
    run_loss(ref, "llama", micro=2)
    assert_grads_match(model, ref, atol=1e-6)


@pytest.mark.parametrize("path", ["live", "additive"])
def test_bf16_base_fp32_deltas_with_autocast(path):
    base, model = build("llama", path=path, dtype=torch.bfloat16)
    ref = dense_reference(base, model)
    model.train()
    ref.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        run_loss(model, "llama")
        run_loss(ref, "llama")
    for layer in adapted(model).values():
        assert layer.neuron_select_delta["default"].dtype == torch.float32
    assert_grads_match(model, ref, atol=2e-2, rtol=5e-2)


def test_adamw_steps_match_dense_training_of_rows():
    """Training with the sparse backward follows dense training in which only the selected rows may move."""
    base, model = build("llama", path="live")
    ref = dense_reference(base, model)
    deltas = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(deltas.values(), lr=0.1)
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    ref_opt = torch.optim.SGD(ref_params, lr=0.1)
    model.train()
    ref.train()
    for step in range(3):
        run_loss(model, "llama", seed=step)
        run_loss(ref, "llama", seed=step)
        # dense training restricted to the selected rows: zero the other rows' gradients
        modules = dict(ref.named_modules())
        for name, layer in adapted(model).items():
            mask = torch.zeros(layer.out_features, dtype=torch.bool)
            mask[layer.neuron_select_indices["default"]] = True
            modules[name].weight.grad[~mask] = 0
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    inputs = make_loss_inputs("llama", seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["live", "additive"])
def test_no_dense_weight_gradient_is_formed(arch, path):
    _, model = build(arch, ratio=0.1, path=path)  # k never equals another layer's out_features here
    weight_shapes = set()
    for layer in adapted(model).values():
        w = layer.get_base_layer().weight
        weight_shapes |= {tuple(w.shape), tuple(w.t().shape)}
        assert not w.requires_grad
    for p in model.parameters():
        if p.requires_grad:
            assert tuple(p.shape) not in weight_shapes
    model.train()
    loss = model(**make_loss_inputs(arch, batch=2, seq=7)).loss
    recorder = ShapeRecorder()
    with recorder:
        loss.backward()
    assert not (recorder.shapes & weight_shapes), recorder.shapes & weight_shapes
    for layer in adapted(model).values():
        assert layer.get_base_layer().weight.grad is None


def test_live_rows_follow_optimizer_steps_incl_fused_adamw():
    """Fused AdamW writes parameters without bumping autograd versions; live rows must still resync."""
    base, model = build("llama", path="live")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    model.train()
    run_loss(model, "llama")
    opt.step()
    opt.zero_grad()
    model.eval()
    inputs = make_loss_inputs("llama", seed=5)
    with torch.no_grad():
        got = model(**inputs).logits
        expected = dense_reference(base, model)(**inputs).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_shape_recorder_sees_dense_weight_gradients():
    """Control for the test above: dense training of the same layers does form (out, in) gradients."""
    base, model = build("llama", ratio=0.1)
    ref = dense_reference(base, model)
    ref.train()
    loss = ref(**make_loss_inputs("llama", batch=2, seq=7)).loss
    recorder = ShapeRecorder()
    with recorder:
        loss.backward()
    assert (64, 32) in recorder.shapes


def test_dense_training_keeps_no_copy_of_the_base_weight():
    """All rows selected: training never writes the base weight nor keeps a copy of it; eval still matches."""
    base, model = build("llama", ratio=1.0, path="live")
    originals = {n: layer.get_base_layer().weight.detach().clone() for n, layer in adapted(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    run_loss(model, "llama")
    opt.step()
    for name, layer in adapted(model).items():
        assert torch.equal(layer.get_base_layer().weight, originals[name]), name
    model.eval()
    inputs = make_loss_inputs("llama", seed=4)
    with torch.no_grad():
        expected = dense_reference(base, model)(**inputs).logits
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    model.train()
    run_loss(model, "llama")  # inference and training alike leave the base weight untouched
    for name, layer in adapted(model).items():
        assert torch.equal(layer.get_base_layer().weight, originals[name]), name
