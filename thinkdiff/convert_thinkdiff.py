"""ThinkDiff's released checkpoints -> a folder `ThinkDiffPipeline.from_pretrained` loads.

    python -m thinkdiff convert-thinkdiff thinkdiff_lvlm.pth OUT_DIR [--vlm MODEL] [--decoder MODEL]

The release (Hugging Face repo Mifucius/ThinkDiff: `thinkdiff_lvlm.pth`, `thinkdiff_clip.pth`) stores, under
`['model']`, only the trainable parameters. They are read with `torch.load(weights_only=True)` (tensors and plain
containers, never code). The projector `mlp2x_gelu_t5_norm` is found by structure and shapes, whatever its prefix P:

    P.0.weight [4096, H], P.0.bias [4096]     Linear(H, 4096)
    P.2.weight [4096, 4096], P.2.bias [4096]  Linear(4096, 4096)      (P.1 is the GELU)
    P.3.weight [4096]                         T5LayerNorm(4096), eps 1e-6 (RMSNorm)

ThinkDiff-LVLM (H = 3584, Qwen2-VL-7B-Instruct) gets ThinkDiff's inference settings (thinkdiff.yaml): the final-normed
layer, 128 answer tokens sampled at temperature 0.6 / top_p 0.9, the `predicting` embed mode (its vLLM fork's
`output_embed`), FLUX.1-dev at 1024x1024, 28 steps, guidance 3.5, pooled = CLIP of "". ThinkDiff-CLIP (H = 1408,
BLIP-2's EVA ViT-g, 65 image tokens, no VLM) is not built in thinkdiff: only its aligner is converted.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
import yaml

from .aligner import Aligner, AlignerConfig
from .config import AlignerSection, DecoderConfig, InferenceConfig, VLMConfig, to_dict
from .errors import InputError, MissingFileError

logger = logging.getLogger(__name__)

WIDTH = 4096  # FLUX's T5 slot
CLIP_WIDTH = 1408  # ThinkDiff-CLIP: BLIP-2's EVA ViT-g
THINKDIFF_VLM = "Qwen/Qwen2-VL-7B-Instruct"
THINKDIFF_DECODER = "black-forest-labs/FLUX.1-dev"
CLIP_NOT_BUILT = ("ThinkDiff-CLIP's image path (BLIP-2's EVA ViT-g/14 at 224 px, 65 image tokens straight into the "
                  "aligner, no VLM) is not built in thinkdiff; its converted aligner (1408 -> 4096) is in {path}.")


def load_released_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a released .pth (its `['model']` when present), loaded without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"Checkpoint {path} not found (ThinkDiff's are thinkdiff_lvlm.pth and "
                                "thinkdiff_clip.pth in the Hugging Face repo Mifucius/ThinkDiff).")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise InputError(f"{path} is not a plain tensor checkpoint: torch.load(weights_only=True) refused it "
                         f"({str(err).splitlines()[0]}); thinkdiff never unpickles code.") from None
    state = data.get("model", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path} holds no state dict of tensors (expected ThinkDiff's {{'model': {{name: tensor}}}}).")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def find_projector(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """The prefix P of the one mlp2x_gelu_t5_norm projector in `state`, and its input width H."""
    found = []
    for key, weight in state.items():
        if not key.endswith(".0.weight") or weight.dim() != 2 or weight.shape[0] != WIDTH:
            continue
        prefix = key[:-len(".0.weight")]
        shapes = {".0.bias": (WIDTH,), ".2.weight": (WIDTH, WIDTH), ".2.bias": (WIDTH,), ".3.weight": (WIDTH,)}
        if all(tuple(getattr(state.get(prefix + s), "shape", ())) == shape for s, shape in shapes.items()):
            found.append((prefix, weight.shape[1]))
    if not found:
        shown = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(state.items())[:8])
        raise InputError(f"No ThinkDiff projector (Linear(H, {WIDTH}) -> GELU -> Linear({WIDTH}, {WIDTH}) -> "
                         f"T5LayerNorm({WIDTH}) as P.0/P.2/P.3) among {len(state)} tensors: {shown}, ...")
    if len(found) > 1:
        raise InputError(f"{len(found)} tensor groups look like ThinkDiff's projector: "
                         f"{', '.join(p for p, _ in found)}; expected one.")
    return found[0]


def convert(checkpoint: str | Path, out_dir: str | Path, vlm: str | None = None,
            decoder: str | None = None) -> Path:
    """Write OUT_DIR/aligner (safetensors) and, for ThinkDiff-LVLM, OUT_DIR/thinkdiff.yaml. Returns OUT_DIR."""
    state = load_released_state(checkpoint)
    prefix, width = find_projector(state)
    logger.info("Projector %r: Linear(%d, %d) -> GELU -> Linear -> T5LayerNorm", prefix, width, WIDTH)
    out_dir = Path(out_dir)
    embed = "output" if width == CLIP_WIDTH else "predicting"
    with torch.device("meta"):
        aligner = Aligner(AlignerConfig(input_dim=width, output_dim=WIDTH, layer=-1, embed=embed))
    aligner.load_state_dict({"proj_in.weight": state[f"{prefix}.0.weight"], "proj_in.bias": state[f"{prefix}.0.bias"],
                             "proj_out.weight": state[f"{prefix}.2.weight"],
                             "proj_out.bias": state[f"{prefix}.2.bias"],
                             "norm.weight": state[f"{prefix}.3.weight"]}, assign=True)
    aligner.float().save_pretrained(out_dir / "aligner")
    if width == CLIP_WIDTH:
        logger.warning(CLIP_NOT_BUILT.format(path=out_dir / "aligner"))
        return out_dir
    config = InferenceConfig(
        vlm=VLMConfig(model=vlm or THINKDIFF_VLM, dtype="bfloat16", device="cuda", max_new_tokens=128,
                      min_new_tokens=128, do_sample=True, temperature=0.6, top_p=0.9),
        aligner=AlignerSection(layer=-1, embed=embed),
        decoder=DecoderConfig(family="flux", model=decoder or THINKDIFF_DECODER, dtype="bfloat16", device="cuda",
                              pooled="empty_prompt", height=1024, width=1024, num_inference_steps=28,
                              guidance_scale=3.5),
        seed=42)
    data = to_dict(config)
    data["aligner"]["path"] = None
    (out_dir / "thinkdiff.yaml").write_text(
        f"# Converted from {Path(checkpoint).name} (projector {prefix!r}) with ThinkDiff's inference settings.\n"
        + yaml.safe_dump(data, sort_keys=False))
    return out_dir
