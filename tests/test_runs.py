"""Training runs own their output folder: no clobbering, resume keeps the whole history, interrupts leave nothing
broken (alignment and GRPO)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from thinkdiff.config import AlignTrainConfig, GRPOTrainConfig, apply_overrides, from_dict
from thinkdiff.grpo.trainer import train_grpo
from thinkdiff.train.align import train_aligner
from thinkdiff.train.checkpoint import list_checkpoints, prune_checkpoints
from thinkdiff.train.toy_dataset import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
ALIGN = ["train.batch_size=4", "train.log_every=1", "optim.warmup_steps=2", "vlm.max_new_tokens=6",
         "vlm.min_new_tokens=6", "decoder=null"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), n=8)


def align_config(toy, out, *overrides):
    data = yaml.safe_load((ROOT / "configs" / "align_tiny.yaml").read_text())
    return from_dict(AlignTrainConfig, apply_overrides(data, [f"data.source={toy}", f"train.output_dir={out}",
                                                              *ALIGN, *overrides]))


def grpo_config(task, out, *overrides):
    data = yaml.safe_load((ROOT / "configs" / "grpo_tiny.yaml").read_text())
    return from_dict(GRPOTrainConfig, apply_overrides(data, [f"problems={task}", f"train.output_dir={out}",
                                                             "policy.max_new_tokens=4", "train.group_size=4",
                                                             *overrides]))


def losses(out):
    return [float(x) for x in (Path(out) / "losses.txt").read_text().split()]


def test_a_fresh_run_refuses_another_runs_folder(toy, tmp_path):
    out = tmp_path / "run"
    train_aligner(align_config(toy, out, "train.max_steps=4", "train.checkpoint_every=2"))
    with pytest.raises(ValueError, match="already holds a run .*train.resume=latest.*train.overwrite=true"):
        train_aligner(align_config(toy, out, "train.max_steps=2", "train.checkpoint_every=1"))
    assert [s for s, _ in list_checkpoints(out)] == [2, 4] and len(losses(out)) == 4  # nothing touched
    with pytest.raises(ValueError, match="nothing is left to train"):
        train_aligner(align_config(toy, out, "train.max_steps=4", "train.resume=latest"))
    train_aligner(align_config(toy, out, "train.max_steps=2", "train.checkpoint_every=1", "train.overwrite=true"))
    assert [s for s, _ in list_checkpoints(out)] == [1, 2] and len(losses(out)) == 2


def test_resume_keeps_the_whole_loss_history(toy, tmp_path):
    # A constant rate after warmup: the cosine schedule would depend on max_steps, which the second part raises.
    common = ["train.checkpoint_every=3", "train.keep_checkpoints=1", "optim.min_lr=1e-3"]
    train_aligner(align_config(toy, tmp_path / "full", "train.max_steps=6", *common))
    train_aligner(align_config(toy, tmp_path / "parts", "train.max_steps=3", *common))
    with open(tmp_path / "parts" / "losses.txt", "a") as f:  # a run killed after its checkpoint logged one more step
        f.write("123.0\n")
    train_aligner(align_config(toy, tmp_path / "parts", "train.max_steps=6", "train.resume=latest", *common))
    assert losses(tmp_path / "parts") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 6
    full, parts = (load_file(tmp_path / d / "aligner" / "model.safetensors") for d in ("full", "parts"))
    assert all(torch.equal(full[k], parts[k]) for k in full)


def test_pruning_keeps_the_newest_steps_by_number(tmp_path):
    for name in ("step-000500", "step-10", "step-000020"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "trainer_state.json").write_text("{}")
    prune_checkpoints(tmp_path, keep=1)  # by name, "step-10" would sort last and survive
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000500"]


def test_a_save_that_dies_keeps_the_last_good_checkpoint(tmp_path):
    """keep_checkpoints=1 and a save that fails while writing: the previous checkpoint survives and nothing
    half-written carries a checkpoint's name (the new one is written aside, renamed, and only then the old goes;
    accelerate's total_limit rotation deletes the oldest before it writes, so a killed save would leave none)."""
    from thinkdiff.train.checkpoint import latest_checkpoint, list_checkpoints, save_checkpoint

    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param])
    save_checkpoint(tmp_path, 10, lambda d: (d / "w").write_text("10"), optimizer, keep=1)

    def dies(folder):
        (folder / "w").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 20, dies, optimizer, keep=1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [10]
    assert (latest_checkpoint(tmp_path) / "w").read_text() == "10"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000010"]
    save_checkpoint(tmp_path, 30, lambda d: (d / "w").write_text("30"), optimizer, keep=1)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [30]


@pytest.mark.parametrize("lora", [0, 4])
def test_grpo_resumes_exactly_and_keeps_its_log(task, tmp_path, lora):
    common = [f"lora_rank={lora}", "train.checkpoint_every=2", "train.lr=1e-3"]
    full = train_grpo(grpo_config(task, tmp_path / "full", "train.max_steps=4", *common))
    train_grpo(grpo_config(task, tmp_path / "parts", "train.max_steps=2", *common))
    parts = train_grpo(grpo_config(task, tmp_path / "parts", "train.max_steps=4", "train.resume=latest", *common))
    rows = [json.loads(x) for x in (tmp_path / "parts" / "log.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [(r["reward"], r["loss"]) for r in rows] == [(r["reward"], r["loss"]) for r in ref]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(full / name), load_file(parts / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="already holds a run"):
        train_grpo(grpo_config(task, tmp_path / "parts", "train.max_steps=4", *common))


def _train_until_signalled(toy, out, sig):
    """train.py in a child process; `sig` once its second loss line is written. Returns (rc, stderr)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "align_tiny.yaml"),
           f"data.source={toy}", f"train.output_dir={out}", "train.max_steps=100000", "train.checkpoint_every=0",
           *ALIGN]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "losses.txt").exists() and len(losses(out)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_saves_a_checkpoint_and_says_how_to_continue(toy, tmp_path, sig):
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-000001.abcd1234").mkdir(parents=True)  # a temp folder a hard kill left
    rc, err = _train_until_signalled(toy, out, sig)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err and "Interrupted: saved" in err and "train.resume=latest" in err
    (step, path), = list_checkpoints(out)
    assert step == len(losses(out)) and (path / "aligner" / "model.safetensors").is_file()
    assert [p.name for p in (out / "checkpoints").iterdir()] == [path.name]  # no temp folders left
    train_aligner(align_config(toy, out, f"train.max_steps={step + 1}", "train.resume=latest"))
    assert len(losses(out)) == step + 1


def test_num_processes_without_multi_gpu_on_a_cpu_host_is_an_error(toy, tmp_path):
    """accelerate starts one process for `--num_processes 2` without --multi_gpu on a host without GPUs."""
    accelerate = Path(sys.executable).parent / "accelerate"
    proc = subprocess.run([str(accelerate), "launch", "--num_processes", "2", str(ROOT / "train.py"), "--config",
                           str(ROOT / "configs" / "align_tiny.yaml"), f"data.source={toy}",
                           f"train.output_dir={tmp_path}", "train.max_steps=1", *ALIGN],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0  # accelerate's launcher turns our exit status 2 into its own 1
    assert "error: `accelerate launch --num_processes 2` started one process" in proc.stderr
    assert "--multi_gpu --num_processes 2" in proc.stderr and not (tmp_path / "losses.txt").exists()


def test_sample_images_are_optional(toy, tmp_path):
    decoder = "decoder={family: flux, model: 'tiny:flux'}"
    train_aligner(align_config(toy, tmp_path / "never", "train.max_steps=1", "train.checkpoint_every=0", decoder,
                               "train.sample_every=-1"))
    assert not (tmp_path / "never" / "samples").exists()
    train_aligner(align_config(toy, tmp_path / "end", "train.max_steps=2", "train.checkpoint_every=0", decoder))
    assert [p.name for p in (tmp_path / "end" / "samples").iterdir()] == ["step-000002.png"]
