"""From examples to model batches: tokenized features with loss on the answer only, and the collators.

`encode_example` turns a `ParallelExample` into prompt + answer token ids with labels -100 everywhere but the answer
and the sample's group in a ``neuron_groups`` column (the adapted model's keyword, which transformers' ``Trainer``
keeps). `TranslationCollator` pads them into batches with each sample's group; `GroupsCollator` adds the groups to
any other collator's batches (TRL's, for one). `calibration_batches` builds the ``{group: [batch]}`` the selection
pass reads, `generation_prompts` the left-padded prompts ``generate`` reads.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Optional, Sequence

from transformers import DataCollatorForSeq2Seq

from ..trainer_hints import missing_groups_hint
from .corpus import ParallelExample
from .prompts import TRANSLATION_TEMPLATE, few_shot_prefix, prompt_ids, translation_prompt

IGNORE_INDEX = -100


def encode_example(
    tokenizer,
    ex: ParallelExample,
    max_length: int,
    *,
    template: str = TRANSLATION_TEMPLATE,
    on_overflow: str = "error",
) -> Optional[dict]:
    """Token ids for prompt + ``" " + target`` + EOS, with labels = -100 everywhere except the answer.

    The sample's group is stored twice: as ``group`` (kept for existing code) and as ``neuron_groups``, the name of
    the adapted model's keyword, so transformers' ``Trainer`` keeps it with its default ``remove_unused_columns=True``.

    Prompt and answer are tokenized separately (BOS only on the prompt) so training sees exactly the prompt ids
    that generation will see. Too-long examples lose the tail of the answer (and its EOS: a cut answer must not
    teach the model to stop); if not even one answer token fits, raise or, with ``on_overflow="skip"``, return None.
    """
    if on_overflow not in ("error", "skip"):
        raise ValueError(f"on_overflow must be 'error' or 'skip', got {on_overflow!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id; set tokenizer.eos_token so answers can end")
    prompt = prompt_ids(tokenizer, translation_prompt(ex.src, ex.src_lang, ex.tgt_lang, template))
    answer = list(tokenizer(" " + ex.tgt, add_special_tokens=False)["input_ids"]) + [eos]
    room = max_length - len(prompt)
    if room < 1:
        if on_overflow == "skip":
            return None
        raise ValueError(
            f"prompt is {len(prompt)} tokens, leaving no answer token within max_length={max_length} "
            f"(group {ex.group!r}, ref {ex.ref!r}); raise max_length or filter long sources"
        )
    answer = answer[:room]
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (len(prompt) + len(answer)),
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
        "group": ex.group,
        GROUPS_COLUMN: ex.group,  # named like the model's keyword, so Trainer's remove_unused_columns keeps it
    }


def encode_examples(
    tokenizer, examples: Sequence[ParallelExample], max_length: int, *, on_overflow: str = "skip", **kwargs
) -> list[dict]:
    """`encode_example` over a list, dropping (by default) the examples whose answer cannot fit at all."""
    out = (encode_example(tokenizer, ex, max_length, on_overflow=on_overflow, **kwargs) for ex in examples)
    return [f for f in out if f is not None]


def padding_id(tokenizer) -> int:
    """The id to pad with: the pad token, else EOS (a clear error when the tokenizer has neither)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id to pad with")
    return pad


GROUPS_COLUMN = "neuron_groups"  # per-sample column name that Trainer keeps (the adapted model's forward declares it)
GROUP_COLUMNS = (GROUPS_COLUMN, "group")  # where a collator looks for a sample's group, in this order

_MISSING_GROUPS = (
    "the batch has no group for sample(s) {missing}: the features carry {keys}, neither a 'neuron_groups' nor a "
    "'group' entry. {hint}. To train shared rows only, build the collator with return_groups=False."
)


def feature_groups(features: Sequence[Mapping[str, Any]], known: Optional[Sequence[str]] = None) -> list[str]:
    """Each feature's group (from ``neuron_groups``, else ``group``), with a clear error when any is missing or
    (given `known`) not one of the adapter's groups."""
    names = [next((f[k] for k in GROUP_COLUMNS if f.get(k) is not None), None) for f in features]
    missing = [i for i, g in enumerate(names) if g is None]
    if missing:
        keys = sorted(features[missing[0]].keys())
        raise ValueError(_MISSING_GROUPS.format(missing=missing[:8], keys=keys, hint=missing_groups_hint()))
    if known is not None:
        unknown = sorted({g for g in names if g not in known}, key=str)
        if unknown:
            raise ValueError(f"samples of unknown group(s) {unknown}; known groups: {sorted(known)}")
    return [str(g) for g in names]


class TranslationCollator(DataCollatorForSeq2Seq):
    """transformers' `DataCollatorForSeq2Seq` that also returns ``neuron_groups``, the group of each sample.

    Padding is the parent's: ``input_ids`` / ``attention_mask`` through ``tokenizer.pad``, labels with -100, to the
    longest sample (or a multiple of `pad_to_multiple_of`). What this subclass adds:

    - ``neuron_groups``: what the NeuronSelect adapter routes language-specific rows by, read from each feature's
      ``neuron_groups`` or ``group`` entry; `groups`, when given, lists the groups the adapter knows, so a typo fails
      here instead of silently training only shared rows. A missing group is an error that says which column and
      Trainer setting to use.
    - its own `padding_side` ("right" for training, "left" for generation prompts) and, for tokenizers without a pad
      token, EOS as padding, both on a private copy of the tokenizer (the caller's is never changed).
    - features without ``labels`` get ``labels = input_ids`` (padding still -100); string entries other than the
      group (e.g. raw ``src`` text kept by ``remove_unused_columns=False``) are dropped instead of reaching the
      tokenizer.
    """

    def __init__(
        self,
        tokenizer,
        groups: Optional[Sequence[str]] = None,
        pad_to_multiple_of: Optional[int] = None,
        *,
        return_groups: bool = True,
        padding_side: str = "right",
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = padding_id(tokenizer)
        if tokenizer.pad_token_id is None:
            # setting pad_token on a shallow copy would change the caller's tokenizer (shared special-token state)
            tokenizer = copy.deepcopy(tokenizer)
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer = copy.copy(tokenizer)
        tokenizer.padding_side = padding_side
        super().__init__(
            tokenizer=tokenizer, pad_to_multiple_of=pad_to_multiple_of, label_pad_token_id=IGNORE_INDEX,
            return_tensors="pt",
        )  # fmt: skip
        self.pad_id = pad_id
        self.groups = None if groups is None else set(groups)
        self.return_groups = return_groups
        self.padding_side = padding_side

    def __call__(self, features: Sequence[Mapping[str, Any]], return_tensors=None) -> dict:
        if not features:
            raise ValueError("cannot collate an empty batch")
        names = feature_groups(features, self.groups) if self.return_groups else None
        plain = []
        for f in features:
            f = {k: v for k, v in f.items() if k not in GROUP_COLUMNS and not isinstance(v, str)}
            if "labels" not in f and "label" not in f:
                f["labels"] = list(f["input_ids"])
            plain.append(f)
        batch = dict(super().__call__(plain, return_tensors=return_tensors))
        if names is not None:
            batch[GROUPS_COLUMN] = names
        return batch


class GroupsCollator:
    """Wraps any data collator so the batch also carries ``neuron_groups``: each feature's group (its
    ``neuron_groups`` or ``group`` entry) is taken out before the wrapped collator sees the features and put back
    into the batch as a list, one name per sample.

    For collators that know nothing of groups, e.g. TRL's ``DataCollatorForLanguageModeling`` (what ``SFTTrainer``
    builds by default) or transformers' ``DataCollatorWithPadding``. The trainer must still keep the column
    (``remove_unused_columns=False``); `neuron_peft.integrations.route_groups` does both for a built trainer. A
    missing group is an error naming the trainer setting that dropped it; `groups`, when given, lists the groups
    the adapter knows, so a typo fails here.
    """

    def __init__(self, collator, groups: Optional[Sequence[str]] = None):
        if isinstance(collator, (GroupsCollator, TranslationCollator)):
            raise TypeError(f"{type(collator).__name__} already returns neuron_groups; use it unwrapped")
        self.collator = collator
        self.groups = None if groups is None else set(groups)

    def __call__(self, features: Sequence[Mapping[str, Any]], *args, **kwargs):
        if not features:
            raise ValueError("cannot collate an empty batch")
        names = feature_groups(features, self.groups)
        plain = [{k: v for k, v in f.items() if k not in GROUP_COLUMNS} for f in features]
        batch = self.collator(plain, *args, **kwargs)
        batch[GROUPS_COLUMN] = names
        return batch

    def __getattr__(self, name):  # the wrapped collator's settings (e.g. TRL reads ``pad_token_id``)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


def calibration_batches(
    tokenizer, examples: Sequence[ParallelExample], batch_size: int, max_length: int, **kwargs
) -> dict[str, list[dict]]:
    """``{group: [batch, ...]}`` of training-format batches (no ``neuron_groups``) for the neuron-selection pass.

    Each batch holds one group only, so per-group activation statistics need no routing.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    collate = TranslationCollator(tokenizer, return_groups=False)
    by_group: dict[str, list[dict]] = {}
    for feat in encode_examples(tokenizer, examples, max_length, **kwargs):
        by_group.setdefault(feat["group"], []).append(feat)
    if not by_group:
        raise ValueError("no calibration example fits max_length")
    return {
        g: [collate(feats[i : i + batch_size]) for i in range(0, len(feats), batch_size)]
        for g, feats in by_group.items()
    }


def generation_prompts(
    tokenizer,
    examples: Sequence[ParallelExample],
    *,
    shots: Sequence[ParallelExample] = (),
    template: str = TRANSLATION_TEMPLATE,
    return_groups: bool = False,
) -> dict:
    """Left-padded prompt-only batch (so every row's continuation starts at the same column) for `generate`."""
    prefix = few_shot_prefix(shots, template)
    feats = [
        {"input_ids": prompt_ids(tokenizer, prefix + translation_prompt(ex.src, ex.src_lang, ex.tgt_lang, template)),
         "group": ex.group}
        for ex in examples
    ]  # fmt: skip
    batch = TranslationCollator(tokenizer, return_groups=return_groups, padding_side="left")(feats)
    batch.pop("labels", None)
    return batch
