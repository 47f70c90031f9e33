"""Shared by the selection_value.py smoke tests: the benchmark module (a run of it: testing_utils.run_selection_value)."""

from __future__ import annotations

import pytest
from testing_utils import load_benchmark


@pytest.fixture(scope="module")
def sv():
    return load_benchmark("selection_value")
