"""The memory plans behind the README's one-GPU recipes: Llama-3.2-11B-Vision-Instruct + FLUX.1-dev in bf16.

No real weights are needed: stand-in checkpoints hold only safetensors headers with the real parameter counts
(the plan reads headers alone) and Llama-3.2-11B-Vision's config. Every number printed is an estimate of the plan's
formulas (memory_plan.py), not a measurement.

    .venv/bin/python benchmarks/memory_plans.py
"""

import json
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_vllm_limits import llama32_vision_config  # noqa: E402

from thinkdiff.config import InferenceConfig, load_config  # noqa: E402
from thinkdiff.memory_plan import GIB, plan_memory  # noqa: E402

# Parameter counts of the published checkpoints.
LLAMA32_VISION_11B = 10_670_220_835
FLUX_DEV = {"transformer": 11_901_408_320, "text_encoder": 123_060_480, "text_encoder_2": 4_762_310_656,
            "vae": 83_819_683}
GPUS = {"80 GB": 79.1 * GIB, "48 GB": 47.5 * GIB}  # what torch.cuda.mem_get_info reports as total
RECIPES = [
    ("80 GB", ["vlm.backend=vllm"]),
    ("48 GB", ["vlm.backend=vllm", "vlm.gpu_memory_utilization=0.5", "decoder.offload=sequential"]),
    ("48 GB", ["vlm.backend=transformers", "vlm.max_images=2", "decoder.offload=model", "decoder.vae_tiling=true"]),
    ("48 GB", ["vlm.backend=vllm", "decoder.offload=model", "decoder.vae_tiling=true"]),
]


def header_only(path: Path, numel: int) -> None:
    header = json.dumps({"w": {"dtype": "BF16", "shape": [numel], "data_offsets": [0, 2 * numel]}}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="thinkdiff-plans-"))
    vlm, flux = root / "Llama-3.2-11B-Vision-Instruct", root / "FLUX.1-dev"
    vlm.mkdir()
    llama32_vision_config().save_pretrained(vlm)
    header_only(vlm / "model.safetensors", LLAMA32_VISION_11B)
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({name: ["", ""] for name in (*FLUX_DEV, "scheduler",
                                                                                     "tokenizer", "tokenizer_2")}))
    for name, numel in FLUX_DEV.items():
        header_only(flux / name / "model.safetensors", numel)
    for name in ("scheduler", "tokenizer", "tokenizer_2"):
        (flux / name).mkdir()
    base = [f"vlm.model={vlm}", f"decoder.model={flux}", "vlm.device=cuda:0", "decoder.device=cuda:0"]
    for gpu, settings in RECIPES:
        config = load_config(InferenceConfig, ROOT / "configs" / "llama32_vision_flux.yaml", base + settings)
        print(f"\n{gpu}: {' '.join(settings)}")
        try:
            plan = plan_memory(config, lambda device, gpu=gpu: GPUS[gpu] if device.startswith("cuda") else 256 * GIB)
            print(plan.describe())
            plan.check()
            print("fits")
        except ValueError as err:
            print("does not fit:", str(err).splitlines()[0])


if __name__ == "__main__":
    main()
