"""Training integration: transformers `Trainer` and a plain accelerate loop, both with language routing.

Routing needs one thing from the training stack: each batch's ``neuron_groups`` list must reach ``model(**batch)``.
`neuron_peft.data.TranslationCollator` builds it from each sample's ``neuron_groups`` (or ``group``) entry. A plain
``transformers.Trainer`` with default arguments works: ``remove_unused_columns=True`` keeps the columns named like the
forward parameters of ``peft_model.get_base_model()``, and the adapted model declares ``neuron_groups`` there
(`neuron_peft.tuner.groups_keyword.ForwardWithGroups`); `neuron_peft.data.encode_example` names the column so.
`NeuronSelectTrainer` additionally keeps datasets whose group column is called ``group``. Trainers that keep only
their own columns and collate without groups (TRL's ``SFTTrainer``) route after `route_groups(trainer)`.
Checkpoints hold the adapter only, because Trainer saves a PeftModel through ``save_pretrained``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Callable, Optional

import torch
from transformers import Trainer, get_cosine_schedule_with_warmup

from ..data.collate import IGNORE_INDEX, GroupsCollator, TranslationCollator


class NeuronSelectTrainer(Trainer):
    """`transformers.Trainer` that keeps every dataset column for the collator, so a ``group`` column survives too.

    A plain Trainer already keeps a ``neuron_groups`` column (the adapted model declares that keyword); this subclass
    sets ``remove_unused_columns=False`` (with a warning) so datasets that name the column ``group`` are routed as
    well, and ``label_names=["labels"]``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            warnings.warn(
                "NeuronSelectTrainer: setting remove_unused_columns=False so the dataset's group column reaches the "
                "collator (routing needs it).",
                stacklevel=2,
            )
            self.args.remove_unused_columns = False
        if getattr(self.args, "label_names", None) is None:
            self.args.label_names = ["labels"]


def route_groups(trainer: Trainer) -> Trainer:
    """Make a built trainer hand each batch's ``neuron_groups`` to the model; returns it. One call for any
    `transformers.Trainer` subclass, TRL's ``SFTTrainer`` included::

        trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=data, peft_config=NeuronSelectConfig(...))
        route_groups(trainer).train()

    It sets ``remove_unused_columns=False`` (TRL's SFTTrainer keeps only ``input_ids``, ``labels`` and
    ``seq_lengths`` otherwise, whatever the model declares) and wraps the trainer's collator in
    `neuron_peft.data.GroupsCollator` unless it already returns groups (`TranslationCollator`). Packing joins
    samples, so per-sample groups cannot survive it: ``packing=True`` / ``padding_free=True`` are refused.
    """
    args = trainer.args
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        raise ValueError(
            f"route_groups: {type(args).__name__}(packing=True / padding_free=True) joins samples into one "
            "sequence, so no per-sample neuron_groups can be routed; set packing=False and padding_free=False"
        )
    args.remove_unused_columns = False
    if not isinstance(trainer.data_collator, (GroupsCollator, TranslationCollator)):
        trainer.data_collator = GroupsCollator(trainer.data_collator)
    return trainer


def answer_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Causal-LM loss computed from logits at answer positions only (same value as ``model(**batch).loss``).

    With a 262k-token vocabulary the output projection dominates a small model's step; translation prompts are
    as long as their answers, so projecting only the span that carries loss roughly halves that cost. Uses
    transformers' ``logits_to_keep``; the span runs from the first to the last position with a loss term.
    """
    labels = batch["labels"]
    targets = labels[:, 1:]
    cols = (targets != IGNORE_INDEX).any(0).nonzero().flatten()
    if cols.numel() == 0:
        raise ValueError("answer_loss: the batch has no loss tokens (every label is -100)")
    start, stop = int(cols[0]), int(cols[-1]) + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    keep = torch.arange(start, stop, device=labels.device)
    logits = model(**inputs, logits_to_keep=keep).logits
    target = targets[:, start:stop]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE_INDEX
    )


def train_loop(
    model: torch.nn.Module,
    dataloader: Iterable[dict],
    *,
    steps: int,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.03,
    grad_accum: int = 1,
    max_grad_norm: Optional[float] = 1.0,
    accelerator=None,
    mixed_precision: Optional[str] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
    loss_fn: Optional[Callable[[torch.nn.Module, dict], torch.Tensor]] = None,
) -> list[float]:
    """A plain accelerate loop (AdamW, transformers' cosine schedule with warm-up), routing by ``neuron_groups``.

    Only parameters with ``requires_grad`` are optimised; returns the loss of every optimizer step.
    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``; `answer_loss` is a faster equivalent for
    causal LMs with large vocabularies.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_loop: the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # transformers' schedule, with warm-up steps counted as TrainingArguments(warmup_ratio=...) counts them, so this
    # loop and Trainer(lr_scheduler_type="cosine") follow the same learning rates step by step
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(warmup_ratio * steps), steps)
    model, optimizer, dataloader, scheduler = accelerator.prepare(model, optimizer, dataloader, scheduler)
    model.train()
    losses: list[float] = []
    bar = tqdm(total=steps, desc="train", disable=not progress or not accelerator.is_local_main_process)
    running, micro = 0.0, 0
    while len(losses) < steps:
        for batch in dataloader:
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"train_loop: non-finite loss at optimizer step {len(losses)}")
                accelerator.backward(loss)
                running += loss.detach().float().item()
                micro += 1
                if accelerator.sync_gradients and max_grad_norm:
                    accelerator.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                losses.append(running / micro)
                running, micro = 0.0, 0
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if on_step is not None:
                    on_step(len(losses), losses[-1])
                if len(losses) >= steps:
                    break
        else:
            if not losses and micro == 0:
                raise ValueError("train_loop: the dataloader is empty")
    bar.close()
    return losses
