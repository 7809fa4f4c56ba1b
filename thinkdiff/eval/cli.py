"""`python -m thinkdiff eval-cobsat`, `cobsat-agreement` and `make-mini-cobsat`: `add_parsers(subparsers)` registers
them."""

from __future__ import annotations

import sys


def cmd_eval_cobsat(args) -> int:
    from ..config import load_config
    from .config import CobsatEvalConfig
    from .harness import EvalFailed, run_cobsat

    cli = []
    for key, value in (("root", args.root), ("shots", args.shots), ("tasks", args.tasks), ("n", args.n),
                       ("method", args.method), ("formatter", args.formatter), ("batch_size", args.batch_size)):
        if value is not None:
            cli.append(f"cobsat.{key}={value}")
    if args.judge is not None:
        cli.append(f"judge.kind={args.judge}")
    if args.no_sheets:
        cli.append("cobsat.sheets=false")
    config = load_config(CobsatEvalConfig, args.config, cli + list(args.overrides))
    try:
        result = run_cobsat(config, args.out, progress=not args.quiet)
    except EvalFailed as err:
        print(f"error: {err}\nThe records so far are in {args.out}; fix the cause and re-run the same command "
              "(failed samples are retried).", file=sys.stderr)
        return 1
    from .summary import markdown

    print(markdown(result["summary"], config.cobsat.method))
    stats = result["stats"]
    if stats["samples"]:
        split = ", ".join(f"{s} {stats[f'{s}_s']:.1f} s" for s in ("vlm", "aligner", "decoder", "judge"))
        print(f"{stats['samples']} samples in {stats['wall_s']:.1f} s ({stats['samples_per_s']:.3f} samples/s; "
              f"{split})", file=sys.stderr)
    print(f"Wrote {args.out}/summary.md, summary.json, records.jsonl, results/, sheets/", file=sys.stderr)
    return 0


def cmd_cobsat_agreement(args) -> int:
    from .agreement import judge_agreement

    a = judge_agreement(args.run_a, args.run_b)
    print(f"{a['samples']} samples, judges {a['judge_a']} / {a['judge_b']}: same option on {a['answers_agree']:.3f} "
          f"of the questions, same verdict on {a['correct_agree']:.3f} of the samples; accuracy "
          f"{a['accuracy_a']:.3f} / {a['accuracy_b']:.3f}")
    return 0


def cmd_make_mini_cobsat(args) -> int:
    from .mini_cobsat import write_mini_cobsat

    print(write_mini_cobsat(args.out_dir, size=args.size))
    return 0


def add_parsers(subparsers) -> None:
    from .cobsat import FORMATTERS
    from .config import JUDGE_KINDS, METHODS

    p = subparsers.add_parser(
        "eval-cobsat", help="CoBSAT in-context image generation (ThinkDiff's protocol), resumable",
        description="Regenerates CoBSAT's seed-123 samples from a local CoBSAT folder (--root), draws the next "
                    "image of each k-shot sample with the chosen method, asks the judge CoBSAT's two questions, and "
                    "writes records.jsonl, CoBSAT's results layout (JPG), summary.json/.md and PNG sheets to --out. "
                    "Re-running skips recorded samples.")
    p.add_argument("--config", required=True, help="an eval-cobsat config (configs/eval_cobsat_*.yaml)")
    p.add_argument("--root", default=None, help="CoBSAT folder holding datasets/ (or a make-mini-cobsat folder)")
    p.add_argument("--shots", type=int, nargs="+", default=None, help="e.g. 2 4 (ThinkDiff), CoBSAT: 2 4 6 8")
    p.add_argument("--tasks", type=int, nargs="+", default=None, help="task ids 1..10 (default: all)")
    p.add_argument("--n", type=int, default=None, help="samples per task and shot (CoBSAT: 1000)")
    p.add_argument("--method", choices=METHODS, default=None)
    p.add_argument("--formatter", choices=FORMATTERS, default=None,
                   help="thinkdiff: 'Word i: x, ' + ThinkDiff's question; cobsat: CoBSAT's 'x: <img>' format")
    p.add_argument("--judge", choices=JUDGE_KINDS, default=None, help="judge kind (default: from the config)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-sheets", action="store_true", help="skip the PNG sheets")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="run folder (re-use it to resume)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    p.set_defaults(func=cmd_eval_cobsat)

    p = subparsers.add_parser(
        "cobsat-agreement", help="how often two eval-cobsat runs' judges agree on the same images",
        description="RUN_B judged RUN_A's images with another judge (copy RUN_A/results into RUN_B, then run "
                    "eval-cobsat with --out RUN_B and the other --judge).")
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.set_defaults(func=cmd_cobsat_agreement)

    p = subparsers.add_parser("make-mini-cobsat", help="draw a synthetic mini-CoBSAT offline (tests, demos)",
                              description="Writes OUT_DIR/datasets/ with CoBSAT's themes, labels and file names "
                                          "(500 simple PIL drawings) and load_datasets/prompts_list_default.json.")
    p.add_argument("out_dir")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.set_defaults(func=cmd_make_mini_cobsat)

