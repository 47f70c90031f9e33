"""How much of the fine-tuning gradient each unit can express at the same parameter count (issue 24: the cause).

LoRA beats every row and column selection measured at matched trainable weights. A first-order reason would be
geometric: the direction the loss wants each weight to move in (its gradient, averaged over many training batches)
may be close to low-rank but not concentrated in a few rows or columns. This script measures that, on the run's
model and training data, for every targeted Linear layer of shape (out, in) and a trainable share ``s`` of it:

* **rank r**: the best rank-r approximation of the layer's gradient G (Eckart-Young: the top r singular values),
  r = s * out * in / (out + in), LoRA's parameter count in that layer;
* **rows (oracle)**: the ``s * out`` rows of G with the largest norms, the best any row selection could pick;
* **columns (oracle)**: the ``s * in`` columns with the largest norms (the channel unit, any criterion);
* **MLP neurons (oracle)**: per MLP block, the neurons j with the largest joint norm of gate/up row j and down column
  j, ``s * intermediate`` of them (the mlp-neuron unit);
* **random rows / columns**: ``s`` of the energy in expectation.

Reported: the share of ``||G||_F^2`` each captures (the squared norm of G projected on what that unit can change),
per module type (mean over layers) and over all layers weighted by their ``||G||^2``. A unit that captures less of
the gradient moves the loss less per step of the same size, whatever the optimiser; this is a statement about the
first-order direction at the starting point, not a prediction of where training ends (Adam rescales coordinates,
and the gradient turns as the model moves). ``--batches`` sets how many training batches the mean gradient is
taken over; the mean over fewer batches (1, 2, 4, ... of them) is reported too, since a noisier gradient spreads its
energy differently, and a conclusion should not hang on the count.

Usage::

    python benchmarks/gradient_geometry.py --preset long --batches 16 --json out.json
    python benchmarks/gradient_geometry.py --preset tiny --batches 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import re
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
from common.matched import linear_sizes  # noqa: E402
from common.models import model_for_training_batches  # noqa: E402
from common.preset import SELECTION_PRESETS  # noqa: E402
from common.training import train_batches  # noqa: E402

from neuron_peft.data import encode_examples  # noqa: E402
from neuron_peft.fileio import atomic_write_text  # noqa: E402
from neuron_peft.selection import resolve_target_modules  # noqa: E402
from neuron_peft.training import labelled_logits_loss  # noqa: E402


def captured_shares(g: torch.Tensor, share: float) -> dict[str, float]:
    """Share of ``||g||_F^2`` that the best rank-r approximation, the top rows and the top columns hold at ``share``
    of g's entries (r = share * out * in / (out + in), at least 1; rows share * out, columns share * in, at least 1)."""
    g = g.double()
    out_f, in_f = g.shape
    total = float((g * g).sum())
    if total == 0.0:
        raise ValueError("the gradient of a targeted layer is zero: no training signal reaches it")
    r = max(1, round(share * out_f * in_f / (out_f + in_f)))
    sv = torch.linalg.svdvals(g)
    rows = (g * g).sum(1).sort(descending=True).values
    cols = (g * g).sum(0).sort(descending=True).values
    k_rows, k_cols = max(1, round(share * out_f)), max(1, round(share * in_f))
    return {"rank": float((sv[:r] ** 2).sum()) / total, "rows": float(rows[:k_rows].sum()) / total,
            "columns": float(cols[:k_cols].sum()) / total, "random": min(1.0, share),
            "r": r, "k_rows": k_rows, "k_cols": k_cols, "energy": total}  # fmt: skip


def mlp_neuron_share(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, share: float) -> float:
    """Share of the MLP block's gradient energy (gate, up and down together) held by its top ``share`` of neurons,
    neuron j owning gate row j, up row j and down column j."""
    per = (gate.double() ** 2).sum(1) + (up.double() ** 2).sum(1) + (down.double() ** 2).sum(0)
    k = max(1, round(share * per.numel()))
    return float(per.sort(descending=True).values[:k].sum() / per.sum())


def module_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def summarise(layers: dict[str, dict], mlp: dict[str, float]) -> dict:
    """Per module type: the mean share over its layers of each unit; ``all``: shares weighted by layer energy."""
    out: dict[str, dict] = {}
    for t in sorted({module_type(n) for n in layers}):
        ls = [v for n, v in layers.items() if module_type(n) == t]
        out[t] = {u: statistics.mean(v[u] for v in ls) for u in ("rank", "rows", "columns", "random")}
        out[t]["layers"] = len(ls)
        out[t]["r"] = statistics.median(v["r"] for v in ls)
    e = sum(v["energy"] for v in layers.values())
    out["all"] = {
        u: sum(v[u] * v["energy"] for v in layers.values()) / e for u in ("rank", "rows", "columns", "random")
    }
    out["all"]["layers"] = len(layers)
    if mlp:
        out["all"]["mlp_neurons"] = statistics.mean(mlp.values())
    return out


def mean_gradients(
    model, batches, names: list[str], at=(), on_mean=None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The mean over ``batches`` of each named Linear weight's gradient of the labelled-position loss; after each
    count of batches in ``at`` (below the total) ``on_mean(count, mean so far)`` is called."""
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    acc = {n: torch.zeros_like(modules[n].weight, dtype=torch.float32) for n in names}
    losses = []
    for b in batches:
        loss = labelled_logits_loss(model, b)
        if not torch.isfinite(loss):
            raise ValueError(f"non-finite training loss {float(loss)} while taking gradients")
        loss.backward()
        losses.append(float(loss.detach()))
        for n in names:
            acc[n] += modules[n].weight.grad.float()
            modules[n].weight.grad = None
        if on_mean is not None and len(losses) in at and len(losses) < len(batches):
            on_mean(len(losses), {n: v / len(losses) for n, v in acc.items()})
    return {n: v / len(batches) for n, v in acc.items()}, losses


def table(summary: dict, share: float) -> list[str]:
    lines = ["| module (layers) | rank r (median r) | rows (oracle) | columns (oracle) | random | rank ÷ rows |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for t, v in summary.items():
        r = f"{v['rank']:.3f}" + (f" (r {v['r']:g})" if "r" in v else "")
        lines.append(f"| {t} ({v['layers']}) | {r} | {v['rows']:.3f} | {v['columns']:.3f} | {v['random']:.3f} | "
                     f"{v['rank'] / v['rows']:.2f} |")  # fmt: skip
    if "mlp_neurons" in summary.get("all", {}):
        lines.append(f"\nMLP neurons (oracle; gate/up row j + down column j), mean over blocks: "
                     f"{summary['all']['mlp_neurons']:.3f} of each block's energy at share {share:g}.")  # fmt: skip
    return lines


def main(argv=None, log: Callable[[str], None] = print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(SELECTION_PRESETS), default="long")
    ap.add_argument("--batches", type=int, default=16, help="training batches the mean gradient is taken over")
    ap.add_argument("--shares", default="0.018,0.09", help="trainable shares of each layer (comma list, in (0, 1])")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the result here (a new file unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="let --json replace an existing file")
    args = ap.parse_args(argv)
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise SystemExit(f"--json {args.json} exists; pass --overwrite to replace it (refused before any work)")
    try:
        shares = [float(x) for x in args.shares.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--shares {args.shares!r}: expected a comma list of numbers") from None
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise SystemExit(f"--shares {args.shares!r}: every share must lie in (0, 1]")
    if args.batches < 1:
        raise SystemExit("--batches must be at least 1")
    p, device, data, base, tok = model_for_training_batches(args.preset, args.batch_size, args.threads)
    info = machine_info(device)
    names = resolve_target_modules(base, "all-linear")
    sizes = linear_sizes(base, names)
    features = encode_examples(tok, data["train"], p.max_length, on_overflow="skip")
    loader = train_batches(features, tok, p, routed=False)
    batches = [b for _, b in zip(range(args.batches), loader)]
    log(f"# gradient geometry ({args.preset}): {len(names)} linear layers, mean gradient over {len(batches)} "
        f"batches of {p.batch_size}; {info['cpu']} x{info['nproc']}, {info['torch_threads']} threads")  # fmt: skip
    fewer: dict[str, dict] = {}  # the weighted shares of the mean over fewer batches: how much is batch noise

    def at_fewer(count, grads):
        fewer[str(count)] = {str(s): summarise({n: captured_shares(grads[n], s) for n in names}, {})["all"]
                             for s in shares}  # fmt: skip

    counts = [c for c in (1, 2, 4, 8, 16, 32, 64) if c < len(batches)]
    t0 = time.perf_counter()
    grads, losses = mean_gradients(base, batches, names, at=counts, on_mean=at_fewer)
    t_grad = time.perf_counter() - t0
    blocks: dict[str, dict[str, str]] = {}
    for n in names:
        m = re.match(r"(.*)\.(gate_proj|up_proj|down_proj)$", n)
        if m:
            blocks.setdefault(m.group(1), {})[m.group(2)] = n
    blocks = {k: v for k, v in blocks.items() if len(v) == 3}
    result = {"preset": args.preset, "batches": len(batches), "batch_size": p.batch_size, "losses": losses,
              "grad_seconds": t_grad, "machine": info, "argv": argv or sys.argv, "shares": {}}  # fmt: skip
    for s in shares:
        layers = {n: captured_shares(grads[n], s) for n in names}
        mlp = {k: mlp_neuron_share(grads[v["gate_proj"]], grads[v["up_proj"]], grads[v["down_proj"]], s)
               for k, v in blocks.items()}  # fmt: skip
        summary = summarise(layers, mlp)
        result["shares"][str(s)] = {"summary": summary, "layers": layers, "mlp_blocks": mlp}
        log(f"\nShare of the mean gradient's squared norm each unit can hold, at {100 * s:g}% of every layer's "
            f"weights (sizes {sorted(set(sizes.values()))}):\n")  # fmt: skip
        for line in table(summary, s):
            log(line)
    if fewer:
        fewer[str(len(batches))] = {str(s): result["shares"][str(s)]["summary"]["all"] for s in shares}
        result["by_batches"] = fewer
        log("\nAll layers (energy-weighted) against the number of batches averaged (fewer = noisier gradient):\n")
        log("| batches | " + " | ".join(f"rank @{s:g} | rows @{s:g} | columns @{s:g}" for s in shares) + " |")
        log("|---|" + "---|---|---|" * len(shares))
        for c, v in fewer.items():
            log(f"| {c} | " + " | ".join(f"{v[str(s)]['rank']:.3f} | {v[str(s)]['rows']:.3f} | "
                                         f"{v[str(s)]['columns']:.3f}" for s in shares) + " |")  # fmt: skip
    log(f"\n(gradients: {t_grad:.0f} s; mean training loss over the batches {statistics.mean(losses):.3f})")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
