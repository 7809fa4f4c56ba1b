"""Where model weights come from: a local folder, the local Hugging Face cache, a tiny model built offline, or the
trained miniature shipped in assets/mini.

Nothing is downloaded at run time. When weights are missing the error says what to download and where to point.
"""

from __future__ import annotations

from pathlib import Path

from .errors import MissingWeightsError

__all__ = ["MINI_ASSETS", "MissingWeightsError", "resolve_model"]

MINI_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "mini"


def resolve_model(ref: str, config_key: str = "model", hint: str = "") -> Path:
    """`ref` -> a local folder. `ref` is `tiny:KIND`, `mini:PART` (assets/mini/PART), a folder, or a Hugging Face
    repo id in the local cache.
    `hint`: extra `hf download` arguments for the error message (e.g. `--include` patterns of what is loaded)."""
    if ref.startswith("tiny:"):
        from .testing.tiny_models import tiny_path  # test models, built on first use

        return tiny_path(ref.split(":", 1)[1])
    if ref.startswith("mini:"):
        path = MINI_ASSETS / ref.split(":", 1)[1]
        if not path.is_dir():
            raise MissingWeightsError(f"{config_key}={ref!r}: {path} is missing. Build the miniature with "
                                      f"`python -m thinkdiff train-mini OUT_DIR` and copy OUT_DIR/ship to "
                                      f"{MINI_ASSETS}.")
        return path
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or ref.startswith(".") or ref.count("/") != 1 or path.parent.is_dir():
        # `runs/aligner` with a `runs/` here is a folder that is missing, not a Hugging Face repo id
        raise MissingWeightsError(f"{config_key}={ref!r}: no such folder ({path.resolve()}).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(ref, local_files_only=True))
    except Exception as err:  # huggingface_hub raises several types for "not in the cache"
        name = ref.split("/")[1]
        command = " ".join(filter(None, ["hf download", ref, hint, f"--local-dir /path/to/{name}"]))
        raise MissingWeightsError(
            f"{config_key}={ref!r}: these weights are not on this machine ({type(err).__name__}). Download them "
            f"once with `{command}` (`hf` comes with huggingface_hub, in .venv/bin; gated repos need you to accept "
            f"the license at https://huggingface.co/{ref} and `hf auth login`), then set "
            f"{config_key}=/path/to/{name}, or keep the Hugging Face cache and retry.") from None
