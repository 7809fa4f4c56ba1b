import pytest

from thinkdiff.config import InferenceConfig, apply_overrides, from_dict, load_config


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vlm:\n  model: tiny:llama\nseed: 1\n")
    config = load_config(InferenceConfig, path, ["seed=7", "decoder.guidance_scale=2.5", "vlm.system=null",
                                                 "aligner.path=/x/y", "vlm.do_sample=true"])
    assert config.seed == 7 and config.decoder.guidance_scale == 2.5 and config.vlm.model == "tiny:llama"
    assert config.vlm.system is None and config.aligner.path == "/x/y" and config.vlm.do_sample is True


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown config key vlm.'layers'"):
        from_dict(InferenceConfig, {"vlm": {"layers": 3}})
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides({}, ["seed"])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(InferenceConfig, tmp_path / "none.yaml")


def test_training_configs_parse():
    from pathlib import Path

    from thinkdiff.config import AlignTrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("align_tiny.yaml", "align_llama32_vision_flux.yaml"):
        cfg = load_config(AlignTrainConfig, root / name)
        assert cfg.stage == "align" and cfg.objective.name == "t5_decoder"
    real = load_config(AlignTrainConfig, root / "align_llama32_vision_flux.yaml")
    assert real.optim.lr == 1e-4 and real.optim.warmup_steps == 2000 and real.train.batch_size == 96
