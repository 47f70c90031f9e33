"""Text rendered into images (IIMT-style) and image-translation datasets, all offline and deterministic by seed.

`render_text_image` draws a sentence (random background colour, contrasting text colour, font, size, alignment,
word wrap); `RenderedTranslationDataset` turns a parallel corpus (e.g. `neuron_peft.data.bible_pairs`) into
``(image, src, tgt, group)`` examples; `ImageTranslationDataset` wraps your own rows of the same four fields.

Fonts are looked up in the usual font folders (Debian: ``apt-get install fonts-dejavu-core fonts-noto-core``; Noto
covers Devanagari, Arabic, CJK ...), in matplotlib's bundled DejaVu fonts, and in ``$NEURON_PEFT_FONT_DIRS``;
with no font file at all, Pillow's built-in font is used (Latin only) and a warning says so. Pillow (and fontTools,
for glyph coverage) are optional dependencies, imported where they are used.
"""

from __future__ import annotations

import functools
import os
import random
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .corpus import ParallelExample, split_group

FONT_DIRS_ENV = "NEURON_PEFT_FONT_DIRS"

_SYMBOL_FONTS = re.compile(r"^(LastResort|cmex|cmsy|cmmi|STIXSiz|STIXNonUni|.*Emoji|.*Symbol|.*Math)", re.I)


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


def _warn_font(message: str) -> None:
    """A font problem, said through `warnings`: its default filter shows it once per call site, and the user's
    filters decide the rest (no registry of our own)."""
    warnings.warn(message, UserWarning, stacklevel=3)


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
            _warn_font("no installed font covers every character of the text; some glyphs will be "
                       "boxes (Debian: apt-get install fonts-noto-core)")  # fmt: skip
            candidates = any_font
        else:
            _warn_font("no font file found; using Pillow's built-in font (Latin only). Install fonts "
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
    """Languages given explicitly win; missing ones are read off a group named ``"src-tgt"``."""
    group_src, group_tgt = split_group(group)
    return src_lang or group_src, tgt_lang or group_tgt


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
