"""README stays true: exactly two set-up commands, CI runs the test one verbatim, the Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)]


def test_two_setup_commands_and_ci_runs_the_test_one():
    commands = blocks("bash")
    assert len(commands) == 2, commands
    demo, tests = commands
    assert "neuron-peft demo" in demo and "torch==2.13.0" in demo
    assert "pytest" in tests and "torch==2.13.0" in tests
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()


def test_python_examples_run(tmp_path, monkeypatch):
    """Every Python block of the README, in order, in one namespace (as a reader would paste them)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "readme"}
    for i, example in enumerate(blocks("python")):
        exec(compile(example, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "selection" / "neuron_selection.json").exists()
    assert (tmp_path / "layers.png").exists() and (tmp_path / "neurons.png").exists()
