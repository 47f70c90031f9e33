"""Fixtures and session settings for the test suite (tiny models live in `tiny_models.py`, helpers in
`testing_utils.py`: both are ordinary modules that tests import)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tiny_models import ARCHS  # noqa: E402

import neuron_peft  # noqa: E402,F401  (registers the PEFT method)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param
