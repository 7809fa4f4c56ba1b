"""Training checkpoints in safetensors + JSON only (no pickle), written to a temp folder and renamed.

    step-000100/aligner/            Aligner.save_pretrained (loads into ThinkDiffPipeline as aligner.path)
    step-000100/optimizer.safetensors   every optimizer state tensor, keyed state.<param>.<name>
    step-000100/trainer_state.json  step, optimizer param groups, scheduler state, Python RNG state
    step-000100/rng.safetensors     torch CPU RNG state
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..aligner import Aligner
from ..atomic import atomic_dir, save_json, save_safetensors


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = Path(output_dir) / "checkpoints"
    done = sorted(p for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save_checkpoint(output_dir: str | Path, step: int, aligner: Aligner, optimizer, scheduler,
                    keep: int = 2) -> Path:
    final = checkpoint_dir(output_dir, step)
    with atomic_dir(final) as tmp:
        aligner.save_pretrained(tmp / "aligner")
        state = optimizer.state_dict()
        tensors = {f"state.{p}.{name}": value for p, values in state["state"].items()
                   for name, value in values.items() if isinstance(value, torch.Tensor)}
        save_safetensors(tensors, tmp / "optimizer.safetensors")
        save_safetensors({"torch_cpu": torch.get_rng_state()}, tmp / "rng.safetensors")
        py_state = random.getstate()
        save_json({"step": step, "param_groups": state["param_groups"], "scheduler": scheduler.state_dict(),
                   "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}, tmp / "trainer_state.json")
    for old in sorted(final.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(directory: str | Path, aligner: Aligner, optimizer, scheduler) -> int:
    """Restore everything `save_checkpoint` wrote; returns the step to continue from."""
    directory = Path(directory)
    if not (directory / "trainer_state.json").is_file():
        raise FileNotFoundError(f"No checkpoint at {directory} (trainer_state.json missing).")
    meta = json.loads((directory / "trainer_state.json").read_text())
    aligner.load_state_dict(Aligner.from_pretrained(directory / "aligner").state_dict())
    state = {"state": {}, "param_groups": meta["param_groups"]}
    for key, value in load_file(directory / "optimizer.safetensors").items():
        _, param, name = key.split(".", 2)
        state["state"].setdefault(int(param), {})[name] = value
    optimizer.load_state_dict(state)
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(load_file(directory / "rng.safetensors")["torch_cpu"])
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta["step"]
