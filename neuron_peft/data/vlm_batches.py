"""Vision-language model batches: (image, instruction, answer) samples encoded with loss on the answer only.

`VLMInputs` encodes through the model's own processor when you pass one (``AutoProcessor.from_pretrained(folder)``),
else builds inputs directly from the model config for LLaVA, Qwen2-VL / Qwen2.5-VL and Gemma 3 (image processor
constructed from the vision config, image tokens inserted by id). `vlm_calibration_batches` gives the
``{group: [batch]}`` that `select_neurons` reads; `vlm_features` + `VLMInputs.collate` give training batches with
``neuron_groups``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import nn

from .collate import IGNORE_INDEX
from .images import ImageTranslationExample
from .prompts import IMAGE_TRANSLATION_TEMPLATE, TASKS, prompt_ids, task_prompt

_SEQ_FILL = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX}  # other (batch, seq) keys pad with 0


# ------------------------------------------------------------------------------------------------------ batches


def _cfg_get(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _image_size(vision_cfg) -> int:
    size = getattr(vision_cfg, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if not size:
        raise ValueError("the vision config has no image_size; pass image_size= or processor=")
    return int(size)


class VLMInputs:
    """Encodes (image, instruction, answer) samples into a VLM's inputs; labels are -100 except on the answer.

    With ``processor=`` (e.g. ``AutoProcessor.from_pretrained(folder)``), the processor makes ``pixel_values``
    and expands the image placeholder; the instruction goes through its chat template when it has one (else
    ``"{image token}\\n{instruction}"``). Without one, inputs are built from the model config (``model_type``
    llava, qwen2_vl, qwen2_5_vl, gemma3): an image processor constructed from the vision config (CLIP / Qwen2-VL /
    SigLIP), the image token block inserted by id, and `tokenizer` for the text; meant for models built from a
    config (tests, benchmarks): for a pretrained checkpoint, pass its processor.

    The answer is ``" " + answer`` (``answer`` after a chat template) + EOS; samples longer than `max_length` lose
    the tail of the answer (never the image tokens), and a sample with no room for an answer raises.
    """

    DIRECT = ("llava", "qwen2_vl", "qwen2_5_vl", "gemma3")

    def __init__(
        self,
        model_or_config,
        tokenizer=None,
        *,
        processor=None,
        image_size: Optional[int] = None,
        max_length: int = 512,
        template: str = IMAGE_TRANSLATION_TEMPLATE,
        chat_template: Optional[bool] = None,
        image_placeholder: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        config = getattr(model_or_config, "config", model_or_config)
        self.config = config
        self.model_type = getattr(config, "model_type", None)
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("VLMInputs needs a tokenizer= or a processor= with a tokenizer")
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; set tokenizer.eos_token so answers can end")
        self.max_length, self.template = max_length, template
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        forward = getattr(model_or_config, "forward", None)
        accepted = set(inspect.signature(forward).parameters) if forward is not None else None
        self._accepts = (lambda k: True) if accepted is None else (lambda k: k in accepted)
        if dtype is None and isinstance(model_or_config, nn.Module):
            p = next(model_or_config.parameters(), None)
            dtype = p.dtype if p is not None and p.dtype.is_floating_point else None
        self.dtype = dtype
        if processor is not None:
            self.chat = bool(getattr(processor, "chat_template", None)) if chat_template is None else chat_template
            self.placeholder = (
                image_placeholder or getattr(processor, "boi_token", None) or getattr(processor, "image_token", None)
            )
            if not self.chat and not self.placeholder:
                raise ValueError("the processor has no chat template and no image token; pass image_placeholder=")
            return
        if self.model_type not in self.DIRECT:
            raise NotImplementedError(
                f"no built-in input builder for model_type {self.model_type!r} (built in: {self.DIRECT}); "
                "pass processor=AutoProcessor.from_pretrained(model_folder)"
            )
        self.chat = False
        self._setup_direct(image_size)

    # ------------------------------------------------------------------ direct (no processor)
    def _setup_direct(self, image_size: Optional[int]) -> None:
        cfg, vcfg = self.config, self.config.vision_config
        self.image_token_id = int(_cfg_get(cfg, "image_token_id", "image_token_index"))
        if self.model_type == "llava":
            from transformers import CLIPImageProcessor  # here: importing it warns when torchvision is missing

            size = image_size or _image_size(vcfg)
            if size != _image_size(vcfg):
                raise ValueError(f"LLaVA's vision tower takes {_image_size(vcfg)}px images, not image_size={size}")
            self.image_processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                      crop_size={"height": size, "width": size})  # fmt: skip
            n = (size // vcfg.patch_size) ** 2
            if getattr(cfg, "vision_feature_select_strategy", "default") == "full":
                n += 1
            self._block = lambda _: [self.image_token_id] * n
        elif self.model_type in ("qwen2_vl", "qwen2_5_vl"):
            from transformers import Qwen2VLImageProcessor

            size = image_size or 448
            merge = int(vcfg.spatial_merge_size)
            self.image_processor = Qwen2VLImageProcessor(
                min_pixels=size * size, max_pixels=size * size, patch_size=vcfg.patch_size, merge_size=merge,
                temporal_patch_size=vcfg.temporal_patch_size,
            )  # fmt: skip
            start, end = int(cfg.vision_start_token_id), int(cfg.vision_end_token_id)
            self._block = lambda grid: [start] + [self.image_token_id] * (int(grid.prod()) // merge**2) + [end]
        else:  # gemma3
            from transformers import SiglipImageProcessor

            size = image_size or _image_size(vcfg)
            if size != _image_size(vcfg):
                raise ValueError(f"Gemma 3's vision tower takes {_image_size(vcfg)}px images, not image_size={size}")
            self.image_processor = SiglipImageProcessor(size={"height": size, "width": size})
            n = int(cfg.mm_tokens_per_image)
            boi = int(_cfg_get(cfg, "boi_token_id", "boi_token_index"))
            eoi = int(_cfg_get(cfg, "eoi_token_id", "eoi_token_index"))
            self._block = lambda _: [boi] + [self.image_token_id] * n + [eoi]

    def _direct_prompt(self, image, instruction: str) -> dict:
        pix = self.image_processor(images=[image], return_tensors="pt")
        grid = pix.get("image_grid_thw")
        text = prompt_ids(self.tokenizer, "\n" + instruction)
        bos = self.tokenizer.bos_token_id
        head = [text.pop(0)] if text and bos is not None and text[0] == bos else []
        ids = head + self._block(None if grid is None else grid[0]) + text
        out = {"input_ids": ids, "pixel_values": pix["pixel_values"]}
        if grid is not None:
            out["image_grid_thw"] = grid
        is_image = [int(t == self.image_token_id) for t in ids]
        if self.model_type == "gemma3" and self._accepts("token_type_ids"):
            out["token_type_ids"] = is_image
        if self.model_type in ("qwen2_vl", "qwen2_5_vl") and self._accepts("mm_token_type_ids"):
            out["mm_token_type_ids"] = is_image
        return out

    # ------------------------------------------------------------------ processor
    def _processor_prompt(self, image, instruction: str) -> dict:
        if self.chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = f"{self.placeholder}\n{instruction}"
        enc = self.processor(text=[text], images=[image], return_tensors="pt")
        ids = enc["input_ids"][0].tolist()
        if ids and ids[-1] == self.tokenizer.eos_token_id:  # processors whose tokenizer appends EOS
            ids.pop()
        out: dict[str, Any] = {"input_ids": ids}
        for key, value in enc.items():
            if key == "input_ids" or not torch.is_tensor(value):
                continue
            if value.dim() == 2 and value.shape[0] == 1 and value.shape[1] == len(enc["input_ids"][0]):
                out[key] = value[0, : len(ids)].tolist()  # per-token column (attention_mask, token_type_ids ...)
            else:
                out[key] = value
        return out

    # ------------------------------------------------------------------ public
    def encode(self, image, instruction: str, answer: str, group: Optional[str] = None) -> dict:
        """One training feature: token lists for the per-token columns, tensors (leading image dim) for the rest."""
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("encode: empty answer")
        feat = self._processor_prompt(image, instruction) if self.processor else self._direct_prompt(image, instruction)
        prompt = feat["input_ids"]
        answer_text = answer if self.chat else " " + answer
        ans = list(self.tokenizer(answer_text, add_special_tokens=False)["input_ids"]) + [self.tokenizer.eos_token_id]
        room = self.max_length - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt (with image tokens) is {len(prompt)} tokens: no room for an answer within "
                             f"max_length={self.max_length}")  # fmt: skip
        ans = ans[:room]
        feat["input_ids"] = prompt + ans
        feat["labels"] = [IGNORE_INDEX] * len(prompt) + ans
        feat["attention_mask"] = list(feat.get("attention_mask", [1] * len(prompt))) + [1] * len(ans)
        for key, value in list(feat.items()):
            if isinstance(value, list) and key not in ("input_ids", "labels", "attention_mask"):
                feat[key] = value + [0] * len(ans)
        if group is not None:
            feat["group"] = group
        return feat

    def encode_example(self, example: ImageTranslationExample, task: str = "translate") -> dict:
        """`encode` with the task's instruction and answer (see `task_prompt`); keeps the example's group."""
        instruction, answer = task_prompt(task, example, self.template)
        return self.encode(example.image, instruction, answer, example.group)

    def collate(self, features: Sequence[Mapping[str, Any]], *, return_groups: bool = True,
                padding_side: str = "right") -> dict:  # fmt: skip
        """Pad the per-token columns (input_ids with the pad id, labels with -100, the rest with 0) and
        concatenate image tensors along dim 0; adds ``neuron_groups`` (the samples' groups) unless told not to."""
        if not features:
            raise ValueError("cannot collate an empty batch")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(f["input_ids"]) for f in features)
        batch: dict[str, Any] = {}
        keys = [k for k in features[0] if k != "group"]
        for key in keys:
            values = [f[key] for f in features]
            if isinstance(values[0], list):
                fill = _SEQ_FILL.get(key, 0)
                fill = self.pad_id if fill is None else fill
                rows = []
                for v in values:
                    pad = [fill] * (length - len(v))
                    rows.append(v + pad if padding_side == "right" else pad + v)
                batch[key] = torch.tensor(rows, dtype=torch.long)
            else:
                t = torch.cat(values, dim=0)
                if self.dtype is not None and t.is_floating_point():
                    t = t.to(self.dtype)
                batch[key] = t
        if return_groups:
            batch["neuron_groups"] = [f.get("group") for f in features]
        return batch

    def prompt_batch(self, images: Sequence, instructions: Sequence[str]) -> dict:
        """Left-padded prompt-only batch for ``model.generate`` (no labels)."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        feats = []
        for image, instruction in zip(images, instructions):
            f = (
                self._processor_prompt(image, instruction)
                if self.processor
                else self._direct_prompt(image, instruction)
            )
            f.setdefault("attention_mask", [1] * len(f["input_ids"]))
            feats.append(f)
        return self.collate(feats, return_groups=False, padding_side="left")


def vlm_features(
    inputs: VLMInputs, dataset: Iterable[ImageTranslationExample], tasks: Sequence[str] = TASKS
) -> list[dict]:
    """One encoded feature per (example, task), tasks interleaved per example; each keeps its example's group."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; tasks are {TASKS}")
    return [inputs.encode_example(ex, t) for ex in dataset for t in tasks]


def vlm_calibration_batches(
    inputs: VLMInputs,
    dataset: Iterable[ImageTranslationExample],
    batch_size: int,
    tasks: Sequence[str] = TASKS,
    group_fn: Optional[Callable[[ImageTranslationExample, str], str]] = None,
) -> dict[str, list[dict]]:
    """``{group: [batch, ...]}`` for `select_neurons`: MNAFT's instruction-driven calibration, where each
    example contributes one sample per task (OCR and translation by default), loss on the answer only.

    Groups default to the examples' groups (language pairs); ``group_fn(example, task)`` can name them otherwise
    (e.g. ``lambda ex, t: f"{t}:{ex.group}"`` to score tasks separately). Batches hold one group each.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    by_group: dict[str, list[dict]] = {}
    for ex in dataset:
        for task in tasks:
            feat = inputs.encode_example(ex, task)
            by_group.setdefault(group_fn(ex, task) if group_fn else ex.group, []).append(feat)
    if not by_group:
        raise ValueError("vlm_calibration_batches: the dataset is empty")
    return {
        g: [inputs.collate(fs[i : i + batch_size], return_groups=False) for i in range(0, len(fs), batch_size)]
        for g, fs in by_group.items()
    }
