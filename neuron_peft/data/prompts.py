"""Instructions: the MNAFT translation prompt, few-shot prefixes and the image tasks' instructions (OCR, translate).

Prompts follow MNAFT: ``"Translate the text from {src} into {tgt}. {src}: {text} {tgt}:"``; the answer is
``" " + target + EOS`` and only the answer tokens carry loss (see `neuron_peft.data.collate`). The image tasks are
MNAFT's instruction-driven calibration tasks: OCR (-> source sentence) and translation (-> target sentence).
"""

from __future__ import annotations

from typing import Optional, Sequence

TRANSLATION_TEMPLATE = "Translate the text from {src} into {tgt}. {src}: {text} {tgt}:"
OCR_PROMPT = "What is the text in the picture?"

LANGUAGE_NAMES = {
    "en": "English", "fr": "French", "de": "German", "hi": "Hindi", "tr": "Turkish", "sw": "Swahili",
    "id": "Indonesian", "vi": "Vietnamese", "ru": "Russian", "es": "Spanish", "it": "Italian", "pt": "Portuguese",
    "zh": "Chinese", "ja": "Japanese", "ko": "Korean", "ar": "Arabic", "fa": "Persian", "pl": "Polish",
    "ro": "Romanian", "uk": "Ukrainian", "bn": "Bengali", "tl": "Tagalog",
}  # fmt: skip

IMAGE_TRANSLATION_TEMPLATE = "Translate the text in the picture from {src} into {tgt}. {tgt}:"
TASKS = ("ocr", "translate")


def language_name(code: str) -> str:
    """Display name used inside prompts ("fr" -> "French"); unknown codes are used as given."""
    return LANGUAGE_NAMES.get(code, code)


def translation_prompt(text: str, src_lang: str, tgt_lang: str, template: str = TRANSLATION_TEMPLATE) -> str:
    """The MNAFT instruction for one source sentence, ending right where the translation starts."""
    return template.format(src=language_name(src_lang), tgt=language_name(tgt_lang), text=text)


def few_shot_prefix(shots: Sequence, template: str = TRANSLATION_TEMPLATE) -> str:
    """Solved examples, one per line; a base model then continues the pattern and ends its answer with a newline."""
    return "".join(f"{translation_prompt(s.src, s.src_lang, s.tgt_lang, template)} {s.tgt}\n" for s in shots)


def ocr_prompt(image_token: Optional[str] = None) -> str:
    """Text part of the VLM OCR instruction; `image_token` (e.g. "<image>") goes first when the processor needs it."""
    return f"{image_token}\n{OCR_PROMPT}" if image_token else OCR_PROMPT


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt as generation will see them: special tokens (BOS) added, a trailing EOS dropped."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and ids and ids[-1] == eos:  # tokenizers that append EOS would end the prompt early
        ids.pop()
    return ids


def task_prompt(task: str, example, template: str = IMAGE_TRANSLATION_TEMPLATE) -> tuple[str, str]:
    """(instruction, answer) for one task: ``"ocr"`` -> the source sentence, ``"translate"`` -> the target."""
    if task == "ocr":
        return OCR_PROMPT, example.src
    if task == "translate":
        if not example.src_lang or not example.tgt_lang:
            raise ValueError(f"group {example.group!r}: unknown languages; name groups 'src-tgt' or set src/tgt_lang")
        return template.format(src=language_name(example.src_lang), tgt=language_name(example.tgt_lang)), example.tgt
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")
