"""A PNG contact sheet per shot and task: each row is one sample's in-context images with their words, the query
word, the generated image and the judge's verdict."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import InputError
from .cobsat import ITEM_DICT, TASKS, word

GREEN, RED, GREY = (0, 140, 0), (200, 0, 0), (110, 110, 110)


def _thumb(path: str | Path | None, cell: int) -> Image.Image:
    tile = Image.new("RGB", (cell, cell), (235, 235, 235))
    if path is not None and Path(path).is_file():
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                scale = cell / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                               Image.NEAREST if scale > 1 else Image.BILINEAR)
                tile.paste(im, ((cell - im.width) // 2, (cell - im.height) // 2))
        except OSError:
            pass
    return tile


def make_sheet(records: list[dict], run_dir: str | Path, out_path: str | Path, rows: int = 8, cell: int = 96) -> Path:
    """Draw the first `rows` records (by index) of one shot and task."""
    run_dir, out_path = Path(run_dir), Path(out_path)
    records = sorted(records, key=lambda r: r["index"])[:rows]
    if not records:
        raise InputError("No records to draw.")
    shot = records[0]["shot"]
    task = TASKS[records[0]["task_id"]]
    font = ImageFont.load_default()
    label_h, text_w = 14, 190
    width = (shot + 2) * (cell + 4) + text_w
    height = 22 + len(records) * (cell + label_h + 6)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), f"CoBSAT task {task.task_id} {task.task_name}, {shot}-shot: in-context images | query | "
                      f"generated | judge", fill=(0, 0, 0), font=font)
    detail_items, obj_items = ITEM_DICT[task.detail_space], ITEM_DICT[task.obj_space]
    for row, r in enumerate(records):
        y = 22 + row * (cell + label_h + 6)
        for j in range(shot):
            x = j * (cell + 4)
            sheet.paste(_thumb(r["image_inputs"][j], cell), (x, y))
            draw.text((x + 2, y + cell + 1), r["x_words"][j], fill=(0, 0, 0), font=font)
        x = shot * (cell + 4)
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=GREY)
        draw.text((x + 6, y + cell // 2 - 6), f"{r['x_words'][-1]}: ?", fill=(0, 0, 0), font=font)
        draw.text((x + 2, y + cell + 1), f"#{r['index']}", fill=GREY, font=font)
        x += cell + 4
        image = run_dir / r["image_path"] if r.get("image_path") and not r.get("missing") else None
        sheet.paste(_thumb(image, cell), (x, y))
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=GREEN if r.get("correct") else RED, width=2)
        x += cell + 8
        gt = f"want: {word(r['gt_detail'])} {word(r['gt_obj'])}"
        if r.get("missing"):
            lines = [gt, "MISSING image", "(error)" if r.get("error") else ""]
        else:
            def said(answer, items):
                return word(items[answer - 1]) if answer and 1 <= answer <= len(items) else "?"
            lines = [gt, f"judge: {said(r['answer_detail'], detail_items)} {said(r['answer_obj'], obj_items)}",
                     f"{task.detail_space}: {'ok' if r['check_detail'] else 'wrong'}",
                     f"object: {'ok' if r['check_obj'] else 'wrong'}"]
        lines.append("CORRECT" if r.get("correct") else "wrong")
        for k, line in enumerate(lines):
            colour = (GREEN if r.get("correct") else RED) if k == len(lines) - 1 else (0, 0, 0)
            draw.text((x, y + 2 + 14 * k), line, fill=colour, font=font)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp.png")
    sheet.save(tmp)
    tmp.replace(out_path)
    return out_path
