"""`ThinkDiffPipeline`: VLM engine -> aligner -> decoder, the Python API.

    >>> pipe = ThinkDiffPipeline.from_config("configs/tiny.yaml")
    >>> out = pipe("Create an image of a red apple.", seed=0, num_inference_steps=4, height=64, width=64)
    >>> out.images[0].save("apple.png"); print(out.text)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from PIL import Image

from .aligner import Aligner, AlignerConfig
from .conditioning import Conditioning
from .config import InferenceConfig, load_config, to_dict
from .decoders import Decoder, load_decoder, pooled_mode
from .errors import InputError, MissingFileError
from .memory_plan import plan_memory
from .rng import generator
from .vlm import HiddenStateEngine, HiddenStates, SamplingConfig, VLMRequest, make_engine, sampling_from
from .weights import resolve_model

logger = logging.getLogger(__name__)

CONFIG_NAME = "thinkdiff.yaml"


@dataclass
class ThinkDiffOutput:
    images: list[Image.Image]  # num_images per prompt, prompt-major
    text: list[str]  # the VLM's answer per prompt
    hidden_states: list[HiddenStates]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage: vlm, aligner, decoder
    settings: dict = field(default_factory=dict)  # what was used: seed, num_inference_steps, height, width, guidance


def load_image(image: str | Path | Image.Image) -> Image.Image:
    """A PIL RGB image from a path (clear error if missing or unreadable) or an image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image)
    if not path.is_file():
        raise MissingFileError(f"Image {path} not found.")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as err:
        raise InputError(f"Image {path} could not be read as an image ({err}).") from None


class ThinkDiffPipeline:
    """VLM engine -> aligner -> decoder. Stages: `engine.generate` (the VLM's answer and hidden states), `align`
    (aligner -> text conditioning), `decode` (align + the decoder's denoising loop). `engine` may be None for a
    pipeline that only decodes states it is given (training samples)."""

    def __init__(self, engine: HiddenStateEngine | None, aligner: Aligner, decoder: Decoder,
                 sampling: SamplingConfig | None = None, config: InferenceConfig | None = None):
        if engine is not None and aligner.config.input_dim != engine.hidden_size:
            raise InputError(f"The aligner reads VLM states of width {aligner.config.input_dim} but the VLM's hidden "
                             f"size is {engine.hidden_size}.")
        if aligner.config.output_dim != decoder.conditioning_dim:
            raise InputError(f"The aligner outputs width {aligner.config.output_dim} but {decoder.display_name} "
                             f"expects conditioning of width {decoder.conditioning_dim}.")
        if engine is not None:
            engine.resolve_layers([aligner.config.layer])
        self.engine, self.aligner, self.decoder = engine, aligner, decoder
        self.sampling = sampling or SamplingConfig()
        self.config = config or InferenceConfig()

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def from_config(cls, config: InferenceConfig | str | Path, overrides: list[str] = ()) -> "ThinkDiffPipeline":
        """Build every part from a config (an `InferenceConfig` or a YAML path)."""
        if not isinstance(config, InferenceConfig):
            config = load_config(InferenceConfig, config, overrides)
        pooled_mode(config.decoder)  # bad choices fail before anything loads
        plan = plan_memory(config)
        logger.info("%s", plan.describe())
        plan.check()
        vlm_config = config.vlm
        if plan.vllm_utilization is not None and config.vlm.gpu_memory_utilization is None:
            vlm_config = dataclasses.replace(config.vlm, gpu_memory_utilization=plan.vllm_utilization)
        engine = make_engine(vlm_config)
        decoder = load_decoder(config.decoder)
        if config.aligner.path:
            aligner = Aligner.from_pretrained(resolve_model(config.aligner.path, "aligner.path"))
        else:
            logger.warning("No aligner.path given: using a randomly initialised (untrained) aligner.")
            aligner = Aligner(AlignerConfig(input_dim=engine.hidden_size, output_dim=decoder.conditioning_dim,
                                            layer=config.aligner.layer, embed=config.aligner.embed),
                              generator=generator(config.aligner.seed))
        aligner = aligner.to(decoder.device).eval()
        return cls(engine, aligner, decoder, sampling_from(config.vlm), config)

    @classmethod
    def from_pretrained(cls, directory: str | Path, overrides: list[str] = ()) -> "ThinkDiffPipeline":
        """Load a folder written by `save_pretrained`: thinkdiff.yaml plus the trained aligner/."""
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file():
            from .convert_thinkdiff import CLIP_NOT_BUILT, CLIP_WIDTH

            aligner_config = directory / "aligner" / "config.json"
            if aligner_config.is_file() and yaml.safe_load(aligner_config.read_text())["input_dim"] == CLIP_WIDTH:
                raise InputError(CLIP_NOT_BUILT.format(path=directory / "aligner"))
            raise MissingFileError(f"No ThinkDiff pipeline at {directory}: {CONFIG_NAME} is missing.")
        config = load_config(InferenceConfig, directory / CONFIG_NAME,
                             [f"aligner.path={directory / 'aligner'}", *overrides])
        return cls.from_config(config)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.aligner.save_pretrained(directory / "aligner")
        data = to_dict(self.config)
        data["aligner"]["path"] = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(yaml.safe_dump(data, sort_keys=False))

    # -------------------------------------------------------------------------------------- inference

    def check_inputs(self, prompt, images):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise InputError("No prompt given.")
        if images is None:
            images = [[] for _ in prompts]
        elif isinstance(prompt, str):
            images = [images]
        if len(images) != len(prompts):
            raise InputError(f"Got {len(prompts)} prompts but {len(images)} image lists.")
        return [VLMRequest(p, [load_image(im) for im in ims], system=self.config.vlm.system)
                for p, ims in zip(prompts, images)]

    def settings(self, seed: int | None = None, num_inference_steps: int | None = None, height: int | None = None,
                 width: int | None = None, guidance_scale: float | None = None) -> dict:
        """The decoder settings a call uses: each argument, else the config's, else the family's default."""
        dc = self.config.decoder
        guidance = next(g for g in (guidance_scale, dc.guidance_scale, self.decoder.default_guidance_scale)
                        if g is not None)
        return {"seed": self.config.seed if seed is None else seed,
                "num_inference_steps": num_inference_steps or dc.num_inference_steps,
                "height": height or dc.height, "width": width or dc.width, "guidance_scale": guidance}

    def align(self, hidden_states: HiddenStates | torch.Tensor) -> Conditioning:
        """The aligner stage: one VLM answer's states (`HiddenStates`, or its layer states [L, H] already picked)
        -> the decoder's text conditioning (batch of 1)."""
        if isinstance(hidden_states, HiddenStates):
            layer = self.engine.resolve_layers([self.aligner.config.layer])[0] if self.engine is not None \
                else self.aligner.config.layer
            hidden_states = hidden_states.embed(layer, self.aligner.config.embed)
        tokens = self.aligner(hidden_states.to(self.decoder.device)[None])  # [1, L, D]
        return self.decoder.make_conditioning(tokens.to(self.decoder.dtype))

    @torch.no_grad()
    def decode(self, hidden_states: HiddenStates | torch.Tensor, num_images: int = 1, seed: int | None = None,
               num_inference_steps: int | None = None, height: int | None = None, width: int | None = None,
               guidance_scale: float | None = None, progress: bool = True,
               timings: dict[str, float] | None = None) -> list[Image.Image]:
        """Aligner -> conditioning -> decoder for one VLM answer: `num_images` images (settings as `settings`).
        `timings`, when given, gains the seconds spent in the aligner and the decoder."""
        s = self.settings(seed, num_inference_steps, height, width, guidance_scale)
        timings = {} if timings is None else timings
        start = time.perf_counter()
        cond = self.align(hidden_states)
        timings["aligner"] = timings.get("aligner", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        images = self.decoder.generate(cond, num_images_per_prompt=num_images, height=s["height"], width=s["width"],
                                       num_inference_steps=s["num_inference_steps"],
                                       guidance_scale=s["guidance_scale"], seed=s["seed"], progress=progress)
        timings["decoder"] = timings.get("decoder", 0.0) + time.perf_counter() - start
        return images

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], images: list | None = None, num_images: int = 1,
                 seed: int | None = None, num_inference_steps: int | None = None, height: int | None = None,
                 width: int | None = None, guidance_scale: float | None = None,
                 progress: bool = True) -> ThinkDiffOutput:
        """Generate `num_images` images per prompt. `images` are the in-context images of one prompt (or a list of
        lists for a list of prompts); `<image>` in a prompt places them inside the text. Prompt i's images use
        decoder seed `seed + i`."""
        if self.engine is None:
            raise InputError("This pipeline has no VLM engine (built for decode() only); load one with from_config.")
        settings = self.settings(seed, num_inference_steps, height, width, guidance_scale)
        requests = self.check_inputs(prompt, images)
        layer = self.engine.resolve_layers([self.aligner.config.layer])[0]

        start = time.perf_counter()
        states = self.engine.generate(requests, [layer], SamplingConfig(**{**vars(self.sampling),
                                                                            "seed": settings["seed"]}),
                                      progress=progress)
        timings = {"vlm": time.perf_counter() - start, "aligner": 0.0, "decoder": 0.0}
        images_out = []
        for i, hs in enumerate(states):
            images_out += self.decode(hs, num_images, **{**settings, "seed": settings["seed"] + i},
                                      progress=progress, timings=timings)
        return ThinkDiffOutput(images=images_out, text=[hs.text for hs in states], hidden_states=states,
                               timings=timings, settings=settings)
