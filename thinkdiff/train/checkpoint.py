"""Training checkpoints and run folders, shared by alignment and GRPO. safetensors + JSON only (no pickle).

    OUTPUT/checkpoints/step-000100/          one folder per checkpoint, written to a temp folder and renamed
        aligner/ or policy/                  the trained weights (Aligner.save_pretrained / Policy.save_pretrained)
        optimizer.safetensors                every optimizer state tensor, keyed state.<param>.<name>
        trainer_state.json                   step, optimizer param groups, scheduler state, Python RNG state
        rng.safetensors                      torch CPU RNG state
    OUTPUT/losses.txt (align), OUTPUT/log.jsonl (GRPO)   one line per step across resumes

A run owns its output folder: a fresh run that finds another run's checkpoints or results there stops, unless told
to continue it (`train.resume=latest`) or to start over (`train.overwrite=true`). Checkpoints are ordered and
pruned by step number. Temp folders left by a killed run are removed when the next run starts.

Rotation is ours rather than accelerate's `ProjectConfiguration(total_limit=...)`: accelerate deletes the oldest
checkpoint *before* writing the new one, in place, and names folders by save count (a save killed with
total_limit=1 leaves no checkpoint; a stray folder without a number breaks its sort). Here the new checkpoint is
written aside and renamed, and only then do the oldest go (tests/test_runs.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..atomic import atomic_dir, save_json, save_safetensors
from ..errors import ConfigError, MissingFileError

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of `output_dir` as (step, folder), by step number."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        match = _STEP.match(p.name)
        if match and (p / STATE_NAME).is_file():
            found.append((int(match.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def remove_dir(path: Path) -> None:
    """Rename, then delete: an interrupted removal never leaves a half-deleted folder under its real name."""
    doomed = Path(tempfile.mkdtemp(prefix=f".deleting-{path.name}.", dir=path.parent))
    os.replace(path, doomed / path.name)
    shutil.rmtree(doomed)


def prune_checkpoints(output_dir: str | Path, keep: int) -> None:
    """Keep the `keep` checkpoints with the highest step numbers."""
    for _, path in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        remove_dir(path)


def clean_stale_temp(output_dir: str | Path) -> None:
    """Remove temp folders and files (`.NAME.xxxx`, `.deleting-*`) that a killed run left behind."""
    for folder in (Path(output_dir), Path(output_dir) / "checkpoints"):
        for p in folder.glob(".*") if folder.is_dir() else ():
            if p.name.startswith(".deleting-") or re.match(r"^\.[^.].*\.[A-Za-z0-9_]{8}$", p.name):
                logger.info("Removing %s, left by an interrupted run", p)
                shutil.rmtree(p) if p.is_dir() else p.unlink()


def prepare_run(accelerator, output_dir: str | Path, resume: str | None, overwrite: bool,
                results: tuple[str, ...]) -> Path | None:
    """Make `output_dir` ready for a run (on the main process; the others get its answer); return the checkpoint
    to resume from (None: start at step 0).

    `results`: the names, inside `output_dir`, that a run writes (aligner, losses.txt, ...). A fresh run refuses a
    folder that holds checkpoints or any of them, unless `overwrite` (they are removed first)."""
    if accelerator.num_processes == 1:
        return _prepare_run(output_dir, resume, overwrite, results)
    from accelerate.utils import broadcast_object_list

    answer = [None]
    if accelerator.is_main_process:
        try:
            answer = [_prepare_run(output_dir, resume, overwrite, results)]
        except (ValueError, FileNotFoundError) as err:
            answer = [err]
    answer = broadcast_object_list(answer)[0]
    if isinstance(answer, Exception):  # every process stops with the main process's message
        raise answer
    return answer


def _prepare_run(output_dir, resume, overwrite, results) -> Path | None:
    out = Path(output_dir)
    if resume and overwrite:
        raise ConfigError("train.resume and train.overwrite=true contradict each other: continue a run or start over.")
    clean_stale_temp(out)
    if resume == "latest":
        latest = latest_checkpoint(out)
        if latest is None:
            if any((out / name).exists() for name in results):
                raise ConfigError(f"train.resume=latest: {out} holds a finished or crashed run's results but no "
                                 "checkpoint to continue from; use train.overwrite=true to start over.")
            logger.info("train.resume=latest: no checkpoint in %s yet, starting from scratch", out)
        return latest
    if resume:
        path = Path(resume)
        if not (path / STATE_NAME).is_file():
            raise MissingFileError(f"train.resume={resume}: no checkpoint there ({STATE_NAME} missing).")
        return path
    existing = [f"checkpoints/{p.name}" for _, p in list_checkpoints(out)] + [
        name for name in results if (out / name).exists()]
    if existing:
        if not overwrite:
            shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
            raise ConfigError(f"{out} already holds a run ({shown}). Continue it with train.resume=latest, start over "
                             "with train.overwrite=true (removes them), or choose another train.output_dir.")
        logger.info("train.overwrite=true: removing the previous run in %s", out)
        if (out / "checkpoints").exists():
            remove_dir(out / "checkpoints")
        for name in results:
            path = out / name
            if path.is_dir():
                remove_dir(path)
            elif path.exists():
                path.unlink()
    return None


def check_resume_step(start: int, max_steps: int, checkpoint: Path | None) -> None:
    if checkpoint is not None and start >= max_steps:
        raise ConfigError(f"The checkpoint {checkpoint} is at step {start}, and train.max_steps={max_steps}: nothing "
                         f"is left to train. Raise train.max_steps above {start} to continue.")


def keep_history(path: Path, steps: int, step_of=None) -> None:
    """Trim a one-line-per-step log to the first `steps` steps (a run killed after its last checkpoint wrote more).
    `step_of(line)` gives a line's step (default: its line number)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for n, line in enumerate(lines, 1) if (step_of(line) if step_of else n) <= steps]
    path.write_text("".join(kept))


def save_checkpoint(output_dir: str | Path, step: int, write_weights, optimizer, scheduler=None, keep: int = 2) -> Path:
    """OUTPUT/checkpoints/step-N, written atomically: `write_weights(folder)` saves what trains (the aligner, or the
    policy's weights), then the optimizer, scheduler, step and RNG states; then the oldest beyond `keep` go."""
    final = checkpoint_dir(output_dir, step)
    with atomic_dir(final) as tmp:
        write_weights(tmp)
        save_training_state(tmp, step, optimizer, scheduler)
    prune_checkpoints(output_dir, keep)
    return final


def save_training_state(directory: Path, step: int, optimizer, scheduler=None) -> None:
    """Optimizer, scheduler, step and RNG states into `directory` (a checkpoint's temp folder)."""
    state = optimizer.state_dict()
    tensors = {f"state.{p}.{name}": value for p, values in state["state"].items()
               for name, value in values.items() if isinstance(value, torch.Tensor)}
    save_safetensors(tensors, directory / "optimizer.safetensors")
    save_safetensors({"torch_cpu": torch.get_rng_state()}, directory / "rng.safetensors")
    py_state = random.getstate()
    save_json({"step": step, "param_groups": state["param_groups"],
               "scheduler": scheduler.state_dict() if scheduler is not None else None,
               "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}, directory / STATE_NAME)


def load_training_state(directory: str | Path, optimizer, scheduler=None) -> int:
    """Restore what `save_training_state` wrote; returns the step to continue from."""
    directory = Path(directory)
    meta = json.loads((directory / STATE_NAME).read_text())
    state = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in load_file(directory / "optimizer.safetensors").items():
        _, param, name = key.split(".", 2)
        state["state"].setdefault(int(param), {})[name] = value
    optimizer.load_state_dict(state)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(directory / "rng.safetensors")["torch_cpu"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta["step"]
