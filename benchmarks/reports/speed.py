"""speed.py's report: the step-time and peak-memory table, the inference table and the issue's targets.

`build_table` compares every method's median step time and peak memory with LoRA, the floor and (for neuron-100)
full fine-tuning, on the clock the run chose (``ratio_key``); `inference_table` gives the forward-only overhead of
an unmerged and a merged adapter; `check_targets` measures the issue's targets (MET / NOT MET, n/a where a method
was skipped), `targets` is their record in the results; `log_report` prints all three as a run ends. Everything is
read from the results dict speed.py stores in ``--json``.
"""

from __future__ import annotations

from typing import Optional


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def build_table(results: dict) -> str:
    rows = results["methods"]
    lora, floor, full = (rows.get(k, {}) for k in ("lora", "floor", "full"))
    key = results.get("ratio_key", "ms_median")
    header = ["method", "trainable", "ms/step", "x LoRA", "x floor", "min ms", "cpu-ms", "peak MiB", "mem x LoRA",
              "x full (t/mem)"]  # fmt: skip
    lines = [header]
    for name, r in rows.items():
        t, mem = r.get(key), r["peak_mib"]
        vs_full = "-"
        if name == "neuron-100" and full:
            vs_full = f"{_fmt(_ratio(t, full.get(key)), '.2f')} / {_fmt(_ratio(mem, full.get('peak_mib')), '.2f')}"
        lines.append([
            name, f"{r['trainable']:,}", _fmt(r["ms_median"], ".1f"), _fmt(_ratio(t, lora.get(key)), ".2f"),
            _fmt(_ratio(t, floor.get(key)), ".2f"), _fmt(r.get("ms_min"), ".1f"),
            _fmt(r.get("cpu_ms_median"), ".1f"), _fmt(mem, ".1f"),
            _fmt(_ratio(mem, lora.get("peak_mib")), ".2f"), vs_full,
        ])  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def inference_table(inf: dict) -> str:
    lines = ["| model | ms/forward (median) | min ms | vs base (median) | vs base (min) |", "|---|---|---|---|---|"]
    for k, v in inf.items():
        lines.append(f"| {k} | {v['ms_median']:.1f} | {v['ms_min']:.1f} | {_fmt(v.get('overhead'), '+.1%')} | "
                     f"{_fmt(v.get('overhead_min'), '+.1%')} |")  # fmt: skip
    return "\n".join(lines)


def check_targets(results: dict) -> list[tuple[str, Optional[float], float, Optional[bool]]]:
    """(target, measured, threshold, met) for the issue's targets; measured None when a method was skipped."""
    m = results["methods"]
    key = results.get("ratio_key", "ms_median")

    def r(a, b, key):
        return _ratio(m.get(a, {}).get(key), m.get(b, {}).get(key))

    inf = results.get("inference", {})
    checks = [
        ("neuron-10 step time / LoRA", r("neuron-10", "lora", key), 0.90),
        ("neuron-10 peak memory / LoRA", r("neuron-10", "lora", "peak_mib"), 0.80),
        ("neuron-100 step time / full FT", r("neuron-100", "full", key), 1.05),
        ("neuron-100 peak memory / full FT", r("neuron-100", "full", "peak_mib"), 1.30),
        # column units at LoRA r16's trainable count (issue 26)
        ("channel-lora step time / LoRA", r("channel-lora", "lora", key), 0.90),
        ("channel-lora peak memory / LoRA", r("channel-lora", "lora", "peak_mib"), 0.90),
        ("mlp-neuron-lora step time / LoRA", r("mlp-neuron-lora", "lora", key), 0.90),
        ("mlp-neuron-lora peak memory / LoRA", r("mlp-neuron-lora", "lora", "peak_mib"), 0.90),
        ("routed (4 groups, mixed batches) / unrouted step time", r("neuron-10-routed", "neuron-10", key), 1.05),
        ("unmerged inference overhead (neuron-10)", inf.get("neuron-10 unmerged", {}).get("overhead"), 0.05),
        (
            "merged inference overhead (target 0; <=2% = timing noise)",
            inf.get("neuron-10 merged", {}).get("overhead"),
            0.02,
        ),
    ]
    return [(name, val, thr, None if val is None else val <= thr) for name, val, thr in checks]


def targets(results: dict) -> list[dict]:
    """`check_targets` as stored in the results: target, measured, threshold, met."""
    return [{"target": n, "measured": v, "threshold": thr, "met": ok} for n, v, thr, ok in check_targets(results)]


def log_report(results: dict, log=print) -> None:
    """What a run prints at its end: the step-time and memory table, the inference table and the targets."""
    rounds, steps, clock, mem_method = results["rounds"], results["steps"], results["clock"], results["memory_method"]
    log("")
    log(f"Training step (forward+backward+AdamW+zero_grad) over {rounds * steps} interleaved steps per method: "
        f"ms/step = median wall time, min ms = fastest step, cpu-ms = median process CPU time; ratios use {clock} "
        "time; "
        f"peak memory: {mem_method}")  # fmt: skip
    log(build_table(results))
    if "inference" in results:
        log("")
        log(inference_table(results["inference"]))
    log("")
    for t in results["targets"]:
        status = "n/a" if t["met"] is None else ("MET" if t["met"] else "NOT MET")
        clock_note = "" if "memory" in t["target"] else f" [{clock} time]"
        log(f"  {t['target']}{clock_note}: {_fmt(t['measured'], '.3f')} (target <= {t['threshold']}) {status}")
