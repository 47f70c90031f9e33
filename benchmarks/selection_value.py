"""Does neuron selection earn its keep? Teacher-forced NLL of every method at matched trainable parameters (issue 14).

One command, one process. The question is narrow: at the *same number of trainable weights*, do Taylor-selected
rows (and the scale-free ranking variants of `select_neurons`) beat random rows, magnitude rows and LoRA/DoRA?
BLEU on a few hundred verses cannot resolve that (benchmarks/RESULTS.md), so the primary metric is the
teacher-forced negative log-likelihood per target token on held-out test books: cheap, low-variance and paired
per sentence. chrF/BLEU from greedy decoding are reported alongside for the final table.

Protocol (every number in the output says which of these it is):

* Data: Bible verses via `neuron_peft.data.bible_pairs`, train / dev / test from different books; English ->
  ``langs``; forgetting probes: en -> sw / id translation NLL (never trained) and English-only verse NLL.
* Budgets: for each ``neuron_ratio`` in ``budgets`` the MNAFT-style Taylor selection (``layer_ratio`` 0.4, that
  neuron_ratio, specific_ratio 0.1, routed) fixes the budget: its trained weights P. Every other method of that
  budget trains P weights too (rows x inputs; LoRA/DoRA: the rank r whose all-linear parameter count is closest).
  ``neuron_ratio`` 1.0 is the paper setting (40% of layers, all their rows).
* Methods (``METHODS``): Taylor and its ranking variants, random rows in Taylor's layers, random rows everywhere,
  magnitude rows everywhere, NeuMT activation-change layers (reference = this run's full fine-tune), LoRA, DoRA,
  full fine-tuning (budget-free), zero-shot.
* Learning rate: per method and budget on seed 0, by mean dev NLL (``n_dev`` pairs per language), starting from the
  family grid; while the best value sits at an edge of what was tried, the next value beyond it (x or / ``factor``)
  is tried, up to ``max_extend`` times (a diverged run counts as infinitely bad). The other seeds reuse the pick.
* Seeds change the batch order, LoRA init and random rows; the calibration data and Taylor scores stay fixed.
* Intervals: over seeds, mean +- t(0.975, n-1) x sd / sqrt(n) of the language-averaged test NLL; paired over
  sentences, a bootstrap (stratified by language, the same resamples for every method) of the difference in the
  seed-averaged per-sentence NLL against a baseline.
* Caching: data encodings and eval batches are built once; the base model's dev/test/forgetting NLL once; with
  ``--resume`` a run already in ``results.json`` is not repeated (add seeds, methods or budgets to a finished run).

Where things are: the budget-matched methods in ``common/matched.py``, NLL scoring in ``common/scoring.py``, the
statistics in ``common/stats.py``; data, model loading and the training run are shared with quality.py
(``common/data.py``, ``common/models.py``, ``common/training.py``). This file holds the presets, the command line,
the main loop (learning-rate search, seeds, resume) and the report. It is the longest file of benchmarks/ (~700
lines, against ~400 elsewhere) because all three are this question's alone: the presets are ~135 lines of plain
data, the main loop (~230 lines) is one pass over budgets, methods and seeds whose resume rules read best in one
piece, and the report (~135 lines) summarises exactly what that loop stored.

Usage::

    python benchmarks/selection_value.py --quick               # under 15 min on 2 cores: a protocol check
    python benchmarks/selection_value.py                       # the full preset (budgeted at <= 2.5 h, 2 cores)
    python benchmarks/selection_value.py --budgets 0.05 --seeds 0 --methods taylor,random-all,lora --resume
    python benchmarks/selection_value.py --dry-run             # plan, data sizes, matched budgets: no training
    python benchmarks/selection_value.py --report out/results.json   # rebuild table + plot from saved results
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/, for the shared set-up in common/
from common.data import build_data, by_group, tiny_pairs  # noqa: E402
from common.machine import machine_info  # noqa: E402
from common.matched import (  # noqa: E402
    LAYER_RATIO,
    SPECIFIC_RATIO,
    budget_selections,
    build,
    linear_sizes,
    lora_rank,
    score_by_type,
    type_counts,
)
from common.models import load_model, trainable_params  # noqa: E402
from common.preset import Preset as TranslationPreset  # noqa: E402
from common.report import fmt_pm, pyplot, save_figure  # noqa: E402
from common.scoring import decode_scores, english_features, make_evalset, sentence_nll  # noqa: E402
from common.stats import macro_nll, paired_bootstrap, per_lang_nll, seed_interval, seed_mean_per_sentence  # noqa: E402
from common.training import train_one  # noqa: E402

from neuron_peft.data import calibration_batches, encode_examples  # noqa: E402

# name -> (LR family, description)
METHODS = {
    "zero-shot": ("none", "base model, no training"),
    "taylor": ("neuron", "Taylor (MNAFT): top layer_ratio layers by raw Taylor layer score, top rows, routed"),
    "taylor-agnostic": ("neuron", "the same rows as taylor, all shared (no language-specific rows, no routing)"),
    "taylor-type-rank": ("neuron", "layers ranked by Taylor score rank-normalised within module type, routed"),
    "taylor-per-layer": ("neuron", "Taylor's top rows in every targeted layer, same share of each, routed"),
    "taylor-global-rank": ("neuron", "global top rows by Taylor score rank-normalised within module type, routed"),
    "taylor-global-z": ("neuron", "global top rows by Taylor score z-scored within module type, routed"),
    "neumt": ("neuron", "NeuMT: layers by activation change vs this run's full fine-tune, Taylor rows, routed"),
    "random-layers": ("neuron", "random rows in taylor's layers, same count per layer, unrouted"),
    "random-all": ("neuron", "random rows, the same share of every targeted layer, unrouted"),
    "magnitude": ("neuron", "largest-norm weight rows, the same share of every targeted layer, unrouted"),
    "lora": ("lora", "LoRA all-linear, rank matched to the budget, alpha = 2r"),
    "dora": ("lora", "DoRA all-linear, rank matched to the budget, alpha = 2r"),
    "full": ("full", "full fine-tuning, every parameter (budget-free; shown in every budget)"),
}


@dataclass
class Preset:
    model: str
    langs: tuple[str, ...]
    n_train: int  # training pairs per language
    n_dev: int  # dev pairs per language (LR choice, default-selection choice)
    n_test: int  # test pairs per language (NLL)
    n_bleu: int  # test pairs per language decoded greedily for chrF/BLEU (0 = skip)
    n_forget: int  # probe pairs per untrained language, and English-only verses
    n_calib: int  # calibration pairs per language (Taylor scoring), from the training pairs
    steps: int
    batch_size: int
    max_length: int
    max_chars: int
    max_new_tokens: int
    seeds: tuple[int, ...]
    budgets: tuple[float, ...]  # neuron_ratio of the Taylor selection at layer_ratio 0.4 that fixes each budget
    methods: dict  # budget (str of neuron_ratio, or "*") -> tuple of methods; "*" applies to every budget
    grids: dict[str, list[float]]
    factor: float = 3.0
    max_extend: int = 2
    forget_langs: tuple[str, ...] = ("sw", "id")
    eval_batch_size: int = 32
    calib_batch_size: int = 4
    threads: Optional[int] = 2
    dtype: str = "float32"
    device: str = "cpu"
    note: str = ""
    data_seed: int = 0
    extra: dict = field(default_factory=dict)


NS = ("taylor", "taylor-agnostic", "taylor-type-rank", "taylor-per-layer", "taylor-global-rank")
PRESETS = {
    "tiny": Preset(
        model="tiny",
        langs=("fr", "de"),
        n_train=24,
        n_dev=4,
        n_test=4,
        n_bleu=2,
        n_forget=3,
        n_calib=4,
        steps=2,
        batch_size=4,
        max_length=48,
        max_chars=80,
        max_new_tokens=4,
        seeds=(0,),
        budgets=(0.25, 1.0),
        methods={
            "0.25": (
                *NS,
                "taylor-global-z",
                "neumt",
                "random-layers",
                "random-all",
                "magnitude",
                "lora",
                "dora",
                "full",
            ),
            "1.0": ("taylor", "random-all", "lora"),
        },
        grids={"full": [1e-3], "lora": [3e-3], "neuron": [1e-2]},
        max_extend=1,
        eval_batch_size=8,
        threads=1,
        note="tiny random Llama + fake data: every code path in seconds; the numbers mean nothing",
    ),  # fmt: skip
    "quick": Preset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=200,
        n_dev=24,
        n_test=24,
        n_bleu=8,
        n_forget=16,
        n_calib=8,
        steps=16,
        batch_size=8,
        max_length=80,
        max_chars=80,
        max_new_tokens=32,
        seeds=(0,),
        budgets=(0.05,),
        methods={"0.05": ("taylor", "random-all", "lora")},
        grids={"lora": [3e-4, 1e-3, 3e-3], "neuron": [3e-5, 1e-4, 3e-4]},
        max_extend=1,
        note="protocol check (< 15 min on a quiet 2-core host): 3 methods at the ~1.8% budget, 1 seed, 16 steps, "
        "24 dev / 24 test pairs per language; too small to rank methods",
    ),  # fmt: skip
    "full": Preset(
        model="gemma3-270m",
        langs=("fr", "de", "hi", "tr"),
        n_train=300,
        n_dev=50,
        n_test=50,
        n_bleu=10,
        n_forget=40,
        n_calib=16,
        steps=20,
        batch_size=8,
        max_length=96,
        max_chars=100,
        max_new_tokens=40,
        seeds=(0, 1, 2),
        budgets=(0.05, 0.25, 1.0),
        methods={
            "0.05": (
                "taylor",
                "taylor-agnostic",
                "taylor-per-layer",
                "taylor-global-rank",
                "random-layers",
                "random-all",
                "magnitude",
                "lora",
                "dora",
                "full",
            ),
            "0.25": ("taylor", "random-all", "lora"),
            "1.0": ("taylor", "random-all"),
        },
        # start grids centred on the quick preset's picks (rows 3e-4..9e-4, LoRA 1e-3), so most picks are interior
        # without an extension; the edge rule still extends where they are not
        grids={"full": [1e-5, 3e-5, 1e-4], "lora": [3e-4, 1e-3, 3e-3], "neuron": [1e-4, 3e-4, 1e-3]},
        note="3 seeds; budgets ~1.8% and ~10% of linear weights plus the paper setting (40% of layers, all rows); "
        "20 steps x 8 mixed-language pairs (verses <= 100 chars, so the dev books give >= 50 pairs per language); "
        "50 dev / 50 test pairs per language (NLL), 10 per language decoded; 75 training runs (~2.5 h on a quiet "
        "2-core host, estimated from ~3.6 s per step and ~30 s per dev pass; not measured end to end)",
    ),  # fmt: skip
}


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--methods", default=None, help=f"comma list, applied to every budget; from {','.join(METHODS)}")
    ap.add_argument("--budgets", default=None, help="comma list of Taylor neuron_ratio values (at layer_ratio 0.4)")
    ap.add_argument("--seeds", default=None, help="comma list of seeds (the first one tunes the learning rate)")
    for name in ("steps", "n_train", "n_dev", "n_test", "n_bleu", "n_forget", "threads", "max_extend"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--lrs", default=None, help="JSON start grids per family, e.g. '{\"neuron\": [1e-4, 3e-4]}'")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/selection_value_out/<preset>)")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (replaces our files)")
    ap.add_argument("--resume", action="store_true", help="reuse the runs already in --out/results.json")
    ap.add_argument("--dry-run", action="store_true", help="data sizes, matched budgets and the plan; no training")
    ap.add_argument("--report", default=None, metavar="RESULTS_JSON", help="rebuild the report from results.json")
    return ap.parse_args(argv)


def resolve_preset(args) -> Preset:
    p = PRESETS["quick" if args.quick else args.preset]
    over: dict = {}
    for k in ("steps", "n_train", "n_dev", "n_test", "n_bleu", "n_forget", "threads", "model", "max_extend"):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    if args.budgets:
        over["budgets"] = tuple(float(x) for x in args.budgets.split(","))
    if args.seeds:
        over["seeds"] = tuple(int(x) for x in args.seeds.split(","))
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        over["methods"] = {"*": methods}
    if args.lrs:
        over["grids"] = {**p.grids, **json.loads(args.lrs)}
    return replace(p, **over)


def methods_for(p: Preset, nr: float) -> list[str]:
    key = next((k for k in p.methods if k != "*" and float(k) == nr), "*")
    ms = list(p.methods.get(key, p.methods.get("*", ())))
    # NeuMT needs the full fine-tune as its reference: train full first
    return sorted(ms, key=lambda m: (m != "full", m == "neumt"))


def run_key(nr, method, seed, lr) -> str:
    return f"{'-' if method == 'full' else nr}|{method}|{seed}|{lr:g}"


def translation_preset(p: Preset, seed: int):
    """The translation-run configuration (common/preset.py) that the shared data, model and training helpers read."""
    return TranslationPreset(model=p.model, langs=p.langs, n_train=p.n_train, n_dev=p.n_dev, n_test=p.n_test,
                             n_forget=p.n_forget, n_calib=p.n_calib, steps=p.steps, batch_size=p.batch_size,
                             max_length=p.max_length, max_new_tokens=p.max_new_tokens, methods=(), grids={},
                             max_chars=p.max_chars, forget_langs=p.forget_langs, eval_batch_size=p.eval_batch_size,
                             seed=seed, threads=p.threads, dtype=p.dtype, device=p.device)  # fmt: skip


def main(argv=None, log: Callable[[str], None] = print) -> Optional[dict]:
    args = parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text(encoding="utf-8"))
        md = write_report(results, Path(args.report).parent, log)
        log(md)
        return results
    p = resolve_preset(args)
    preset_name = "quick" if args.quick else args.preset
    out_dir = Path(args.out or HERE / "selection_value_out" / preset_name)
    if not args.dry_run:
        from neuron_peft.fileio import check_output_dir

        check_output_dir(out_dir, overwrite=args.overwrite or args.resume, flag="--out")
    if p.threads:
        torch.set_num_threads(p.threads)
    device = torch.device(p.device)
    t_start = time.perf_counter()

    qp = translation_preset(p, p.data_seed)
    data = build_data(replace(qp, n_forget=p.n_forget, forget_shots=1))
    if p.model != "tiny":
        from neuron_peft.data import bible_pairs

        data["english"] = bible_pairs("en", ("fr",), split="test", max_per_lang=p.n_forget, max_chars=p.max_chars,
                                      seed=p.data_seed + 1)  # fmt: skip
    else:
        data["english"] = tiny_pairs(("fr",), p.n_forget, "english", p.data_seed)
    counts = {k: {g: len(v) for g, v in by_group(exs).items()} for k, exs in data.items()}
    log(f"# selection value ({preset_name}): {p.note}")
    log(f"  pairs per split and group: {json.dumps(counts)}")
    plan = {str(nr): methods_for(p, nr) for nr in p.budgets}
    pairs = {("-" if m == "full" else nr, m) for nr in p.budgets for m in methods_for(p, nr) if m != "zero-shot"}
    n_runs = sum(len(p.grids[METHODS[m][0]]) + len(p.seeds) - 1 for _, m in pairs)
    n_tests = len(pairs) * len(p.seeds)
    log(f"  {p.steps} steps x batch {p.batch_size}; seeds {p.seeds}; budgets (Taylor neuron_ratio at layer_ratio "
        f"{LAYER_RATIO}) {p.budgets}; methods {plan}; start grids {p.grids}")  # fmt: skip
    log(f"  at least {n_runs} training runs of {p.steps} steps (+ up to {p.max_extend} LR extensions per method), "
        f"{n_tests} test evaluations")  # fmt: skip
    if args.dry_run:
        log("  (dry run: budgets are computed after the Taylor scoring pass; stopping before the model loads)")
        return {"dry_run": True, "counts": counts, "plan": plan, "runs_planned": n_runs}

    base, tok = load_model(qp, data, device)
    base.requires_grad_(False)
    base.eval()
    info = machine_info(device)
    log(f"  model {p.model}: {sum(x.numel() for x in base.parameters()):,} parameters; {info['cpu']} x{info['nproc']}"
        f", {info['torch_threads']} threads, load average {info['loadavg']}")  # fmt: skip
    from neuron_peft.selection import resolve_target_modules, select_neurons

    names = resolve_target_modules(base, "all-linear")
    sizes = linear_sizes(base, names)
    total_w = sum(o * i for o, i in sizes.values())

    feats = {k: encode_examples(tok, data[k], p.max_length, on_overflow="skip")
             for k in ("train", "dev", "test", "forget_test")}  # fmt: skip
    feats["english"] = english_features(tok, data["english"], p.max_length)
    evalsets = {k: make_evalset(k, feats[k], p.eval_batch_size, tok) for k in ("dev", "test", "forget_test", "english")}
    test_examples = by_group(data["test"])
    bleu_examples = [e for g in test_examples.values() for e in g[: p.n_bleu]]

    results: dict = {"preset": preset_name, "config": asdict(p), "machine": info, "counts": counts,
                     "argv": sys.argv if argv is None else argv, "total_linear_weights": total_w, "budgets": {},
                     "runs": {}, "picked": {}, "groups": {k: v.groups for k, v in evalsets.items()}}  # fmt: skip
    rpath = out_dir / "results.json"
    if args.resume and rpath.exists():
        old = json.loads(rpath.read_text(encoding="utf-8"))
        if old["config"] != json.loads(json.dumps(asdict(p))) and not _compatible(old["config"], asdict(p)):
            raise SystemExit(f"{rpath}: written with a different configuration; use another --out")
        results["runs"], results["picked"] = old.get("runs", {}), old.get("picked", {})
        results["budgets"] = old.get("budgets", {})
        results["elapsed_before"] = old.get("elapsed_total", 0.0)
        log(f"  resuming: {len(results['runs'])} runs reused from {rpath}")
    out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        from neuron_peft.fileio import atomic_write_text

        results["elapsed_total"] = results.get("elapsed_before", 0.0) + time.perf_counter() - t_start
        atomic_write_text(rpath, json.dumps(results, indent=0, default=str))

    def evaluate(model, splits) -> dict:
        t = time.perf_counter()
        out = {k: sentence_nll(model, evalsets[k]) for k in splits}
        out["eval_seconds"] = time.perf_counter() - t
        return out

    def decode(model) -> dict:
        return decode_scores(model, tok, bleu_examples, test_examples, p.max_new_tokens, p.eval_batch_size)

    # --- zero-shot (cached)
    if "zero-shot" not in results["runs"]:
        log("\n[zero-shot]")
        ev = evaluate(base, ("dev", "test", "forget_test", "english"))
        results["runs"]["zero-shot"] = {"method": "zero-shot", **ev, "decode": decode(base)}
        save()
    z = results["runs"]["zero-shot"]
    log(f"  zero-shot NLL dev {macro_nll(z['dev'], evalsets['dev'].groups):.3f} test "
        f"{macro_nll(z['test'], evalsets['test'].groups):.3f}")  # fmt: skip

    # --- one Taylor scoring pass; every selection method re-decides from these scores
    t = time.perf_counter()
    calib_ex = [e for g in by_group(data["train"]).values() for e in g[: p.n_calib]]
    calib = calibration_batches(tok, calib_ex, p.calib_batch_size, p.max_length, on_overflow="skip")
    from neuron_peft.selection import NeuronSelection

    sel_dir = out_dir / "taylor_scores"
    if args.resume and (sel_dir / "neuron_selection.json").is_file():
        base_sel = NeuronSelection.load(sel_dir)  # same calibration data (the configuration was checked above)
        log("  Taylor scores reused from " + str(sel_dir))
    else:
        base_sel = select_neurons(base, calib, layer_ratio=LAYER_RATIO, neuron_ratio=p.budgets[0],
                                  specific_ratio=SPECIFIC_RATIO, progress=False)  # fmt: skip
        results["select_seconds"] = time.perf_counter() - t
        base_sel.save(sel_dir)
        log(f"  Taylor scoring {results['select_seconds']:.1f} s")
    results["score_by_type"] = score_by_type(base_sel)
    log(f"  mean Taylor neuron score by module type (group-normalised): {results['score_by_type']}")
    full_ref = None

    for nr in p.budgets:
        bsel = budget_selections(base_sel, nr, sizes)
        binfo = {"neuron_ratio": nr, "budget_weights": bsel["budget"], "share": bsel["share"],
                 "lora_rank": lora_rank(bsel["budget"], sizes),
                 "selections": {m: {"kept_layers": len(s.kept_layers), "weights": s.trained_weights(),
                                    "types": type_counts(s)} for m, s in bsel["selections"].items()}}  # fmt: skip
        results["budgets"][str(nr)] = binfo
        log(f"\n## budget: Taylor neuron_ratio {nr} -> {bsel['budget']:,} weights = {100 * bsel['share']:.2f}% of "
            f"linear weights; LoRA r {binfo['lora_rank']}")  # fmt: skip
        for m, s in binfo["selections"].items():
            log(f"  {m}: {s['kept_layers']} layers, {s['weights']:,} weights, rows by type {s['types']}")
        for method in methods_for(p, nr):
            if method == "zero-shot":
                continue
            if method == "neumt":
                if full_ref is None:
                    log("  [neumt] skipped: needs 'full' trained (not resumed) earlier in this run as its reference")
                    continue
                ref_sel = select_neurons(base, calib, layer_ratio=LAYER_RATIO, neuron_ratio=nr,
                                         specific_ratio=SPECIFIC_RATIO, layer_scoring="activation_similarity",
                                         reference_model=full_ref, progress=False)  # fmt: skip
                bsel["selections"]["neumt"] = budget_selections(base_sel, nr, sizes, ref_sel)["selections"]["neumt"]
                s = bsel["selections"]["neumt"]
                binfo["selections"]["neumt"] = {"kept_layers": len(s.kept_layers), "weights": s.trained_weights(),
                                                "types": type_counts(s)}  # fmt: skip
            family = METHODS[method][0]
            pkey = f"{'-' if method == 'full' else nr}|{method}"
            log(f"\n[{method} @ {nr}] {METHODS[method][1]}")

            def one_run(lr, seed, keep, nr=nr, method=method, bsel=bsel):
                key = run_key(nr, method, seed, lr)
                if key in results["runs"]:
                    return results["runs"][key], None
                model, routed = build(method, base, bsel, sizes, seed)
                n_tr = trainable_params(model)
                t0 = time.perf_counter()
                try:
                    tr = train_one(model, routed, tok, feats["train"], translation_preset(p, seed), lr, device)
                    ev = evaluate(model, ("dev",))
                    dev = macro_nll(ev["dev"], evalsets["dev"].groups)
                    losses = tr["losses"]
                except FloatingPointError as err:
                    ev, dev, losses, tr = {"dev": None}, float("inf"), [], {"seconds": time.perf_counter() - t0}
                    log(f"    diverged: {err}")
                row = {"method": method, "budget": nr, "seed": seed, "lr": lr, "trainable": n_tr, "routed": routed,
                       "dev_nll": dev, "dev": ev["dev"], "train_seconds": tr["seconds"],
                       "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                       "run_seconds": time.perf_counter() - t0}  # fmt: skip
                results["runs"][key] = row
                save()
                log(f"    seed {seed} lr {lr:g}: {n_tr:,} trainable, {tr['seconds']:.0f} s train, loss "
                    f"{row['loss_first'] if losses else float('nan'):.3f} -> "
                    f"{row['loss_last'] if losses else float('nan'):.3f}, dev NLL {dev:.4f}")  # fmt: skip
                if keep and math.isfinite(dev):
                    return row, model
                del model
                gc.collect()
                return row, None

            # learning rate on the first seed, extended until the pick is interior
            seed0 = p.seeds[0]
            kept = {}

            def dev_of(lr, seed0=seed0, kept=kept, nr=nr, method=method, one_run=one_run):
                row, mdl = one_run(lr, seed0, keep=True)
                kept[lr] = mdl
                _keep_best(kept, results, nr, method, seed0)
                return row["dev_nll"]

            # a resumed run also counts the values an earlier invocation already tried (e.g. with --max-extend)
            tried = {r["lr"] for r in results["runs"].values() if r.get("method") == method and r.get("seed") == seed0
                     and (method == "full" or float(r.get("budget", -1)) == float(nr))}  # fmt: skip
            best, grid, devs, edge = pick_lr(sorted({*p.grids[family], *tried}), dev_of, p.factor, p.max_extend)
            results["picked"][pkey] = {"lr": best, "grid": grid, "at_edge": edge}
            log(f"  picked lr {best:g} from {grid}" + (" (STILL AT AN EDGE after extending)" if edge else ""))
            if not math.isfinite(devs[best]):
                log("  every learning rate diverged; no test run")
                continue
            # test (and dev for the other seeds) at the picked LR
            for seed in p.seeds:
                key = run_key(nr, method, seed, best)
                mdl = kept.get(best) if seed == seed0 else None
                if key in results["runs"] and "test" in results["runs"][key]:
                    continue
                if mdl is None:
                    if key in results["runs"]:
                        del results["runs"][key]  # dev only (resumed): train again to test
                    _, mdl = one_run(best, seed, keep=True)
                if mdl is None:
                    continue
                ev = evaluate(mdl, ("test", "forget_test", "english"))
                results["runs"][key].update(ev)
                results["runs"][key]["decode"] = decode(mdl)
                results["runs"][key]["test_nll"] = macro_nll(ev["test"], evalsets["test"].groups)
                log(f"    seed {seed}: test NLL {results['runs'][key]['test_nll']:.4f}, chrF "
                    f"{results['runs'][key]['decode'].get('chrf', float('nan')):.2f}")  # fmt: skip
                if method == "full" and seed == seed0 and full_ref is None:
                    full_ref = mdl.eval()
                del mdl
                gc.collect()
                save()
            kept.clear()
            gc.collect()
    results["finished"] = True
    save()
    md = write_report(results, out_dir, log)
    log("\n" + md)
    log(f"wrote {out_dir}/selection_value.md, results.json, selection_value_nll.png "
        f"({(time.perf_counter() - t_start) / 60:.1f} min this invocation)")  # fmt: skip
    return results


def pick_lr(start: list[float], dev_of: Callable[[float], float], factor: float, max_extend: int):
    """(best lr, every lr tried, {lr: dev NLL}, still at an edge): lowest dev NLL over `start`; while the best is
    the lowest or highest value tried (and >= 3 were tried), try the next value beyond it (/ or x `factor`), at most
    `max_extend` times. Non-finite dev NLL (a diverged run) never wins; ties go to the smaller lr."""
    grid = sorted(set(start))
    devs = {lr: dev_of(lr) for lr in grid}
    for _ in range(max_extend + 1):
        best = min(grid, key=lambda x: (devs[x] if math.isfinite(devs[x]) else math.inf, x))
        if len(grid) < 3 or best not in (grid[0], grid[-1]) or _ == max_extend:
            break
        nxt = best / factor if best == grid[0] else best * factor
        devs[nxt] = dev_of(nxt)
        grid = sorted([*grid, nxt])
    best = min(grid, key=lambda x: (devs[x] if math.isfinite(devs[x]) else math.inf, x))
    edge = len(grid) >= 3 and best in (grid[0], grid[-1])
    return best, grid, devs, edge


def _compatible(old: dict, new: dict) -> bool:
    """Resume is allowed when only what decides *which* runs happen changed (methods, budgets, seeds)."""
    skip = {"methods", "budgets", "seeds", "note", "threads", "max_extend"}
    return all(old.get(k) == v for k, v in json.loads(json.dumps(new)).items() if k not in skip)


def _keep_best(kept: dict, results: dict, nr, method, seed) -> dict:
    """Keep only the model of the best dev NLL so far in memory (the others are freed)."""
    live = {lr: m for lr, m in kept.items() if m is not None}
    if len(live) <= 1:
        return kept
    best = min(live, key=lambda lr: results["runs"][run_key(nr, method, seed, lr)]["dev_nll"])
    for lr in live:
        if lr != best:
            kept[lr] = None
    gc.collect()
    return kept


# ---------------------------------------------------------------------------------------------------------- report
def summarise(results: dict) -> dict:
    """Per budget and method: seed-level NLLs, intervals, paired differences, forgetting, chrF/BLEU."""
    groups = results["groups"]
    z = results["runs"]["zero-shot"]
    out = {"zero": {"test": macro_nll(z["test"], groups["test"]), "dev": macro_nll(z["dev"], groups["dev"]),
                    "forget": macro_nll(z["forget_test"], groups["forget_test"]),
                    "english": macro_nll(z["english"], groups["english"]), "decode": z.get("decode", {})},
           "budgets": {}}  # fmt: skip
    for nr, binfo in results["budgets"].items():
        rows = {}
        for pkey, pick in results["picked"].items():
            b, method = pkey.split("|")
            if b not in (nr, "-"):
                continue
            # every seed tested at the picked LR (also those of earlier, resumed invocations)
            runs = [r for r in results["runs"].values() if r.get("method") == method and "test" in r
                    and r["lr"] == pick["lr"] and (method == "full" or float(r["budget"]) == float(nr))]  # fmt: skip
            runs.sort(key=lambda r: r["seed"])
            if not runs:
                continue
            test = [macro_nll(r["test"], groups["test"]) for r in runs]
            dev = [r["dev_nll"] for r in runs]
            forget = [macro_nll(r["forget_test"], groups["forget_test"]) - out["zero"]["forget"] for r in runs]
            english = [macro_nll(r["english"], groups["english"]) - out["zero"]["english"] for r in runs]
            chrf = [r["decode"]["chrf"] for r in runs if r.get("decode")]
            bleu = [r["decode"]["bleu"] for r in runs if r.get("decode")]
            rows[method] = {
                "lr": pick["lr"], "at_edge": pick["at_edge"], "grid": pick["grid"], "seeds": len(runs),
                "trainable": runs[0]["trainable"], "test": seed_interval(test), "dev": seed_interval(dev),
                "forget": seed_interval(forget), "english": seed_interval(english),
                "chrf": seed_interval(chrf) if chrf else None, "bleu": seed_interval(bleu) if bleu else None,
                "per_lang": per_lang_nll(seed_mean_per_sentence([r["test"] for r in runs]), groups["test"]),
                "_test_sent": seed_mean_per_sentence([r["test"] for r in runs]),
                "_forget_sent": seed_mean_per_sentence([r["forget_test"] for r in runs]),
                "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs),
            }  # fmt: skip
        for m, r in rows.items():
            r["paired"] = {}
            for b in ("taylor", "random-all", "random-layers", "lora"):
                if b in rows and b != m:
                    r["paired"][b] = paired_bootstrap(r["_test_sent"], rows[b]["_test_sent"], groups["test"])
            r["paired_forget_zero"] = paired_bootstrap(r["_forget_sent"], z["forget_test"], groups["forget_test"])
        out["budgets"][nr] = {"info": binfo, "rows": rows}
    return out


def write_report(results: dict, out_dir: Path, log) -> str:
    from neuron_peft.fileio import atomic_write_text

    s = summarise(results)
    cfg, info = results["config"], results["machine"]
    zero = s["zero"]
    argv = [str(a) for a in results["argv"]]
    lines = [
        f"### Selection value (`benchmarks/selection_value.py`, preset `{results['preset']}`)", "",
        f"{cfg['note']}.", "",
        f"Command: `python benchmarks/selection_value.py {' '.join(a for a in argv if not a.endswith('.py'))}`", "",
        f"Machine: {info['cpu']}, nproc {info['nproc']}, {info['torch_threads']} torch threads; torch {info['torch']}, "
        f"transformers {info.get('transformers')}, peft {info.get('peft')}; {info['date']}; load average at start "
        f"{info['loadavg']}. Wall-clock {results.get('elapsed_total', float('nan')) / 60:.1f} min in all"
        f"{'' if results.get('finished') else ' (PARTIAL: still running or interrupted)'}.", "",
        f"Data: en → {', '.join(cfg['langs'])}; {cfg['steps']} steps × {cfg['batch_size']}; dev {cfg['n_dev']}/test "
        f"{cfg['n_test']} pairs per language; seeds {cfg['seeds']}. NLL = teacher-forced negative log-likelihood per "
        "target token, averaged over languages. ± = 95% interval over seeds (t). Paired Δ = difference of seed-"
        "averaged per-sentence NLL, 95% bootstrap interval over test sentences (stratified by language); negative = "
        "better. Forgetting = NLL change vs zero-shot on en→sw/id (untrained) and on English-only verses "
        "(positive = forgot).", "",
        f"Zero-shot: test NLL {zero['test']:.3f}, dev {zero['dev']:.3f}, sw/id {zero['forget']:.3f}, English "
        f"{zero['english']:.3f}" + (f", chrF {zero['decode']['chrf']:.2f}" if zero["decode"] else "") + ".",
    ]  # fmt: skip
    for nr, b in s["budgets"].items():
        info_b = b["info"]
        lines += ["", f"**Budget {100 * info_b['share']:.2f}% of linear weights** ({info_b['budget_weights']:,} "
                  f"weights; Taylor layer_ratio {LAYER_RATIO}, neuron_ratio {nr}; LoRA/DoRA r {info_b['lora_rank']})", "",
                  "| method | LR (grid) | trainable | dev NLL | **test NLL** | Δ vs taylor [95%] | Δ vs random-all [95%] | Δ vs "
                  "LoRA [95%] | chrF | BLEU | forget sw/id Δ | English Δ |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, r in sorted(b["rows"].items(), key=lambda kv: kv[1]["test"][0]):

            def d(base, r=r):
                x = r["paired"].get(base)
                return f"{x['delta']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]" if x else "-"

            grid = "/".join(f"{g:g}" for g in r["grid"])
            lines.append(f"| {m} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''}) | {r['lr']:g} ({grid}){' EDGE' if r['at_edge'] else ''} | {r['trainable']:,} | "
                         f"{fmt_pm(r['dev'])} | **{fmt_pm(r['test'])}** | {d('taylor')} | {d('random-all')} | {d('lora')} | "
                         f"{fmt_pm(r['chrf'], 2)} | {fmt_pm(r['bleu'], 2)} | {fmt_pm(r['forget'])} | {fmt_pm(r['english'])} |")  # fmt: skip
        types = {m: v["types"] for m, v in info_b["selections"].items()}
        lines += ["", "Rows by module type: " + "; ".join(f"{m} {t}" for m, t in types.items())]
    md = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "selection_value.md", md)
    slim = {k: {m: {kk: vv for kk, vv in r.items() if not kk.startswith("_")} for m, r in v["rows"].items()}
            for k, v in s["budgets"].items()}  # fmt: skip
    atomic_write_text(out_dir / "summary.json", json.dumps({"zero": zero, "budgets": slim}, indent=1, default=str))
    try:
        plot(s, out_dir / "selection_value_nll.png", results)
    except ImportError as err:
        log(f"(plot skipped: {err})")
    return md


def plot(s: dict, path: Path, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    methods = sorted({m for b in s["budgets"].values() for m in b["rows"]})
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for b in s["budgets"].values():
            if m in b["rows"]:
                r = b["rows"][m]
                xs.append(100 * (b["info"]["share"] if m != "full" else 1.0))
                ys.append(r["test"][0])
                es.append(r["test"][1] if math.isfinite(r["test"][1]) else 0.0)
        if m == "full":
            xs, ys, es = xs[:1], ys[:1], es[:1]
        ax.errorbar(xs, ys, yerr=es, marker="os^vD<>px*h"[i % 11], capsize=3, label=m, linestyle="-" if len(xs) > 1
                    else "none", alpha=0.85)  # fmt: skip
    ax.axhline(s["zero"]["test"], color="gray", lw=0.8, ls="--", label="zero-shot")
    ax.set_xscale("log")
    ax.set_xlabel("trainable weights, % of linear weights (full FT: all parameters, drawn at 100)")
    ax.set_ylabel("test NLL per target token (95% CI over seeds)")
    ax.set_title(f"selection value, preset {results['preset']}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
