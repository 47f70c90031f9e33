"""The adapter stays exact under the tools users bring: whatever wrote a delta, the next forward uses it, and
nobody outside a NeuronSelect layer call ever sees ``W0 + delta`` in a base weight.

Every check compares against an independent reference: the pristine base model's weights, or a dense copy of the
base model holding ``W0 + delta`` as ordinary trainable weights (`testing_utils.dense_reference`).
"""

from __future__ import annotations

import copy

import pytest
import torch
from testing_utils import (
    accelerate_offload,
    adapted,
    assert_grads_match,
    build,
    dense_reference,
    expected_average,
)
from tiny_models import TARGETS, make_loss_inputs, routed_llama_config, tiny_llama

import neuron_peft  # noqa: F401

ARCH = "llama"


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base (frozen) weights of an adapted model, keyed by their name in the plain base model."""
    out = {}
    for name, layer in adapted(model).items():
        base = layer.get_base_layer()
        out[name + ".weight"] = base.weight.detach().clone()
        if base.bias is not None:
            out[name + ".bias"] = base.bias.detach().clone()
    return out


def pristine(base) -> dict[str, torch.Tensor]:
    modules = dict(base.named_modules())
    return {k: getattr(modules[k.rsplit(".", 1)[0]], k.rsplit(".", 1)[1]).detach().clone() for k in _names(base)}


def _names(base):
    out = []
    for name, m in base.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS[ARCH]:
            out.append(name + ".weight")
            if m.bias is not None:
                out.append(name + ".bias")
    return out


def assert_base_is_pristine(model, base):
    got, expected = base_weights(model), pristine(base)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), f"{k}: the base weight does not hold W0"


def eval_logits(model, seed=4):
    model.eval()
    with torch.no_grad():
        return model(**make_loss_inputs(ARCH, seed=seed)).logits


def train_step(model, seed=1):
    model.train()
    loss = model(**make_loss_inputs(ARCH, batch=2, seq=7, seed=seed)).loss
    loss.backward()
    return loss


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------- delta writes
def _manual_sgd(params):
    for p in params:
        p.data.add_(p.grad, alpha=-0.5)


def _normal(params):
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # p.data.normal_() with a fixed generator


def _normal_inplace(params):
    torch.manual_seed(3)
    for p in params:
        p.data.normal_(0, 0.1)


class HandWrittenSignSGD:
    """An optimizer outside torch.optim (no Optimizer base class, no global step hooks): writes through .data."""

    def __init__(self, params, lr):
        self.params, self.lr = list(params), lr

    def step(self):
        for p in self.params:
            p.data.add_(p.grad.sign(), alpha=-self.lr)


WRITES = {
    "manual_sgd": _manual_sgd,
    "data_copy": _normal,
    "data_normal": _normal_inplace,
    "handwritten_optimizer": lambda params: HandWrittenSignSGD(params, lr=0.05).step(),
}


@pytest.mark.parametrize("path", ["auto", "additive"])
@pytest.mark.parametrize("write", sorted(WRITES))
def test_next_forward_and_gradients_use_deltas_written_through_data(write, path):
    base, model = build(ARCH, path=path)
    eval_logits(model)  # a forward before the write (the old live path cached the rows here)
    train_step(model)
    WRITES[write](trainable(model))

    ref = dense_reference(base, model)  # built from the deltas as they are now
    torch.testing.assert_close(eval_logits(model), eval_logits(ref), atol=1e-5, rtol=1e-5)
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(eval_logits(model), eval_logits(merged), atol=1e-5, rtol=1e-5)

    model.zero_grad()
    train_step(model, seed=2)
    train_step(ref, seed=2)
    assert_grads_match(model, ref, atol=1e-6)  # the next gradients are taken at the new point
    assert_base_is_pristine(model, base)


# ---------------------------------------------------------------------------------------------------- observers
def test_parameters_state_dict_and_deepcopy_see_only_w0():
    base, model = build(ARCH)
    kept = model.state_dict()  # tensors sharing storage with the parameters, as a user would keep them
    kept_values = {k: v.clone() for k, v in kept.items()}
    train_step(model)
    eval_logits(model)
    assert_base_is_pristine(model, base)
    for k, v in kept.items():
        assert torch.equal(v, kept_values[k]), f"a kept state_dict entry changed on a forward: {k}"
    for name, p in model.named_parameters():
        if "base_layer" in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(p, pristine(base)[key]), name
    clone = copy.deepcopy(model)
    assert_base_is_pristine(clone, base)
    torch.testing.assert_close(eval_logits(clone), eval_logits(dense_reference(base, model)), atol=1e-5, rtol=1e-5)
    # the base model a user saves after unloading is the pretrained one
    unloaded = copy.deepcopy(model).unload()
    for k, v in pristine(base).items():
        assert torch.equal(unloaded.state_dict()[k], v), k


@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_averaged_model_averages_deltas_and_keeps_w0(kind):
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    base, model = build(ARCH)
    decay = 0.5
    avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay) if kind == "ema" else None)
    opt = torch.optim.SGD(trainable(model), lr=0.5)
    history = []
    for step in range(3):
        opt.zero_grad()
        train_step(model, seed=step)
        opt.step()
        eval_logits(model)  # forwards between updates, as an evaluation loop would do
        avg.update_parameters(model)
        history.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    expected = expected_average(history, kind, decay)  # hand-computed average of the deltas
    averaged = dict(avg.module.named_parameters())
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value, atol=1e-6, rtol=1e-6, msg=name)
    assert_base_is_pristine(avg.module, base)  # the frozen base weights were averaged as W0, never W0 + delta
    torch.testing.assert_close(
        eval_logits(avg.module), eval_logits(dense_reference(base, avg.module)), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("between", ["disable_adapter", "state_dict", "both"])
def test_reference_pass_between_forward_and_backward(between):
    """DPO-style: policy forward, a reference forward with the adapter disabled (and/or a state_dict), backward."""
    base, model = build(ARCH)
    ref = dense_reference(base, model)
    model.train()
    inputs = make_loss_inputs(ARCH, batch=2, seq=7, seed=1)
    loss = model(**inputs).loss
    if between in ("disable_adapter", "both"):
        with model.disable_adapter(), torch.no_grad():
            ref_loss = model(**inputs).loss
        with torch.no_grad():
            torch.testing.assert_close(ref_loss, base(**inputs).loss, atol=1e-6, rtol=1e-6)
    if between in ("state_dict", "both"):
        model.state_dict()
    loss.backward()
    ref(**inputs).loss.backward()
    assert_grads_match(model, ref, atol=1e-6)
    assert_base_is_pristine(model, base)


def test_to_meta_after_forward():
    base, model = build(ARCH)
    train_step(model)
    eval_logits(model)
    model.to("meta")  # no restore step in the way (before: a misleading "sharded or replaced" error)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_import_installs_no_global_optimizer_hook():
    from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

    owners = [getattr(h, "__module__", "") for h in list(_global_optimizer_post_hooks.values())]
    owners += [getattr(h, "__module__", "") for h in list(_global_optimizer_pre_hooks.values())]
    assert not [o for o in owners if o.startswith("neuron_peft")], owners


# ---------------------------------------------------------------------------------------------------- offloading
@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "device_map"])
def test_accelerate_offloaded_adapter_is_exact_or_refuses_training(how, tmp_path):
    base, model = build(ARCH)
    expected = eval_logits(dense_reference(base, model))
    accelerate_offload(model, how, tmp_path)
    offloaded = [layer for layer in adapted(model).values() if layer.neuron_select_delta["default"].is_meta]
    assert offloaded, "the test set-up offloaded no adapter weight"
    torch.testing.assert_close(eval_logits(model), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="offloaded"):
        train_step(model)


# ---------------------------------------------------------------------------------------------------- torch.compile
class CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile (each one is a (re)compilation)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend("aot_eager")(gm, example_inputs)  # traces forward and backward, no code generation


def _compiled_training(model, steps, backend):
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(trainable(model), lr=1e-2)
    model.train()
    losses, counts = [], []
    for step in range(steps):
        opt.zero_grad()
        loss = compiled(**make_loss_inputs(ARCH, batch=2, seq=7, seed=step)).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
        counts.append(backend.graphs)
    return losses, counts


def test_compiled_training_compiles_once_and_matches_eager():
    torch._dynamo.reset()
    base, model = build(ARCH)
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    losses, counts = _compiled_training(model, 6, backend)
    assert counts[-1] == counts[1], f"recompiled after warm-up: graphs after each step {counts}"

    opt = torch.optim.AdamW(trainable(eager), lr=1e-2)
    eager.train()
    for step, compiled_loss in enumerate(losses):
        opt.zero_grad()
        loss = eager(**make_loss_inputs(ARCH, batch=2, seq=7, seed=step)).loss
        loss.backward()
        opt.step()
        assert abs(loss.item() - compiled_loss) < 1e-4, (step, loss.item(), compiled_loss)
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=n)
    assert_base_is_pristine(model, base)


def test_two_models_compile_in_one_process():
    torch._dynamo.reset()
    results = []
    for seed in (0, 1):
        base, model = build(ARCH, seed=seed)
        ref = dense_reference(base, model)
        compiled = torch.compile(model, backend=CountingBackend())
        with torch.no_grad():
            got = compiled(**make_loss_inputs(ARCH, seed=4)).logits
        results.append((got, eval_logits(ref)))
    for got, expected in results:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_compiled_routed_training_compiles_once_with_group_ids():
    """Routed batches with a different group pattern every step: group indices as a tensor (neuron_peft.group_ids)
    keep one compiled graph, and every step's deltas equal eager routed training on the same batches."""
    from peft import get_peft_model

    torch._dynamo.reset()
    model = get_peft_model(tiny_llama(), routed_llama_config())
    eager = copy.deepcopy(model)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    patterns = [["fr", "de"], ["de", "de"], ["fr", "fr"], ["de", "fr"], ["fr", "de"], ["de", "de"]]
    runs = []
    for m, call in ((model, compiled), (eager, eager)):
        opt = torch.optim.SGD(trainable(m), lr=0.5)
        m.train()
        counts = []
        for step, names in enumerate(patterns):
            opt.zero_grad()
            ids = neuron_peft.group_ids(m, names) if m is model else names
            call(**make_loss_inputs(ARCH, batch=2, seq=7, seed=step), neuron_groups=ids).loss.backward()
            opt.step()
            counts.append(backend.graphs)
        runs.append(counts)
    counts = runs[0]
    assert counts[-1] == counts[1], f"recompiled when the group pattern changed: graphs after each step {counts}"
    moved = 0
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=n)
        moved += int(p.requires_grad)
    assert moved


def test_group_ids_are_checked():
    from peft import get_peft_model

    model = get_peft_model(tiny_llama(), routed_llama_config())
    assert neuron_peft.group_ids(model, ["de", "fr", "de"]).tolist() == [0, 1, 0]  # config.groups is sorted: de, fr
    with pytest.raises(neuron_peft.RoutingError, match="unknown group"):
        neuron_peft.group_ids(model, ["xx"])
    inputs = make_loss_inputs(ARCH, batch=2, seq=7)
    with pytest.raises(neuron_peft.RoutingError, match="out of range"):
        model(**inputs, neuron_groups=torch.tensor([0, 2]))
    with pytest.raises(neuron_peft.RoutingError, match="1-D integer"):
        model(**inputs, neuron_groups=torch.tensor([0.0, 1.0]))
