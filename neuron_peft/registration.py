"""Register NeuronSelect with PEFT, and the few places where PEFT / transformers have no hook for a third-party method.

`register()` (run by ``import neuron_peft``) changes other libraries in exactly these ways, each NeuronSelect-only
or a pure improvement of an error message:

1. **The registration.** PEFT keys every method by a member of its `PeftType` enum, and transformers'
   ``load_adapter`` reads ``peft_type.value.lower()`` to find adapter tensors by prefix. PEFT 0.21's
   ``register_peft_method`` requires the member to exist already and there is no public way to add one out of tree,
   so we add it (private ``enum`` internals, isolated in `_add_enum_member` and tested), then call
   ``register_peft_method``.
2. **A readable error for unreadable adapter files** (`AdapterFileError`): PEFT calls safetensors' ``safe_load_file``
   directly; no tuner method runs before it.
3. **The model card.** PEFT builds README.md in ``PeftModel.create_or_update_model_card`` and calls no tuner or
   config method for it (peft 0.21.2: it reads only ``base_model.model_tags``, the base config and the peft type),
   so the NeuronSelect part of the card (`neuron_peft.model_card`) is added by wrapping that method; adapters of
   other methods pass through untouched.
4. **push_to_hub keeps that card.** transformers' ``PushToHubMixin.push_to_hub`` (5.x) overwrites the README.md that
   ``save_pretrained`` wrote with the Hub repo's card (or a blank template) right before uploading, so the pushed
   card would say nothing about the method. For NeuronSelect adapters the card is re-applied on top of that card
   just before the upload; other adapters pass through untouched.

Not needed any more: a wrapper of ``PeftModel.__init__`` adding ``neuron_groups`` to ``special_peft_forward_args``.
That attribute is set per instance inside ``PeftModel.__init__`` (no tuner hook), but nothing needs PEFT to strip the
keyword: the adapted model's forward pre-hook takes it out of every call (`neuron_peft.routing.GroupsPreHook`) and
`declare_groups_argument` lists it in the forward signature, so transformers' ``generate`` accepts it too.

What cannot be done: a process that did not ``import neuron_peft`` cannot load a NeuronSelect adapter, and the error
is PEFT's bare ``KeyError: 'NEURON_SELECT'``. Every loader (``PeftModel.from_pretrained``, ``AutoPeftModel*``,
``PeftConfig.from_pretrained``, transformers' ``from_pretrained`` on an adapter folder and ``load_adapter``) first
reads ``adapter_config.json`` and looks its ``peft_type`` up in ``PEFT_TYPE_TO_CONFIG_MAPPING``; nothing else in the
file is read before that lookup (``auto_mapping`` is read after it), PEFT has no plugin entry points, and changing
the stored ``peft_type`` would break the saved-adapter format and transformers' prefix lookup. The model card
therefore starts with ``pip install neuron-peft`` and ``import neuron_peft``.
"""

from __future__ import annotations

import enum
import inspect
from typing import Optional

from peft.utils import PeftType, register_peft_method

NAME = "neuron_select"
PREFIX = "neuron_select_"
GROUPS_ARGUMENT = "neuron_groups"


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add `name = value` to a str-valued Enum as if it had been declared in the class body."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(enum_cls, "_add_member_"):  # Python >= 3.13 keeps extra bookkeeping here
        enum_cls._add_member_(name, member)
    else:
        enum_cls._member_map_[name] = member
        type.__setattr__(enum_cls, name, member)
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    return member


NEURON_SELECT_PEFT_TYPE = _add_enum_member(PeftType, NAME.upper(), NAME.upper())


def register() -> None:
    """Put NeuronSelect into PEFT's method tables (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import NeuronSelectConfig
    from .model import NeuronSelectModel

    _wrap_weight_loader()
    _wrap_model_card()
    _wrap_push_to_hub()
    if PEFT_TYPE_TO_CONFIG_MAPPING.get(NEURON_SELECT_PEFT_TYPE) is NeuronSelectConfig:
        return
    register_peft_method(name=NAME, config_cls=NeuronSelectConfig, model_cls=NeuronSelectModel, prefix=PREFIX)


class AdapterFileError(ValueError):
    """An adapter weights file is unreadable (corrupt or truncated)."""


def _wrap_once(owner, name: str, make) -> None:
    """Replace ``owner.name`` by ``make(original)`` unless already done (import is idempotent, wrappers never stack)."""
    original = getattr(owner, name)
    if getattr(original, "_neuron_peft_wrapped", False):
        return
    wrapped = make(original)
    wrapped._neuron_peft_wrapped = True
    wrapped.__wrapped__ = original
    setattr(owner, name, wrapped)


def _wrap_weight_loader() -> None:
    """Make PEFT name the file when safetensors cannot read it, instead of a bare header error."""
    import peft.utils.save_and_load as sl

    def make(original):
        def safe_load_file(filename, *args, **kwargs):
            try:
                return original(filename, *args, **kwargs)
            except Exception as err:  # safetensors raises its own SafetensorError (not an OSError) for bad files
                unreadable = type(err).__name__ == "SafetensorError" or (
                    isinstance(err, (EOFError, OSError)) and "safetensors" in str(filename)
                )
                if unreadable:
                    raise AdapterFileError(f"corrupt or truncated adapter file {filename}: {err}") from err
                raise

        return safe_load_file

    _wrap_once(sl, "safe_load_file", make)


def is_neuron_select(peft_model) -> bool:
    """Whether a PeftModel's active adapter is a NeuronSelect adapter."""
    config = getattr(peft_model, "active_peft_config", None)
    return getattr(config, "peft_type", None) == NEURON_SELECT_PEFT_TYPE


def _wrap_model_card() -> None:
    """After PEFT writes its card on save, add the NeuronSelect part (usage, selection summary); see point 3 above."""
    from peft import PeftModel

    def make(original):
        def create_or_update_model_card(self, output_dir: str):
            original(self, output_dir)
            if is_neuron_select(self):
                from .model_card import update_model_card

                update_model_card(self, output_dir, adapter_id=output_dir)

        return create_or_update_model_card

    _wrap_once(PeftModel, "create_or_update_model_card", make)


def _wrap_push_to_hub() -> None:
    """Re-apply the card that ``save_pretrained`` wrote after transformers replaced it on push; see point 4 above.

    transformers' ``push_to_hub`` saves into a temporary folder, overwrites its README.md with the Hub's card, then
    calls ``self._upload_modified_files(folder, repo_id, ...)``. For this one call the instance gets an
    ``_upload_modified_files`` that first updates the card in that folder (PEFT's part, then ours, with the repo id
    in the load snippet) and then uploads as transformers would. Where transformers has no such method the push
    goes ahead unchanged (with the Hub's card).
    """
    from peft import PeftModel

    def make(original):
        def push_to_hub(self, repo_id: str, *args, **kwargs):
            upload = getattr(self, "_upload_modified_files", None)
            if not is_neuron_select(self) or upload is None:
                return original(self, repo_id, *args, **kwargs)

            def _upload_modified_files(working_dir, repo_id_, *a, **k):
                from .model_card import update_model_card

                self.create_or_update_model_card(working_dir)  # PEFT's card fields (and ours) on the Hub's card
                update_model_card(self, working_dir, adapter_id=repo_id_)  # the load snippet names the repo
                return upload(working_dir, repo_id_, *a, **k)

            self.__dict__["_upload_modified_files"] = _upload_modified_files
            try:
                return original(self, repo_id, *args, **kwargs)
            finally:
                self.__dict__.pop("_upload_modified_files", None)

        return push_to_hub

    _wrap_once(PeftModel, "push_to_hub", make)


# ------------------------------------------------------------------------------------- the neuron_groups keyword
class ForwardWithGroups:
    """Instance-level ``forward`` of an adapted model: the same call, with ``neuron_groups`` in its signature.

    The keyword already works on the adapted model (its forward pre-hook takes it out of every call), but code that
    decides what to pass by *inspecting* ``forward`` did not know it: transformers' ``Trainer`` (default
    ``remove_unused_columns=True``) keeps only dataset columns named like ``forward`` parameters of
    ``peft_model.get_base_model()``, and ``generate`` rejects model kwargs ``forward`` does not declare. Declaring
    the keyword lets a ``neuron_groups`` dataset column survive Trainer's defaults and ``generate(neuron_groups=...)``
    pass. The call itself goes to the model's class ``forward`` (or to the instance-level forward that was there
    before, e.g. accelerate's offloading hook), so behaviour is unchanged.
    """

    def __init__(self, module, previous=None):
        self.module = module
        self.previous = previous  # an instance-level forward installed before us (accelerate hooks), or None
        self.__name__ = "forward"
        self.__doc__ = getattr(type(module).forward, "__doc__", None)

    def _target(self):
        return self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self._target())
        params = list(sig.parameters.values())
        if GROUPS_ARGUMENT in sig.parameters:
            return sig
        extra = inspect.Parameter(GROUPS_ARGUMENT, inspect.Parameter.KEYWORD_ONLY, default=None)
        var_kw = [i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD]
        params.insert(var_kw[0] if var_kw else len(params), extra)
        return sig.replace(parameters=params)

    def __call__(self, *args, **kwargs):
        groups = kwargs.pop(GROUPS_ARGUMENT, None)
        if groups is not None:  # ``model.forward(...)`` called directly skips the pre-hook: route here instead
            from .routing import route_state

            route_state(self.module).set(groups)
        return self._target()(*args, **kwargs)


def declare_groups_argument(model) -> None:
    """List ``neuron_groups`` in ``model.forward``'s signature (idempotent); see `ForwardWithGroups`."""
    current = model.__dict__.get("forward")
    if isinstance(current, ForwardWithGroups):
        return
    model.forward = ForwardWithGroups(model, previous=current)


def undeclare_groups_argument(model) -> None:
    """Undo `declare_groups_argument` (on unload/merge), leaving any forward wrapper installed after ours alone."""
    current = model.__dict__.get("forward")
    if not isinstance(current, ForwardWithGroups):
        return
    if current.previous is not None:
        model.forward = current.previous
    else:
        del model.__dict__["forward"]


# -------------------------------------------------------------------------------------- unsupported PEFT methods
class UnsupportedPeftMethods:
    """PEFT tuner methods NeuronSelect does not implement: each fails with `NotImplementedError` saying what to do.

    Checked against peft 0.21.2: of the public ``PeftModel`` / ``BaseTuner`` / ``LoraModel`` methods, these two are
    LoRA-only and would otherwise end in an unrelated ``AttributeError`` from the base model (PeftModel forwards
    unknown attributes to the tuner, the tuner to the transformers model). The others either work (save/load, adapters
    add/set/delete, merge/unmerge/unload, enable/disable, ``set_requires_grad``, ``get_layer_status``,
    ``get_model_status``, ``low_cpu_mem_usage`` loading) or PEFT already refuses them with a message naming the method
    type: ``convert_to_lora`` (TypeError), hotswapping (ValueError), ``PeftMixedModel`` (ValueError) and
    ``save_pretrained(path_initial_model_for_weight_conversion=...)`` (ValueError).
    """

    def add_weighted_adapter(self, adapters=None, weights=None, adapter_name: Optional[str] = None, *args, **kwargs):
        raise NotImplementedError(
            "add_weighted_adapter is not supported by NeuronSelect: adapters select different rows, so there is no "
            "row-wise weighted sum of their deltas. Instead merge the adapters into the base weights one after the "
            "other (set_adapter(name); merge_adapter()) or merge_and_unload(adapter_names=[...]), then select neurons "
            "again on the merged model and train a new adapter."
        )

    def subtract_mutated_init(self, *args, **kwargs):
        raise NotImplementedError(
            "subtract_mutated_init is LoRA-only (PiSSA/OLoRA/CorDA initialisations that change the base weights); "
            "NeuronSelect never changes the saved base weights, so its adapters need no conversion."
        )
