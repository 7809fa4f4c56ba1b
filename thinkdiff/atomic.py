"""Atomic writes (a temp file or folder beside the target, then rename), so a crash never leaves half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def replace_into(path: Path, write) -> None:
    """Call `write(tmp_path)` on a temp file beside `path`, then rename it to `path` (with the permissions a plain
    open() would give under the user's umask; mkstemp makes 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (made contiguous, on CPU) to a safetensors file atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    replace_into(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_json(obj, path: str | os.PathLike) -> None:
    """Write `obj` as indented JSON atomically."""
    replace_into(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, default=str) + "\n"))


@contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True):
    """Yield a temp folder beside `path`; on success it becomes `path`, on error it is removed. With
    `replace=False` an existing `path` wins (e.g. built meanwhile by another process) and the temp folder goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; a plain mkdir follows the umask
    try:
        yield tmp
        if path.exists() and replace:
            shutil.rmtree(path)
        try:
            os.rename(tmp, path)
        except OSError:
            if replace or not path.exists():
                raise
            shutil.rmtree(tmp)  # another writer got there first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
