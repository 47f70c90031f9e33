"""Trainer and accelerate-loop integration: routing reaches the adapter, loss falls, checkpoints hold the adapter only."""

from __future__ import annotations

import copy
import os

import torch
from conftest import make_model
from peft import get_peft_model
from test_data import make_tokenizer
from test_routing import routed_config
from transformers import TrainingArguments

from neuron_peft import NeuronSelectLayer
from neuron_peft.data import ParallelExample, TranslationCollator, encode_examples
from neuron_peft.training import NeuronSelectTrainer, train_loop

SENTENCES = [
    ("the cat sleeps", "le chat dort", "en-fr"),
    ("the dog runs", "le chien court", "en-fr"),
    ("the cat runs", "die katze lauft", "en-hi"),
    ("the dog sleeps", "der hund schlaft", "en-hi"),
]


def dataset(tok):
    examples = [ParallelExample(s, t, g, g[:2], g[3:]) for s, t, g in SENTENCES] * 4
    return encode_examples(tok, examples, max_length=48)


def model_for(tok):
    base = make_model("llama")
    base.resize_token_embeddings(max(len(tok), base.config.vocab_size))
    cfg = routed_config(base, "llama")
    # rename the test groups to language pairs; "en-de" gets rows but no data in this dataset
    rename = {"de": "en-de", "fr": "en-fr", "hi": "en-hi"}
    cfg.language_neurons = {rename[g]: rows for g, rows in cfg.language_neurons.items()}
    cfg.init_weights = True
    return get_peft_model(copy.deepcopy(base), cfg)


def rows_changed(model):
    """Per owner: did any delta row change from its zero init?"""
    changed = {}
    for layer in model.modules():
        if isinstance(layer, NeuronSelectLayer):
            groups = ["agnostic"] + sorted(model.peft_config["default"].language_neurons)
            moved = layer.neuron_select_delta["default"].detach().abs().sum(1) > 0
            for owner, m in zip(layer.neuron_select_row_groups["default"].tolist(), moved.tolist()):
                key = groups[owner + 1]
                changed[key] = changed.get(key, False) or m
    return changed


def mean_loss(model, data, tok):
    batch = TranslationCollator(tok)(data)
    with torch.no_grad():
        return model(**batch).loss.item()


def test_trainer_routes_and_saves_adapter_only(tmp_path):
    tok = make_tokenizer()
    data = dataset(tok)
    model = model_for(tok)
    before = mean_loss(model, data, tok)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=2e-2, save_steps=4,
        logging_steps=4, report_to=[], use_cpu=True, lr_scheduler_type="constant", seed=0,
    )  # fmt: skip
    trainer = NeuronSelectTrainer(model=model, args=args, train_dataset=data, data_collator=TranslationCollator(tok))
    trainer.train()
    assert mean_loss(model, data, tok) < before - 0.1
    changed = rows_changed(model)
    assert changed["agnostic"] and changed["en-fr"] and changed["en-hi"]
    assert not changed["en-de"]  # no en-de sample: its rows never received gradient
    ckpt = tmp_path / "checkpoint-8"
    files = set(os.listdir(ckpt))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files


def test_accelerate_loop_routes(tmp_path):
    tok = make_tokenizer()
    data = dataset(tok)
    model = model_for(tok)
    before = mean_loss(model, data, tok)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, collate_fn=TranslationCollator(tok))
    losses = train_loop(model, loader, steps=8, lr=2e-2, grad_accum=2, progress=False)
    assert len(losses) == 8 and all(map(lambda x: x == x, losses))
    assert mean_loss(model, data, tok) < before - 0.1
    changed = rows_changed(model)
    assert changed["agnostic"] and changed["en-fr"] and changed["en-hi"] and not changed["en-de"]


def test_answer_loss_equals_model_loss():
    from neuron_peft.training import answer_loss

    tok = make_tokenizer()
    data = dataset(tok)[:6]
    model = model_for(tok)
    batch = TranslationCollator(tok)(data)
    with torch.no_grad():
        full = model(**batch).loss
        fast = answer_loss(model, batch)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
