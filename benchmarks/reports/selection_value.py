"""selection_value.py's report: the summary of every budget and method, selection_value.md, summary.json and the plot.

`write_report` reads only the ``results.json`` dict the runner stores (every run, every pick, the budgets), so the
runner calls it at the end of a run and ``--report`` calls it on a saved (also a partial) file. `summarise` turns
the stored runs into one row per budget and method: intervals over seeds (t) of the test and dev NLL, forgetting
and chrF/BLEU, the per-language NLL, and paired bootstrap differences over test sentences against taylor,
random-all, random-layers and LoRA. The markdown table lists those rows per budget, best test NLL first; the plot
draws test NLL against the trained share of linear weights. When the preset declares ``high_resource`` (the
interference presets), `by_resource` adds the test NLL over the low- and the high-resource languages apart, each
with paired differences on that set's sentences against LoRA and the agnostic-only rows (`resource_table`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from common.matched import LAYER_RATIO, budget_free
from common.report import fmt_pm, pyplot, save_figure
from common.stats import macro_nll, paired_bootstrap, per_lang_nll, seed_interval, seed_mean_per_sentence


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
                    and r["lr"] == pick["lr"] and (budget_free(method) or float(r["budget"]) == float(nr))]  # fmt: skip
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
                "_test_runs": [r["test"] for r in runs],
                "_forget_sent": seed_mean_per_sentence([r["forget_test"] for r in runs]),
                "train_seconds": sum(r["train_seconds"] for r in runs) / len(runs),
                "dev_curve": mean_curve([r["dev_curve"] for r in runs if r.get("dev_curve")]),
            }  # fmt: skip
        # "Δ vs LoRA": the budget-matched `lora` where the run has one, else the fixed-rank LoRA of lowest dev NLL
        lora_ref = "lora" if "lora" in rows else best_fixed_rank_lora(rows)
        for m, r in rows.items():
            r["paired"] = {}
            for b in ("taylor", "taylor-per-layer", "random-all", "random-layers", "magnitude"):
                if b in rows and b != m:
                    r["paired"][b] = paired_bootstrap(r["_test_sent"], rows[b]["_test_sent"], groups["test"])
            if lora_ref is not None and lora_ref != m:
                r["paired"]["lora"] = paired_bootstrap(r["_test_sent"], rows[lora_ref]["_test_sent"], groups["test"])
                r["lora_reference"] = lora_ref
            for a, b, _ in ROW_CRITERION_PAIRS:  # the unit criterion alone (same count per layer)
                if m == a and b in rows and b not in r["paired"]:
                    r["paired"][b] = paired_bootstrap(r["_test_sent"], rows[b]["_test_sent"], groups["test"])
            r["paired_forget_zero"] = paired_bootstrap(r["_forget_sent"], z["forget_test"], groups["forget_test"])
        split = resource_split(results)
        if split:
            by_resource(rows, split, groups["test"])
        out["budgets"][nr] = {"info": binfo, "rows": rows}
    if resource_split(results):
        out["zero"]["by_resource"] = {k: macro_nll(*subset(z["test"], groups["test"], keep))
                                      for k, keep in resource_split(results).items()}  # fmt: skip
    return out


def best_fixed_rank_lora(rows: dict) -> str | None:
    """Of the fixed-rank LoRA rows (``lora-rN``), the one with the lowest mean dev NLL; None without one."""
    loras = {m: r["dev"][0] for m, r in rows.items() if m.startswith("lora-r")}
    return min(loras, key=loras.get) if loras else None


# the baselines of the low/high-resource comparison: budget-matched LoRA, and the same rows all shared (no routing)
RESOURCE_BASELINES = ("lora", "taylor-per-layer-agnostic")


def resource_split(results: dict) -> dict[str, list[str]]:
    """{"low": groups, "high": groups} of the test languages when the preset declares ``high_resource`` (the
    interference presets), in test order; {} otherwise (and the report is what it was before)."""
    high = set(results["config"].get("high_resource") or ())
    if not high:
        return {}
    order = list(dict.fromkeys(results["groups"]["test"]))
    return {"low": [g for g in order if g.split("-")[-1] not in high], "high": [g for g in order if g.split("-")[-1] in high]}  # fmt: skip


def subset(per: list, groups: list[str], keep) -> tuple[list, list[str]]:
    """(per-sentence values, groups) of the sentences whose group is in ``keep``."""
    idx = [i for i, g in enumerate(groups) if g in keep]
    return [per[i] for i in idx], [groups[i] for i in idx]


def by_resource(rows: dict, split: dict, groups: list[str]) -> None:
    """Per row and language set (low / high): the test NLL macro-averaged over the set's languages (interval over
    seeds) and `paired_bootstrap` against `RESOURCE_BASELINES` restricted to the set's sentences (stratified by
    language, as the main table), stored as ``row["by_resource"][set]``."""
    for m, r in rows.items():
        r["by_resource"] = {}
        for name, keep in split.items():
            if not keep:
                continue
            sent, g = subset(r["_test_sent"], groups, keep)
            paired = {b: paired_bootstrap(sent, subset(rows[b]["_test_sent"], groups, keep)[0], g)
                      for b in RESOURCE_BASELINES if b in rows and b != m}  # fmt: skip
            seeds = [macro_nll(subset(t, groups, keep)[0], g) for t in r["_test_runs"]]
            r["by_resource"][name] = {"groups": list(keep), "test": seed_interval(seeds), "paired": paired}


def mean_curve(curves: list) -> list:
    """[[step, mean dev NLL over the seeds that have that step], ...] of seeds' dev curves ([] without any)."""
    at: dict[int, list[float]] = {}
    for c in curves:
        for step, v in c:
            at.setdefault(int(step), []).append(v)
    return [[k, sum(v) / len(v), len(v)] for k, v in sorted(at.items())]


def curve_table(rows: dict, max_cols: int = 8) -> list[str]:
    """Markdown: dev NLL at (up to ``max_cols``, evenly spaced, the last included) evaluation steps per method."""
    curves = {m: r["dev_curve"] for m, r in rows.items() if r.get("dev_curve")}
    if not curves:
        return []
    steps = sorted({c[0] for v in curves.values() for c in v})
    n = min(max_cols, len(steps))
    pick = sorted({steps[round(i * (len(steps) - 1) / max(1, n - 1))] for i in range(n)})
    lines = ["", "Dev NLL against training steps (picked LR, mean over seeds; plot selection_value_dev_curves.png):",
             "", "| method | " + " | ".join(f"step {k}" for k in pick) + " |", "|---|" + "---|" * len(pick)]  # fmt: skip
    for m, c in sorted(curves.items()):
        at = {k: v for k, v, _ in c}
        lines.append(f"| {m} | " + " | ".join(f"{at[k]:.3f}" if k in at else "-" for k in pick) + " |")
    return lines


def curve_reference(rows: dict) -> str | None:
    """The LoRA row the curves are compared with: of the methods named lora / lora-rN, the one with the lowest final
    dev NLL (the best LoRA of any rank, as the issue's target reads); None without a LoRA curve."""
    loras = {m: r["dev_curve"][-1][1] for m, r in rows.items() if m.split("-r")[0] == "lora" and r.get("dev_curve")}
    return min(loras, key=loras.get) if loras else None


def curve_gap(curve: list, reference: list) -> list[tuple[int, float]]:
    """[(step, dev NLL of ``curve`` − that of ``reference``)] at the steps both curves have, in step order."""
    ref = {int(c[0]): c[1] for c in reference}
    return [(int(c[0]), c[1] - ref[int(c[0])]) for c in curve if int(c[0]) in ref]


def crossing_step(gap: list[tuple[int, float]]) -> int | None:
    """The first step from which the gap stays <= 0 to the end of the run (the curve has crossed below the
    reference and not crossed back); None when the last point is still above it."""
    step = None
    for k, g in gap:
        if g <= 0:
            step = k if step is None else step
        else:
            step = None
    return step


def gap_trend(gap: list[tuple[int, float]]) -> float:
    """Least-squares slope of the gap over the second half of the run (steps >= half the last step), per 100 steps:
    negative = the curve is closing in on the reference. NaN with fewer than two points there."""
    if not gap:
        return float("nan")
    pts = [(k, g) for k, g in gap if k >= gap[-1][0] / 2]
    if len(pts) < 2:
        return float("nan")
    mk, mg = sum(k for k, _ in pts) / len(pts), sum(g for _, g in pts) / len(pts)
    var = sum((k - mk) ** 2 for k, _ in pts)
    return 100 * sum((k - mk) * (g - mg) for k, g in pts) / var if var else float("nan")


def curve_gaps(rows: dict) -> list[str]:
    """Markdown lines: every method's dev-NLL gap to the best LoRA along the curve (first and last shared step),
    the step from which it stays at or below LoRA (or that it never gets there), and the gap's trend per 100 steps
    over the second half. What the curves say about "more steps would close it", measured, not extrapolated."""
    ref = curve_reference(rows)
    if ref is None:
        return []
    out = []
    for m, r in sorted(rows.items()):
        if m == ref or not r.get("dev_curve"):
            continue
        gap = curve_gap(r["dev_curve"], rows[ref]["dev_curve"])
        if not gap:
            continue
        cross = crossing_step(gap)
        if cross is not None:
            where = f"at or below LoRA from step {cross} on"
        elif any(g <= 0 for _, g in gap):
            where = "below LoRA at some steps but above it at the end"
        else:
            where = "above LoRA at every step (no crossing)"
        trend = gap_trend(gap)
        out.append(f"{m} {gap[0][1]:+.3f} at step {gap[0][0]} → {gap[-1][1]:+.3f} at step {gap[-1][0]}, {where}; "
                   f"trend over the second half {trend:+.3f} per 100 steps")  # fmt: skip
    if not out:
        return []
    return ["", f"Gap to the best LoRA ({ref}) along the dev curve (method − LoRA, negative = better): "
            + "; ".join(out) + "."]  # fmt: skip


# pairs of methods that train the same number of rows in the same layers and differ only in which rows
ROW_CRITERION_PAIRS = (
    ("taylor", "random-layers", "Taylor's layers"),
    ("taylor-per-layer", "random-all", "same share of every layer"),
    ("taylor-per-layer", "magnitude", "same share of every layer"),
    ("magnitude", "random-all", "same share of every layer"),
    ("channel", "channel-random", "same columns per output projection"),
    ("channel-xnorm", "channel-random", "same columns per output projection"),
    ("channel-xnorm", "channel", "same columns per output projection"),
)


def row_criterion_pairs(rows: dict) -> list[str]:
    """The paired test-NLL differences between methods whose selections share their layers and rows per layer, so
    the difference is the row criterion alone (Taylor, weight norm or chance), not the layer choice."""
    out = []
    for a, b, where in ROW_CRITERION_PAIRS:
        x = rows.get(a, {}).get("paired", {}).get(b)
        if x:
            out.append(f"{a} − {b} ({where}) {x['delta']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]")
    return out


def train_sizes_line(results: dict) -> list[str]:
    """The training pairs per language (and the high-resource set) of a preset that sets them per language; []
    for the others, whose reports stay as they were."""
    cfg = results["config"]
    if not cfg.get("n_train_by_lang") and not cfg.get("high_resource"):
        return []
    sizes = ", ".join(f"{g.split('-')[-1]} {n}" for g, n in results["counts"]["train"].items())
    high = ", ".join(cfg.get("high_resource") or ()) or "none declared"
    return [f"Training pairs per language: {sizes}; high-resource: {high}; batches drawn from all of them shuffled "
            "together (the imbalanced mix).", ""]  # fmt: skip


def resource_table(rows: dict, zero: dict) -> list[str]:
    """Markdown: test NLL over the low- and the high-resource languages apart, with the paired Δ against LoRA and the
    agnostic-only rows, forgetting, and the NLL per language; [] when the preset declares no ``high_resource``."""
    if not rows or not any("by_resource" in r for r in rows.values()):
        return []
    split = next(r["by_resource"] for r in rows.values() if "by_resource" in r)
    sets = [k for k in ("low", "high") if k in split]
    name = {k: f"{k} ({', '.join(g.split('-')[-1] for g in split[k]['groups'])})" for k in sets}

    def d(x):
        return f"{x['delta']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]" if x else "-"

    head = " | ".join(f"**{name[k]} NLL** | Δ {k} vs LoRA [95%] | Δ {k} vs agnostic [95%]" for k in sets)
    lines = ["", "Low- vs high-resource languages: test NLL macro-averaged over each set's languages (± over seeds); "
             "Δ = paired bootstrap over that set's test sentences (stratified by language) against budget-matched "
             "LoRA and against the same rows all shared (taylor-per-layer-agnostic); negative = better. Zero-shot: "
             + ", ".join(f"{k} {zero['by_resource'][k]:.3f}" for k in sets) + ".", "",
             f"| method | trainable | {head} | forget sw/id Δ | English Δ |", "|---|---|" + "---|---|---|" * len(sets)
             + "---|---|"]  # fmt: skip
    for m, r in sorted(rows.items(), key=lambda kv: kv[1]["by_resource"][sets[0]]["test"][0]):
        cells = " | ".join(f"**{fmt_pm(r['by_resource'][k]['test'])}** | {d(r['by_resource'][k]['paired'].get('lora'))}"
                           f" | {d(r['by_resource'][k]['paired'].get('taylor-per-layer-agnostic'))}" for k in sets)  # fmt: skip
        lines.append(f"| {m} | {r['trainable']:,} | {cells} | {fmt_pm(r['forget'])} | {fmt_pm(r['english'])} |")
    langs = [g for k in sets for g in split[k]["groups"]]
    lines += ["", "Test NLL per language (seed-averaged sentences):", "",
              "| method | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]  # fmt: skip
    for m, r in sorted(rows.items()):
        lines.append(f"| {m} | " + " | ".join(f"{r['per_lang'][g]:.3f}" for g in langs) + " |")
    return lines


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
        *train_sizes_line(results),
        f"Zero-shot: test NLL {zero['test']:.3f}, dev {zero['dev']:.3f}, sw/id {zero['forget']:.3f}, English "
        f"{zero['english']:.3f}" + (f", chrF {zero['decode']['chrf']:.2f}" if zero["decode"] else "") + ".",
    ]  # fmt: skip
    for nr, b in s["budgets"].items():
        info_b = b["info"]
        lines += ["", f"**Budget {100 * info_b['share']:.2f}% of linear weights** ({info_b['budget_weights']:,} "
                  f"weights; Taylor layer_ratio {LAYER_RATIO}, neuron_ratio {nr}; LoRA/DoRA r {info_b['lora_rank']})", "",
                  "| method | LR (grid) | trainable | dev NLL | **test NLL** | Δ vs taylor [95%] | Δ vs taylor-per-layer [95%] | "
                  "Δ vs random-all [95%] | Δ vs LoRA [95%] | chrF | BLEU | forget sw/id Δ | English Δ |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for m, r in sorted(b["rows"].items(), key=lambda kv: kv[1]["test"][0]):

            def d(base, r=r):
                x = r["paired"].get(base)
                return f"{x['delta']:+.3f} [{x['ci'][0]:+.3f}, {x['ci'][1]:+.3f}]" if x else "-"

            grid = "/".join(f"{g:g}" for g in r["grid"])
            lines.append(f"| {m} ({r['seeds']} seed{'s' if r['seeds'] > 1 else ''}) | {r['lr']:g} ({grid}){' EDGE' if r['at_edge'] else ''} | {r['trainable']:,} | "
                         f"{fmt_pm(r['dev'])} | **{fmt_pm(r['test'])}** | {d('taylor')} | {d('taylor-per-layer')} | {d('random-all')} | {d('lora')} | "
                         f"{fmt_pm(r['chrf'], 2)} | {fmt_pm(r['bleu'], 2)} | {fmt_pm(r['forget'])} | {fmt_pm(r['english'])} |")  # fmt: skip
        refs = {r["lora_reference"] for r in b["rows"].values() if r.get("lora_reference", "lora") != "lora"}
        if refs:
            lines += ["", f"Δ vs LoRA is against {', '.join(sorted(refs))} (no budget-matched `lora` in this run: the "
                      "fixed-rank LoRA of lowest dev NLL)."]  # fmt: skip
        lines += resource_table(b["rows"], zero)
        fixed = row_criterion_pairs(b["rows"])
        if fixed:
            lines += ["", "Row criterion with the layers held fixed (paired Δ test NLL [95%], negative = the first "
                      "better): " + "; ".join(fixed) + "."]  # fmt: skip
        lines += curve_table(b["rows"])
        lines += curve_gaps(b["rows"])
        types = {m: v["types"] for m, v in info_b["selections"].items()}
        lines += ["", "Rows by module type: " + "; ".join(f"{m} {t}" for m, t in types.items())]
    md = "\n".join(lines) + "\n"
    atomic_write_text(out_dir / "selection_value.md", md)
    slim = {k: {m: {kk: vv for kk, vv in r.items() if not kk.startswith("_")} for m, r in v["rows"].items()}
            for k, v in s["budgets"].items()}  # fmt: skip
    atomic_write_text(out_dir / "summary.json", json.dumps({"zero": zero, "budgets": slim}, indent=1, default=str))
    try:
        plot(s, out_dir / "selection_value_nll.png", results)
        if any(r.get("dev_curve") for b in s["budgets"].values() for r in b["rows"].values()):
            plot_curves(s, out_dir / "selection_value_dev_curves.png", results)
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
                share = b["info"]["share"] if not budget_free(m) else 1.0
                if budget_free(m) and m != "full" and results.get("total_linear_weights"):
                    share = r["trainable"] / results["total_linear_weights"]  # fixed-rank LoRA: its own size
                xs.append(100 * share)
                ys.append(r["test"][0])
                es.append(r["test"][1] if math.isfinite(r["test"][1]) else 0.0)
        if budget_free(m):
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


def plot_curves(s: dict, path: Path, results: dict) -> None:
    """Dev NLL against training steps per method (picked LR, mean over seeds), one panel per budget."""
    plt = pyplot()
    budgets = list(s["budgets"].items())
    fig, axes = plt.subplots(1, len(budgets), figsize=(6.0 * len(budgets), 4.2), squeeze=False)
    for ax, (nr, b) in zip(axes[0], budgets):
        for i, (m, r) in enumerate(sorted(b["rows"].items())):
            if r.get("dev_curve"):
                ks, vs = [c[0] for c in r["dev_curve"]], [c[1] for c in r["dev_curve"]]
                ax.plot(ks, vs, marker="os^vD<>px*h"[i % 11], ms=3, label=f"{m} (lr {r['lr']:g})")
        ax.axhline(s["zero"]["dev"], color="gray", lw=0.8, ls="--", label="zero-shot")
        ax.set_title(f"budget {100 * b['info']['share']:.2f}% (neuron_ratio {nr})", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_ylabel("dev NLL per target token (mean over seeds)")
        ax.legend(fontsize=7)
    fig.suptitle(f"selection value, preset {results['preset']}: dev NLL against steps", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
