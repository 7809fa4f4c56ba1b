"""Generate images with ThinkDiff: the VLM thinks about the prompt (and images), the decoder draws.

    python infer.py                                   # tiny offline default on a 2-shot CoBSAT prompt
    python infer.py --config configs/llama32_vision_flux.yaml --prompt "..." --image a.png --image b.png
    python infer.py --config configs/mini.yaml        # the trained miniature in assets/mini (not yet right)
    python infer.py decoder.num_inference_steps=4 vlm.max_new_tokens=8    # any config key, key.sub=value
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from thinkdiff.user_errors import exit_status

ROOT = Path(__file__).resolve().parent
# CoBSAT task 1 (colour given, object read from the images), 2-shot sample 0 of the seed-123 lists, as eval-cobsat
# formats it: a blue car, a brown car, then "orange" -> the answer is an orange car.
DEFAULT_IMAGES = [str(ROOT / "assets" / "examples" / "blue_car.png"), str(ROOT / "assets" / "examples" /
                                                                         "brown_car.png")]
DEFAULT_PROMPT = ("I give you several words and pictures. First, please analyse what the next picture is. Then give "
                  "me a detailed diffusion prompt to describe the next picture. Please only provide me the detailed "
                  "prompt and start the answer with 'Create an image'.\n\nWord 1: blue, <image>\n\nWord 2: brown, "
                  "<image>\n\nWord 3: orange, ")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"),
                        help="YAML config (default: the embedded tiny offline config)")
    parser.add_argument("--prompt", default=None,
                        help="instruction for the VLM; <image> places images (default: a 2-shot CoBSAT prompt with "
                             "assets/examples/blue_car.png and brown_car.png)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="in-context image, repeatable; order is kept")
    parser.add_argument("--seed", type=int, default=None, help="seed for VLM sampling and the initial noise")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: from the config)")
    parser.add_argument("--height", type=int, default=None, help="image height in pixels (default: from the config)")
    parser.add_argument("--width", type=int, default=None, help="image width in pixels (default: from the config)")
    parser.add_argument("--backend", choices=("transformers", "vllm", "remote"), default=None,
                        help="VLM backend (default: from the config); with remote, vlm.model is the server URL")
    parser.add_argument("--num-images", type=int, default=1, help="images to draw from one VLM answer")
    parser.add_argument("--out", default="outputs/thinkdiff.png",
                        help="PNG path; a JSON sidecar with the VLM answer, config and timings goes beside it")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    if args.prompt is None:
        if args.image:
            parser.error("--image needs a --prompt that places it (the default prompt brings its own images)")
        args.prompt, args.image = DEFAULT_PROMPT, list(DEFAULT_IMAGES)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from thinkdiff.atomic import save_json
    from thinkdiff.config import InferenceConfig, load_config, to_dict
    from thinkdiff.pipeline import ThinkDiffPipeline

    backend = [f"vlm.backend={args.backend}"] if args.backend else []
    config = load_config(InferenceConfig, args.config, backend + args.overrides)
    seed = config.seed if args.seed is None else args.seed
    start = time.perf_counter()
    pipe = ThinkDiffPipeline.from_config(config)
    load_seconds = time.perf_counter() - start
    out = pipe(args.prompt, images=args.image, num_images=args.num_images, seed=seed,
               num_inference_steps=args.steps, height=args.height, width=args.width)

    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_path] if len(out.images) == 1 else [
        out_path.with_name(f"{out_path.stem}_{i}{out_path.suffix}") for i in range(len(out.images))]
    for image, path in zip(out.images, paths):
        image.save(path)
    save_json({"prompt": args.prompt, "images_in": args.image, "vlm_answer": out.text[0],
               "output_token_ids": out.hidden_states[0].output_token_ids.tolist(), **out.settings,
               "images_out": [str(p) for p in paths], "config": to_dict(config),
               "timings_s": {"load": load_seconds, **out.timings}}, out_path.with_suffix(".json"))
    print(f"VLM answer: {out.text[0]!r}")
    for path in paths:
        print(f"Wrote {path}")
    print(f"Wrote {out_path.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main))
