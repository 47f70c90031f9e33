"""Step time of several quality-benchmark methods, interleaved step by step on the same batches.

`quality.py` trains its methods one after another, minutes apart, so on a shared machine its wall-clock column
also measures how busy the host was at the time. Here every method is built from the same preset (same model,
same Taylor selection, same data) and the methods take turns: step 1 of each, then step 2 of each, and so on,
each on the same batch. Host drift then hits all methods alike, and the median step time ratio against the first
method is the number to quote. The presets and methods are quality.py's (``common/preset.py``,
``common/methods.py``), and so are the model, the Taylor selection and the training batches.

Usage::

    python benchmarks/interleaved_steps.py --preset cpu-large --methods lora-r16,ns-0.4,ns-0.4-random --steps 16
    python benchmarks/interleaved_steps.py --preset tiny --steps 3        # smoke test (tests/benchmark_smoke/test_quality_smoke.py)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/, for the shared set-up in common/
from common.data import build_data  # noqa: E402
from common.methods import METHODS, build_method, run_selection  # noqa: E402
from common.models import load_model  # noqa: E402
from common.preset import PRESETS, resolve_device  # noqa: E402
from common.training import train_batches  # noqa: E402

from neuron_peft.data import encode_examples  # noqa: E402
from neuron_peft.training import answer_loss  # noqa: E402


def main(argv=None, log: Callable[[str], None] = print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-large")
    ap.add_argument("--methods", default="lora-r16,ns-0.4,ns-0.4-random", help="the first one is the baseline")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS or m == "zero-shot"]
    if unknown or len(methods) < 2:
        raise SystemExit(f"give at least two trained methods from {list(METHODS)[1:]}; bad: {unknown}")
    p = replace(PRESETS[args.preset], n_dev=1, n_test=1, n_forget=1)
    if p.threads:
        torch.set_num_threads(p.threads)
    device = resolve_device(p)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available on this machine")
    data = build_data(p)
    base, tok = load_model(p, data, device)
    base.requires_grad_(False)
    selections, _ = run_selection(base, tok, data, p, methods, device, log)
    features = encode_examples(tok, data["train"], p.max_length, on_overflow="skip")
    runs = {}
    for m in methods:
        model, routed = build_method(m, base, selections, p)
        model.train()
        opt = torch.optim.AdamW([x for x in model.parameters() if x.requires_grad], lr=args.lr)
        runs[m] = (model, opt, iter(train_batches(features, tok, p, routed)))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for step in range(args.steps):
        for m, (model, opt, batches) in runs.items():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in next(batches).items()}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            answer_loss(model, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[m].append(time.perf_counter() - start)
        log(f"step {step}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in methods))
    ref = statistics.median(times[methods[0]])
    summary = {m: {"median_s": statistics.median(t), "ratio": statistics.median(t) / ref, "min_s": min(t)}
               for m, t in times.items()}  # fmt: skip
    log(f"\n{args.steps} interleaved steps, preset {args.preset}, {device}, {torch.get_num_threads()} threads")
    log(f"| method | median s/step | x {methods[0]} | min s |\n|---|---|---|---|")
    for m, s in summary.items():
        log(f"| {m} | {s['median_s']:.3f} | {s['ratio']:.3f} | {s['min_s']:.3f} |")
    return {"times": times, "summary": summary}


if __name__ == "__main__":
    main()
