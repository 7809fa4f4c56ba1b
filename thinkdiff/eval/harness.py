"""The CoBSAT run: samples -> method -> images in CoBSAT's results layout -> judge -> JSONL records -> summary.

    RUN_DIR/
      run.json                      the config and protocol fingerprint (a re-run must match it)
      records.jsonl                 one record per (shot, task, sample), appended batch by batch
      results/exps/{model}_image/shot_{k}/default/task_{id}/{save_path}.jpg (+ .json: description, text_inputs,
                                    image_inputs, time) - CoBSAT's own layout, so its evaluation_icl.py can cross-check
      summary.json, summary.md      per-task metrics and task means per shot, beside ThinkDiff's published numbers
      sheets/shot_{k}_task_{id}.png in-context images, generated image, verdict
      last_run.json                 this invocation's throughput and time split

Re-running skips recorded samples (records with an error are retried unless `cobsat.retry_errors=false`), and
re-judges an image already on disk instead of drawing it again. A failure in one sample is recorded (the sample
counts as wrong) and the run goes on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from ..atomic import replace_into, save_json
from ..config import to_dict
from ..errors import ConfigError
from ..failures import Failure, run_per_item
from .cobsat import (
    QUESTION_MAX_CHARS,
    CobsatProtocol,
    CobsatSample,
    Verdict,
    build_samples,
    check_dataset,
    format_prompt,
    judge_questions,
    load_prompt_lists,
    score,
)
from .config import CobsatEvalConfig
from .generators import Generation, Method, make_method
from .judges import Judge, ask_many, make_judge
from .sheets import make_sheet
from .summary import markdown, summarize

logger = logging.getLogger(__name__)

RECORDS = "records.jsonl"
STAGES = ("vlm", "aligner", "decoder", "judge")


def results_dir(run_dir: Path, model_name: str, shot: int, task_id: int) -> Path:
    """CoBSAT's `get_result_path(...)/task_{id}` for prompt type 'default'."""
    return run_dir / "results" / "exps" / f"{model_name}_image" / f"shot_{shot}" / "default" / f"task_{task_id}"


def fingerprint(config: CobsatEvalConfig) -> dict:
    """The settings a run's images and verdicts depend on (shots, tasks and n may grow between runs)."""
    data = to_dict(config)
    cobsat = {k: v for k, v in data["cobsat"].items()
              if k in ("method", "formatter", "instruction", "instruction_suffix", "vision_ids", "model_name")}
    judge = {k: v for k, v in data["judge"].items() if k not in ("batch_size", "device")}
    gen = {k: data[k] for k in ("vlm", "aligner", "decoder", "seed")} if config.cobsat.method in (
        "thinkdiff", "text-bridge") else {"seed": data["seed"]}
    for section in ("vlm", "decoder"):
        if section in gen:
            gen[section] = {k: v for k, v in gen[section].items() if k != "device"}
    return {"cobsat": cobsat, "judge": judge, "generation": gen}


def load_records(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (a crash mid-write) is dropped with a warning."""
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("Skipping unreadable line %d of %s (an interrupted write).", n, path)
    return records


def write_records(path: Path, records: list[dict]) -> None:
    """Replace the JSONL file atomically."""
    text = "".join(json.dumps(r, default=str) + "\n" for r in records)
    replace_into(path, lambda tmp: Path(tmp).write_text(text))


def append_records(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_jpg(image: Image.Image, path: Path, quality: int) -> None:
    replace_into(path, lambda tmp: image.convert("RGB").save(tmp, format="JPEG", quality=quality))


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


class CobsatRun:
    """One `eval-cobsat` run. `method` and `judge` may be given (tests); otherwise they load from the config, and
    only when some sample still needs them."""

    def __init__(self, config: CobsatEvalConfig, out_dir: str | Path, method: Method | None = None,
                 judge: Judge | None = None, progress: bool = True):
        self.config, self.out_dir, self.progress = config, Path(out_dir), progress
        self._method, self._judge = method, judge
        c = config.cobsat
        self.root = check_dataset(c.root, c.tasks)
        self.lists = load_prompt_lists(self.root)
        self.model_name = c.model_name or c.method
        self.records_path = self.out_dir / RECORDS

    # ---------------------------------------------------------------------------------------- components

    @property
    def method(self) -> Method:
        if self._method is None:
            self._method = make_method(self.config, self.root)
        return self._method

    @property
    def judge(self) -> Judge:
        if self._judge is None:
            self._judge = make_judge(self.config.judge, self.root)
        return self._judge

    def judge_name(self) -> str:
        if self._judge is not None:
            return self._judge.name
        j = self.config.judge
        return "oracle" if j.kind == "oracle" else f"{j.kind}:{j.model}"

    # --------------------------------------------------------------------------------------------- run

    def _check_run_dir(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        run_json = self.out_dir / "run.json"
        fp = fingerprint(self.config)
        if run_json.is_file():
            old = json.loads(run_json.read_text()).get("fingerprint")
            if old is not None and old != fp:
                diff = [f"{s}.{k}" for s in fp for k in set(fp[s]) | set(old.get(s, {}))
                        if fp[s].get(k) != old.get(s, {}).get(k)]
                raise ConfigError(f"{self.out_dir} holds a run with different settings ({', '.join(sorted(diff))}); "
                                 "resume it with the same config or choose another --out.")
        save_json({"fingerprint": fp, "config": to_dict(self.config),
                   "protocol": dataclasses.asdict(CobsatProtocol.current())}, run_json)

    def run(self) -> dict:
        c = self.config.cobsat
        self._check_run_dir()
        loaded = load_records(self.records_path)
        records, seen = [], set()
        for r in reversed(loaded):  # the latest record of a key wins; failed ones are retried
            if r["key"] not in seen and not (c.retry_errors and r.get("error")):
                seen.add(r["key"])
                records.append(r)
        records.reverse()
        if len(records) != len(loaded):
            write_records(self.records_path, records)
        done = {r["key"] for r in records}

        work = []
        for shot in c.shots:
            for task_id in c.tasks:
                pending = [s for s in build_samples(self.root, task_id, shot, c.n, self.lists) if s.key not in done]
                work += [pending[i:i + c.batch_size] for i in range(0, len(pending), c.batch_size)]
        total = sum(len(b) for b in work)
        stats = {"samples": 0, "correct": 0, "failed": 0, "first_error": None, "load_s": 0.0, "wall_s": 0.0,
                 **{f"{s}_s": 0.0 for s in STAGES}}
        if total:
            start = time.perf_counter()
            self.method, self.judge  # noqa: B018 - load both now, so a bad config fails before any sample
            stats["load_s"] = time.perf_counter() - start
        start = time.perf_counter()
        if total:  # models loaded above, so wall_s (and samples/s) leave loading out
            logger.info("CoBSAT: %d samples to run (%d already recorded) in %s.", total, len(done), self.out_dir)
            with tqdm(total=total, desc=f"CoBSAT {self.model_name}", unit="sample", disable=not self.progress) as bar:
                for batch in work:
                    new = self.process(batch)
                    append_records(self.records_path, new)
                    records += new
                    stats["samples"] += len(new)
                    stats["correct"] += sum(r["correct"] for r in new)
                    failed = [r["error"] for r in new if r.get("error")]
                    stats["failed"] += len(failed)
                    stats["first_error"] = stats["first_error"] or (failed[0] if failed else None)
                    if stats["failed"] * 2 > stats["samples"]:  # most samples fail: a setup problem, stop now
                        stats["wall_s"] = time.perf_counter() - start
                        self.finish(records, stats)
                        raise EvalFailed(f"{stats['failed']} of the first {stats['samples']} samples failed; the "
                                         f"first error: {stats['first_error']}")
                    for r in new:
                        for s in STAGES:
                            stats[f"{s}_s"] += r.get(f"t_{s}_s") or 0.0
                    bar.update(len(new))
                    bar.set_postfix(acc=f"{stats['correct'] / stats['samples']:.3f}",
                                    task=new[0]["task_id"], shot=new[0]["shot"])
        stats["wall_s"] = time.perf_counter() - start
        stats["samples_per_s"] = stats["samples"] / stats["wall_s"] if stats["samples"] else 0.0
        return self.finish(records, stats)

    def finish(self, records: list[dict], stats: dict) -> dict:
        c = self.config.cobsat
        summary = summarize(records, c.shots, c.tasks, c.n)
        summary.update(method=c.method, model_name=self.model_name, formatter=c.formatter, judge=self.judge_name(),
                       protocol=dataclasses.asdict(CobsatProtocol.current()), root=str(self.root))
        save_json(summary, self.out_dir / "summary.json")
        replace_into(self.out_dir / "summary.md", lambda tmp: Path(tmp).write_text(markdown(summary, c.method)))
        if c.sheets:
            for shot in c.shots:
                for task_id in c.tasks:
                    rows = [r for r in records if r["shot"] == shot and r["task_id"] == task_id and r["index"] < c.n]
                    if rows:
                        make_sheet(rows, self.out_dir, self.out_dir / "sheets" / f"shot_{shot}_task_{task_id}.png",
                                   rows=c.sheet_rows)
        save_json(stats, self.out_dir / "last_run.json")
        return {"summary": summary, "stats": stats}

    # ------------------------------------------------------------------------------------------ a batch

    def prompt(self, sample: CobsatSample) -> str:
        c = self.config.cobsat
        return format_prompt(sample, c.formatter, c.instruction, c.instruction_suffix, c.vision_ids)

    def process(self, batch: list[CobsatSample]) -> list[dict]:
        c = self.config.cobsat
        folder = results_dir(self.out_dir, self.model_name, batch[0].shot, batch[0].task_id)
        prompts = [self.prompt(s) for s in batch]
        gens: list[Generation | None] = [None] * len(batch)
        reused = [False] * len(batch)
        for i, s in enumerate(batch):  # images drawn by an interrupted run are judged, not drawn again
            jpg, side = folder / f"{s.save_path}.jpg", folder / f"{s.save_path}.json"
            if jpg.is_file() and side.is_file():
                try:
                    gens[i] = Generation(None, text=json.loads(side.read_text()).get("description"))
                    reused[i] = True
                except (OSError, json.JSONDecodeError):
                    pass
        todo = [i for i in range(len(batch)) if gens[i] is None]
        if todo:
            out = [Generation(None, error=g.text) if isinstance(g, Failure) else g for g in run_per_item(
                lambda idx: self.method.generate([batch[i] for i in idx], [prompts[i] for i in idx]), todo,
                "generation batch")]
            for i, g in zip(todo, out):
                gens[i] = g
                if g.image is not None:
                    s = batch[i]
                    try:
                        save_jpg(g.image, folder / f"{s.save_path}.jpg", c.jpeg_quality)
                        save_json({"description": g.text, "text_inputs": s.text_inputs,
                                   "image_inputs": s.image_paths, "time": sum(g.timings.values())},
                                  folder / f"{s.save_path}.json")
                    except Exception as err:  # noqa: BLE001
                        g.error = Failure(err).text

        # Judge the files on disk, as CoBSAT's evaluator does.
        images, verdicts, errors = {}, [None] * len(batch), [g.error for g in gens]
        for i, s in enumerate(batch):
            jpg = folder / f"{s.save_path}.jpg"
            if errors[i] is None and jpg.is_file():
                try:
                    with Image.open(jpg) as im:
                        images[i] = im.convert("RGB")
                except Exception as err:  # noqa: BLE001
                    errors[i] = Failure(err).text
        judge_seconds = {}

        def judge(idx: list[int]) -> list[tuple[Verdict, float]]:
            start = time.perf_counter()
            pairs, owners = [], []
            for i in idx:
                for mode, q in judge_questions(batch[i].task).items():
                    pairs.append((images[i], q[:QUESTION_MAX_CHARS]))
                    owners.append((i, mode))
            replies: dict[int, dict] = {}
            for (i, mode), a in zip(owners, ask_many(self.judge, pairs), strict=True):
                replies.setdefault(i, {})[mode] = a
            share = (time.perf_counter() - start) / len(idx)
            return [(score(batch[i], replies[i]), share) for i in idx]

        for i, result in zip(images, run_per_item(judge, list(images), "judge batch")):
            if isinstance(result, Failure):
                errors[i] = result.text
            else:
                verdicts[i], judge_seconds[i] = result

        records = []
        for i, s in enumerate(batch):
            g = gens[i]
            jpg = folder / f"{s.save_path}.jpg"
            verdict = verdicts[i]
            if verdict is None:
                verdict = score(s, None) if i not in images else Verdict()
            records.append(self.record(s, prompts[i], g, verdict, errors[i], jpg if jpg.is_file() else None,
                                       reused[i], judge_seconds.get(i, 0.0)))
        return records

    def record(self, s: CobsatSample, prompt: str, g: Generation, verdict: Verdict, error: str | None,
               jpg: Path | None, reused: bool, judge_s: float) -> dict:
        c = self.config.cobsat
        method = self._method
        return {
            "key": s.key, "method": c.method, "model_name": self.model_name, "formatter": c.formatter,
            "shot": s.shot, "task_id": s.task_id, "task_name": s.task.task_name, "index": s.index,
            "save_path": s.save_path,
            "theta": s.theta, "x_items": s.x_items, "x_words": s.x_words, "query_x": s.query_x,
            "gt_detail": s.gt_detail, "gt_obj": s.gt_obj, "true_label_detail": s.true_label_detail,
            "true_label_obj": s.true_label_obj,
            "prompt": prompt, "system": self.config.vlm.system if c.method in ("thinkdiff", "text-bridge") else None,
            "text_inputs": s.text_inputs, "image_inputs": s.image_paths, "vlm_text": g.text,
            "image_path": str(jpg.relative_to(self.out_dir)) if jpg is not None else None,
            "image_sha1": _sha1(jpg) if jpg is not None else None, "reused_image": reused,
            "gen": method.settings() if method is not None else {},
            "judge": self.judge_name(), **verdict.to_dict(),
            **{f"t_{stage}_s": g.timings.get(stage, 0.0) for stage in ("vlm", "aligner", "decoder")},
            "t_judge_s": judge_s, "error": error, "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }


class EvalFailed(RuntimeError):
    """Most samples of a run failed (a setup problem, not a score); the message carries the first error."""


def run_cobsat(config: CobsatEvalConfig, out_dir: str | Path, method: Method | None = None,
               judge: Judge | None = None, progress: bool = True) -> dict:
    """Run (or resume) a CoBSAT evaluation; returns {"summary": ..., "stats": ...}."""
    return CobsatRun(config, out_dir, method=method, judge=judge, progress=progress).run()
