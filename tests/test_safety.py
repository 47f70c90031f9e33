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
import torch
from testing_utils import calibration, load_benchmark, run_cli, tree_digest, write_tiny_corpus
from tiny_models import TARGETS, routed_llama_config, tiny_llama, tiny_qwen2, write_tiny_model

from neuron_peft import fileio
from neuron_peft.fileio import OutputPathError


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


# --------------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """model/ (tiny Llama), corpus.jsonl and adapter/ (trained by the CLI once for the module)."""
    from neuron_peft import cli

    root = tmp_path_factory.mktemp("cli")
    write_tiny_model(root / "model")
    write_tiny_corpus(root / "corpus.jsonl")
    assert cli.main(TRAIN + ["--model", str(root / "model"), "--data", str(root / "corpus.jsonl"),
                             "--out", str(root / "adapter")]) == 0  # fmt: skip
    return root


TRAIN = ["train", "--steps", "2", "--batch-size", "4", "--threads", "1"]


def one_error_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_cli_merge_never_destroys_its_inputs(workspace, capsys):
    """Before: `merge --out <adapter>` replaced the adapter folder by the merged model (and --out . emptied cwd)."""
    before = tree_digest(workspace)
    (workspace / "afile").write_text("x")
    model, adapter = workspace / "model", workspace / "adapter"
    merge = ["merge", "--model", model, "--adapter", adapter, "--threads", "1"]
    for out, why in [
        (adapter, "same path as the input --adapter"),
        (model, "same path as the input --model"),
        (adapter / "merged", "sits inside the input --adapter"),
        (workspace, "contains the input --model"),
        (workspace / "afile", "is an existing file"),
    ]:
        assert run_cli(merge + ["--out", out, "--overwrite"]) == 2
        one_error_line(capsys, "neuron-peft merge: error: --out", why)
    (workspace / "afile").unlink()
    assert tree_digest(workspace) == before


def test_cli_out_refuses_non_empty_folder_and_overwrite_replaces_only_its_files(
    workspace, tmp_path, capsys, monkeypatch
):
    """Before: an existing --out was deleted wholesale (rmtree), with every file the user kept there."""
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "adapter_config.json").write_text("{}")
    data = ["--model", workspace / "model", "--data", workspace / "corpus.jsonl"]
    before = tree_digest(out)
    assert run_cli(TRAIN + data + ["--out", out]) == 2
    one_error_line(capsys, "--out", "exists and is not empty", "--overwrite")
    assert tree_digest(out) == before

    assert run_cli(TRAIN + data + ["--out", out, "--overwrite"]) == 0
    after = tree_digest(out)
    assert after["notes.txt"] == before["notes.txt"]  # kept, byte for byte
    assert after["adapter_config.json"] != before["adapter_config.json"]  # the command's own file, replaced
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "notes.txt"} == set(after)

    monkeypatch.chdir(tmp_path)  # `--out .` in a folder with files: refused, nothing deleted
    everything = tree_digest(tmp_path)
    assert run_cli(TRAIN + data + ["--out", "."]) == 2
    one_error_line(capsys, "--out . exists and is not empty")
    assert tree_digest(tmp_path) == everything


def test_cli_select_evaluate_demo_follow_the_same_rule(workspace, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("keep")
    model, corpus = workspace / "model", workspace / "corpus.jsonl"
    before = {**tree_digest(workspace), **{f"busy/{k}": v for k, v in tree_digest(busy).items()}}
    assert run_cli(["select", "--model", model, "--data", corpus, "--out", busy]) == 2
    one_error_line(capsys, "neuron-peft select: error: --out", "not empty")
    assert run_cli(["select", "--model", model, "--data", corpus, "--out", model / "sel", "--overwrite"]) == 2
    one_error_line(capsys, "sits inside the input --model")
    assert run_cli(["demo", "--model", model, "--out", busy]) == 2
    one_error_line(capsys, "neuron-peft demo: error: --out", "not empty")
    evaluate = ["evaluate", "--model", model, "--data", corpus, "--eval-data", corpus]
    assert run_cli(evaluate + ["--json", corpus, "--overwrite"]) == 2  # before: the scores replaced the corpus
    one_error_line(capsys, "--json", "same path as the input --data")
    assert run_cli(evaluate + ["--json", busy / "keep.txt"]) == 2
    one_error_line(capsys, "--json", "already exists")
    assert run_cli(evaluate + ["--adapter", workspace / "adapter", "--json", workspace / "adapter" / "s.json"]) == 2
    one_error_line(capsys, "sits inside the input --adapter")
    assert {**tree_digest(workspace), **{f"busy/{k}": v for k, v in tree_digest(busy).items()}} == before

    sel = tmp_path / "sel"  # a fresh folder works, and only the selection's files are written
    assert run_cli(["select", "--model", model, "--data", corpus, "--out", sel, "--n-calib", "2", "--batch-size", "2",
                    "--threads", "1"]) == 0  # fmt: skip
    assert {"neuron_selection.json", "neuron_selection.safetensors"} <= set(os.listdir(sel))
    assert not [n for n in os.listdir(sel) if n.startswith(".")]  # no staging folder left


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--grad-accum", "0"], "--grad-accum"),  # before: ZeroDivisionError traceback
        (["--steps", "0"], "--steps"),  # before: an untrained adapter written, exit 0
        (["--threads", "-1"], "--threads"),  # before: RuntimeError traceback from torch
        (["--device", "cuda"], "--device"),  # before: AssertionError traceback (no CUDA)
        (["--langs", "fr,xx"], "--langs"),  # before: error after loading the model, not naming the option
        (["--src", "qq"], "--src"),
    ],
)
def test_cli_bad_values_get_one_line_and_exit_2(workspace, tmp_path, capsys, extra, flag):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    data = [] if flag in ("--langs", "--src") else ["--data", workspace / "corpus.jsonl"]
    out = tmp_path / "out"
    assert run_cli(TRAIN + ["--model", workspace / "model", *data, "--out", out, *extra]) == 2
    line = one_error_line(capsys, "neuron-peft train: error: argument " + flag)
    assert len(line) < 300
    assert not out.exists()  # nothing written, no model loaded


# ------------------------------------------------------------------------------------------------------ benchmarks
def test_benchmark_outputs_follow_the_same_rule(tmp_path, capsys):
    """Before: quality.py wrote into any --out (also one holding its --data-file) and speed*.py replaced --json."""
    quality, speed = load_benchmark("quality"), load_benchmark("speed")
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "results.json").write_text('{"an": "earlier run"}')
    before = tree_digest(tmp_path)
    tiny = ["--preset", "tiny", "--data-file", str(data)]
    with pytest.raises(OutputPathError, match="--out .* contains the input --data-file"):
        quality.main(tiny + ["--out", str(tmp_path), "--overwrite"], log=lambda s: None)
    with pytest.raises(OutputPathError, match="--out .*busy exists and is not empty"):
        quality.main(tiny + ["--out", str(busy)], log=lambda s: None)
    with pytest.raises(OutputPathError, match="--export-data .* same path as the input --data-file"):
        quality.main(tiny + ["--export-data", str(data), "--overwrite"], log=lambda s: None)
    with pytest.raises(SystemExit) as exit_:
        speed.main(["--preset", "tiny", "--json", str(busy / "results.json")], log=lambda s: None)
    assert exit_.value.code == 2 and "--json" in capsys.readouterr().err
    assert tree_digest(tmp_path) == before


# ---------------------------------------------------------------------------------------------------- adapter files
def _saved_adapter(folder: Path, **config):
    from peft import get_peft_model

    from neuron_peft import NeuronSelectConfig

    config = {"target_modules": TARGETS["llama"], "neuron_ratio": 0.25, "init_weights": False, **config}
    model = get_peft_model(tiny_llama(), NeuronSelectConfig(**config))
    model.save_pretrained(folder)
    return model


def test_adapter_file_with_base_weights_is_refused(tmp_path):
    """Before: PEFT loaded with strict=False, so `model.norm.weight` in the file silently replaced the base weight."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from neuron_peft import AdapterFileError

    _saved_adapter(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.norm.weight"] = torch.zeros(32)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] = torch.zeros(32, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_llama()
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(
        AdapterFileError,
        match=r"2 tensor\(s\).*'model.layers.0.self_attn.q_proj.base_layer.weight', 'model.norm.weight'",
    ):
        PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(base.model.norm.weight, reference["model.norm.weight"], rtol=0, atol=0)


def test_lora_file_relabelled_as_neuron_select_is_refused(tmp_path):
    """Before: a LoRA file whose peft_type was edited failed on a missing NeuronSelect tensor, never naming the
    LoRA keys it carried."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from neuron_peft import AdapterFileError

    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS["llama"], r=2))
    lora.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["peft_type"] = "NEURON_SELECT"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterFileError, match=r"16 tensor\(s\).*lora_A.weight"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_adapter_files_peft_writes_still_load(tmp_path):
    """What PEFT itself writes for the adapter loads: lm_head targeted (PEFT saves the head), modules_to_save."""
    from peft import PeftModel

    from neuron_peft import AdapterFileError

    for sub, extra in [("head", {"target_modules": ["q_proj", "lm_head"]}), ("mts", {"modules_to_save": ["norm"]})]:
        trained = _saved_adapter(tmp_path / sub, **extra)
        with torch.no_grad():
            for p in trained.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        trained.save_pretrained(tmp_path / sub)
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / sub)
        ids = torch.arange(1, 9).unsqueeze(0)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
    assert issubclass(AdapterFileError, ValueError)


# ------------------------------------------------------------------------------------------------------ row indices
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "rows, message",
    [
        (torch.tensor([True, False, True]), "rows are booleans"),  # before: accepted as rows [0, 1]
        ([torch.tensor(True)], "row index tensor(True) is a boolean"),  # before: accepted as row 1
        ([True, 2], "row index True is a boolean"),
        ([2.0], "row index 2.0 is not an integer"),  # a float, even a whole one, is refused
        ([1.7], "row index 1.7 is not an integer"),
        (torch.tensor([1.7, 3.0]), "row index tensor(1.7000) is not an integer"),
        ([-1, 3], "row index -1 is negative"),
        (torch.tensor([4, -2]), "row index tensor(-2) is negative"),
    ],
)
def test_bad_row_indices_are_refused_with_the_value_given(rows, message):
    from neuron_peft import NeuronSelectConfig

    for kwargs in ({"neurons": {Q0: rows}}, {"language_neurons": {"fr": {Q0: rows}}}):
        with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(").replace(")", r"\)")):
            NeuronSelectConfig(target_modules=["q_proj"], **kwargs)


def test_rows_edited_into_a_config_after_construction_are_checked_at_injection():
    """Before: `config.neurons[name] = [2.5]` trained row 2 (torch.tensor truncates) and [-1] the last row."""
    from peft import get_peft_model

    from neuron_peft import NeuronSelectConfig

    for rows, message in [([2.5], "row index 2.5 is not an integer"), ([-1], "row index -1 is negative"),
                          ([False], "row index False is a boolean")]:  # fmt: skip
        config = NeuronSelectConfig(target_modules=["q_proj"], neurons={Q0: [1]})
        config.neurons[Q0] = rows
        with pytest.raises((TypeError, ValueError), match=rf"neurons\['{Q0}'\]: {message}".replace(".", r"\.")):
            get_peft_model(tiny_llama(), config)
        config = NeuronSelectConfig(target_modules=["q_proj"], language_neurons={"fr": {Q0: [1]}})
        config.language_neurons["fr"][Q0] = rows
        with pytest.raises(
            (TypeError, ValueError), match=rf"language_neurons\['fr'\]\['{Q0}'\]: {message}".replace(".", r"\.")
        ):
            get_peft_model(tiny_llama(), config)


# ---------------------------------------------------------------------------------------------------------- routing
def test_neuron_groups_of_the_wrong_length_raise():
    """Before: 3 names for 4 samples only warned, and the language rows silently got no gradient."""
    from peft import get_peft_model

    import neuron_peft
    from neuron_peft import RoutingError

    model = get_peft_model(tiny_llama(), routed_llama_config())
    ids = torch.randint(1, 90, (4, 6), generator=torch.Generator().manual_seed(0))
    match = r"neuron_groups has 3 group name\(s\) but the batch has 4 samples \(input_ids has shape \(4, 6\)\)"
    with pytest.raises(RoutingError, match=match):
        model(input_ids=ids, neuron_groups=["fr", "de", "fr"])
    with pytest.raises(RoutingError, match=match):
        with neuron_peft.route(model, ["fr", "de", "fr"]):
            model(input_ids=ids)
    with pytest.raises(RoutingError, match="has 1 group name"):
        model(ids, neuron_groups=["fr"])  # positional input_ids, one name for a mixed batch of 4
    model(input_ids=ids, neuron_groups=["fr", "de", "fr", "de"]).logits.sum().backward()  # the right length works
    grads = [m.neuron_select_delta["default"].grad for m in model.modules() if hasattr(m, "neuron_select_delta")]
    assert grads and all(g is not None for g in grads)
    with torch.no_grad(), neuron_peft.route(model, ["fr", "de", "fr", "de"]):  # generation expands the batch
        out = model.generate(input_ids=ids, max_new_tokens=2, num_beams=2, do_sample=False)
    assert out.shape == (4, 8)


# --------------------------------------------------------------------------------------------------------- NaN / Inf
def _with_bad_delta(value=float("nan")):
    from peft import get_peft_model

    from neuron_peft import NeuronSelectConfig

    model = get_peft_model(tiny_qwen2(), NeuronSelectConfig(target_modules=TARGETS["qwen2"], neuron_ratio=0.25))
    layer = model.base_model.model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.neuron_select_delta["default"][0, 3] = value
    return model, layer


def test_save_pretrained_refuses_nan_delta_naming_it(tmp_path):
    """Before: the NaN was written into adapter_model.safetensors without a word."""
    import neuron_peft
    from neuron_peft import NonFiniteDeltaError

    model, _ = _with_bad_delta()
    name = r"model\.layers\.1\.self_attn\.q_proj\.neuron_select_delta\.default \(1 NaN, 0 Inf"
    with pytest.raises(NonFiniteDeltaError, match="refusing to save adapter 'default': non-finite delta in " + name):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()

    other, _ = _with_bad_delta(float("inf"))
    with neuron_peft.allow_nonfinite(model):  # explicit opt-in, for this model only
        model.save_pretrained(tmp_path / "a")
        with pytest.raises(NonFiniteDeltaError, match=r"0 NaN, 1 Inf"):
            other.save_pretrained(tmp_path / "b")
    with pytest.raises(NonFiniteDeltaError):  # the block ended: refused again
        model.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert torch.isnan(saved["base_model.model.model.layers.1.self_attn.q_proj.neuron_select_delta"][0, 3])


def test_nonfinite_bias_delta_is_named():
    from neuron_peft import NonFiniteDeltaError

    model, layer = _with_bad_delta(0.0)
    with torch.no_grad():
        layer.neuron_select_bias_delta["default"][1] = float("-inf")
    with pytest.raises(NonFiniteDeltaError, match=r"q_proj\.neuron_select_bias_delta\.default \(0 NaN, 1 Inf"):
        model.merge_and_unload()


def test_merge_refuses_nan_delta_and_leaves_base_weights_untouched():
    """Before: merge_and_unload wrote NaN into the base weight's row."""
    from neuron_peft import NonFiniteDeltaError

    model, layer = _with_bad_delta()
    base = layer.get_base_layer()
    reference = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "neuron_select" not in k}
    for merge in (model.merge_and_unload, model.merge_adapter, lambda: model.base_model.merge_and_unload()):
        with pytest.raises(NonFiniteDeltaError, match=r"refusing to merge: .*layers\.1\.self_attn\.q_proj"):
            merge()
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "neuron_select" not in k}
    assert after.keys() == reference.keys()
    assert all(torch.equal(after[k], reference[k]) for k in reference)

    row = int(layer.neuron_select_indices["default"][0])
    expected = reference["model.layers.1.self_attn.q_proj.base_layer.weight"].clone()
    expected[row] += layer.neuron_select_delta["default"][0].detach()  # hand-made dense merge: W0[row] + delta
    model.merge_adapter(allow_nonfinite=True)
    assert torch.isnan(base.weight[row, 3]) and torch.equal(base.weight.isnan(), expected.isnan())
    model.unmerge_adapter()
    merged = model.merge_and_unload(allow_nonfinite=True)
    weight = merged.model.layers[1].self_attn.q_proj.weight
    torch.testing.assert_close(weight, expected, equal_nan=True)


@pytest.mark.parametrize(
    "rows, error, match",
    [
        ([1.7], TypeError, "row index 1.7 is not an integer"),
        (torch.tensor([0.5]), TypeError, "not an integer"),
        (torch.tensor([True, False]), TypeError, "booleans"),
        ([-1], ValueError, "row index -1 is negative"),
    ],
)
def test_layer_refuses_rows_that_are_not_indices(rows, error, match):
    """Calling the layer directly gets the config's row check too (torch.as_tensor would truncate or map to 0/1)."""
    from neuron_peft import Linear

    with pytest.raises(error, match=match):
        Linear(torch.nn.Linear(4, 6), "default", rows, torch.full((1,), -1))
    layer = Linear(torch.nn.Linear(4, 6), "default", torch.tensor([3, 1]), torch.tensor([-1, -1]))
    assert layer.neuron_select_indices["default"].tolist() == [3, 1]
