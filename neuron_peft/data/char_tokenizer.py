"""`char_tokenizer`: a character-level fast tokenizer built in memory, for models built from a config.

Tests, benchmarks and offline demos have no checkpoint and therefore no tokenizer; this one needs no files.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast


def char_tokenizer(extra_tokens: Sequence[str] = ()):
    """A character-level fast tokenizer (printable ASCII plus special tokens) built in memory, for models built
    from a config (tests, benchmarks, demos without a checkpoint). Ids: <pad>=0, <s>=1, </s>=2, <unk>=3,
    then `extra_tokens` (e.g. ``"<image>"``), then newline and the characters; BOS is prepended like Llama's."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra_tokens]
    vocab = {tok: i for i, tok in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
