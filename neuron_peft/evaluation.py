"""Evaluating translations: greedy generation (text and image-translation models) and sacrebleu scores.

`translate` generates one answer per `ParallelExample` (the MNAFT prompt, optional few-shot prefix, stop at the
first newline); `vlm_generate` does the same for image examples (OCR or translation); `score_translations` gives
corpus BLEU and chrF with their sacrebleu signatures, so reported numbers are reproducible.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Optional, Sequence

import torch
from torch import nn
from transformers import StoppingCriteriaList

from .data.collate import generation_prompts, padding_id
from .data.corpus import ParallelExample
from .data.images import ImageTranslationExample
from .data.prompts import TRANSLATION_TEMPLATE, task_prompt
from .data.vlm_batches import VLMInputs
from .tuner.routing import route


class _StopAtNewline:
    """Stopping criterion: a row is done once its new text holds a newline (few-shot answers end with one).

    Kept instead of ``generate(stop_strings=["\\n"], tokenizer=...)`` (transformers' ``StopStringCriteria``), which
    stops at the same step (tests/data/test_data.py checks it on the same model) but, in transformers 5.23, costs 7-10 s
    per ``generate`` call for Gemma 3's 262,144-token vocabulary on this project's CPU: it rebuilds its token tables
    on every call because its cache key is the vocabulary in ``get_vocab()`` order, which changes from call to call
    for fast tokenizers, so the cache never hits (minutes per benchmark run). It also cannot preprocess word-level
    vocabularies that do not round-trip the string "abcdef" (``ValueError: substring not found``). Decoding the new
    tokens of 8 rows per step costs well under a millisecond.
    """

    def __init__(self, tokenizer, prompt_len: int):
        self.tokenizer, self.prompt_len = tokenizer, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len :], skip_special_tokens=True)
        return torch.tensor(["\n" in t for t in texts], device=input_ids.device)


def translate(
    model,
    tokenizer,
    examples: Sequence[ParallelExample],
    max_new_tokens: int = 128,
    batch_size: int = 8,
    *,
    shots: Sequence[ParallelExample] = (),
    template: str = TRANSLATION_TEMPLATE,
    batch_context: Optional[Callable[[list[str]], ContextManager]] = None,
    progress: bool = False,
) -> list[str]:
    """Greedy translations, one per example: the text after the prompt up to the first newline or EOS.

    `batch_context(groups)` wraps each generate call; use it to route language-specific neurons for the batch.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    hyps: list[str] = []
    starts = range(0, len(examples), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="translate", unit="batch")
    try:
        for i in starts:
            chunk = examples[i : i + batch_size]
            batch = generation_prompts(tokenizer, chunk, shots=shots, template=template)
            prompt_len = batch["input_ids"].shape[1]
            ctx = batch_context([ex.group for ex in chunk]) if batch_context else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                out = model.generate(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=padding_id(tokenizer),
                    eos_token_id=tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopAtNewline(tokenizer, prompt_len)]),
                )
            texts = tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)
            hyps.extend(t.split("\n", 1)[0].strip() for t in texts)
    finally:
        model.train(was_training)
    return hyps


_SACREBLEU_TOKENIZE = {"zh": "zh", "ja": "char", "ko": "char"}


def score_translations(hyps: Sequence[str], refs: Sequence[str], tgt_lang: Optional[str] = None) -> dict:
    """Corpus BLEU and chrF (sacrebleu) with their signatures, so reported numbers are reproducible.

    BLEU uses sacrebleu's 13a tokenizer, except character-level tokenization for zh/ja/ko where words have no
    spaces.
    """
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("scoring needs sacrebleu: pip install sacrebleu") from None
    hyps, refs = list(hyps), list(refs)
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
    if not hyps:
        raise ValueError("nothing to score")
    bleu = sacrebleu.metrics.BLEU(tokenize=_SACREBLEU_TOKENIZE.get(tgt_lang or "", "13a"))
    chrf = sacrebleu.metrics.CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    return {
        "bleu": b.score,
        "chrf": c.score,
        "n": len(hyps),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def vlm_generate(
    model: nn.Module,
    inputs: VLMInputs,
    examples: Sequence[ImageTranslationExample],
    task: str = "translate",
    *,
    max_new_tokens: int = 64,
    batch_size: int = 4,
    route_groups: bool = False,
) -> list[str]:
    """Greedy answers (OCR transcriptions or translations) for image examples, decoded after the prompt.

    ``route_groups=True`` sets each batch's groups for the NeuronSelect adapter while generating (inference is the
    same for every group, so this only matters for custom layers that read the route).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out_texts: list[str] = []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            prompts = [task_prompt(task, ex, inputs.template)[0] for ex in chunk]
            batch = inputs.prompt_batch([ex.image for ex in chunk], prompts)
            batch = {k: v.to(device) for k, v in batch.items()}
            n = batch["input_ids"].shape[1]
            ctx = route(model, [ex.group for ex in chunk]) if route_groups else contextlib.nullcontext()
            with ctx, torch.inference_mode():
                gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     pad_token_id=inputs.pad_id, eos_token_id=inputs.tokenizer.eos_token_id)  # fmt: skip
            texts = inputs.tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True)
            out_texts.extend(t.strip().split("\n", 1)[0] for t in texts)
    finally:
        model.train(was_training)
    return out_texts
