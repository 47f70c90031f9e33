"""quality.py's report: significance tests, the issue's targets, quality.md, results.json and quality_bleu.png.

`finish_report` turns the per-method results the runner stored into the report: it picks the comparisons
(`significance_pairs`: the headline NeuronSelect run against every other method, the other NeuronSelect variants
against LoRA r16 and full FT, every method against the base on the forgetting probe), runs the paired bootstrap
(common/stats.py), checks the targets of issue 6 (`targets`), and writes quality.md (`report_markdown`: scores,
memory, forgetting, significance, learning-rate grids, targets), results.json and the plot (`plot`: BLEU and
forgetting drop per method with their 95% intervals). The runner calls it at the end of a run and on ``--report``
(also with the partial results an interrupted run leaves); during a run it writes `report_markdown` after every
method.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from common.methods import METHODS, NS_RATIOS
from common.report import fmt, fmt_ci, pyplot, save_figure
from common.stats import significance

from neuron_peft.fileio import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from common.preset import Preset


def finish_report(results: dict, p: Preset, out_dir: Path, label: str, log: Callable[[str], None]) -> str:
    """Significance, targets, quality.md, results.json and the plot from the per-method results."""
    test_pairs, forget_pairs = significance_pairs(results["methods"])
    results["significance"] = {"test": significance(results, test_pairs, "test"),
                               "forget": significance(results, forget_pairs, "forget")}  # fmt: skip
    results["targets"] = targets(results)
    md = report_markdown(results, p, results["preset"])
    write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "quality.md", md)
    try:
        plot(results, out_dir / "quality_bleu.png", label)
        results["plot"] = str(out_dir / "quality_bleu.png")
    except ImportError as err:
        log(f"(plot skipped: {err})")
    return md


def write_json(path: Path, data) -> None:
    """results.json as the runner and the report write it (indent 1, anything else as str)."""
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
