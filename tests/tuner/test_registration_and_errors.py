"""Registration with PEFT/transformers entry points, and clear errors for every kind of bad input."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, AutoPeftModelForSeq2SeqLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors.torch import load_file, save_file
from tiny_models import TARGETS, make_inputs, make_model

import neuron_peft
from neuron_peft import AdapterFileError, AdapterMismatchError, NeuronSelectConfig
from neuron_peft.tuner import model_card


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def saved_adapter(tmp_path, arch="llama", **kw):
    base = make_model(arch)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    base = type(base).from_pretrained(base_dir)
    cfg = NeuronSelectConfig(target_modules=TARGETS[arch], init_weights=False, **kw)
    model = get_peft_model(copy.deepcopy(base), cfg)
    out = tmp_path / "adapter"
    model.save_pretrained(out)
    return base, model, out


def test_peft_type_member_and_config_file(tmp_path):
    assert PeftType("NEURON_SELECT") is neuron_peft.NEURON_SELECT_PEFT_TYPE
    assert PeftType.NEURON_SELECT.value.lower() + "_" == "neuron_select_"
    _, _, out = saved_adapter(tmp_path)
    data = json.loads((out / "adapter_config.json").read_text())
    assert data["peft_type"] == "NEURON_SELECT"
    assert isinstance(PeftConfig.from_pretrained(out), NeuronSelectConfig)
    neuron_peft.register()  # idempotent


def test_auto_peft_model_causal(tmp_path):
    base, model, out = saved_adapter(tmp_path)
    inputs = make_inputs("llama")
    loaded = AutoPeftModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_auto_peft_model_seq2seq(tmp_path):
    base, model, out = saved_adapter(tmp_path, arch="t5")
    inputs = make_inputs("t5")
    loaded = AutoPeftModelForSeq2SeqLM.from_pretrained(out)
    torch.testing.assert_close(logits(loaded, inputs), logits(model, inputs), rtol=0, atol=0)


def test_transformers_load_adapter(tmp_path):
    base, model, out = saved_adapter(tmp_path)
    inputs = make_inputs("llama")
    fresh = copy.deepcopy(base)
    fresh.load_adapter(str(out))
    torch.testing.assert_close(logits(fresh, inputs), logits(model, inputs), rtol=0, atol=0)
    fresh.disable_adapters()
    torch.testing.assert_close(logits(fresh, inputs), logits(base, inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- bad input
def test_unknown_module_name():
    cfg = NeuronSelectConfig(target_modules=["up_proj"], neurons={"model.layers.9.mlp.up_proj": [1]})
    with pytest.raises(AdapterMismatchError, match="unknown module 'model.layers.9.mlp.up_proj'"):
        get_peft_model(make_model("llama"), cfg)


def test_row_index_out_of_range():
    cfg = NeuronSelectConfig(target_modules=["up_proj"], neurons={"model.layers.0.mlp.up_proj": [1, 64]})
    with pytest.raises(AdapterMismatchError, match=r"model.layers.0.mlp.up_proj.*row index 64 out of range.*64"):
        get_peft_model(make_model("llama"), cfg)


def test_module_not_targeted():
    cfg = NeuronSelectConfig(target_modules=["q_proj"], neurons={"model.layers.0.mlp.up_proj": [1]})
    with pytest.raises(AdapterMismatchError, match="not targeted"):
        get_peft_model(make_model("llama"), cfg)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"neurons": {"m": [1, 1]}}, "duplicate"),
        ({"neurons": {"m": [1, 2]}, "language_neurons": {"fr": {"m": [2]}}}, "both"),
        ({"language_neurons": {"fr": {"m": [3]}, "de": {"m": [3]}}}, "both"),
        ({"neurons": {"m": [-1]}}, "negative"),
        ({"neurons": {"m": [1.5]}}, "not an integer"),
        ({"language_neurons": {"": {"m": [1]}}}, "non-empty"),
        ({"language_neurons": {"  ": {"m": [1]}}}, "non-empty"),
        ({"neuron_ratio": 0.0}, r"\(0, 1\]"),
        ({"neuron_ratio": 1.5}, r"\(0, 1\]"),
        ({"neuron_ratio": -0.1}, r"\(0, 1\]"),
        ({"neuron_init": "taylor"}, "neuron_init"),
        ({"update_path": "fast"}, "update_path"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        NeuronSelectConfig(target_modules=["m"], **kwargs)


def test_empty_row_lists_rejected():
    cfg = NeuronSelectConfig(target_modules=["up_proj"], neurons={"model.layers.0.mlp.up_proj": []})
    with pytest.raises(AdapterMismatchError, match="no rows"):
        get_peft_model(make_model("llama"), cfg)


def test_corrupt_and_truncated_adapter_file(tmp_path):
    base, _, out = saved_adapter(tmp_path)
    path = out / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="corrupt or truncated adapter file"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFileError, match="adapter_model.safetensors"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)


def test_adapter_missing_tensor_is_not_a_partial_load(tmp_path):
    base, _, out = saved_adapter(tmp_path)
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    dropped = next(k for k in tensors if k.endswith("up_proj.neuron_select_delta"))
    del tensors[dropped]
    save_file(tensors, path)
    with pytest.raises(AdapterMismatchError, match=r"up_proj.*incomplete adapter"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)


def test_adapter_indices_disagreeing_with_config(tmp_path):
    base, _, out = saved_adapter(tmp_path)
    path = out / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("layers.0.mlp.up_proj.neuron_select_indices"))
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, path)
    with pytest.raises(AdapterMismatchError, match="differ from adapter_config.json"):
        PeftModel.from_pretrained(copy.deepcopy(base), out)


def test_adapter_for_a_different_model(tmp_path):
    _, _, out = saved_adapter(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    smaller = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises(AdapterMismatchError, match=r"mlp\.(up|down)_proj"):
        PeftModel.from_pretrained(smaller, out)
    wider = LlamaForCausalLM(
        LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    )  # fmt: skip
    with pytest.raises((AdapterMismatchError, RuntimeError), match=r"proj"):
        PeftModel.from_pretrained(wider, out)


def test_push_to_hub_goes_through_peft(tmp_path, monkeypatch):
    """push_to_hub uploads what save_pretrained writes (the Hub client is replaced: no network). Plain
    ``model.push_to_hub`` behaves as for every PEFT adapter: transformers puts the Hub repo's own card (here a blank
    template with library_name: transformers) in place of the saved one. `neuron_peft.integrations.hub.push_to_hub`
    uploads the same files with the NeuronSelect card re-applied on the Hub's, its load snippet naming the repo id."""
    import transformers.utils.hub as hub
    from huggingface_hub import ModelCard, ModelCardData

    from neuron_peft.integrations.hub import push_to_hub

    pushed = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

        def create_commit(self, repo_id, operations, **kwargs):
            for op in operations:
                with open(op.path_or_fileobj, "rb") as f:
                    pushed[op.path_in_repo] = f.read()
            return "ok"

    hub_card = ModelCard.from_template(ModelCardData(library_name="transformers"), model_description="Hub text")
    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: hub_card)
    base, model, out = saved_adapter(tmp_path)
    model.push_to_hub("me/neuron-select-test")
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(pushed)
    assert pushed["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert json.loads(pushed["adapter_config.json"])["peft_type"] == "NEURON_SELECT"
    assert "Hub text" in pushed["README.md"].decode() and "neuron-select" not in pushed["README.md"].decode()
    pushed.clear()
    push_to_hub(model, "me/neuron-select-test")
    assert pushed["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    card = pushed["README.md"].decode()
    assert "library_name: peft" in card and "- neuron-select" in card and "Hub text" in card
    assert "adapter = 'me/neuron-select-test'" in python_blocks(card)[0]
    assert "_upload_modified_files" not in model.__dict__  # the per-call hook is gone again


def test_model_card_has_selection_summary(tmp_path):
    _, _, out = saved_adapter(tmp_path)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card and "neuron-select" in card
    assert "base_model:" in card
    assert "## NeuronSelect adapter" in card and "selected rows" in card and "trainable parameters" in card


# ---------------------------------------------------------------- sharing: the model card and loading elsewhere
def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.S)


def usage_section(card: str) -> str:
    start = card.index("## How to Get Started with the Model")
    return card[start : card.index("\n## ", start + 1)]


LOGITS_CODE = """
import sys, torch
ids = torch.tensor({ids})
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[1])
"""


def run_fresh(code: str, *args) -> subprocess.CompletedProcess:
    """`python -c code` in a new interpreter (nothing imported beforehand), offline, outside the repository."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=env, cwd=Path(args[0]).parent
    )


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_card_snippet_loads_the_adapter_in_a_fresh_process(tmp_path, task_type):
    """Following only the card: pip install line first, then the snippet (run verbatim in a new interpreter that
    never imported neuron_peft) gives the saving model's logits exactly."""
    base, model, out = saved_adapter(tmp_path, task_type=task_type, language_neurons=None)
    card = (out / "README.md").read_text()
    usage = usage_section(card)
    assert usage.split("```")[1].strip() == "bash\npip install neuron-peft"  # the usage section starts with it
    snippet = python_blocks(usage)[0]
    assert snippet.startswith("import neuron_peft")
    assert ("AutoPeftModelForCausalLM" if task_type else "AutoPeftModel.") in snippet
    ids = make_inputs("llama")["input_ids"]
    result = run_fresh(snippet + LOGITS_CODE.format(ids=ids.tolist()), tmp_path / "fresh.pt")
    assert result.returncode == 0, result.stderr[-3000:]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "fresh.pt"), expected, rtol=0, atol=0)


def test_loading_without_the_import_fails_as_the_card_says(tmp_path):
    """No loader can name the missing package (PEFT 0.21 reads only peft_type before a bare KeyError): the card warns
    with the exact error a user sees, and this pins that the error is still that one."""
    _, _, out = saved_adapter(tmp_path)
    card = (out / "README.md").read_text()
    snippet = python_blocks(card)[0].replace("import neuron_peft", "pass")
    result = run_fresh(snippet, tmp_path / "unused")
    assert result.returncode != 0
    assert "KeyError: 'NEURON_SELECT'" in result.stderr
    assert "KeyError: 'NEURON_SELECT'" in usage_section(card) and "pip install neuron-peft" in card


@pytest.mark.parametrize("arch, routed, modules_to_save", [("llama", True, None), ("qwen2", False, ["norm"])])
def test_card_trainable_numbers_equal_print_trainable_parameters(tmp_path, capsys, arch, routed, modules_to_save):
    """One definition: the card shows the line print_trainable_parameters() prints; it counts row deltas, bias deltas
    (qwen2's q/k/v have biases) and modules_to_save copies over all parameters, adapters included."""
    base = make_model(arch)
    base.save_pretrained(tmp_path / "base")
    base = type(base).from_pretrained(tmp_path / "base")
    kw = {"language_neurons": {"fr": {"model.layers.0.mlp.up_proj": [5, 6]}}} if routed else {}
    cfg = NeuronSelectConfig(target_modules=TARGETS[arch], modules_to_save=modules_to_save, **kw)
    model = get_peft_model(base, cfg)
    capsys.readouterr()
    model.print_trainable_parameters()
    printed = capsys.readouterr().out.strip()
    model.save_pretrained(tmp_path / "adapter")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert printed.startswith("trainable params:") and printed in card
    # the same numbers, counted by hand from the adapter's tensors
    named = dict(model.named_parameters())
    deltas = sum(p.numel() for n, p in named.items() if ".neuron_select_delta." in n)
    biases = sum(p.numel() for n, p in named.items() if ".neuron_select_bias_delta." in n)
    copies = sum(p.numel() for n, p in named.items() if ".modules_to_save." in n)
    assert (biases > 0) == (arch == "qwen2") and (copies > 0) == bool(modules_to_save)
    trainable = deltas + biases + copies
    total = sum(p.numel() for p in named.values())
    assert (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        in card
    )
    summary = model.base_model.selection_summary()
    assert (summary["trainable_params"], summary["all_params"]) == (trainable, total)


def test_card_states_the_selection(tmp_path):
    """Base model, targets, rows per module type (counted here from the saved config), groups, settings, tags."""
    _, model, out = saved_adapter(tmp_path, neuron_ratio=0.25, neuron_init="random", seed=3)
    card = (out / "README.md").read_text()
    cfg = json.loads((out / "adapter_config.json").read_text())
    block = card[card.index("## NeuronSelect adapter") :]
    assert f"- base model: `{tmp_path / 'base'}`" in block
    assert "- target modules: `down_proj`, `q_proj`, `up_proj`, `v_proj`" in block
    per_type: dict[str, int] = {}
    for name, rows in cfg["neurons"].items():
        per_type[name.rsplit(".", 1)[-1]] = per_type.get(name.rsplit(".", 1)[-1], 0) + len(rows)
    for group in cfg["language_neurons"] or {}:
        for name, rows in cfg["language_neurons"][group].items():
            per_type[name.rsplit(".", 1)[-1]] += len(rows)
    out_features = {"q_proj": 32, "v_proj": 16, "up_proj": 64, "down_proj": 32}  # tiny_llama, per layer
    for kind, n in per_type.items():
        assert f"`{kind}` {n} of {2 * out_features[kind]} rows" in block, kind
    assert "language groups: none" in block
    assert "neuron_ratio=0.25, neuron_init='random', seed=3, train_bias=True" in block
    meta = card.split("---")[1]
    assert "library_name: peft" in meta and "- neuron-select" in meta and "- peft" in meta
    assert f"base_model: {tmp_path / 'base'}" in meta
    assert card.count("## How to Get Started with the Model") == 1  # the template's empty section was replaced


def test_card_lists_language_groups_and_is_replaced_on_resave(tmp_path):
    base = make_model("llama")
    cfg = NeuronSelectConfig(
        target_modules=["up_proj"], neurons={"model.layers.0.mlp.up_proj": [1, 2]},
        language_neurons={"en-fr": {"model.layers.0.mlp.up_proj": [3]}, "en-de": {"model.layers.1.mlp.up_proj": [4, 5]}},
    )  # fmt: skip
    model = get_peft_model(base, cfg)
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "language groups: 2: `en-de` (2 rows), `en-fr` (1 rows); " in card
    assert "base_model = ...  # the model this adapter was trained on" in card  # no recorded base model
    (tmp_path / "README.md").write_text(card.replace("## Model Details", "## Model Details\n\nMy own notes."))
    model.save_pretrained(tmp_path)
    again = (tmp_path / "README.md").read_text()
    assert again.count(model_card.BEGIN) == 1 and "My own notes." in again


def test_unsupported_peft_methods_say_what_to_do_instead():
    model = get_peft_model(make_model("llama"), NeuronSelectConfig(target_modules=["q_proj"]))
    model.add_adapter("other", NeuronSelectConfig(target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match=r"add_weighted_adapter is not supported.*merge"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(NotImplementedError, match="subtract_mutated_init is LoRA-only"):
        model.base_model.subtract_mutated_init({}, "default")


def test_config_saved_on_its_own_writes_no_card_and_pickles(tmp_path):
    """The card is written only by the PeftModel save it belongs to: a config saved on its own (after the model's
    state dict was taken) creates no README.md, and the hand-over never reaches adapter_config.json or a pickle."""
    import pickle

    from peft import get_peft_model_state_dict

    _, model, out = saved_adapter(tmp_path)
    get_peft_model_state_dict(model)  # keeps a summary on the config, as a save would
    config = model.peft_config["default"]
    copy.deepcopy(config)
    pickle.loads(pickle.dumps(config))
    config.save_pretrained(tmp_path / "config_only")
    assert sorted(p.name for p in (tmp_path / "config_only").iterdir()) == ["adapter_config.json"]
    assert "pending" not in (tmp_path / "config_only" / "adapter_config.json").read_text()


def test_declared_groups_keyword_follows_copies_and_goes_with_unload():
    """The adapted model's forward lists neuron_groups (what Trainer and generate inspect); a deepcopy or pickle keeps
    it bound to the copy, and merge_and_unload gives the plain class forward back."""
    import inspect
    import pickle

    model = get_peft_model(make_model("llama"), NeuronSelectConfig(target_modules=["q_proj"], init_weights=False))
    inner = model.get_base_model()
    assert "neuron_groups" in inspect.signature(inner.forward).parameters
    assert list(inspect.signature(inner.forward).parameters)[-2:] == ["neuron_groups", "kwargs"]
    inputs = make_inputs("llama")
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.get_base_model().forward.module is clone.get_base_model()
        torch.testing.assert_close(logits(clone, inputs), logits(model, inputs), rtol=0, atol=0)
    merged = model.merge_and_unload()
    assert "forward" not in merged.__dict__
    assert "neuron_groups" not in inspect.signature(merged.forward).parameters


def test_card_summary_is_not_spliced_into_an_unrelated_readme(tmp_path):
    """A summary kept by a plain `get_peft_model_state_dict` call must not land in a README.md that a later,
    hand-made config save finds: that folder's adapter weights are older than the summary, so the card is left as
    it was (byte for byte). A real save afterwards still writes the card."""
    from peft import get_peft_model_state_dict

    base, model, out = saved_adapter(tmp_path)
    old = tmp_path / "older_save"
    old.mkdir()
    save_file({"x": torch.zeros(1)}, str(old / "adapter_model.safetensors"))
    mtime = os.path.getmtime(old / "adapter_model.safetensors") - 60
    os.utime(old / "adapter_model.safetensors", (mtime, mtime))  # saved a minute before the summary below
    (old / "README.md").write_text("# my own notes\n\n## Results\nkeep me\n")
    get_peft_model_state_dict(model)  # PEFT asks the tuner for the tensors: the summary is kept
    model.peft_config["default"].save_pretrained(str(old))
    assert (old / "README.md").read_text() == "# my own notes\n\n## Results\nkeep me\n"
    assert json.loads((old / "adapter_config.json").read_text())["peft_type"] == "NEURON_SELECT"
    again = tmp_path / "again"
    model.save_pretrained(again)
    assert "## NeuronSelect adapter" in (again / "README.md").read_text()
