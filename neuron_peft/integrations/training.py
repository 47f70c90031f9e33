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

    ``loss_on_labelled_positions=True`` (a constructor argument, not a `TrainingArguments` field) computes the
    training loss with `labelled_logits_loss`: logits only where a label is not -100, the same loss and gradients
    as the model's own, cheaper when the vocabulary is large and prompts carry no loss (causal LMs only). Evaluation
    (``return_outputs=True``), label smoothing, ``compute_loss_func`` and batches without any labelled position keep
    Trainer's own path.
    """

    def __init__(self, *args, loss_on_labelled_positions: bool = False, **kwargs):
        self.loss_on_labelled_positions = bool(loss_on_labelled_positions)
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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels") if isinstance(inputs, dict) else None
        if (
            not self.loss_on_labelled_positions
            or return_outputs
            or labels is None
            or self.label_smoother is not None
            or getattr(self, "compute_loss_func", None) is not None
            or not bool((labels[:, 1:] != IGNORE_INDEX).any())
        ):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # what Trainer.compute_loss does with the model's own loss: sum / num_items_in_batch when the model accepts
        # loss kwargs (and the count is known), else the per-batch mean; then the token-averaging scale across devices
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        n_items = num_items_in_batch if accepts else None
        loss = labelled_logits_loss(model, inputs, num_items_in_batch=n_items)
        if getattr(self.args, "average_tokens_across_devices", False) and accepts and num_items_in_batch is not None:
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            scale = self.accelerator.num_processes // tp
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
        return loss


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


def _output_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The output projection (``get_output_embeddings()``) of the causal LM under any PEFT / DDP wrapper."""
    inner = getattr(model, "module", model)  # DistributedDataParallel and similar keep the model in .module
    if hasattr(inner, "get_base_model"):  # PeftModel: the transformers model whose lm_head may be wrapped
        inner = inner.get_base_model()
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        raise ValueError(
            f"labelled_logits_loss: {type(inner).__name__} has no output layer (get_output_embeddings() is None); "
            "it computes the loss of causal language models"
        )
    return head


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` bool mask of the positions whose logits carry loss in a causal LM: position t predicts
    ``labels[:, t + 1]``, so t is kept when that label is not -100 (the last position never is)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def labelled_logits_loss(
    model: torch.nn.Module, batch: dict, num_items_in_batch: Optional[int | torch.Tensor] = None
) -> torch.Tensor:
    """Causal-LM loss with logits computed only at positions whose (shifted) label is not -100.

    The same value and gradients as ``model(**batch).loss`` (transformers' ``ForCausalLMLoss``: logits at t
    predict ``labels[t + 1]``; the mean over labelled tokens, or their sum divided by ``num_items_in_batch`` when
    that is given, as Trainer passes it under gradient accumulation), with the output projection applied to the
    labelled positions only. With a 262k-token vocabulary that projection (and its backward) is most of a small
    model's step, and translation prompts carry no loss. Unlike `answer_loss` (a contiguous span of positions shared
    by the whole batch) no prompt or padding position of any sample is projected.

    How: the model runs its own forward (PEFT wrappers, their hooks and the ``neuron_groups`` routing keyword
    included) without ``labels``, while a forward pre-hook on its output layer (``get_output_embeddings()``) hands
    that layer only the hidden states of the labelled positions, ``(n_labelled, hidden)``. Whatever the model does
    to the logits after that layer (e.g. Gemma's ``final_logit_softcapping``) is therefore applied as in its own
    forward. Raises ValueError when no position is labelled (the model's mean would be NaN).
    """
    labels = batch["labels"]
    keep = labelled_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    if targets.numel() == 0:
        raise ValueError("labelled_logits_loss: the batch has no loss tokens (every label is -100)")
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def gather(module, args, kwargs):
        hidden = args[0] if args else kwargs["input"]
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != tuple(keep.shape):
            raise RuntimeError(
                f"labelled_logits_loss: the output layer got hidden states of shape {tuple(hidden.shape)}, expected "
                f"(batch, seq, hidden) with (batch, seq) = {tuple(keep.shape)}; this model slices or reshapes them "
                "before its head, so use model(**batch).loss"
            )
        picked = hidden[keep.to(hidden.device)]
        if args:
            return (picked, *args[1:]), kwargs
        return args, {**kwargs, "input": picked}

    handle = _output_layer(model).register_forward_pre_hook(gather, with_kwargs=True)
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    if logits.dim() != 2 or logits.shape[0] != targets.numel():
        raise RuntimeError(
            f"labelled_logits_loss: expected logits of shape ({targets.numel()}, vocab), got {tuple(logits.shape)}"
        )
    targets = targets.to(logits.device)
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


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
    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``; `labelled_logits_loss` (logits at labelled
    positions only) and `answer_loss` (one span of positions) are faster equivalents for causal LMs with large
    vocabularies.
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
