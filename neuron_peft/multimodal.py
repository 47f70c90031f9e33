"""Vision-language models: per-part targets, image-translation data and image batches for selection and training.

Three pieces, all offline:

* **Parts.** `vlm_target_modules(model)` lists the Linear layers of the vision tower, the projector (connector) and
  the language model, by module name (`neuron_peft.selection.model_part`; checked on LLaVA, LLaVA-NeXT/OneVision,
  Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, PaliGemma, Idefics2/3, SmolVLM, InternVL, Mistral 3, Mllama, Llama 4,
  GLM-4V). `select_vlm_neurons` budgets the parts separately: ``layer_ratio={"vision": .., "projector": ..,
  "language": ..}``. Gemma 3's projector is a bare weight matrix (``torch.matmul``), not a Linear: it has no rows
  to select, so it is reported empty; train it whole with ``modules_to_save=vlm_part_roots(model)["projector"]``.
* **Data.** `render_text_image` draws a sentence IIMT-style (random background colour, contrasting text colour,
  font, size, alignment, word wrap), deterministic by seed; `RenderedTranslationDataset` turns a parallel corpus
  (e.g. `neuron_peft.data.bible_pairs`) into ``(image, src, tgt, group)`` examples; `ImageTranslationDataset`
  wraps your own rows of the same four fields.
* **Batches.** `VLMInputs` encodes (image, instruction, answer) into model inputs with labels on the answer only:
  through the model's own processor when you pass one (``AutoProcessor.from_pretrained(folder)``), else built
  directly from the model config for LLaVA, Qwen2-VL / Qwen2.5-VL and Gemma 3 (image processor constructed from
  the vision config, image tokens inserted by id). The instructions are MNAFT's instruction-driven calibration
  tasks: OCR (``"What is the text in the picture?"`` -> source sentence) and translation (-> target sentence).
  `vlm_calibration_batches` gives the ``{group: [batch]}`` that `select_neurons` reads; `vlm_features` +
  `VLMInputs.collate` give training batches with ``neuron_groups``.

Fonts are looked up in the usual font folders (Debian: ``apt-get install fonts-dejavu-core fonts-noto-core``; Noto
covers Devanagari, Arabic, CJK ...), in matplotlib's bundled DejaVu fonts, and in ``$NEURON_PEFT_FONT_DIRS``;
with no font file at all, Pillow's built-in font is used (Latin only) and a warning says so.
"""

from __future__ import annotations

import functools
import inspect
import os
import random
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from .data import IGNORE_INDEX, OCR_PROMPT, ParallelExample, language_name
from .selection import PARTS, _linear_out, model_part
from .tuner.packed_patches import packed_patch_samples, packs_patches  # noqa: F401  (public here too)

IMAGE_TRANSLATION_TEMPLATE = "Translate the text in the picture from {src} into {tgt}. {tgt}:"
TASKS = ("ocr", "translate")
FONT_DIRS_ENV = "NEURON_PEFT_FONT_DIRS"
_SEQ_FILL = {"input_ids": None, "attention_mask": 0, "labels": IGNORE_INDEX}  # other (batch, seq) keys pad with 0
_SYMBOL_FONTS = re.compile(r"^(LastResort|cmex|cmsy|cmmi|STIXSiz|STIXNonUni|.*Emoji|.*Symbol|.*Math)", re.I)


# ------------------------------------------------------------------------------------------------------ parts


def _parts_arg(parts: Union[str, Sequence[str]]) -> tuple[str, ...]:
    parts = (parts,) if isinstance(parts, str) else tuple(parts)
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {list(PARTS)}, got {list(parts)}")
    return parts


def _not_called_linears(model: nn.Module) -> set[str]:
    """Linear children that their parent never calls (nn.MultiheadAttention reads ``out_proj.weight`` directly)."""
    skip = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            skip.add(f"{name}.out_proj" if name else "out_proj")
    return skip


def vlm_target_modules(
    model: nn.Module,
    parts: Union[str, Sequence[str]] = PARTS,
    *,
    include_output_layer: bool = False,
) -> dict[str, list[str]]:
    """Full names of the Linear (and Conv1D) layers of each part: ``{"vision": [...], "projector": [...], ...}``.

    The output layer (``lm_head``, the model's output embeddings) is left out unless `include_output_layer`, as
    in PEFT's ``"all-linear"``; so are Linear layers that are never called as modules (the ``out_proj`` of an
    ``nn.MultiheadAttention``, e.g. in SigLIP's pooling head). A part with no Linear layer (Gemma 3's projector)
    maps to an empty list. Raises if none of the requested parts has a Linear layer.
    """
    parts = _parts_arg(parts)
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip = _not_called_linears(model)
    found: dict[str, list[str]] = {p: [] for p in parts}
    for name, module in model.named_modules():
        if not name or name in skip or _linear_out(module) is None:
            continue
        if module is out_emb and not include_output_layer:
            continue
        part = model_part(name)
        if part in found:
            found[part].append(name)
    if not any(found.values()):
        raise ValueError(f"the model has no Linear layer in part(s) {list(parts)} (module names: see model_part)")
    return found


def vlm_part_roots(model: nn.Module) -> dict[str, list[str]]:
    """Outermost module names of the vision tower and of the projector, e.g. ``{"vision": ["model.vision_tower"],
    "projector": ["model.multi_modal_projector"]}`` (the language model is everything else)."""
    roots: dict[str, list[str]] = {"vision": [], "projector": []}
    for name, _ in model.named_modules():
        if not name:
            continue
        part = model_part(name)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if part in roots and (not parent or model_part(parent) != part):
            roots[part].append(name)
    return roots


def flatten_targets(targets: Mapping[str, Sequence[str]]) -> list[str]:
    """The names of a `vlm_target_modules` result as one list (a ``target_modules`` for PEFT configs)."""
    return [n for names in targets.values() for n in names]


def select_vlm_neurons(
    model: nn.Module,
    calibration,
    parts: Union[str, Sequence[str]] = PARTS,
    layer_ratio: Union[float, Mapping[str, float]] = 0.4,
    *,
    specific_parts: Union[str, Sequence[str], None] = "auto",
    include_output_layer: bool = False,
    **kwargs: Any,
):
    """`select_neurons` over the Linear layers of `parts`, each part with its own layer budget.

    `layer_ratio` is one fraction for every part or ``{"vision": .., "projector": .., "language": ..}``; entries
    for a part without Linear layers (Gemma 3's projector) are ignored. `specific_parts` lists the parts that may
    hold language-specific rows; in the others those rows become agnostic (same rows, shared by every group).
    ``"auto"`` (default): every part (packed-patch towers such as Qwen2-VL's are routed through
    `packed_patch_samples`). ``selection.decide()`` re-runs the plain decision (undoing this). Other arguments go
    to `select_neurons`.
    """
    from .selection import select_neurons

    if "target_modules" in kwargs:
        raise TypeError("select_vlm_neurons() chooses target_modules from `parts`; use select_neurons() otherwise")
    targets = vlm_target_modules(model, parts, include_output_layer=include_output_layer)
    if isinstance(layer_ratio, Mapping):
        unknown = sorted(set(layer_ratio) - set(PARTS))
        if unknown:
            raise ValueError(f"layer_ratio: unknown part(s) {unknown}; parts are {list(PARTS)}")
        layer_ratio = {p: r for p, r in layer_ratio.items() if targets.get(p)}
    if specific_parts == "auto":
        specific_parts = PARTS
    specific_parts = () if specific_parts is None else _parts_arg(specific_parts) if specific_parts else ()
    selection = select_neurons(model, calibration, target_modules=flatten_targets(targets), layer_ratio=layer_ratio,
                               **kwargs)  # fmt: skip
    for group, rows in list(selection.language_neurons.items()):
        for name in [n for n in rows if model_part(n) not in specific_parts]:
            selection.neurons[name] = sorted(selection.neurons.get(name, []) + rows.pop(name))
        if not rows:
            del selection.language_neurons[group]
    return selection


# ------------------------------------------------------------------------------------------------------ fonts


def font_dirs() -> list[Path]:
    """Folders searched for .ttf/.otf files: ``$NEURON_PEFT_FONT_DIRS`` (os.pathsep-separated) first, then the
    system and user font folders, then matplotlib's bundled fonts (DejaVu) when matplotlib is installed."""
    dirs = [Path(d) for d in os.environ.get(FONT_DIRS_ENV, "").split(os.pathsep) if d]
    dirs += [Path(d) for d in ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts", "C:/Windows/Fonts")]
    dirs += [Path.home() / ".fonts", Path.home() / ".local" / "share" / "fonts"]
    try:
        from importlib.util import find_spec

        spec = find_spec("matplotlib")
        if spec is not None and spec.submodule_search_locations:
            dirs.append(Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf")
    except (ImportError, ValueError):
        pass
    return [d for d in dirs if d.is_dir()]


@functools.lru_cache(maxsize=None)
def _font_files(dirs: tuple[str, ...]) -> tuple[str, ...]:
    files = []
    for d in dirs:
        for root, _, names in os.walk(d):
            files += [os.path.join(root, n) for n in names if n.lower().endswith((".ttf", ".otf"))]
    keep = [f for f in files if not _SYMBOL_FONTS.match(os.path.basename(f))]
    return tuple(sorted(set(keep)))


@functools.lru_cache(maxsize=None)
def _cmap(path: str) -> Optional[frozenset[int]]:
    """Code points a font maps (None when fontTools is missing or the file cannot be read)."""
    try:
        from fontTools.ttLib import TTFont
    except ImportError:
        return None
    try:
        with TTFont(path, lazy=True, fontNumber=0) as font:
            return frozenset(font.getBestCmap() or {})
    except Exception:  # a broken font file must not stop rendering
        return frozenset()


def find_fonts(text: Optional[str] = None, dirs: Optional[Sequence[Union[str, os.PathLike]]] = None) -> list[str]:
    """Font files (sorted paths) that have a glyph for every non-space character of `text` (all fonts when `text`
    is None; no coverage check without fontTools). Symbol and math fonts are never returned."""
    dirs = tuple(str(d) for d in (font_dirs() if dirs is None else dirs))
    files = _font_files(dirs)
    if text is None:
        return list(files)
    needed = {ord(c) for c in text if not c.isspace()}
    out = []
    for f in files:
        cmap = _cmap(f)
        if cmap is None or needed <= cmap:
            out.append(f)
    return out


_WARNED: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


# ------------------------------------------------------------------------------------------------------ rendering


def _luminance(rgb: Sequence[int]) -> float:
    r, g, b = (c / 255.0 for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _random_colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(background, text) with a luminance gap of at least 0.45, so the text stays readable."""
    bg = tuple(rng.randrange(256) for _ in range(3))
    while True:
        fg = tuple(rng.randrange(256) for _ in range(3))
        if abs(_luminance(fg) - _luminance(bg)) >= 0.45:
            return bg, fg  # type: ignore[return-value]


def _load_font(path: Optional[str], size: int):
    from PIL import ImageFont

    if path is not None:
        return ImageFont.truetype(path, size)
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable built-in font
    except TypeError:
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    if hasattr(font, "getlength"):
        return float(font.getlength(text))
    box = font.getbbox(text)
    return float(box[2] - box[0])


def wrap_text(text: str, font, max_width: float) -> list[str]:
    """Greedy word wrap by rendered width; a word wider than a line (or text without spaces) breaks by character."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" ") if " " in para else [para]:
            cand = f"{line} {word}" if line else word
            if _text_width(font, cand) <= max_width:
                line = cand
                continue
            if line:
                lines.append(line)
                line = ""
            for ch in word:  # the word alone does not fit (or no spaces): break it by character
                if line and _text_width(font, line + ch) > max_width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def render_text_image(
    text: str,
    *,
    seed: Union[int, str] = 0,
    size: tuple[int, int] = (448, 448),
    fonts: Optional[Sequence[str]] = None,
    font_size: tuple[int, int] = (18, 40),
    margin: int = 12,
    background: Optional[tuple[int, int, int]] = None,
    color: Optional[tuple[int, int, int]] = None,
    line_spacing: float = 1.25,
):
    """An RGB PIL image of `text` in the IIMT style, the same for the same seed.

    Drawn at random: background colour, a text colour contrasting with it, a font among `fonts` (default: every
    installed font that has all the characters of `text`, see `find_fonts`), a size in `font_size`, and left or
    centred alignment; lines wrap by width, and the size shrinks until the text fits in `size` (width, height).
    """
    from PIL import Image, ImageDraw

    if not isinstance(text, str) or not text.strip():
        raise ValueError("render_text_image: text must be a non-empty string")
    width, height = size
    if width < 2 * margin + 8 or height < 2 * margin + 8:
        margin = max(0, min(width, height) // 8)
    rng = random.Random(f"neuron_peft.render:{seed}")
    bg, fg = _random_colours(rng)
    bg, fg = background or bg, color or fg
    candidates = list(fonts) if fonts is not None else find_fonts(text)
    if fonts is None and not candidates:
        any_font = find_fonts()
        if any_font:
            _warn_once("coverage", "no installed font covers every character of the text; some glyphs will be "
                       "boxes (Debian: apt-get install fonts-noto-core)")  # fmt: skip
            candidates = any_font
        else:
            _warn_once("nofont", "no font file found; using Pillow's built-in font (Latin only). Install fonts "
                       "(apt-get install fonts-dejavu-core fonts-noto-core) or set NEURON_PEFT_FONT_DIRS")  # fmt: skip
    path = rng.choice(sorted(candidates)) if candidates else None
    lo, hi = font_size
    px = rng.randint(min(lo, hi), max(lo, hi))
    align = rng.choice(["left", "center"])
    box_w, box_h = width - 2 * margin, height - 2 * margin
    while True:
        font = _load_font(path, px)
        lines = wrap_text(text, font, box_w)
        step = max(1, int(round(px * line_spacing)))
        if len(lines) * step <= box_h or px <= 6:
            break
        px = max(6, int(px * 0.85))
    image = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(image)
    y = margin + max(0, (box_h - len(lines) * step) // 2)
    for line in lines:
        x = margin + (max(0.0, box_w - _text_width(font, line)) / 2 if align == "center" else 0)
        draw.text((x, y), line, fill=fg, font=font)
        y += step
    return image


# ------------------------------------------------------------------------------------------------------ datasets


@dataclass
class ImageTranslationExample:
    """One image-translation sample; ``image, src, tgt, group = example`` unpacks the four main fields."""

    image: Any  # PIL.Image.Image
    src: str
    tgt: str
    group: str
    src_lang: Optional[str] = None
    tgt_lang: Optional[str] = None
    ref: Optional[str] = None

    def __iter__(self):
        yield from (self.image, self.src, self.tgt, self.group)


def _langs(group: str, src_lang: Optional[str], tgt_lang: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    if src_lang and tgt_lang:
        return src_lang, tgt_lang
    bits = group.split("-")
    if len(bits) == 2 and all(bits):
        return src_lang or bits[0], tgt_lang or bits[1]
    return src_lang, tgt_lang


class RenderedTranslationDataset:
    """A parallel corpus with each source sentence rendered into an image (see `render_text_image`).

    Item ``i`` is rendered from ``(seed, i)`` only, so the dataset is deterministic and needs no storage; with
    ``cache=True`` images are kept after their first rendering. Works as a map-style torch Dataset.
    """

    def __init__(self, examples: Sequence[ParallelExample], seed: int = 0, *, cache: bool = False, **render_kwargs):
        if len(examples) == 0:
            raise ValueError("RenderedTranslationDataset: no examples")
        self.examples = list(examples)
        self.seed = seed
        self.render_kwargs = render_kwargs
        self._cache: Optional[dict[int, Any]] = {} if cache else None

    def __len__(self) -> int:
        return len(self.examples)

    def image(self, i: int):
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        img = render_text_image(self.examples[i].src, seed=f"{self.seed}:{i}", **self.render_kwargs)
        if self._cache is not None:
            self._cache[i] = img
        return img

    def __getitem__(self, i: int) -> ImageTranslationExample:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        ex = self.examples[i]
        return ImageTranslationExample(self.image(i), ex.src, ex.tgt, ex.group, ex.src_lang, ex.tgt_lang, ex.ref)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _open_image(image, where: str):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, Mapping) and ("bytes" in image or "path" in image):  # datasets Image(decode=False)
        if image.get("bytes"):
            import io

            return Image.open(io.BytesIO(image["bytes"])).convert("RGB")
        image = image["path"]
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"{where}: image file not found: {image}")
        return Image.open(image).convert("RGB")
    if hasattr(image, "__array__"):
        import numpy as np

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    raise TypeError(f"{where}: cannot read an image from {type(image).__name__} (PIL image, path, array or bytes)")


class ImageTranslationDataset:
    """Your own image-translation rows: tuples ``(image, src, tgt, group)`` or mappings with those keys (plus
    optional ``src_lang`` / ``tgt_lang``), or a `datasets.Dataset` with those columns. Images may be PIL images,
    file paths, arrays, or ``{"bytes": ...}`` records; languages default to the two halves of a group ``"en-fr"``.
    """

    def __init__(self, rows: Iterable, *, src_lang: Optional[str] = None, tgt_lang: Optional[str] = None):
        self.rows = rows if hasattr(rows, "column_names") else list(rows)
        if len(self.rows) == 0:
            raise ValueError("ImageTranslationDataset: no rows")
        self.src_lang, self.tgt_lang = src_lang, tgt_lang

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> ImageTranslationExample:
        row = self.rows[i]
        where = f"row {i}"
        if isinstance(row, Mapping):
            missing = [k for k in ("image", "src", "tgt", "group") if k not in row]
            if missing:
                raise ValueError(f"{where}: missing key(s) {missing}; rows need image, src, tgt, group")
            image, src, tgt, group = row["image"], row["src"], row["tgt"], row["group"]
            sl, tl = row.get("src_lang") or self.src_lang, row.get("tgt_lang") or self.tgt_lang
        elif isinstance(row, Sequence) and not isinstance(row, str) and len(row) == 4:
            image, src, tgt, group = row
            sl, tl = self.src_lang, self.tgt_lang
        else:
            raise TypeError(f"{where}: expected (image, src, tgt, group) or a mapping, got {type(row).__name__}")
        for key, val in (("src", src), ("tgt", tgt), ("group", group)):
            if not isinstance(val, str) or not val.strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {val!r}")
        sl, tl = _langs(group, sl, tl)
        return ImageTranslationExample(_open_image(image, where), src.strip(), tgt.strip(), group.strip(), sl, tl)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


# ------------------------------------------------------------------------------------------------------ prompts


def task_prompt(
    task: str, example: ImageTranslationExample, template: str = IMAGE_TRANSLATION_TEMPLATE
) -> tuple[str, str]:
    """(instruction, answer) for one task: ``"ocr"`` -> the source sentence, ``"translate"`` -> the target."""
    if task == "ocr":
        return OCR_PROMPT, example.src
    if task == "translate":
        if not example.src_lang or not example.tgt_lang:
            raise ValueError(f"group {example.group!r}: unknown languages; name groups 'src-tgt' or set src/tgt_lang")
        return template.format(src=language_name(example.src_lang), tgt=language_name(example.tgt_lang)), example.tgt
    raise ValueError(f"unknown task {task!r}; tasks are {TASKS}")


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
            from transformers import CLIPImageProcessor

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
        from .data import _prompt_ids

        pix = self.image_processor(images=[image], return_tensors="pt")
        grid = pix.get("image_grid_thw")
        text = _prompt_ids(self.tokenizer, "\n" + instruction)
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
    import contextlib

    from .tuner.routing import route

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


def char_tokenizer(extra_tokens: Sequence[str] = ()):
    """A character-level fast tokenizer (printable ASCII plus special tokens) built in memory, for models built
    from a config (tests, benchmarks, demos without a checkpoint). Ids: <pad>=0, <s>=1, </s>=2, <unk>=3,
    then `extra_tokens` (e.g. ``"<image>"``), then newline and the characters; BOS is prepended like Llama's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", *extra_tokens]
    vocab = {tok: i for i, tok in enumerate(specials + ["\n"] + [chr(c) for c in range(32, 127)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
