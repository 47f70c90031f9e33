"""Which input channels does Taylor choose? Their input magnitude against the layer's and against random channels.

A column delta of an output projection changes the output by ``delta_col * x_j``: under Adam every trained entry moves
by about the learning rate per step, so a channel with a large input ``|x_j|`` moves the residual stream that many
times further. Taylor importance ``|x_j * dL/dx_j|`` grows with ``|x_j|``; if it mostly picks the few outlier
channels (massive activations), the best learning rate of the Taylor channels is lower and the updates sit in
a handful of dimensions. This measures it, from a selection_value.py run folder (its ``taylor_scores_channel`` and
its calibration pairs, the same preset and data):

* the mean ``|x_j|`` (over the calibration tokens) of the Taylor channels at a budget, divided by the layer's mean
  over all its channels; the same for `common.matched.random_columns` (S2FT's choice, seed 0);
* the share of each layer's top-1% channels by ``|x_j|`` that Taylor picked, and the share of all channels picked.

Averaged over the layers of each output projection type. Usage::

    python benchmarks/channel_inputs.py --run benchmarks/selection_value_out/full --budget 0.05
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common.channel_scale import input_magnitudes  # noqa: E402
from common.data import build_pairs, calibration_examples  # noqa: E402
from common.matched import random_columns, unit_matched  # noqa: E402
from common.models import load_model  # noqa: E402
from common.preset import SelectionPreset, translation_preset  # noqa: E402

from neuron_peft.data import calibration_batches  # noqa: E402
from neuron_peft.selection import NeuronSelection  # noqa: E402


def measure(sel, budget: int, mags: dict) -> dict:
    ch = unit_matched(sel, budget)
    agn, spec = ch.chosen_units()
    chosen = {n: sorted(set(agn.get(n, [])) | {c for g in spec.values() for c in g.get(n, [])}) for n in ch.layers}
    rnd = random_columns(ch, 0)
    out: dict = {}
    for n, n_in in zip(sel.layers, sel.unit_counts()):
        kind = n.rsplit(".", 1)[-1]
        m = mags[n]
        k = max(1, m.numel() // 100)
        top = set(m.topk(k).indices.tolist())
        row = out.setdefault(kind, {"taylor": [], "random": [], "top1": [], "picked": [0, 0]})
        if chosen[n]:
            row["taylor"].append(float(m[chosen[n]].mean() / m.mean()))
            row["random"].append(float(m[rnd[n]].mean() / m.mean()))
            row["top1"].append(len(top & set(chosen[n])) / k)
        row["picked"][0] += len(chosen[n])
        row["picked"][1] += n_in
    return {
        kind: {
            "taylor_mean_abs_x_over_layer_mean": sum(r["taylor"]) / len(r["taylor"]),
            "random_mean_abs_x_over_layer_mean": sum(r["random"]) / len(r["random"]),
            "taylor_share_of_top1pct_abs_x_channels": sum(r["top1"]) / len(r["top1"]),
            "share_of_channels_picked": r["picked"][0] / r["picked"][1],
            "layers": len(r["taylor"]),
        }
        for kind, r in out.items()
    }


def main(argv=None, log=print) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a selection_value.py output folder with taylor_scores_channel")
    ap.add_argument("--budget", default="0.05", help="the budget (Taylor neuron_ratio) whose channels to measure")
    args = ap.parse_args(argv)
    run = Path(args.run)
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    known = {f.name for f in fields(SelectionPreset)}
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in results["config"].items() if k in known}
    p = SelectionPreset(**cfg)
    qp = translation_preset(p, p.data_seed)
    data = build_pairs(p, qp)
    torch.set_num_threads(p.threads or torch.get_num_threads())
    model, tok = load_model(qp, data, torch.device("cpu"))
    sel = NeuronSelection.load(run / "taylor_scores_channel")
    calib_ex = calibration_examples(data["train"], p.n_calib)
    batches = calibration_batches(tok, calib_ex, p.calib_batch_size, p.max_length, on_overflow="skip")
    mags = input_magnitudes(model, sel.layers, batches)
    out = measure(sel, results["budgets"][args.budget]["budget_weights"], mags)
    log(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
