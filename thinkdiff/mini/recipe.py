"""`python -m thinkdiff train-mini OUT_DIR`: the whole miniature, from nothing, stage by stage.

    t5/        the T5 proxy (span corruption + prefix completion on the world's texts)
    decoder/   VAE on jittered drawings + SD1.5-style UNet on the exact ones, conditioned on t5/'s encoder states
    vlm/       the Mllama: vision tower pretrained on the drawings, then CoBSAT-format sequences and captioning
    captions/  jittered drawings + captions: the aligner's training data (ThinkDiff's first stage)
    aligner_features/  vlm/'s answers and generated-token states for every caption example (the feature cache)
    aligner_run/       train.py's alignment run: the t5_decoder objective on those states, t5/ frozen
    align_mini.yaml    that run's config (`python train.py --config OUT_DIR/align_mini.yaml` repeats it)
    judge/      the CNN judge (jittered drawings, its own seed): eval-cobsat's second judge
    thinkdiff.yaml   the pipeline config (vlm/, aligner/, decoder/); `python infer.py --config OUT_DIR/thinkdiff.yaml`
    ship/            float16 copies laid out as assets/mini (configs/mini.yaml reads them as mini:vlm, ...)
    losses/STAGE.txt one loss per step

A finished stage is skipped when the command runs again. `--quick` runs every stage for a few steps (CI).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import yaml

from ..atomic import atomic_dir
from ..config import THINKDIFF_PROMPTS, AlignTrainConfig, from_dict, to_dict
from .world import caption, drawings, jittered

logger = logging.getLogger(__name__)

SCALES = {
    "full": dict(t5_steps=1500, vae_steps=1200, pool_copies=8, decoder_steps=3000, vision_steps=3000, vlm_steps=2500,
                 caption_copies=4, aligner_steps=3000, aligner_batch=32, vlm_batch=16, decoder_batch=32,
                 judge_steps=800),
    "quick": dict(t5_steps=40, vae_steps=20, pool_copies=1, decoder_steps=12, vision_steps=8, vlm_steps=12,
                  caption_copies=1, aligner_steps=16, aligner_batch=8, vlm_batch=8, decoder_batch=16, judge_steps=10),
}


def write_captions(out_dir: Path, copies: int, seed: int = 0) -> Path:
    """`copies` jittered versions of every drawing as PNG + same-name .txt caption (an ImageCaptionDataset
    folder)."""
    rng = np.random.default_rng(seed)
    with atomic_dir(out_dir) as tmp:
        for copy in range(copies):
            for i, d in enumerate(drawings()):
                stem = tmp / f"{copy:02d}-{i:03d}"
                jittered(*d, rng).save(stem.with_suffix(".png"))
                stem.with_suffix(".txt").write_text(caption(*d))
    return out_dir


def pipeline_sections(out: Path) -> dict:
    """The `vlm` and `decoder` config sections of the trained miniature in `out` (thinkdiff.yaml, align_mini.yaml)."""
    return {"vlm": {"model": str(out / "vlm"), "max_new_tokens": 16},
            "decoder": {"family": "sd15", "model": str(out / "decoder"), "height": 64, "width": 64,
                        "num_inference_steps": 25, "guidance_scale": 3.0}}


def aligner_config(out: Path, steps: int, batch_size: int, seed: int = 0) -> AlignTrainConfig:
    """ThinkDiff's alignment stage on the miniature: the t5_decoder objective on the VLM's generated-token states
    (final norm), T5 frozen, over the captions folder, through a feature cache. Written to OUT/align_mini.yaml, so
    its ablations are train.py overrides (`embed=input train.cache=...`, `objective.norm_init=ones`)."""
    return from_dict(AlignTrainConfig, {
        **pipeline_sections(out), "layer": -1, "embed": "output",
        "objective": {"name": "t5_decoder", "t5_model": str(out / "t5")},
        "data": {"source": str(out / "captions"), "prompts": list(THINKDIFF_PROMPTS)},
        "optim": {"lr": 2e-3, "min_lr": 1e-4, "warmup_lr": 1e-5, "warmup_steps": max(1, steps // 20)},
        "train": {"output_dir": str(out / "aligner_run"), "max_steps": steps, "batch_size": batch_size,
                  "checkpoint_every": 0, "log_every": 10, "seed": seed, "overwrite": True,
                  "cache": str(out / "aligner_features"), "cache_dtype": "float32"}})


def train_mini(out_dir: str | Path, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Train every part into `out_dir`; returns per stage its seconds and first and last losses."""
    from .decoder import drawing_pool, train_decoder, train_vae
    from .judge import train_judge
    from .ship import ship, size_bytes
    from .t5 import train_t5
    from .vlm import train_vlm

    s = SCALES["quick" if quick else "full"]
    out = Path(out_dir)
    (out / "losses").mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}

    def stage(name, run):
        if name in summary:
            logger.info("mini %s: done earlier, skipped", name)
            return
        start = time.perf_counter()
        losses = run()
        (out / "losses" / f"{name}.txt").write_text("".join(f"{x:.6f}\n" for x in losses))
        span = max(1, len(losses) // 20)  # first and last 5% of the steps
        head, tail = float(np.mean(losses[:span])), float(np.mean(losses[-span:]))
        summary[name] = {"seconds": time.perf_counter() - start, "steps": len(losses), "loss_first": head,
                         "loss_last": tail}
        summary_path.write_text(json.dumps(summary, indent=1))
        logger.info("mini %s: loss %.4f -> %.4f in %.0f s", name, head, tail, summary[name]["seconds"])

    stage("t5", lambda: train_t5(out / "t5", steps=s["t5_steps"], seed=seed, progress=progress)[1])

    def decoder():
        pixels = drawing_pool(s["pool_copies"], seed)
        vae, vae_losses = train_vae(pixels, steps=s["vae_steps"], seed=seed, progress=progress)
        (out / "losses" / "vae.txt").write_text("".join(f"{x:.6f}\n" for x in vae_losses))
        return train_decoder(out / "decoder", out / "t5", vae, steps=s["decoder_steps"],
                             batch_size=s["decoder_batch"], seed=seed, progress=progress)[1]

    stage("decoder", decoder)
    stage("vlm", lambda: train_vlm(out / "vlm", steps=s["vlm_steps"], batch_size=s["vlm_batch"],
                                   vision_steps=s["vision_steps"], seed=seed, progress=progress)[1])

    def aligner():
        from ..train.align import train_aligner
        from ..train.data import ImageCaptionDataset
        from ..train.feature_cache import write_cache
        from ..vlm import make_engine, sampling_from

        if not (out / "captions").is_dir():
            write_captions(out / "captions", s["caption_copies"], seed)
        cfg = aligner_config(out, s["aligner_steps"], s["aligner_batch"], seed)
        (out / "align_mini.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        # = `python -m thinkdiff cache --config OUT/align_mini.yaml`, then `python train.py --config` the same file
        dataset = ImageCaptionDataset(cfg.data.source, cfg.data.prompts, seed=cfg.train.seed)
        write_cache(make_engine(cfg.vlm), dataset, cfg.train.cache, cfg.layer, cfg.embed, sampling_from(cfg.vlm),
                    vlm_name=cfg.vlm.model, shard_size=cfg.train.cache_shard_size, dtype=cfg.train.cache_dtype)
        train_aligner(cfg)
        return [float(x) for x in (out / "aligner_run" / "losses.txt").read_text().split()]

    stage("aligner", aligner)
    stage("judge", lambda: train_judge(out / "judge", steps=s["judge_steps"], seed=seed, progress=progress)[1])
    sections = pipeline_sections(out)
    config = {"vlm": sections["vlm"], "aligner": {"path": str(out / "aligner_run" / "aligner")},
              "decoder": sections["decoder"], "seed": 42}
    (out / "thinkdiff.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if "ship" not in summary:
        start = time.perf_counter()
        ship(out, out / "ship")
        summary["ship"] = {"seconds": time.perf_counter() - start, "bytes": size_bytes(out / "ship")}
        summary_path.write_text(json.dumps(summary, indent=1))
    return summary
