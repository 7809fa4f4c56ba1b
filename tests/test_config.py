import subprocess
import sys
from pathlib import Path

import pytest

from thinkdiff.config import (
    AlignTrainConfig,
    GRPOTrainConfig,
    InferenceConfig,
    RareExperimentConfig,
    apply_overrides,
    load_config,
    load_training_config,
    read_yaml,
)
from thinkdiff.errors import ConfigError, MissingFileError
from thinkdiff.eval.config import CobsatEvalConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("vlm:\n  model: tiny:llama\nseed: 1\n")
    config = load_config(InferenceConfig, path, ["seed=7", "decoder.guidance_scale=2.5", "vlm.system=null",
                                                 "aligner.path=/x/y", "vlm.do_sample=true", "vlm.temperature=3e-1"])
    assert config.seed == 7 and config.decoder.guidance_scale == 2.5 and config.vlm.model == "tiny:llama"
    assert config.vlm.system is None and config.aligner.path == "/x/y" and config.vlm.do_sample is True
    assert config.vlm.temperature == 0.3  # YAML reads 3e-1 (no dot) as a string; the config converts it


# (config class, overrides, what the one-line error must say)
BAD = [
    (InferenceConfig, ["vlm.layers=3"], "unknown key 'vlm.layers'; valid keys here: ['backend'"),
    (InferenceConfig, ["decoder.pooled=zero"], "decoder.pooled='zero': choose 'zeros', 'empty_prompt' or 'none'"),
    (InferenceConfig, ["decoder.family=dalle"], "decoder.family='dalle': choose 'flux'"),
    (InferenceConfig, ["decoder.offload=gpu"], "decoder.offload='gpu'"),
    (InferenceConfig, ["vlm.backend=tgi"], "vlm.backend='tgi'"),
    (InferenceConfig, ["vlm.dtype=fp8"], "vlm.dtype='fp8'"),
    (InferenceConfig, ["aligner.embed=last"], "aligner.embed='last'"),
    (InferenceConfig, ["vlm.max_new_tokens=1.5"], "vlm.max_new_tokens=1.5: input should be a valid integer"),
    (InferenceConfig, ["vlm.max_new_tokens=0"], "vlm.max_new_tokens=0: input should be greater than or equal to 1"),
    (InferenceConfig, ["vlm.system=5"], "vlm.system=5: input should be a valid string"),
    (InferenceConfig, ["vlm.do_sample=maybe"], "vlm.do_sample='maybe': input should be a valid boolean"),
    (InferenceConfig, ["seed=x"], "seed='x': input should be a valid integer"),
    (InferenceConfig, ["decoder.height=-3"], "decoder.height=-3"),
    (InferenceConfig, ["vlm.min_new_tokens=64", "vlm.max_new_tokens=8"], "min_new_tokens=64 exceeds max_new_tokens=8"),
    (InferenceConfig, ["vlm.top_p=1.5"], "vlm.top_p=1.5"),
    (InferenceConfig, ["decoder=3"], "decoder=3"),
    (AlignTrainConfig, ["optim.betas=[0.9]"], "optim.betas[1] is missing"),
    (AlignTrainConfig, ["objective.name=mse"], "objective.name='mse': choose 't5_decoder', 'diffusion' or"),
    (AlignTrainConfig, ["train.mixed_precision=fp8"], "train.mixed_precision='fp8'"),
    (AlignTrainConfig, ["data.prompts=[]"], "data.prompts=[]"),
    (AlignTrainConfig, ["train.batch_size=0"], "train.batch_size=0"),
    (GRPOTrainConfig, ["reward.judge=gpt"], "reward.judge: 'gpt' is not a judge; choose one of embedding, engine"),
    (GRPOTrainConfig, ["train.group_size=1"], "train.group_size=1"),
    (GRPOTrainConfig, ["loss.aggregation=sum"], "loss.aggregation='sum'"),
    (GRPOTrainConfig, ["rollout_backend=sglang"], "rollout_backend='sglang'"),
    (CobsatEvalConfig, ["cobsat.method=dalle"], "cobsat.method='dalle'"),
    (CobsatEvalConfig, ["cobsat.shots=[2, 9]"], "cobsat.shots[1]=9"),
    (CobsatEvalConfig, ["judge.flip_prob=2"], "judge.flip_prob=2"),
]


@pytest.mark.parametrize("cls,overrides,message", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_a_bad_value_is_one_line_naming_its_key(cls, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(cls, None, overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_files_and_syntax(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["seed"])
    with pytest.raises(MissingFileError, match="not found"):
        load_config(InferenceConfig, tmp_path / "none.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("vlm:\n  model: tiny:llama\n   backend: vllm\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML \(line 3, column 11"):
        load_config(InferenceConfig, broken)
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="a config is a mapping"):
        load_config(InferenceConfig, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        apply_overrides({}, ["vlm.model=[unclosed"])


def test_training_configs_pick_their_class_by_stage(tmp_path):
    for name in ("align_tiny.yaml", "align_llama32_vision_flux.yaml"):
        cfg = load_training_config(ROOT / "configs" / name)
        assert isinstance(cfg, AlignTrainConfig) and cfg.stage == "align" and cfg.objective.name == "t5_decoder"
    real = load_training_config(ROOT / "configs" / "align_llama32_vision_flux.yaml")
    assert real.optim.lr == 1e-4 and real.optim.warmup_steps == 2000 and real.train.batch_size == 96
    assert isinstance(load_training_config(ROOT / "configs" / "grpo_tiny.yaml"), GRPOTrainConfig)
    with pytest.raises(ConfigError, match="stage='rlhf': choose one of align, grpo"):
        load_training_config(ROOT / "configs" / "align_tiny.yaml", ["stage=rlhf"])
    # A GRPO key in an align config is an unknown key, not silently ignored.
    with pytest.raises(ConfigError, match="unknown key 'lora_rank'"):
        load_training_config(ROOT / "configs" / "align_tiny.yaml", ["lora_rank=8"])


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        if path.name.startswith("eval_cobsat"):
            load_config(CobsatEvalConfig, path)
        elif path.name.startswith(("align", "grpo")):
            load_training_config(path)
        elif path.name.startswith("rare"):
            quick = load_config(RareExperimentConfig, path, read_yaml(path)["quick"])
            assert quick.seeds == [0] and load_config(RareExperimentConfig, path).seeds == [0, 1, 2]
        else:
            load_config(InferenceConfig, path)


@pytest.mark.parametrize("command", [
    ["infer.py", "decoder.pooled=zero"],
    ["train.py", "--config", "configs/align_tiny.yaml", "optim.betas=[0.9]"],
    ["-m", "thinkdiff", "eval-cobsat", "--config", "configs/eval_cobsat_tiny.yaml", "--out", "x", "cobsat.n=0"],
])
def test_entry_points_print_one_line_before_loading_models(command):
    run = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr


def test_only_user_errors_become_one_line():
    """A ThinkDiffUserError is one line and exit status 2; any other exception, ValueError included, is a bug and
    keeps its traceback."""
    from thinkdiff.user_errors import exit_status

    def user():
        raise ConfigError("decoder.pooled='zero': choose 'zeros', 'empty_prompt' or 'none'.")

    def bug():
        raise ValueError("shapes do not match inside a library")

    assert exit_status(user) == 2
    with pytest.raises(ValueError, match="inside a library"):
        exit_status(bug)
