"""conftest.py for PEFT's generic suite when it runs NeuronSelect cases (copied next to PEFT's test files).

- Registers NeuronSelect with PEFT before PEFT's test modules import.
- PEFT's testing_common / testing_utils import ``diffusers`` and ``datasets`` at module level, for Stable
  Diffusion and hub-dataset tests that never run here. When they are not installed, a stand-in module is put in
  their place: ``StableDiffusionPipeline`` is a class nothing is an instance of (PEFT only uses it in
  ``isinstance``), and ``load_dataset`` raises, naming this file, if anything ever calls it.
- Applies ``NOT_APPLICABLE`` from neuron_select_cases.py: those PEFT tests are skipped for NeuronSelect items
  only, with the reason given there (PEFT itself does this with ``pytest.skip`` inside each test).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _stand_in(name: str, **attrs) -> None:
    if importlib.util.find_spec(name) is not None:
        return
    module = types.ModuleType(name)
    module.__doc__ = f"stand-in for {name!r} (not installed), created by neuron_peft's generic-suite conftest"
    module.__dict__.update(attrs)
    sys.modules[name] = module


class _NotInstalledPipeline:
    """Stand-in for diffusers.StableDiffusionPipeline: no object is ever an instance of it."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("diffusers is not installed (stand-in from neuron_peft's generic-suite conftest)")


def _no_datasets(*args, **kwargs):
    raise RuntimeError("datasets is not installed (stand-in from neuron_peft's generic-suite conftest)")


_stand_in("diffusers", StableDiffusionPipeline=_NotInstalledPipeline)
_stand_in("datasets", load_dataset=_no_datasets)

import neuron_peft  # noqa: E402,F401  (registers NEURON_SELECT with PEFT)
from neuron_peft import NeuronSelectConfig  # noqa: E402

from .neuron_select_cases import NOT_APPLICABLE  # noqa: E402


def _is_neuron_select(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    return any(value is NeuronSelectConfig for value in callspec.params.values())


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = NOT_APPLICABLE.get(getattr(item, "originalname", item.name))
        if reason and _is_neuron_select(item):
            item.add_marker(pytest.mark.skip(reason=f"not applicable to NeuronSelect: {reason}"))
