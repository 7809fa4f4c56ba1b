"""What draws the next image of a CoBSAT sample. Every method takes a batch of samples and their VLM prompts and
returns one `Generation` per sample; a failure in one sample is returned as its error, never raised.

| method        | image                                                                                          |
| ------------- | ---------------------------------------------------------------------------------------------- |
| `thinkdiff`   | `ThinkDiffPipeline`: batched VLM answers, layer states -> aligner -> decoder                    |
| `text-bridge` | the same VLM's answer *text* through the decoder's own text encoders (ThinkDiff issue #3)       |
| `oracle`      | the ground-truth CoBSAT image of (query word, hidden value): the judge's ceiling                |
| `random`      | a uniformly drawn image of the task's theme (detail x object): chance is 1/100                  |

Every image of a run uses the same decoder seed (`seed`, ThinkDiff: 42, re-set before each image), so an image
does not depend on how samples were batched or resumed.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..errors import ConfigError
from ..failures import Failure, run_per_item
from ..pipeline import load_image
from ..vlm import SamplingConfig, VLMRequest
from .cobsat import ITEM_DICT, CobsatSample, image_path, theme_image_path

logger = logging.getLogger(__name__)

# The text encoders (and tokenizers) each decoder family's text-to-image call needs. SD3 runs without its T5.
TEXT_BRIDGE_COMPONENTS = {
    "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "sd15": ("text_encoder", "tokenizer"),
    "sana": ("text_encoder", "tokenizer"),
    "qwenimage": ("text_encoder", "tokenizer"),
}


@dataclass
class Generation:
    image: Image.Image | None
    text: str | None = None  # the VLM's answer (thinkdiff, text-bridge)
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # this sample's seconds per stage


class Method:
    name: str

    def generate(self, samples: list[CobsatSample], prompts: list[str]) -> list[Generation]:
        raise NotImplementedError

    def settings(self) -> dict:
        """What the images depend on besides the sample (stored in every record)."""
        return {}


# ------------------------------------------------------------------------------------------ VLM-based methods


class _VLMMethod(Method):
    """Shared by thinkdiff and text-bridge: batched VLM answers with per-sample error isolation."""

    def __init__(self, engine, sampling: SamplingConfig, system: str | None, seed: int, height: int, width: int,
                 steps: int, guidance_scale: float | None):
        self.engine, self.sampling, self.system, self.seed = engine, sampling, system, seed
        self.height, self.width, self.steps, self.guidance_scale = height, width, steps, guidance_scale

    def settings(self) -> dict:
        return {"seed": self.seed, "height": self.height, "width": self.width, "num_inference_steps": self.steps,
                "guidance_scale": self.guidance_scale, "vlm_sampling": {**vars(self.sampling), "seed": self.seed}}

    def layers(self) -> list[int]:
        return []

    def answer(self, samples, prompts) -> tuple[list, list[str | None], float]:
        """VLM states (or errors) per sample, and the batch's VLM seconds."""
        start = time.perf_counter()
        requests, errors = [], [None] * len(samples)
        for i, (sample, prompt) in enumerate(zip(samples, prompts)):
            try:
                requests.append(VLMRequest(prompt, [load_image(p) for p in sample.image_paths], system=self.system))
            except Exception as err:  # noqa: BLE001 - recorded per sample
                requests.append(None)
                errors[i] = Failure(err).text
        sampling = SamplingConfig(**{**vars(self.sampling), "seed": self.seed})
        ok = [i for i, r in enumerate(requests) if r is not None]
        states = [None] * len(samples)
        results = run_per_item(lambda idx: self.engine.generate([requests[i] for i in idx], self.layers(), sampling,
                                                                progress=False), ok, "VLM batch")
        for i, result in zip(ok, results):
            if isinstance(result, Failure):
                errors[i] = result.text
            else:
                states[i] = result
        return states, errors, time.perf_counter() - start

    def generate(self, samples, prompts):
        states, errors, vlm_seconds = self.answer(samples, prompts)
        share = vlm_seconds / max(len(samples), 1)
        out = []
        for hs, error in zip(states, errors):
            if hs is None:
                out.append(Generation(None, error=error, timings={"vlm": share}))
                continue
            timings = {"vlm": share}
            try:
                image = self.draw(hs, timings)
                out.append(Generation(image, text=hs.text, timings=timings))
            except Exception as err:  # noqa: BLE001
                out.append(Generation(None, text=hs.text, error=Failure(err).text, timings=timings))
        return out

    def draw(self, hs, timings) -> Image.Image:
        raise NotImplementedError


class ThinkDiffMethod(_VLMMethod):
    """VLM -> layer-L states -> aligner -> decoder, with the components of a `ThinkDiffPipeline`."""

    name = "thinkdiff"

    def __init__(self, pipe, seed: int | None = None):
        dc = pipe.config.decoder
        super().__init__(pipe.engine, pipe.sampling, pipe.config.vlm.system, pipe.config.seed if seed is None else seed,
                         dc.height, dc.width, dc.num_inference_steps,
                         pipe.decoder.default_guidance_scale if dc.guidance_scale is None else dc.guidance_scale)
        self.pipe = pipe
        self.layer = pipe.engine.resolve_layers([pipe.aligner.config.layer])[0]

    def layers(self):
        return [self.layer]

    def settings(self):
        return {**super().settings(), "aligner_layer": self.layer, "aligner_embed": self.pipe.aligner.config.embed}

    def draw(self, hs, timings):
        return self.pipe.decode(hs, seed=self.seed, progress=False, timings=timings)[0]


class TextBridgeMethod(_VLMMethod):
    """The VLM's answer text, drawn by the decoder's own text-to-image call (its own text encoders)."""

    name = "text-bridge"

    def __init__(self, engine, decoder, sampling: SamplingConfig, system: str | None, seed: int, height: int,
                 width: int, steps: int, guidance_scale: float | None):
        super().__init__(engine, sampling, system, seed, height, width, steps,
                         decoder.default_guidance_scale if guidance_scale is None else guidance_scale)
        self.decoder = decoder

    @classmethod
    def from_config(cls, config) -> "TextBridgeMethod":
        """From an `InferenceConfig`: its VLM, and its decoder loaded *with* its text encoders."""
        from ..decoders import decoder_class, load_decoder
        from ..vlm import make_engine, sampling_from
        from ..weights import resolve_model

        family = config.decoder.family
        decoder_cls = decoder_class(family)
        path = resolve_model(config.decoder.model, "decoder.model")
        present = _present_components(path)
        missing = [n for n in TEXT_BRIDGE_COMPONENTS[family] if n not in present]
        if missing:
            raise ConfigError(
                f"The text-bridge baseline feeds the VLM's answer to {decoder_cls.display_name}'s own text encoders, "
                f"but decoder.model={config.decoder.model!r} ({path}) has no {', '.join(missing)}. Use a checkpoint "
                f"with its text encoders (e.g. the full black-forest-labs/FLUX.1-dev, whose text_encoder_2 is "
                f"T5-XXL), or the thinkdiff method.")
        keep = tuple(n for n in decoder_cls.text_components if n in present)
        decoder = load_decoder(dataclasses.replace(config.decoder, pooled="zeros" if decoder_cls.pooled_choices !=
                                                   ("none",) else "none"), keep_components=keep)
        return cls(make_engine(config.vlm), decoder, sampling_from(config.vlm), config.vlm.system, config.seed,
                   config.decoder.height, config.decoder.width, config.decoder.num_inference_steps,
                   config.decoder.guidance_scale)

    @torch.no_grad()
    def draw(self, hs, timings):
        start = time.perf_counter()
        self.decoder.pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        image = self.decoder.pipe(prompt=hs.text.strip(), num_images_per_prompt=1, height=self.height,
                                  width=self.width, num_inference_steps=self.steps,
                                  guidance_scale=self.guidance_scale, generator=generator, output_type="pil").images[0]
        timings["decoder"] = time.perf_counter() - start
        return image


def _present_components(path) -> set[str]:
    """Components a diffusers folder really holds (model_index.json entry not null, folder present)."""
    import json
    from pathlib import Path

    index = json.loads((Path(path) / "model_index.json").read_text())
    return {name for name, value in index.items() if not name.startswith("_") and isinstance(value, list)
            and value and value[0] is not None and (Path(path) / name).is_dir()}


# ---------------------------------------------------------------------------------------------- baselines


class OracleMethod(Method):
    """The ground-truth image: CoBSAT's image of (query word, hidden value)."""

    name = "oracle"

    def __init__(self, root):
        self.root = root

    def generate(self, samples, prompts):
        out = []
        for s in samples:
            try:
                out.append(Generation(load_image(image_path(self.root, s.task, s.query_x, s.theta))))
            except Exception as err:  # noqa: BLE001
                out.append(Generation(None, error=Failure(err).text))
        return out


class RandomMethod(Method):
    """A uniformly drawn image of the task's theme, seeded by (seed, shot, task, index)."""

    name = "random"

    def __init__(self, root, seed: int = 0):
        self.root, self.seed = root, seed

    def settings(self):
        return {"seed": self.seed}

    def generate(self, samples, prompts):
        out = []
        for s in samples:
            rng = random.Random(f"{self.seed}/{s.shot}/{s.task_id}/{s.index}")
            detail = rng.choice(ITEM_DICT[s.task.detail_space])
            obj = rng.choice(ITEM_DICT[s.task.obj_space])
            try:
                out.append(Generation(load_image(theme_image_path(self.root, s.task.task_type, detail, obj)),
                                      text=f"random: {detail} {obj}"))
            except Exception as err:  # noqa: BLE001
                out.append(Generation(None, error=Failure(err).text))
        return out


def make_method(config, root) -> Method:
    """The method `config.cobsat.method` of a `CobsatEvalConfig` (models load here)."""
    name = config.cobsat.method
    if name == "oracle":
        return OracleMethod(root)
    if name == "random":
        return RandomMethod(root, config.seed)
    if name == "text-bridge":
        return TextBridgeMethod.from_config(config.inference_config())
    if name == "thinkdiff":
        from ..pipeline import ThinkDiffPipeline

        return ThinkDiffMethod(ThinkDiffPipeline.from_config(config.inference_config()))
    raise ConfigError(f"Unknown method {name!r}; choose thinkdiff, text-bridge, oracle or random.")
