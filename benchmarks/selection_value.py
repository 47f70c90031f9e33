"""Does neuron selection earn its keep? Teacher-forced NLL of every method at matched trainable parameters (issue 14).

One command, one process. The question is narrow: at the *same number of trainable weights*, do Taylor-selected
rows (and the scale-free ranking variants of `select_neurons`) beat random rows, magnitude rows and LoRA/DoRA?
BLEU on a few hundred verses cannot resolve that (benchmarks/RESULTS.md), so the primary metric is the
teacher-forced negative log-likelihood per target token on held-out test books: cheap, low-variance and paired
per sentence. chrF/BLEU from greedy decoding are reported alongside for the final table.

Protocol (every number in the output says which of these it is):

* Data: Bible verses via `neuron_peft.data.bible_pairs`, train / dev / test from different books; English ->
  ``langs``, ``n_train`` training pairs per language or ``n_train_by_lang[lang]`` (the interference presets' 10:1
  imbalance; batches are a uniform shuffle of all pairs, so they follow that mix), ``n_calib`` calibration pairs per
  language (the same for each); forgetting probes: en -> sw / id translation NLL (never trained) and English-only
  verse NLL.
* Budgets: for each ``neuron_ratio`` in ``budgets`` the MNAFT-style Taylor selection (``layer_ratio`` 0.4, that
  neuron_ratio, specific_ratio 0.1, routed) fixes the budget: its trained weights P. Every other method of that
  budget trains P weights too (rows x inputs; LoRA/DoRA: the rank r whose all-linear parameter count is closest).
  ``neuron_ratio`` 1.0 is the paper setting (40% of layers, all their rows).
* Methods (``METHODS``): Taylor and its ranking variants, random rows in Taylor's layers, random rows everywhere,
  magnitude rows everywhere, NeuMT activation-change layers (reference = this run's full fine-tune), LoRA, DoRA,
  full fine-tuning (budget-free), zero-shot; and the column units (issue 26), each scored once on the same
  calibration batches: ``channel`` (Taylor input channels of o_proj / down_proj, the same share of each, routed
  1:9), ``channel-random`` (as many random channels per output projection, unrouted: S2FT's choice) and
  ``mlp-neuron`` (gate/up row j + down_proj column j by Taylor score, routed), and ``channel-xnorm`` (channels by
  ``E|x dL/dx| / E|x|``, Taylor without the input scale, routed like ``channel``), their own LR family ("column");
  ``taylor-per-layer-s30`` / ``taylor-per-layer-agnostic``: taylor-per-layer's rows, 30% / none language-specific.
* Learning rate: per method and budget on seed 0, by mean dev NLL (``n_dev`` pairs per language), starting from the
  family grid; while the best value sits at an edge of what was tried, the next value beyond it (x or / ``factor``)
  is tried, up to ``max_extend`` times (a diverged run counts as infinitely bad). The other seeds reuse the pick.
* Seeds change the batch order, LoRA init and random rows; the calibration data and Taylor scores stay fixed.
* Intervals: over seeds, mean +- t(0.975, n-1) x sd / sqrt(n) of the language-averaged test NLL; paired over
  sentences, a bootstrap (stratified by language, the same resamples for every method) of the difference in the
  seed-averaged per-sentence NLL against a baseline. A preset that declares ``high_resource`` also gets both over
  its low- and its high-resource languages apart (against LoRA and the agnostic-only rows).
* Caching: data encodings and eval batches are built once; the base model's dev/test/forgetting NLL once; with
  ``--resume`` a run already in ``results.json`` is not repeated (add seeds, methods or budgets to a finished run).

Where things are: presets in ``common/preset.py``, the budget-matched methods in ``common/matched.py``, NLL scoring
in ``common/scoring.py``, the report (summary, table, plot) in ``reports/selection_value.py``; data, models and the
training run are shared with quality.py (``common/``). This file holds the command line and the main loop: eval
sets, the Taylor scoring pass, then per budget and method the learning-rate search and the seeds (`run_method`).

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
from dataclasses import MISSING, asdict, fields, replace
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's neuron_peft, also when another one is installed (editable)
sys.path.insert(0, str(HERE))  # benchmarks/, for the shared set-up in common/ and the report in reports/
from common.channel_scale import input_magnitudes, scale_free  # noqa: E402
from common.data import build_pairs, by_group, calibration_examples  # noqa: E402
from common.machine import machine_info  # noqa: E402
from common.matched import (  # noqa: E402
    LAYER_RATIO,
    METHODS,
    SPECIFIC_RATIO,
    UNIT_OF,
    budget_free,
    budget_selections,
    build,
    fixed_rank,
    linear_sizes,
    lora_rank,
    method_info,
    score_by_type,
    score_concentration,
    selection_record,
)
from common.models import load_model, trainable_params  # noqa: E402
from common.preset import SELECTION_PRESETS as PRESETS  # noqa: E402
from common.preset import SelectionPreset, methods_for, resolve_device, translation_preset  # noqa: E402
from common.scoring import decode_scores, english_features, make_evalset, sentence_nll  # noqa: E402
from common.stats import macro_nll  # noqa: E402
from common.training import pick_lr, train_one  # noqa: E402
from reports.selection_value import write_report  # noqa: E402

from neuron_peft.data import calibration_batches, encode_examples  # noqa: E402
from neuron_peft.data.corpus import BIBLE_VERSIONS  # noqa: E402
from neuron_peft.fileio import atomic_write_text, check_output_dir  # noqa: E402
from neuron_peft.selection import NeuronSelection, resolve_target_modules, select_neurons  # noqa: E402


# ------------------------------------------------------------------------------------------------------------ main
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--methods", default=None, help=f"comma list, applied to every budget; from {','.join(METHODS)}")
    ap.add_argument("--budgets", default=None, help="comma list of Taylor neuron_ratio values (at layer_ratio 0.4)")
    ap.add_argument("--seeds", default=None, help="comma list of seeds (the first one tunes the learning rate)")
    for name in ("steps", "n_train", "n_dev", "n_test", "n_bleu", "n_forget", "threads", "max_extend", "batch_size"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    ap.add_argument("--eval-every", type=int, default=None, help="dev NLL every N training steps (0 = at the end)")
    ap.add_argument("--device", default=None, help="cpu, cuda or auto (the preset's by default)")
    ap.add_argument("--model", default=None)
    ap.add_argument(
        "--langs",
        default=None,
        help="comma list of trained target languages (English source), e.g. "
        "es,ru,vi,zh; any of neuron_peft.data.corpus.BIBLE_VERSIONS",
    )
    ap.add_argument("--forget-langs", default=None, help="comma list of untrained languages probed for forgetting")
    ap.add_argument("--n-train-by-lang", default=None, metavar="JSON",
                    help='training pairs per language where they differ from --n-train, e.g. \'{"fr": 2000}\'')  # fmt: skip
    ap.add_argument("--high-resource", default=None,
                    help="comma list of trained languages reported apart (low/high-resource report); '' for none")  # fmt: skip
    ap.add_argument("--lrs", default=None, help="JSON start grids per family, e.g. '{\"neuron\": [1e-4, 3e-4]}'")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/selection_value_out/<preset>)")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty --out (replaces our files)")
    ap.add_argument("--resume", action="store_true", help="reuse the runs already in --out/results.json")
    ap.add_argument("--dry-run", action="store_true", help="data sizes, matched budgets and the plan; no training")
    ap.add_argument("--report", default=None, metavar="RESULTS_JSON", help="rebuild the report from results.json")
    return ap.parse_args(argv)


def resolve_preset(args) -> SelectionPreset:
    p = PRESETS["quick" if args.quick else args.preset]
    over: dict = {}
    keys = ("steps", "n_train", "n_dev", "n_test", "n_bleu", "n_forget", "threads", "model", "max_extend")
    for k in (*keys, "batch_size", "eval_every", "device"):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    if args.budgets:
        over["budgets"] = tuple(float(x) for x in args.budgets.split(","))
    if args.seeds:
        over["seeds"] = tuple(int(x) for x in args.seeds.split(","))
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS and fixed_rank(m) is None]
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        over["methods"] = {"*": methods}
    for flag, key in (("langs", "langs"), ("forget_langs", "forget_langs")):
        if getattr(args, flag):
            langs = tuple(x.strip() for x in getattr(args, flag).split(",") if x.strip())
            unknown = [x for x in langs if x not in BIBLE_VERSIONS or x == "en"]
            if unknown:
                raise SystemExit(
                    f"--{flag.replace('_', '-')}: no Bible version for {unknown} as a target language; "
                    f"choose from {sorted(set(BIBLE_VERSIONS) - {'en'})}"
                )
            over[key] = langs
    if args.n_train_by_lang:
        over["n_train_by_lang"] = {str(k): int(v) for k, v in json.loads(args.n_train_by_lang).items()}
    if args.high_resource is not None:
        over["high_resource"] = tuple(x.strip() for x in args.high_resource.split(",") if x.strip())
    langs = over.get("langs", p.langs)
    for key in ("n_train_by_lang", "high_resource"):
        stray = sorted(set(over.get(key, getattr(p, key))) - set(langs))
        if stray:
            raise SystemExit(f"{key} names {stray}, which are not trained languages {list(langs)}; pass "
                             f"--{key.replace('_', '-')} for these languages")  # fmt: skip
    clash = set(over.get("langs", p.langs)) & set(over.get("forget_langs", p.forget_langs))
    if clash:
        raise SystemExit(
            f"languages {sorted(clash)} are both trained and probed for forgetting; "
            "pass --forget-langs with untrained languages"
        )
    if args.lrs:
        over["grids"] = {**p.grids, **json.loads(args.lrs)}
    return replace(p, **over)


def run_key(nr, method, seed, lr) -> str:
    return f"{'-' if budget_free(method) else nr}|{method}|{seed}|{lr:g}"


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
        check_output_dir(out_dir, overwrite=args.overwrite or args.resume, flag="--out")
    if p.threads:
        torch.set_num_threads(p.threads)
    device = resolve_device(p)
    t_start = time.perf_counter()

    qp = translation_preset(p, p.data_seed)
    data = build_pairs(p, qp)
    counts = {k: {g: len(v) for g, v in by_group(exs).items()} for k, exs in data.items()}
    short = {g: n for g, n in counts["train"].items() if n < p.n_calib}
    if short:  # calibration takes the first n_calib training pairs of every language: the same number for each
        raise SystemExit(f"training pairs {short} below n_calib {p.n_calib}: calibration would not be equal per "
                         "language; lower the preset's n_calib or raise those languages' training pairs "
                         "(--n-train, --n-train-by-lang)")  # fmt: skip
    log(f"# selection value ({preset_name}): {p.note}")
    log(f"  pairs per split and group: {json.dumps(counts)}")
    plan, n_runs = log_plan(p, log)
    if args.dry_run:
        log("  (dry run: budgets are computed after the Taylor scoring pass; stopping before the model loads)")
        return {"dry_run": True, "counts": counts, "plan": plan, "runs_planned": n_runs}

    base, tok = load_model(qp, data, device)
    base.requires_grad_(False)
    base.eval()
    info = machine_info(device)
    log(f"  model {p.model}: {sum(x.numel() for x in base.parameters()):,} parameters; {info['cpu']} x{info['nproc']}"
        f", {info['torch_threads']} threads, load average {info['loadavg']}")  # fmt: skip
    sizes = linear_sizes(base, resolve_target_modules(base, "all-linear"))
    total_w = sum(o * i for o, i in sizes.values())
    s = Session(p, base, tok, device, data, out_dir / "results.json", t_start, log)
    s.results.update({"preset": preset_name, "config": asdict(p), "machine": info, "counts": counts,
                      "argv": sys.argv if argv is None else argv, "total_linear_weights": total_w, "budgets": {},
                      "runs": {}, "picked": {}, "groups": {k: v.groups for k, v in s.evalsets.items()}})  # fmt: skip
    if args.resume and s.rpath.exists():
        resume(s)
    out_dir.mkdir(parents=True, exist_ok=True)
    zero_shot(s)
    base_sel, calib = taylor_scores(s, data, out_dir / "taylor_scores", args.resume)
    units = sorted({UNIT_OF[m] for nr in p.budgets for m in methods_for(p, nr) if m in UNIT_OF})
    unit_sels = {u: unit_scores(s, calib, u, out_dir / f"taylor_scores_{u}", args.resume) for u in units}
    if any(m == "channel-xnorm" for nr in p.budgets for m in methods_for(p, nr)):
        unit_sels["channel-xnorm"] = scale_free_channels(s, calib, unit_sels["channel"])

    for nr in p.budgets:
        bsel, binfo = budget(s, base_sel, nr, sizes, unit_sels)
        for method in methods_for(p, nr):
            if method == "zero-shot":
                continue
            if method == "neumt" and not add_neumt(s, base_sel, calib, nr, sizes, bsel, binfo):
                continue
            if method == "dora-best":
                method = best_lora_rank_as_dora(s)
                if method is None:
                    continue
            run_method(s, nr, method, bsel, sizes)
    s.results["finished"] = True
    s.save()
    md = write_report(s.results, out_dir, log)
    log("\n" + md)
    log(f"wrote {out_dir}/selection_value.md, results.json, selection_value_nll.png "
        f"({(time.perf_counter() - t_start) / 60:.1f} min this invocation)")  # fmt: skip
    return s.results


# --------------------------------------------------------------------------------------------- data and eval sets
def log_plan(p: SelectionPreset, log) -> tuple[dict, int]:
    """({budget: methods}, training runs at least): logged before anything loads (also the whole of --dry-run)."""
    plan = {str(nr): methods_for(p, nr) for nr in p.budgets}
    pairs = {("-" if budget_free(m) else nr, m) for nr in p.budgets for m in methods_for(p, nr) if m != "zero-shot"}
    n_runs = sum(len(p.grids[method_info(m)[0]]) + len(p.seeds) - 1 for _, m in pairs)
    n_tests = len(pairs) * len(p.seeds)
    log(f"  {p.steps} steps x batch {p.batch_size}; seeds {p.seeds}; budgets (Taylor neuron_ratio at layer_ratio "
        f"{LAYER_RATIO}) {p.budgets}; methods {plan}; start grids {p.grids}")  # fmt: skip
    log(f"  at least {n_runs} training runs of {p.steps} steps (+ up to {p.max_extend} LR extensions per method), "
        f"{n_tests} test evaluations")  # fmt: skip
    return plan, n_runs


class Session:
    """What every training run of one invocation shares: the preset, the base model, the encodings and eval batches
    (built once, here), and the results dict, saved to ``rpath`` after every run."""

    def __init__(self, p: SelectionPreset, base, tok, device, data: dict, rpath: Path, t_start: float, log):
        self.p, self.base, self.tok, self.device = p, base, tok, device
        self.rpath, self.t_start, self.log = rpath, t_start, log
        self.feats = {k: encode_examples(tok, data[k], p.max_length, on_overflow="skip")
                      for k in ("train", "dev", "test", "forget_test")}  # fmt: skip
        self.feats["english"] = english_features(tok, data["english"], p.max_length)
        self.evalsets = {k: make_evalset(k, self.feats[k], p.eval_batch_size, tok)
                         for k in ("dev", "test", "forget_test", "english")}  # fmt: skip
        self.test_examples = by_group(data["test"])
        self.bleu_examples = [e for g in self.test_examples.values() for e in g[: p.n_bleu]]
        self.results: dict = {}
        self.full_ref = None  # this invocation's full fine-tune (first seed): NeuMT's reference

    def save(self):
        self.results["elapsed_total"] = self.results.get("elapsed_before", 0.0) + time.perf_counter() - self.t_start
        atomic_write_text(self.rpath, json.dumps(self.results, indent=0, default=str))

    def evaluate(self, model, splits) -> dict:
        t = time.perf_counter()
        out = {k: sentence_nll(model, self.evalsets[k]) for k in splits}
        out["eval_seconds"] = time.perf_counter() - t
        return out

    def decode(self, model) -> dict:
        p = self.p
        return decode_scores(model, self.tok, self.bleu_examples, self.test_examples, p.max_new_tokens,
                             p.eval_batch_size)  # fmt: skip

    def fit(self, model, routed, lr, seed) -> tuple[dict, dict, float]:
        """(training record, dev evaluation, dev NLL) of one seeded run of ``model``: the one place a run is trained
        and scored, so a retrained model (NeuMT's reference) is the same as the stored run it stands in for. With
        ``eval_every`` the record holds ``dev_curve``: [step, dev NLL] every that many steps and at the end."""
        curve: list[list[float]] = []
        every = self.p.eval_every

        def on_step(step: int, loss: float) -> None:
            if step % every == 0 and step < self.p.steps:
                curve.append([step, macro_nll(sentence_nll(model, self.evalsets["dev"]), self.evalsets["dev"].groups)])

        tr = train_one(model, routed, self.tok, self.feats["train"], translation_preset(self.p, seed), lr, self.device,
                       on_step=on_step if every else None)  # fmt: skip
        ev = self.evaluate(model, ("dev",))
        dev = macro_nll(ev["dev"], self.evalsets["dev"].groups)
        if every:
            tr["dev_curve"] = [*curve, [self.p.steps, dev]]
        return tr, ev, dev

    def train(self, nr, method, bsel, sizes, lr, seed, keep):
        """(row, model or None): one training run and its dev NLL, stored under its run key; a run already stored
        (resumed) is not repeated. The model is returned only with ``keep`` and a finite dev NLL."""
        results, log = self.results, self.log
        key = run_key(nr, method, seed, lr)
        if key in results["runs"]:
            return results["runs"][key], None
        model, routed = build(method, self.base, bsel, sizes, seed)
        n_tr = trainable_params(model)
        t0 = time.perf_counter()
        try:
            tr, ev, dev = self.fit(model, routed, lr, seed)
            losses = tr["losses"]
        except FloatingPointError as err:
            ev, dev, losses, tr = {"dev": None}, float("inf"), [], {"seconds": time.perf_counter() - t0}
            log(f"    diverged: {err}")
        row = {"method": method, "budget": nr, "seed": seed, "lr": lr, "trainable": n_tr, "routed": routed,
               "dev_nll": dev, "dev": ev["dev"], "train_seconds": tr["seconds"],
               "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
               "run_seconds": time.perf_counter() - t0}  # fmt: skip
        if "dev_curve" in tr:  # dev NLL against steps (eval_every), and the training loss at the same steps
            row["dev_curve"] = tr["dev_curve"]
            row["loss_curve"] = [[k, losses[k - 1]] for k, _ in tr["dev_curve"] if 0 < k <= len(losses)]
        results["runs"][key] = row
        self.save()
        log(f"    seed {seed} lr {lr:g}: {n_tr:,} trainable, {tr['seconds']:.0f} s train, loss "
            f"{row['loss_first'] if losses else float('nan'):.3f} -> "
            f"{row['loss_last'] if losses else float('nan'):.3f}, dev NLL {dev:.4f}")  # fmt: skip
        if keep and math.isfinite(dev):
            return row, model
        del model
        gc.collect()
        return row, None


def resume(s: Session) -> None:
    """Take over the runs, picks and budgets of ``s.rpath``; refused when its configuration differs in more than
    what decides which runs happen (methods, budgets, seeds)."""
    old, new = json.loads(s.rpath.read_text(encoding="utf-8")), json.loads(json.dumps(asdict(s.p)))
    skip = {"methods", "budgets", "seeds", "note", "threads", "max_extend", "device"}  # decide only *which* runs
    # a field added since the file was written (warmup_ratio, eval_every, n_train_by_lang, high_resource) had its
    # default value then
    defaults = {f.name: f.default for f in fields(SelectionPreset) if f.default is not MISSING}
    defaults.update({f.name: f.default_factory() for f in fields(SelectionPreset) if f.default_factory is not MISSING})
    old["config"] = {**json.loads(json.dumps(defaults)), **old["config"]}
    if old["config"] != new and not all(old["config"].get(k) == v for k, v in new.items() if k not in skip):
        raise SystemExit(f"{s.rpath}: written with a different configuration; use another --out")
    s.results["runs"], s.results["picked"] = old.get("runs", {}), old.get("picked", {})
    s.results["budgets"] = old.get("budgets", {})
    s.results["elapsed_before"] = old.get("elapsed_total", 0.0)
    s.log(f"  resuming: {len(s.results['runs'])} runs reused from {s.rpath}")


def zero_shot(s: Session) -> None:
    """The base model's NLL on every split and its decoded test scores (once; kept on resume)."""
    results, evalsets = s.results, s.evalsets
    if "zero-shot" not in results["runs"]:
        s.log("\n[zero-shot]")
        ev = s.evaluate(s.base, ("dev", "test", "forget_test", "english"))
        results["runs"]["zero-shot"] = {"method": "zero-shot", **ev, "decode": s.decode(s.base)}
        s.save()
    z = results["runs"]["zero-shot"]
    s.log(f"  zero-shot NLL dev {macro_nll(z['dev'], evalsets['dev'].groups):.3f} test "
          f"{macro_nll(z['test'], evalsets['test'].groups):.3f}")  # fmt: skip


# ------------------------------------------------------------------------------------------- selections and budgets
def taylor_scores(s: Session, data, sel_dir: Path, reuse: bool):
    """(Taylor selection, calibration batches): one scoring pass, every selection method re-decides from its scores;
    saved in ``sel_dir`` and reused from there with ``reuse`` (--resume)."""
    p, t = s.p, time.perf_counter()
    calib_ex = calibration_examples(data["train"], p.n_calib)
    calib = calibration_batches(s.tok, calib_ex, p.calib_batch_size, p.max_length, on_overflow="skip")
    if reuse and (sel_dir / "neuron_selection.json").is_file():
        base_sel = NeuronSelection.load(sel_dir)  # same calibration data (the configuration was checked above)
        s.log("  Taylor scores reused from " + str(sel_dir))
    else:
        # "taylor" is the MNAFT ranking (layers, then their rows); the other methods re-decide from these scores
        base_sel = select_neurons(s.base, calib, layer_ratio=LAYER_RATIO, neuron_ratio=p.budgets[0],
                                  specific_ratio=SPECIFIC_RATIO, row_selection="layers", progress=False)  # fmt: skip
        s.results["select_seconds"] = time.perf_counter() - t
        base_sel.save(sel_dir)
        s.log(f"  Taylor scoring {s.results['select_seconds']:.1f} s")
    s.results["score_by_type"] = score_by_type(base_sel)
    s.log(f"  mean Taylor neuron score by module type (group-normalised): {s.results['score_by_type']}")
    s.results["score_concentration"] = score_concentration(base_sel)
    s.log(f"  share of a layer's Taylor score mass in its top rows, by module type: {s.results['score_concentration']}")
    return base_sel, calib


def unit_scores(s: Session, calib, unit: str, sel_dir: Path, reuse: bool):
    """The Taylor scores of a column unit ("channel": input channels of o_proj/down_proj; "mlp_neuron"), from the same
    calibration batches as the rows; saved in ``sel_dir`` and reused from there with ``reuse`` (--resume)."""
    if reuse and (sel_dir / "neuron_selection.json").is_file():
        s.log(f"  {unit} scores reused from {sel_dir}")
        return NeuronSelection.load(sel_dir)
    t = time.perf_counter()
    sel = select_neurons(s.base, calib, unit=unit, layer_ratio=LAYER_RATIO, specific_ratio=SPECIFIC_RATIO,
                         row_selection="per_layer", progress=False)  # fmt: skip
    s.results.setdefault("unit_select_seconds", {})[unit] = time.perf_counter() - t
    sel.save(sel_dir)
    s.log(f"  Taylor {unit} scoring {time.perf_counter() - t:.1f} s ({len(sel.layers)} layers)")
    return sel


def scale_free_channels(s: Session, calib, channel_sel):
    """The channel scores divided by each channel's mean input |x_j| on the same calibration batches (method
    ``channel-xnorm``; `common.channel_scale`). One forward pass, not saved: it is recomputed on resume."""
    t = time.perf_counter()
    mags = input_magnitudes(s.base, channel_sel.layers, calib)
    s.log(f"  input magnitudes of {len(mags)} output projections {time.perf_counter() - t:.1f} s (channel-xnorm)")
    return scale_free(channel_sel, mags)


def budget(s: Session, base_sel, nr: float, sizes: dict, unit_sels=None) -> tuple[dict, dict]:
    """(every method's selection at budget ``nr``, the budget's record in results["budgets"])."""
    bsel = budget_selections(base_sel, nr, sizes, unit_sels=unit_sels)
    binfo = {"neuron_ratio": nr, "budget_weights": bsel["budget"], "share": bsel["share"],
             "lora_rank": lora_rank(bsel["budget"], sizes),
             "selections": {m: selection_record(x) for m, x in bsel["selections"].items()}}  # fmt: skip
    # a resumed run keeps the records of selections this invocation does not decide again (NeuMT's needs its reference)
    for m, x in s.results["budgets"].get(str(nr), {}).get("selections", {}).items():
        binfo["selections"].setdefault(m, x)
    s.results["budgets"][str(nr)] = binfo
    s.log(f"\n## budget: Taylor neuron_ratio {nr} -> {bsel['budget']:,} weights = {100 * bsel['share']:.2f}% of "
          f"linear weights; LoRA r {binfo['lora_rank']}")  # fmt: skip
    for m, x in binfo["selections"].items():
        s.log(f"  {m}: {x['kept_layers']} layers, {x['weights']:,} weights, rows by type {x['types']}")
    return bsel, binfo


def add_neumt(s: Session, base_sel, calib, nr: float, sizes: dict, bsel: dict, binfo: dict) -> bool:
    """Add NeuMT's selection to the budget (layers by activation change against a full fine-tune of the first seed);
    False when there is no such reference. A resumed 'full' is retrained once at its picked learning rate, since
    its model was not kept: runs are seeded, so the retrained model matches the stored one (its dev NLL is checked)."""
    if s.full_ref is None:
        s.full_ref = _retrain_full_reference(s, nr, bsel, sizes)
    if s.full_ref is None:
        s.log("  [neumt] skipped: needs 'full' trained (or picked in a resumed run) as its reference")
        return False
    ref_sel = select_neurons(s.base, calib, layer_ratio=LAYER_RATIO, neuron_ratio=nr, specific_ratio=SPECIFIC_RATIO,
                             layer_scoring="activation_similarity", reference_model=s.full_ref, progress=False)  # fmt: skip
    bsel["selections"]["neumt"] = budget_selections(base_sel, nr, sizes, ref_sel)["selections"]["neumt"]
    binfo["selections"]["neumt"] = selection_record(bsel["selections"]["neumt"])
    return True


def _retrain_full_reference(s: Session, nr: float, bsel: dict, sizes: dict):
    """The first seed's full fine-tune at the learning rate a resumed run picked, or None when 'full' has no pick.
    Not stored as a run (it is one already); refused when its dev NLL differs from the stored run's."""
    pick = s.results["picked"].get("-|full")
    if not pick or not math.isfinite(pick.get("lr", float("nan"))):
        return None
    seed, lr = s.p.seeds[0], pick["lr"]
    stored = s.results["runs"].get(run_key(nr, "full", seed, lr), {}).get("dev_nll")
    s.log(f"  [neumt] retraining the resumed full fine-tune (seed {seed}, lr {lr:g}) as the reference")
    model, routed = build("full", s.base, bsel, sizes, seed)
    _, _, dev = s.fit(model, routed, lr, seed)
    if stored is not None and abs(dev - stored) > 1e-3:
        raise SystemExit(f"[neumt] the retrained full fine-tune has dev NLL {dev:.4f}, the stored run "
                         f"{stored:.4f}: not the same model, so it cannot stand in as the reference")  # fmt: skip
    s.log(f"    dev NLL {dev:.4f} (stored {stored if stored is None else f'{stored:.4f}'})")
    return model.eval()


# ------------------------------------------------------------------------------------ learning rate, seeds, resume
def run_method(s: Session, nr: float, method: str, bsel: dict, sizes: dict) -> None:
    """One method at one budget: the learning rate on the first seed (grid extended while the pick is at an edge),
    then every seed trained (the first seed's best model reused) and tested at the picked learning rate."""
    p, results, log = s.p, s.results, s.log
    family, about = method_info(method)
    pkey = f"{'-' if budget_free(method) else nr}|{method}"
    log(f"\n[{method} @ {nr}] {about}")

    # learning rate on the first seed, extended until the pick is interior
    seed0 = p.seeds[0]
    kept = {}

    def dev_of(lr):
        row, mdl = s.train(nr, method, bsel, sizes, lr, seed0, keep=True)
        kept[lr] = mdl
        _keep_best(kept, results, nr, method, seed0)
        return row["dev_nll"]

    # a resumed run also counts the values an earlier invocation already tried (e.g. with --max-extend)
    tried = {r["lr"] for r in results["runs"].values() if r.get("method") == method and r.get("seed") == seed0
             and (budget_free(method) or float(r.get("budget", -1)) == float(nr))}  # fmt: skip
    best, grid, devs, edge = pick_lr(sorted({*p.grids[family], *tried}), dev_of, p.factor, p.max_extend)
    results["picked"][pkey] = {"lr": best, "grid": grid, "at_edge": edge}
    log(f"  picked lr {best:g} from {grid}" + (" (STILL AT AN EDGE after extending)" if edge else ""))
    if not math.isfinite(devs[best]):
        log("  every learning rate diverged; no test run")
        return
    # test (and dev for the other seeds) at the picked LR
    for seed in p.seeds:
        key = run_key(nr, method, seed, best)
        mdl = kept.get(best) if seed == seed0 else None
        if key in results["runs"] and "test" in results["runs"][key]:
            continue
        if mdl is None:
            if key in results["runs"]:
                del results["runs"][key]  # dev only (resumed): train again to test
            _, mdl = s.train(nr, method, bsel, sizes, best, seed, keep=True)
        if mdl is None:
            continue
        ev = s.evaluate(mdl, ("test", "forget_test", "english"))
        results["runs"][key].update(ev)
        results["runs"][key]["decode"] = s.decode(mdl)
        results["runs"][key]["test_nll"] = macro_nll(ev["test"], s.evalsets["test"].groups)
        log(f"    seed {seed}: test NLL {results['runs'][key]['test_nll']:.4f}, chrF "
            f"{results['runs'][key]['decode'].get('chrf', float('nan')):.2f}")  # fmt: skip
        if method == "full" and seed == seed0 and s.full_ref is None:
            s.full_ref = mdl.eval()
        del mdl
        gc.collect()
        s.save()
    kept.clear()
    gc.collect()


def best_lora_rank_as_dora(s: Session) -> Optional[str]:
    """The method "dora-best" stands for: "dora-r<N>" for the fixed-rank LoRA ("lora-r<N>") whose picked run has the
    lowest dev NLL on the first seed, or None (logged) when no fixed-rank LoRA has a pick yet."""
    seed0, best = s.p.seeds[0], None
    for pkey, pick in s.results["picked"].items():
        method = pkey.split("|")[1]
        if not method.startswith("lora-r") or fixed_rank(method) is None:
            continue
        dev = s.results["runs"].get(run_key("-", method, seed0, pick["lr"]), {}).get("dev_nll", math.inf)
        if best is None or dev < best[0]:
            best = (dev, fixed_rank(method))
    if best is None or not math.isfinite(best[0]):
        s.log("\n[dora-best] skipped: needs a fixed-rank LoRA (lora-r<N>) with a finite dev NLL first")
        return None
    s.log(f"\n[dora-best] LoRA's best rank by dev NLL is {best[1]} ({best[0]:.4f}): DoRA at r {best[1]}")
    return f"dora-r{best[1]}"


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


if __name__ == "__main__":
    main()
