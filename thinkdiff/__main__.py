"""`python -m thinkdiff COMMAND`: make-tiny, make-toy-data, make-arithmetic-task, extract, cache, eval-passk, serve,
eval-cobsat, make-mini-cobsat, convert-thinkdiff, train-mini, make-mini-captions, rare-experiment."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ConfigError
from .user_errors import exit_status


def cmd_make_tiny(args) -> int:
    from .testing.tiny_models import make_tiny

    print(make_tiny(args.out_dir, args.kind, seed=args.seed))
    return 0


def cmd_extract(args) -> int:
    from .config import VLMConfig
    from .features import save_hidden_states
    from .pipeline import load_image
    from .vlm import VLMRequest, make_engine, sampling_from

    config = VLMConfig(model=args.model, backend=args.backend, dtype=args.dtype, device=args.device,
                       max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                       do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, system=args.system)
    request = VLMRequest(args.prompt, [load_image(p) for p in args.image], system=args.system)
    engine = make_engine(config)
    sampling = sampling_from(config)
    sampling.seed = args.seed
    states = engine.generate([request], args.layer, sampling)[0]
    save_hidden_states(states, args.out)
    print(states.text)
    print(f"Wrote {args.out}: layers {sorted(states.input_embed)}, prompt {len(states.prompt_token_ids)} tokens, "
          f"answer {len(states.output_token_ids)} tokens", file=sys.stderr)
    return 0


def cmd_convert_thinkdiff(args) -> int:
    from .convert_thinkdiff import CLIP_WIDTH, convert

    out = convert(args.checkpoint, args.out_dir, vlm=args.vlm, decoder=args.decoder)
    if (out / "thinkdiff.yaml").is_file():
        print(f"Wrote {out} (aligner/ + thinkdiff.yaml); load it with ThinkDiffPipeline.from_pretrained({str(out)!r}) "
              f"or `python infer.py --config {out / 'thinkdiff.yaml'} aligner.path={out / 'aligner'}`")
    else:
        print(f"Wrote {out / 'aligner'} (ThinkDiff-CLIP's {CLIP_WIDTH} -> 4096 aligner; its image path is not built "
              "in thinkdiff, see the README)")
    return 0


def cmd_train_mini(args) -> int:
    from .mini.recipe import train_mini

    summary = train_mini(args.out_dir, quick=args.quick, seed=args.seed)
    ship = summary.pop("ship")
    for name, row in summary.items():
        print(f"{name:8s} {row['steps']:5d} steps  loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}  "
              f"{row['seconds']:.0f} s")
    print(f"Wrote {args.out_dir}; draw with: python infer.py --config {args.out_dir}/thinkdiff.yaml")
    print(f"Wrote {args.out_dir}/ship ({ship['bytes'] / 2**20:.1f} MiB in float16, the layout of assets/mini)")
    return 0


def cmd_make_mini_captions(args) -> int:
    from .mini.recipe import write_captions

    print(write_captions(Path(args.out_dir), args.copies, seed=args.seed))
    return 0


def cmd_make_toy_data(args) -> int:
    from .train.toy_dataset import write_toy_dataset

    print(write_toy_dataset(args.out_dir, args.n, seed=args.seed))
    return 0


def cmd_cache(args) -> int:
    """One process, or each process of `accelerate launch` writing its share of the shards."""
    import dataclasses

    from .config import AlignTrainConfig, load_config
    from .train.accelerator import process_state
    from .train.data import ImageCaptionDataset
    from .train.feature_cache import write_cache
    from .vlm import make_engine, sampling_from

    cfg = load_config(AlignTrainConfig, args.config, args.overrides)
    if not cfg.train.cache:
        raise ConfigError("Set train.cache (the folder to write) in the config or as train.cache=DIR.")
    state = process_state()  # 1 process unless started by `accelerate launch`
    vlm = cfg.vlm
    if state.num_processes > 1 and state.device.type != "cpu":  # one engine per GPU
        vlm = dataclasses.replace(vlm, device=str(state.device))
    dataset = ImageCaptionDataset(cfg.data.source, cfg.data.prompts, seed=cfg.train.seed, limit=cfg.data.limit)
    out = write_cache(make_engine(vlm), dataset, cfg.train.cache, cfg.layer, cfg.embed, sampling_from(cfg.vlm),
                      vlm_name=cfg.vlm.model, shard_size=cfg.train.cache_shard_size, dtype=cfg.train.cache_dtype,
                      rank=state.process_index, world=state.num_processes, barrier=state.wait_for_everyone)
    if state.is_main_process:
        index = json.loads((out / "index.json").read_text())
        print(f"Wrote {out} ({len(dataset)} samples on {state.num_processes} process(es), {index['unreadable']} "
              "unreadable)")
    return 0


def cmd_make_arithmetic_task(args) -> int:
    from .grpo.problems import write_arithmetic_task

    print(write_arithmetic_task(args.out_dir, args.n, seed=args.seed, max_digit=args.max_digit))
    return 0


def cmd_eval_passk(args) -> int:
    from .config import GRPOTrainConfig, load_config, torch_dtype
    from .grpo.evaluate import evaluate_passk, format_report, load_policy_engine, write_report
    from .grpo.problems import load_problems
    from .grpo.trainer import build_clusterer
    from .vlm import SamplingConfig
    from .weights import resolve_model

    cfg = load_config(GRPOTrainConfig, args.config, args.overrides)
    path = args.checkpoint or resolve_model(cfg.policy.model, "policy.model")
    engine = load_policy_engine(path, dtype=torch_dtype(cfg.policy.dtype), device=cfg.policy.device)
    sampling = SamplingConfig(max_new_tokens=cfg.policy.max_new_tokens, min_new_tokens=cfg.policy.min_new_tokens,
                              do_sample=True, temperature=cfg.policy.temperature, top_p=cfg.policy.top_p,
                              seed=args.seed)
    result = evaluate_passk(engine, load_problems(cfg.problems, cfg.limit), args.n, sampling,
                            build_clusterer(cfg.reward))
    result["checkpoint"] = str(path)
    print(format_report(result))
    if args.out:
        write_report(result, args.out)
    return 0


def cmd_rare_experiment(args) -> int:
    from .config import RareExperimentConfig, load_config, read_yaml
    from .grpo.rare_experiment import format_table, run_rare_experiment

    quick = read_yaml(args.config).get("quick", []) if args.quick else []
    cfg = load_config(RareExperimentConfig, args.config, [*quick, *args.overrides])
    summary = run_rare_experiment(cfg, args.out)
    print(format_table(summary))
    print(f"summary: {Path(args.out) / 'summary.json'}, curves: {Path(args.out) / 'passk.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .testing.tiny_models import KINDS
    from .vlm import BACKENDS

    parser = argparse.ArgumentParser(prog="python -m thinkdiff", description="ThinkDiff command-line tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny", help="build a small random model offline (tests, demos)")
    p.add_argument("out_dir")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("convert-thinkdiff", help="convert ThinkDiff's released .pth checkpoint into a pipeline folder",
                       description="Reads thinkdiff_lvlm.pth / thinkdiff_clip.pth (Hugging Face repo "
                                   "Mifucius/ThinkDiff) with torch.load(weights_only=True), finds the aligner by its "
                                   "shapes, and writes OUT_DIR/aligner (safetensors) + OUT_DIR/thinkdiff.yaml with "
                                   "ThinkDiff's inference settings.")
    p.add_argument("checkpoint", help="the released .pth file")
    p.add_argument("out_dir")
    p.add_argument("--vlm", default=None, help="VLM model reference (default: Qwen/Qwen2-VL-7B-Instruct)")
    p.add_argument("--decoder", default=None, help="FLUX model reference (default: black-forest-labs/FLUX.1-dev)")
    p.set_defaults(func=cmd_convert_thinkdiff)

    p = sub.add_parser("train-mini", help="train ThinkDiff in miniature from nothing (T5, decoder, Mllama, aligner)",
                       description="Trains every part of the miniature on the mini-CoBSAT world into OUT_DIR, stage "
                                   "by stage (finished stages are skipped on a re-run), with loss logs in "
                                   "OUT_DIR/losses and a pipeline config OUT_DIR/thinkdiff.yaml.")
    p.add_argument("out_dir")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (checks that everything runs)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_mini)

    p = sub.add_parser("make-mini-captions", help="the miniature's aligner data: jittered drawings + captions "
                                                  "(train-mini's captions/ stage; configs/align_mini.yaml reads it)")
    p.add_argument("out_dir")
    p.add_argument("--copies", type=int, default=4, help="jittered copies of each of the 500 drawings")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_mini_captions)

    p = sub.add_parser("make-toy-data", help="draw a small image-caption folder with PIL (coloured shapes)")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_toy_data)

    p = sub.add_parser("make-arithmetic-task", help="draw digit images and write a verifiable addition task")
    p.add_argument("out_dir")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--max-digit", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_arithmetic_task)

    p = sub.add_parser("eval-passk", help="pass@k (k = 1..n) and distinct strategies of a policy checkpoint",
                       description="Samples n answers per problem with the config's policy sampling, prints pass@k "
                                   "with the unbiased estimator (Chen et al. 2021) and the mean number of distinct "
                                   "strategy clusters among correct answers (the config's reward.judge).")
    p.add_argument("--config", required=True, help="a GRPO config (stage: grpo)")
    p.add_argument("--checkpoint", default=None, help="policy folder (default: the config's policy.model)")
    p.add_argument("--n", type=int, default=16, help="samples per problem (pass@k for k = 1..n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON (and a .txt report beside it)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_eval_passk)

    p = sub.add_parser("rare-experiment", help="exploration collapse in miniature: base vs plain vs uniqueness GRPO",
                       description="Trains a text Llama from nothing on a two-strategy addition task, then plain "
                                   "GRPO (alpha 0) and uniqueness GRPO (alpha 0.5, 1) from it for several seeds, "
                                   "and writes pass@1..pass@n on held-out problems to OUT/summary.json and "
                                   "OUT/passk.png. Finished parts are reused when re-run.")
    p.add_argument("--config", required=True, help="e.g. configs/rare_mini.yaml")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="the config's `quick` overrides: minutes, same outputs")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_rare_experiment)

    p = sub.add_parser("cache", help="run the VLM once over a training dataset and write a feature cache",
                       description="Writes sharded safetensors (features in train.cache_dtype + token ids) to "
                                   "train.cache. Re-running skips finished shards.")
    p.add_argument("--config", required=True, help="an alignment training config (stage: align)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("extract", help="answer one prompt and write its hidden states to a safetensors file",
                       description="Writes input_embed.L [prompt_len, H] and output_embed.L [gen_len, H] for each "
                                   "--layer L (float32), prompt_token_ids and output_token_ids (int64); prints the "
                                   "answer. Layers use transformers' numbering: 0 = embeddings, k = output of layer "
                                   "k, N (or -1) = final-normed state.")
    p.add_argument("--model", required=True, help="model folder, cached Hugging Face repo id, or tiny:KIND")
    p.add_argument("--layer", type=int, action="append", required=True, help="layer index, repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="repeatable; order is kept")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--min-new-tokens", type=int, default=0)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--backend", default="transformers", choices=BACKENDS)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.set_defaults(func=cmd_extract)

    from .eval.cli import add_parsers as add_eval_parsers
    from .serve import add_serve_parser

    add_serve_parser(sub)
    add_eval_parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return exit_status(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
