"""`neuron-peft` on transformers' machinery (issue 15 §3): Trainer checkpoints and resume, --help, --version, progress.

A tiny local model folder and corpus (built offline by `tiny_models.write_tiny_model`) keep every run to a few seconds.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file
from testing_utils import run_cli, tree_digest, write_tiny_corpus
from tiny_models import write_tiny_model
from transformers import TrainingArguments

import neuron_peft
from neuron_peft import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_trainer")
    write_tiny_model(root / "model")
    write_tiny_corpus(root / "corpus.jsonl")
    return root


def train_argv(files, out, *extra):
    return ["train", "--model", files / "model", "--data", files / "corpus.jsonl", "--steps", "4", "--batch-size",
            "2", "--save_steps", "2", "--threads", "1", "--out", out, *extra]  # fmt: skip


def adapter(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_train_resumed_from_a_checkpoint_gives_the_uninterrupted_adapter(files, tmp_path):
    """Reference: the same run without interruption (fixed seed). Its checkpoint-2 is what a run stopped after
    step 2 leaves behind; resuming from it must reproduce the final adapter exactly."""
    full = tmp_path / "full"
    assert run_cli(train_argv(files, full)) == 0
    assert {"checkpoint-2", "checkpoint-4", "adapter_model.safetensors"} <= {p.name for p in full.iterdir()}
    final, halfway = adapter(full), adapter(full / "checkpoint-2")
    assert any(not torch.equal(final[k], halfway[k]) for k in final)  # steps 3-4 changed the adapter

    resumed = tmp_path / "resumed"  # a fresh folder, reading the checkpoint of the other run
    assert run_cli(train_argv(files, resumed, "--resume_from_checkpoint", full / "checkpoint-2")) == 0
    got = adapter(resumed)
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in final)

    checkpoint = tree_digest(full / "checkpoint-2")  # resuming inside the run's own folder needs no --overwrite
    assert run_cli(train_argv(files, full, "--resume_from_checkpoint", full / "checkpoint-2")) == 0
    again = adapter(full)
    assert all(torch.equal(again[k], final[k]) for k in final)
    assert tree_digest(full / "checkpoint-2") == checkpoint  # the checkpoint it read is untouched

    assert run_cli(train_argv(files, tmp_path / "none", "--resume_from_checkpoint", "last")) == 2


def test_train_speaks_training_arguments(files, tmp_path, capsys):
    """Trainer's options reach Trainer: bf16 autocast, gradient checkpointing, per-step logging, no checkpoints
    without --save_steps; the earlier short names are aliases of TrainingArguments fields."""
    out = tmp_path / "out"
    argv = ["train", "--model", files / "model", "--data", files / "corpus.jsonl", "--max_steps", "2", "--lr", "1e-3",
            "--per_device_train_batch_size", "2", "--bf16", "--gradient-checkpointing", "--logging_steps", "1",
            "--report_to", "none", "--threads", "1", "--out", out]  # fmt: skip
    assert run_cli(argv) == 0
    logged = capsys.readouterr().out
    assert logged.count("'loss'") == 2 and "'learning_rate'" in logged
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    parsed = cli.build_parser().parse_args(["train", "--steps", "7", "--lr", "0.5", "--grad-accum", "3", "--batch-size",
                                            "5", "--warmup-ratio", "0.2", "--out", "x", "--save_steps", "3"])  # fmt: skip
    method, targs = cli._train_dataclasses(parsed)
    assert (targs.max_steps, targs.learning_rate, targs.gradient_accumulation_steps) == (7, 0.5, 3)
    assert (targs.per_device_train_batch_size, targs.output_dir, targs.save_steps) == (5, "x", 3)
    assert str(targs.save_strategy.value) == "steps" and targs.lr_scheduler_type.value == "cosine"
    assert 0.2 in (getattr(targs, "warmup_ratio", None), targs.warmup_steps)
    assert method.model == "gemma3-270m" and method.neuron_ratio == 0.1


def test_every_option_has_help_and_help_shows_defaults(capsys):
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == {"select", "train", "evaluate", "merge", "push", "demo"}
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.option_strings)
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([name, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: " in text, name
        if name == "train":  # TrainingArguments' own help, with the CLI's defaults and the earlier names
            assert "--max_steps MAX_STEPS, --max-steps MAX_STEPS, --steps MAX_STEPS" in text
            assert "(default: 200)" in text and "--resume_from_checkpoint" in text and "--report_to" in text
        if name == "demo":
            assert "optimizer steps (default: 50)" in text
    assert issubclass(cli.CLITrainingArguments, TrainingArguments)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"neuron-peft {neuron_peft.__version__} (peft ")


def test_evaluate_and_demo_run_with_progress(files, tmp_path, capsys):
    """evaluate shows a tqdm bar; demo (select -> Trainer -> evaluate) runs end to end on the tiny model."""
    corpus = files / "corpus.jsonl"
    common = ["--model", files / "model", "--data", corpus, "--eval-data", corpus, "--threads", "1", "--n-eval", "2",
              "--max-new-tokens", "2"]  # fmt: skip
    assert run_cli(["evaluate", *common, "--json", tmp_path / "scores.json"]) == 0
    assert "translate" in capsys.readouterr().err  # tqdm writes to stderr
    assert (tmp_path / "scores.json").is_file()
    demo = tmp_path / "demo"
    assert run_cli(["demo", *common, "--steps", "2", "--n-calib", "2", "--batch-size", "2", "--out", demo]) == 0
    assert {"report.md", "report.json", "adapter", "selection"} <= {p.name for p in demo.iterdir()}
    assert (demo / "adapter" / "adapter_model.safetensors").is_file()


def test_select_ranking_options_reach_select_neurons(files, tmp_path):
    """--row-selection / --score-normalization are select_neurons' options: 'per_layer' (the default) keeps rows in
    every scored layer, the same share of each (hand-computed: 2 layers x 7 projections, 25% of the weights -> every
    one of the 14 layers), where 'layers' keeps the top 40% of layers; both are recorded in the saved selection."""
    common = ["select", "--model", files / "model", "--data", files / "corpus.jsonl", "--n-calib", "2",
              "--threads", "1", "--neuron-ratio", "0.625"]  # fmt: skip
    assert run_cli([*common, "--row-selection", "layers", "--out", tmp_path / "layers"]) == 0
    assert run_cli([*common, "--out", tmp_path / "default"]) == 0
    assert run_cli([*common, "--row-selection", "per_layer", "--score-normalization", "module_type_rank",
                    "--out", tmp_path / "per_layer"]) == 0  # fmt: skip
    from neuron_peft import NeuronSelection

    layers, per_layer = NeuronSelection.load(tmp_path / "layers"), NeuronSelection.load(tmp_path / "per_layer")
    assert len(per_layer.kept_layers) == 14 and len(layers.kept_layers) < 14
    assert (per_layer.row_selection, per_layer.score_normalization) == ("per_layer", "module_type_rank")
    default = NeuronSelection.load(tmp_path / "default")
    assert (default.row_selection, len(default.kept_layers), layers.row_selection) == ("per_layer", 14, "layers")
    assert run_cli([*common, "--row-selection", "sideways", "--out", tmp_path / "bad"]) == 2


def test_select_unit_reaches_select_neurons(files, tmp_path):
    """--unit is select_neurons' unit: 'channel' scores only the output projections (o_proj, down_proj of the
    2-layer model) and saves columns; 'mlp_neuron' saves gate/up rows with the same j as the down_proj columns; the
    default stays 'row'; an unknown unit is an argparse error (exit 2)."""
    from neuron_peft import NeuronSelection

    common = ["select", "--model", files / "model", "--data", files / "corpus.jsonl", "--n-calib", "2",
              "--threads", "1"]  # fmt: skip
    assert run_cli([*common, "--unit", "channel", "--out", tmp_path / "channel"]) == 0
    assert run_cli([*common, "--unit", "mlp_neuron", "--out", tmp_path / "mlp"]) == 0
    channel, mlp = NeuronSelection.load(tmp_path / "channel"), NeuronSelection.load(tmp_path / "mlp")
    assert channel.unit == "channel" and channel.neurons == {}
    assert [n.split(".", 3)[-1] for n in channel.layers] == ["self_attn.o_proj", "mlp.down_proj"] * 2
    assert set(channel.columns) | {n for c in channel.language_columns.values() for n in c} == set(channel.layers)
    down = "model.layers.0.mlp.down_proj"
    assert mlp.unit == "mlp_neuron" and mlp.neurons["model.layers.0.mlp.gate_proj"] == mlp.columns[down]
    assert cli.build_parser().parse_args(["select"]).unit == "row"
    assert run_cli([*common, "--unit", "sideways", "--out", tmp_path / "bad"]) == 2
