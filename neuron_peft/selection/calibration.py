"""`select_neurons`: one pass over calibration batches per group that scores every targeted neuron and returns
a `NeuronSelection` with the layers and rows chosen (all ranks agree under torch.distributed)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_reduce_sum, is_distributed, needs_lockstep, rank
from .channels import check_unit, unit_layers
from .ranking import (
    GROUP_NORMALIZATIONS,
    SCORE_NORMALIZATIONS,
    _check_choice,
    _check_ratio,
    _check_row_selection,
    _layer_ratios,
)
from .result import NeuronSelection
from .scoring import LAYER_SCORINGS, TOKEN_REDUCTIONS, _Frozen, _score_lockstep, _Scorer, _taylor_layer_scores
from .targets import PARTS, _linear_in, _linear_out, model_part, resolve_target_modules


def _iter_groups(calibration) -> list[tuple[str, Iterable]]:
    if not isinstance(calibration, Mapping) or not calibration:
        raise ValueError("calibration must be a non-empty dict {group_name: iterable of batches}")
    out = []
    for group, batches in calibration.items():
        if not isinstance(group, str) or not group.strip():
            raise ValueError(f"calibration: group name must be a non-empty string, got {group!r}")
        if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
            raise TypeError(f"calibration[{group!r}] must be an iterable of batches (dicts), not a single batch")
        out.append((group, batches))
    return out


def select_neurons(
    model: nn.Module,
    calibration: Mapping[str, Iterable[Mapping[str, torch.Tensor]]],
    target_modules: Union[list[str], str] = "all-linear",
    layer_ratio: Union[float, Mapping[str, float]] = 0.4,
    neuron_ratio: float = 1.0,
    specific_ratio: float = 0.1,
    layer_scoring: str = "taylor",
    reference_model: Optional[nn.Module] = None,
    progress: bool = True,
    *,
    score_normalization: str = "none",
    row_selection: Optional[str] = None,
    weight_ratio: Optional[float] = None,
    token_reduction: str = "mean",
    group_normalization: str = "mean",
    unit: str = "row",
) -> NeuronSelection:
    """Score neurons on calibration data and choose layers, agnostic rows and language-specific rows.

    Args:
        model: a (causal LM) transformers model; it is not modified.
        calibration: ``{group: iterable of batches}``; a batch is a dict with ``input_ids``, ``attention_mask``,
            ``labels`` (-100 on prompt and padding) and any extra model inputs (e.g. ``pixel_values``).
        target_modules: PEFT semantics: list of name suffixes, a regex (full match), or ``"all-linear"``.
        layer_ratio: fraction of targeted layers kept, per model part; a dict ``{"vision", "projector",
            "language"}`` budgets the parts separately.
        neuron_ratio: fraction of rows trained in a kept layer, in (0, 1].
        specific_ratio: fraction of those rows made language-specific, in [0, 1] (0 = all agnostic).
        layer_scoring: ``"taylor"`` (MNAFT) or ``"activation_similarity"`` (NeuMT; needs ``reference_model``,
            a fine-tuned copy with the same module names; it runs forward only).
        progress: show a tqdm bar.

    Ranking options (keyword-only). They exist because
    raw Taylor scores are not comparable across module types: mean ``|a * dL/da|`` depends on a projection's shape
    and on where it writes (on Gemma 3 270M k/v/o/down_proj means are 2-4x those of q/gate/up_proj), so a ranking
    of raw layer means keeps the same few types and never q_proj / gate_proj / up_proj. The protocol in
    ``benchmarks/selection_value.py`` compares them; choose by its dev results.

        score_normalization: ``"none"`` ranks raw scores. ``"module_type_z"`` z-scores them within each module
            type (part + name suffix, e.g. every ``q_proj``), ``"module_type_rank"`` replaces them by their rank
            percentile within the type (0 lowest, 1 highest; robust to the heavy tail of Taylor scores). Used for
            the layer ranking (``row_selection="layers"``) and the row ranking (``"global"``); the rows picked
            inside one layer never change, since both maps keep the order within a type.
        row_selection: ``"layers"`` keeps the top ``layer_ratio`` layers per part, then the top ``neuron_ratio``
            rows of each kept layer (MNAFT). ``"per_layer"`` skips the layer step: the top rows of *every*
            targeted layer, the same share of each layer's rows (``layer_ratio * neuron_ratio`` of them, or
            ``weight_ratio``). ``None`` (default) is ``"per_layer"`` with Taylor layer scoring, the ranking with
            the best dev NLL in ``benchmarks/selection_value.py`` (both budgets, both language sets; its rows also
            beat random rows at the same spread, which the MNAFT layers' did not on en->fr/de/hi/tr), and
            ``"layers"`` with ``layer_scoring="activation_similarity"``, the only choice that uses a layer score.
            ``"global"`` ranks every row of a part together by its (normalised) score and takes rows until the
            weight budget is spent, so a layer gets as many rows as its scores earn; no separate layer step.
        weight_ratio: budget of ``"per_layer"`` / ``"global"`` as a share of the targeted layers' weights (rows x
            inputs), in (0, 1]; default ``layer_ratio * neuron_ratio`` of each part. Lets a benchmark match the
            trainable parameters of another selection exactly (see `NeuronSelection.trained_weights`).
        token_reduction: ``"mean"`` (default) divides each group's summed ``|a * dL/da|`` by its counted tokens,
            ``"sum"`` keeps the sum. With the default group normalisation the two rank identically for text
            layers (every text layer sees the same tokens, and the group normalisation divides out any per-group
            factor); they differ when parts count different positions (vision patches vs text tokens) or with
            ``group_normalization="none"``, where a sum lets the group with more tokens dominate.
        group_normalization: ``"mean"`` (default) divides each group's scores by that group's mean over all
            targeted neurons before the importance mean and the variance split, so a language with a larger loss
            (or more tokens) does not own every specific row; ``"none"`` uses raw scores.
        unit: what is selected (`neuron_peft.selection.channels`). ``"row"`` (default): output rows of every
            targeted layer. ``"channel"``: input columns of the output projections among the targeted layers
            (``o_proj``, ``down_proj``, GPT-2 ``c_proj``), scored by ``|x_j * dL/dx_j|`` of the layer input.
            ``"mlp_neuron"``: MLP blocks only; neuron j (scored as its writer's input channel j) trains
            ``gate_proj`` / ``up_proj`` row j and ``down_proj`` column j (GPT-2: ``c_fc`` row j, ``c_proj`` column
            j). The split, owners and budgets treat a unit as a row (a column costs ``out_features`` weights, an MLP
            neuron its column plus its reader rows); both need ``layer_scoring="taylor"``.
    """
    _check_choice("score_normalization", score_normalization, SCORE_NORMALIZATIONS)
    _check_choice("layer_scoring", layer_scoring, LAYER_SCORINGS)
    if row_selection is None:
        row_selection = "layers" if layer_scoring == "activation_similarity" else "per_layer"
    _check_row_selection(row_selection, layer_scoring)
    _check_choice("token_reduction", token_reduction, TOKEN_REDUCTIONS)
    _check_choice("group_normalization", group_normalization, GROUP_NORMALIZATIONS)
    check_unit(unit, layer_scoring)
    if weight_ratio is not None:
        weight_ratio = _check_ratio("weight_ratio", weight_ratio)
        if row_selection == "layers":
            raise ValueError("weight_ratio sets the budget of row_selection 'per_layer' or 'global'; 'layers' uses "
                             "layer_ratio and neuron_ratio")  # fmt: skip
    if layer_scoring == "activation_similarity" and reference_model is None:
        raise ValueError("layer_scoring='activation_similarity' needs reference_model= (a fine-tuned model)")
    if layer_scoring == "taylor" and reference_model is not None:
        raise ValueError("reference_model is only used with layer_scoring='activation_similarity'")
    neuron_ratio = _check_ratio("neuron_ratio", neuron_ratio)
    specific_ratio = _check_ratio("specific_ratio", specific_ratio, allow_zero=True)
    names, readers = unit_layers(model, resolve_target_modules(model, target_modules), unit)
    parts = [model_part(n) for n in names]
    ratios = _layer_ratios(layer_ratio, sorted(set(parts), key=PARTS.index))
    groups = _iter_groups(calibration)

    scorer = _Scorer(model, names, [g for g, _ in groups], reference_model, inputs=unit != "row")
    # sharded models gather parameters collectively in forward and backward: every rank must run the same passes
    scorer.lockstep = needs_lockstep(model) or (reference_model is not None and needs_lockstep(reference_model))
    progress = progress and rank() == 0
    with _Frozen(model, reference_model), scorer:
        if scorer.lockstep:
            seen = _score_lockstep(scorer, groups, progress)
        else:
            seen = []
            for g, (group, batches) in enumerate(groups):
                total = len(batches) if hasattr(batches, "__len__") else None
                seen.append(0)
                bar = tqdm(batches, total=total, desc=f"scoring {group}", disable=not progress)
                for index, batch in enumerate(bar):
                    scorer.step(g, batch, index)
                    seen[g] += 1
    # several processes (each with its own calibration shard): every rank gets the sums over all shards
    seen = all_reduce_sum([torch.tensor(seen, dtype=torch.int64)])[0].tolist()
    scorer.reduce()
    where = " on any process" if is_distributed() else ""
    for g, (group, _) in enumerate(groups):
        if seen[g] == 0:
            raise ValueError(f"calibration group {group!r} is empty (no batches{where})")
        if scorer.loss_tokens[g] == 0:
            raise ValueError(
                f"calibration group {group!r} has no loss tokens: every label is -100 after the causal shift"
            )

    if token_reduction == "sum":
        neuron_scores = {n: scorer.taylor[i].clone() for i, n in enumerate(names)}
    else:
        counts = scorer.counts.clamp_min(1.0).to(torch.float32)
        neuron_scores = {n: scorer.taylor[i] / counts[i].unsqueeze(1) for i, n in enumerate(names)}
    if layer_scoring == "activation_similarity":
        similarity = (scorer.cos_sum / scorer.counts.clamp_min(1.0)).to(torch.float32)
        layer_scores = 1.0 - similarity
    else:
        layer_scores = _taylor_layer_scores(neuron_scores, names, parts)
    selection = NeuronSelection(
        groups=[g for g, _ in groups],
        layers=names,
        parts=parts,
        out_features=scorer.out_features,
        conv1d=[_linear_out(m) is not None and not isinstance(m, nn.Linear) for m in scorer.modules],
        neuron_scores=neuron_scores,
        layer_scores=layer_scores,
        layer_scoring=layer_scoring,
        layer_ratio=ratios,
        neuron_ratio=neuron_ratio,
        specific_ratio=specific_ratio,
        loss_tokens=dict(zip([g for g, _ in groups], scorer.loss_tokens)),
        in_features=[int(_linear_in(m)) for m in scorer.modules],
        score_normalization=score_normalization,
        row_selection=row_selection,
        weight_ratio=weight_ratio,
        token_reduction=token_reduction,
        group_normalization=group_normalization,
        unit=unit,
        readers=readers,
    )
    selection.decide()
    return selection
