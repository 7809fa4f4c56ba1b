import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from thinkdiff.aligner import Aligner, AlignerConfig
from thinkdiff.config import InferenceConfig, load_config
from thinkdiff.pipeline import ThinkDiffPipeline
from thinkdiff.weights import MissingWeightsError, resolve_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ["decoder.height=64", "decoder.width=64", "decoder.num_inference_steps=2", "vlm.max_new_tokens=4",
        "vlm.min_new_tokens=4"]


@pytest.fixture(scope="module")
def pipe():
    return ThinkDiffPipeline.from_config(ROOT / "configs" / "tiny.yaml", FAST)


def arrays(images):
    return [np.asarray(im) for im in images]


def test_pipeline_generates_reproducibly(pipe, image):
    out = pipe("Create an image of a red apple.", images=[image], num_images=2, seed=5, progress=False)
    assert len(out.images) == 2 and out.images[0].size == (64, 64)
    assert len(out.hidden_states[0].output_token_ids) == 4
    assert isinstance(out.text[0], str)
    assert set(out.timings) == {"vlm", "aligner", "decoder"}
    again = pipe("Create an image of a red apple.", images=[image], num_images=2, seed=5, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(arrays(out.images), arrays(again.images)))
    other = pipe("Create an image of a red apple.", images=[image], num_images=2, seed=6, progress=False)
    assert not np.array_equal(arrays(out.images)[0], arrays(other.images)[0])


def test_image_changes_the_answer_states(pipe, image):
    """Mllama's cross-attention makes the in-context image matter."""
    a = pipe("Describe it.", images=[image], seed=0, progress=False).hidden_states[0]
    b = pipe("Describe it.", images=[image.transpose(Image.FLIP_LEFT_RIGHT)], seed=0,
             progress=False).hidden_states[0]
    layer = pipe.engine.num_layers
    assert not torch.allclose(a.input_embed[layer], b.input_embed[layer])


def test_save_and_from_pretrained_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "td")
    loaded = ThinkDiffPipeline.from_pretrained(tmp_path / "td")
    assert (tmp_path / "td" / "aligner" / "model.safetensors").is_file()
    a = pipe("a cat", seed=1, progress=False).images[0]
    b = loaded("a cat", seed=1, progress=False).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_trained_aligner_changes_images(pipe, tmp_path):
    torch.manual_seed(123)
    other = Aligner(AlignerConfig(input_dim=pipe.engine.hidden_size, output_dim=4096))
    other.save_pretrained(tmp_path / "aligner")
    swapped = ThinkDiffPipeline.from_config(ROOT / "configs" / "tiny.yaml",
                                            FAST + [f"aligner.path={tmp_path / 'aligner'}"])
    a = pipe("a cat", seed=1, progress=False).images[0]
    b = swapped("a cat", seed=1, progress=False).images[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_inputs(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        pipe("a cat", images=[tmp_path / "missing.png"])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="could not be read"):
        pipe("a cat", images=[tmp_path / "broken.png"])
    with pytest.raises(ValueError, match="empty"):
        pipe("")
    wrong = Aligner(AlignerConfig(input_dim=pipe.engine.hidden_size, output_dim=768))
    with pytest.raises(ValueError, match="outputs width 768 but FLUX expects conditioning of width 4096"):
        ThinkDiffPipeline(pipe.engine, wrong, pipe.decoder)
    deep = Aligner(AlignerConfig(input_dim=pipe.engine.hidden_size, output_dim=4096, layer=12))
    with pytest.raises(ValueError, match="valid layers are 0..4"):
        ThinkDiffPipeline(pipe.engine, deep, pipe.decoder)


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError, match="`hf download meta-llama/Llama-3.2-11B-Vision-Instruct --local-dir"):
        resolve_model("meta-llama/Llama-3.2-11B-Vision-Instruct", "vlm.model")
    from thinkdiff.config import DecoderConfig, VLMConfig
    from thinkdiff.decoders import load_decoder
    from thinkdiff.vlm import make_engine

    with pytest.raises(MissingWeightsError, match='Llama-3.2-11B-Vision-Instruct --exclude "original/\\*" --local-dir'):
        make_engine(VLMConfig(model="meta-llama/Llama-3.2-11B-Vision-Instruct"))  # not its 20 GB native checkpoint

    # Only what ThinkDiff's FLUX loads: no T5-XXL (text_encoder_2), no single-file checkpoint.
    with pytest.raises(MissingWeightsError, match=r'hf download black-forest-labs/FLUX.1-dev --include '
                                                  r'model_index.json "scheduler/\*" "transformer/\*" "vae/\*" '
                                                  r'"text_encoder/\*" "tokenizer/\*" --local-dir'):
        load_decoder(DecoderConfig(model="black-forest-labs/FLUX.1-dev"))
    with pytest.raises(MissingWeightsError, match="no such folder"):
        resolve_model(str(tmp_path / "nothing"), "decoder.model")


def test_a_missing_run_folder_is_not_taken_for_a_hub_repo(tmp_path, monkeypatch):
    """`runs/aligner` (one slash, like a repo id) where `runs/` exists: the folder is missing, no download advice."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(MissingWeightsError, match="no such folder") as err:
        resolve_model("runs/aligner", "aligner.path")
    assert str(tmp_path / "runs" / "aligner") in str(err.value) and "hf download" not in str(err.value)


def test_real_weight_configs_parse():
    for name in ("llama32_vision_flux.yaml", "qwen2vl_flux.yaml"):
        config = load_config(InferenceConfig, ROOT / "configs" / name)
        assert config.decoder.family == "flux" and config.decoder.pooled == "empty_prompt"
        assert config.vlm.max_new_tokens == 128 == config.vlm.min_new_tokens
    # Llama-3.2-Vision's template refuses a system message next to images: every sample of that eval used to fail.
    import yaml

    from thinkdiff.config import from_dict
    from thinkdiff.eval.config import CobsatEvalConfig

    data = yaml.safe_load((ROOT / "configs" / "eval_cobsat_llama32_vision_flux.yaml").read_text())
    assert "Llama-3.2" in data["vlm"]["model"] and from_dict(CobsatEvalConfig, data).vlm.system is None


TINY = str(ROOT / "configs" / "tiny.yaml")


def run_infer(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_infer_writes_png_and_sidecar(tmp_path, image):
    image.save(tmp_path / "in.png")
    result = run_infer("--config", TINY, "--prompt", "What is in <image>?", "--image", str(tmp_path / "in.png"),
                       "--out", str(tmp_path / "o" / "x.png"), "--seed", "3",
                       "--steps", "2", "--height", "64", "--width", "48", "vlm.max_new_tokens=3",
                       "vlm.min_new_tokens=3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Wrote" in result.stdout
    with Image.open(tmp_path / "o" / "x.png") as im:
        assert im.format == "PNG" and im.size == (48, 64)
    sidecar = json.loads((tmp_path / "o" / "x.json").read_text())
    assert sidecar["seed"] == 3 and len(sidecar["output_token_ids"]) == 3
    # What was used (the command line's values), not the config's (8 steps, 128 x 128, guidance None).
    assert (sidecar["num_inference_steps"], sidecar["height"], sidecar["width"]) == (2, 64, 48)
    assert sidecar["guidance_scale"] == 3.5 and sidecar["config"]["decoder"]["num_inference_steps"] == 8
    assert sidecar["images_in"] == [str(tmp_path / "in.png")]
    assert set(sidecar["timings_s"]) == {"load", "vlm", "aligner", "decoder"}
    assert sidecar["config"]["decoder"]["family"] == "flux"


def test_infer_reports_bad_input(tmp_path):
    result = run_infer("--config", TINY, "--prompt", "<image>", "--image", str(tmp_path / "nope.png"), "--out",
                       str(tmp_path / "x.png"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.png not found" in result.stderr
    result = run_infer("--image", str(tmp_path / "nope.png"), cwd=tmp_path)
    assert result.returncode == 2 and "--image needs a --prompt" in result.stderr
    assert not (tmp_path / "x.png").exists()
    result = run_infer("--out", str(tmp_path / "x.png"), "decoder.colour=red", cwd=tmp_path)
    assert result.returncode == 2 and "unknown key 'decoder.colour'" in result.stderr


@pytest.mark.parametrize("family", ["sd3", "sd15", "sana", "qwenimage", "sd15-folder"])
def test_every_decoder_family_runs_with_its_defaults(family, tmp_path, monkeypatch):
    """`infer.py decoder.family=F decoder.model=tiny:F` (and a `make-tiny --kind sd15` folder) with no other
    setting: each family's pooled default applies (SD3 zeros; none for the others)."""
    import importlib.util

    from thinkdiff.__main__ import main as thinkdiff_main

    model = f"tiny:{family}"
    if family == "sd15-folder":
        family, model = "sd15", str(tmp_path / "my-sd15")
        assert thinkdiff_main(["make-tiny", model, "--kind", "sd15"]) == 0
    spec = importlib.util.spec_from_file_location("infer_script", ROOT / "infer.py")
    infer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(infer)
    out = tmp_path / "x.png"
    assert infer.main(["--config", TINY, "--out", str(out), "--steps", "2", "--height", "64", "--width", "64",
                       "vlm.max_new_tokens=3",
                       "vlm.min_new_tokens=3", f"decoder.family={family}", f"decoder.model={model}"]) == 0
    with Image.open(out) as im:
        assert im.size == (64, 64)
    with pytest.raises(ValueError, match="decoder.pooled='empty_prompt' does not apply to"):
        infer.main(["--config", TINY, "--out", str(out), f"decoder.family={family}", f"decoder.model={model}",
                    "decoder.pooled=empty_prompt"])
