import os
import tempfile

import numpy as np
import pytest
from PIL import Image

# Tiny models are built once per test session into a private cache; nothing touches the network.
os.environ.setdefault("THINKDIFF_HOME", tempfile.mkdtemp(prefix="thinkdiff-test-home-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """tiny("mllama") -> path of the session's tiny model of that kind."""
    from thinkdiff.testing.tiny_models import tiny_path

    return tiny_path


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


@pytest.fixture
def image():
    return make_image(70, 40)


@pytest.fixture(scope="session")
def task(tmp_path_factory):
    """A drawn arithmetic task for GRPO: 6 problems "What is <img> plus <img>?" with digits 0-1."""
    from thinkdiff.grpo.problems import write_arithmetic_task

    return write_arithmetic_task(tmp_path_factory.mktemp("arith"), n=6, max_digit=1)


_ENGINES = {}


@pytest.fixture(scope="session")
def engine(tiny):
    """engine("mllama") -> a cached TransformersEngine on that tiny model."""
    from thinkdiff.vlm.transformers_engine import TransformersEngine

    def get(kind):
        if kind not in _ENGINES:
            _ENGINES[kind] = TransformersEngine(tiny(kind))
        return _ENGINES[kind]

    return get
