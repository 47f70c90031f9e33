"""Language routing: a group's language-specific rows learn only from that group's samples.

The forward never changes (every delta applies to every sample: one model at inference). Only the weight
gradient is routed: each layer turns the batch's group names into a (samples x k) 0/1 mask that the sparse
backward multiplies into ``grad_out[..., rows]`` before ``^T @ x``. Agnostic rows see every sample.

Groups reach the layers through one `RouteState` per model, set by ``model(**batch, neuron_groups=[...])`` (see
`neuron_peft.tuner.groups_keyword`) or by ``with neuron_peft.route(model, groups):``. The state stays set until the next top-level forward, so gradient
checkpointing (which re-runs layer forwards during backward) sees the same groups as the original forward.

Vision towers that pack every image's patches into one ``(patches, dim)`` tensor (Qwen2-VL, Qwen2.5-VL: the
forward takes ``image_grid_thw``) have no sample axis. For them the pre-hook maps each packed row to its sample
from ``image_grid_thw`` / ``video_grid_thw`` and the image tokens in ``input_ids``
(`neuron_peft.tuner.packed_patches`), so their language-specific rows are routed too.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Sequence
from typing import Optional

import torch

from ..errors import RoutingError
from ..trainer_hints import missing_groups_hint
from .packed_patches import packed_patch_samples


class RouteState:
    """The current batch's group names, shared by every NeuronSelect layer of one model."""

    def __init__(self) -> None:
        self.groups: Optional[list[str]] = None
        self.context_groups: Optional[list[str]] = None  # set by `route(model, groups)`
        self.call_groups: Optional[list[str]] = None  # set by PeftModel for one call (special forward arg)
        self.adapter_groups: dict[str, list[str]] = {}  # adapter name -> its groups (config.groups order)
        self._ids: dict = {}
        self.packed: dict[int, torch.Tensor] = {}  # packed row count -> sample index of each row (vision towers)
        self._warned_no_groups = False
        self._warned_batch = False
        self._layer = None  # weak reference to one layer, to read the active adapters

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_layer"] = None
        return state

    def attach(self, layer) -> None:
        self._layer = weakref.ref(layer)
        layer._route = self

    def active_adapters(self) -> list[str]:
        layer = self._layer() if self._layer is not None else None
        return list(layer.active_adapters) if layer is not None else list(self.adapter_groups)

    def set(self, groups, active_adapters: Optional[Sequence[str]] = None) -> None:
        """Groups of the coming batch: a sequence of group names, or a 1-D integer tensor of indices into each active
        adapter's ``config.groups`` (the form for `torch.compile`: names are Python constants a compiled graph is
        specialised on, so every new pattern of names in a batch would compile again)."""
        if active_adapters is None:
            active_adapters = self.active_adapters()
        if isinstance(groups, torch.Tensor):
            groups = self._check_group_ids(groups, active_adapters)
        elif groups is not None:
            if isinstance(groups, str):
                raise RoutingError("neuron_groups must be a sequence with one group name per sample, not a string")
            missing = [i for i, g in enumerate(groups) if g is None]
            if missing:
                raise RoutingError(f"neuron_groups has no group for sample(s) {missing[:8]}; {missing_groups_hint()}")
            groups = [str(g) for g in groups]
            if not groups:
                raise RoutingError("neuron_groups is empty; give one group name per sample")
            for adapter in active_adapters:
                known = self.adapter_groups.get(adapter) or []
                unknown = sorted(set(groups) - set(known)) if known else []
                if unknown:
                    raise RoutingError(
                        f"unknown group name(s) {unknown} for adapter {adapter!r}; its groups are {known}"
                    )
        self.groups = groups
        self._ids = {}
        self.packed = {}

    def _check_group_ids(self, ids: torch.Tensor, active_adapters: Sequence[str]) -> torch.Tensor:
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise RoutingError(
                f"neuron_groups as a tensor must be 1-D integer group indices (one per sample), got dtype {ids.dtype} "
                f"and shape {tuple(ids.shape)}"
            )
        if ids.numel() == 0:
            raise RoutingError("neuron_groups is empty; give one group index per sample")
        if not torch.compiler.is_compiling():  # a value check would break the compiled graph; eager calls get it
            for adapter in active_adapters:
                known = self.adapter_groups.get(adapter) or []
                bad = ids[(ids < 0) | (ids >= len(known))].unique().tolist() if known else []
                if bad:
                    raise RoutingError(
                        f"group index(es) {bad[:8]} out of range for adapter {adapter!r}, whose groups are {known} "
                        f"(indices 0..{len(known) - 1})"
                    )
        return ids

    def set_packed(self, module, kwargs: dict) -> None:
        """Map the rows of a packed-patch vision tower to samples, from the call's grids and image tokens."""
        if self.groups is None:
            return
        if kwargs.get("image_grid_thw") is None and kwargs.get("video_grid_thw") is None:
            return
        self._ids = {}  # cached packed maps belong to the previous call
        self.packed = packed_patch_samples(
            getattr(module, "config", None), kwargs.get("input_ids"), kwargs.get("image_grid_thw"),
            kwargs.get("video_grid_thw"), n_samples=len(self.groups),
        )  # fmt: skip

    def _sample_ids(self, adapter: str, device: torch.device) -> torch.Tensor:
        if isinstance(self.groups, torch.Tensor):
            return self.groups.to(device)  # already indices into the adapter's groups
        key = (adapter, device)
        if key not in self._ids:
            index = {g: i for i, g in enumerate(self.adapter_groups.get(adapter) or [])}
            self._ids[key] = torch.tensor([index.get(g, -2) for g in self.groups], dtype=torch.long, device=device)
        return self._ids[key]

    def _packed_ids(self, adapter: str, device: torch.device, rows: int) -> Optional[torch.Tensor]:
        """The group of each of ``rows`` packed patch rows, or None when no packing has that many rows (cached:
        every vision layer of the call asks for the same map)."""
        if rows not in self.packed:
            return None
        key = (adapter, device, rows)
        if key not in self._ids:
            self._ids[key] = self._sample_ids(adapter, device)[self.packed[rows].to(device)]
        return self._ids[key]

    def mask_for(
        self, layer, adapter: str, batch: int, ndim: Optional[int] = None, unit: str = "row"
    ) -> Optional[torch.Tensor]:
        """(samples, k) mask of which rows (``unit="column"``: columns) each sample may update, or None when every
        unit sees every sample.

        ``batch`` is the layer input's leading size and ``ndim`` its number of dimensions: a 2-D input whose length
        is a packed-patch row count (see `set_packed`) gets one mask row per packed row.
        """
        if unit == "column":
            if not layer.has_specific_columns(adapter):
                return None
            row_groups = layer.neuron_select_col_groups[adapter]
        else:
            if not layer.has_specific_rows(adapter):
                return None
            row_groups = layer.neuron_select_row_groups[adapter]
        if self.groups is None:
            if not self._warned_no_groups and torch.is_grad_enabled():
                warnings.warn(
                    "NeuronSelect: a training batch came without neuron_groups, so only language-agnostic rows "
                    "receive gradient (pass neuron_groups=[...] or use neuron_peft.route(model, groups)). "
                    + missing_groups_hint(),
                    stacklevel=3,
                )
                self._warned_no_groups = True
            return (row_groups == -1).unsqueeze(0)
        ids = self._sample_ids(adapter, row_groups.device)
        if ids.shape[0] != batch:
            packed = self._packed_ids(adapter, row_groups.device, batch) if ndim == 2 else None
            if packed is not None:
                ids = packed  # the group of each packed patch row
            elif bool((ids == ids[0]).all()):
                ids = ids[:1]  # one group for the whole batch: broadcast over whatever the layer's batch is
            else:
                if not self._warned_batch:
                    warnings.warn(
                        f"NeuronSelect: a layer saw {batch} samples but the batch has {len(self.groups)} group "
                        "names (e.g. a vision tower over image patches that could not be mapped to samples); its "
                        "language-specific rows get no gradient from mixed-language batches.",
                        stacklevel=3,
                    )
                    self._warned_batch = True
                return (row_groups == -1).unsqueeze(0)
        return (row_groups == -1).unsqueeze(0) | (row_groups.unsqueeze(0) == ids.unsqueeze(1))


def route_state(model) -> RouteState:
    """The route state of a model carrying NeuronSelect layers (PeftModel, tuner, DDP wrapper, or plain model)."""
    for module in model.modules():
        state = getattr(module, "_route", None)
        if isinstance(state, RouteState):
            return state
    raise TypeError("neuron_peft.route() needs a model with a NeuronSelect adapter")


def group_ids(model, groups: Sequence[str], adapter: Optional[str] = None) -> torch.Tensor:
    """Group names -> the 1-D int64 tensor of indices into the adapter's ``config.groups`` that ``neuron_groups``
    also accepts. Convert outside a `torch.compile`d step (e.g. in the collator) so the compiled graph sees a
    tensor, not names it would specialise on."""
    state = route_state(model)
    adapter = adapter or (state.active_adapters() or [None])[0]
    known = state.adapter_groups.get(adapter) or []
    unknown = sorted({str(g) for g in groups} - set(known))
    if unknown:
        raise RoutingError(f"unknown group name(s) {unknown} for adapter {adapter!r}; its groups are {known}")
    index = {g: i for i, g in enumerate(known)}
    return torch.tensor([index[str(g)] for g in groups], dtype=torch.long)


@contextlib.contextmanager
def route(model, groups: Sequence[str]):
    """Route the weight gradients of the forwards inside this block by ``groups`` (one name per sample)."""
    state = route_state(model)
    state.set(groups)
    previous = state.context_groups
    state.context_groups = groups if isinstance(groups, torch.Tensor) else list(groups)
    try:
        yield
    finally:
        state.context_groups = previous
