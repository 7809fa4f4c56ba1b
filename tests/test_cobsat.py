"""CoBSAT harness: protocol fidelity against transcriptions of CoBSAT's own code, scoring semantics, mini-CoBSAT with
the oracle judge, resumability, crash isolation, text-bridge, judges, and an end-to-end run on tiny models."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from thinkdiff.config import apply_overrides, from_dict
from thinkdiff.eval import cobsat
from thinkdiff.eval.cobsat import (
    ITEM_DICT,
    TASKS,
    build_samples,
    format_prompt,
    judge_questions,
    parse_option,
    prompt_lists,
    score,
)
from thinkdiff.eval.config import CobsatEvalConfig
from thinkdiff.eval.generators import Generation, Method, OracleMethod
from thinkdiff.eval.harness import CobsatRun, load_records, run_cobsat
from thinkdiff.eval.judges import OracleJudge, llava_v1_prompt
from thinkdiff.eval.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "eval_cobsat_tiny.yaml"

# sha256 of CoBSAT's committed load_datasets/prompts_list_default.json (UW-Madison-Lee-Lab/CoBSAT @ a787be5),
# serialised with json.dumps(..., separators=(",", ":")), and three of its entries verbatim.
COBSAT_LISTS_SHA256 = "2b9bb57fa0fbef66772c9c875434507619a088f331a97bc671547dfc1f2d5af1"
COBSAT_LISTS_ENTRIES = {
    0: {"x_list": [8, 7, 5, 9, 2, 3, 6, 1, 4, 0], "theta_list": [7, 6, 3, 4, 1, 0, 2, 5, 9, 8]},
    1: {"x_list": [7, 4, 3, 6, 2, 1, 0, 8, 5, 9], "theta_list": [3, 4, 8, 1, 9, 2, 7, 6, 5, 0]},
    999: {"x_list": [2, 0, 5, 7, 6, 9, 3, 8, 4, 1], "theta_list": [1, 6, 7, 3, 2, 9, 8, 4, 0, 5]},
}


# ------------------------------------------------------------------ transcriptions of CoBSAT's code (a787be5)

def cobsat_find_image(root_dir, task_id, x_idx, theta):  # helper.find_image, minus the existence check
    task_type = TASKS[task_id].task_type
    category_space = {}
    category_space["detail"], category_space["obj"] = task_type.split("_")
    item_info = {}
    if TASKS[task_id].x_space in ["object", "animal"]:
        item_info["obj"] = TASKS[task_id].x_list[x_idx]
        item_info["detail"] = theta
    else:
        item_info["obj"] = theta
        item_info["detail"] = TASKS[task_id].x_list[x_idx]
    folder_path = f"{root_dir}/datasets/{category_space['detail']}_{item_info['obj']}"
    return f"{folder_path}/{item_info['detail']}_{item_info['obj']}.jpg"


def cobsat_load_inputs(root_dir, shot, task_id, x_idxs, theta_idxs, x_list, theta_list):  # prompt_type 'default'
    text_inputs, image_inputs = [], []
    theta = theta_list[theta_idxs[shot + 1]]
    x_demos = []
    for demo_idx in range(shot + 1):
        x_idx = x_list[x_idxs[demo_idx]]
        x_idx = cobsat.ITEM2WORD.get(x_idx, x_idx)
        x_demos.append(x_idx)
        text_inputs.append(f"{x_idx}: ")
        if demo_idx < shot:
            image_inputs.append(cobsat_find_image(root_dir, task_id, x_idxs[demo_idx], theta))
    return {"text_inputs": text_inputs, "image_inputs": image_inputs, "x_list": x_demos,
            "theta": theta_list[theta_idxs[shot + 1]]}


def cobsat_ground_truth(task_id, input_dict):  # evaluation_icl.eval + check_single_output
    if TASKS[task_id].x_space in ["animal", "object"]:
        type_dict = {"x": "obj", "theta": "detail", "obj": "x", "detail": "theta"}
    else:
        type_dict = {"x": "detail", "theta": "obj", "obj": "theta", "detail": "x"}
    input_dict = dict(input_dict, x=input_dict["x_list"][-1])
    gt = {"detail": input_dict[type_dict["detail"]], "obj": input_dict[type_dict["obj"]]}
    detail_space, obj_space = TASKS[task_id].task_type.split("_")
    item_list = {"obj": ITEM_DICT[obj_space], "detail": ITEM_DICT[detail_space]}
    return {m: item_list[m].index(cobsat.WORD2ITEM.get(gt[m], gt[m])) + 1 for m in ("detail", "obj")}


def cobsat_get_eval_prompt(category_space, item_list):  # evaluation_icl.get_eval_prompt, mode 'image'
    prompts = {
        "detail": f"What is the {category_space['detail']} (of the main object) in this image? Answer from the "
                  "following options: ",
        "obj": "What is the main object in this image? Answer from the following options: ",
    }
    for mode in prompts:
        for i, item in enumerate(item_list[mode]):
            prompts[mode] += f" ({i+1}){cobsat.ITEM2WORD.get(item, item)}"
        prompts[mode] += ". Answer the number only and do not include any other texts (e.g., 1)."
    return prompts


def cobsat_parse(response, n=10):  # evaluation_icl.eval_model
    response_number = "".join(filter(str.isdigit, response))
    if response_number:
        if int(response_number) in list(range(1, n + 1)):
            return int(response_number)
        return -1
    return -1


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from thinkdiff.eval.mini_cobsat import write_mini_cobsat

    return write_mini_cobsat(tmp_path_factory.mktemp("cobsat") / "mini")


def make_config(root, *overrides, base=None) -> CobsatEvalConfig:
    import yaml

    data = yaml.safe_load(Path(base).read_text()) if base else {}
    cfg = from_dict(CobsatEvalConfig, apply_overrides(data, [f"cobsat.root={root}", "cobsat.sheets=false",
                                                             *overrides]))
    return cfg


# ------------------------------------------------------------------------------------------------ protocol

def test_sampling_reproduces_cobsat_lists(tmp_path):
    lists = prompt_lists()
    assert len(lists) == 1000
    assert hashlib.sha256(json.dumps(lists, separators=(",", ":")).encode()).hexdigest() == COBSAT_LISTS_SHA256
    for i, entry in COBSAT_LISTS_ENTRIES.items():
        assert lists[i] == entry
    # A committed file that differs from the seed-123 lists is refused.
    (tmp_path / "load_datasets").mkdir()
    bad = [dict(e) for e in lists]
    bad[3] = {"x_list": list(range(10)), "theta_list": list(range(10))}
    (tmp_path / "load_datasets" / "prompts_list_default.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="differs from CoBSAT's seed-123 lists"):
        cobsat.load_prompt_lists(tmp_path)


def test_samples_equal_cobsat_load_inputs_for_every_task_and_shot():
    lists = prompt_lists()
    for task_id, task in TASKS.items():
        for shot in (2, 4, 6, 8):
            for s in build_samples("/r", task_id, shot, 1000, lists):
                ref = cobsat_load_inputs("/r", shot, task_id, lists[s.index]["x_list"], lists[s.index]["theta_list"],
                                         task.x_list, task.theta_list)
                assert s.text_inputs == ref["text_inputs"]
                assert s.image_paths == ref["image_inputs"]
                assert s.x_words == ref["x_list"] and s.theta == ref["theta"]
                assert s.save_path == f"{s.index}_{ref['theta']}_{'_'.join(ref['x_list'])}"
                labels = cobsat_ground_truth(task_id, ref)
                assert (s.true_label_detail, s.true_label_obj) == (labels["detail"], labels["obj"])


def test_sample_by_hand_and_formatters():
    s = build_samples("/r", 5, 2, 1)[0]  # Style-I: x = style, theta = object; entry 0 has style[8] = "3d"
    assert s.theta == "car" and s.x_items == ["3d", "futuristic", "icon"]
    assert s.x_words == ["wireframe", "futuristic", "icon"]
    assert s.save_path == "0_car_wireframe_futuristic_icon"
    assert s.image_paths == ["/r/datasets/style_car/3d_car.jpg", "/r/datasets/style_car/futuristic_car.jpg"]
    assert (s.gt_detail, s.gt_obj, s.true_label_detail, s.true_label_obj) == ("icon", "car", 6, 5)
    assert format_prompt(s, "cobsat") == "wireframe: <image>futuristic: <image>icon: "
    assert format_prompt(s, "thinkdiff") == (
        "I give you several words and pictures. First, please analyse what the next picture is. Then give me a "
        "detailed diffusion prompt to describe the next picture. Please only provide me the detailed prompt and "
        "start the answer with 'Create an image'.\n\nWord 1: wireframe, <image>\n\nWord 2: futuristic, <image>"
        "\n\nWord 3: icon, ")
    assert format_prompt(s, "thinkdiff", instruction="Q\n\n", vision_ids=True) == (
        "Q\n\nWord 1: wireframe, Picture 1: <image>\n\nWord 2: futuristic, Picture 2: <image>\n\nWord 3: icon, ")
    s6 = build_samples("/r", 6, 4, 1)[0]  # Style-II: x = object, theta = style
    assert s6.save_path == "0_watercolor_bag_ball_box_apple_cup"
    assert s6.image_paths[0] == "/r/datasets/style_bag/watercolor_bag.jpg"
    with pytest.raises(ValueError, match="shot must be in 1..8"):
        build_samples("/r", 1, 9, 1)


def test_judge_prompts_equal_cobsat_byte_for_byte():
    assert judge_questions(TASKS[1])["detail"] == (
        "What is the color (of the main object) in this image? Answer from the following options:  (1)yellow "
        "(2)white (3)red (4)purple (5)pink (6)orange (7)green (8)brown (9)blue (10)black. Answer the number only "
        "and do not include any other texts (e.g., 1).")
    assert judge_questions(TASKS[4])["detail"] == (
        "What is the background (of the main object) in this image? Answer from the following options:  (1)beach "
        "(2)desert (3)glacier (4)volcano (5)amusement park (6)gym (7)waterfall (8)space (9)cave (10)seafloor. "
        "Answer the number only and do not include any other texts (e.g., 1).")
    assert judge_questions(TASKS[7])["obj"] == (
        "What is the main object in this image? Answer from the following options:  (1)zebra (2)tiger (3)sheep "
        "(4)pig (5)monkey (6)lion (7)dog (8)cow (9)cat (10)bird. Answer the number only and do not include any "
        "other texts (e.g., 1).")
    for task in TASKS.values():
        detail_space, obj_space = task.task_type.split("_")
        ref = cobsat_get_eval_prompt({"detail": detail_space, "obj": obj_space},
                                     {"detail": ITEM_DICT[detail_space], "obj": ITEM_DICT[obj_space]})
        ours = judge_questions(task)
        assert list(ours) == ["detail", "obj"]
        assert all(ours[m].encode() == ref[m].encode() for m in ref)
        assert "options:  (1)" in ours["detail"] and len(ours["detail"]) < cobsat.QUESTION_MAX_CHARS


TRICKY = ["1", "10", "0", "11", "", "   ", "(3)", "3.", "The answer is 7.", "1 or 2", "2, 3", "(2) white", "007",
          "The 2nd option (2)", "Option 4\n", "٣", "四", "four", "-5", "5/10", "1e1", "10.", " 9 ",
          "Answer: (10)black"]


def test_parser_matches_cobsat_on_tricky_replies():
    for reply in TRICKY:
        assert parse_option(reply) == cobsat_parse(reply), reply
    assert parse_option("1 or 2") == -1 and parse_option("007") == 7 and parse_option("٣") == 3
    # Where CoBSAT's int() raises (a digit that is not decimal), we answer -1 instead of crashing.
    with pytest.raises(ValueError):
        cobsat_parse("²")
    assert parse_option("²") == -1 and parse_option(None) == -1


def test_score_needs_both_checks_and_a_missing_image_is_wrong():
    s1 = build_samples("/r", 1, 2, 1)[0]  # Color-I: detail = x (textual), obj = theta (visual)
    good = score(s1, {"detail": str(s1.true_label_detail), "obj": f"({s1.true_label_obj})"})
    assert good.correct and good.check_textual and good.check_visual and not good.missing
    half = score(s1, {"detail": str(s1.true_label_detail), "obj": "1 or 2"})
    assert not half.correct and half.check_textual and not half.check_visual and half.answer_obj == -1
    s2 = build_samples("/r", 2, 2, 1)[0]  # Color-II: obj = x (textual), detail = theta (visual)
    v = score(s2, {"detail": str(s2.true_label_detail), "obj": "99"})
    assert v.check_visual and not v.check_textual
    missing = score(s1, None)
    assert missing.missing and not (missing.correct or missing.check_detail or missing.check_obj)


def test_summary_mean_is_the_unweighted_task_mean():
    def rec(shot, task, i, ok, **kw):
        return {"shot": shot, "task_id": task, "index": i, "correct": ok, "check_detail": ok, "check_obj": ok,
                "check_textual": ok, "check_visual": ok, "missing": False, "error": None, **kw}

    records = [rec(2, 1, i, i < 3) for i in range(4)]  # 3/4
    records += [rec(2, 2, i, i < 1) for i in range(3)]  # 1/4: sample 3 was never recorded -> wrong
    records += [rec(2, 3, i, False, missing=True) for i in range(4)]  # 0/4, all missing
    records += [rec(2, 1, 7, True)]  # beyond n: ignored
    s = summarize(records, [2], [1, 2, 3], n=4)["shots"][2]
    assert [s["tasks"][t]["overall"] for t in (1, 2, 3)] == [0.75, 0.25, 0.0]
    assert s["mean"]["overall"] == pytest.approx((0.75 + 0.25 + 0.0) / 3)
    assert s["tasks"][2]["recorded"] == 3 and s["tasks"][2]["missing"] == 1 and not s["complete"]
    assert s["tasks"][3]["missing"] == 4 and not s["all_tasks"]


# ------------------------------------------------------------------------------------------- mini-CoBSAT

def test_mini_cobsat_layout_and_oracle_judge(mini):
    files = sorted((mini / "datasets").glob("*/*.jpg"))
    assert len(files) == 500
    assert (mini / "datasets" / "style_car" / "3d_car.jpg").is_file()
    assert (mini / "datasets" / "background_zebra" / "park_zebra.jpg").is_file()
    assert len((mini / "datasets" / "color_object.csv").read_text().splitlines()) == 101
    assert json.loads((mini / "load_datasets" / "prompts_list_default.json").read_text()) == prompt_lists()
    cobsat.check_dataset(mini, list(TASKS))
    judge = OracleJudge(mini)
    for task_id in (1, 2, 3, 6, 7, 10):  # every theme, both sides
        task = TASKS[task_id]
        questions = judge_questions(task)
        for s in build_samples(mini, task_id, 2, 5):
            with Image.open(cobsat.image_path(mini, task, s.query_x, s.theta)) as im:
                v = score(s, {m: judge.ask(im, q) for m, q in questions.items()})
            assert v.correct, (task_id, s.save_path)
    verbose = OracleJudge(mini, reply="I think it is ({n}) {word}.")
    with Image.open(mini / "datasets" / "color_car" / "red_car.jpg") as im:
        assert verbose.ask(im, judge_questions(TASKS[1])["detail"]) == "I think it is (3) red."
        assert parse_option(verbose.ask(im, judge_questions(TASKS[1])["obj"])) == 5


def test_missing_dataset_says_what_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="datasets.zip"):
        CobsatRun(make_config(tmp_path / "nowhere"), tmp_path / "run")
    (tmp_path / "partial" / "datasets" / "color_car").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="incomplete: 100 images are missing"):
        CobsatRun(make_config(tmp_path / "partial", "cobsat.tasks=[1]"), tmp_path / "run")


def test_oracle_scores_one_and_random_about_one_percent(mini, tmp_path):
    oracle = run_cobsat(make_config(mini, "cobsat.method=oracle", "judge.kind=oracle", "cobsat.n=10",
                                    "cobsat.sheets=true", "cobsat.sheet_rows=3"), tmp_path / "oracle", progress=False)
    for shot in (2, 4):
        block = oracle["summary"]["shots"][shot]
        assert block["mean"]["overall"] == 1.0 and block["complete"] and block["all_tasks"]
    assert (tmp_path / "oracle" / "sheets" / "shot_4_task_10.png").is_file()
    md = (tmp_path / "oracle" / "summary.md").read_text()
    assert "| ThinkDiff-LVLM (published) | 0.638 | 0.362 | 0.254 | 0.434 | 0.317 | 0.610 | 0.590 | 0.432 | " \
           "0.664 | 0.332 | 0.463 |" in md
    assert "| SEED-LLaMA (published) |" in md and "**oracle (this run)**" in md
    jpg = tmp_path / "oracle" / "results/exps/oracle_image/shot_2/default/task_1/0_car_blue_brown_orange.jpg"
    side = json.loads(jpg.with_suffix(".json").read_text())
    assert jpg.is_file() and set(side) == {"description", "text_inputs", "image_inputs", "time"}

    rnd = run_cobsat(make_config(mini, "cobsat.method=random", "judge.kind=oracle", "cobsat.n=100"),
                     tmp_path / "random", progress=False)
    means = [rnd["summary"]["shots"][s]["mean"]["overall"] for s in (2, 4)]
    assert all(0.002 <= m <= 0.025 for m in means), means  # chance is 1/100
    tasks = rnd["summary"]["shots"][2]["tasks"]
    assert means[0] == pytest.approx(sum(t["overall"] for t in tasks.values()) / 10)


class Flaky(Method):
    """Oracle images, except: index 1 has no image, index 2 raises inside the method."""

    name = "flaky"

    def __init__(self, root, broken=True):
        self.oracle, self.broken, self.calls = OracleMethod(root), broken, 0

    def generate(self, samples, prompts):
        self.calls += len(samples)
        out = []
        for s in samples:
            if self.broken and s.index == 2:
                raise RuntimeError("decoder exploded")
            out.append(Generation(None, error="no image") if self.broken and s.index == 1 else
                       self.oracle.generate([s], [""])[0])
        return out


def test_missing_image_and_crash_count_wrong_run_goes_on_and_resume_retries(mini, tmp_path):
    cfg = make_config(mini, "cobsat.method=oracle", "judge.kind=oracle", "cobsat.n=4", "cobsat.tasks=[3]",
                      "cobsat.shots=[2]", "cobsat.batch_size=2")
    out = run_cobsat(cfg, tmp_path / "run", method=Flaky(mini), judge=OracleJudge(mini), progress=False)
    task = out["summary"]["shots"][2]["tasks"][3]
    assert task["overall"] == 0.5 and task["n"] == 4 and task["missing"] == 2 and task["errors"] == 2
    recs = {r["index"]: r for r in load_records(tmp_path / "run" / "records.jsonl")}
    assert recs[1]["missing"] and recs[1]["error"] == "no image" and recs[1]["image_path"] is None
    assert recs[2]["missing"] and "decoder exploded" in recs[2]["error"] and not recs[2]["correct"]
    assert recs[0]["correct"] and recs[3]["correct"]
    # Re-run with a working method: only the two failed samples run again; one record per sample remains.
    fixed = Flaky(mini, broken=False)
    out = run_cobsat(cfg, tmp_path / "run", method=fixed, judge=OracleJudge(mini), progress=False)
    assert fixed.calls == 2 and out["summary"]["shots"][2]["mean"]["overall"] == 1.0
    lines = (tmp_path / "run" / "records.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["index"] for line in lines) == [0, 1, 2, 3]
    # Another method in the same folder is refused.
    with pytest.raises(ValueError, match="different settings"):
        run_cobsat(make_config(mini, "cobsat.method=random", "judge.kind=oracle", "cobsat.tasks=[3]"),
                   tmp_path / "run", progress=False)


def test_resume_judges_an_image_already_on_disk(mini, tmp_path):
    cfg = make_config(mini, "cobsat.method=oracle", "judge.kind=oracle", "cobsat.n=2", "cobsat.tasks=[9]",
                      "cobsat.shots=[2]")
    run_cobsat(cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / "records.jsonl").unlink()  # as if the run died after drawing, before recording
    method = Flaky(mini, broken=False)
    out = run_cobsat(cfg, tmp_path / "run", method=method, judge=OracleJudge(mini), progress=False)
    assert method.calls == 0 and out["summary"]["shots"][2]["mean"]["overall"] == 1.0
    assert all(r["reused_image"] for r in load_records(tmp_path / "run" / "records.jsonl"))


def test_judge_agreement_pairs_the_same_images(mini, tmp_path):
    """A second judge over the first run's images (copied results): agreement equals a recount of the records;
    runs over different images are refused."""
    import shutil

    from thinkdiff.eval.agreement import judge_agreement

    cfg = ["cobsat.method=random", "cobsat.n=30", "cobsat.tasks=[1,6]", "cobsat.shots=[2]", "cobsat.sheets=false"]
    run_cobsat(make_config(mini, *cfg, "judge.kind=oracle"), tmp_path / "a", progress=False)
    shutil.copytree(tmp_path / "a" / "results", tmp_path / "b" / "results")
    run_cobsat(make_config(mini, *cfg, "judge.kind=oracle", "judge.flip_prob=0.3"), tmp_path / "b", progress=False)
    a = {r["key"]: r for r in load_records(tmp_path / "a" / "records.jsonl")}
    b = {r["key"]: r for r in load_records(tmp_path / "b" / "records.jsonl")}
    assert all(r["reused_image"] for r in b.values()) and len(a) == len(b) == 60
    same = [a[k][f"answer_{q}"] == b[k][f"answer_{q}"] for k in a for q in ("detail", "obj")]
    got = judge_agreement(tmp_path / "a", tmp_path / "b")
    assert got["samples"] == 60 and got["answers_agree"] == sum(same) / 120
    assert 0.5 < got["answers_agree"] < 0.9  # each answer flips with probability 0.3
    assert got["judge_a"] == "oracle" and got["judge_b"] == "oracle(flip=0.3)"
    run_cobsat(make_config(mini, *cfg, "judge.kind=oracle", "seed=7"), tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="different images"):
        judge_agreement(tmp_path / "a", tmp_path / "c")


# ------------------------------------------------------------------------------------------ tiny models

def test_end_to_end_tiny_models_and_resume(mini, tmp_path, capsys):
    """2 tasks x 2 shots x 2 samples: tiny Mllama -> aligner -> tiny FLUX, tiny Mllama judging via the engine."""
    from thinkdiff.__main__ import main

    run = tmp_path / "run"
    argv = ["eval-cobsat", "--config", str(TINY_CONFIG), "--root", str(mini), "--tasks", "1", "8", "--shots", "2",
            "4", "--n", "2", "--method", "thinkdiff", "--judge", "engine", "--quiet", "--out", str(run)]
    assert main(argv) == 0
    assert "ThinkDiff-LVLM (published)" in capsys.readouterr().out
    records = load_records(run / "records.jsonl")
    assert len(records) == 8 and {(r["shot"], r["task_id"]) for r in records} == {(2, 1), (2, 8), (4, 1), (4, 8)}
    for r in records:
        assert r["error"] is None and not r["missing"] and r["image_sha1"]
        assert (run / r["image_path"]).is_file() and r["image_path"].endswith(f"{r['save_path']}.jpg")
        assert r["judge"] == "engine:transformers:tiny:mllama" and r["prompt_detail"].startswith("What is the")
        assert isinstance(r["vlm_text"], str) and r["response_detail"] is not None
        assert r["prompt"].count("<image>") == r["shot"] and r["system"] is None
        assert r["t_vlm_s"] > 0 and r["t_decoder_s"] > 0 and r["t_judge_s"] > 0
    with Image.open(run / records[0]["image_path"]) as im:
        assert im.size == (64, 64) and im.format == "JPEG"
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["shots"]) == {"2", "4"} and summary["shots"]["2"]["complete"]
    assert sorted(p.name for p in (run / "sheets").iterdir()) == [
        "shot_2_task_1.png", "shot_2_task_8.png", "shot_4_task_1.png", "shot_4_task_8.png"]
    before = (run / "records.jsonl").read_bytes()
    # Resume: nothing is added, and no model is loaded.
    cfg = make_config(mini, "cobsat.tasks=[1, 8]", "cobsat.n=2", base=TINY_CONFIG)
    again = CobsatRun(cfg, run, progress=False)
    result = again.run()
    assert again._method is None and again._judge is None and result["stats"]["samples"] == 0
    assert (run / "records.jsonl").read_bytes() == before


def test_text_bridge_needs_the_decoders_text_encoders(mini, tmp_path, tiny):
    from diffusers import StableDiffusionPipeline

    from thinkdiff.testing.tiny_models import _clip_text_encoder

    with pytest.raises(ValueError, match="no text_encoder_2, tokenizer_2"):
        run_cobsat(make_config(mini, "cobsat.method=text-bridge", "judge.kind=oracle", base=TINY_CONFIG),
                   tmp_path / "flux", progress=False)
    # A tiny SD1.5 with its CLIP text encoder: the VLM's answer text is drawn through it.
    pipe = StableDiffusionPipeline.from_pretrained(tiny("sd15"), text_encoder=None, tokenizer=None,
                                                   safety_checker=None, feature_extractor=None)
    encoder, tokenizer = _clip_text_encoder(768)
    pipe.register_modules(text_encoder=encoder, tokenizer=tokenizer)
    pipe.save_pretrained(tmp_path / "sd15-clip")
    cfg = make_config(mini, "cobsat.method=text-bridge", "judge.kind=oracle", "cobsat.n=2", "cobsat.tasks=[2]",
                      "cobsat.shots=[2]", "decoder.family=sd15", f"decoder.model={tmp_path / 'sd15-clip'}",
                      "decoder.guidance_scale=null", base=TINY_CONFIG)
    out = run_cobsat(cfg, tmp_path / "sd15", progress=False)
    records = load_records(tmp_path / "sd15" / "records.jsonl")
    assert len(records) == 2 and all(r["error"] is None and r["vlm_text"] is not None for r in records)
    assert records[0]["gen"]["guidance_scale"] == 7.5 and records[0]["t_decoder_s"] > 0
    assert out["summary"]["shots"][2]["tasks"][2]["recorded"] == 2


def make_tiny_llava(out: Path) -> Path:
    """A tiny LLaVA (CLIP vision tower + Llama) with llava-hf's processor layout (PIL image processor)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from thinkdiff.testing.tiny_models import _llama_tokenizer

    tok = _llama_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=1,
                              image_size=28, patch_size=14)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                                      image_token_index=tok.convert_tokens_to_ids("<image>")))
    model.save_pretrained(out)
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                                     crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    processor.save_pretrained(out)
    return out


def test_transformers_judge_uses_llava_v1_conversation(tmp_path):
    from thinkdiff.eval.judges import TransformersJudge, ask_many

    judge = TransformersJudge(make_tiny_llava(tmp_path / "llava"), template="llava_v1", max_new_tokens=3)
    q = judge_questions(TASKS[1])["detail"]
    assert judge.prompt(q) == llava_v1_prompt(q) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\n" + q + " ASSISTANT:")
    images = [Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("RGB", (30, 30), (0, 0, 255))]

    class Recording:  # the processor, recording the images it is given
        def __init__(self, processor):
            self.processor, self.images = processor, []

        def __call__(self, *args, images=None, **kwargs):
            self.images += list(images)
            return self.processor(*args, images=images, **kwargs)

        def __getattr__(self, name):
            return getattr(self.processor, name)

    judge.processor = Recording(judge.processor)
    answers = ask_many(judge, [(images[0], q), (images[1], q)])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # LLaVA-1.5's `image_aspect_ratio: pad`: the 40x20 image is centred on a 40x40 square of CLIP's mean colour
    # (0.48145466, 0.4578275, 0.40821073) -> (123, 117, 104); the square image is passed as it is.
    expected = Image.new("RGB", (40, 40), (123, 117, 104))
    expected.paste(images[0], (0, 10))
    assert judge.processor.images[0].size == (40, 40)
    assert np.array_equal(np.asarray(judge.processor.images[0]), np.asarray(expected))
    assert np.array_equal(np.asarray(judge.processor.images[1]), np.asarray(images[1]))
    assert judge.ask(images[1], q) == answers[1]


class Broken(Method):
    name = "broken"

    def __init__(self):
        self.calls = 0

    def generate(self, samples, prompts):
        self.calls += len(samples)
        raise ValueError("Prompting with images is incompatible with system messages.")


def test_a_run_where_most_samples_fail_stops_with_the_first_error(mini, tmp_path):
    from thinkdiff.eval.harness import EvalFailed

    cfg = make_config(mini, "cobsat.method=oracle", "judge.kind=oracle", "cobsat.n=8", "cobsat.tasks=[1, 2]",
                      "cobsat.shots=[2]", "cobsat.batch_size=2")
    method = Broken()
    with pytest.raises(EvalFailed, match="2 of the first 2 samples failed.*incompatible with system messages"):
        run_cobsat(cfg, tmp_path / "run", method=method, judge=OracleJudge(mini), progress=False)
    assert method.calls == 2 + 2  # the first batch, then its samples one by one; nothing after it
    assert len(load_records(tmp_path / "run" / "records.jsonl")) == 2
