"""The configuration of a translation run (`Preset`), and quality.py's named presets.

A `Preset` is what data.py, models.py, methods.py and training.py read: model, languages, split sizes, steps,
batch size, lengths, learning-rate grids, selection ratios, device and seed. quality.py runs the `PRESETS` below
(``--preset``, then its command-line overrides); interleaved_steps.py times the methods of the same presets;
selection_value.py has presets of its own and fills a `Preset` from them for these helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .methods import ALL_METHODS

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
