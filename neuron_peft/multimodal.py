"""Vision-language models in one import: per-part targets and budgets, plus the image data, batches and generation.

The VLM pieces live with their stage; this module gathers them under the name the README documents:

* **Parts** (`neuron_peft.selection.vlm`): `vlm_target_modules(model)` lists the Linear layers of
  the vision tower, the projector (connector) and the language model, by module name
  (`neuron_peft.selection.model_part`; checked on LLaVA, LLaVA-NeXT/OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
  Gemma 3, PaliGemma, Idefics2/3, SmolVLM, InternVL, Mistral 3, Mllama, Llama 4, GLM-4V). `select_vlm_neurons`
  budgets the parts separately: ``layer_ratio={"vision": .., "projector": .., "language": ..}``. Gemma 3's projector
  is a bare weight matrix (``torch.matmul``), not a Linear: it has no rows to select, so it is reported empty; train
  it whole with ``modules_to_save=vlm_part_roots(model)["projector"]``.
* **Images** (`neuron_peft.data.images`): `render_text_image`, `RenderedTranslationDataset`,
  `ImageTranslationDataset`, fonts.
* **Batches** (`neuron_peft.data.vlm_batches`): `VLMInputs`, `vlm_features`, `vlm_calibration_batches`; the
  instructions are in `neuron_peft.data.prompts` (`task_prompt`).
* **Generation** (`neuron_peft.evaluation`): `vlm_generate`. **Routing** of packed-patch vision towers
  (Qwen2-VL and kin): `neuron_peft.tuner.packed_patches`.
"""

from __future__ import annotations

from .data.char_tokenizer import char_tokenizer
from .data.images import (
    FONT_DIRS_ENV,
    ImageTranslationDataset,
    ImageTranslationExample,
    RenderedTranslationDataset,
    find_fonts,
    font_dirs,
    render_text_image,
    wrap_text,
)
from .data.prompts import IMAGE_TRANSLATION_TEMPLATE, TASKS, task_prompt
from .data.vlm_batches import VLMInputs, vlm_calibration_batches, vlm_features
from .evaluation import vlm_generate
from .selection.targets import PARTS
from .selection.vlm import flatten_targets, select_vlm_neurons, vlm_part_roots, vlm_target_modules
from .tuner.packed_patches import packed_patch_samples, packs_patches

__all__ = [
    "FONT_DIRS_ENV",
    "IMAGE_TRANSLATION_TEMPLATE",
    "PARTS",
    "TASKS",
    "ImageTranslationDataset",
    "ImageTranslationExample",
    "RenderedTranslationDataset",
    "VLMInputs",
    "char_tokenizer",
    "find_fonts",
    "flatten_targets",
    "font_dirs",
    "packed_patch_samples",
    "packs_patches",
    "render_text_image",
    "select_vlm_neurons",
    "task_prompt",
    "vlm_calibration_batches",
    "vlm_features",
    "vlm_generate",
    "vlm_part_roots",
    "vlm_target_modules",
    "wrap_text",
]
