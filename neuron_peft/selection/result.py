"""`NeuronSelection`: the outcome of scoring (scores per layer, unit and group) and the decision it implies
(kept layers, agnostic and language-specific rows or columns); turns into a `NeuronSelectConfig` with
`to_config()`, saves and loads as JSON + safetensors, and plots. The units (rows, columns, MLP neurons) are
`channels.py`'s."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import AdapterMismatchError
from ..fileio import atomic_path, atomic_write_text
from ..tuner.config import NeuronSelectConfig
from .channels import UNIT_LABELS, UNIT_TEXT, assign_units, check_unit, unit_costs, unit_counts
from .plots import plot_layer_heatmap, plot_neuron_variance
from .ranking import (
    GROUP_NORMALIZATIONS,
    SCORE_NORMALIZATIONS,
    _check_choice,
    _check_row_selection,
    _n_of,
    _normalize_within,
)
from .targets import _linear_in, _linear_out, module_type

_JSON_NAME = "neuron_selection.json"
_TENSORS_NAME = "neuron_selection.safetensors"
_FORMAT_VERSION = 1


@dataclass
class NeuronSelection:
    """Scores (per group, per layer and neuron) and the decision (kept layers, agnostic and specific rows).

    ``neuron_scores[layer]`` is (groups, units) fp32: mean |a * dL/da| per counted token (the sum with
    ``token_reduction="sum"``) of the layer's outputs (``unit="row"``) or inputs (``"channel"``, ``"mlp_neuron"``;
    `channels.py`). ``layer_scores`` is (layers, groups): higher = more important (see the module docstring). The
    ranking options are documented in `select_neurons`; change them and call `decide` to re-select from the same
    scores. Rows go to ``neurons`` / ``language_neurons``, columns to ``columns`` / ``language_columns`` (mlp_neuron:
    both); ``readers`` maps each scored MLP writer to its readers' ``in_features`` (mlp_neuron only).
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
    row_selection: str = "layers"  # what files written before the option existed used; select_neurons picks per_layer
    weight_ratio: Optional[float] = None
    token_reduction: str = "mean"
    group_normalization: str = "mean"
    unit: str = "row"  # what files written before the option existed scored
    columns: dict[str, list[int]] = field(default_factory=dict)
    language_columns: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    readers: dict[str, dict[str, int]] = field(default_factory=dict)

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

    def unit_counts(self) -> list[int]:
        """Units per scored layer: output rows (``unit="row"``) or input channels."""
        return unit_counts(self.unit, self.out_features, self.in_features)

    def unit_costs(self) -> list[int]:
        """Weights one unit of each scored layer trains (`channels.unit_costs`)."""
        self._need_in_features()
        return unit_costs(self.unit, self.layers, self.out_features, self.in_features, self.readers)

    def chosen_units(self) -> tuple[dict[str, list[int]], dict[str, dict[str, list[int]]]]:
        """(agnostic ``{layer: [unit]}``, specific ``{group: {layer: [unit]}}``) keyed by scored layer: the rows for
        ``unit="row"``, else the columns (an MLP neuron's j is its writer's column)."""
        rows = self.unit == "row"
        return (self.neurons, self.language_neurons) if rows else (self.columns, self.language_columns)

    def trained_weights(self) -> int:
        """Weight entries the selection trains: every chosen unit (agnostic or specific) times its weights (a row:
        its layer's inputs; a column: its layer's outputs; an MLP neuron: the writer column and the reader rows)."""
        cost = dict(zip(self.layers, self.unit_costs()))
        agnostic, specific = self.chosen_units()
        units = sum(len(r) * cost[n] for n, r in agnostic.items())
        units += sum(len(r) * cost[n] for lang in specific.values() for n, r in lang.items())
        return units

    def _choose_rows(self, norm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{layer: chosen rows (most important first)} for the configured ``row_selection``."""
        for name, value, choices in (("score_normalization", self.score_normalization, SCORE_NORMALIZATIONS),
                                     ("group_normalization", self.group_normalization, GROUP_NORMALIZATIONS)):  # fmt: skip
            _check_choice(name, value, choices)
        _check_row_selection(self.row_selection, self.layer_scoring)
        check_unit(self.unit, self.layer_scoring, self.layers, self.readers)
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
            # a layer no calibration gradient reaches scores 0 everywhere (e.g. a vision block after the layer the
            # projector reads): rows there could never learn, so it gets none
            return {
                n: order[n][: _n_of(self._budget_fraction(p), len(order[n]))]
                for n, p in zip(self.layers, self.parts)
                if bool(importance[n].any())
            }
        # global: one ranking of every row of a part, scale-free across module types, filled up to the weight budget
        chosen: dict[str, torch.Tensor] = {}
        types, counts, costs = self.module_types(), self.unit_counts(), self.unit_costs()
        for part in self.layer_ratio:
            idx = [i for i, p in enumerate(self.parts) if p == part]
            scores = torch.cat([importance[self.layers[i]].to(torch.float64) for i in idx])
            layer_of = torch.cat([torch.full((counts[i],), i) for i in idx])
            row_of = torch.cat([torch.arange(counts[i]) for i in idx])
            keys = [types[i] for i in idx for _ in range(counts[i])]
            ranked = _normalize_within(scores, keys, self.score_normalization)
            # most important first; ties by layer then row (deterministic)
            perm = sorted(range(len(ranked)), key=lambda j: (-float(ranked[j]), int(layer_of[j]), int(row_of[j])))
            cost = torch.tensor([costs[int(layer_of[j])] for j in perm], dtype=torch.float64)
            budget = self._budget_fraction(part) * sum(counts[i] * costs[i] for i in idx)
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
        agnostic, language = {}, {g: {} for g in self.groups}  # {layer: [unit]}, {group: {layer: [unit]}}
        for name in self.kept_layers:
            s = norm[name]  # (G, out)
            top = chosen[name]
            k = int(top.numel())
            n_spec = 0 if single else int(round(self.specific_ratio * k))
            var = s[:, top].var(dim=0, unbiased=False)
            by_var = torch.sort(var, descending=True, stable=True).indices
            specific, shared = top[by_var[:n_spec]], top[by_var[n_spec:]]
            if shared.numel():
                agnostic[name] = sorted(shared.tolist())
            owners = s[:, specific].argmax(dim=0).tolist()
            for row, owner in zip(specific.tolist(), owners):
                language[self.groups[owner]].setdefault(name, []).append(row)
        for rows in language.values():
            for name in rows:
                rows[name].sort()
        language = {g: r for g, r in language.items() if r}
        for key, value in assign_units(self.unit, agnostic, language, self.readers).items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ config
    def trained_modules(self) -> list[str]:
        """The modules a config from this selection adapts: the kept layers, each after its readers (mlp_neuron)."""
        return [m for n in self.kept_layers for m in [*self.readers.get(n, {}), n]]

    def check_model(self, model: nn.Module) -> None:
        """Raise AdapterMismatchError unless every trained module exists in `model` with the same number of output
        rows (and, for the column units, of input channels: the columns index them)."""
        modules = dict(model.named_modules())
        n_in = self.in_features if len(self.in_features) == len(self.layers) else [None] * len(self.layers)
        sizes = {n: (o, i) for n, o, i in zip(self.layers, self.out_features, n_in)}
        for writer in self.kept_layers:
            sizes.update({r: (sizes[writer][1], i) for r, i in self.readers.get(writer, {}).items()})
        for name in self.trained_modules():
            module = modules.get(name)
            if module is None:
                raise AdapterMismatchError(f"selection layer {name!r} is not a module of this model")
            base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            (n_out, want_in), got = sizes[name], _linear_out(base)
            if got != n_out:
                what = f"{got} output rows" if got is not None else f"a {type(base).__name__}, not a Linear"
                raise AdapterMismatchError(f"selection layer {name!r} has {n_out} output rows; the model's has {what}")
            if self.unit != "row" and want_in is not None and _linear_in(base) != want_in:
                raise AdapterMismatchError(f"selection layer {name!r} has {want_in} input channels; the model's has "
                                           f"{_linear_in(base)}")  # fmt: skip

    def config_kwargs(self, model: Optional[nn.Module] = None) -> dict[str, Any]:
        """What `to_config` takes from the selection: ``target_modules``, ``neurons`` / ``language_neurons``, for the
        column units ``columns`` / ``language_columns``, and ``fan_in_fan_out`` when every trained layer is a
        Conv1D (validated against `model` when given)."""
        if not self.kept_layers:
            raise ValueError("the selection keeps no layer")
        trained = self.trained_modules()
        target: Union[list[str], str] = list(trained)
        if model is not None:
            self.check_model(model)
            kept = set(trained)
            others = [n for n, _ in model.named_modules() if n not in kept]
            if any(n.endswith("." + k) for n in others for k in kept):
                # a full name would also suffix-match a nested module: use an exact regex instead
                import re

                target = "^(?:" + "|".join(re.escape(k) for k in trained) + ")$"
        out: dict[str, Any] = {
            "target_modules": target,
            "neurons": dict(self.neurons) or None,
            "language_neurons": {g: dict(r) for g, r in self.language_neurons.items()} or None,
        }
        if self.unit != "row":
            out["columns"] = dict(self.columns) or None
            out["language_columns"] = {g: dict(c) for g, c in self.language_columns.items()} or None
        kept_conv = [c for n, c in zip(self.layers, self.conv1d) if n in self.kept_layers]
        if kept_conv and all(kept_conv):  # an MLP block's readers are of its writer's kind (`channels.mlp_blocks`)
            out["fan_in_fan_out"] = True
        return out

    def to_config(self, model: Optional[nn.Module] = None, train_bias: bool = True, **kwargs: Any):
        """A `NeuronSelectConfig` training exactly the selected rows and columns (validated against `model` when
        given); `config_kwargs` lists what comes from the selection."""
        clash = sorted({"target_modules", "neurons", "language_neurons", "columns", "language_columns"} & set(kwargs))
        if clash:
            raise TypeError(f"to_config() sets {clash} from the selection; do not pass them")
        return NeuronSelectConfig(**{**self.config_kwargs(model), "train_bias": train_bias, **kwargs})

    # ------------------------------------------------------------------ persistence
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write ``neuron_selection.json`` (decision, metadata) and ``neuron_selection.safetensors`` (scores).

        Each file is written atomically (temporary file in `path`, then ``os.replace``): an interrupted save leaves
        the previous files intact, never a truncated one. Other files in `path` are left alone.
        """
        from safetensors.torch import save_file

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
            "unit": self.unit,
            "columns": self.columns,
            "language_columns": self.language_columns,
            "readers": self.readers,
        }
        atomic_write_text(os.path.join(path, _JSON_NAME), json.dumps(meta, indent=1))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> NeuronSelection:
        """Read a selection written by `save` (JSON + safetensors only, no pickle); files written before units
        existed load as ``unit="row"``."""
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
        fields = {k: meta[k] for k in meta if k != "format_version"}
        selection = cls(neuron_scores=scores, layer_scores=tensors["layer_scores"], **fields)
        for n, n_units in zip(layers, selection.unit_counts()):
            if scores[n].shape != (len(meta["groups"]), n_units):
                raise ValueError(f"{tensor_path}: scores of {n!r} have shape {tuple(scores[n].shape)}")
        return selection

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        """A table, one line per scored layer: part, units (rows, or input channels for the column units), kept,
        trained agnostic units, specific units per group, scores; a last line with the totals and the unit."""
        kept, (agnostic, language) = set(self.kept_layers), self.chosen_units()
        label, sizes = UNIT_LABELS.get(self.unit, self.unit), self.unit_counts()
        width = max([len(n) for n in self.layers] + [5])
        gw = max([len(g) for g in self.groups] + [6])
        head = f"{'layer':<{width}}  {'part':<9} {label[:6]:>6} {'kept':>4} {'agn':>6} "
        head += " ".join(f"{'spec:' + g:>{gw + 5}}" for g in self.groups)
        head += " " + " ".join(f"{'score:' + g:>{gw + 6}}" for g in self.groups)
        lines = [head, "-" * len(head)]
        for i, name in enumerate(self.layers):
            spec = [len(language.get(g, {}).get(name, [])) for g in self.groups]
            line = f"{name:<{width}}  {self.parts[i]:<9} {sizes[i]:>6} {'yes' if name in kept else '':>4} "
            line += f"{len(agnostic.get(name, [])):>6} " + " ".join(f"{s:>{gw + 5}}" for s in spec)
            line += " " + " ".join(f"{float(v):>{gw + 6}.4g}" for v in self.layer_scores[i])
            lines.append(line)
        n_rows = sum(len(r) for r in agnostic.values())
        n_spec = {g: sum(len(r) for r in rows.values()) for g, rows in language.items()}
        lines.append("-" * len(head))
        lines.append(
            f"{len(self.kept_layers)}/{len(self.layers)} layers kept ({self.layer_scoring}); "
            f"{n_rows} agnostic {label}; specific {label} {n_spec}; loss tokens {self.loss_tokens}"
        )
        lines.append(f"unit {self.unit!r}: {UNIT_TEXT.get(self.unit, '')}")
        return "\n".join(lines)

    def plot_layers(self, path: Union[str, os.PathLike]) -> None:
        """PNG heatmap of layer scores (layers x groups); kept layers are marked."""
        plot_layer_heatmap(self, path)

    def plot_neurons(self, path: Union[str, os.PathLike]) -> None:
        """PNG of the sorted neuron-variance curve of each kept layer (the specific rows sit left of the cut)."""
        plot_neuron_variance(self, path)

    def __repr__(self) -> str:
        return (
            f"NeuronSelection(groups={self.groups}, layers={len(self.layers)}, kept={len(self.kept_layers)}, "
            f"layer_scoring={self.layer_scoring!r}, unit={self.unit!r})"
        )
