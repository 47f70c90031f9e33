"""The parallel pairs of every split of a translation run: Bible verses, or tiny fake pairs for the smoke tests.

`build_data` gives the exact pairs a preset asks for: train, dev (learning-rate choice), test (trained languages),
forget_dev (few-shot prompts) and forget_test (languages never trained). Splits come from different Bible books
(`neuron_peft.data.bible_pairs`), so no verse is in two of them. With ``model="tiny"`` the pairs are fake:
random English-word sentences with word-by-word made-up translations, so the whole pipeline runs offline in seconds.
`english_pairs` gives selection_value.py's English-only verses (its forgetting probe on English itself), `build_pairs`
every split of a selection_value.py run, `calibration_examples` the training pairs its Taylor scoring reads.

`export_data` / `read_data` write and read those pairs as jsonl, so a machine without the Bible corpus (or without
network) trains and tests on exactly the sentences of the machine that made the extract.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

from neuron_peft.data import ParallelExample
from neuron_peft.fileio import atomic_path

if TYPE_CHECKING:
    from .preset import Preset, SelectionPreset

_TINY_WORDS = (
    "the cat dog sun moon tree river house bread water light king child man woman road city stone fire wind "
    "sees eats makes finds gives takes loves holds big small old new good red"
).split()
_TINY_LANGS = {
    "fr": lambda w: w[::-1] + "e",
    "de": lambda w: w.upper(),
    "hi": lambda w: "x" + w[::-1],
    "tr": lambda w: w + "ler",
    "sw": lambda w: "ki" + w,
    "id": lambda w: w + "nya",
    "vi": lambda w: "ng" + w[::-1],  # a fifth trained language for the tiny interference preset
}


def tiny_pairs(tgts, n: Union[int, Mapping[str, int]], split: str, seed: int) -> list[ParallelExample]:
    """Fake parallel data: random English-word sentences and word-by-word fake translations (split-seeded); ``n``
    pairs per target, or ``n[tgt]`` for a mapping (one random stream either way, drawn target after target)."""
    rng = random.Random(f"{seed}-{split}")
    out = []
    for tgt in tgts:
        for i in range(n[tgt] if isinstance(n, Mapping) else n):
            words = [rng.choice(_TINY_WORDS) for _ in range(rng.randint(3, 6))]
            out.append(ParallelExample(" ".join(words), " ".join(_TINY_LANGS[tgt](w) for w in words), f"en-{tgt}",
                                       "en", tgt, ref=f"tiny:{split}:{i}"))  # fmt: skip
    return out


def train_counts(p: Preset) -> dict[str, int]:
    """Training pairs per trained language: ``n_train``, or ``n_train_by_lang[lang]`` where the preset sets one (the
    interference presets' imbalance)."""
    return {t: p.n_train_by_lang.get(t, p.n_train) for t in p.langs}


def build_data(p: Preset) -> dict[str, list[ParallelExample]]:
    """The exact pairs of every split: train, dev, test (trained languages), forget_dev (shots), forget_test.
    Training pairs per language follow `train_counts`; a preset without ``n_train_by_lang`` takes the same code path
    (and gets the same pairs) as before that field existed."""
    n_train = train_counts(p) if p.n_train_by_lang else p.n_train
    if p.model == "tiny":
        return {
            "train": tiny_pairs(p.langs, n_train, "train", p.seed),
            "dev": tiny_pairs(p.langs, p.n_dev, "dev", p.seed),
            "test": tiny_pairs(p.langs, p.n_test, "test", p.seed),
            "forget_dev": tiny_pairs(p.forget_langs, max(p.forget_shots, 1), "dev", p.seed),
            "forget_test": tiny_pairs(p.forget_langs, p.n_forget, "test", p.seed),
        }
    from neuron_peft.data import bible_pairs

    def bible(tgts, split, n):
        return bible_pairs("en", tgts, split=split, max_per_lang=n, max_chars=p.max_chars, seed=p.seed)

    if p.n_train_by_lang:  # one call per language: bible_pairs draws each target's subset with a fresh Random(seed)
        train = [e for t, n in n_train.items() for e in bible((t,), "train", n)]
    else:
        train = bible(p.langs, "train", p.n_train)
    return {
        "train": train,
        "dev": bible(p.langs, "dev", p.n_dev),
        "test": bible(p.langs, "test", p.n_test),
        "forget_dev": bible(p.forget_langs, "dev", max(p.forget_shots, 1)),
        "forget_test": bible(p.forget_langs, "test", p.n_forget),
    }


def english_pairs(model: str, n: int, max_chars, seed: int) -> list[ParallelExample]:
    """``n`` English test-book verses (fake ones for ``model="tiny"``): selection_value.py's English-only probe."""
    if model == "tiny":
        return tiny_pairs(("fr",), n, "english", seed)
    from neuron_peft.data import bible_pairs

    return bible_pairs("en", ("fr",), split="test", max_per_lang=n, max_chars=max_chars, seed=seed + 1)


DATA_FIELDS = ("src", "tgt", "group", "src_lang", "tgt_lang", "ref")


def build_pairs(p: SelectionPreset, qp: Preset) -> dict[str, list[ParallelExample]]:
    """A selection_value.py run's pairs per split (`build_data` with one solved dev example per probe language) plus
    English-only verses for the English forgetting probe."""
    data = build_data(replace(qp, n_forget=p.n_forget, forget_shots=1))
    data["english"] = english_pairs(p.model, p.n_forget, p.max_chars, p.data_seed)
    return data


def calibration_examples(train: list[ParallelExample], n_calib: int) -> list[ParallelExample]:
    """The first ``n_calib`` training pairs of every language: what Taylor scoring calibrates on."""
    return [e for g in by_group(train).values() for e in g[:n_calib]]


def export_data(data: dict[str, list[ParallelExample]], path: Path, preset: Preset) -> None:
    """One JSON object per line: the first holds metadata, every other one pair with its ``split``."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        meta = {"meta": {"format": "neuron_peft.quality_data", "version": 1, "preset": asdict(preset),
                         "counts": {k: len(v) for k, v in data.items()}}}  # fmt: skip
        fh.write(json.dumps(meta, ensure_ascii=False) + "\n")
        for split, examples in data.items():
            for e in examples:
                row = {"split": split, **{f: getattr(e, f) for f in DATA_FIELDS}}
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_data(path: Path) -> dict[str, list[ParallelExample]]:
    """The splits of a file written by `export_data`; ValueError naming the line when a row is incomplete."""
    data: dict[str, list[ParallelExample]] = {}
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "meta" in row:
                if row["meta"].get("format") != "neuron_peft.quality_data":
                    raise ValueError(f"{path}:{lineno}: not a quality-benchmark data file")
                continue
            try:
                data.setdefault(row["split"], []).append(ParallelExample(**{f: row[f] for f in DATA_FIELDS}))
            except KeyError as err:
                raise ValueError(f"{path}:{lineno}: missing field {err.args[0]!r}") from None
    missing = [s for s in ("train", "dev", "test", "forget_dev", "forget_test") if s not in data]
    if missing:
        raise ValueError(f"{path}: no rows for split(s) {missing}")
    return data


def by_group(examples: list[ParallelExample]) -> dict[str, list[ParallelExample]]:
    """Examples by language pair ("en-fr", ...), in order of first appearance."""
    out: dict[str, list[ParallelExample]] = {}
    for e in examples:
        out.setdefault(e.group, []).append(e)
    return out
