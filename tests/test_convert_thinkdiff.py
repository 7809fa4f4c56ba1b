"""convert-thinkdiff on checkpoints written in the release's format: {'model': {trainable name: tensor}}."""

import pytest
import torch

from thinkdiff.__main__ import main
from thinkdiff.aligner import Aligner


def projector(prefix, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.0.weight": torch.randn(4096, width, generator=g) * 0.02,
            f"{prefix}.0.bias": torch.randn(4096, generator=g) * 0.02,
            f"{prefix}.2.weight": torch.randn(4096, 4096, generator=g) * 0.02,
            f"{prefix}.2.bias": torch.randn(4096, generator=g) * 0.02,
            f"{prefix}.3.weight": 1 + torch.randn(4096, generator=g) * 0.1}


def release(path, state):
    # bf16, as ThinkDiff trained, beside other trainable tensors the converter must skip.
    torch.save({"model": {k: v.to(torch.bfloat16) for k, v in state.items()}, "epoch": 3}, path)
    return path


def test_converted_lvlm_checkpoint_loads_and_reads_thinkdiffs_states(tmp_path, image):
    from thinkdiff.pipeline import ThinkDiffPipeline

    state = {**projector("model.llm_proj", 128), "model.query_tokens": torch.zeros(1, 32, 4096),
             "model.other.0.weight": torch.zeros(4096, 7)}  # a Linear of the right width, but no projector around it
    ckpt = release(tmp_path / "thinkdiff_lvlm.pth", state)
    out = tmp_path / "converted"
    assert main(["convert-thinkdiff", str(ckpt), str(out), "--vlm", "tiny:mllama", "--decoder", "tiny:flux"]) == 0
    config = (out / "thinkdiff.yaml").read_text()
    for setting in ("max_new_tokens: 128", "temperature: 0.6", "top_p: 0.9", "height: 1024", "guidance_scale: 3.5",
                    "num_inference_steps: 28", "pooled: empty_prompt", "embed: predicting"):
        assert setting in config
    aligner = Aligner.from_pretrained(out / "aligner")
    assert torch.equal(aligner.proj_in.weight, state["model.llm_proj.0.weight"].bfloat16().float())
    assert torch.equal(aligner.norm.weight, state["model.llm_proj.3.weight"].bfloat16().float())
    # The converted aligner equals ThinkDiff's module: Linear -> GELU -> Linear -> T5LayerNorm (eps 1e-6).
    x = torch.randn(3, 128)
    h = torch.nn.functional.linear(x, aligner.proj_in.weight, aligner.proj_in.bias)
    h = torch.nn.functional.linear(torch.nn.functional.gelu(h), aligner.proj_out.weight, aligner.proj_out.bias)
    want = aligner.norm.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    assert torch.allclose(aligner(x), want, atol=1e-5)

    pipe = ThinkDiffPipeline.from_pretrained(out, ["vlm.device=cpu", "decoder.device=cpu", "vlm.dtype=float32",
                                                   "decoder.dtype=float32", "vlm.max_new_tokens=4",
                                                   "vlm.min_new_tokens=4"])
    assert pipe.aligner.config.embed == "predicting"
    result = pipe("Describe <image> this.", images=[image], num_inference_steps=1, height=64, width=64,
                  progress=False)
    hs = result.hidden_states[0]
    rows = hs.embed(pipe.engine.num_layers, "predicting")  # the state that predicted answer token j
    assert rows.shape == hs.output_embed[pipe.engine.num_layers].shape
    assert torch.equal(rows[0], hs.input_embed[pipe.engine.num_layers][-1])
    assert torch.equal(rows[1:], hs.output_embed[pipe.engine.num_layers][:-1])


def test_clip_checkpoint_converts_its_aligner_and_says_what_is_missing(tmp_path):
    from thinkdiff.pipeline import ThinkDiffPipeline

    ckpt = release(tmp_path / "thinkdiff_clip.pth", projector("vision_proj", 1408))
    assert main(["convert-thinkdiff", str(ckpt), str(tmp_path / "clip")]) == 0
    assert Aligner.from_pretrained(tmp_path / "clip" / "aligner").config.input_dim == 1408
    with pytest.raises(ValueError, match="ThinkDiff-CLIP's image path .* is not built"):
        ThinkDiffPipeline.from_pretrained(tmp_path / "clip")


def test_bad_checkpoints_get_clear_errors(tmp_path, capsys):
    none = release(tmp_path / "none.pth", {"x.0.weight": torch.zeros(4096, 8)})
    assert main(["convert-thinkdiff", str(none), str(tmp_path / "a")]) == 2
    assert "No ThinkDiff projector" in capsys.readouterr().err
    two = release(tmp_path / "two.pth", {**projector("a", 16), **projector("b", 16, seed=1)})
    assert main(["convert-thinkdiff", str(two), str(tmp_path / "b")]) == 2
    assert "2 tensor groups look like ThinkDiff's projector: a, b" in capsys.readouterr().err

    class Payload:  # a pickle that would run code: refused, never executed
        def __reduce__(self):
            return (print, ("unpickled!",))

    torch.save({"model": Payload()}, tmp_path / "evil.pth")
    assert main(["convert-thinkdiff", str(tmp_path / "evil.pth"), str(tmp_path / "c")]) == 2
    captured = capsys.readouterr()
    assert "weights_only=True" in captured.err and "unpickled!" not in captured.out
    assert main(["convert-thinkdiff", str(tmp_path / "missing.pth"), str(tmp_path / "d")]) == 2
    assert "Mifucius/ThinkDiff" in capsys.readouterr().err
