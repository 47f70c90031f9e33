"""Never destructive, never silently wrong: output folders, atomic writes, adapter files, bad input (issue 13 §2-3).

References are independent of the code under test: the bytes of untouched input files (hashed before and after),
hand-written expected values, and a dense computation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from neuron_peft import fileio
from neuron_peft.fileio import OutputPathError


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, by relative path: the reference for "nothing was touched"."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ------------------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_keeps_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "scores.json"
    target.write_text('{"old": 1}\n')
    with pytest.raises(OSError, match="disk full"):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text('{"new": ')  # half a file, then the writer dies
            raise OSError("disk full")
    assert target.read_text() == '{"old": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]  # no temporary file left behind
    fileio.atomic_write_json(target, {"new": [1, 2]})
    assert json.loads(target.read_text()) == {"new": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]


def test_atomic_path_keeps_suffix_for_format_sniffing_writers(tmp_path):
    with fileio.atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.name.startswith(".")
        tmp.write_bytes(b"png")
    assert (tmp_path / "plot.png").read_bytes() == b"png"


def _selection():
    from test_selection import calibration, tiny_llama

    from neuron_peft import select_neurons

    return select_neurons(tiny_llama(), calibration(), neuron_ratio=0.5, specific_ratio=0.2, progress=False)


def test_selection_save_is_atomic(tmp_path, monkeypatch):
    """An interrupted NeuronSelection.save leaves the previous files byte for byte (before: truncated files)."""
    import safetensors.torch

    sel = _selection()
    sel.save(tmp_path)
    before = tree_digest(tmp_path)

    def dying_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save_file)
    with pytest.raises(OSError, match="disk full"):
        sel.save(tmp_path)
    assert tree_digest(tmp_path) == before
    monkeypatch.undo()

    sel.layer_ratio = object()  # not JSON-serialisable: the metadata write fails half-way
    with pytest.raises(TypeError):
        sel.save(tmp_path)
    assert tree_digest(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["neuron_selection.json", "neuron_selection.safetensors"]


# ------------------------------------------------------------------------------------------------ output folders
def test_check_output_dir_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "corpus.jsonl"
    data.write_text("{}\n")
    inputs = [("--model", model), ("--data", data), ("--adapter", None)]
    for out, why in [
        (model, "same path as the input --model"),
        (model / "sub", "sits inside the input --model"),
        (tmp_path, "contains the input --model"),
        (data, "is an existing file"),
    ]:
        with pytest.raises(OutputPathError, match=why):
            fileio.check_output_dir(out, inputs=inputs, overwrite=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    with pytest.raises(OutputPathError, match="--out .*busy exists and is not empty.*--overwrite"):
        fileio.check_output_dir(busy, inputs=inputs)
    assert fileio.check_output_dir(busy, inputs=inputs, overwrite=True) == busy.resolve()
    assert fileio.check_output_dir(tmp_path / "new" / "deep", inputs=inputs) == (tmp_path / "new" / "deep").resolve()
    with pytest.raises(OutputPathError, match="same path as the input --data"):
        fileio.check_output_file(data, inputs=inputs, overwrite=True)
    with pytest.raises(OutputPathError, match="is an existing folder"):
        fileio.check_output_file(busy, inputs=inputs, overwrite=True)
    with pytest.raises(OutputPathError, match="already exists"):
        fileio.check_output_file(busy / "mine.txt", inputs=inputs)


def test_write_into_replaces_only_written_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    (out / "report.json").write_text("old")

    def write(stage):
        (stage / "report.json").write_text("new")
        (stage / "sub").mkdir()
        (stage / "sub" / "a.bin").write_bytes(b"a")

    written, kept = fileio.write_into(out, write)
    assert tree_digest(out) == tree_digest_of({"mine.txt": b"keep me", "report.json": b"new", "sub/a.bin": b"a"})
    assert [p.name for p in written] == ["report.json", "a.bin"] and [p.name for p in kept] == ["mine.txt"]

    def failing(stage):
        (stage / "report.json").write_text("half")
        raise RuntimeError("boom")

    before = tree_digest(out)
    with pytest.raises(RuntimeError, match="boom"):
        fileio.write_into(out, failing)
    assert tree_digest(out) == before and not [p for p in out.iterdir() if p.name.startswith(".")]
    with pytest.raises(RuntimeError, match="boom"):
        fileio.write_into(tmp_path / "fresh", failing)
    assert not (tmp_path / "fresh").exists()  # a folder made for a failed write is removed again


def tree_digest_of(files: dict[str, bytes]) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in sorted(files.items())}
