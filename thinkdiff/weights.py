"""Where model weights come from: a local folder, the local Hugging Face cache, or a tiny model built offline.

Nothing is downloaded at run time. When weights are missing the error says what to download and where to point.
"""

from __future__ import annotations

from pathlib import Path

from .tiny import tiny_path


class MissingWeightsError(FileNotFoundError):
    """The weights a config names are not on this machine."""


def resolve_model(ref: str, config_key: str = "model") -> Path:
    """`ref` -> a local folder. `ref` is `tiny:KIND`, a folder, or a Hugging Face repo id in the local cache."""
    if ref.startswith("tiny:"):
        return tiny_path(ref.split(":", 1)[1])
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or ref.startswith(".") or ref.count("/") != 1:
        raise MissingWeightsError(f"{config_key}={ref!r}: no such folder.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as err:  # huggingface_hub raises several types for "not in the cache"
        raise MissingWeightsError(
            f"{config_key}={ref!r}: these weights are not on this machine ({type(err).__name__}). Download them "
            f"once with `huggingface-cli download {ref} --local-dir /path/to/{ref.split('/')[1]}` (gated repos need "
            f"you to accept the license at https://huggingface.co/{ref} and `huggingface-cli login`), then set "
            f"{config_key}=/path/to/{ref.split('/')[1]}, or keep the Hugging Face cache and retry.") from None
