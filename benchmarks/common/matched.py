"""selection_value.py's methods, each at the trainable-weight budget of a Taylor selection.

For a budget (a Taylor ``neuron_ratio`` at ``LAYER_RATIO`` 0.4, ``SPECIFIC_RATIO`` 0.1, routed) the default Taylor
selection fixes the trained weights P (`budget_selections`); every other row method is decided from the same
scores to train P weights too (rows x inputs, per-layer rounding aside): its ranking variants re-decide the
selection, random and magnitude rows take the same share of rows (random-layers: the same count in Taylor's
layers), LoRA/DoRA use the all-linear rank whose parameter count is closest to P (`lora_rank`). Full fine-tuning
and fixed-rank LoRA/DoRA ("lora-r16", `fixed_rank`) are budget-free (`budget_free`). `METHODS` names them
(``--methods``) with their learning-rate family; `build` puts a method on a deep copy of the pristine base; `score_by_type`, `type_counts` and `selection_record` describe where a selection's
scores and rows sit, by module type, for the report.
"""

from __future__ import annotations

import copy
import re
from typing import Optional

import torch

from .models import NEURON_KW, exact_regex, lora_config, rows_config

LAYER_RATIO = 0.4
SPECIFIC_RATIO = 0.1

# name -> (LR family, description)
METHODS = {
    "zero-shot": ("none", "base model, no training"),
    "taylor": ("neuron", "Taylor (MNAFT): top layer_ratio layers by raw Taylor layer score, top rows, routed"),
    "taylor-agnostic": ("neuron", "the same rows as taylor, all shared (no language-specific rows, no routing)"),
    "taylor-type-rank": ("neuron", "layers ranked by Taylor score rank-normalised within module type, routed"),
    "taylor-per-layer": ("neuron", "Taylor's top rows in every targeted layer, same share of each, routed"),
    # the share of language-specific rows (interference preset): the same rows as taylor-per-layer, split otherwise
    "taylor-per-layer-s30": ("neuron", "taylor-per-layer's rows, 30% of them language-specific (not 10%), routed"),
    "taylor-per-layer-agnostic": ("neuron", "taylor-per-layer's rows, all shared (specific_ratio 0), unrouted"),
    "taylor-global-rank": ("neuron", "global top rows by Taylor score rank-normalised within module type, routed"),
    "taylor-global-z": ("neuron", "global top rows by Taylor score z-scored within module type, routed"),
    "taylor-raw-groups": ("neuron", "as taylor, but languages' scores not normalised before mean and variance split"),
    "neumt": ("neuron", "NeuMT: layers by activation change vs this run's full fine-tune, Taylor rows, routed"),
    "random-layers": ("neuron", "random rows in taylor's layers, same count per layer, unrouted"),
    "random-all": ("neuron", "random rows, the same share of every targeted layer, unrouted"),
    "magnitude": ("neuron", "largest-norm weight rows, the same share of every targeted layer, unrouted"),
    "lora": ("lora", "LoRA all-linear, rank matched to the budget, alpha = 2r"),
    "dora": ("lora", "DoRA all-linear, rank matched to the budget, alpha = 2r"),
    "full": ("full", "full fine-tuning, every parameter (budget-free; shown in every budget)"),
    # fixed-rank LoRA / DoRA (budget-free like full; any "lora-r<N>" / "dora-r<N>" works, see `method_info`)
    "lora-r8": ("lora", "LoRA all-linear, rank 8, alpha = 2r (fixed rank, budget-free)"),
    "lora-r16": ("lora", "LoRA all-linear, rank 16, alpha = 2r (fixed rank, budget-free)"),
    "lora-r64": ("lora", "LoRA all-linear, rank 64, alpha = 2r (fixed rank, budget-free)"),
    "dora-best": ("lora", "DoRA at the rank of the fixed-rank LoRA with the best dev NLL (run after them)"),
    # column units (issue 26): input channels of the output projections (o_proj, down_proj) or whole MLP neurons,
    # at the same trained weights; their own LR family, since columns write straight into the residual stream
    "channel": ("column", "Taylor input channels |x dL/dx| of o_proj/down_proj, same share of each, routed"),
    "channel-random": ("column", "random input channels, channel's count per output projection, unrouted (S2FT)"),
    "mlp-neuron": ("column", "Taylor MLP neurons: gate/up row j + down_proj column j, same share per block, routed"),
    "channel-xnorm": (
        "column",
        "input channels by E|x dL/dx| / E|x| (Taylor without the input scale), channel's "
        "share of each output projection, routed",
    ),
}
_FIXED_RANK = re.compile(r"^(lora|dora)-r(\d+)$")


def fixed_rank(method: str) -> Optional[int]:
    """The rank of a fixed-rank LoRA/DoRA method ("lora-r16" -> 16), else None."""
    m = _FIXED_RANK.match(method)
    return int(m.group(2)) if m else None


def budget_free(method: str) -> bool:
    """Methods that do not depend on the budget (trained once, listed in every budget): full FT, fixed-rank LoRA."""
    return method in ("full", "dora-best") or fixed_rank(method) is not None


def method_info(method: str) -> tuple[str, str]:
    """(LR family, description) of a method, also of a fixed rank not listed in `METHODS` ("dora-r32")."""
    if method in METHODS:
        return METHODS[method]
    r = fixed_rank(method)
    if r is None:
        raise KeyError(method)
    kind = method.split("-")[0]
    return "lora", f"{kind.upper() if kind == 'lora' else 'DoRA'} all-linear, rank {r}, alpha = 2r (fixed rank)"


def linear_sizes(model, names) -> dict[str, tuple[int, int]]:
    modules = dict(model.named_modules())
    return {n: (modules[n].out_features, modules[n].in_features) for n in names}


def lora_rank(budget_weights: int, sizes: dict) -> int:
    """The LoRA rank whose all-linear parameter count r * sum(in + out) is closest to the budget."""
    per_rank = sum(o + i for o, i in sizes.values())
    return max(1, int(round(budget_weights / per_rank)))


# method -> the `select_neurons(unit=...)` scores it is decided from
UNIT_OF = {"channel": "channel", "channel-random": "channel", "mlp-neuron": "mlp_neuron", "channel-xnorm": "channel"}
# methods decided from scores derived from their unit's (key of ``unit_sels``: the method's own name)
DERIVED_UNIT_METHODS = ("channel-xnorm",)


def budget_selections(base_sel, nr: float, sizes: dict, reference_sel=None, unit_sels=None) -> dict:
    """Every row-selection method's NeuronSelection at the budget fixed by Taylor at (0.4, nr); with ``unit_sels``
    (``{unit: NeuronSelection}`` scored with that unit) also the column-unit methods at the same weights."""

    def variant(src, **kw):
        s = copy.copy(src)
        for k, v in kw.items():
            setattr(s, k, v)
        s.decide()
        return s

    ratio = {p: LAYER_RATIO for p in base_sel.layer_ratio}
    taylor = variant(base_sel, layer_ratio=ratio, neuron_ratio=nr, specific_ratio=SPECIFIC_RATIO,
                     row_selection="layers", score_normalization="none", weight_ratio=None)  # fmt: skip
    budget = taylor.trained_weights()
    total = sum(o * i for o, i in sizes.values())
    share = budget / total

    def layers_matched(src, **kw):
        """Layers mode with another layer ranking: the neuron_ratio that spends the same weights in its layers."""
        s = variant(src, layer_ratio=ratio, neuron_ratio=nr, specific_ratio=SPECIFIC_RATIO, row_selection="layers",
                    weight_ratio=None, **kw)  # fmt: skip
        kept_w = sum(sizes[n][0] * sizes[n][1] for n in s.kept_layers)
        return variant(s, neuron_ratio=min(1.0, budget / kept_w))

    out = {
        "taylor": taylor,
        "taylor-agnostic": variant(taylor, specific_ratio=0.0),
        "taylor-type-rank": layers_matched(base_sel, score_normalization="module_type_rank"),
        "taylor-per-layer": variant(taylor, row_selection="per_layer", weight_ratio=share),
        # the same rows (per-layer top rows by importance), split 3:7 or 0:10 specific:shared: the split never
        # changes which rows train, so these train exactly taylor-per-layer's weights
        "taylor-per-layer-s30": variant(taylor, row_selection="per_layer", weight_ratio=share, specific_ratio=0.3),
        "taylor-per-layer-agnostic": variant(taylor, row_selection="per_layer", weight_ratio=share, specific_ratio=0.0),
        "taylor-global-rank": variant(
            taylor, row_selection="global", weight_ratio=share, score_normalization="module_type_rank"
        ),  # fmt: skip
        "taylor-global-z": variant(
            taylor, row_selection="global", weight_ratio=share, score_normalization="module_type_z"
        ),  # fmt: skip
    }
    # per-language normalisation before the importance mean and the variance split, or raw scores (issue 14 §2)
    out["taylor-raw-groups"] = layers_matched(base_sel, score_normalization="none", group_normalization="none")
    if reference_sel is not None:
        out["neumt"] = layers_matched(reference_sel, score_normalization="none")
    for method, unit in UNIT_OF.items():
        key = method if method in DERIVED_UNIT_METHODS else unit
        if unit_sels and key in unit_sels and method != "channel-random":
            out[method] = unit_matched(unit_sels[key], budget)
    return {"budget": budget, "share": share, "selections": out}


def unit_matched(sel, budget: int):
    """A column-unit selection (`select_neurons(unit=...)`) re-decided per layer to train ``budget`` weights: the
    same share of every scored layer's units (rounding per layer aside), 1:9 language-specific, routed."""
    s = copy.copy(sel)
    total = sum(n * c for n, c in zip(s.unit_counts(), s.unit_costs()))
    s.layer_ratio = {p: LAYER_RATIO for p in s.layer_ratio}
    s.neuron_ratio, s.specific_ratio, s.row_selection = 1.0, SPECIFIC_RATIO, "per_layer"
    s.score_normalization, s.weight_ratio = "none", min(1.0, budget / total)
    s.decide()
    return s


def random_columns(sel, seed: int) -> dict[str, list[int]]:
    """S2FT's choice: per output projection as many random input channels as ``sel`` (channel) trains there."""
    agnostic, specific = sel.chosen_units()
    counts = {n: len(agnostic.get(n, [])) + sum(len(g.get(n, [])) for g in specific.values()) for n in sel.layers}
    out = {}
    for i, (n, n_in) in enumerate(zip(sel.layers, sel.unit_counts())):
        if counts[n]:
            gen = torch.Generator().manual_seed(seed * 100_003 + i)
            out[n] = sorted(torch.randperm(n_in, generator=gen)[: counts[n]].tolist())
    return out


def build(method: str, base, bsel: dict, sizes: dict, seed: int):
    """(trainable model, routed) on a deep copy of the pristine base."""
    from peft import get_peft_model

    from neuron_peft.tuner import pick_rows

    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    if method == "full":
        model.requires_grad_(True)
        return model, False
    if method in ("lora", "dora") or fixed_rank(method) is not None:
        r = fixed_rank(method) or lora_rank(bsel["budget"], sizes)
        return get_peft_model(model, lora_config(r, sorted(sizes), dora=method.startswith("dora"))), False
    sels = bsel["selections"]
    if method == "channel-random":
        from neuron_peft import NeuronSelectConfig

        cols = random_columns(sels["channel"], seed)
        cfg = NeuronSelectConfig(target_modules=exact_regex(cols), columns=cols, **NEURON_KW)
        return get_peft_model(model, cfg), False
    if method in sels:
        sel = sels[method]
        cfg = sel.to_config(model=base, **NEURON_KW)
        routed = bool(cfg.language_neurons or cfg.language_columns)
        if routed:  # a group that owns no row or column must still be a known routing group
            cfg = replace_groups(cfg, sel.groups)
        return get_peft_model(model, cfg), routed
    modules = dict(base.named_modules())
    if method == "random-layers":
        t = sels["taylor"]
        counts = {n: len(t.neurons.get(n, [])) + sum(len(r.get(n, [])) for r in t.language_neurons.values())
                  for n in t.kept_layers}  # fmt: skip
    elif method in ("random-all", "magnitude"):
        counts = {n: min(o, max(1, int(round(bsel["share"] * o)))) for n, (o, _) in sizes.items()}
    else:
        raise ValueError(f"unknown method {method!r}")
    how = "magnitude" if method == "magnitude" else "random"
    rows = {n: pick_rows(modules[n].weight, k, how, seed, n) for n, k in counts.items()}
    return get_peft_model(model, rows_config(rows)), False


def replace_groups(cfg, groups):
    """The config with every calibration group present in ``language_neurons`` (empty when it owns no row), or in
    ``language_columns`` when the config routes columns only."""
    from neuron_peft import NeuronSelectConfig

    field = "language_neurons" if cfg.language_neurons or not cfg.language_columns else "language_columns"
    language = {g: dict((getattr(cfg, field) or {}).get(g, {})) for g in groups}
    fields = {k: v for k, v in cfg.to_dict().items() if k in NeuronSelectConfig.__dataclass_fields__}
    fields[field] = language
    return NeuronSelectConfig(**{k: v for k, v in fields.items() if k not in ("peft_type", "auto_mapping")})


def score_by_type(sel) -> dict:
    """Mean (over the layers of a type) of the layer's mean group-normalised neuron score: shows how far raw scores
    of different projection types sit apart, which is what the raw layer ranking compares."""
    from neuron_peft.selection import module_type

    norm = sel.normalised_scores()
    acc: dict[str, list[float]] = {}
    for n, p in zip(sel.layers, sel.parts):
        acc.setdefault(module_type(n, p).split(":")[1], []).append(float(norm[n].mean()))
    return {t: round(sum(v) / len(v), 4) for t, v in acc.items()}


def score_concentration(sel, shares=(0.05, 0.25)) -> dict:
    """Per module type, the share of a layer's Taylor score mass (group-normalised, averaged over groups) held by its
    top ``share`` rows, averaged over the layers of the type. Near ``share`` itself the scores are flat and the top
    rows are hardly different from random ones; far above it, a few rows carry most of the importance."""
    from neuron_peft.selection import module_type

    norm = sel.normalised_scores()
    acc: dict[str, dict[float, list[float]]] = {}
    for n, p in zip(sel.layers, sel.parts):
        v = norm[n].mean(dim=0).sort(descending=True).values
        per = acc.setdefault(module_type(n, p).split(":")[1], {f: [] for f in shares})
        for f in shares:
            per[f].append(float(v[: max(1, round(f * v.numel()))].sum() / v.sum()))
    return {t: {f"top{round(100 * f)}%": round(sum(x) / len(x), 3) for f, x in d.items()} for t, d in acc.items()}


def selection_record(sel) -> dict:
    """What results.json keeps of a selection: its layers, trained weights and selected rows per module type."""
    return {"kept_layers": len(sel.kept_layers), "weights": sel.trained_weights(), "types": type_counts(sel)}


def type_counts(sel) -> dict:
    """Selected units per scored module type (q_proj, gate_proj, ...): rows, or columns / MLP neurons (counted at
    their writer, down_proj / o_proj) for the column units."""
    from neuron_peft.selection import module_type

    agnostic, specific = sel.chosen_units()
    out: dict[str, int] = {}
    for n, p in zip(sel.layers, sel.parts):
        k = len(agnostic.get(n, [])) + sum(len(r.get(n, [])) for r in specific.values())
        if k:
            t = module_type(n, p).split(":")[1]
            out[t] = out.get(t, 0) + k
    return out
