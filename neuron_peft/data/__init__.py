"""Data for translation fine-tuning, neuron calibration and evaluation (`neuron_peft.evaluation`); nothing downloads.

* `corpus.py` — `ParallelExample`, your own files (`load_parallel`) and the Bible verses (`bible_pairs`).
* `prompts.py` — the MNAFT instructions (text translation, few-shot prefixes, the image tasks).
* `collate.py` — tokenized features with loss on the answer only, `TranslationCollator`, `GroupsCollator`, calibration batches.
* `images.py` — text rendered into images and image-translation datasets; `vlm_batches.py` — VLM inputs.
* `char_tokenizer.py` — an in-memory character tokenizer for models built from a config.
"""

from .char_tokenizer import char_tokenizer
from .collate import (
    GROUP_COLUMNS,
    GROUPS_COLUMN,
    IGNORE_INDEX,
    GroupsCollator,
    TranslationCollator,
    calibration_batches,
    encode_example,
    encode_examples,
    feature_groups,
    generation_prompts,
)
from .corpus import (
    BIBLE_DEV_BOOKS,
    BIBLE_SPLITS,
    BIBLE_TEST_BOOKS,
    BIBLE_VERSIONS,
    ParallelExample,
    bible_pairs,
    clean_verse,
    load_parallel,
)
from .images import ImageTranslationDataset, ImageTranslationExample, RenderedTranslationDataset, render_text_image
from .prompts import (
    IMAGE_TRANSLATION_TEMPLATE,
    LANGUAGE_NAMES,
    OCR_PROMPT,
    TASKS,
    TRANSLATION_TEMPLATE,
    few_shot_prefix,
    language_name,
    ocr_prompt,
    task_prompt,
    translation_prompt,
)
from .vlm_batches import VLMInputs, vlm_calibration_batches, vlm_features

__all__ = [
    "BIBLE_DEV_BOOKS",
    "BIBLE_SPLITS",
    "BIBLE_TEST_BOOKS",
    "BIBLE_VERSIONS",
    "GROUPS_COLUMN",
    "GROUP_COLUMNS",
    "GroupsCollator",
    "IGNORE_INDEX",
    "IMAGE_TRANSLATION_TEMPLATE",
    "LANGUAGE_NAMES",
    "OCR_PROMPT",
    "TASKS",
    "TRANSLATION_TEMPLATE",
    "ImageTranslationDataset",
    "ImageTranslationExample",
    "ParallelExample",
    "RenderedTranslationDataset",
    "TranslationCollator",
    "VLMInputs",
    "bible_pairs",
    "calibration_batches",
    "char_tokenizer",
    "clean_verse",
    "encode_example",
    "encode_examples",
    "feature_groups",
    "few_shot_prefix",
    "generation_prompts",
    "language_name",
    "load_parallel",
    "ocr_prompt",
    "render_text_image",
    "task_prompt",
    "translation_prompt",
    "vlm_calibration_batches",
    "vlm_features",
]
