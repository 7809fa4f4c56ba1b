"""The miniature world and the training of its parts."""

import numpy as np
import torch

from thinkdiff.eval.cobsat import IMAGE_MARKER, TASKS, build_samples, prompt_lists
from thinkdiff.eval.mini_cobsat import draw
from thinkdiff.mini.world import answer, caption, drawings, evaluation_keys, jittered, training_sequences


def test_every_drawing_has_its_own_caption():
    captions = [caption(*d) for d in drawings()]
    assert len(drawings()) == 500 and len(set(captions)) == 500
    assert caption("color_object", "green", "car") == "a green car"
    assert answer("background_animal", "beach", "lion") == "Create an image of a lion on a beach."


def test_training_never_repeats_an_evaluation_sample():
    keys = evaluation_keys()
    # Reference: CoBSAT's own samples (build_samples), task 3 at 2 shots, are among the keys.
    lists = prompt_lists()
    for s in build_samples("/nonexistent", 3, 2, n=50, lists=lists):
        assert (3, tuple(s.x_items), s.theta) in keys
    sequences = training_sequences(3000, seed=0)
    assert all((q.task_id, q.x_items, q.theta) not in keys for q in sequences)
    assert {q.shot for q in sequences} == {1, 2, 3, 4, 5} and {q.task_id for q in sequences} == set(TASKS)
    assert training_sequences(10, seed=0) == sequences[:10] and training_sequences(10, seed=1) != sequences[:10]


def test_a_sequence_asks_for_the_query_words_drawing():
    for q in training_sequences(50, seed=2):
        task = TASKS[q.task_id]
        detail, obj = q.pair(q.x_items[-1])
        assert q.answer() == answer(task.task_type, detail, obj)
        assert q.prompt().count(IMAGE_MARKER) == q.shot == len(q.image_pairs())
        # The hidden value is the latent every in-context drawing shares.
        side = 1 if task.x_side == "detail" else 0
        assert all(pair[side] == q.theta for pair in q.image_pairs())


def test_jitter_is_mild_and_reproducible():
    base = np.asarray(draw("color_object", "green", "car"), dtype=float)
    a = jittered("color_object", "green", "car", np.random.default_rng(0))
    b = jittered("color_object", "green", "car", np.random.default_rng(0))
    c = jittered("color_object", "green", "car", np.random.default_rng(1))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert 0 < np.abs(np.asarray(a, dtype=float) - base).mean() < 40


def test_span_corruption_hides_words_behind_sentinels():
    import random

    from thinkdiff.mini.t5 import span_corruption

    ids, sentinels = list(range(10, 20)), [1000, 1001, 1002, 1003]
    source, target = span_corruption(ids, random.Random(0), sentinels)
    hidden = [t for t in target if t not in sentinels]
    assert sorted([s for s in source if s not in sentinels] + hidden) == ids  # every word once, in one of the two
    assert 0 < len(hidden) <= 6 and target[0] == source[source.index(target[0])] == 1000


def test_t5_training_examples_cover_three_tasks_and_reconstruction_writes_the_whole_text():
    import random

    from thinkdiff.mini.t5 import training_example

    ids, sentinels, rng = list(range(10, 18)), [1000, 1001, 1002, 1003], random.Random(0)
    kinds = set()
    for _ in range(300):
        source, target = training_example(ids, rng, sentinels)
        if any(t in sentinels for t in source):
            kinds.add("span")
        elif source == ids:
            kinds.add("reconstruction")
            assert target == ids  # the encoder reads the whole text and the decoder writes all of it back
        else:
            kinds.add("prefix")
            assert source + target == ids and 1 <= len(source) < len(ids)
    assert kinds == {"span", "reconstruction", "prefix"}


def test_mini_t5_learns_and_loads_as_the_objective_s_proxy(tmp_path):
    from transformers import AutoTokenizer

    from thinkdiff.mini.t5 import train_t5
    from thinkdiff.train.objectives import load_t5_decoder

    out, losses = train_t5(tmp_path / "t5", steps=80, batch_size=32, progress=False)
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5]), (losses[:5], losses[-10:])
    again = [train_t5(tmp_path / f"again{i}", steps=6, batch_size=8, progress=False)[1] for i in range(2)]
    assert again[0] == again[1]  # deterministic: same seed, same losses bit for bit
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Create an image of a lion on a beach.").input_ids
    assert ids[-1] == tok.eos_token_id and len(ids) == 11  # T5-like: every text ends with </s>
    assert tok.decode(ids, skip_special_tokens=True) == "create an image of a lion on a beach."
    t5, norm = load_t5_decoder(out)
    assert norm.shape == (128,) and t5.config.d_model == 128


def test_mini_decoder_trains_on_t5_states_and_loads_as_sd15(tmp_path):
    """Short runs of each stage: losses fall; the saved pipeline opens through load_decoder (family sd15) with the
    T5's width as its conditioning and draws from T5 states."""
    from thinkdiff.config import DecoderConfig
    from thinkdiff.decoders import load_decoder
    from thinkdiff.mini.decoder import drawing_pool, exact_drawings, t5_states, train_decoder, train_vae
    from thinkdiff.mini.t5 import train_t5

    t5, _ = train_t5(tmp_path / "t5", steps=40, batch_size=32, progress=False)
    pixels = drawing_pool(1)
    assert pixels.shape == (500, 3, 64, 64) and pixels.min() >= -1 and pixels.max() <= 1
    # The UNet's pictures are CoBSAT's own drawings, one per caption, in the world's order.
    exact = exact_drawings()
    for i in (0, 137, 499):
        reference = torch.from_numpy(np.asarray(draw(*drawings()[i], 64), dtype=np.float32)) / 127.5 - 1.0
        torch.testing.assert_close(exact[i], reference.permute(2, 0, 1), rtol=0, atol=0)
    vae, vae_losses = train_vae(pixels, steps=30, progress=False)
    assert np.mean(vae_losses[-5:]) < 0.5 * vae_losses[0]
    out, losses = train_decoder(tmp_path / "decoder", t5, vae, steps=24, batch_size=16, progress=False)
    assert np.mean(losses[-6:]) < np.mean(losses[:3])
    decoder = load_decoder(DecoderConfig(family="sd15", model=str(out)))
    assert decoder.conditioning_dim == 128
    from transformers import AutoTokenizer, T5EncoderModel

    states = t5_states(T5EncoderModel.from_pretrained(str(t5)), AutoTokenizer.from_pretrained(str(t5)),
                       ["a green car"])[0]
    image = decoder.generate(decoder.make_conditioning(states[None]), height=64, width=64, num_inference_steps=2,
                             progress=False)[0]
    assert image.size == (64, 64)
    # The pipeline's own text path (the text-bridge) is the T5 encoder over the caption, </s> and padding to 16.
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, feature_extractor=None)
    assert isinstance(pipe.text_encoder, T5EncoderModel)
    assert pipe.scheduler.config.prediction_type == "sample"  # the UNet predicts the clean latent
    ids = AutoTokenizer.from_pretrained(str(t5))("a green car", padding="max_length", max_length=16).input_ids
    with torch.no_grad():
        reference = pipe.text_encoder(torch.tensor([ids])).last_hidden_state
        embeds = pipe.encode_prompt("a green car", "cpu", 1, do_classifier_free_guidance=False)[0]
        unpadded = pipe.text_encoder(torch.tensor([ids[:4]])).last_hidden_state[0]  # "a green car </s>"
    assert torch.equal(embeds, reference) and torch.allclose(unpadded, states, atol=1e-6)


def test_mini_vlm_trains_on_cobsat_prompts_and_serves_through_the_engine(tmp_path):
    """A short run: the answer loss falls; the saved Mllama loads in the transformers engine, whose prompt is the
    one it was trained on, and returns generated-token states (what the aligner trains on)."""
    from thinkdiff.eval.cobsat import TASKS
    from thinkdiff.mini.vlm import mini_tokenizer, train_vlm, training_batch
    from thinkdiff.mini.world import jittered
    from thinkdiff.vlm import SamplingConfig, VLMRequest
    from thinkdiff.vlm.transformers_engine import TransformersEngine

    tok = mini_tokenizer()
    assert tok.convert_tokens_to_ids("<|image|>") == len(tok) - 1 and "<unk>" not in tok.tokenize(
        training_sequences(1, seed=5)[0].prompt().replace("<image>", ""))
    out, losses = train_vlm(tmp_path / "vlm", steps=16, batch_size=8, lr=3e-3, vision_steps=4, progress=False)
    assert np.mean(losses[-4:]) < 0.6 * losses[0], losses
    engine = TransformersEngine(out)
    q = training_sequences(1, seed=7)[0]
    rng = np.random.default_rng(0)
    images = [jittered(TASKS[q.task_id].task_type, d, o, rng) for d, o in q.image_pairs()]
    hs = engine.generate([VLMRequest(q.prompt(), images)], [-1], SamplingConfig(max_new_tokens=12))[0]
    batch = training_batch(engine.processor, [q], np.random.default_rng(0))
    prompt_len = int((batch["labels"][0] == -100).sum())
    assert torch.equal(batch["input_ids"][0, :prompt_len], hs.prompt_token_ids)  # trained on the engine's prompt
    assert hs.output_embed[engine.num_layers].shape == (len(hs.output_token_ids), 128)


def test_vision_pretraining_names_drawings_and_leaves_the_language_model_alone(tmp_path):
    """The Mllama's first stage: its vision tower and projector learn to name drawings (loss falls); the language
    model's weights do not move."""
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from thinkdiff.mini.vlm import build_mllama, pretrain_vision

    out = build_mllama(tmp_path / "vlm")
    model = MllamaForConditionalGeneration.from_pretrained(str(out))
    text_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    vision_before = model.model.vision_model.patch_embedding.weight.clone()
    losses = pretrain_vision(model, AutoProcessor.from_pretrained(str(out)), steps=60, batch_size=16, progress=False)
    assert np.mean(losses[-8:]) < 0.9 * np.mean(losses[:4]), losses  # ln 50 + ln 20 = 6.9 at chance
    assert all(torch.equal(v, text_before[k]) for k, v in model.model.language_model.state_dict().items())
    assert not torch.equal(model.model.vision_model.patch_embedding.weight, vision_before)


def test_train_mini_quick_runs_every_stage_and_the_pipeline_draws(tmp_path):
    """`python -m thinkdiff train-mini --quick`: every stage runs and its loss falls; the pipeline it writes loads
    and draws; a second run skips the finished stages."""
    import json

    from thinkdiff.__main__ import main
    from thinkdiff.pipeline import ThinkDiffPipeline

    out = tmp_path / "mini"
    assert main(["train-mini", str(out), "--quick"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stages = ["t5", "decoder", "vlm", "aligner", "judge"]
    assert list(summary) == [*stages, "ship"] and 0 < summary["ship"]["bytes"] < 20 * 2**20
    for name in stages:
        row = summary[name]
        assert row["loss_last"] < row["loss_first"], (name, row)
        assert len((out / "losses" / f"{name}.txt").read_text().split()) == row["steps"]
    from thinkdiff.config import load_training_config

    align = load_training_config(out / "align_mini.yaml")  # the aligner stage as a train.py config
    assert (align.objective.name, align.embed, align.train.output_dir) == ("t5_decoder", "output",
                                                                           str(out / "aligner_run"))
    pipe = ThinkDiffPipeline.from_config(out / "thinkdiff.yaml", ["decoder.num_inference_steps=2"])
    q = training_sequences(1, seed=11)[0]
    from thinkdiff.eval.cobsat import TASKS
    from thinkdiff.mini.world import jittered

    rng = np.random.default_rng(0)
    images = [jittered(TASKS[q.task_id].task_type, d, o, rng) for d, o in q.image_pairs()]
    result = pipe(q.prompt(), images=images, seed=0, progress=False)
    assert result.images[0].size == (64, 64) and result.text[0]
    # ship/: float16 files that load as float32 and give the same answer
    from safetensors import safe_open

    ship = out / "ship"
    assert sorted(p.name for p in ship.iterdir()) == ["aligner", "decoder", "judge", "t5", "vlm"]
    from transformers import T5EncoderModel

    keep = tuple(T5EncoderModel._keep_in_fp32_modules)  # transformers keeps T5's "wo" in float32 (fp16 overflow)
    for path in ship.rglob("*.safetensors"):
        with safe_open(path, "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys() if not any(f".{m}." in k for m in keep)}
            assert dtypes == {torch.float16}, path
    shipped = ThinkDiffPipeline.from_config(out / "thinkdiff.yaml", [
        "decoder.num_inference_steps=2", f"vlm.model={ship / 'vlm'}", f"aligner.path={ship / 'aligner'}",
        f"decoder.model={ship / 'decoder'}"])
    assert next(shipped.aligner.parameters()).dtype == torch.float32
    assert shipped(q.prompt(), images=images, seed=0, progress=False).text == result.text
    before = (out / "summary.json").read_text()
    assert main(["train-mini", str(out), "--quick"]) == 0 and (out / "summary.json").read_text() == before


def test_cnn_judge_learns_the_drawings_and_answers_cobsat_questions(tmp_path):
    from thinkdiff.config import load_config
    from thinkdiff.eval.cobsat import ITEM_DICT, judge_questions, parse_option
    from thinkdiff.eval.config import CobsatEvalConfig
    from thinkdiff.eval.judges import make_judge
    from thinkdiff.mini.judge import train_judge

    out, losses = train_judge(tmp_path / "judge", steps=150, copies=1, progress=False)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
    judge = make_judge(load_config(CobsatEvalConfig, None, ["judge.kind=cnn", f"judge.model={out}"]).judge)
    right, pairs = 0, []
    for task in TASKS.values():
        qs = judge_questions(task)
        d_space, o_space = task.task_type.split("_")
        for detail, obj in zip(ITEM_DICT[d_space][:3], ITEM_DICT[o_space][3:6]):
            image = draw(task.task_type, detail, obj)
            pairs += [(image, qs["detail"]), (image, qs["obj"])]
            right += parse_option(judge.ask(image, qs["detail"])) == ITEM_DICT[d_space].index(detail) + 1
    assert right >= 10  # of 30 details (chance: 3)
    assert judge.ask_many(pairs)[:2] == [judge.ask(*pairs[0]), judge.ask(*pairs[1])]


def test_align_mini_config_is_the_recipes_aligner_stage():
    """configs/align_mini.yaml (the stage on the shipped weights) keeps every setting of train-mini's aligner stage;
    only the paths differ."""
    from pathlib import Path

    from thinkdiff.config import load_training_config, to_dict
    from thinkdiff.mini.recipe import SCALES, aligner_config

    s = SCALES["full"]
    recipe = to_dict(aligner_config(Path("OUT"), s["aligner_steps"], s["aligner_batch"]))
    shipped = to_dict(load_training_config(Path(__file__).resolve().parents[1] / "configs" / "align_mini.yaml"))
    paths = {("vlm", "model"), ("decoder", "model"), ("objective", "t5_model"), ("data", "source"),
             ("train", "output_dir"), ("train", "cache"), ("train", "overwrite")}
    for section, values in recipe.items():
        if not isinstance(values, dict):
            assert shipped[section] == values, section
            continue
        for key, value in values.items():
            if (section, key) not in paths:
                assert shipped[section][key] == value, (section, key)
    assert shipped["objective"]["t5_model"] == "mini:t5" and shipped["vlm"]["model"] == "mini:vlm"
