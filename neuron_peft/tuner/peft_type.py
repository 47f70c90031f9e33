"""The method's identity inside PEFT: the ``PeftType.NEURON_SELECT`` member, its name and its tensor prefix.

PEFT keys every method by a member of its `PeftType` enum, and transformers' ``load_adapter`` reads
``peft_type.value.lower()`` to find adapter tensors by prefix. PEFT 0.21's ``register_peft_method`` requires the
member to exist already and there is no public way to add one out of tree, so it is added here (private ``enum``
internals, isolated in `_add_enum_member` and tested) when this module is imported. The method itself is put into
PEFT's tables by `neuron_peft.tuner.registration.register`.

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

from peft.utils import PeftType

NAME = "neuron_select"
PREFIX = "neuron_select_"


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
