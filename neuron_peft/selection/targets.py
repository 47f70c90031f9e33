"""Which layers selection looks at: PEFT-style target matching, model parts (vision / projector / language) and
module types, and the sizes of Linear-like layers (`neuron_peft.tuner.layer.linear_features`)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional, Union

from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
from torch import nn

from ..tuner.layer import linear_features

PARTS = ("vision", "projector", "language")
_PROJECTOR_KEYS = ("multi_modal_projector", "mm_projector", "merger", "connector", "qformer", "language_projection")
_VISION_KEYS = ("vision_tower", "vision_model", "visual")


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
    features = linear_features(module)
    return None if features is None else features[1]


def _linear_in(module: nn.Module) -> Optional[int]:
    """Input features of a Linear-like module (the weights one output row holds), else None."""
    features = linear_features(module)
    return None if features is None else features[0]


def module_type(name: str, part: Optional[str] = None) -> str:
    """The module type a layer is normalised within: its part and last name component ("language:q_proj").

    Scores of different projection types live on different scales (see `select_neurons`, ``score_normalization``);
    layers of one type in different blocks are what a scale-free ranking compares."""
    return f"{part or model_part(name)}:{name.rsplit('.', 1)[-1]}"


def resolve_target_modules(model: nn.Module, target_modules: Union[list[str], str, None]) -> list[str]:
    """Full names of the Linear modules `target_modules` selects, with PEFT's own matching rules."""
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
