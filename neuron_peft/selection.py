"""Calibration-driven neuron selection (MNAFT / LLaVA-NeuMT): which layers and rows train, and who owns them.

`select_neurons` streams calibration batches per group (a language pair or task) through the model once and
scores every output neuron of every targeted Linear by first-order Taylor importance
``mean_tokens |a_i * dL/da_i|``. Layers are ranked (Taylor layer mean, or activation similarity to a fine-tuned
reference model) and the top ``layer_ratio`` kept per model part; inside a kept layer the most important
``neuron_ratio`` rows train, and the ``specific_ratio`` of those whose importance varies most across groups become
language-specific rows owned by the group that needs them most. The result, `NeuronSelection`, turns into a
`NeuronSelectConfig` with `to_config()`.

Conventions (documented here because they change the numbers):

* Loss tokens. For a causal LM the logits at position t predict ``labels[:, t+1]``, so an activation position t
  counts iff ``labels[:, t+1] != -100`` (the positions that produce a loss term; the last position never does).
  Outputs whose leading dims are not (batch, seq) — e.g. a vision tower's patches — count every position.
* Gradient scale. Gradients are of the *summed* token loss (the model's mean loss times its number of loss
  tokens), so a score does not depend on how the data is batched.
* The model runs in eval mode (no dropout) with all parameters frozen; gradients are taken w.r.t. the layer
  outputs only (`torch.autograd.grad`), so no parameter changes and no ``.grad`` is written. Training flags and
  ``requires_grad`` flags are restored afterwards.
* Taylor layer score (MNAFT eq. 9-11): per group the mean neuron score of the layer, divided by the sum of these
  means over the layers of its part, so each group's layer scores sum to 1 per part; the ranking uses the mean over
  groups. Activation-similarity layer score (NeuMT eq. 3): ``1 - mean cosine(base output, reference output)``
  over the counted tokens; lower similarity = more important.
* Neuron split. Each group's neuron scores are divided by that group's mean over all targeted neurons, so a group
  with a larger loss does not dominate. Importance = mean of the normalised scores over groups; variance =
  population variance over groups; owner = argmax group.
* Ranking options (`select_neurons` keyword arguments, stored on the selection so `decide` repeats them): raw Taylor
  means differ by module type (k/v/o/down_proj sit above q/gate/up_proj), so a raw layer ranking keeps the same
  types; ``score_normalization`` ranks within module type, ``row_selection`` replaces the layer step by the top rows
  of every layer (``"per_layer"``) or one global ranking under a weight budget (``"global"``, ``weight_ratio``).
  The defaults are the MNAFT ranking above; ``benchmarks/selection_value.py`` measures the alternatives.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Optional, Union

import torch
from torch import nn

from .errors import AdapterMismatchError

PARTS = ("vision", "projector", "language")
_PROJECTOR_KEYS = ("multi_modal_projector", "mm_projector", "merger", "connector", "qformer", "language_projection")
_VISION_KEYS = ("vision_tower", "vision_model", "visual")
LAYER_SCORINGS = ("taylor", "activation_similarity")
SCORE_NORMALIZATIONS = ("none", "module_type_z", "module_type_rank")
ROW_SELECTIONS = ("layers", "per_layer", "global")
TOKEN_REDUCTIONS = ("mean", "sum")
GROUP_NORMALIZATIONS = ("mean", "none")
_JSON_NAME = "neuron_selection.json"
_TENSORS_NAME = "neuron_selection.safetensors"
_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------- helpers
def model_part(name: str) -> str:
    """The model part a module belongs to, by name; projector first (Qwen2-VL's ``visual.merger``)."""
    parts = name.lower().split(".")
    if any(k in p for p in parts for k in _PROJECTOR_KEYS):
        return "projector"
    if any(k in p for p in parts for k in _VISION_KEYS):
        return "vision"
    return "language"


def _linear_out(module: nn.Module) -> Optional[int]:
    """Output rows of a Linear-like module (nn.Linear, transformers Conv1D), else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return int(getattr(module.weight, "ds_shape", module.weight.shape)[1])  # ZeRO-3: the unpartitioned shape
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    return None


def _linear_in(module: nn.Module) -> Optional[int]:
    """Input features of a Linear-like module (the weights one output row holds), else None."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, Conv1D):
        return int(getattr(module.weight, "ds_shape", module.weight.shape)[0])
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    return None


def module_type(name: str, part: Optional[str] = None) -> str:
    """The module type a layer is normalised within: its part and last name component ("language:q_proj").

    Scores of different projection types live on different scales (see `select_neurons`, ``score_normalization``);
    layers of one type in different blocks are what a scale-free ranking compares."""
    return f"{part or model_part(name)}:{name.rsplit('.', 1)[-1]}"


def _normalize_within(values: torch.Tensor, keys: list, how: str) -> torch.Tensor:
    """`values` (N,) normalised within each key's members: z-score or rank percentile (ties share their mean rank).

    z: (x - mean) / population std of the key's members (0 where the std is 0, e.g. a single member).
    rank: 0 for the lowest member, 1 for the highest, evenly spaced (a single member gets 0.5)."""
    if how == "none":
        return values.clone()
    values = values.to(torch.float64)
    out = torch.zeros_like(values)
    index: dict = {}
    for i, k in enumerate(keys):
        index.setdefault(k, []).append(i)
    for members in index.values():
        idx = torch.tensor(members)
        x = values[idx]
        if how == "module_type_z":
            std = x.std(unbiased=False)
            out[idx] = (x - x.mean()) / std if std > 0 else torch.zeros_like(x)
        elif how == "module_type_rank":
            n = x.numel()
            if n == 1:
                out[idx] = 0.5
                continue
            order = torch.argsort(x, stable=True)
            ranks = torch.empty(n, dtype=torch.float64)
            ranks[order] = torch.arange(n, dtype=torch.float64)
            # ties: every member of a run of equal values gets the run's mean rank
            uniq, inverse = torch.unique(x, return_inverse=True)
            if uniq.numel() < n:
                sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
                counts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(
                    0, inverse, torch.ones(n, dtype=torch.float64)
                )
                ranks = (sums / counts)[inverse]
            out[idx] = ranks / (n - 1)
        else:
            raise ValueError(f"score_normalization must be one of {SCORE_NORMALIZATIONS}, got {how!r}")
    return out


def _check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def resolve_target_modules(model: nn.Module, target_modules: Union[list[str], str, None]) -> list[str]:
    """Full names of the Linear modules `target_modules` selects, with PEFT's own matching rules."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    if target_modules is None:
        raise ValueError("target_modules is required (list of name suffixes, a regex, or 'all-linear')")
    spec = SimpleNamespace(
        target_modules=set(target_modules) if isinstance(target_modules, (list, tuple, set)) else target_modules,
        exclude_modules=None, modules_to_save=None, target_parameters=None,
        layers_to_transform=None, layers_pattern=None, task_type=None,
    )  # fmt: skip
    spec = _maybe_include_all_linear_layers(spec, model)
    names = []
    for name, module in model.named_modules():
        if not name or not check_target_module_exists(spec, name):
            continue
        if _linear_out(module) is None:
            raise TypeError(
                f"target_modules matches {name!r} ({type(module).__name__}), which is not a Linear layer; "
                "neuron selection scores Linear / Conv1D outputs only"
            )
        names.append(name)
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matches no Linear module of the model")
    return names


def _check_ratio(name: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return value


def _layer_ratios(layer_ratio, parts_present: list[str]) -> dict[str, float]:
    if isinstance(layer_ratio, Mapping):
        unknown = sorted(set(layer_ratio) - set(PARTS))
        if unknown:
            raise ValueError(f"layer_ratio: unknown part(s) {unknown}; parts are {list(PARTS)}")
        missing = [p for p in parts_present if p not in layer_ratio]
        if missing:
            raise ValueError(f"layer_ratio has no entry for part(s) {missing} present among the targeted layers")
        return {p: _check_ratio(f"layer_ratio[{p!r}]", layer_ratio[p]) for p in parts_present}
    value = _check_ratio("layer_ratio", layer_ratio)
    return dict.fromkeys(parts_present, value)


def _n_of(ratio: float, n: int) -> int:
    """round(ratio * n), at least 1 (a kept layer or a layer's rows are never empty)."""
    return min(n, max(1, int(round(ratio * n))))


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if hasattr(p, "ds_id") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())  # ZeRO-3 (partitions may be offloaded)
        return p.device
    return torch.device("cpu")


def _to_device(batch: Mapping, device: torch.device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _loss_mask(labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq) bool: positions t with labels[:, t+1] != -100, i.e. the positions that produce a loss term."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _position_weights(
    out: torch.Tensor, mask: torch.Tensor, per_token: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows of `out` as (N, out_features), fp32 weights (N,)): the loss mask for (batch, seq) outputs, else ones.

    `per_token=False` (vision tower / projector layers) counts every position even when the patch count happens to
    equal the text length."""
    flat = out.reshape(-1, out.shape[-1])
    if per_token and out.dim() == 3 and tuple(out.shape[:2]) == tuple(mask.shape):
        w = mask.reshape(-1).to(torch.float32)
    else:
        w = torch.ones(flat.shape[0], dtype=torch.float32, device=out.device)
    return flat, w.to(out.device)


class _Frozen:
    """Context: eval mode, every parameter frozen; restores both exactly (per module / per parameter)."""

    def __init__(self, *models: Optional[nn.Module]):
        self.models = [m for m in models if m is not None]

    def __enter__(self):
        self.training = [[(m, m.training) for m in model.modules()] for model in self.models]
        self.flags = [[(p, p.requires_grad) for p in model.parameters()] for model in self.models]
        for model in self.models:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for entries in self.training:
            for m, flag in entries:
                m.training = flag
        for entries in self.flags:
            for p, flag in entries:
                p.requires_grad_(flag)
        return False


# ---------------------------------------------------------------------------------------------------- scoring
class _Scorer:
    """Hooks on the targeted layers; `step(batch)` adds one batch's Taylor (and similarity) sums to a group."""

    def __init__(self, model, names, groups, reference=None):
        self.model, self.names, self.groups, self.reference = model, names, groups, reference
        self.per_token = [model_part(n) == "language" for n in names]  # vision/projector: every patch counts
        modules = dict(model.named_modules())
        self.modules = [modules[n] for n in names]
        self.out_features = [_linear_out(m) for m in self.modules]
        n_groups = len(groups)
        self.taylor = [torch.zeros(n_groups, n, dtype=torch.float32) for n in self.out_features]
        self.counts = torch.zeros(len(names), n_groups, dtype=torch.float64)  # counted positions per layer
        self.cos_sum = torch.zeros(len(names), n_groups, dtype=torch.float64)
        self.loss_tokens = [0] * n_groups
        self.batches = [0] * n_groups
        self.lockstep = False  # set when every rank must run the same passes (sharded model)
        self._outs: list[list[torch.Tensor]] = [[] for _ in names]
        self._ref_outs: list[list[torch.Tensor]] = [[] for _ in names]
        self._handles = []
        # no KV cache: it would only hold extra activations
        self._no_cache = "use_cache" in inspect.signature(model.forward).parameters
        if reference is not None:
            self.ref_modules = _reference_modules(reference, names, self.out_features)

    def __enter__(self):
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(self._make_hook(i)))
        if self.reference is not None:
            for i, m in enumerate(self.ref_modules):
                self._handles.append(m.register_forward_hook(self._make_ref_hook(i)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._clear()
        return False

    def _clear(self):
        for lst in self._outs + self._ref_outs:
            lst.clear()

    def reduce(self) -> None:
        """Sum every accumulator over all processes (a no-op without torch.distributed), so ranks scoring different
        calibration shards end up with the scores of the union of the shards."""
        from .distributed import all_reduce_sum

        n = len(self.taylor)
        ints = torch.tensor(self.loss_tokens + self.batches, dtype=torch.int64)
        reduced = all_reduce_sum(self.taylor + [self.counts, self.cos_sum, ints])
        self.taylor, (self.counts, self.cos_sum, ints) = reduced[:n], reduced[n:]
        g = len(self.groups)
        self.loss_tokens, self.batches = ints[:g].tolist(), ints[g:].tolist()

    def _make_hook(self, i):
        def hook(module, args, out):
            if not torch.is_tensor(out):
                raise TypeError(f"layer {self.names[i]!r} returned {type(out).__name__}, expected a tensor")
            if not out.requires_grad:
                # nothing upstream needs grad (params are frozen): make this output a leaf we can differentiate
                out = out.detach().requires_grad_(True)
            self._outs[i].append(out)
            return out

        return hook

    def _make_ref_hook(self, i):
        def hook(module, args, out):
            self._ref_outs[i].append(out.detach())

        return hook

    @staticmethod
    def _check_batch(batch, group, index):
        if not isinstance(batch, Mapping):
            raise TypeError(f"group {group!r} batch {index}: expected a dict of tensors, got {type(batch).__name__}")
        if not torch.is_tensor(batch.get("labels")):
            raise ValueError(f"group {group!r} batch {index}: missing tensor 'labels'")
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise ValueError(f"group {group!r} batch {index}: missing tensor 'input_ids'")
        if batch["labels"].dim() != 2:
            raise ValueError(f"group {group!r} batch {index}: labels must be (batch, seq)")

    def step(self, g: int, batch: Mapping, index: int, accumulate: bool = True) -> bool:
        """Score one batch for group index g; False (and nothing added) when it has no loss tokens.

        ``accumulate=False`` runs the forward and backward without adding anything: a rank with fewer batches does
        this so that sharded models (FSDP2, ZeRO-3), whose forward and backward gather parameters collectively, see
        the same number of passes on every rank. With ``self.lockstep`` a batch without loss tokens runs this way.
        """
        group = self.groups[g]
        self._check_batch(batch, group, index)
        batch = _to_device(batch, _device_of(self.model))
        if self._no_cache and "use_cache" not in batch:
            batch["use_cache"] = False
        mask = _loss_mask(batch["labels"])
        n_tokens = int(mask.sum())
        if n_tokens == 0:
            if not self.lockstep:
                return False
            accumulate = False
        self._clear()
        try:
            if self.reference is not None:
                ref_batch = _to_device(batch, _device_of(self.reference))
                if "use_cache" not in inspect.signature(self.reference.forward).parameters:
                    ref_batch.pop("use_cache", None)
                with torch.no_grad():
                    self.reference(**ref_batch)
            with torch.enable_grad():
                out = self.model(**batch)
                loss = getattr(out, "loss", None)
                if loss is None and isinstance(out, Mapping):
                    loss = out.get("loss")
                if loss is None:
                    raise ValueError(f"group {group!r} batch {index}: the model returned no loss (are labels passed?)")
                if not accumulate:  # only the passes (and their collectives) count, not the values
                    loss = torch.nan_to_num(loss) * 0.0
                if not torch.isfinite(loss).all():
                    raise FloatingPointError(
                        f"group {group!r} batch {index}: loss is {float(loss.detach())} (not finite)"
                    )
                acts = [(i, a) for i, outs in enumerate(self._outs) for a in outs]
                if not acts:
                    raise RuntimeError("no targeted layer ran in the forward pass")
                grads = torch.autograd.grad(loss * n_tokens, [a for _, a in acts], allow_unused=True)
            if not accumulate:
                return False
            for (i, a), grad in zip(acts, grads):
                flat, w = _position_weights(a.detach(), mask, self.per_token[i])
                self.counts[i, g] += float(w.sum())
                if grad is None:
                    continue  # the layer does not reach the loss: its score is 0
                prod = (flat.float() * grad.reshape(flat.shape).float()).abs_()
                contrib = (w @ prod).cpu()
                if not torch.isfinite(contrib).all():
                    raise FloatingPointError(
                        f"group {group!r} batch {index}: non-finite Taylor score in layer {self.names[i]!r}"
                    )
                self.taylor[i][g] += contrib
            if self.reference is not None:
                self._similarity(g, mask, group, index)
        finally:
            self._clear()
        self.loss_tokens[g] += n_tokens
        self.batches[g] += 1
        return True

    def _similarity(self, g, mask, group, index):
        for i, (outs, refs) in enumerate(zip(self._outs, self._ref_outs)):
            if len(outs) != len(refs):
                raise RuntimeError(
                    f"layer {self.names[i]!r} ran {len(outs)} time(s) in the model but {len(refs)} in the reference"
                )
            for a, r in zip(outs, refs):
                if a.shape != r.shape:
                    raise AdapterMismatchError(
                        f"layer {self.names[i]!r}: output shape {tuple(a.shape)} differs from the reference's "
                        f"{tuple(r.shape)}"
                    )
                flat, w = _position_weights(a.detach(), mask, self.per_token[i])
                cos = nn.functional.cosine_similarity(
                    flat.float(), r.reshape(flat.shape).to(flat.device).float(), dim=-1
                )
                s = float(w @ cos)
                if not math.isfinite(s):
                    raise FloatingPointError(
                        f"group {group!r} batch {index}: non-finite activation similarity in layer {self.names[i]!r}"
                    )
                self.cos_sum[i, g] += s


def _reference_modules(reference: nn.Module, names: list[str], out_features: list[int]) -> list[nn.Module]:
    """The reference's modules with the same names (a PeftModel reference is looked up under base_model.model.)."""
    ref = dict(reference.named_modules())
    found, missing = [], []
    for name, n_out in zip(names, out_features):
        module = ref.get(name, ref.get(f"base_model.model.{name}"))
        if module is None:
            missing.append(name)
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        ref_out = _linear_out(base)
        if ref_out != n_out:
            raise AdapterMismatchError(
                f"reference_model: layer {name!r} has {ref_out} output rows, the model has {n_out}"
            )
        found.append(module)
    if missing:
        raise AdapterMismatchError(
            f"reference_model has no module(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"({len(missing)} of {len(names)} targeted layers); it must have the same architecture and module names"
        )
    return found


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
    row_selection: str = "layers",
    weight_ratio: Optional[float] = None,
    token_reduction: str = "mean",
    group_normalization: str = "mean",
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

    Ranking options (keyword-only; the defaults reproduce the MNAFT-style selection above). They exist because
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
            targeted layer, the same share of each layer's rows (random rows spread like this were the strongest
            sparse baseline, so this asks whether Taylor picks better rows than chance at the same spread).
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
    """
    _check_choice("score_normalization", score_normalization, SCORE_NORMALIZATIONS)
    _check_choice("row_selection", row_selection, ROW_SELECTIONS)
    _check_choice("token_reduction", token_reduction, TOKEN_REDUCTIONS)
    _check_choice("group_normalization", group_normalization, GROUP_NORMALIZATIONS)
    if weight_ratio is not None:
        weight_ratio = _check_ratio("weight_ratio", weight_ratio)
        if row_selection == "layers":
            raise ValueError("weight_ratio sets the budget of row_selection 'per_layer' or 'global'; 'layers' uses "
                             "layer_ratio and neuron_ratio")  # fmt: skip
    if layer_scoring not in LAYER_SCORINGS:
        raise ValueError(f"layer_scoring must be one of {LAYER_SCORINGS}, got {layer_scoring!r}")
    if layer_scoring == "activation_similarity" and reference_model is None:
        raise ValueError("layer_scoring='activation_similarity' needs reference_model= (a fine-tuned model)")
    if layer_scoring == "taylor" and reference_model is not None:
        raise ValueError("reference_model is only used with layer_scoring='activation_similarity'")
    neuron_ratio = _check_ratio("neuron_ratio", neuron_ratio)
    specific_ratio = _check_ratio("specific_ratio", specific_ratio, allow_zero=True)
    names = resolve_target_modules(model, target_modules)
    parts = [model_part(n) for n in names]
    ratios = _layer_ratios(layer_ratio, sorted(set(parts), key=PARTS.index))
    groups = _iter_groups(calibration)

    from tqdm.auto import tqdm

    from .distributed import all_reduce_sum, is_distributed, needs_lockstep, rank

    scorer = _Scorer(model, names, [g for g, _ in groups], reference_model)
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
    )
    selection.decide()
    return selection


def _score_lockstep(scorer: _Scorer, groups: list, progress: bool) -> list[int]:
    """Score every group with the same number of passes on every rank (the maximum over ranks); a rank that runs
    out of batches repeats one of its batches without adding it. Returns this rank's batch count per group."""
    from tqdm.auto import tqdm

    from .distributed import all_reduce_max

    lists = [list(batches) for _, batches in groups]
    spare = [b for batches in lists for b in batches]
    maxima = all_reduce_max([len(b) for b in lists] + [0 if spare else 1])
    if maxima[-1]:
        raise ValueError(
            "select_neurons on a sharded model: every process needs at least one calibration batch (forward and "
            "backward gather the parameters together with the other processes)"
        )
    for g, ((group, _), batches) in enumerate(zip(groups, lists)):
        for index in tqdm(range(maxima[g]), desc=f"scoring {group}", disable=not progress):
            if index < len(batches):
                scorer.step(g, batches[index], index)
            else:
                scorer.step(g, batches[-1] if batches else spare[0], index, accumulate=False)
    return [len(b) for b in lists]


def _taylor_layer_scores(neuron_scores: dict[str, torch.Tensor], names: list[str], parts: list[str]) -> torch.Tensor:
    """(layers, groups): per group the layer's mean neuron score over the sum of those means within its part."""
    means = torch.stack([neuron_scores[n].mean(dim=1) for n in names])  # (L, G)
    out = torch.zeros_like(means)
    for part in set(parts):
        idx = torch.tensor([i for i, p in enumerate(parts) if p == part])
        sums = means[idx].sum(dim=0, keepdim=True)
        out[idx] = means[idx] / torch.where(sums > 0, sums, torch.ones_like(sums))
    return out


# ---------------------------------------------------------------------------------------------------- result
@dataclass
class NeuronSelection:
    """Scores (per group, per layer and neuron) and the decision (kept layers, agnostic and specific rows).

    ``neuron_scores[layer]`` is (groups, out_features) fp32: mean |a * dL/da| per counted token (the sum with
    ``token_reduction="sum"``). ``layer_scores`` is (layers, groups): higher = more important (see the module
    docstring for each method). The ranking options (``score_normalization``, ``row_selection``, ``weight_ratio``,
    ``group_normalization``) are documented in `select_neurons`; change them and call `decide` to re-select from
    the same scores.
    """

    groups: list[str]
    layers: list[str]
    parts: list[str]
    out_features: list[int]
    neuron_scores: dict[str, torch.Tensor]
    layer_scores: torch.Tensor
    layer_scoring: str = "taylor"
    layer_ratio: dict[str, float] = field(default_factory=dict)
    neuron_ratio: float = 1.0
    specific_ratio: float = 0.1
    conv1d: list[bool] = field(default_factory=list)
    loss_tokens: dict[str, int] = field(default_factory=dict)
    kept_layers: list[str] = field(default_factory=list)
    neurons: dict[str, list[int]] = field(default_factory=dict)
    language_neurons: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    in_features: list[int] = field(default_factory=list)
    score_normalization: str = "none"
    row_selection: str = "layers"
    weight_ratio: Optional[float] = None
    token_reduction: str = "mean"
    group_normalization: str = "mean"

    # ------------------------------------------------------------------ decision
    def normalised_scores(self) -> dict[str, torch.Tensor]:
        """Each group's neuron scores divided by its mean over all targeted neurons (groups become comparable);
        with ``group_normalization="none"`` the raw scores (a group with larger gradients then weighs more)."""
        if self.group_normalization == "none":
            return {k: s.clone() for k, s in self.neuron_scores.items()}
        total = sum(s.sum(dim=1) for s in self.neuron_scores.values())
        n = sum(s.shape[1] for s in self.neuron_scores.values())
        mean = total / n
        bad = [g for g, m in zip(self.groups, mean.tolist()) if not (m > 0 and math.isfinite(m))]
        if bad:
            raise FloatingPointError(f"group(s) {bad}: mean neuron score is {mean.tolist()} (zero or not finite)")
        return {k: s / mean.unsqueeze(1) for k, s in self.neuron_scores.items()}

    def neuron_variance(self) -> dict[str, torch.Tensor]:
        """Per layer, the variance across groups of the normalised scores (zeros with a single group)."""
        return {k: s.var(dim=0, unbiased=False) for k, s in self.normalised_scores().items()}

    def layer_importance(self) -> torch.Tensor:
        """(layers,) ranking score: the mean over groups of `layer_scores`."""
        return self.layer_scores.mean(dim=1)

    def module_types(self) -> list[str]:
        """Per targeted layer, the type its scores are normalised within (`module_type`)."""
        return [module_type(n, p) for n, p in zip(self.layers, self.parts)]

    def layer_ranking(self) -> torch.Tensor:
        """(layers,) the score layers are ranked by: `layer_importance`, normalised within module type when
        ``score_normalization`` asks for it (otherwise the raw importance)."""
        return _normalize_within(self.layer_importance(), self.module_types(), self.score_normalization)

    def _budget_fraction(self, part: str) -> float:
        """Share of a part's targeted weights that `per_layer` / `global` selection trains."""
        if self.weight_ratio is not None:
            return float(self.weight_ratio)
        return float(self.layer_ratio[part]) * float(self.neuron_ratio)

    def _need_in_features(self) -> None:
        if len(self.in_features) != len(self.layers):
            raise ValueError(
                "this selection has no in_features (written by an older version?); row_selection "
                f"{self.row_selection!r} and trained_weights() need the input size of every targeted layer"
            )

    def trained_weights(self) -> int:
        """Weight entries the selection trains: every chosen row (agnostic or specific) times its layer's inputs."""
        self._need_in_features()
        size = dict(zip(self.layers, self.in_features))
        rows = sum(len(r) * size[n] for n, r in self.neurons.items())
        rows += sum(len(r) * size[n] for lang in self.language_neurons.values() for n, r in lang.items())
        return rows

    def _choose_rows(self, norm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: chosen rows (most important first)} for the configured ``row_selection``."""
        for name, value, choices in (("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS),
                                     ("row_selection", self.row_selection, ROW_SELECTIONS),
                                     ("group_normalization", self.group_normalization, GROUP_NORMALIZATIONS)):  # fmt: skip
            _check_choice(name, value, choices)
        importance = {name: s.mean(dim=0) for name, s in norm.items()}  # (out,) mean over groups
        order = {name: torch.sort(v, descending=True, stable=True).indices for name, v in importance.items()}
        if self.row_selection == "layers":
            ranking = self.layer_ranking().tolist()
            kept = set()
            for part, ratio in self.layer_ratio.items():
                idx = [i for i, p in enumerate(self.parts) if p == part]
                ranked = sorted(idx, key=lambda i: (-ranking[i], i))
                kept.update(ranked[: _n_of(ratio, len(idx))])
            return {
                n: order[n][: _n_of(self.neuron_ratio, len(order[n]))] for i, n in enumerate(self.layers) if i in kept
            }
        self._need_in_features()
        if self.row_selection == "per_layer":
            return {
                n: order[n][: _n_of(self._budget_fraction(p), len(order[n]))] for n, p in zip(self.layers, self.parts)
            }
        # global: one ranking of every row of a part, scale-free across module types, filled up to the weight budget
        chosen: dict[str, torch.Tensor] = {}
        types = self.module_types()
        for part in self.layer_ratio:
            idx = [i for i, p in enumerate(self.parts) if p == part]
            scores = torch.cat([importance[self.layers[i]].to(torch.float64) for i in idx])
            layer_of = torch.cat([torch.full((self.out_features[i],), i) for i in idx])
            row_of = torch.cat([torch.arange(self.out_features[i]) for i in idx])
            keys = [types[i] for i in idx for _ in range(self.out_features[i])]
            ranked = _normalize_within(scores, keys, self.score_normalization)
            # most important first; ties by layer then row (deterministic)
            perm = sorted(range(len(ranked)), key=lambda j: (-float(ranked[j]), int(layer_of[j]), int(row_of[j])))
            cost = torch.tensor([self.in_features[int(layer_of[j])] for j in perm], dtype=torch.float64)
            budget = self._budget_fraction(part) * sum(self.out_features[i] * self.in_features[i] for i in idx)
            take = int((torch.cumsum(cost, 0) <= budget + 1e-6).sum())
            take = max(take, 1)  # a part is never left with nothing
            for j in perm[:take]:
                chosen.setdefault(self.layers[int(layer_of[j])], []).append(int(row_of[j]))
        return {n: torch.tensor(chosen[n], dtype=torch.long) for n in self.layers if n in chosen}

    def decide(self) -> None:
        """(Re)compute kept layers and rows from the stored scores and options; deterministic (stable ties)."""
        norm = self.normalised_scores()
        chosen = self._choose_rows(norm)
        self.kept_layers = [n for n in self.layers if n in chosen]
        single = len(self.groups) == 1
        self.neurons, self.language_neurons = {}, {g: {} for g in self.groups}
        for name in self.kept_layers:
            s = norm[name]  # (G, out)
            top = chosen[name]
            k = int(top.numel())
            n_spec = 0 if single else int(round(self.specific_ratio * k))
            var = s[:, top].var(dim=0, unbiased=False)
            by_var = torch.sort(var, descending=True, stable=True).indices
            specific, agnostic = top[by_var[:n_spec]], top[by_var[n_spec:]]
            if agnostic.numel():
                self.neurons[name] = sorted(agnostic.tolist())
            owners = s[:, specific].argmax(dim=0).tolist()
            for row, owner in zip(specific.tolist(), owners):
                self.language_neurons[self.groups[owner]].setdefault(name, []).append(row)
        for rows in self.language_neurons.values():
            for name in rows:
                rows[name].sort()
        self.language_neurons = {g: r for g, r in self.language_neurons.items() if r}

    # ------------------------------------------------------------------ config
    def check_model(self, model: nn.Module) -> None:
        """Raise AdapterMismatchError unless every kept layer exists in `model` with the same number of rows."""
        modules = dict(model.named_modules())
        for name, n_out in zip(self.layers, self.out_features):
            if name not in self.kept_layers:
                continue
            module = modules.get(name)
            if module is None:
                raise AdapterMismatchError(f"selection layer {name!r} is not a module of this model")
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            got = _linear_out(base)
            if got != n_out:
                what = f"{got} output rows" if got is not None else f"a {type(base).__name__}, not a Linear"
                raise AdapterMismatchError(f"selection layer {name!r} has {n_out} output rows; the model's has {what}")

    def to_config(self, model: Optional[nn.Module] = None, train_bias: bool = True, **kwargs: Any):
        """A `NeuronSelectConfig` training exactly the selected rows (validated against `model` when given)."""
        from .tuner.config import NeuronSelectConfig

        clash = sorted({"target_modules", "neurons", "language_neurons"} & set(kwargs))
        if clash:
            raise TypeError(f"to_config() sets {clash} from the selection; do not pass them")
        if not self.kept_layers:
            raise ValueError("the selection keeps no layer")
        target: Union[list[str], str] = list(self.kept_layers)
        if model is not None:
            self.check_model(model)
            kept = set(self.kept_layers)
            others = [n for n, _ in model.named_modules() if n not in kept]
            if any(n.endswith("." + k) for n in others for k in kept):
                # a full name would also suffix-match a nested module: use an exact regex instead
                import re

                target = "^(?:" + "|".join(re.escape(k) for k in self.kept_layers) + ")$"
        if "fan_in_fan_out" not in kwargs:
            kept_conv = [c for n, c in zip(self.layers, self.conv1d) if n in self.kept_layers]
            if kept_conv and all(kept_conv):
                kwargs["fan_in_fan_out"] = True
        return NeuronSelectConfig(
            target_modules=target,
            neurons=dict(self.neurons) or None,
            language_neurons={g: dict(r) for g, r in self.language_neurons.items()} or None,
            train_bias=train_bias,
            **kwargs,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``neuron_selection.json`` (decision, metadata) and ``neuron_selection.safetensors`` (scores).

        Each file is written atomically (temporary file in `path`, then ``os.replace``): an interrupted save leaves
        the previous files intact, never a truncated one. Other files in `path` are left alone.
        """
        from safetensors.torch import save_file

        from .fileio import atomic_path, atomic_write_text

        os.makedirs(path, exist_ok=True)
        tensors = {"layer_scores": self.layer_scores.contiguous()}
        tensors.update({f"neuron_scores/{i}": self.neuron_scores[n].contiguous() for i, n in enumerate(self.layers)})
        with atomic_path(os.path.join(path, _TENSORS_NAME)) as tmp:
            save_file(tensors, tmp, metadata={"format": "neuron_peft.selection"})
        meta = {
            "format_version": _FORMAT_VERSION,
            "groups": self.groups,
            "layers": self.layers,
            "parts": self.parts,
            "out_features": self.out_features,
            "conv1d": self.conv1d,
            "layer_scoring": self.layer_scoring,
            "layer_ratio": self.layer_ratio,
            "neuron_ratio": self.neuron_ratio,
            "specific_ratio": self.specific_ratio,
            "loss_tokens": self.loss_tokens,
            "kept_layers": self.kept_layers,
            "neurons": self.neurons,
            "language_neurons": self.language_neurons,
            "in_features": self.in_features,
            "score_normalization": self.score_normalization,
            "row_selection": self.row_selection,
            "weight_ratio": self.weight_ratio,
            "token_reduction": self.token_reduction,
            "group_normalization": self.group_normalization,
        }
        atomic_write_text(os.path.join(path, _JSON_NAME), json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> NeuronSelection:
        """Read a selection written by `save` (JSON + safetensors only, no pickle)."""
        from safetensors.torch import load_file

        json_path, tensor_path = os.path.join(path, _JSON_NAME), os.path.join(path, _TENSORS_NAME)
        for p in (json_path, tensor_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p} not found (is {path!r} a directory written by NeuronSelection.save?)")
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"{json_path}: unsupported format_version {meta.get('format_version')!r}")
        tensors = load_file(tensor_path)
        layers = meta["layers"]
        try:
            scores = {n: tensors[f"neuron_scores/{i}"] for i, n in enumerate(layers)}
        except KeyError as e:
            raise ValueError(f"{tensor_path}: missing tensor {e.args[0]!r}") from None
        for n, n_out in zip(layers, meta["out_features"]):
            if scores[n].shape != (len(meta["groups"]), n_out):
                raise ValueError(f"{tensor_path}: scores of {n!r} have shape {tuple(scores[n].shape)}")
        fields = {k: meta[k] for k in meta if k != "format_version"}
        return cls(neuron_scores=scores, layer_scores=tensors["layer_scores"], **fields)

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """A table, one line per targeted layer: part, rows, kept, trained rows, specific rows per group, scores."""
        kept = set(self.kept_layers)
        width = max([len(n) for n in self.layers] + [5])
        gw = max([len(g) for g in self.groups] + [6])
        head = f"{'layer':<{width}}  {'part':<9} {'rows':>6} {'kept':>4} {'agn':>6} "
        head += " ".join(f"{'spec:' + g:>{gw + 5}}" for g in self.groups)
        head += " " + " ".join(f"{'score:' + g:>{gw + 6}}" for g in self.groups)
        lines = [head, "-" * len(head)]
        for i, name in enumerate(self.layers):
            spec = [len(self.language_neurons.get(g, {}).get(name, [])) for g in self.groups]
            line = f"{name:<{width}}  {self.parts[i]:<9} {self.out_features[i]:>6} {'yes' if name in kept else '':>4} "
            line += f"{len(self.neurons.get(name, [])):>6} " + " ".join(f"{s:>{gw + 5}}" for s in spec)
            line += " " + " ".join(f"{float(v):>{gw + 6}.4g}" for v in self.layer_scores[i])
            lines.append(line)
        n_rows = sum(len(r) for r in self.neurons.values())
        n_spec = {g: sum(len(r) for r in rows.values()) for g, rows in self.language_neurons.items()}
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.kept_layers)}/{len(self.layers)} layers kept ({self.layer_scoring}); "
            f"{n_rows} agnostic rows; specific rows {n_spec}; loss tokens {self.loss_tokens}"
        )
        return "\n".join(lines)

    def plot_layers(self, path: Union[str, os.PathLike]) -> None:
        """PNG heatmap of layer scores (layers x groups); kept layers are marked."""
        from .plots import plot_layer_heatmap

        plot_layer_heatmap(self, path)

    def plot_neurons(self, path: Union[str, os.PathLike]) -> None:
        """PNG of the sorted neuron-variance curve of each kept layer (the specific rows sit left of the cut)."""
        from .plots import plot_neuron_variance

        plot_neuron_variance(self, path)

    def __repr__(self) -> str:
        return (
            f"NeuronSelection(groups={self.groups}, layers={len(self.layers)}, kept={len(self.kept_layers)}, "
            f"layer_scoring={self.layer_scoring!r})"
        )


# ---------------------------------------------------------------------------------------------------- cost
def measure_scoring_cost(model: nn.Module, batch: Mapping, target_modules="all-linear", repeats: int = 3) -> dict:
    """Seconds per calibration batch for scoring vs one full fine-tuning step (forward+backward+AdamW) on it.

    The training step runs on a deep copy so `model` is untouched; one warm-up call each, then interleaved runs.
    """
    import copy

    names = resolve_target_modules(model, target_modules)

    def score_once():
        with _Frozen(model), _Scorer(model, names, ["bench"]) as scorer:
            scorer.step(0, batch, 0)

    train_model = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-5)
    dev_batch = _to_device(batch, _device_of(train_model))
    if "use_cache" in inspect.signature(train_model.forward).parameters:
        dev_batch.setdefault("use_cache", False)  # as in the scoring pass

    def train_once():
        train_model(**dev_batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    score_once(), train_once()  # warm-up
    # interleaved so that load changes on a shared machine hit both alike; min = least disturbed run
    pairs = [(timed(score_once), timed(train_once)) for _ in range(repeats)]
    score_s, train_s = min(p[0] for p in pairs), min(p[1] for p in pairs)
    return {"score_s": score_s, "train_step_s": train_s, "ratio": score_s / train_s}
