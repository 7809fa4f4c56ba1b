import json

import pytest
import torch
import torch.nn.functional as F

from thinkdiff.aligner import Aligner, AlignerConfig


def make(h=32, d=64, **kw):
    torch.manual_seed(0)
    return Aligner(AlignerConfig(input_dim=h, output_dim=d, **kw))


def test_forward_matches_hand_computation():
    aligner = make()
    with torch.no_grad():
        aligner.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32)
    h = F.linear(F.gelu(F.linear(x, aligner.proj_in.weight, aligner.proj_in.bias)),
                 aligner.proj_out.weight, aligner.proj_out.bias)
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * aligner.norm.weight
    out = aligner(x)
    assert out.shape == (2, 5, 64)
    assert torch.allclose(out, ref, atol=1e-5)
    assert aligner(x[0]).shape == (5, 64)


def test_parameter_count_matches_thinkdiff():
    """ThinkDiff's aligner for Qwen2-VL-7B (hidden 3584) into T5-XXL's 4096 has 31,469,568 parameters."""
    aligner = Aligner(AlignerConfig(input_dim=3584, output_dim=4096))
    assert sum(p.numel() for p in aligner.parameters()) == 31_469_568


def test_save_and_reload_roundtrip(tmp_path):
    aligner = make(layer=2, embed="both")
    aligner.save_pretrained(tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["layer"] == 2 and config["embed"] == "both" and config["input_dim"] == 32
    loaded = Aligner.from_pretrained(tmp_path / "a")
    x = torch.randn(1, 3, 32)
    assert torch.equal(aligner(x), loaded(x))


def test_init_norm_from_text_encoder_norm():
    aligner = make()
    norm = torch.nn.RMSNorm(64)
    with torch.no_grad():
        norm.weight.fill_(0.25)
    aligner.init_norm_from(norm)
    assert torch.equal(aligner.norm.weight, norm.weight)
    with pytest.raises(ValueError, match="does not fit"):
        aligner.init_norm_from(torch.ones(10))


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="width 32, got 16"):
        make()(torch.randn(1, 2, 16))
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        Aligner.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="embed must be one of"):
        AlignerConfig(input_dim=1, output_dim=1, embed="hidden")
