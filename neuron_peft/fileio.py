"""Writing files safely: one atomic-write helper and one output-folder rule for every writer in neuron_peft.

Two promises, kept in one place so the CLI, `NeuronSelection.save`, the plots and the benchmarks cannot drift apart:

- A reader never sees a half-written file. Each file is written under a temporary name in its own folder and then
  renamed over the target with `os.replace`, which is atomic on POSIX and Windows when both names are on the same
  file system (the same folder guarantees that). An interrupted write leaves the old file intact.
- A command never deletes what it did not create. An existing non-empty output folder is refused unless the user
  says ``--overwrite``, and even then only the files the command writes are replaced (no ``rmtree``: ``--out .``
  must not empty the working directory). An output that equals, contains or sits inside one of the command's
  inputs is refused outright, so ``merge --out`` can never destroy the adapter or model it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional, Union

from .errors import OutputPathError

PathLike = Union[str, os.PathLike]
STAGING_PREFIX = ".neuron-peft-tmp-"


# ------------------------------------------------------------------------------------------------------ atomic write
def _temp_name(path: Path) -> Path:
    # keep the real suffix last: writers such as matplotlib's savefig pick the format from it
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block succeeds it is renamed onto `path` (``os.replace``).

    The caller writes the temporary path with any writer (``safetensors.save_file``, ``savefig``, ``open``); on an
    exception the temporary file is removed and `path` is left as it was. The temporary file is created by the
    writer itself, so it gets the usual permissions (umask), not the private mode of ``mkstemp``.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{path} is a folder; cannot write a file there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (temporary file in the same folder, then ``os.replace``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_json(path: PathLike, data: Any, *, indent: int = 2, **dumps_kwargs: Any) -> Path:
    """Write `data` as JSON (UTF-8, trailing newline) to `path` atomically."""
    dumps_kwargs.setdefault("ensure_ascii", False)
    return atomic_write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")


def atomic_dir(target: PathLike, write: Callable[[Path], Any], *, replace: Callable[[Path], bool]) -> Path:
    """Build a whole folder atomically: ``write(tmp)`` fills a temporary sibling, which is then renamed to `target`.

    For folders this package owns outright (the converted-model cache), never for user output folders (use
    `write_into`). An existing `target` is swapped out only when ``replace(target)`` is true (it is moved aside
    first, then deleted, because deleting a big folder is not atomic); otherwise, or when another process renamed
    its own build into place first, the existing folder is kept and ours discarded. On any error nothing is left
    behind but what was there before.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        write(tmp)
        if target.exists() and replace(target):
            stale = target.with_name(f".{target.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.exists() or replace(target):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------------------- out checks
def _resolve(path: PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _inputs(inputs: Iterable[tuple[str, Optional[PathLike]]]) -> list[tuple[str, Path]]:
    return [(flag, _resolve(p)) for flag, p in inputs if p is not None and str(p) != ""]


def _refuse_inputs(path: Path, out: PathLike, inputs, flag: str, kind: str) -> None:
    """Refuse an output equal to an input, inside an input folder, or (a folder output) containing an input."""
    for name, inp in _inputs(inputs):
        if path == inp:
            raise OutputPathError(f"{flag} {out} is the same path as the input {name} {inp}")
        if path in inp.parents:  # only possible for a folder output
            raise OutputPathError(f"{flag} {out} contains the input {name} {inp}; choose a folder outside it")
        if inp in path.parents:
            raise OutputPathError(f"{flag} {out} sits inside the input {name} {inp}; choose a {kind} outside it")


def check_output_dir(
    out: PathLike,
    *,
    inputs: Iterable[tuple[str, Optional[PathLike]]] = (),
    overwrite: bool = False,
    flag: str = "--out",
) -> Path:
    """Refuse an output folder that would destroy something; return it resolved. Writes nothing.

    `inputs` are ``(option name, path)`` pairs of everything the command reads (model folder, adapter, data files,
    selection); ``None`` entries are skipped. Refused, whatever `overwrite` says: an existing file (not a folder),
    a folder equal to an input, containing an input, or inside an input. Refused unless `overwrite`: an existing
    folder that is not empty.
    """
    path = _resolve(out)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{flag} {out} is an existing file, not a folder")
    _refuse_inputs(path, out, inputs, flag, "folder")
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise OutputPathError(
            f"{flag} {out} exists and is not empty; choose a new folder, or pass --overwrite to replace only the "
            "files this command writes (nothing else is deleted)"
        )
    return path


def check_output_file(
    out: PathLike,
    *,
    inputs: Iterable[tuple[str, Optional[PathLike]]] = (),
    overwrite: bool = False,
    flag: str = "--json",
) -> Path:
    """Like `check_output_dir` for a single output file: refuse a folder, an input file or a path inside an input
    folder; refuse an existing file unless `overwrite`."""
    path = _resolve(out)
    if path.is_dir():
        raise OutputPathError(f"{flag} {out} is an existing folder, not a file")
    _refuse_inputs(path, out, inputs, flag, "path")
    if not overwrite and path.exists():
        raise OutputPathError(f"{flag} {out} already exists; choose a new path or pass --overwrite to replace it")
    return path


def write_into(out: PathLike, write: Callable[[Path], Any]) -> tuple[list[Path], list[Path]]:
    """Run ``write(staging)`` in a fresh hidden folder inside `out`, then move each file it wrote into `out`.

    Only the files `write` produced are replaced (each one atomically, by ``os.replace``); every other file in `out`
    is kept. If `write` fails, `out` is untouched (a folder created here is removed again). Returns ``(written,
    kept)``: the files placed in `out` and the files that were already there and were not rewritten. Check `out`
    with `check_output_dir` first: this function itself refuses nothing but a file where a folder must go.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = out / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    stage.mkdir()
    try:
        try:
            write(stage)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()  # the folder made above, and only while it is empty
            raise
        files = sorted(p for p in stage.rglob("*") if p.is_file() or p.is_symlink())
        rel = [p.relative_to(stage) for p in files]
        clash = [r for r in rel if (out / r).is_dir() and not (out / r).is_symlink()]
        if clash:
            raise OutputPathError(f"cannot write {out / clash[0]}: a folder of that name is in the way")
        before = {p.relative_to(out) for p in out.rglob("*") if p.is_file() and stage not in p.parents}
        written = []
        for src, r in zip(files, rel):
            dest = out / r
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
            written.append(dest)
        kept = sorted(out / r for r in before - set(rel))
        return written, kept
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # our own staging folder, never anything else
