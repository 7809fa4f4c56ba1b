import pytest
import torch
from safetensors.torch import load_file

from thinkdiff.__main__ import main
from thinkdiff.features import load_hidden_states
from thinkdiff.testing.tiny_models import VLM_KINDS


@pytest.mark.parametrize("kind", VLM_KINDS)
def test_tiny_vlms_reload_with_vllm_friendly_heads(tiny, kind):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny(kind)).get_text_config()
    assert config.hidden_size // config.num_attention_heads >= 32
    tokenizer = AutoTokenizer.from_pretrained(tiny(kind))
    if kind == "mllama":  # as in Llama-3.2-Vision: <|image|> is the id after the LM head's vocabulary
        assert tokenizer.convert_tokens_to_ids("<|image|>") == config.vocab_size == len(tokenizer) - 1
    else:
        assert len(tokenizer) == config.vocab_size
    assert tokenizer.chat_template


def test_make_tiny_cli_builds_reloadable_pipeline(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    assert main(["make-tiny", str(tmp_path / "sd15"), "--kind", "sd15"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "sd15", text_encoder=None, tokenizer=None,
                                                   safety_checker=None, feature_extractor=None)
    assert pipe.unet.config.cross_attention_dim == 768


def test_make_tiny_is_deterministic(tmp_path):
    main(["make-tiny", str(tmp_path / "a"), "--kind", "llama"])
    main(["make-tiny", str(tmp_path / "b"), "--kind", "llama"])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_built_meanwhile_by_another_process_wins(tmp_path):
    """Processes that build the same tiny model at once (accelerate launch): the first copy stays, readers never
    see it removed; an explicit rebuild replaces it."""
    from thinkdiff.atomic import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target, replace=False) as mine:
        (mine / "who").write_text("second")
        with atomic_dir(target, replace=False) as other:  # finishes first
            (other / "who").write_text("first")
    assert (target / "who").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left
    with atomic_dir(target) as rebuilt:
        (rebuilt / "who").write_text("rebuilt")
    assert (target / "who").read_text() == "rebuilt"


def test_extract_writes_states(tmp_path, capsys, image, engine):
    image.save(tmp_path / "in.png")
    out = tmp_path / "f.safetensors"
    code = main(["extract", "--model", "tiny:mllama", "--layer", "1", "--layer", "-1", "--prompt", "Describe it.",
                 "--image", str(tmp_path / "in.png"), "--max-new-tokens", "5", "--out", str(out)])
    assert code == 0
    tensors = load_file(out)
    assert set(tensors) == {"input_embed.1", "input_embed.4", "output_embed.1", "output_embed.4",
                            "prompt_token_ids", "output_token_ids"}
    assert tensors["input_embed.1"].dtype == torch.float32 and tensors["prompt_token_ids"].dtype == torch.int64
    assert tensors["output_embed.4"].shape == (len(tensors["output_token_ids"]), 128)
    states = load_hidden_states(out)
    assert capsys.readouterr().out.strip() == states.text.strip()
    # Same as the engine in-process.
    from thinkdiff.pipeline import load_image
    from thinkdiff.vlm import SamplingConfig, VLMRequest
    ref = engine("mllama").generate([VLMRequest("Describe it.", [load_image(tmp_path / "in.png")])], [1],
                                    SamplingConfig(max_new_tokens=5))[0]
    assert torch.equal(ref.output_token_ids, states.output_token_ids)
    assert torch.allclose(ref.output_embed[1], states.output_embed[1], atol=1e-6)


def test_extract_errors(tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    assert main(["extract", "--model", "tiny:llama", "--layer", "7", "--prompt", "x", "--out", str(out)]) == 2
    assert "valid layers are 0..4" in capsys.readouterr().err
    assert main(["extract", "--model", "tiny:llama", "--layer", "1", "--prompt", "x", "--image",
                 str(tmp_path / "no.png"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()


def test_tiny_mllama_carries_llama32_visions_template_and_ids(tiny, engine, image):
    """The published Llama-3.2-11B-Vision-Instruct template, verbatim, with its real special-token ids, so the
    template's system block and its refusal of a system message next to images show up in tests."""
    import hashlib

    from transformers import AutoConfig, GenerationConfig

    from thinkdiff.chat_templates import llama32_vision_chat_template
    from thinkdiff.config import VLMConfig
    from thinkdiff.vlm import VLMRequest, make_engine

    template = llama32_vision_chat_template()
    assert hashlib.sha256(template.encode()).hexdigest() == (
        "e407323269d15bba92fc431b5b7d757e66d920d01b45cae58149a692d7697d3c")
    mllama = engine("mllama")
    assert mllama.processor.chat_template == template
    ids = {t: mllama.tokenizer.convert_tokens_to_ids(t) for t in
           ("<|begin_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>", "<|eot_id|>", "<|image|>")}
    assert ids == {"<|begin_of_text|>": 128000, "<|finetune_right_pad_id|>": 128004, "<|start_header_id|>": 128006,
                   "<|eot_id|>": 128009, "<|image|>": 128256}
    assert GenerationConfig.from_pretrained(tiny("mllama")).eos_token_id == [128001, 128008, 128009]
    config = AutoConfig.from_pretrained(tiny("mllama"))
    assert config.vision_config.image_size == 560 and config.vision_config.max_num_tiles == 4
    text_only = mllama.chat_text(VLMRequest("Describe a cat.", system="Be brief."))
    assert text_only.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
                                "Date: December 2023\nToday Date: 26 Jul 2024\n\nBe brief.<|eot_id|>")
    with_image = mllama.chat_text(VLMRequest("Describe <image> this.", [image]))
    assert with_image == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nDescribe <|image|> this."
                          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="refuses a system message next to images"):
        mllama.generate([VLMRequest("Describe it.", [image], system="Be brief.")], [])
    with pytest.raises(ValueError, match="vlm.system is set for tiny:mllama.*refuses"):  # before any model loads
        make_engine(VLMConfig(model="tiny:mllama", system="Be brief."))


def test_atomic_writes_keep_the_users_umask(tmp_path):
    import os
    import stat

    from thinkdiff.atomic import atomic_dir, save_json

    old = os.umask(0o022)
    try:
        save_json({"a": 1}, tmp_path / "x.json")
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644  # mkstemp alone gives 0600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755  # mkdtemp alone gives 0700


def test_extract_prints_only_the_answer_on_stdout_with_vllm(tmp_path):
    """vLLM logs dozens of lines at start; they go to stderr, so `extract ... > answer.txt` holds the answer."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "f.safetensors"
    proc = subprocess.run([sys.executable, "-m", "thinkdiff", "extract", "--model", "tiny:llama", "--backend",
                           "vllm", "--layer", "-1", "--prompt", "Describe a red apple.", "--max-new-tokens", "5",
                           "--out", str(out)], env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO" in proc.stderr  # vLLM did log
    assert proc.stdout == load_hidden_states(out).text + "\n"
