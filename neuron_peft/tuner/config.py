"""`NeuronSelectConfig`: which output rows ("neurons") and input columns ("channels") of which Linear layers train,
and who owns them.

Two kinds of unit: a *row* is one output of a layer (its weight row and bias entry); a *column* is one input channel
(its weight column, over every output). An MLP's neuron j reads through ``gate_proj``/``up_proj`` row j and writes
through ``down_proj`` column j, so the unit a paper calls a neuron is a row in one layer and a column in another.

The config is the whole adapter description: after injection the rows picked by `neuron_init` are written back
into `neurons`, so a saved adapter_config.json always lists explicit indices and a reload never re-selects.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from ..errors import AdapterFileError
from .model_card import write_pending_card
from .peft_type import NEURON_SELECT_PEFT_TYPE

NEURON_INIT_CHOICES = ("magnitude", "random")


def check_adapter_file_readable(path: str) -> None:
    """Refuse a local safetensors adapter file whose header or data safetensors cannot read (`AdapterFileError`
    naming the file). A missing file is left to PEFT (it may be a ``.bin`` adapter or a Hub id)."""
    if not os.path.isfile(path):
        return
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)  # checks that the tensor's byte range lies inside the file
    except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad files
        raise AdapterFileError(f"corrupt or truncated adapter file {path}: {err}") from err


def _is_bool(value) -> bool:
    """Python, numpy and torch booleans (a 0-d torch bool tensor passes ``operator.index`` as 0/1)."""
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def _check_rows(where: str, rows, unit: str = "row") -> list[int]:
    """Row indices as plain ints, or a clear error quoting the value actually given.

    Floats and booleans are refused, never converted: ``torch.as_tensor([1.7], dtype=torch.long)`` silently gives
    row 1 and a boolean mask ``[True, False]`` would become rows 1 and 0; a negative index would pick a row counted
    from the end.
    """
    if isinstance(rows, (str, bytes)) or not hasattr(rows, "__iter__"):
        raise TypeError(f"{where}: {unit}s must be a list of integers, got {type(rows).__name__}")
    if _is_bool(rows):
        raise TypeError(
            f"{where}: {unit}s are booleans ({rows!r}); pass {unit} indices (e.g. mask.nonzero().flatten()), not a mask"
        )
    out = []
    for r in rows:
        if _is_bool(r):
            raise TypeError(f"{where}: {unit} index {r!r} is a boolean, not an integer index")
        try:
            index = operator.index(r)
        except TypeError:
            raise TypeError(f"{where}: {unit} index {r!r} is not an integer") from None
        if index < 0:
            raise ValueError(f"{where}: {unit} index {r!r} is negative")
        out.append(index)
    if len(set(out)) != len(out):
        dup = sorted({r for r in out if out.count(r) > 1})
        raise ValueError(f"{where}: duplicate {unit} indices {dup[:10]}")
    return out


@dataclass
class NeuronSelectConfig(PeftConfig):
    """Configuration of a NeuronSelect adapter (neuron-level selective fine-tuning).

    Args:
        target_modules: modules to adapt (PEFT semantics: list of name suffixes, a regex, or "all-linear").
        neurons: ``{module_name: [row, ...]}`` language-agnostic rows; every sample trains them. Module names are
            names from the *base* model's ``named_modules()``.
        language_neurons: ``{group: {module_name: [row, ...]}}`` language-specific rows owned by one group (a
            language pair or task); with routing only samples of that group train them.
        columns: ``{module_name: [col, ...]}`` language-agnostic input columns; each trains an (out_features,) weight
            column (no bias: a bias belongs to an output row). A module listed only here gets no rows.
        language_columns: ``{group: {module_name: [col, ...]}}`` input columns owned by one group.
            A weight entry in both a selected row and a selected column belongs to the row: it trains (and is
            routed) with the row's delta, and the column's delta skips that row (one parameter, counted once).
        neuron_ratio: for targeted modules without explicit rows or columns, the fraction of rows to train, in (0, 1].
        neuron_init: how those rows are chosen without calibration data: ``"magnitude"`` (largest L2 norm of the
            weight row) or ``"random"`` (seeded by ``seed``).
        seed: seed for ``neuron_init="random"`` and for ``init_weights=False``.
        train_bias: bias entries of selected rows train too (as MNAFT does), when the base layer has a bias.
        init_weights: True leaves the model's outputs unchanged; False gives a small random delta (for tests).
        update_path: "auto" | "live" | "additive" — how selected rows enter the forward (see `layer.py`).
        fan_in_fan_out: the base layer stores its weight as (in, out), like GPT-2's ``Conv1D``.
        exclude_modules / layers_to_transform / layers_pattern / modules_to_save: as in PEFT's LoRA.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffixes), a regex, or 'all-linear' to adapt."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex to exclude from adaptation."}
    )
    neurons: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={"help": "Language-agnostic rows per module: {module_name: [row, ...]}."},
    )
    language_neurons: Optional[dict[str, dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Language-specific rows: {group: {module_name: [row, ...]}}."},
    )
    columns: Optional[dict[str, list[int]]] = field(
        default=None,
        metadata={"help": "Language-agnostic input columns per module: {module_name: [col, ...]}."},
    )
    language_columns: Optional[dict[str, dict[str, list[int]]]] = field(
        default=None,
        metadata={"help": "Language-specific input columns: {group: {module_name: [col, ...]}}."},
    )
    neuron_ratio: float = field(
        default=0.1,
        metadata={"help": "Fraction of rows to train in targeted modules that have no explicit rows, in (0, 1]."},
    )
    neuron_init: Literal["magnitude", "random"] = field(
        default="magnitude",
        metadata={"help": "How rows are chosen without calibration data: 'magnitude' or 'random' (seeded)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for random row choice and init_weights=False."})
    train_bias: bool = field(default=True, metadata={"help": "Train the bias entries of selected rows."})
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: zero deltas (identity adapter). False: small random deltas (testing only)."},
    )
    update_path: Literal["auto", "live", "additive"] = field(
        default="auto",
        metadata={
            "help": (
                "How selected rows enter the layer. 'live': rows are kept written into the base weight and a custom "
                "backward computes only their gradient (one matmul forward, fastest). 'additive': x @ delta^T is "
                "added to the selected outputs (any base layer, incl. quantized/sharded). 'auto': live where safe."
            )
        },
    )
    fan_in_fan_out: bool = field(
        default=False,
        metadata={"help": "Set True if the base layer stores weight as (fan_in, fan_out), like GPT-2 Conv1D."},
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt these layer indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with layers_to_transform."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Extra modules to train fully and save, e.g. a classifier head."}
    )

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """PEFT's config save, then the NeuronSelect part of the model card PEFT wrote for this save (usage snippet,
        selection summary; `neuron_peft.tuner.model_card`). PEFT calls this last in ``PeftModel.save_pretrained``."""
        super().save_pretrained(save_directory, **kwargs)
        write_pending_card(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's config load; for a local folder also a readable check of its adapter file first.

        ``PeftModel.from_pretrained`` loads the config through this method before safetensors reads the weights, so a
        corrupt or truncated ``adapter_model.safetensors`` is refused here with its path (`AdapterFileError`) instead
        of safetensors' bare header error. (Loaders that pass a ready config skip this check.)"""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(str(pretrained_model_name_or_path), subfolder or "")
        check_adapter_file_readable(os.path.join(folder, "adapter_model.safetensors"))
        return config

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = NEURON_SELECT_PEFT_TYPE
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else self.target_modules
        self.exclude_modules = (
            set(self.exclude_modules) if isinstance(self.exclude_modules, list) else self.exclude_modules
        )
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and not self.layers_to_transform:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

        ratio = self.neuron_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0.0 < float(ratio) <= 1.0):
            raise ValueError(f"neuron_ratio must be in (0, 1], got {ratio!r}")
        self.neuron_ratio = float(ratio)
        if self.update_path not in ("auto", "live", "additive"):
            raise ValueError(f"update_path must be 'auto', 'live' or 'additive', got {self.update_path!r}")
        if self.neuron_init not in NEURON_INIT_CHOICES:
            raise ValueError(f"neuron_init must be one of {NEURON_INIT_CHOICES}, got {self.neuron_init!r}")

        self.neurons = self._normalise_rows("neurons", self.neurons)
        self.language_neurons = self._normalise_groups("language_neurons", self.language_neurons)
        self.columns = self._normalise_rows("columns", self.columns)
        self.language_columns = self._normalise_groups("language_columns", self.language_columns)
        self._check_disjoint("neurons", "language_neurons", "rows")
        self._check_disjoint("columns", "language_columns", "columns")

    @classmethod
    def _normalise_groups(cls, where: str, mapping) -> Optional[dict[str, dict[str, list[int]]]]:
        if mapping is not None and not isinstance(mapping, dict):
            raise TypeError(
                f"{where} must be a dict {{group: {{module_name: [indices]}}}}, got {type(mapping).__name__}"
            )
        groups = {}
        for group, rows in (mapping or {}).items():
            if not isinstance(group, str) or not group.strip():
                raise ValueError(f"{where}: group name must be a non-empty string, got {group!r}")
            if rows is None or not isinstance(rows, dict):
                raise ValueError(f"{where}[{group!r}] must be a dict {{module_name: [indices]}}")
            groups[group] = cls._normalise_rows(f"{where}[{group!r}]", rows)
        return groups or None

    @staticmethod
    def _normalise_rows(where: str, mapping) -> Optional[dict[str, list[int]]]:
        unit = "column" if "columns" in where else "row"
        if mapping is None:
            return None
        if not isinstance(mapping, dict):
            raise TypeError(f"{where} must be a dict {{module_name: [rows]}}, got {type(mapping).__name__}")
        out = {}
        for name, rows in mapping.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"{where}: module name must be a non-empty string, got {name!r}")
            out[name] = sorted(_check_rows(f"{where}[{name!r}]", rows, unit))
        return out

    def _check_disjoint(self, agnostic_field: str, groups_field: str, unit: str) -> None:
        owners: dict[str, dict[int, str]] = {}
        sources = [(agnostic_field, getattr(self, agnostic_field) or {})]
        sources += [(f"{groups_field}[{g!r}]", rows) for g, rows in (getattr(self, groups_field) or {}).items()]
        for source, mapping in sources:
            for name, rows in mapping.items():
                seen = owners.setdefault(name, {})
                clash = [r for r in rows if r in seen]
                if clash:
                    raise ValueError(
                        f"module {name!r}: {unit} {clash[:10]} are listed in both {seen[clash[0]]} and {source}; "
                        f"agnostic and language-specific {unit} must be disjoint within a module"
                    )
                seen.update(dict.fromkeys(rows, source))

    @property
    def groups(self) -> list[str]:
        """Language groups (of rows and columns), in the fixed order used for ownership ids inside the layers."""
        return sorted(set(self.language_neurons or {}) | set(self.language_columns or {}))

    def explicit_modules(self) -> set[str]:
        """Module names that have explicitly listed rows or columns (agnostic or language-specific)."""
        names = set(self.neurons or {}) | set(self.columns or {})
        for mapping in (self.language_neurons or {}, self.language_columns or {}):
            for rows in mapping.values():
                names.update(rows)
        return names

    def rows_for(self, module_name: str) -> Optional[tuple[list[int], list[tuple[str, list[int]]]]]:
        """(agnostic rows, [(group, rows), ...]) for a module with explicit rows or columns, else None (a module
        listed only with columns has no rows: explicit units replace the `neuron_ratio` pick)."""
        if module_name not in self.explicit_modules():
            return None
        return self._units_of(module_name, self.neurons, self.language_neurons)

    def columns_for(self, module_name: str) -> tuple[list[int], list[tuple[str, list[int]]]]:
        """(agnostic columns, [(group, columns), ...]) of a module (empty lists when it has none)."""
        return self._units_of(module_name, self.columns, self.language_columns)

    def _units_of(self, module_name: str, agnostic_map, groups_map):
        agnostic = list((agnostic_map or {}).get(module_name, []))
        specific = [(g, list((groups_map or {}).get(g, {}).get(module_name, []))) for g in self.groups]
        return agnostic, specific
