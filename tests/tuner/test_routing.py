"""Language routing: in a mixed batch each group's rows get exactly the gradient of that group's samples."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from testing_utils import GROUPS, adapted, dense_reference, routed_config
from tiny_models import VOCAB, make_model

import neuron_peft
from neuron_peft import RoutingError


def lm_loss(logits, ids, sample_mask=None, total=None):
    """Mean next-token loss over the whole batch; `sample_mask` keeps only some samples' terms (same divisor)."""
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    per_token = per_token.view(ids.shape[0], -1)
    if sample_mask is not None:
        per_token = per_token * sample_mask[:, None]
    return per_token.sum() / (ids.shape[0] * (ids.shape[1] - 1))


def batches(n_micro, seed=3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_micro):
        ids = torch.randint(1, VOCAB, (4, 7), generator=gen)
        groups = [["fr", "de", "fr", "hi"], ["hi", "hi", "de", "fr"]][i % 2]
        out.append((ids, groups))
    return out


def check_routed_grads(model, ref, micro):
    modules = dict(ref.named_modules())
    # reference gradients: agnostic rows from every sample, group rows from that group's samples only
    expected = {}
    for key in [None] + GROUPS:
        ref.zero_grad(set_to_none=True)
        for ids, groups in micro:
            mask = None if key is None else torch.tensor([float(g == key) for g in groups])
            (lm_loss(ref(input_ids=ids).logits, ids, mask) / len(micro)).backward()
        expected[key] = {
            name: (
                modules[name].weight.grad.clone(),
                None if modules[name].bias is None else modules[name].bias.grad.clone(),
            )
            for name in adapted(model)
        }
    for name, layer in adapted(model).items():
        rows = layer.neuron_select_indices["default"]
        owners = layer.neuron_select_row_groups["default"].tolist()
        got = layer.neuron_select_delta["default"].grad
        got_b = layer.neuron_select_bias_delta["default"].grad if "default" in layer.neuron_select_bias_delta else None
        for j, (row, owner) in enumerate(zip(rows.tolist(), owners)):
            key = None if owner < 0 else sorted(GROUPS)[owner]
            wgrad, bgrad = expected[key][name]
            want = wgrad[:, row] if layer.fan_in_fan_out else wgrad[row]
            torch.testing.assert_close(got[j], want, atol=1e-6, rtol=1e-4, msg=f"{name} row {row} ({key})")
            if got_b is not None:
                torch.testing.assert_close(got_b[j], bgrad[row], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("path", ["live", "additive"])
@pytest.mark.parametrize("n_micro", [1, 2])
def test_mixed_batch_routes_each_group(arch, path, n_micro):
    base = make_model(arch)
    model = get_peft_model(copy.deepcopy(base), routed_config(base, arch, path))
    ref = dense_reference(base, model)
    model.train()
    ref.train()
    micro = batches(n_micro)
    for ids, groups in micro:
        (lm_loss(model(input_ids=ids, neuron_groups=groups).logits, ids) / n_micro).backward()
    check_routed_grads(model, ref, micro)


@pytest.mark.parametrize("reentrant", [False, True])
def test_routing_with_gradient_checkpointing(reentrant):
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), routed_config(base, "llama"))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if reentrant:
        model.enable_input_require_grads()
    ref = dense_reference(base, model)
    model.train()
    ref.train()
    micro = batches(2)
    for ids, groups in micro:
        (lm_loss(model(input_ids=ids, neuron_groups=groups).logits, ids) / 2).backward()
    check_routed_grads(model, ref, micro)


def test_route_context_manager_matches_keyword():
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), routed_config(base, "llama"))
    ref = dense_reference(base, model)
    model.train()
    micro = batches(1)
    ids, groups = micro[0]
    with neuron_peft.route(model, groups):
        loss = lm_loss(model(input_ids=ids).logits, ids)
    loss.backward()  # backward outside the block still uses the block's groups
    check_routed_grads(model, ref, micro)


def test_batch_without_groups_trains_agnostic_rows_only():
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), routed_config(base, "llama"))
    model.train()
    ids = batches(1)[0][0]
    with pytest.warns(UserWarning, match="without neuron_groups"):
        lm_loss(model(input_ids=ids).logits, ids).backward()
    for layer in adapted(model).values():
        grad = layer.neuron_select_delta["default"].grad
        specific = layer.neuron_select_row_groups["default"] >= 0
        assert torch.all(grad[specific] == 0)
        assert torch.any(grad[~specific] != 0)


def test_forward_is_the_same_for_every_group():
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), routed_config(base, "llama"))
    ids = batches(1)[0][0]
    with torch.no_grad():
        a = model(input_ids=ids, neuron_groups=["fr"] * 4).logits
        b = model(input_ids=ids, neuron_groups=["hi", "de", "fr", "de"]).logits
        c = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_unknown_or_malformed_groups():
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), routed_config(base, "llama"))
    ids = batches(1)[0][0]
    with pytest.raises(RoutingError, match=r"unknown group name\(s\) \['xx'\].*\['de', 'fr', 'hi'\]"):
        model(input_ids=ids, neuron_groups=["fr", "xx", "fr", "de"])
    with pytest.raises(RoutingError, match="not a string"):
        model(input_ids=ids, neuron_groups="fr")
    with pytest.raises(RoutingError, match="unknown"):
        with neuron_peft.route(model, ["zz"] * 4):
            pass


def test_generate_accepts_and_ignores_groups():
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), routed_config(base, "llama"))
    ids = batches(1)[0][0][:, :4]
    a = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, neuron_groups=["fr"] * 4)
    b = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(a, b)


@pytest.mark.parametrize("entry", ["causal_lm_task", "transformers_load_adapter"])
def test_groups_keyword_on_other_entry_points(entry, tmp_path):
    base = make_model("llama")
    cfg = routed_config(base, "llama")
    peft = get_peft_model(copy.deepcopy(base), cfg)
    ref = dense_reference(base, peft)
    if entry == "causal_lm_task":
        cfg.task_type = "CAUSAL_LM"
        model = get_peft_model(copy.deepcopy(base), cfg)
        model.load_state_dict(peft.state_dict(), strict=False)
    else:
        peft.save_pretrained(tmp_path)
        model = copy.deepcopy(base)
        model.load_adapter(str(tmp_path), is_trainable=True)
    model.train()
    micro = batches(1)
    ids, groups = micro[0]
    lm_loss(model(input_ids=ids, neuron_groups=groups).logits, ids).backward()
    check_routed_grads(model, ref, micro)


def test_missing_group_names_the_column_and_setting():
    """A batch whose groups came back as None (the column was dropped) is not reported as an unknown group 'None'."""
    base = make_model("llama")
    model = get_peft_model(copy.deepcopy(base), routed_config(base, "llama"))
    ids = batches(1)[0][0]
    with pytest.raises(
        RoutingError, match=r"no group for sample\(s\) \[1, 3\].*'neuron_groups'.*remove_unused_columns"
    ):
        model(input_ids=ids, neuron_groups=["fr", None, "de", None])
