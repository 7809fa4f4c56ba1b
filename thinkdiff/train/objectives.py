"""Alignment objectives: what the aligner is trained to do with the VLM's states.

- `t5_decoder` (ThinkDiff): the aligned tokens are the encoder states of a frozen T5 decoder, which must predict the
  rest of the VLM's answer. Random split: the aligner sees the first k ~ U[1, min(G - 1, max_split)] answer states
  and the decoder predicts the text of tokens k.. (re-tokenised for T5). Without the split (`split=False`, an
  ablation) the aligner sees all G states and learns to copy each state's own token (ThinkDiff Table 3: 0.287 vs
  0.417 2-shot CoBSAT). The aligner's RMSNorm starts from
  T5's encoder final norm (ThinkDiff Fig. 7).
- `diffusion`: the decoder's own training loss (flow matching or noise prediction) through its frozen backbone,
  conditioned on the aligned tokens, with the sample's image as target.
- `regression`: the aligned tokens regress the decoder's text encoder (T5) outputs on the VLM's answer text. The two
  sequences have different tokenisations, so the target [T, D] is linearly resampled to the aligner's G positions.

Each objective takes a batch of `FeatureSample`s and an integer seed; all randomness comes from one generator per
sample seeded with it and the sample's index, and every loss is a mean over samples (each sample's own mean over its
tokens or pixels), so results do not depend on how a batch is split over processes or micro-batches.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..aligner import Aligner
from ..errors import InputError, MissingFileError
from ..rng import generator
from .data import ImageCaptionDataset, image_to_pixels
from .feature_cache import FeatureSample

logger = logging.getLogger(__name__)


def sample_generator(seed: int, index: int) -> torch.Generator:
    return generator(seed, index)


def pad_states(states: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [T_i, H] tensors to [B, T_max, H] with a [B, T_max] mask (1 = real)."""
    longest = max(s.shape[0] for s in states)
    batch = torch.zeros(len(states), longest, states[0].shape[1], device=device)
    mask = torch.zeros(len(states), longest, dtype=torch.long, device=device)
    for i, s in enumerate(states):
        batch[i, :len(s)] = s.to(device)
        mask[i, :len(s)] = 1
    return batch, mask


def load_t5_decoder(path, dtype: torch.dtype = torch.float32, device="cpu"):
    """A frozen `T5ForConditionalGeneration` without its encoder (ThinkDiff's proxy: the aligner's tokens replace
    the encoder's output) and the encoder's final-norm weight [D]. Only the decoder, the LM head, the shared
    embedding and that norm are read from the checkpoint, in `dtype`: for flan-t5-xxl ~6.6B of 11.3B weights
    (13 GB in bf16 instead of 23)."""
    import json
    from pathlib import Path

    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import T5Config, T5ForConditionalGeneration

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    if not all((path / f).is_file() for f in files):
        raise MissingFileError(f"No safetensors weights in {path} (objective.t5_model); thinkdiff reads T5 from "
                                "model.safetensors or model-*-of-*.safetensors shards.")
    with init_empty_weights():
        t5 = T5ForConditionalGeneration(T5Config.from_pretrained(str(path)))
    wanted = {name for name, _ in t5.named_parameters() if not name.startswith("encoder.")}
    norm_key = "encoder.final_layer_norm.weight"
    state, norm = {}, None
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                if key == norm_key:
                    norm = f.get_tensor(key).float()
                elif key in wanted:
                    state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    t5.load_state_dict(state, strict=False, assign=True)  # the encoder stays on the meta device
    t5.tie_weights()  # the decoder's embedding (and the LM head, when tied) share the loaded `shared` weight
    t5.encoder = None  # never materialised: the aligner's tokens replace its output
    wanted = {n for n, p in t5.named_parameters() if p.device.type == "meta"}
    if wanted or norm is None:
        missing = sorted(wanted) + ([] if norm is not None else [norm_key])
        raise InputError(f"The T5 checkpoint at {path} lacks {missing[:3]} (objective.t5_model must be a T5 "
                         "encoder-decoder such as google/flan-t5-xxl).")
    return t5.eval().requires_grad_(False), norm


class T5DecoderObjective:
    def __init__(self, t5_path, vlm_tokenizer, max_split: int = 128, max_target_tokens: int = 128,
                 device="cpu", dtype: torch.dtype = torch.float32, split: bool = True):
        from transformers import AutoTokenizer

        t5, self.encoder_norm_weight = load_t5_decoder(t5_path, dtype, device)
        self.t5, self.t5_tokenizer = t5, AutoTokenizer.from_pretrained(str(t5_path))
        self.vlm_tokenizer, self.max_split, self.max_target = vlm_tokenizer, max_split, max_target_tokens
        self.output_dim, self.device, self.split = t5.config.d_model, torch.device(device), split

    def init_aligner(self, aligner: Aligner) -> None:
        aligner.init_norm_from(self.encoder_norm_weight)

    def loss(self, aligner, batch: list[FeatureSample], seed: int) -> torch.Tensor:
        from transformers.modeling_outputs import BaseModelOutput

        inputs, labels = [], []
        for sample in batch:
            tokens = sample.output_token_ids
            if len(tokens) < 2:
                continue  # nothing to split
            if self.split:
                high = min(len(tokens) - 1, self.max_split) + 1
                k = int(torch.randint(1, high, (1,), generator=sample_generator(seed, sample.index)))
            else:
                k = 0  # the decoder writes the whole answer from every state
            text = self.vlm_tokenizer.decode(tokens[k:], skip_special_tokens=True)
            ids = self.t5_tokenizer(text, add_special_tokens=False).input_ids[:self.max_target - 1]
            inputs.append(sample.embed[:k] if k else sample.embed)
            labels.append(ids + [self.t5_tokenizer.eos_token_id])
        if not inputs:
            raise InputError("No sample in the batch has an answer of 2 or more tokens; raise vlm.max_new_tokens.")
        states, mask = pad_states(inputs, self.device)
        target = torch.full((len(labels), max(map(len, labels))), -100, dtype=torch.long, device=self.device)
        for i, ids in enumerate(labels):
            target[i, :len(ids)] = torch.tensor(ids)
        aligned = aligner(states)
        logits = self.t5(encoder_outputs=BaseModelOutput(last_hidden_state=aligned.to(self.t5.dtype)),
                         attention_mask=mask, labels=target).logits  # [B, T, V]
        per_token = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")  # 0 where -100
        return (per_token.sum(1) / (target != -100).sum(1)).mean()  # each sample weighs the same


class DiffusionObjective:
    def __init__(self, decoder, dataset: ImageCaptionDataset, image_size: int):
        self.decoder, self.dataset, self.image_size = decoder.freeze(), dataset, image_size
        self.output_dim = decoder.conditioning_dim

    def init_aligner(self, aligner: Aligner) -> None:
        pass

    def loss(self, aligner, batch: list[FeatureSample], seed: int) -> torch.Tensor:
        images = self.dataset.load_many([s.index for s in batch])
        kept = [(s, im) for s, im in zip(batch, images) if im is not None]
        states, mask = pad_states([s.embed for s, _ in kept], self.decoder.device)
        pixels = torch.stack([image_to_pixels(im.image, self.image_size) for _, im in kept])
        generators = [sample_generator(seed, s.index) for s, _ in kept]
        return self.decoder.training_loss(aligner(states), mask, pixels, generators)


class RegressionObjective:
    def __init__(self, encoder_path, vlm_tokenizer, max_target_tokens: int = 128, device="cpu"):
        from transformers import AutoTokenizer, T5EncoderModel

        self.encoder = T5EncoderModel.from_pretrained(str(encoder_path)).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(str(encoder_path))
        self.vlm_tokenizer, self.max_target, self.device = vlm_tokenizer, max_target_tokens, torch.device(device)
        self.output_dim = self.encoder.config.d_model

    def init_aligner(self, aligner: Aligner) -> None:
        aligner.init_norm_from(self.encoder.encoder.final_layer_norm)

    @torch.no_grad()
    def target(self, text: str, length: int) -> torch.Tensor:
        """Text-encoder states of `text`, resampled to `length` positions: [length, D]."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids[:self.max_target - 1]
        ids = torch.tensor([ids + [self.tokenizer.eos_token_id]], device=self.device)
        states = self.encoder(input_ids=ids).last_hidden_state  # [1, T, D]
        return F.interpolate(states.transpose(1, 2), size=length, mode="linear", align_corners=True)[0].T

    def loss(self, aligner, batch: list[FeatureSample], seed: int) -> torch.Tensor:
        states, mask = pad_states([s.embed for s in batch], self.device)
        targets = torch.zeros(len(batch), states.shape[1], self.output_dim, device=self.device)
        for i, s in enumerate(batch):
            targets[i, :len(s.embed)] = self.target(s.text or " ", len(s.embed))
        err = (aligner(states).float() - targets).pow(2).mean(-1)  # [B, T]
        return ((err * mask).sum(1) / mask.sum(1)).mean()  # each sample weighs the same
