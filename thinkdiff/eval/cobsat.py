"""CoBSAT's protocol (Zeng et al., COLM 2024, arXiv 2402.01293), as its code runs it, plus ThinkDiff's prompt format.

Everything here follows UW-Madison-Lee-Lab/CoBSAT @ a787be5:

- `TASKS`, `ITEM_DICT`, `ITEM2WORD`: `configs.py` (`task_dataframe`, `item_dict`, `item2word`). List order sets the
  judge's option numbers.
- `prompt_lists`: `load_datasets/gen_prompts.py` (`random.seed(123)`, 1000 x shuffles of `x_list` then
  `theta_list`), equal to the committed `load_datasets/prompts_list_default.json`.
- `build_samples`: `load_dataset.load_inputs` (the hidden value is `theta_list[theta_idxs[shot + 1]]`, the texts are
  `f"{x}: "` after `item2word`, `shot` images, `save_path = f"{i}_{theta}_{'_'.join(x_words)}"`) and
  `helper.find_image` (`datasets/{detail_space}_{obj}/{detail}_{obj}.jpg`).
- `judge_questions`, `parse_option`, `score`: `evaluation_icl.py` (`get_eval_prompt`, the digit parser, and
  `correct = check_detail and check_obj`; a missing image is wrong and stays in the denominator).

ThinkDiff's formatter (`format_prompt(..., "thinkdiff")`) follows MiZhenxing/ThinkDiff
`scripts/test/test_mllama_t5_decoder_flux_embed_multi_image_batch.py`: the question, then `"Word {i}: {x}, "`
(entries after the first prefixed by two newlines) with the images in between.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError, MissingFileError
from ..vlm import IMAGE_MARKER

# ---------------------------------------------------------------------------------------- configs.py, verbatim

ITEM2WORD = {"3d": "wireframe", "park": "amusement park"}
WORD2ITEM = {v: k for k, v in ITEM2WORD.items()}

ITEM_DICT = {
    "color": ["yellow", "white", "red", "purple", "pink", "orange", "green", "brown", "blue", "black"],
    "object": ["leaf", "hat", "cup", "chair", "car", "box", "book", "ball", "bag", "apple"],
    "weather": ["tornado", "thunder", "sunny", "snowy", "sandstorm", "rainy", "rainbow", "hailstorm", "foggy",
                "aurora"],
    "animal": ["zebra", "tiger", "sheep", "pig", "monkey", "lion", "dog", "cow", "cat", "bird"],
    "style": ["watercolor", "sketch", "pixel", "origami", "lego", "icon", "graffiti", "futuristic", "3d", "old"],
    "action": ["swim", "sleep", "sing", "run", "read", "fly", "eat", "drink", "cry", "angry"],
    "background": ["beach", "desert", "glacier", "volcano", "park", "gym", "waterfall", "space", "cave", "seafloor"],
    "texture": ["wood", "wicker", "sequined", "plastic", "paper", "metal", "leather", "lace", "denim", "ceramic"],
}

TASK_TYPES = ["color_object", "style_object", "action_animal", "texture_object", "background_animal"]


@dataclass(frozen=True)
class TaskSpec:
    task_id: int
    task_name: str
    task_type: str  # "{detail_space}_{obj_space}"
    x_space: str  # what the prompt's words name
    theta_space: str  # the latent all shots share

    @property
    def detail_space(self) -> str:
        return self.task_type.split("_")[0]

    @property
    def obj_space(self) -> str:
        return self.task_type.split("_")[1]

    @property
    def x_list(self) -> list[str]:
        return ITEM_DICT[self.x_space]

    @property
    def theta_list(self) -> list[str]:
        return ITEM_DICT[self.theta_space]

    @property
    def x_side(self) -> str:
        """Which judge question checks the word in the prompt ('textual'): 'obj' or 'detail'."""
        return "obj" if self.x_space in ("object", "animal") else "detail"

    @property
    def theta_side(self) -> str:
        """Which judge question checks the latent read from the images ('visual')."""
        return "detail" if self.x_side == "obj" else "obj"


TASKS: dict[int, TaskSpec] = {t.task_id: t for t in [
    TaskSpec(1, "Color-I", "color_object", "color", "object"),
    TaskSpec(2, "Color-II", "color_object", "object", "color"),
    TaskSpec(3, "Background-I", "background_animal", "background", "animal"),
    TaskSpec(4, "Background-II", "background_animal", "animal", "background"),
    TaskSpec(5, "Style-I", "style_object", "style", "object"),
    TaskSpec(6, "Style-II", "style_object", "object", "style"),
    TaskSpec(7, "Action-I", "action_animal", "action", "animal"),
    TaskSpec(8, "Action-II", "action_animal", "animal", "action"),
    TaskSpec(9, "Texture-I", "texture_object", "texture", "object"),
    TaskSpec(10, "Texture-II", "texture_object", "object", "texture"),
]}

NUM_PROMPTS = 1000  # num_prompt_dict['default']
PROMPT_SEED = 123
MAX_SHOT = 8  # the hidden value sits at position shot + 1 of a 10-entry list

DOWNLOAD_HINT = (
    "Download CoBSAT's images once: `wget https://huggingface.co/datasets/yzeng58/CoBSAT/resolve/main/datasets.zip "
    "&& unzip datasets.zip -d ROOT`, so that ROOT/datasets/color_car/white_car.jpg exists, and pass --root ROOT "
    "(the CoBSAT repository folder works too). For an offline synthetic stand-in with the same names and layout, "
    "run `python -m thinkdiff make-mini-cobsat ROOT`.")


def word(item: str) -> str:
    """The display word of a label (CoBSAT's `item2word`)."""
    return ITEM2WORD.get(item, item)


def get_task(task_id: int) -> TaskSpec:
    if task_id not in TASKS:
        names = ", ".join(t.task_name for t in TASKS.values())
        raise InputError(f"Unknown CoBSAT task {task_id}; tasks are 1..10 ({names}).")
    return TASKS[task_id]


# ---------------------------------------------------------------------------------- sample lists (gen_prompts.py)


def prompt_lists(seed: int = PROMPT_SEED, count: int = NUM_PROMPTS, length: int = 10) -> list[dict]:
    """CoBSAT's `prompts_list_default.json`, regenerated: seed, then per entry shuffle x then theta and copy."""
    rng = random.Random(seed)  # the same stream as `random.seed(seed)` on the module-level generator
    x_list, theta_list = list(range(length)), list(range(length))
    out = []
    for _ in range(count):
        rng.shuffle(x_list)
        rng.shuffle(theta_list)
        out.append({"x_list": x_list.copy(), "theta_list": theta_list.copy()})
    return out


def load_prompt_lists(root: str | Path | None = None) -> list[dict]:
    """The regenerated lists; if `root/load_datasets/prompts_list_default.json` exists it must be equal."""
    lists = prompt_lists()
    if root is not None:
        committed = Path(root) / "load_datasets" / "prompts_list_default.json"
        if committed.is_file():
            if json.loads(committed.read_text()) != lists:
                raise InputError(f"{committed} differs from CoBSAT's seed-123 lists (gen_prompts.py); the protocol "
                                 "would not be CoBSAT's. Restore the file from CoBSAT's repository or delete it.")
    return lists


# -------------------------------------------------------------------------------------- dataset (helper.py)


def image_path(root: str | Path, task: TaskSpec, x_item: str, theta: str) -> Path:
    """`helper.find_image`: datasets/{detail_space}_{obj}/{detail}_{obj}.jpg."""
    if task.x_space in ("object", "animal"):
        obj, detail = x_item, theta
    else:
        obj, detail = theta, x_item
    return Path(root) / "datasets" / f"{task.detail_space}_{obj}" / f"{detail}_{obj}.jpg"


def theme_image_path(root: str | Path, task_type: str, detail: str, obj: str) -> Path:
    return Path(root) / "datasets" / f"{task_type.split('_')[0]}_{obj}" / f"{detail}_{obj}.jpg"


def check_dataset(root: str | Path | None, task_ids: list[int]) -> Path:
    """Raise FileNotFoundError (naming what to download and where) unless every image the tasks use is there."""
    if root is None:
        raise MissingFileError("No CoBSAT folder given (--root). " + DOWNLOAD_HINT)
    root = Path(str(root)).expanduser().resolve()
    if not (root / "datasets").is_dir():
        raise MissingFileError(f"No CoBSAT dataset at {root / 'datasets'}. " + DOWNLOAD_HINT)
    missing = []
    for task_type in sorted({get_task(t).task_type for t in task_ids}):
        detail_space, obj_space = task_type.split("_")
        for obj in ITEM_DICT[obj_space]:
            for detail in ITEM_DICT[detail_space]:
                path = theme_image_path(root, task_type, detail, obj)
                if not path.is_file():
                    missing.append(path)
    if missing:
        raise MissingFileError(f"The CoBSAT dataset at {root / 'datasets'} is incomplete: {len(missing)} images are "
                                f"missing, e.g. {missing[0]}. " + DOWNLOAD_HINT)
    return root


# -------------------------------------------------------------------------------- samples (load_dataset.py)


@dataclass
class CobsatSample:
    task_id: int
    shot: int
    index: int  # position in the 1000 sample lists
    theta: str  # the hidden value (raw item)
    x_items: list[str]  # raw items of the shot + 1 words (demos, then the query)
    x_words: list[str]  # the same after item2word
    text_inputs: list[str]  # CoBSAT's texts, f"{x}: "
    image_paths: list[str]  # the shot in-context images
    save_path: str  # CoBSAT's file stem
    gt_detail: str  # raw items the judge must see in the generated image
    gt_obj: str
    true_label_detail: int  # 1-based option numbers
    true_label_obj: int

    @property
    def task(self) -> TaskSpec:
        return TASKS[self.task_id]

    @property
    def key(self) -> str:
        return f"shot{self.shot}/task{self.task_id}/{self.index}"

    @property
    def query_x(self) -> str:
        return self.x_items[-1]

    def to_dict(self) -> dict:
        return asdict(self)


def build_samples(root: str | Path, task_id: int, shot: int, n: int = NUM_PROMPTS,
                  lists: list[dict] | None = None) -> list[CobsatSample]:
    """CoBSAT's first `n` k-shot samples of a task, exactly as `load_dataset(shot, 'default', task_id)` builds them."""
    task = get_task(task_id)
    if not 1 <= shot <= MAX_SHOT:
        raise InputError(f"shot must be in 1..{MAX_SHOT} (the hidden value is entry shot + 1 of a 10-entry list), "
                         f"got {shot}.")
    if not 1 <= n <= NUM_PROMPTS:
        raise InputError(f"n must be in 1..{NUM_PROMPTS}, got {n}.")
    lists = load_prompt_lists(root) if lists is None else lists
    samples = []
    for i in range(n):
        x_idxs, theta_idxs = lists[i]["x_list"], lists[i]["theta_list"]
        theta = task.theta_list[theta_idxs[shot + 1]]
        x_items = [task.x_list[x_idxs[j]] for j in range(shot + 1)]
        x_words = [word(x) for x in x_items]
        if task.x_side == "obj":
            gt_obj, gt_detail = x_items[-1], theta
        else:
            gt_obj, gt_detail = theta, x_items[-1]
        samples.append(CobsatSample(
            task_id=task_id, shot=shot, index=i, theta=theta, x_items=x_items, x_words=x_words,
            text_inputs=[f"{w}: " for w in x_words],
            image_paths=[str(image_path(root, task, x_items[j], theta)) for j in range(shot)],
            save_path=f"{i}_{theta}_{'_'.join(x_words)}",
            gt_detail=gt_detail, gt_obj=gt_obj,
            true_label_detail=ITEM_DICT[task.detail_space].index(gt_detail) + 1,
            true_label_obj=ITEM_DICT[task.obj_space].index(gt_obj) + 1))
    return samples


# ------------------------------------------------------------------------------------------------ prompts

THINKDIFF_INSTRUCTION = (
    "I give you several words and pictures. First, please analyse what the next picture is. Then give me a detailed "
    "diffusion prompt to describe the next picture. Please only provide me the detailed prompt and start the answer "
    "with 'Create an image'.\n\n")
FORMATTERS = ("thinkdiff", "cobsat")


def format_prompt(sample: CobsatSample, formatter: str = "thinkdiff", instruction: str | None = None,
                  suffix: str = "", vision_ids: bool = False) -> str:
    """The VLM prompt with one `<image>` marker per in-context image.

    thinkdiff: `instruction` (default: ThinkDiff's CoBSAT question) + "Word 1: x1, <image>"
               + "\\n\\nWord 2: x2, <image>" ... + "\\n\\nWord k+1: x_{k+1}, " + suffix
    cobsat:    `instruction` (default "") + "x1: <image>x2: <image>...x_{k+1}: " + suffix (CoBSAT's wrappers; SEED,
               Emu and Emu2 use empty instructions for image generation)

    `vision_ids` writes "Picture i: " before image i, the text Qwen2-VL's chat template inserts with
    `add_vision_id=True` (ThinkDiff's Qwen2-VL run); the rendered chat text is the same.
    """
    if formatter == "thinkdiff":
        texts = [("" if i == 0 else "\n\n") + f"Word {i + 1}: " + t[0:-2] + ", "
                 for i, t in enumerate(sample.text_inputs)]
        head = THINKDIFF_INSTRUCTION if instruction is None else instruction
    elif formatter == "cobsat":
        texts = list(sample.text_inputs)
        head = "" if instruction is None else instruction
    else:
        raise InputError(f"Unknown prompt formatter {formatter!r}; choose one of {', '.join(FORMATTERS)}.")
    def image(i):
        if i >= len(sample.image_paths):
            return ""
        return (f"Picture {i + 1}: " if vision_ids else "") + IMAGE_MARKER

    body = "".join(t + image(i) for i, t in enumerate(texts))
    return head + body + suffix


# ------------------------------------------------------------------------------- judging (evaluation_icl.py)

QUESTION_MAX_CHARS = 2047  # evaluation_icl.py sends prompts[mode][:2047]


def judge_questions(task: TaskSpec) -> dict[str, str]:
    """`get_eval_prompt(category_space, item_list, 'image')`: {'detail': ..., 'obj': ...}, in that order."""
    prompts = {
        "detail": f"What is the {task.detail_space} (of the main object) in this image? "
                  "Answer from the following options: ",
        "obj": "What is the main object in this image? Answer from the following options: ",
    }
    items = {"detail": ITEM_DICT[task.detail_space], "obj": ITEM_DICT[task.obj_space]}
    for mode in prompts:
        for i, item in enumerate(items[mode]):
            prompts[mode] += f" ({i + 1}){word(item)}"
        prompts[mode] += ". Answer the number only and do not include any other texts (e.g., 1)."
    return prompts


def parse_option(response: str, num_options: int = 10) -> int:
    """CoBSAT's parser: all digits of the reply concatenated; an integer in 1..num_options counts, else -1.

    "1 or 2" -> 12 -> -1. Where CoBSAT's `int()` would raise (digits that are not decimal, such as "²"), -1."""
    digits = "".join(filter(str.isdigit, response or ""))
    if not digits:
        return -1
    try:
        value = int(digits)
    except ValueError:
        return -1
    return value if value in range(1, num_options + 1) else -1


@dataclass
class Verdict:
    prompt_detail: str | None = None
    prompt_obj: str | None = None
    response_detail: str | None = None
    response_obj: str | None = None
    answer_detail: int | None = None
    answer_obj: int | None = None
    check_detail: bool = False
    check_obj: bool = False
    check_textual: bool = False
    check_visual: bool = False
    correct: bool = False
    missing: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def score(sample: CobsatSample, responses: dict[str, str] | None) -> Verdict:
    """The verdict from the judge's two replies; `None` (no image) is a missing output: wrong on every check."""
    task = sample.task
    if responses is None:
        return Verdict(missing=True)
    questions = judge_questions(task)
    true = {"detail": sample.true_label_detail, "obj": sample.true_label_obj}
    answers = {mode: parse_option(responses[mode], len(ITEM_DICT[getattr(task, f"{mode}_space")]))
               for mode in questions}
    checks = {mode: answers[mode] == true[mode] for mode in questions}
    return Verdict(prompt_detail=questions["detail"], prompt_obj=questions["obj"],
                   response_detail=responses["detail"], response_obj=responses["obj"],
                   answer_detail=answers["detail"], answer_obj=answers["obj"],
                   check_detail=checks["detail"], check_obj=checks["obj"],
                   check_textual=checks[task.x_side], check_visual=checks[task.theta_side],
                   correct=checks["detail"] and checks["obj"])


@dataclass
class CobsatProtocol:
    """What a run's numbers depend on, stored with the summary."""

    prompt_seed: int = PROMPT_SEED
    num_prompts: int = NUM_PROMPTS
    lists_sha256: str = field(default="")

    @classmethod
    def current(cls) -> "CobsatProtocol":
        import hashlib

        text = json.dumps(prompt_lists(), separators=(",", ":"))
        return cls(lists_sha256=hashlib.sha256(text.encode()).hexdigest())
