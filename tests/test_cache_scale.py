"""The feature cache at dataset scale: written by several processes (2 CPU processes on gloo here), resumable with
any process count, independent of it down to the trained aligner's weights; read shard by shard without loading
the cache; WebDataset shards read sequentially with unreadable samples counted."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from thinkdiff.train.toy_dataset import write_toy_dataset

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["vlm.max_new_tokens=6", "vlm.min_new_tokens=6"]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The toy dataset as 3 WebDataset .tar shards (14 samples), one image corrupt."""
    toy = write_toy_dataset(tmp_path_factory.mktemp("toy"), n=14)
    out = tmp_path_factory.mktemp("wds")
    images = sorted(toy.glob("*.png"))
    for s in range(3):
        with tarfile.open(out / f"{s:06d}.tar", "w") as tar:
            for path in images[s::3]:
                data = b"\x89PNG broken" if path.stem == "00004" else path.read_bytes()
                info = tarfile.TarInfo(f"{path.stem}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                caption = path.with_suffix(".txt").read_bytes()
                info = tarfile.TarInfo(f"{path.stem}.txt")
                info.size = len(caption)
                tar.addfile(info, io.BytesIO(caption))
    return out


def cache_args(data, out, *extra):
    return ["cache", "--config", str(ROOT / "configs" / "align_tiny.yaml"), f"data.source={data}", f"train.cache={out}",
            "train.cache_dtype=float32", "train.cache_shard_size=4", *SHORT, *extra]


def run_cache(data, out, processes):
    launch = [] if processes == 1 else [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd = [sys.executable, *launch, "-m", "thinkdiff", *cache_args(data, out)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def shard_contents(directory):
    out = {}
    for path in sorted(Path(directory).glob("shard-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out[path.name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
    return out


@pytest.fixture(scope="module")
def caches(shards, tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    run_cache(shards, one, 1)
    proc = run_cache(shards, two, 2)
    return one, two, proc


def test_two_processes_write_the_same_cache_as_one(caches):
    one, two, proc = caches
    assert "on 2 process(es)" in proc.stdout
    a, b = shard_contents(one), shard_contents(two)
    assert list(a) == list(b) == [f"shard-{k:05d}.safetensors" for k in range(4)]  # 14 samples, 4 per shard
    for name in a:
        assert a[name][1] == b[name][1]  # answers, captions, skipped samples
        assert a[name][0].keys() == b[name][0].keys()
        assert all(torch.equal(a[name][0][k], b[name][0][k]) for k in a[name][0])
    ranks = [json.loads((two / f"rank-{r:03d}-of-002.json").read_text()) for r in range(2)]
    assert [r["written"] for r in ranks] == [[0, 2], [1, 3]]  # shards k = rank (mod 2)
    index = json.loads((two / "index.json").read_text())
    assert index["complete"] and index["unreadable"] == 1  # the corrupt member, counted once
    assert sum(index["unreadable_per_rank"]) == 1 and index["unreadable_per_rank"] == [r["unreadable"] for r in ranks]


def test_the_aligner_trained_on_either_cache_is_the_same(caches, shards, tmp_path):
    one, two, _ = caches
    weights = []
    for cache, name in ((one, "one"), (two, "two")):
        args = ["--config", str(ROOT / "configs" / "align_tiny.yaml"), f"data.source={shards}", f"train.cache={cache}",
                "train.batch_size=4", "train.max_steps=4", "train.checkpoint_every=0", "decoder=null",
                f"train.output_dir={tmp_path / name}", *SHORT]
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=ENV, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        weights.append(load_file(tmp_path / name / "aligner" / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # exactly, not approximately


def test_a_killed_run_is_finished_by_a_run_with_another_process_count(caches, shards, tmp_path):
    from thinkdiff.errors import MissingFileError
    from thinkdiff.train.feature_cache import FeatureCache

    _, two, _ = caches
    partial = tmp_path / "partial"
    partial.mkdir()
    for path in two.glob("shard-*.safetensors"):
        if path.name != "shard-00003.safetensors":  # rank 1's last shard never got written
            (partial / path.name).write_bytes(path.read_bytes())
    index = json.loads((two / "index.json").read_text())
    settings = {k: v for k, v in index.items() if k not in ("complete", "unreadable", "unreadable_per_rank")}
    (partial / "index.json").write_text(json.dumps({**settings, "complete": False}))
    with pytest.raises(MissingFileError, match="not finished"):
        FeatureCache(partial, -1, "output")
    stamps = {p.name: p.stat().st_mtime_ns for p in partial.glob("shard-*")}
    run_cache(shards, partial, 1)  # 1 process finishes what 2 began
    assert {p.name: p.stat().st_mtime_ns for p in partial.glob("shard-*") if p.name in stamps} == stamps
    assert shard_contents(partial).keys() == shard_contents(two).keys()
    assert json.loads((partial / "index.json").read_text())["complete"]
    assert len(FeatureCache(partial, -1, "output").get(list(range(14)))) == 13  # all but the corrupt one


def test_webdataset_shards_are_read_sequentially(shards, monkeypatch):
    import thinkdiff.train.data as data_module
    from thinkdiff.train.data import ImageCaptionDataset

    dataset = ImageCaptionDataset(shards, ["Describe the image."])
    opened, offsets = [], []
    real_open = open

    class Recording:
        def __init__(self, path):
            self.f = real_open(path, "rb")
            opened.append(Path(path).name)

        def seek(self, offset):
            offsets.append(offset)
            return self.f.seek(offset)

        def read(self, n):
            return self.f.read(n)

        def close(self):
            self.f.close()

    monkeypatch.setattr(data_module, "open", lambda path, mode="r": Recording(path), raising=False)
    samples = dataset.load_many(list(reversed(range(len(dataset)))))
    assert opened == ["000000.tar", "000001.tar", "000002.tar"]  # each shard once, in order
    per_shard = [[o for o, m in zip(offsets, sorted_members(dataset)) if m == s] for s in range(3)]
    assert all(o == sorted(o) for o in per_shard)  # forward reads within each file
    assert sum(s is None for s in samples) == 1 and len(dataset.skipped) == 1


def sorted_members(dataset):
    refs = sorted((e[0] for e in dataset.entries), key=lambda m: (str(m.shard), m.offset))
    return [int(m.shard.stem) for m in refs]


PEAK_SCRIPT = """
import random, resource, sys
from thinkdiff.train.feature_cache import FeatureCache
cache = FeatureCache(sys.argv[1], -1, "output")
order = list(range(len(cache)))
random.Random(0).shuffle(order)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for start in range(0, len(order), 32):
    batch = cache.get(order[start:start + 32])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)
"""


def fake_cache(directory, num_samples, tokens=64, hidden=256, shard_size=64):
    """A cache of random states in the layout `cache` writes (64 KiB of float32 per sample)."""
    from thinkdiff.atomic import save_json
    from thinkdiff.train.feature_cache import FeatureSample, save_shard

    directory.mkdir()
    gen = torch.Generator().manual_seed(0)
    for shard in range(num_samples // shard_size):
        indices = list(range(shard * shard_size, (shard + 1) * shard_size))
        features = [FeatureSample(i, torch.randn(tokens, hidden, generator=gen), torch.arange(tokens), "t", "c")
                    for i in indices]
        save_shard(directory / f"shard-{shard:05d}.safetensors", features, indices, "float32")
    save_json({"vlm": "fake", "layer": 4, "num_layers": 4, "embed": "output", "dtype": "float32",
               "shard_size": shard_size, "num_samples": num_samples, "hidden_size": hidden, "complete": True},
              directory / "index.json")
    return num_samples * tokens * hidden * 4


def test_reading_a_four_times_larger_cache_takes_no_more_memory(tmp_path):
    peaks = []
    for name, n in (("small", 512), ("large", 2048)):  # 32 MiB and 128 MiB of states
        size = fake_cache(tmp_path / name, n)
        proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / name)], env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        peaks.append(int(proc.stdout.split()[-1]) * 1024)  # ru_maxrss is in KiB
    assert size == 128 * 2**20
    # The large cache holds 96 MiB more; reading all of it in random batches grows the peak by less than a quarter
    # of that (measured: 14 MiB, at most 8 open shards of 4 MiB; keeping what was read adds 1.3 GiB).
    assert peaks[1] - peaks[0] < 0.25 * 96 * 2**20, peaks
