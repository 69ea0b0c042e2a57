"""One way to write a file or a folder: into a temp sibling, then one rename.

Readers (and a killed process) see the old version or the new one, never half of either.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError, no_space_left

_UMASK = os.umask(0)
os.umask(_UMASK)
INCOMING = ".incoming"  # files_into's staging folder


@contextmanager
def atomic_path(path: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path` (a file, or with `folder` a directory) to write into; on
    success it replaces `path` in one rename, on error it is removed and `path` is left as it was.
    The temp name keeps the suffix, so writers that infer a format from it (matplotlib) work."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tmp-"
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=path.suffix, dir=path.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if folder:
            # a folder cannot replace a non-empty folder in one rename: move the old one aside first,
            # so a valid version exists at every moment (the old one is back if the second rename fails)
            old = _aside(path)
            shutil.rmtree(old, ignore_errors=True)
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give the usual permissions
            os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True) if folder else tmp.unlink(missing_ok=True)
        if no_space_left(e):  # one line, not the traceback of whichever library was writing
            raise full_disk(path.parent if path.name == INCOMING else path) from None
        raise


def full_disk(path: Path) -> UserError:
    kept = "what was there before is kept" if path.exists() else "nothing was written there"
    return UserError(f"{path}: no space left on the device while writing it; {kept} (a run continues from "
                     "its last checkpoint with --resume once there is room)")


@contextmanager
def files_into(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder inside `folder`; on success each file written there is moved into `folder`
    with its own rename (for `save_pretrained` into a run folder that holds other files too)."""
    folder = Path(folder)
    with atomic_path(folder / INCOMING, folder=True) as tmp:
        yield tmp
        for item in tmp.iterdir():
            os.replace(item, folder / item.name)
    shutil.rmtree(folder / INCOMING, ignore_errors=True)


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def clean_leftovers(folder: str | os.PathLike) -> None:
    """Undo what writes killed midway left in `folder`: a folder moved aside whose replacement never
    arrived is put back, and temp siblings (and files_into's staging folder) are removed."""
    folder = Path(folder)
    for old in folder.glob(".*.old"):
        target = folder / old.name[1:-len(".old")]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, target)
    for tmp in folder.glob(".*.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    shutil.rmtree(folder / INCOMING, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
