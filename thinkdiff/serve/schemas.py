"""The JSON bodies the server takes, as pydantic models (strict: `"5"` is not an int, `true` is not a number,
unknown fields are refused)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageRef(_Strict):
    """One image: base64 bytes of a PNG/JPEG/..., or a path inside the server's --allowed-image-dir."""

    base64: str | None = None
    path: str | None = None

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.base64 is None) == (self.path is None):
            raise ValueError('an image is {"base64": ...} or {"path": ...}, exactly one of them')
        return self


class StatesRequest(_Strict):
    prompt: str
    images: list[ImageRef] = []
    system: str | None = None


class Sampling(_Strict):
    """`thinkdiff.vlm.SamplingConfig` over the wire."""

    max_new_tokens: int = Field(64, ge=1)
    min_new_tokens: int = Field(0, ge=0)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(0, ge=0, lt=2**63)
    first_index: int = Field(0, ge=0, lt=2**31)

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} is above max_new_tokens={self.max_new_tokens}")
        return self


class GenerateBody(_Strict):
    """POST /generate: hidden states of `layers` for every request, answered as safetensors."""

    requests: list[StatesRequest] = Field(min_length=1)
    layers: list[int] = []
    sampling: Sampling = Sampling()


class ImagesBody(_Strict):
    """POST /v1/images/generations: OpenAI's images API shape plus ThinkDiff's in-context `images` (base64)."""

    prompt: str
    n: int = Field(1, ge=1, le=8)
    size: str | None = Field(None, pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")  # "WxH"; None: the pipeline's size
    response_format: Literal["b64_json"] = "b64_json"
    images: list[str] = []
    seed: int | None = Field(None, ge=0, lt=2**63)
    num_inference_steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0)
    model: str | None = None  # accepted for OpenAI clients; the server has one pipeline

    def width_height(self) -> tuple[int, int] | None:
        if self.size is None:
            return None
        w, h = self.size.split("x")
        return int(w), int(h)


def describe(error) -> str:
    """One line per problem of a pydantic ValidationError: `sampling.max_new_tokens: Input should be ...`."""
    lines = []
    for e in error.errors():
        where = ".".join(str(p) for p in e["loc"])
        lines.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(lines)
