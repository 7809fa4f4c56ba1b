"""Alignment training: the aligner learns, the VLM and the decoder stay frozen. One loop, read top to bottom.

    accelerate launch train.py --config configs/align_tiny.yaml [key.sub=value ...]

Data order and all randomness are pure functions of (seed, step), so a resumed run continues exactly where it
stopped, and a run on several processes sees the same global batches as a run on one.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..aligner import Aligner, AlignerConfig
from ..config import AlignTrainConfig, InferenceConfig, OptimConfig, torch_dtype
from ..decoders import load_decoder
from ..errors import ConfigError
from ..pipeline import ThinkDiffPipeline
from ..rng import generator
from ..weights import resolve_model
from .accelerator import make_accelerator
from .checkpoint import (
    check_resume_step,
    checkpoint_dir,
    keep_history,
    load_training_state,
    prepare_run,
    save_checkpoint,
)
from .data import ImageCaptionDataset
from .feature_cache import FeatureCache, LiveFeatures
from .interrupt import GracefulStop, TrainingInterrupted
from .objectives import DiffusionObjective, RegressionObjective, T5DecoderObjective

logger = logging.getLogger(__name__)

RESULTS = ("aligner", "losses.txt", "logs", "samples")  # what a run writes into its output folder


def thinkdiff_lr_scheduler(optimizer, optim: OptimConfig, max_steps: int):
    """ThinkDiff's schedule from torch's schedulers: linear warmup from warmup_lr to lr over warmup_steps, then
    cosine down to min_lr at max_steps."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    cosine = CosineAnnealingLR(optimizer, T_max=max(1, max_steps - optim.warmup_steps), eta_min=optim.min_lr)
    if optim.warmup_steps == 0:
        return cosine
    warmup = LinearLR(optimizer, start_factor=optim.warmup_lr / optim.lr, end_factor=1.0,
                      total_iters=optim.warmup_steps)
    return SequentialLR(optimizer, [warmup, cosine], milestones=[optim.warmup_steps])


def batch_indices(step: int, num_samples: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of `step`: a fresh seeded permutation each epoch, last partial batch dropped."""
    if num_samples < batch_size:
        raise ConfigError(f"The dataset has {num_samples} samples, fewer than train.batch_size={batch_size}.")
    per_epoch = num_samples // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


def build_features(cfg: AlignTrainConfig, dataset: ImageCaptionDataset):
    """Features from the cache when `train.cache` is set, else a live VLM engine. Returns (features, H)."""
    if cfg.train.cache:
        cache = FeatureCache(cfg.train.cache, cfg.layer, cfg.embed)
        if len(cache) != len(dataset):
            raise ConfigError(f"The cache at {cfg.train.cache} has {len(cache)} samples, the dataset {len(dataset)}.")
        return cache, cache.hidden_size
    from ..vlm import make_engine, sampling_from

    engine = make_engine(cfg.vlm)
    return LiveFeatures(engine, dataset, cfg.layer, cfg.embed, sampling_from(cfg.vlm)), engine.hidden_size


def build_objective(cfg: AlignTrainConfig, dataset: ImageCaptionDataset, decoder, device):
    name = cfg.objective.name
    if name == "diffusion":
        if decoder is None:
            raise ConfigError("The diffusion objective needs a `decoder:` section in the config.")
        return DiffusionObjective(decoder, dataset, cfg.data.image_size)
    from transformers import AutoTokenizer

    tokenizer_ref = cfg.objective.vlm_tokenizer or cfg.vlm.model
    if cfg.vlm.backend == "remote" and not cfg.objective.vlm_tokenizer:
        raise ConfigError("With vlm.backend=remote, set objective.vlm_tokenizer to a folder with the VLM's tokenizer.")
    vlm_tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(tokenizer_ref, "objective.vlm_tokenizer")))
    if name == "t5_decoder":
        dtype = cfg.objective.t5_dtype or ("float32" if torch.device(device).type == "cpu" else "bfloat16")
        return T5DecoderObjective(resolve_model(cfg.objective.t5_model, "objective.t5_model"), vlm_tokenizer,
                                  cfg.objective.max_split, cfg.objective.max_target_tokens, device,
                                  dtype=torch_dtype(dtype), split=cfg.objective.split)
    return RegressionObjective(resolve_model(cfg.objective.text_encoder, "objective.text_encoder"), vlm_tokenizer,
                               cfg.objective.max_target_tokens, device)


def param_groups(aligner: Aligner, weight_decay: float):
    """ThinkDiff's AdamW groups: no weight decay on biases and norm weights (1-D parameters)."""
    decay = [p for p in aligner.parameters() if p.ndim >= 2]
    no_decay = [p for p in aligner.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_aligner(cfg: AlignTrainConfig) -> Path:
    """Train and return the folder of the final aligner (`OUTPUT_DIR/aligner`)."""
    from accelerate.utils import ProjectConfiguration

    loop = cfg.train
    out = Path(loop.output_dir)
    accelerator = make_accelerator(mixed_precision=loop.mixed_precision,
                                   gradient_accumulation_steps=loop.gradient_accumulation_steps,
                                   log_with="tensorboard", project_config=ProjectConfiguration(
                                       project_dir=str(out), logging_dir=str(out / "logs")))
    world, rank = accelerator.num_processes, accelerator.process_index
    micro = loop.batch_size // (world * loop.gradient_accumulation_steps)
    if micro * world * loop.gradient_accumulation_steps != loop.batch_size or micro < 1:
        raise ConfigError(f"train.batch_size={loop.batch_size} must split evenly over {world} processes x "
                         f"{loop.gradient_accumulation_steps} accumulation steps.")

    dataset = ImageCaptionDataset(cfg.data.source, cfg.data.prompts, seed=loop.seed, limit=cfg.data.limit)
    features, hidden_size = build_features(cfg, dataset)
    needs_decoder = cfg.objective.name == "diffusion" or loop.sample_every >= 0
    decoder = load_decoder(cfg.decoder) if cfg.decoder is not None and needs_decoder else None
    objective = build_objective(cfg, dataset, decoder, accelerator.device)
    if decoder is not None and decoder.conditioning_dim != objective.output_dim:
        raise ConfigError(f"The objective trains width {objective.output_dim} but {decoder.display_name} expects "
                         f"{decoder.conditioning_dim}.")

    aligner = Aligner(AlignerConfig(input_dim=hidden_size, output_dim=objective.output_dim, layer=cfg.layer,
                                    embed=cfg.embed), generator=generator(loop.seed))
    if cfg.objective.norm_init == "encoder":
        objective.init_aligner(aligner)
    optimizer = torch.optim.AdamW(param_groups(aligner, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas))
    scheduler = thinkdiff_lr_scheduler(optimizer, cfg.optim, loop.max_steps)

    resume = prepare_run(accelerator, out, loop.resume, loop.overwrite, RESULTS)
    start = 0
    if resume:
        aligner.load_state_dict(Aligner.from_pretrained(resume / "aligner").state_dict())
        start = load_training_state(resume, optimizer, scheduler)
        check_resume_step(start, loop.max_steps, resume)
        logger.info("Resumed from %s at step %d", resume, start)
    losses_path = out / "losses.txt"
    if accelerator.is_main_process:
        keep_history(losses_path, start)
    aligner, optimizer = accelerator.prepare(aligner, optimizer)
    accelerator.init_trackers("align", config={"objective": cfg.objective.name, "lr": cfg.optim.lr,
                                               "batch_size": loop.batch_size, "layer": cfg.layer})

    bar = tqdm(range(start, loop.max_steps), initial=start, total=loop.max_steps, desc="align",
               disable=not accelerator.is_main_process)
    seen, clock = 0, time.perf_counter()
    with GracefulStop() as stop:
        for step in bar:
            indices = batch_indices(step, len(dataset), loop.batch_size, loop.seed)[rank::world]
            step_loss = torch.zeros((), device=accelerator.device)
            for chunk in range(loop.gradient_accumulation_steps):
                batch = features.get(indices[chunk * micro:(chunk + 1) * micro])
                with accelerator.accumulate(aligner):
                    if batch:
                        with accelerator.autocast():
                            loss = objective.loss(aligner, batch, seed=loop.seed * 100_003 + step)
                    else:  # every image of this micro-batch was unreadable: keep the processes in step
                        loss = sum(p.sum() for p in aligner.parameters()) * 0.0
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm:
                        accelerator.clip_grad_norm_(aligner.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                step_loss += loss.detach() / loop.gradient_accumulation_steps
                seen += len(batch)
            scheduler.step()
            step_loss = accelerator.reduce(step_loss, reduction="mean").item()
            done = step + 1
            if done % loop.log_every == 0 or done == loop.max_steps:
                rate = seen * world / (time.perf_counter() - clock)
                bar.set_postfix(loss=f"{step_loss:.4f}", samples_per_s=f"{rate:.1f}")
                accelerator.log({"loss": step_loss, "lr": scheduler.get_last_lr()[0], "samples_per_s": rate},
                                step=done)
            interrupted = stop.should_stop(accelerator)
            if accelerator.is_main_process:
                with losses_path.open("a") as f:
                    f.write(f"{step_loss:.6f}\n")
                if (loop.checkpoint_every and done % loop.checkpoint_every == 0) or interrupted:
                    trained = accelerator.unwrap_model(aligner)
                    save_checkpoint(out, done, lambda d, m=trained: m.save_pretrained(d / "aligner"), optimizer,
                                    scheduler, loop.keep_checkpoints)
                if decoder is not None and loop.sample_every > 0 and done % loop.sample_every == 0:
                    write_sample(out, done, accelerator.unwrap_model(aligner), features, decoder, cfg)
            accelerator.wait_for_everyone()
            if interrupted:
                bar.close()
                accelerator.end_training()
                raise TrainingInterrupted(f"Interrupted: saved {checkpoint_dir(out, done)}; continue with the same "
                                          "command and train.resume=latest.")

    final = out / "aligner"
    if accelerator.is_main_process:
        accelerator.unwrap_model(aligner).save_pretrained(final)
        if decoder is not None and loop.sample_every >= 0:
            write_sample(out, loop.max_steps, accelerator.unwrap_model(aligner), features, decoder, cfg)
        if len(getattr(dataset, "skipped", ())):
            logger.warning("%d unreadable samples were skipped", len(dataset.skipped))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def write_sample(out: Path, step: int, aligner: Aligner, features, decoder, cfg: AlignTrainConfig) -> None:
    """One image from the first dataset sample's VLM states, drawn as the config's `decoder:` section says (size,
    steps, guidance; seed train.seed): OUT/samples/step-N.png."""
    sample = features.get([0])
    if not sample:
        return
    pipe = ThinkDiffPipeline(None, aligner.eval(), decoder, config=InferenceConfig(decoder=cfg.decoder))
    image = pipe.decode(sample[0].embed, seed=cfg.train.seed, progress=False)[0]
    aligner.train()
    (out / "samples").mkdir(parents=True, exist_ok=True)
    image.save(out / "samples" / f"step-{step:06d}.png")

