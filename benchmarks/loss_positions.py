"""Step time of the three exact ways to compute the training loss, interleaved on the same batches (issue 24).

On Gemma 3 270M most of a training step is the 262k-token output layer, and a translation prompt carries no loss.
The three losses give the same value and gradients (``tests/integrations/test_labelled_loss.py``); they differ in
how many positions the output layer projects:

* ``full``: ``model(**batch).loss``, logits at every position of the padded batch;
* ``span``: `neuron_peft.training.answer_loss`, one span of positions shared by the batch, from the first to the
  last position with a loss term in any sample (what the benchmarks trained with before);
* ``labelled``: `neuron_peft.training.labelled_logits_loss`, only the positions whose shifted label is not -100
  (what `common/training.py` trains with now).

Methods and batches are selection_value.py's (a preset of ``common/preset.py``): LoRA at the budget's rank, random
rows at the budget's share of every layer (the step cost of a row method does not depend on which rows), full
fine-tuning. All models stay resident; every round takes one training batch and runs one timed step (forward,
backward, AdamW step, zero_grad) of every method x loss on it, the loss order rotated every round, so host drift
hits them alike. Reported: median and min seconds per step, the ratio to ``full`` (median of per-round ratios), the
share of positions each loss projects, and the loss values of the three on the first batch (they must agree).

Usage::

    python benchmarks/loss_positions.py --preset full --rounds 8            # batch 8 x <= 96 tokens (issue 14's runs)
    python benchmarks/loss_positions.py --preset long --rounds 6 --methods lora,rows
    python benchmarks/loss_positions.py --preset tiny --rounds 2            # smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's neuron_peft, also when another one is installed
sys.path.insert(0, str(HERE))  # benchmarks/, for the shared set-up in common/
from common.machine import machine_info  # noqa: E402
from common.matched import build, linear_sizes, lora_rank  # noqa: E402
from common.models import model_for_training_batches, trainable_params  # noqa: E402
from common.preset import SELECTION_PRESETS  # noqa: E402
from common.training import train_batches  # noqa: E402

from neuron_peft.data import IGNORE_INDEX, encode_examples  # noqa: E402
from neuron_peft.fileio import atomic_write_text  # noqa: E402
from neuron_peft.selection import resolve_target_modules  # noqa: E402
from neuron_peft.training import answer_loss, labelled_logits_loss  # noqa: E402

LOSSES: dict[str, Callable] = {
    "full": lambda model, batch: model(**batch).loss,
    "span": answer_loss,
    "labelled": labelled_logits_loss,
}
METHODS = {"lora": "lora", "rows": "random-all", "full-ft": "full"}  # name here -> selection_value.py's method


def positions(batch) -> dict:
    """Share of the batch's positions each loss projects through the output layer."""
    targets = batch["labels"][:, 1:] != IGNORE_INDEX
    cols = targets.any(0).nonzero().flatten()
    total = batch["labels"].numel()
    return {"full": 1.0, "span": targets.shape[0] * (int(cols[-1]) - int(cols[0]) + 1) / total,
            "labelled": int(targets.sum()) / total}  # fmt: skip


def main(argv=None, log: Callable[[str], None] = print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(SELECTION_PRESETS), default="full")
    ap.add_argument("--methods", default="lora,rows", help=f"comma list from {','.join(METHODS)}")
    ap.add_argument("--losses", default="full,span,labelled", help=f"comma list from {','.join(LOSSES)}")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method and loss")
    ap.add_argument("--share", type=float, default=0.018, help="trainable share of linear weights (rows, LoRA rank)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write every timing here (a new file unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    args = ap.parse_args(argv)
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise SystemExit(f"--json {args.json} exists; pass --overwrite to replace it (refused before any timing)")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    losses = [x.strip() for x in args.losses.split(",") if x.strip()]
    bad = [m for m in methods if m not in METHODS] + [x for x in losses if x not in LOSSES]
    if bad or not methods or not losses:
        raise SystemExit(f"unknown method(s)/loss(es) {bad}; methods {list(METHODS)}, losses {list(LOSSES)}")
    p, device, data, base, tok = model_for_training_batches(args.preset, args.batch_size, args.threads)
    base.requires_grad_(False)
    info = machine_info(device)
    log(f"# loss positions ({args.preset}): batch {p.batch_size}, max_length {p.max_length}; {info['cpu']} "
        f"x{info['nproc']}, {info['torch_threads']} threads, load average {info['loadavg']}")  # fmt: skip
    sizes = linear_sizes(base, resolve_target_modules(base, "all-linear"))
    budget = int(args.share * sum(o * i for o, i in sizes.values()))
    bsel = {"budget": budget, "share": args.share, "selections": {}}
    features = encode_examples(tok, data["train"], p.max_length, on_overflow="skip")
    need = args.rounds + args.warmup
    loader = train_batches(features, tok, p, routed=False)
    batches = [b for _, b in zip(range(need), loader)]
    while len(batches) < need:  # tiny data: cycle
        batches += batches[: need - len(batches)]
    runs = {}
    for m in methods:
        model, _ = build(METHODS[m], base, bsel, sizes, seed=0)
        model.train()
        opt = torch.optim.AdamW([x for x in model.parameters() if x.requires_grad], lr=1e-5)
        runs[m] = (model, opt)
        log(f"  {m}: {trainable_params(model):,} trainable" + (f" (LoRA r {lora_rank(budget, sizes)})"
                                                               if m == "lora" else ""))  # fmt: skip
    check = {}
    with torch.no_grad():
        for m, (model, _) in runs.items():
            check[m] = {x: float(LOSSES[x](model, batches[0])) for x in losses}
            log(f"  loss on the first batch, {m}: " + ", ".join(f"{x} {v:.6f}" for x, v in check[m].items()))

    def step(model, opt, loss, batch) -> float:
        start = time.perf_counter()
        LOSSES[loss](model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for b in batches[: args.warmup]:
        for model, opt in runs.values():
            for x in losses:
                step(model, opt, x, b)
    times = {m: {x: [] for x in losses} for m in methods}
    shares = []
    for r, b in enumerate(batches[args.warmup :]):
        shares.append(positions(b))
        order = losses[r % len(losses) :] + losses[: r % len(losses)]
        for m, (model, opt) in runs.items():
            for x in order:
                times[m][x].append(step(model, opt, x, b))
        log(f"  round {r}: " + "; ".join(m + " " + ", ".join(f"{x} {times[m][x][-1]:.2f}" for x in losses)
                                         for m in methods))  # fmt: skip
    summary = {}
    log(f"\n{args.rounds} interleaved rounds; share of positions projected (mean over batches): "
        + ", ".join(f"{x} {statistics.mean(s[x] for s in shares):.3f}" for x in losses))  # fmt: skip
    log("| method | loss | median s/step | min s | x full (median of per-round ratios) |\n|---|---|---|---|---|")
    for m in methods:
        summary[m] = {}
        for x in losses:
            t = times[m][x]
            ratio = (statistics.median(a / f for a, f in zip(t, times[m]["full"])) if "full" in losses
                     else float("nan"))  # fmt: skip
            summary[m][x] = {"median_s": statistics.median(t), "min_s": min(t), "ratio_to_full": ratio}
            log(f"| {m} | {x} | {statistics.median(t):.3f} | {min(t):.3f} | {ratio:.3f} |")
    out = {"preset": args.preset, "batch_size": p.batch_size, "machine": info, "losses_first_batch": check,
           "times": times, "summary": summary, "position_shares": shares, "argv": argv or sys.argv}  # fmt: skip
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
