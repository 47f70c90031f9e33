"""Input magnitude of an output projection's channels, and the Taylor channel scores with that magnitude divided out.

Why: a column delta changes the output by ``delta_col * x_j``, and under Adam every trained entry moves by about the
learning rate per step, so a channel with a large ``|x_j|`` moves the residual stream that many times further.
Taylor importance ``|x_j * dL/dx_j|`` grows with ``|x_j|``: on Gemma 3 270M it picks channels with 3-4x the
layer's mean input magnitude (benchmarks/channel_inputs.py), and those columns lose to random ones. The
scale-free score ``E|x_j dL/dx_j| / E|x_j|`` keeps how much the loss reacts to the channel and drops how large it
is; `scale_free` makes a channel selection ranked by it (method ``channel-xnorm`` of selection_value.py).
"""

from __future__ import annotations

import copy

import torch


def input_magnitudes(model, layers, batches) -> dict[str, torch.Tensor]:
    """Per layer, mean |x_j| of its input over every token of the calibration batches (padding included)."""
    sums, count, modules = {}, {}, dict(model.named_modules())

    def hook(name):
        def f(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.sum(0)
            count[name] = count.get(name, 0) + x.shape[0]

        return f

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            for bs in batches.values():
                for b in bs:
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if n not in sums]
    if missing:
        raise ValueError(f"no calibration input reached {missing[:3]}: the batches are empty or skip these layers")
    return {n: sums[n] / count[n] for n in layers}


def scale_free(sel, mags: dict[str, torch.Tensor]):
    """A copy of the channel selection ``sel`` whose per-group channel scores are divided by each channel's mean
    input magnitude (a channel that never fires, ``|x_j| = 0``, scores 0). Nothing is decided here: the caller
    re-decides the copy at its budget, as for every other selection."""
    if sel.unit != "channel":
        raise ValueError(f"scale_free divides input-channel scores; this selection's unit is {sel.unit!r}")
    out = copy.copy(sel)
    scores = {}
    for name, s in sel.neuron_scores.items():
        m = mags[name].to(s.dtype)
        if m.shape[-1] != s.shape[-1]:
            raise ValueError(f"{name}: {m.shape[-1]} input magnitudes for {s.shape[-1]} channel scores")
        scores[name] = torch.where(m > 0, s / m.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    out.neuron_scores = scores
    return out
