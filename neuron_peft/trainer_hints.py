"""Which trainer setting kept a batch's ``neuron_groups`` from the model, for the messages that say so.

Routing needs a per-sample ``neuron_groups`` column to pass three gates on its way to ``model(**batch)``: the
trainer's column filter (transformers' ``TrainingArguments(remove_unused_columns=True)`` keeps only columns named
like the model's forward arguments; TRL's ``SFTTrainer`` keeps only ``input_ids``, ``labels`` and ``seq_lengths``,
whatever the model declares), packing (``SFTConfig(packing=True)`` joins samples, so no per-sample column
survives), and the data collator (TRL's ``DataCollatorForLanguageModeling`` returns ids, masks and labels only).
`missing_groups_hint` finds the `transformers.Trainer` running the current step (on the call stack: the collator
and the model's forward both run inside its training loop) and names the gate that dropped the column; outside a
trainer it lists the fixes for each. Nothing here imports transformers' trainer module: it is looked up in
``sys.modules``, so the tuner can use this without loading it.
"""

from __future__ import annotations

import sys
from typing import Optional

FIX = "neuron_peft.integrations.route_groups(trainer)"  # the one-call fix for any Trainer subclass (TRL's too)


def active_trainer(max_depth: int = 200):
    """The `transformers.Trainer` (or subclass) whose method is on the current call stack, else None."""
    module = sys.modules.get("transformers.trainer")
    trainer_cls = getattr(module, "Trainer", None)
    if trainer_cls is None:
        return None
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, trainer_cls):
            return owner
        frame = frame.f_back
    return None


def _describe(trainer) -> str:
    args = trainer.args
    name, args_name = type(trainer).__name__, type(args).__name__
    if getattr(args, "packing", False) or getattr(args, "padding_free", False):
        setting = "packing=True" if getattr(args, "packing", False) else "padding_free=True"
        return (
            f"{name} with {args_name}({setting}) joins samples into one sequence, so no per-sample 'neuron_groups' "
            f"survives: set {args_name}(packing=False, padding_free=False), then call {FIX} before train()"
        )
    if getattr(args, "remove_unused_columns", False):
        kept = getattr(trainer, "_signature_columns", None)
        if kept is not None and "neuron_groups" in kept:
            return (
                f"{name} with {args_name}(remove_unused_columns=True) keeps a column named 'neuron_groups', but the "
                "dataset has none (a column called 'group' is dropped): name the column 'neuron_groups' "
                "(neuron_peft.data.encode_examples does), or use neuron_peft.training.NeuronSelectTrainer"
            )
        shown = f" keeps only the columns {list(kept)} and" if kept is not None else ""
        return (
            f"{name} with {args_name}(remove_unused_columns=True) (the default){shown} dropped the dataset's "
            f"'neuron_groups' column: call {FIX} before train() (it sets remove_unused_columns=False and wraps the "
            "collator so the groups reach the model)"
        )
    collator = getattr(trainer, "data_collator", None)
    return (
        f"{name}'s data_collator ({type(collator).__name__}) returned no 'neuron_groups' although "
        f"{args_name}(remove_unused_columns=False) keeps the column: call {FIX} before train(), or pass "
        "data_collator=neuron_peft.data.GroupsCollator(collator)"
    )


GENERIC = (
    "a column named 'neuron_groups' survives transformers.Trainer's TrainingArguments(remove_unused_columns=True) "
    "(the default; neuron_peft.data.encode_examples names it so, and NeuronSelectTrainer keeps any name); TRL's "
    "SFTTrainer / DPOTrainer keep only their own columns and their collators return no groups: call "
    f"{FIX} before train(); packing (SFTConfig(packing=True)) leaves no per-sample groups"
)


def missing_groups_hint(trainer: Optional[object] = None) -> str:
    """What dropped the batch's ``neuron_groups`` and how to keep it: the running trainer's setting when one is on
    the call stack (or given), else the fixes for transformers' Trainer and TRL."""
    trainer = trainer if trainer is not None else active_trainer()
    if trainer is None:
        return GENERIC
    try:
        return _describe(trainer)
    except Exception:  # a message must never be the thing that fails
        return GENERIC
