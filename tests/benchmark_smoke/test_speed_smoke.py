"""Smoke test of benchmarks/speed.py: one tiny round of every method, so the benchmark cannot silently rot."""

from __future__ import annotations

import importlib
import json
import math

import pytest
from testing_utils import load_benchmark


@pytest.fixture(scope="module")
def speed():
    return load_benchmark("speed")


@pytest.fixture(scope="module")
def timing(speed):
    """benchmarks/common/timing.py (importable once the runner has put benchmarks/ on sys.path)."""
    return importlib.import_module("common.timing")


@pytest.fixture(scope="module")
def run(speed, tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed.json"
    lines: list[str] = []
    results = speed.main(
        ["--preset", "tiny", "--threads", "1", "--rounds", "1", "--warmup", "0", "--json", str(out)], log=lines.append
    )
    return results, "\n".join(lines), out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_every_method_measured(speed, run):
    results, _, _ = run
    assert list(results["methods"]) == speed.METHODS
    for name, r in results["methods"].items():
        assert _finite(r["ms_median"]) and r["ms_median"] > 0, name
        assert _finite(r["peak_mib"]) and r["peak_mib"] > 0, name
        assert len(r["ms_all"]) == 1, name
        assert (r["trainable"] == 0) == (name == "floor"), name


def test_table_lists_every_method(speed, run):
    _, text, _ = run
    table = [ln for ln in text.splitlines() if ln.startswith("| ")]
    for name in speed.METHODS:
        row = next((ln for ln in table if ln.split("|")[1].strip() == name), None)
        assert row is not None, f"{name} missing from the table"
        cells = [c.strip() for c in row.split("|")[2:-1]]
        # trainable, ms/step, x LoRA, x floor, min ms, cpu-ms, peak MiB, mem x LoRA are all numbers
        for cell in cells[:8]:
            assert math.isfinite(float(cell.replace(",", ""))), row
    assert "x full" in text and "MET" in text


def test_memory_is_sensible(run):
    """The peak-memory method must see optimizer state and gradients, not just activations."""
    m = run[0]["methods"]
    assert m["full"]["peak_mib"] > m["lora"]["peak_mib"] > m["floor"]["peak_mib"]
    assert m["neuron-100"]["peak_mib"] > m["neuron-10"]["peak_mib"] > m["floor"]["peak_mib"]


def test_inference_and_json(run):
    results, _, out = run
    inf = results["inference"]
    assert set(inf) == {"base", "neuron-10 unmerged", "neuron-10 merged"}
    assert all(_finite(v["ms_median"]) for v in inf.values())
    dumped = json.loads(out.read_text())
    assert set(dumped["methods"]) == set(results["methods"])
    assert {t["target"] for t in dumped["targets"]} == {t["target"] for t in results["targets"]}


def test_cuda_absent_skips_cleanly(speed, monkeypatch):
    monkeypatch.setattr(speed.torch.cuda, "is_available", lambda: False)
    lines: list[str] = []
    assert speed.main(["--preset", "gpu-1b"], log=lines.append) is None
    assert "CUDA is not available" in lines[0]


def test_peak_replay(timing):
    """cpu_peak_bytes replays alloc/free events in time order and counts only the peak after the marker."""
    from types import SimpleNamespace as NS

    def ev(t, nbytes, name="[memory]"):
        return NS(name=lambda: name, start_ns=lambda: t, nbytes=lambda: nbytes)

    # 100 live before the marker (peak 150 there), then +30, -50, +70 -> peak 150 after the marker at t=5
    events = [ev(4, -50), ev(1, 100), ev(2, 50), ev(5, 0, "mark"), ev(6, 30), ev(7, -50), ev(8, 70), ev(3, 0, "x")]
    prof = NS(profiler=NS(kineto_results=NS(events=lambda: events)))
    assert timing.cpu_peak_bytes(prof, 5) == 150
    assert timing.cpu_peak_bytes(prof, 0) == 150
    events.append(ev(9, 100))
    assert timing.cpu_peak_bytes(prof, 5) == 250


def test_column_methods_match_their_reference_count_and_train_only_column_units(speed):
    """channel-* train input columns of o_proj / down_proj only, mlp-neuron-* down_proj columns with the same
    gate/up rows; both at neuron-10's count (the tiny model's LoRA r16 is larger than every column unit, so the
    "-lora" variants are refused there, which is checked too). neuron-10 by hand: 10% of each projection's rows
    (rounded) x inputs; tiny Llama per block q 64x64, k/v 32x64, o 64x64, gate/up 160x64, down 64x160."""
    preset = speed.PRESETS["tiny"]
    rows10 = [(6, 64), (3, 64), (3, 64), (6, 64), (16, 64), (16, 64), (6, 160)]
    neuron10 = 2 * sum(k * i for k, i in rows10)
    assert speed._count_trainable("neuron-10", preset) == neuron10
    for name, per_unit in (("channel-10", 64), ("mlp-neuron-10", 64 + 2 * 64)):
        model = speed.BUILDERS[name](speed.build_base(preset))
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert abs(n - neuron10) <= 2 * 2 * per_unit, (name, n, neuron10)  # rounding: a unit per writer
        trained = {k for k, p in model.named_parameters() if p.requires_grad}
        allowed = ("o_proj", "down_proj") if name.startswith("channel") else ("gate_proj", "up_proj", "down_proj")
        assert trained and all(any(a in k for a in allowed) for k in trained), sorted(trained)
        # the writers' weights train as columns (their row delta is the documented empty (0, in) one)
        shapes = {k: p.shape for k, p in model.named_parameters() if p.requires_grad and p.numel()}
        assert all("col_delta" in k for k in shapes if "down_proj" in k or "o_proj" in k), shapes
    with pytest.raises(SystemExit, match="exceed every column unit"):
        speed.BUILDERS["channel-lora"](speed.build_base(preset))
