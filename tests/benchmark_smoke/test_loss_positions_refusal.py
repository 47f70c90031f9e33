"""benchmarks/loss_positions.py never replaces a file the user already has, unless told to."""

from __future__ import annotations

import pytest
from testing_utils import load_benchmark


def test_existing_json_is_refused_before_any_timing(tmp_path):
    target = tmp_path / "mine.json"
    target.write_text("user data")
    bench = load_benchmark("loss_positions")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        bench.main(["--json", str(target)])
    assert target.read_text() == "user data"
