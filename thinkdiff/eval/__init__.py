"""Evaluation harnesses. `cobsat`: CoBSAT in-context image generation (ThinkDiff's headline benchmark).

    cobsat.py       the protocol: tasks, label lists, seed-123 sample lists, k-shot prompts, judge questions, parser
    mini_cobsat.py  a synthetic CoBSAT drawn with PIL (same names and layout), for offline tests
    judges.py       `ask(image, question) -> str`: VLM engines, transformers LLaVA-1.5, an oracle for mini-CoBSAT
    generators.py   methods: thinkdiff (VLM -> aligner -> decoder), text-bridge, oracle, random
    harness.py      the resumable run: JSONL records, CoBSAT's results layout, summary, sheets
    summary.py      per-task accuracy and 10-task means, Markdown beside ThinkDiff's published numbers
    sheets.py       one PNG per task: in-context images, generated image, judge verdict
"""
