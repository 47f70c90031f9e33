"""Vision-language models: the Linear layers of each part (vision tower, projector, language model) and a selection
that budgets the parts separately.

`vlm_target_modules(model)` finds the parts by module name (`model_part`; checked on LLaVA, LLaVA-NeXT/OneVision,
Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, PaliGemma, Idefics2/3, SmolVLM, InternVL, Mistral 3, Mllama, Llama 4,
GLM-4V). `select_vlm_neurons` gives each part its own ``layer_ratio``. Gemma 3's projector is a bare weight matrix
(``torch.matmul``), not a Linear: it has no rows to select, so it is reported empty; train it whole with
``modules_to_save=vlm_part_roots(model)["projector"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

from torch import nn

from .calibration import select_neurons
from .targets import PARTS, _linear_out, model_part


def _parts_arg(parts: Union[str, Sequence[str]]) -> tuple[str, ...]:
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {list(PARTS)}, got {list(parts)}")
    return parts


def _not_called_linears(model: nn.Module) -> set[str]:
    """Linear children that their parent never calls (nn.MultiheadAttention reads ``out_proj.weight`` directly)."""
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            skip.add(f"{name}.out_proj" if name else "out_proj")
    return skip


def vlm_target_modules(
    model: nn.Module,
    parts: Union[str, Sequence[str]] = PARTS,
    *,
    include_output_layer: bool = False,
) -> dict[str, list[str]]:
    """Full names of the Linear (and Conv1D) layers of each part: ``{"vision": [...], "projector": [...], ...}``.

    The output layer (``lm_head``, the model's output embeddings) is left out unless `include_output_layer`, as
    in PEFT's ``"all-linear"``; so are Linear layers that are never called as modules (the ``out_proj`` of an
    ``nn.MultiheadAttention``, e.g. in SigLIP's pooling head). A part with no Linear layer (Gemma 3's projector)
    maps to an empty list. Raises if none of the requested parts has a Linear layer.
    """
    parts = _parts_arg(parts)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = _not_called_linears(model)
    found: dict[str, list[str]] = {p: [] for p in parts}
    for name, module in model.named_modules():
        if not name or name in skip or _linear_out(module) is None:
            continue
        if module is out_emb and not include_output_layer:
            continue
        part = model_part(name)
        if part in found:
            found[part].append(name)
    if not any(found.values()):
        raise ValueError(f"the model has no Linear layer in part(s) {list(parts)} (module names: see model_part)")
    return found


def vlm_part_roots(model: nn.Module) -> dict[str, list[str]]:
    """Outermost module names of the vision tower and of the projector, e.g. ``{"vision": ["model.vision_tower"],
    "projector": ["model.multi_modal_projector"]}`` (the language model is everything else)."""
    roots: dict[str, list[str]] = {"vision": [], "projector": []}
    for name, _ in model.named_modules():
        if not name:
            continue
        part = model_part(name)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if part in roots and (not parent or model_part(parent) != part):
            roots[part].append(name)
    return roots


def flatten_targets(targets: Mapping[str, Sequence[str]]) -> list[str]:
    """The names of a `vlm_target_modules` result as one list (a ``target_modules`` for PEFT configs)."""
    return [n for names in targets.values() for n in names]


def select_vlm_neurons(
    model: nn.Module,
    calibration,
    parts: Union[str, Sequence[str]] = PARTS,
    layer_ratio: Union[float, Mapping[str, float]] = 0.4,
    *,
    specific_parts: Union[str, Sequence[str], None] = "auto",
    include_output_layer: bool = False,
    **kwargs: Any,
):
    """`select_neurons` over the Linear layers of `parts`, each part with its own layer budget.

    `layer_ratio` is one fraction for every part or ``{"vision": .., "projector": .., "language": ..}``; entries
    for a part without Linear layers (Gemma 3's projector) are ignored. `specific_parts` lists the parts that may
    hold language-specific rows; in the others those rows become agnostic (same rows, shared by every group).
    ``"auto"`` (default): every part (packed-patch towers such as Qwen2-VL's are routed through
    `packed_patch_samples`). ``selection.decide()`` re-runs the plain decision (undoing this). Other arguments go
    to `select_neurons`.
    """
    if "target_modules" in kwargs:
        raise TypeError("select_vlm_neurons() chooses target_modules from `parts`; use select_neurons() otherwise")
    targets = vlm_target_modules(model, parts, include_output_layer=include_output_layer)
    if isinstance(layer_ratio, Mapping):
        unknown = sorted(set(layer_ratio) - set(PARTS))
        if unknown:
            raise ValueError(f"layer_ratio: unknown part(s) {unknown}; parts are {list(PARTS)}")
        layer_ratio = {p: r for p, r in layer_ratio.items() if targets.get(p)}
    if specific_parts == "auto":
        specific_parts = PARTS
    specific_parts = () if specific_parts is None else _parts_arg(specific_parts) if specific_parts else ()
    selection = select_neurons(model, calibration, target_modules=flatten_targets(targets), layer_ratio=layer_ratio,
                               **kwargs)  # fmt: skip
    # rows and (unit="channel" / "mlp_neuron") columns alike
    for agnostic, language in ((selection.neurons, selection.language_neurons),
                               (selection.columns, selection.language_columns)):  # fmt: skip
        for group, rows in list(language.items()):
            for name in [n for n in rows if model_part(n) not in specific_parts]:
                agnostic[name] = sorted(agnostic.get(name, []) + rows.pop(name))
            if not rows:
                del language[group]
    return selection
