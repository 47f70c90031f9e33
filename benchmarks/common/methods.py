"""quality.py's methods: what each name trains, and how it is built on a copy of the pristine base.

The names (``--methods``) and their learning-rate family are in `METHODS` (defined in `method_names`); the
quality runner's docstring says what each compares. Every NeuronSelect method (``ns-*``) is decided from one Taylor
scoring pass on calibration pairs (`run_selection`): the layer ratios they need are re-decided from the same scores,
so the ablations (agnostic rows only, specific rows only, random or largest-norm rows in the same layers and
numbers) differ from ns-0.4 in nothing but what they ablate. interleaved_steps.py builds the same methods to time
them step by step.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING

import torch

from neuron_peft.data import calibration_batches

from .data import calibration_examples
from .method_names import ALL_METHODS, METHODS, NS_RATIOS  # noqa: F401  (runners import them from here too)
from .models import NEURON_KW, exact_regex, lora_config, rows_config

if TYPE_CHECKING:
    from .preset import Preset


def neuron_config(method: str, selections: dict, base, p: Preset):
    """(NeuronSelectConfig, routed) for an ``ns-*`` method, from the shared Taylor scores."""
    from neuron_peft import NeuronSelectConfig
    from neuron_peft.tuner import pick_rows

    sel = selections[NS_RATIOS.get(method, 0.4)]
    if method in NS_RATIOS:
        return sel.to_config(model=base, **NEURON_KW), bool(sel.language_neurons)
    if method == "ns-0.4-agnostic":
        return rows_config(dict(sel.neurons)), False
    if method == "ns-0.4-specific":
        spec = {g: dict(r) for g, r in sel.language_neurons.items()}
        layers = {n for rows in spec.values() for n in rows}
        if not layers:
            raise ValueError("ns-0.4-specific: the selection has no language-specific rows (specific_ratio too low?)")
        return NeuronSelectConfig(target_modules=exact_regex(layers), language_neurons=spec, **NEURON_KW), True
    # random / magnitude rows: the same layers and rows per layer as ns-0.4, all shared, no routing
    how = method.rsplit("-", 1)[1]
    modules = dict(base.named_modules())
    rows = {}
    for name in sel.kept_layers:
        k = len(sel.neurons.get(name, [])) + sum(len(r.get(name, [])) for r in sel.language_neurons.values())
        w = modules[name].weight
        rows[name] = list(range(w.shape[0])) if k == w.shape[0] else pick_rows(w, k, how, p.seed, name)
    return rows_config(rows), False


def build_method(method: str, base, selections: dict, p: Preset):
    """(trainable model, routed) built on a deep copy of the pristine base."""
    from peft import get_peft_model

    model = copy.deepcopy(base)
    torch.manual_seed(p.seed)  # LoRA init
    if method == "full":
        model.requires_grad_(True)
        return model, False
    if method.startswith(("lora", "dora")):
        r = int(method.split("-r")[1])
        return get_peft_model(model, lora_config(r, "all-linear", dora=method.startswith("dora"))), False
    cfg, routed = neuron_config(method, selections, base, p)
    return get_peft_model(model, cfg), routed


def run_selection(base, tok, data, p: Preset, methods, device, log) -> tuple[dict, float]:
    """One Taylor scoring pass; the layer ratios needed by `methods` are re-decided from the same scores."""
    from neuron_peft.selection import select_neurons

    ratios = sorted({NS_RATIOS.get(m, 0.4) for m in methods if METHODS[m][0] == "neuron"})
    if not ratios:
        return {}, 0.0
    calib_ex = calibration_examples(data["train"], p.n_calib)
    calib = calibration_batches(tok, calib_ex, p.calib_batch_size, p.max_length, on_overflow="skip")
    calib = {g: [{k: v.to(device) for k, v in b.items()} for b in bs] for g, bs in calib.items()}
    start = time.perf_counter()
    sel = select_neurons(base, calib, target_modules="all-linear", layer_ratio=ratios[0],
                         neuron_ratio=p.neuron_ratio, specific_ratio=p.specific_ratio, row_selection="layers",
                         progress=False)  # fmt: skip
    seconds = time.perf_counter() - start
    out = {}
    for r in ratios:
        s = copy.copy(sel)
        s.layer_ratio = {part: r for part in sel.layer_ratio}
        s.decide()
        out[r] = s
        n_spec = sum(len(x) for rows in s.language_neurons.values() for x in rows.values())
        n_agn = sum(len(x) for x in s.neurons.values())
        log(f"  selection layer_ratio {r}: {len(s.kept_layers)}/{len(s.layers)} layers, {n_agn} agnostic rows, "
            f"{n_spec} language rows")  # fmt: skip
    log(f"  Taylor scoring: {seconds:.1f} s ({sum(len(v) for v in calib.values())} batches)")
    return out, seconds
