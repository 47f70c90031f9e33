"""`labelled_logits_loss`: logits only at labelled positions give the model's own loss and gradients exactly, for
PEFT LoRA and NeuronSelect (routed) adapters on tiny Llama / Gemma 3 (with logit softcapping) / Qwen2 / GPT-2; the
routing keyword still reaches the layers; `NeuronSelectTrainer(loss_on_labelled_positions=True)` matches Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from testing_utils import GROUPS, routed_config
from tiny_models import TARGETS, VOCAB, make_model

from neuron_peft import NeuronSelectLayer
from neuron_peft.training import NeuronSelectTrainer, answer_loss, labelled_logits_loss

ARCHS = ["llama", "gemma3", "qwen2", "gpt2"]
# (total length, prompt length) per sample: prompts of different lengths, right padding to the longest
SHAPES = [(9, 3), (6, 2), (8, 5), (5, 1)]


def batch_for(groups=("de", "fr", "hi", "fr"), seed=3) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = max(t for t, _ in SHAPES)
    ids = torch.randint(1, VOCAB, (len(SHAPES), n), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (t, p) in enumerate(SHAPES):
        mask[i, :t] = 1
        labels[i, p:t] = ids[i, p:t]
        ids[i, t:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "neuron_groups": list(groups)}


def base_model(arch):
    base = make_model(arch)
    if arch == "gemma3":
        base.config.final_logit_softcapping = 0.05  # the tiny model's logits are ~0.1: a small cap bends them
    return base


def adapted_model(arch, kind):
    base = base_model(arch)
    if kind == "lora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], init_lora_weights=False,
                         fan_in_fan_out=arch == "gpt2", task_type="CAUSAL_LM")  # fmt: skip
    else:
        cfg = routed_config(base, arch)
    model = get_peft_model(copy.deepcopy(base), cfg)
    model.train()
    return model


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None for g in grads.values())
    return loss.detach(), grads


def inputs_for(kind, batch):
    return batch if kind == "neuron" else {k: v for k, v in batch.items() if k != "neuron_groups"}


@pytest.mark.parametrize("kind", ["lora", "neuron"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_equal_the_models_own(arch, kind):
    model = adapted_model(arch, kind)
    batch = inputs_for(kind, batch_for())
    ref, ref_g = loss_and_grads(model, lambda: model(**batch).loss)
    got, got_g = loss_and_grads(model, lambda: labelled_logits_loss(model, batch))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert ref_g.keys() == got_g.keys()
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)
    # Trainer's gradient-accumulation form: summed over labelled tokens, divided by the count of the whole step
    n_items = torch.tensor(23)
    ref, ref_g = loss_and_grads(model, lambda: model(**batch, num_items_in_batch=n_items).loss)
    got, got_g = loss_and_grads(model, lambda: labelled_logits_loss(model, batch, num_items_in_batch=n_items))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)


def test_gemma_softcapping_is_applied():
    """Without the model's softcap the loss would differ: the head's output goes through the model's own code."""
    model = adapted_model("gemma3", "lora")
    batch = inputs_for("lora", batch_for())
    with torch.no_grad():
        got = labelled_logits_loss(model, batch)
        model.get_base_model().config.final_logit_softcapping = None
        uncapped = model(**batch).loss
    assert abs(float(got) - float(uncapped)) > 1e-3


def _owner_grads(model) -> dict[str, float]:
    """Summed |gradient| of the delta rows each owner (agnostic or a group) holds."""
    out: dict[str, float] = {}
    names = ["agnostic", *sorted(model.peft_config["default"].language_neurons)]
    for layer in model.modules():
        if isinstance(layer, NeuronSelectLayer):
            grad = layer.neuron_select_delta["default"].grad
            if grad is None:
                continue
            per_row = grad.abs().sum(1)
            for owner, g in zip(layer.neuron_select_row_groups["default"].tolist(), per_row.tolist()):
                out[names[owner + 1]] = out.get(names[owner + 1], 0.0) + g
    return out


def test_routing_still_reaches_the_layers():
    """A group's rows learn only from its samples: with no 'de' sample in the batch, de rows get no gradient."""
    model = adapted_model("llama", "neuron")
    batch = batch_for(groups=("fr", "hi", "fr", "hi"))
    model.zero_grad(set_to_none=True)
    labelled_logits_loss(model, batch).backward()
    grads = _owner_grads(model)
    assert set(grads) == {"agnostic", *GROUPS}
    assert grads["de"] == 0.0 and grads["fr"] > 0 and grads["hi"] > 0 and grads["agnostic"] > 0
    # and a different grouping of the same samples gives different gradients (the keyword was not dropped)
    model.zero_grad(set_to_none=True)
    labelled_logits_loss(model, batch_for(groups=("de", "de", "de", "de"))).backward()
    again = _owner_grads(model)
    assert again["de"] > 0 and again["fr"] == 0.0 and again["hi"] == 0.0


def test_plain_transformers_model_and_answer_loss_agree():
    """No PEFT wrapper at all (full fine-tuning); the span-based `answer_loss` gives the same value."""
    model = base_model("gemma3").train()
    batch = inputs_for("lora", batch_for())
    ref, ref_g = loss_and_grads(model, lambda: model(**batch).loss)
    got, got_g = loss_and_grads(model, lambda: labelled_logits_loss(model, batch))
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)
    with torch.no_grad():
        torch.testing.assert_close(answer_loss(model, batch), ref, rtol=1e-5, atol=1e-6)


def test_refuses_a_batch_without_loss_tokens():
    model = adapted_model("llama", "lora")
    batch = inputs_for("lora", batch_for())
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no loss tokens"):
        labelled_logits_loss(model, batch)


def test_trainer_option_matches_trainers_own_loss(tmp_path):
    from transformers import TrainingArguments

    model = adapted_model("llama", "neuron")
    batch = batch_for()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    plain = NeuronSelectTrainer(model=model, args=args)
    fast = NeuronSelectTrainer(model=model, args=args, loss_on_labelled_positions=True)
    assert fast.loss_on_labelled_positions and not plain.loss_on_labelled_positions
    for n_items in (None, torch.tensor(19)):
        ref, ref_g = loss_and_grads(
            model, lambda k=n_items: plain.compute_loss(model, dict(batch), num_items_in_batch=k)
        )
        got, got_g = loss_and_grads(
            model, lambda k=n_items: fast.compute_loss(model, dict(batch), num_items_in_batch=k)
        )
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
        for n in ref_g:
            torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)
    # evaluation asks for the outputs: Trainer's own path, full logits
    loss, out = fast.compute_loss(model, dict(batch), return_outputs=True)
    assert out.logits.shape[:2] == batch["input_ids"].shape
