"""The trained miniature as it ships in assets/mini: every part in float16 safetensors (loaders upcast to float32 on
CPU).

    vlm/       Mllama + processor          aligner/   Aligner.save_pretrained
    decoder/   StableDiffusionPipeline (VAE, UNet, T5 encoder + tokenizer, DDIM scheduler)
    t5/        the whole T5 (encoder and decoder): the `t5_decoder` objective's model, so the alignment stage and its
               ablations train again from these files alone (configs/align_mini.yaml)
    judge/     the CNN judge
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..atomic import atomic_dir


def ship(out_dir: str | Path, dest: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write float16 copies of train-mini's outputs in `out_dir` to `dest` (replaced as a whole)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file
    from transformers import AutoProcessor, AutoTokenizer, MllamaForConditionalGeneration, T5ForConditionalGeneration

    out = Path(out_dir)
    with atomic_dir(Path(dest)) as tmp:
        MllamaForConditionalGeneration.from_pretrained(str(out / "vlm"), dtype=dtype).save_pretrained(tmp / "vlm")
        AutoProcessor.from_pretrained(str(out / "vlm")).save_pretrained(tmp / "vlm")
        T5ForConditionalGeneration.from_pretrained(str(out / "t5"), dtype=dtype).save_pretrained(tmp / "t5")
        AutoTokenizer.from_pretrained(str(out / "t5")).save_pretrained(tmp / "t5")
        StableDiffusionPipeline.from_pretrained(str(out / "decoder"), dtype=dtype, safety_checker=None,
                                                feature_extractor=None).save_pretrained(tmp / "decoder")
        for part, source in (("aligner", out / "aligner_run" / "aligner"), ("judge", out / "judge")):
            (tmp / part).mkdir()
            shutil.copy(source / "config.json", tmp / part / "config.json")
            weights = {k: v.to(dtype).contiguous() for k, v in load_file(source / "model.safetensors").items()}
            save_file(weights, tmp / part / "model.safetensors", metadata={"format": "pt"})
    return Path(dest)


def size_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
