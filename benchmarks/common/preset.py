"""The configuration of a translation run (`Preset`), and the named presets of quality.py and selection_value.py.

A `Preset` is what data.py, models.py, methods.py and training.py read: model, languages, split sizes, steps,
batch size, lengths, learning-rate grids, selection ratios, device and seed. quality.py runs the `PRESETS` below
(``--preset``, then its command-line overrides); interleaved_steps.py times the methods of the same presets.
selection_value.py runs the `SELECTION_PRESETS` (a `SelectionPreset` adds seeds, budgets, methods per budget and
the learning-rate search; `methods_for` gives its methods at one budget) and fills a `Preset` from one
(`translation_preset`) for these helpers. Issue 24's presets derive from ``long``: ``interference`` (per-language
training sizes, ``n_train_by_lang``, and a declared ``high_resource`` set) and ``batch8`` / ``batch16`` / ``batch32``
(`at_batch_size`: the same examples seen at another batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .method_names import ALL_METHODS

FORGET_LANGS = ("sw", "id")


@dataclass
class Preset:
    model: str  # "gemma3-270m", a local HF folder, or "tiny"
    langs: tuple[str, ...]
    n_train: int  # training pairs per language
    n_dev: int  # dev pairs per language (LR choice)
    n_test: int  # test pairs per language
    n_forget: int  # test pairs per untrained language
    n_calib: int  # calibration pairs per language (Taylor scoring), taken from the training pairs
    steps: int
    batch_size: int
    max_length: int
    max_new_tokens: int
    methods: tuple[str, ...]
    grids: dict[str, list[float]]
    max_chars: Optional[int] = None
    forget_langs: tuple[str, ...] = FORGET_LANGS
    forget_shots: int = 1
    eval_batch_size: int = 16
    calib_batch_size: int = 4
    neuron_ratio: float = 0.5
    specific_ratio: float = 0.1
    dtype: str = "float32"
    device: str = "auto"
    threads: Optional[int] = None
    seed: int = 0
    warmup_ratio: float = 0.03  # share of the steps with a linearly rising learning rate (train_loop's default)
    n_train_by_lang: dict = field(default_factory=dict)  # language -> training pairs, overriding n_train there
    smoke: bool = True  # label outputs as smoke-scale
    scale_label: str = ""  # overrides the smoke / full-scale label
    note: str = ""


PRESETS = {
    "tiny": Preset(
        model="tiny",
        langs=("fr", "de"),
        n_train=24,
        n_dev=3,
        n_test=4,
        n_forget=3,
        n_calib=4,
        steps=3,
        batch_size=4,
        max_length=48,
        max_new_tokens=8,
        methods=ALL_METHODS,
        eval_batch_size=8,
        grids={"full": [1e-3, 3e-3], "lora": [3e-3, 1e-2], "neuron": [3e-3, 1e-2]},
        threads=1,
        note="tiny random Llama + fake data: exercises every code path; the numbers mean nothing",
    ),
    "cpu": Preset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=200,
        n_dev=4,
        n_test=12,
        n_forget=8,
        n_calib=8,
        steps=30,
        batch_size=8,
        max_length=80,
        max_new_tokens=40,
        max_chars=80,
        methods=("zero-shot", "ns-0.4", "lora-r16", "full", "ns-0.4-random", "ns-0.4-agnostic"),
        grids={"full": [2e-5, 1e-4], "lora": [5e-4, 2e-3], "neuron": [1e-4, 5e-4]},
        threads=2,
        note="smoke scale: verses <= 80 chars, 200 pairs/language, 30 steps x 8, 12 test verses per language, "
        "6 methods, 2-value LR grids on 4 dev verses per language",
    ),
    "cpu-large": Preset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=400,
        n_dev=8,
        n_test=50,
        n_forget=25,
        n_calib=16,
        steps=80,
        batch_size=8,
        max_length=80,
        max_new_tokens=40,
        max_chars=80,
        methods=("zero-shot", "ns-0.4", "lora-r16", "full", "ns-0.4-agnostic", "ns-0.4-random", "dora-r16"),
        grids={"full": [1e-5, 3e-5], "lora": [7e-4, 2e-3], "neuron": [7e-5, 2e-4]},
        threads=2,
        smoke=False,
        scale_label="CPU-scale comparison (small training budget; read the confidence intervals)",
        note="the largest comparison that fits one CPU session (about 90 min on 2 cores): verses <= 80 chars, 400 "
        "pairs/language, 80 steps x 8, 50 test verses per language (200 in all) with paired-bootstrap confidence "
        "intervals, 25 probe verses per untrained language, the headline methods plus the agnostic-only and "
        "random-rows ablations, 2-value LR grids (bracketing the cpu preset's dev picks) on 8 dev verses per "
        "language",
    ),
    "gpu": Preset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=2000,
        n_dev=25,
        n_test=200,
        n_forget=100,
        n_calib=64,
        steps=400,
        batch_size=16,
        max_length=160,
        max_new_tokens=96,
        max_chars=200,
        methods=ALL_METHODS,
        eval_batch_size=128,
        calib_batch_size=8,
        smoke=False,
        grids={"full": [1e-5, 3e-5, 1e-4], "lora": [2e-4, 5e-4, 1e-3], "neuron": [3e-5, 1e-4, 3e-4]},
        note="full comparison: 2000 pairs per language (8000 in all, 400 steps x 16 = one epoch), 200 test verses "
        "per language, all methods, 3-value LR grids on 25 dev verses per language; fp32 weights with TF32 matmuls",
    ),
}


def resolve_device(p: Preset) -> torch.device:
    """The preset's device; "auto" is CUDA when present, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device)


# ---------------------------------------------------------------------------------- selection_value.py's presets
@dataclass
class SelectionPreset:
    """A selection_value.py run: its languages, split sizes, seeds, budgets, methods per budget and LR grids."""

    model: str
    langs: tuple[str, ...]
    n_train: int  # training pairs per language (where n_train_by_lang sets none)
    n_dev: int  # dev pairs per language (LR choice, default-selection choice)
    n_test: int  # test pairs per language (NLL)
    n_bleu: int  # test pairs per language decoded greedily for chrF/BLEU (0 = skip)
    n_forget: int  # probe pairs per untrained language, and English-only verses
    n_calib: int  # calibration pairs per language (Taylor scoring), from the training pairs
    steps: int
    batch_size: int
    max_length: int
    max_chars: int
    max_new_tokens: int
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]  # neuron_ratio of the Taylor selection at layer_ratio 0.4 that fixes each budget
    methods: dict  # budget (str of neuron_ratio, or "*") -> tuple of methods; "*" applies to every budget
    grids: dict[str, list[float]]
    factor: float = 3.0
    max_extend: int = 2
    forget_langs: tuple[str, ...] = ("sw", "id")
    eval_batch_size: int = 32
    calib_batch_size: int = 4
    threads: Optional[int] = 2
    dtype: str = "float32"
    device: str = "cpu"
    note: str = ""
    data_seed: int = 0
    extra: dict = field(default_factory=dict)
    warmup_ratio: float = 0.03  # share of the steps with a rising learning rate (the earlier presets' fixed value)
    eval_every: int = 0  # dev NLL every this many steps during training (the dev curve); 0 = only at the end
    n_train_by_lang: dict = field(default_factory=dict)  # language -> training pairs, overriding n_train there
    high_resource: tuple[str, ...] = ()  # trained languages reported apart from the others (the interference report)


# column-unit methods (issue 26; built in common/matched.py), run at every budget of the long preset
UNIT_METHODS: tuple[str, ...] = ("channel", "channel-random", "mlp-neuron")
_LONG_FREE = ("full", "lora-r8", "lora-r16", "lora-r64", "dora-best")  # budget-free: trained once
_NS = ("taylor", "taylor-agnostic", "taylor-type-rank", "taylor-per-layer", "taylor-global-rank")
SELECTION_PRESETS = {
    "tiny": SelectionPreset(
        model="tiny",
        langs=("fr", "de"),
        n_train=24,
        n_dev=4,
        n_test=4,
        n_bleu=2,
        n_forget=3,
        n_calib=4,
        steps=2,
        batch_size=4,
        max_length=48,
        max_chars=80,
        max_new_tokens=4,
        seeds=(0,),
        budgets=(0.25, 1.0),
        methods={
            "0.25": (
                *_NS,
                "taylor-global-z",
                "taylor-raw-groups",
                "neumt",
                "random-layers",
                "random-all",
                "magnitude",
                "lora",
                "dora",
                "full",
                "channel",
                "channel-random",
                "mlp-neuron",
                "channel-xnorm",
            ),
            "1.0": ("taylor", "random-all", "lora"),
        },
        grids={"full": [1e-3], "lora": [3e-3], "neuron": [1e-2], "column": [1e-2]},
        max_extend=1,
        eval_batch_size=8,
        threads=1,
        note="tiny random Llama + fake data: every code path in seconds; the numbers mean nothing",
    ),  # fmt: skip
    "quick": SelectionPreset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=200,
        n_dev=24,
        n_test=24,
        n_bleu=8,
        n_forget=16,
        n_calib=8,
        steps=16,
        batch_size=8,
        max_length=80,
        max_chars=80,
        max_new_tokens=32,
        seeds=(0,),
        budgets=(0.05,),
        methods={"0.05": ("taylor", "random-all", "lora")},
        grids={"lora": [3e-4, 1e-3, 3e-3], "neuron": [3e-5, 1e-4, 3e-4], "column": [3e-5, 1e-4, 3e-4]},
        max_extend=1,
        note="protocol check (< 15 min on a quiet 2-core host): 3 methods at the ~1.8% budget, 1 seed, 16 steps, "
        "24 dev / 24 test pairs per language; too small to rank methods",
    ),  # fmt: skip
    "full": SelectionPreset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=300,
        n_dev=50,
        n_test=50,
        n_bleu=10,
        n_forget=40,
        n_calib=16,
        steps=20,
        batch_size=8,
        max_length=96,
        max_chars=100,
        max_new_tokens=40,
        seeds=(0, 1, 2),
        budgets=(0.05, 0.25, 1.0),
        methods={
            "0.05": (
                "taylor",
                "taylor-agnostic",
                "taylor-per-layer",
                "taylor-global-rank",
                "random-layers",
                "random-all",
                "magnitude",
                "lora",
                "dora",
                "full",
            ),
            "0.25": ("taylor", "random-all", "lora"),
            "1.0": ("taylor", "random-all"),
        },
        # start grids centred on the quick preset's picks (rows 3e-4..9e-4, LoRA 1e-3), so most picks are interior
        # without an extension; the edge rule still extends where they are not
        # columns write straight into the residual stream (a first probe found Taylor columns far behind rows at
        # 3e-4): their grid starts a third lower, reaching 3e-5, and extends while the pick is at an edge
        grids={
            "full": [1e-5, 3e-5, 1e-4],
            "lora": [3e-4, 1e-3, 3e-3],
            "neuron": [1e-4, 3e-4, 1e-3],
            "column": [3e-5, 1e-4, 3e-4],
        },
        note="3 seeds; budgets ~1.8% and ~10% of linear weights plus the paper setting (40% of layers, all rows); "
        "20 steps x 8 mixed-language pairs (verses <= 100 chars, so the dev books give >= 50 pairs per language); "
        "50 dev / 50 test pairs per language (NLL), 10 per language decoded; 75 training runs (~2.5 h on a quiet "
        "2-core host, estimated from ~3.6 s per step and ~30 s per dev pass; not measured end to end)",
    ),  # fmt: skip
    "long": SelectionPreset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=1000,
        n_dev=50,
        n_test=100,
        n_bleu=100,
        n_forget=40,
        n_calib=16,
        steps=750,
        batch_size=16,
        max_length=96,
        max_chars=100,
        max_new_tokens=40,
        seeds=(0, 1, 2),
        budgets=(0.05, 0.25),
        methods={"*": ("taylor-per-layer", *UNIT_METHODS, *_LONG_FREE)},
        # 4-value start grids reaching 10x the 20-step picks (rows 3e-4 at 1.8% / 1e-4 at 9%, LoRA 1e-3 at r 8,
        # full 3e-5), extended x/÷3 while the pick sits at an edge, so every pick is interior or flagged EDGE
        grids={
            "full": [1e-5, 3e-5, 1e-4, 3e-4],
            "lora": [3e-4, 1e-3, 3e-3, 1e-2],
            "neuron": [1e-4, 3e-4, 1e-3, 3e-3],
            "column": [3e-5, 1e-4, 3e-4, 1e-3],
        },
        max_extend=2,
        warmup_ratio=0.06,
        eval_every=50,
        threads=None,
        device="auto",
        note="long training (issue 24): 750 steps x 16 over 1000 pairs per language (3 epochs of 4000 pairs), "
        "warm-up 6% then cosine; verses <= 100 chars; 50 dev / 100 test pairs per language, all 100 decoded for "
        "chrF/BLEU; LoRA r 8/16/64, DoRA "
        "at LoRA's best rank, per-layer Taylor rows and the column units (channel, channel-random, mlp-neuron) at the "
        "1.8% and 9% budgets, full FT; dev NLL every 50 steps; "
        "3 seeds at each picked LR; sized for a GPU (CPU estimate in benchmarks/README.md)",
    ),  # fmt: skip
}


# ---- issue 24, item 4: interference between languages at a 10:1 imbalance
# two high-resource and six typologically varied low-resource targets (Indo-Aryan, Turkic, Austroasiatic, Slavic
# in Cyrillic and Latin script, Sinitic); every one has >= 75 dev and >= 163 test verses <= 100 chars in the Bible
INTERFERENCE_HIGH = ("fr", "es")
INTERFERENCE_LOW = ("hi", "tr", "vi", "ru", "zh", "pl")
INTERFERENCE_METHODS = ("taylor-per-layer", "taylor-per-layer-s30", "taylor-per-layer-agnostic", "channel", "lora")
SELECTION_PRESETS["interference"] = replace(
    SELECTION_PRESETS["long"],
    langs=INTERFERENCE_HIGH + INTERFERENCE_LOW,
    n_train=200,
    n_train_by_lang={x: 2000 for x in INTERFERENCE_HIGH},
    high_resource=INTERFERENCE_HIGH,
    steps=975,
    eval_every=75,
    methods={"*": INTERFERENCE_METHODS},
    note="interference (issue 24): en -> fr, es (2000 training pairs each, high-resource) and hi, tr, vi, ru, zh, pl "
    "(200 each, low-resource), 10:1; 975 steps x 16 = 3 epochs of the 5200 pairs, warm-up 6% then cosine; batches "
    "are a seeded uniform shuffle of all pairs (common/training.py), so they follow the natural imbalanced mix: fr "
    "and es are 77% of the examples (~12 of 16 per batch), each low-resource language 3.8% (~0.6 per batch), no "
    "re-sampling; calibration 16 pairs per language (equal); 50 dev / 100 test pairs per language, all 100 decoded; "
    "routed Taylor per-layer rows at specific_ratio 0.1 and 0.3, the same rows agnostic-only, Taylor channels and "
    "budget-matched LoRA at the 1.8% and 9% budgets; NLL macro-averaged over low- and high-resource languages apart; "
    "3 seeds at each picked LR; sized for a GPU (CPU estimate in benchmarks/README.md)",
)
SELECTION_PRESETS["tiny-interference"] = replace(
    SELECTION_PRESETS["tiny"],
    langs=("fr", "de", "hi", "tr", "vi"),
    n_train=3,
    n_train_by_lang={"fr": 30, "de": 30},
    high_resource=("fr", "de"),
    n_calib=3,
    steps=3,
    budgets=(0.25,),
    methods={"*": INTERFERENCE_METHODS},
    note="tiny random Llama + fake data, 30 training pairs for fr/de and 3 for hi/tr/vi: the interference preset's "
    "code paths in seconds; the numbers mean nothing",
)


# ---- issue 24, item 3: batch size at equal examples seen
BATCH_METHODS = ("taylor-per-layer", "channel", "lora", "lora-r16")


def at_batch_size(p: SelectionPreset, batch_size: int, methods: tuple[str, ...], note: str) -> SelectionPreset:
    """``p`` at another batch size with the same examples (so tokens) seen: steps and eval_every scaled by
    p.batch_size / batch_size (the dev curve at the same examples seen), the warm-up ratio kept, and every start LR
    scaled by sqrt(batch_size / p.batch_size), the square-root rule for Adam (Malladi et al. 2022, "On the SDEs and
    scaling rules for adaptive gradient algorithms"), rounded to 2 significant digits; the grid's x3 spacing and the
    edge extension stay, so a pick away from the rule is still found."""
    if (p.steps * p.batch_size) % batch_size or (p.eval_every * p.batch_size) % batch_size:
        raise ValueError(f"{p.steps} steps x {p.batch_size} is not a whole number of batches of {batch_size}")
    k = batch_size / p.batch_size
    grids = {f: [float(f"{lr * math.sqrt(k):.2g}") for lr in g] for f, g in p.grids.items()}
    return replace(p, batch_size=batch_size, steps=p.steps * p.batch_size // batch_size,
                   eval_every=p.eval_every * p.batch_size // batch_size, grids=grids, methods={"*": methods},
                   note=note)  # fmt: skip


_BATCH_NOTE = (
    "batch size at equal examples seen (issue 24): the long preset (4000 pairs, 3 epochs, verses <= 100 chars, "
    "100 test pairs per language all decoded, 3 seeds) at {steps} steps x {b}; LoRA r 16 and budget-matched LoRA, "
    "Taylor per-layer rows and Taylor channels at the 1.8% and 9% budgets; start LRs the long grids x sqrt({b}/16) "
    "(square-root rule for Adam); dev NLL every {every} steps ({ex} examples, as the long preset's every 50 x 16); "
    "sized for a GPU (CPU estimate in benchmarks/README.md)"
)
for _b in (8, 16, 32):
    _long = SELECTION_PRESETS["long"]
    _steps, _every = _long.steps * _long.batch_size // _b, _long.eval_every * _long.batch_size // _b
    SELECTION_PRESETS[f"batch{_b}"] = at_batch_size(
        _long, _b, BATCH_METHODS,
        _BATCH_NOTE.format(steps=_steps, b=_b, every=_every, ex=_every * _b)
        + ("; = the long preset with these methods: --resume on a long run's folder trains only what it lacks"
           if _b == _long.batch_size else ""),
    )  # fmt: skip


def methods_for(p: SelectionPreset, nr: float) -> list[str]:
    """The methods a selection_value.py preset runs at budget ``nr``, in training order."""
    key = next((k for k in p.methods if k != "*" and float(k) == nr), "*")
    ms = list(p.methods.get(key, p.methods.get("*", ())))
    # NeuMT needs the full fine-tune as its reference: train full first; DoRA at LoRA's best rank after the LoRAs
    return sorted(ms, key=lambda m: (m != "full", m == "neumt", m == "dora-best"))


def translation_preset(p: SelectionPreset, seed: int) -> Preset:
    """The translation-run configuration of a selection_value.py run, read by the shared helpers."""
    return Preset(model=p.model, langs=p.langs, n_train=p.n_train, n_dev=p.n_dev, n_test=p.n_test,
                  n_forget=p.n_forget, n_calib=p.n_calib, steps=p.steps, batch_size=p.batch_size,
                  max_length=p.max_length, max_new_tokens=p.max_new_tokens, methods=(), grids={},
                  max_chars=p.max_chars, forget_langs=p.forget_langs, eval_batch_size=p.eval_batch_size,
                  seed=seed, threads=p.threads, dtype=p.dtype, device=p.device,
                  warmup_ratio=p.warmup_ratio, n_train_by_lang=dict(p.n_train_by_lang))  # fmt: skip
