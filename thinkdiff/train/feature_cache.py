"""VLM features for training, either computed live by an engine or read from a sharded safetensors cache.

Cache layout (written by `python -m thinkdiff cache`, on one process or many):

    DIR/index.json                  vlm, layer, embed, dtype, shard_size, num_samples, hidden_size; once every
                                    shard is written: complete, unreadable (total), unreadable_per_rank
    DIR/shard-00000.safetensors     per sample i: `i.embed` [T, H] (bf16/fp16/fp32), `i.output_token_ids` int64;
                                    metadata "samples": JSON [{index, text, caption}], "skipped": JSON [index, ...]
    DIR/rank-000-of-002.json        what process 0 of 2 wrote in its last run: shards, unreadable samples, seconds

Shard k always holds dataset samples [k * shard_size, (k + 1) * shard_size), whoever writes it: process r of N
writes the shards k = r (mod N) not on disk yet, so a killed run re-run with any N finishes the same cache, and the
cache does not depend on N. When all processes are done, process 0 merges the index. Reading (`FeatureCache`)
opens shards on demand and reads only the samples asked for, so a cache larger than memory trains.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..atomic import save_json, save_safetensors
from ..config import torch_dtype
from ..errors import ConfigError, MissingFileError
from ..vlm import HiddenStateEngine, SamplingConfig, VLMRequest
from .data import ImageCaptionDataset

logger = logging.getLogger(__name__)

INDEX_NAME = "index.json"


@dataclass
class FeatureSample:
    index: int  # dataset index
    embed: torch.Tensor  # [T, H] float32: the VLM states the aligner reads (output, input or both)
    output_token_ids: torch.Tensor  # [G] int64, the VLM's answer
    text: str  # the answer, decoded
    caption: str


def _extract(engine: HiddenStateEngine, dataset: ImageCaptionDataset, indices: list[int], layer: int, embed: str,
             sampling: SamplingConfig, progress: bool = True) -> list[FeatureSample]:
    samples = [s for s in dataset.load_many(indices) if s is not None]
    if not samples:
        return []
    states = engine.generate([VLMRequest(s.prompt, [s.image]) for s in samples], [layer], sampling,
                             progress=progress)
    return [FeatureSample(index=s.index, embed=hs.embed(layer, embed).float(), output_token_ids=hs.output_token_ids,
                          text=hs.text, caption=s.caption) for s, hs in zip(samples, states)]


class LiveFeatures:
    """Runs the VLM on each batch (no cache)."""

    def __init__(self, engine: HiddenStateEngine, dataset: ImageCaptionDataset, layer: int, embed: str,
                 sampling: SamplingConfig):
        self.engine, self.dataset, self.embed, self.sampling = engine, dataset, embed, sampling
        self.layer = engine.resolve_layers([layer])[0]

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, indices: list[int]) -> list[FeatureSample]:
        return _extract(self.engine, self.dataset, indices, self.layer, self.embed, self.sampling, progress=False)


def shard_path(directory: Path, shard: int) -> Path:
    return directory / f"shard-{shard:05d}.safetensors"


def save_shard(path: Path, features: list[FeatureSample], indices: list[int], dtype: str) -> None:
    """One cache shard: the features of `indices` that could be read (the others listed as skipped)."""
    tensors = {}
    for f in features:
        tensors[f"{f.index}.embed"] = f.embed.to(torch_dtype(dtype))
        tensors[f"{f.index}.output_token_ids"] = f.output_token_ids.long()
    done = {f.index for f in features}
    metadata = {"samples": json.dumps([{"index": f.index, "text": f.text, "caption": f.caption} for f in features]),
                "skipped": json.dumps([i for i in indices if i not in done])}
    save_safetensors(tensors, path, metadata=metadata)


def write_cache(engine: HiddenStateEngine, dataset: ImageCaptionDataset, out_dir: str | Path, layer: int,
                embed: str, sampling: SamplingConfig, vlm_name: str, shard_size: int = 256,
                dtype: str = "bfloat16", rank: int = 0, world: int = 1, barrier=None) -> Path:
    """Run the VLM once over this process's share of `dataset` (shards k = rank mod world; shards already on disk
    are kept) and, on rank 0 once `barrier()` says all processes are done, merge the index."""
    out_dir = Path(out_dir)
    layer = engine.resolve_layers([layer])[0]
    settings = {"vlm": vlm_name, "layer": layer, "num_layers": engine.num_layers, "embed": embed, "dtype": dtype,
                "shard_size": shard_size, "num_samples": len(dataset), "hidden_size": engine.hidden_size}
    index_path = out_dir / INDEX_NAME
    if index_path.exists():
        old = json.loads(index_path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise ConfigError(f"The cache at {out_dir} was written with other settings {diff} (cached, asked); "
                             "use another folder or delete it.")
    if rank == 0:
        save_json({**settings, "complete": False}, index_path)
    num_shards = -(-len(dataset) // shard_size)
    mine = range(rank, num_shards, world)
    start, written, unreadable = time.perf_counter(), [], 0
    desc = "feature cache" + (f" (process {rank} of {world})" if world > 1 else "")
    for shard in tqdm(mine, desc=desc, unit="shard", position=rank if world > 1 else None):
        path = shard_path(out_dir, shard)
        if path.exists():
            continue
        indices = list(range(shard * shard_size, min(len(dataset), (shard + 1) * shard_size)))
        features = _extract(engine, dataset, indices, layer, embed, sampling)
        save_shard(path, features, indices, dtype)
        written.append(shard)
        unreadable += len(indices) - len(features)
    save_json({"rank": rank, "world": world, "shards": len(mine), "written": written, "unreadable": unreadable,
               "seconds": time.perf_counter() - start}, out_dir / f"rank-{rank:03d}-of-{world:03d}.json")
    if barrier is not None:
        barrier()
    if rank == 0:
        merge_index(out_dir, settings, num_shards, world)
    return out_dir


def merge_index(out_dir: Path, settings: dict, num_shards: int, world: int) -> dict:
    """index.json once every shard is on disk: the settings, complete, unreadable samples in total (from the
    shards) and per process of this run."""
    missing = [k for k in range(num_shards) if not shard_path(out_dir, k).is_file()]
    if missing:
        raise MissingFileError(f"Cache shards {missing[:5]} of {num_shards} are missing in {out_dir} after every "
                                "process finished; re-run the same command to write them.")
    unreadable = 0
    for k in range(num_shards):
        with safe_open(str(shard_path(out_dir, k)), framework="pt") as f:
            unreadable += len(json.loads(f.metadata()["skipped"]))
    ranks = [json.loads((out_dir / f"rank-{r:03d}-of-{world:03d}.json").read_text()) for r in range(world)]
    index = {**settings, "complete": True, "unreadable": unreadable,
             "unreadable_per_rank": [r["unreadable"] for r in ranks]}
    save_json(index, out_dir / INDEX_NAME)
    logger.info("Feature cache %s complete: %d shards, %d samples, %d unreadable (this run, per process: %s)",
                out_dir, num_shards, settings["num_samples"], unreadable, index["unreadable_per_rank"])
    return index


class FeatureCache:
    """Reads a cache written by `write_cache`; `get(indices)` skips samples the writer could not read."""

    def __init__(self, directory: str | Path, layer: int, embed: str):
        self.dir = Path(directory)
        if not (self.dir / INDEX_NAME).is_file():
            raise MissingFileError(f"No feature cache at {self.dir} ({INDEX_NAME} missing); write one with "
                                    "`python -m thinkdiff cache --config ...`.")
        self.index = json.loads((self.dir / INDEX_NAME).read_text())
        n = self.index["num_layers"]
        if not -(n + 1) <= layer <= n or layer % (n + 1) != self.index["layer"] or embed != self.index["embed"]:
            raise ConfigError(f"The cache at {self.dir} holds layer {self.index['layer']} / embed "
                             f"{self.index['embed']!r}; the config asks for layer {layer} / embed {embed!r}.")
        if not self.index.get("complete", True):
            raise MissingFileError(f"The feature cache at {self.dir} is not finished (a run was stopped); re-run the "
                                    "same `python -m thinkdiff cache` command to write the missing shards.")
        self.hidden_size = self.index["hidden_size"]

    def __len__(self) -> int:
        return self.index["num_samples"]

    @functools.lru_cache(maxsize=8)  # noqa: B019 - a cache lives as long as its run
    def _shard(self, shard: int):
        """An open shard (memory-mapped; tensors are read one by one) and its samples' metadata."""
        path = shard_path(self.dir, shard)
        if not path.is_file():
            raise MissingFileError(f"Cache shard {path} is missing; re-run `python -m thinkdiff cache` to finish it.")
        handle = safe_open(str(path), framework="pt")
        return handle, {s["index"]: s for s in json.loads(handle.metadata()["samples"])}

    def get(self, indices: list[int]) -> list[FeatureSample]:
        out = []
        for i in indices:
            handle, samples = self._shard(i // self.index["shard_size"])
            if i not in samples:
                continue
            out.append(FeatureSample(index=i, embed=handle.get_tensor(f"{i}.embed").float(),
                                     output_token_ids=handle.get_tensor(f"{i}.output_token_ids"),
                                     text=samples[i]["text"], caption=samples[i]["caption"]))
        return out
