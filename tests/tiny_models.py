"""Tiny models built from configs (no downloads) and their inputs, shared by the test suite.

An ordinary module (``from tiny_models import ...``), so tests, helpers and spawned worker processes can use the
factories; `conftest.py` keeps only fixtures and session settings. transformers' model classes are imported inside
each factory, so a test run loads only the architectures it builds.
"""

from __future__ import annotations

import torch

from neuron_peft import NeuronSelectConfig

VOCAB = 96


def tiny_llama(seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, **kw,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()  # q/k/v have biases


def tiny_gemma3(seed=0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=16,
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


def tiny_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_t5(seed=0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg).eval()


def tiny_llava(seed=0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
        patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=VOCAB + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB + 1, vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


CAUSAL = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma3": tiny_gemma3, "gpt2": tiny_gpt2}

# target modules per architecture (GPT-2 uses Conv1D: c_attn / c_fc / c_proj)
TARGETS = {
    "llama": ["q_proj", "v_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc", "c_proj"],
    "t5": ["q", "v", "wi", "wo"],
    "llava": ["q_proj", "v_proj", "up_proj", "fc1", "linear_1", "linear_2"],
}


def make_model(arch: str, seed: int = 0):
    if arch in CAUSAL:
        return CAUSAL[arch](seed)
    return {"t5": tiny_t5, "llava": tiny_llava}[arch](seed)


def make_inputs(arch: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": torch.randint(1, VOCAB, (batch, 5), generator=g)}
    if arch == "llava":
        ids[:, :4] = VOCAB + 1  # 4 image tokens = (16 / 8) ** 2 patches
        return {"input_ids": ids, "pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    return {"input_ids": ids}


def make_loss_inputs(arch: str, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    inputs = make_inputs(arch, batch, seq, seed)
    if arch == "t5":
        inputs["labels"] = inputs.pop("decoder_input_ids")
    else:
        labels = inputs["input_ids"].clone()
        if arch == "llava":
            labels[:, :4] = -100
        inputs["labels"] = labels
    return inputs


ARCHS = ["llama", "qwen2", "gemma3", "gpt2", "t5", "llava"]


# tiny Llama's targeted projections and their output sizes, for hand-built row selections
LLAMA_ROW_SIZES = {"self_attn.q_proj": 32, "self_attn.v_proj": 16, "mlp.up_proj": 64, "mlp.down_proj": 32}


def routed_llama_config(groups=("fr", "de"), init_weights=False, **kw):
    """3 agnostic rows and 2 rows per language in every targeted layer of the tiny Llama (seeded)."""
    gen = torch.Generator().manual_seed(0)
    neurons, language = {}, {g: {} for g in groups}
    for i in range(2):
        for suffix, n_out in LLAMA_ROW_SIZES.items():
            name = f"model.layers.{i}.{suffix}"
            perm = torch.randperm(n_out, generator=gen).tolist()
            neurons[name] = perm[:3]
            for j, g in enumerate(groups):
                language[g][name] = perm[3 + 2 * j : 5 + 2 * j]
    return NeuronSelectConfig(
        target_modules=TARGETS["llama"], neurons=neurons, language_neurons=language, init_weights=init_weights, **kw
    )


# ------------------------------------------------------------------ word-level tokenizer and a local model folder
WORDS = "Translate the text from English into French German . : hello world bonjour le monde hallo welt".split()


def make_tokenizer(append_eos: bool = False, newline: bool = True):
    """Word-level tokenizer built offline: one id per word, BOS prepended (and EOS appended if asked); `newline`
    adds "\n" as a token (generation tests stop on it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    single = "<s> $A </s>" if append_eos else "<s> $A"
    tk.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    if newline:
        tok.add_tokens(["\n"])
    return tok


def write_tiny_model(folder) -> None:
    """A 2-layer Llama and the word-level tokenizer saved as an ordinary local HF folder (built offline)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(folder)
    make_tokenizer(newline=False).save_pretrained(folder)
