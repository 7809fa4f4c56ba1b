"""Per-task accuracy and the unweighted task mean for each shot, as JSON and as Markdown beside published numbers.

Accuracy follows CoBSAT's `evaluation_icl.py`: every sample of a task is in the denominator (`valid_count`),
a missing image is wrong on every check. CoBSAT's code has no cross-task average; ThinkDiff's "average accuracy"
is the unweighted mean of the 10 task accuracies, which is what `mean` is here.
"""

from __future__ import annotations

from .cobsat import TASKS

METRICS = ("overall", "detail", "obj", "textual", "visual")

# The paper's column order: C-I, B-I, S-I, A-I, T-I | C-II, B-II, S-II, A-II, T-II.
PAPER_COLUMNS = [1, 3, 5, 7, 9, 2, 4, 6, 8, 10]
SHORT_NAMES = {1: "C-I", 2: "C-II", 3: "B-I", 4: "B-II", 5: "S-I", 6: "S-II", 7: "A-I", 8: "A-II", 9: "T-I",
               10: "T-II"}

# ThinkDiff (arXiv 2502.10458v1) Tables 1 and 2, in PAPER_COLUMNS order.
PUBLISHED = {
    2: {
        "SEED-LLaMA": [.680, .348, .203, .182, .196, .287, .467, .297, .261, .163],
        "Emu": [.065, .051, .057, .052, .078, .062, .109, .081, .092, .074],
        "GILL": [.171, .054, .069, .063, .074, .010, .043, .024, .022, .040],
        "ThinkDiff-LVLM": [.622, .349, .237, .459, .290, .511, .534, .340, .534, .292],
    },
    4: {
        "SEED-LLaMA": [.482, .211, .141, .053, .122, .252, .076, .268, .207, .105],
        "Emu": [.063, .018, .045, .048, .097, .037, .122, .109, .077, .088],
        "GILL": [.106, .044, .041, .073, .087, .022, .059, .044, .032, .067],
        "ThinkDiff-LVLM": [.638, .362, .254, .434, .317, .610, .590, .432, .664, .332],
    },
}


def task_metrics(records: list[dict], n: int) -> dict:
    """Metrics of one task and shot from its records (one per sample index < n; unrecorded samples count wrong)."""
    by_index = {r["index"]: r for r in records if r["index"] < n}
    out = {m: sum(bool(r.get("check_" + m if m != "overall" else "correct")) for r in by_index.values()) / n
           for m in METRICS}
    out.update(n=n, recorded=len(by_index), missing=sum(bool(r.get("missing")) for r in by_index.values())
               + (n - len(by_index)), errors=sum(r.get("error") is not None for r in by_index.values()))
    return out


def summarize(records: list[dict], shots: list[int], tasks: list[int], n: int) -> dict:
    """{"shots": {shot: {"tasks": {task_id: metrics}, "mean": {metric: unweighted task mean}}}, ...}."""
    result = {"n": n, "tasks": list(tasks), "shots": {}}
    for shot in shots:
        per_task = {}
        for task_id in tasks:
            rows = [r for r in records if r["shot"] == shot and r["task_id"] == task_id]
            per_task[task_id] = {"task_name": TASKS[task_id].task_name, **task_metrics(rows, n)}
        mean = {m: sum(t[m] for t in per_task.values()) / len(per_task) for m in METRICS}
        result["shots"][shot] = {"tasks": per_task, "mean": mean,
                                 "complete": all(t["recorded"] == n for t in per_task.values()),
                                 "all_tasks": sorted(tasks) == sorted(TASKS)}
    return result


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def markdown(summary: dict, method: str) -> str:
    """Tables per shot: accuracy in the paper's column order beside ThinkDiff's Tables 1-2, then all metrics."""
    lines = [f"# CoBSAT: {method}", "",
             f"n = {summary['n']} samples per task and shot; accuracy = detail and object both right (LLaVA-style "
             "judge, CoBSAT's questions and parser); mean = unweighted mean over the tasks run.", ""]
    for shot, block in summary["shots"].items():
        shot = int(shot)
        tasks = block["tasks"]
        tasks = {int(k): v for k, v in tasks.items()}
        cols = [t for t in PAPER_COLUMNS if t in tasks]
        lines += [f"## {shot}-shot" + ("" if block["complete"] else " (incomplete)"), "",
                  "| model | " + " | ".join(SHORT_NAMES[t] for t in cols) + " | mean |",
                  "|---|" + "---|" * (len(cols) + 1)]
        lines.append(f"| **{method} (this run)** | " + " | ".join(_fmt(tasks[t]["overall"]) for t in cols)
                     + f" | **{_fmt(block['mean']['overall'])}** |")
        for model, values in PUBLISHED.get(shot, {}).items():
            row = dict(zip(PAPER_COLUMNS, values))
            sub = [row[t] for t in cols]
            lines.append(f"| {model} (published) | " + " | ".join(_fmt(v) for v in sub)
                         + f" | {_fmt(sum(sub) / len(sub))} |")
        if shot not in PUBLISHED:
            lines.append(f"| (ThinkDiff published no {shot}-shot numbers) |" + " |" * (len(cols) + 1))
        lines += ["", "| task | accuracy | detail | object | textual | visual | missing | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in sorted(tasks):
            m = tasks[t]
            lines.append(f"| {t} {m['task_name']} | {_fmt(m['overall'])} | {_fmt(m['detail'])} | {_fmt(m['obj'])} | "
                         f"{_fmt(m['textual'])} | {_fmt(m['visual'])} | {m['missing']} | {m['errors']} |")
        mean = block["mean"]
        lines += [f"| mean | {_fmt(mean['overall'])} | {_fmt(mean['detail'])} | {_fmt(mean['obj'])} | "
                  f"{_fmt(mean['textual'])} | {_fmt(mean['visual'])} | | |", ""]
    return "\n".join(lines)
