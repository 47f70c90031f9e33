"""Checks of command-line values that need no model: devices, languages, step counts, input and output paths.

Each failure is an `_ArgError` naming the option, raised before any model is loaded, so a bad value costs nothing;
`neuron_peft.cli.main` prints it on one line and exits with status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from transformers.trainer_utils import get_last_checkpoint

from ..data import BIBLE_VERSIONS
from ..fileio import check_output_dir, check_output_file
from ..resources import MODEL_ALIASES, cached_model_dir


class _ArgError(ValueError):
    """A command-line value that parses but cannot work (checked before any model is loaded)."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"argument {flag}: {message}")


def device_of(name: str) -> torch.device:
    """The torch device a --device value means ("auto": CUDA when available, else CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
