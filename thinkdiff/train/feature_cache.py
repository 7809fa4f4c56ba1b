"""VLM features for training, either computed live by an engine or read from a sharded safetensors cache.

Cache layout (written by `python -m thinkdiff cache`, resumable: finished shards are skipped):

    DIR/index.json                  vlm, layer, embed, dtype, shard_size, num_samples
    DIR/shard-00000.safetensors     per sample i: `i.embed` [T, H] (bf16/fp16/fp32), `i.output_token_ids` int64;
                                    metadata "samples": JSON [{index, text, caption}], "skipped": JSON [index, ...]
"""

from __future__ import annotations

import functools
import json
import logging
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
    samples = [s for s in (dataset.load(i) for i in indices) if s is not None]
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


def write_cache(engine: HiddenStateEngine, dataset: ImageCaptionDataset, out_dir: str | Path, layer: int,
                embed: str, sampling: SamplingConfig, vlm_name: str, shard_size: int = 256,
                dtype: str = "bfloat16") -> Path:
    """Run the VLM once over `dataset` and write the cache; shards already on disk are kept (resume)."""
    out_dir = Path(out_dir)
    layer = engine.resolve_layers([layer])[0]
    index = {"vlm": vlm_name, "layer": layer, "num_layers": engine.num_layers, "embed": embed, "dtype": dtype,
             "shard_size": shard_size, "num_samples": len(dataset), "hidden_size": engine.hidden_size}
    if (out_dir / INDEX_NAME).exists():
        old = json.loads((out_dir / INDEX_NAME).read_text())
        if old != index:
            diff = {k: (old.get(k), v) for k, v in index.items() if old.get(k) != v}
            raise ConfigError(f"The cache at {out_dir} was written with other settings {diff} (cached, asked); "
                             "use another folder or delete it.")
    save_json(index, out_dir / INDEX_NAME)
    num_shards = -(-len(dataset) // shard_size)
    for shard in tqdm(range(num_shards), desc="feature cache", unit="shard"):
        path = out_dir / f"shard-{shard:05d}.safetensors"
        if path.exists():
            continue
        indices = list(range(shard * shard_size, min(len(dataset), (shard + 1) * shard_size)))
        features = _extract(engine, dataset, indices, layer, embed, sampling)
        tensors = {}
        for f in features:
            tensors[f"{f.index}.embed"] = f.embed.to(torch_dtype(dtype))
            tensors[f"{f.index}.output_token_ids"] = f.output_token_ids.long()
        done = {f.index for f in features}
        metadata = {"samples": json.dumps([{"index": f.index, "text": f.text, "caption": f.caption}
                                           for f in features]),
                    "skipped": json.dumps([i for i in indices if i not in done])}
        save_safetensors(tensors, path, metadata=metadata)
    return out_dir


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
        self.hidden_size = self.index["hidden_size"]

    def __len__(self) -> int:
        return self.index["num_samples"]

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a cache lives as long as its run
    def _shard(self, shard: int):
        path = self.dir / f"shard-{shard:05d}.safetensors"
        if not path.is_file():
            raise MissingFileError(f"Cache shard {path} is missing; re-run `python -m thinkdiff cache` to finish it.")
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            samples = {s["index"]: s for s in json.loads(f.metadata()["samples"])}
        return tensors, samples

    def get(self, indices: list[int]) -> list[FeatureSample]:
        out = []
        for i in indices:
            tensors, samples = self._shard(i // self.index["shard_size"])
            if i not in samples:
                continue
            out.append(FeatureSample(index=i, embed=tensors[f"{i}.embed"].float(),
                                     output_token_ids=tensors[f"{i}.output_token_ids"], text=samples[i]["text"],
                                     caption=samples[i]["caption"]))
        return out
