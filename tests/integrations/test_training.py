"""Trainer and accelerate-loop integration: routing reaches the adapter, loss falls, checkpoints hold the adapter only."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import get_peft_model
from testing_utils import routed_config
from tiny_models import make_model, make_tokenizer
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


def test_plain_trainer_with_default_arguments_routes(tmp_path):
    """transformers.Trainer as is, TrainingArguments left at their defaults (remove_unused_columns=True): the
    'neuron_groups' column survives, present groups' rows move and the absent group's rows do not."""
    from transformers import Trainer

    tok = make_tokenizer()
    data = [{**f, "src": "raw text Trainer should drop"} for f in dataset(tok)]
    model = model_for(tok)
    before = mean_loss(model, dataset(tok), tok)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=2e-2, report_to=[], use_cpu=True, save_strategy="no")  # fmt: skip
    assert args.remove_unused_columns is True
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=TranslationCollator(tok))
    trainer.train()
    assert "neuron_groups" in trainer._signature_columns and "group" not in trainer._signature_columns
    assert mean_loss(model, dataset(tok), tok) < before - 0.1
    changed = rows_changed(model)
    assert changed["agnostic"] and changed["en-fr"] and changed["en-hi"]
    assert not changed["en-de"]


def test_plain_trainer_without_a_groups_column_says_what_to_do(tmp_path):
    """A dataset whose group column is only called 'group' loses it to remove_unused_columns: the error names the
    column and the setting (not RoutingError ['None'])."""
    from transformers import Trainer

    tok = make_tokenizer()
    data = [{k: v for k, v in f.items() if k != "neuron_groups"} for f in dataset(tok)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no")  # fmt: skip
    trainer = Trainer(model=model_for(tok), args=args, train_dataset=data, data_collator=TranslationCollator(tok))
    with pytest.raises(ValueError, match=r"'neuron_groups'.*remove_unused_columns=True.*NeuronSelectTrainer"):
        trainer.train()


def test_train_loop_follows_trainers_cosine_schedule():
    """train_loop's learning rate at every step is Trainer's (get_scheduler("cosine") with TrainingArguments'
    warm-up count). With one scalar parameter and a constant gradient, AdamW moves it by exactly lr each step."""
    from transformers import get_scheduler

    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

    model, steps, lr = Scalar(), 10, 0.1
    values = []
    train_loop(model, [{"x": torch.ones(1)}] * steps, steps=steps, lr=lr, warmup_ratio=0.25, max_grad_norm=None,
               progress=False, loss_fn=lambda m, b: m.p * b["x"].sum(),
               on_step=lambda step, loss: values.append(model.p.item()))  # fmt: skip
    moved = [a - b for a, b in zip([0.0] + values, values)]
    args = TrainingArguments(output_dir="unused", warmup_steps=0.25, report_to=[])  # a float < 1 is a ratio
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=args.get_warmup_steps(steps), num_training_steps=steps)
    expected = []
    for _ in range(steps):
        expected.append(opt.param_groups[0]["lr"])
        sched.step()
    assert expected[0] == 0.0 and max(expected) == pytest.approx(lr)  # warm-up from 0 (3 steps), then cosine
    assert moved == pytest.approx(expected, abs=1e-6)


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
