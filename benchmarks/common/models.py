"""Loading the base model and its tokenizer, and the config pieces every method builder uses.

`load_model` gives the pristine base every method is copied from: the real model through
`neuron_peft.resources.resolve_model`, or with ``model="tiny"`` a 2-layer random Llama and a word-level tokenizer
over the run's own texts (built offline), so the smoke tests need no download. The helpers below are shared by
methods.py (quality.py's methods) and matched.py (selection_value.py's budget-matched methods): LoRA/DoRA configs,
NeuronSelect configs for explicit rows, exact-name target regexes and the trainable-parameter count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .preset import Preset

# every NeuronSelect method of the benchmarks trains the biases of its selected rows
NEURON_KW = {"train_bias": True, "task_type": "CAUSAL_LM"}


def tiny_tokenizer(texts: list[str]):
    """Word-level tokenizer over the words of `texts` (built offline with `tokenizers`), BOS added to prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip


def load_model(p: Preset, data: dict, device: torch.device):
    """(base model, tokenizer); the tiny tokenizer is built over the texts of `data`, every split."""
    if p.model != "tiny":
        from neuron_peft.resources import resolve_model

        return resolve_model(p.model, dtype=getattr(torch, p.dtype), device=device)
    from transformers import LlamaConfig, LlamaForCausalLM

    from neuron_peft.data import translation_prompt

    texts = [translation_prompt(e.src, e.src_lang, e.tgt_lang) + " " + e.tgt for v in data.values() for e in v]
    tok = tiny_tokenizer(texts)
    torch.manual_seed(p.seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(device).eval(), tok


def exact_regex(names) -> str:
    """A target_modules regex matching exactly these module names."""
    import re

    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def lora_config(r: int, target_modules, dora: bool):
    """PEFT LoRA (or DoRA) at rank r, alpha = 2r, no dropout, for a causal LM."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=target_modules, use_dora=dora,
                      task_type="CAUSAL_LM")  # fmt: skip


def rows_config(rows: dict):
    """NeuronSelect training exactly `rows` ({layer name: row indices}), all shared (no routing)."""
    from neuron_peft import NeuronSelectConfig

    return NeuronSelectConfig(target_modules=exact_regex(rows), neurons=rows, **NEURON_KW)


def trainable_params(model) -> int:
    """PEFT's count (``get_nb_trainable_parameters``: parameters with requires_grad, 4-bit and ZeRO-3 aware), also for
    full fine-tuning, whose model is no PeftModel (the function reads only ``named_parameters()``)."""
    from peft import PeftModel

    return PeftModel.get_nb_trainable_parameters(model)[0]


def model_for_training_batches(preset: str, batch_size=None, threads=None):
    """(translation preset, device, data, base model, tokenizer) of a selection_value preset for scripts that only
    need its model and training batches (loss_positions.py, gradient_geometry.py): the batch size and thread count
    overridden where given, one pair per evaluation split, since they evaluate nothing."""
    from dataclasses import replace

    from .data import build_data
    from .preset import SELECTION_PRESETS, resolve_device, translation_preset

    sp = SELECTION_PRESETS[preset]
    if batch_size:
        sp = replace(sp, batch_size=batch_size)
    if threads or sp.threads:
        torch.set_num_threads(threads or sp.threads)
    p = replace(translation_preset(sp, 0), n_dev=1, n_test=1, n_forget=1)
    device = resolve_device(p)
    data = build_data(p)
    base, tok = load_model(p, data, device)
    return p, device, data, base, tok
