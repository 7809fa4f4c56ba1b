"""Image-caption pairs for alignment training, from a folder, a JSONL manifest or WebDataset shards.

    folder/      a.jpg + a.txt (caption, optional), b.png + b.txt, ...
    data.jsonl   {"image": "relative/or/absolute.jpg", "caption": "..."} per line
    shards/      *.tar in WebDataset layout: members KEY.jpg|png|webp with KEY.txt or KEY.json ({"caption": ...})

A sample whose image is missing or unreadable is counted (`skipped`), reported once with a warning, and skipped:
it never stops a long run. `load_many` reads the images of WebDataset shards sequentially: each shard file is opened
once per call and its members read in the order they lie in it. Each sample gets one of the configured VLM
instructions, chosen by a seeded RNG per index.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import InputError, MissingFileError

logger = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclass
class ImageCaptionSample:
    index: int
    image: Image.Image
    caption: str
    prompt: str  # the instruction the VLM answers about the image


@dataclass(frozen=True)
class ShardMember:
    """An image inside a WebDataset .tar shard: `size` bytes at byte `offset`."""

    shard: Path
    name: str
    offset: int
    size: int

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


class ImageCaptionDataset:
    def __init__(self, source: str | Path, prompts: list[str], seed: int = 0, limit: int | None = None):
        if not prompts:
            raise InputError("data.prompts is empty: give the VLM at least one instruction.")
        self.source, self.prompts, self.seed = Path(source), list(prompts), seed
        if not self.source.exists():
            raise MissingFileError(f"Training data {self.source} not found (a folder of images, a .jsonl "
                                    "manifest, or a folder of WebDataset .tar shards).")
        if self.source.suffix == ".jsonl":
            self.entries = self._read_manifest()
        elif sorted(self.source.glob("*.tar")):
            self.entries = self._read_shards()
        else:
            self.entries = self._read_folder()
        if limit is not None:
            self.entries = self.entries[:limit]
        if not self.entries:
            raise InputError(f"No samples found in {self.source}.")
        self.skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def prompt(self, index: int) -> str:
        return random.Random(self.seed * 1_000_003 + index).choice(self.prompts)

    def load(self, index: int) -> ImageCaptionSample | None:
        """The sample at `index`, or None (counted in `skipped`) if its image cannot be read."""
        return self.load_many([index])[0]

    def load_many(self, indices: list[int]) -> list[ImageCaptionSample | None]:
        """The samples at `indices` (None where the image cannot be read); images inside .tar shards are read with
        one open file per shard, in their order in the file."""
        out: dict[int, ImageCaptionSample | None] = {}
        in_shards = sorted((i for i in indices if isinstance(self.entries[i][0], ShardMember)),
                           key=lambda i: (str(self.entries[i][0].shard), self.entries[i][0].offset))
        for shard, group in itertools.groupby(in_shards, key=lambda i: self.entries[i][0].shard):
            try:
                handle = open(shard, "rb")
            except OSError as err:
                out.update((i, self._unreadable(i, err)) for i in group)
                continue
            try:
                for i in group:
                    out[i] = self._sample(i, lambda h=handle, m=self.entries[i][0]: _read_member(h, m))
            finally:
                handle.close()
        for i in indices:
            if i not in out:
                out[i] = self._sample(i, lambda ref=self.entries[i][0]: Image.open(ref))
        return [out[i] for i in indices]

    def _sample(self, index: int, open_image) -> ImageCaptionSample | None:
        try:
            image = open_image()
            image.load()
        except Exception as err:  # corrupt, truncated, missing: all are skipped the same way
            return self._unreadable(index, err)
        return ImageCaptionSample(index=index, image=image.convert("RGB"), caption=self.entries[index][1],
                                  prompt=self.prompt(index))

    def _unreadable(self, index: int, err: Exception) -> None:
        if index not in self.skipped:
            self.skipped.add(index)
            logger.warning("Skipping sample %d (%s): %s (%d skipped so far)", index, self.entries[index][0], err,
                           len(self.skipped))
        return None

    # --------------------------------------------------------------------------------------- sources

    def _read_folder(self):
        entries = []
        for path in sorted(p for p in self.source.iterdir() if p.suffix.lower() in IMAGE_EXTS):
            caption_file = path.with_suffix(".txt")
            entries.append((path, caption_file.read_text().strip() if caption_file.exists() else ""))
        return entries

    def _read_manifest(self):
        entries = []
        for line_no, line in enumerate(self.source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                entries.append((self.source.parent / row["image"], str(row.get("caption", ""))))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                logger.warning("Skipping line %d of %s: %s", line_no, self.source, err)
        return entries

    def _read_shards(self):
        entries = []
        for shard in sorted(self.source.glob("*.tar")):
            with tarfile.open(shard) as tar:
                members = {}
                for member in tar.getmembers():
                    key, _, ext = member.name.rpartition(".")
                    members.setdefault(key, {})[ext.lower()] = member
                for key in sorted(members):
                    parts = members[key]
                    image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)
                    if image_ext is None:
                        continue
                    caption = ""
                    if "txt" in parts:
                        caption = tar.extractfile(parts["txt"]).read().decode().strip()
                    elif "json" in parts:
                        caption = json.loads(tar.extractfile(parts["json"]).read()).get("caption", "")
                    image = parts[image_ext]  # an index built once: where its bytes lie in the shard
                    entries.append((ShardMember(shard, image.name, image.offset_data, image.size), caption))
        return entries



def _read_member(handle, member: ShardMember) -> Image.Image:
    handle.seek(member.offset)  # forward only: members come in file order
    data = handle.read(member.size)
    if len(data) != member.size:
        raise OSError(f"{member.shard} is truncated at member {member.name}")
    return Image.open(io.BytesIO(data))


def image_to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """Centre-crop to a square, resize to `size`, scale to [-1, 1]: [3, size, size] float32."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
