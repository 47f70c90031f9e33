"""TRL: `SFTTrainer` (plain and routed by ``neuron_groups``) and `DPOTrainer` train NeuronSelect adapters.

Runs when `trl` is installed (it is in the ``[dev]`` extra); skips with the reason otherwise. Tiny Llama from a
config, word-level tokenizer, CPU. TRL's configs default to ``bf16=True``, which on the CPU runs the forward under
bf16 autocast: the exact comparisons pass ``bf16=False``, and one routed run keeps the default to show it trains
(fp32 deltas, finite loss, the same rows move).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from test_training import dataset, rows_changed
from testing_utils import routed_config
from tiny_models import make_model, make_tokenizer

from neuron_peft import NeuronSelectConfig, NeuronSelectLayer
from neuron_peft.data import TranslationCollator
from neuron_peft.integrations import route_groups

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install -e '.[dev]' or pip install trl)")
datasets = pytest.importorskip("datasets", reason="TRL's trainers need the 'datasets' package")


def tiny_base(tok):
    base = make_model("llama")
    base.resize_token_embeddings(max(len(tok), base.config.vocab_size))
    return base


def routed(base):
    """3 agnostic and 2 rows per language per layer; "en-de" gets rows but no data (its rows must not move)."""
    cfg = routed_config(base, "llama")
    rename = {"de": "en-de", "fr": "en-fr", "hi": "en-hi"}
    cfg.language_neurons = {rename[g]: rows for g, rows in cfg.language_neurons.items()}
    cfg.init_weights = True
    return cfg


def sft_config(tmp_path, **kw):
    settings = dict(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=2e-2,
                    report_to=[], use_cpu=True, save_strategy="no", logging_steps=2, bf16=False, seed=0)  # fmt: skip
    settings.update(kw)
    return trl.SFTConfig(**settings)


def sft(tmp_path, tok, data=None, **kw):
    base = tiny_base(tok)
    collator = kw.pop("data_collator", None)
    trainer = trl.SFTTrainer(
        model=copy.deepcopy(base), args=sft_config(tmp_path, **kw), train_dataset=data or dataset_for(tok),
        processing_class=tok, peft_config=routed(base), data_collator=collator,
    )  # fmt: skip
    return base, trainer


def dataset_for(tok):
    return datasets.Dataset.from_list(dataset(tok))


def groups_seen(model):
    """Every call of one NeuronSelect layer records the route state's groups (recomputed forwards included)."""
    layer = next(m for m in model.modules() if isinstance(m, NeuronSelectLayer) and m.has_specific_rows("default"))
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(module._route.groups))
    return seen


@pytest.mark.filterwarnings("ignore:NeuronSelect. a training batch came without neuron_groups")
def test_sft_trains_only_the_deltas_and_reloads_exactly(tmp_path):
    """SFTTrainer(peft_config=NeuronSelectConfig(...)) as a new user calls it (no routing asked for)."""
    tok = make_tokenizer()
    base, trainer = sft(tmp_path, tok)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("neuron_select_" in n for n in moved), sorted(moved)[:5]
    trainer.model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([dataset(tok)[0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_routed_sft_with_route_groups(tmp_path, gradient_checkpointing):
    """SFTTrainer as it is, plus one call: the groups reach every forward (recomputed ones too) and only the rows of
    languages in the data move."""
    tok = make_tokenizer()
    _, trainer = sft(tmp_path, tok, gradient_checkpointing=gradient_checkpointing)
    assert route_groups(trainer) is trainer
    seen = groups_seen(trainer.model)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*without neuron_groups.*")
        trainer.train()
    assert len(seen) >= 6 * (2 if gradient_checkpointing else 1) and all(g is not None for g in seen)
    changed = rows_changed(trainer.model)
    assert changed["agnostic"] and changed["en-fr"] and changed["en-hi"] and not changed["en-de"]


def test_routed_sft_under_trls_default_bf16(tmp_path):
    """SFTConfig's default bf16=True runs the CPU forward under bf16 autocast: the deltas stay fp32, every logged
    loss is finite, and the same rows move as in fp32."""
    tok = make_tokenizer()
    _, trainer = sft(tmp_path, tok, bf16=None)
    assert trainer.args.bf16
    route_groups(trainer).train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(v) for v in losses)
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == {torch.float32}
    changed = rows_changed(trainer.model)
    assert changed["agnostic"] and changed["en-fr"] and changed["en-hi"] and not changed["en-de"]


def test_sft_defaults_warn_naming_the_setting_that_dropped_the_column(tmp_path):
    tok = make_tokenizer()
    _, trainer = sft(tmp_path, tok, max_steps=1)
    with pytest.warns(UserWarning, match=r"SFTTrainer with SFTConfig\(remove_unused_columns=True\).*route_groups"):
        trainer.train()


def test_sft_collator_without_groups_is_named(tmp_path):
    """remove_unused_columns=False keeps the column, TRL's collator drops it: the warning names the collator."""
    tok = make_tokenizer()
    _, trainer = sft(tmp_path, tok, max_steps=1, remove_unused_columns=False)
    with pytest.warns(UserWarning, match=r"data_collator \(DataCollatorForLanguageModeling\).*GroupsCollator"):
        trainer.train()


def test_sft_with_translation_collator_names_the_trl_setting(tmp_path):
    """TranslationCollator under SFTConfig's defaults: the error names SFTConfig(remove_unused_columns=True), not
    advice that does not apply (the column is already called neuron_groups; NeuronSelectTrainer is no SFTTrainer)."""
    tok = make_tokenizer()
    _, trainer = sft(tmp_path, tok, max_steps=1, data_collator=TranslationCollator(tok))
    with pytest.raises(ValueError, match=r"SFTTrainer with SFTConfig\(remove_unused_columns=True\).*route_groups"):
        trainer.train()
    # and with that one call the same trainer routes (TranslationCollator kept as it is)
    route_groups(trainer)
    assert isinstance(trainer.data_collator, TranslationCollator)
    trainer.train()
    assert rows_changed(trainer.model)["en-fr"]


def test_route_groups_refuses_packing(tmp_path):
    tok = make_tokenizer()
    _, trainer = sft(tmp_path, tok, max_steps=1, packing=True, max_length=32)
    with pytest.raises(ValueError, match="packing"):
        route_groups(trainer)


# ---------------------------------------------------------------------------------------------------- DPO
PREFS = [
    ("Translate hello", "bonjour", "hallo"),
    ("Translate world", "le monde", "welt"),
    ("Translate the text", "le", "the"),
    ("Translate hello world", "bonjour le monde", "hallo welt"),
] * 2


def dpo_data():
    return datasets.Dataset.from_list([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PREFS])


def completion_logps(model, batch):
    """Summed log-probabilities of the completion tokens, computed from plain logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (logps * batch["completion_mask"][:, 1:]).sum(1)


@pytest.mark.parametrize("how", ["peft_config", "peft_model"])
def test_dpo_trains_against_the_base_model(tmp_path, how):
    """peft_config= (reference = adapter disabled) and a PeftModel (TRL adds a frozen "ref" copy of the adapter):
    8 steps, finite gradients and losses, and reference log-probs equal the base model's after training."""
    tok = make_tokenizer()
    base = tiny_base(tok)
    cfg = NeuronSelectConfig(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], neuron_ratio=0.25,
                             neuron_init="random")  # fmt: skip
    args = trl.DPOConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, save_strategy="no", logging_steps=4, bf16=False, seed=0)  # fmt: skip
    if how == "peft_config":
        kw = {"model": copy.deepcopy(base), "peft_config": cfg}
    else:
        kw = {"model": get_peft_model(copy.deepcopy(base), cfg)}
    trainer = trl.DPOTrainer(args=args, train_dataset=dpo_data(), processing_class=tok, **kw)
    model = trainer.model
    if how == "peft_model":
        assert set(model.peft_config) == {"default", "ref"}
    grads = []
    for p in (p for p in model.parameters() if p.requires_grad):
        p.register_hook(lambda g: grads.append(bool(torch.isfinite(g).all())))
    ref_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".ref" in n}
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert grads and all(grads)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("neuron_select_" in n and ".default" in n for n in trained)
    for n, p in model.named_parameters():
        if n in ref_before:
            assert torch.equal(p, ref_before[n]), n  # the reference adapter is frozen
    model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    expected = completion_logps(base.eval(), batch)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, rtol=0, atol=1e-4)
    assert not torch.allclose(completion_logps(model, batch), expected, atol=1e-3)  # the adapter did train
