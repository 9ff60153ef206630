"""Calibration and evaluation records: JSONL lines parsed and checked, images decoded, subsets chosen.

One sample per line, exactly ``{"image": "...", "question": "...", "answer": "..."}`` (image path
relative to the JSONL file, or absolute), or ``{"image": "...", "messages": [...]}`` in the usual chat
format; other keys are kept aside as ``extra`` and never used for calibration (a generator may keep
ground truth there: ``relevant_tokens`` + ``token_grid``, see :func:`relevant_visual_tokens`). Nothing
here needs torch or a
model, so every line and every image is checked in seconds, before a model loads
(:mod:`tlq.preflight`); :mod:`tlq.data.calibration` turns records into model inputs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from tlq.config import ConfigError

_ROLES = ("system", "user", "assistant")
_CORE_KEYS = ("image", "messages", "question", "answer")


@dataclass
class CalibRecord:
    """One parsed JSONL line: an image path and a chat conversation."""

    image: Path | None
    messages: list[dict[str, Any]]
    line: int
    extra: dict[str, Any] = field(default_factory=dict)  # the line's other keys (ground truth), unused by calibration


def relevant_visual_tokens(record: CalibRecord, boxes: Sequence[Sequence[float] | None] | None) -> list[bool] | None:
    """Mask over the first image's visual tokens, given where each looks (``boxes``, see
    ``ModelAdapter.visual_token_boxes``): which ones hold the answer.

    The ground truth is in image space, from the optional keys that a generator such as
    :mod:`tlq.data.needle` writes: ``token_grid`` ([rows, cols] cells over the image) and
    ``relevant_tokens`` (the answer's cells, row-major). A token is relevant when its box overlaps those
    cells by at least half of the smaller of its own area and one cell's (on a grid equal to the cells:
    exactly the answer's tokens; finer tokens: those inside the cells; coarser: those holding them); a
    token without a box (a row separator) never is. ``None`` when the line has no ground truth or the
    model's layout is unknown, so importance is never compared against a layout nobody described.
    """
    grid, rel = record.extra.get("token_grid"), record.extra.get("relevant_tokens")
    if not grid or rel is None or boxes is None:
        return None
    rows, cols = int(grid[0]), int(grid[1])
    cells = [((i % cols) / cols, (i // cols) / rows, (i % cols + 1) / cols, (i // cols + 1) / rows) for i in {int(i) for i in rel}]

    def overlap(a: Sequence[float], b: Sequence[float]) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    def relevant(box: Sequence[float] | None) -> bool:
        if box is None:
            return False
        need = 0.5 * min((box[2] - box[0]) * (box[3] - box[1]), 1 / (rows * cols))
        return sum(overlap(box, c) for c in cells) >= need - 1e-12

    return [relevant(box) for box in boxes]


def _qa_messages(question: str, answer: str | None) -> list[dict[str, Any]]:
    msgs: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


def _parse_line(obj: Any, base: Path, lineno: int, where: str) -> CalibRecord:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}:{lineno}: expected a JSON object per line")
    image = obj.get("image")
    img_path: Path | None = None
    if image is not None:
        img_path = Path(image) if Path(image).is_absolute() else base / image
        if not img_path.is_file():
            raise ConfigError(f"{where}:{lineno}: image {str(img_path)!r} does not exist")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and m.get("role") in _ROLES for m in msgs):
            raise ConfigError(f"{where}:{lineno}: 'messages' must be a list of {{'role', 'content'}} objects")
        return CalibRecord(img_path, msgs, lineno, _extra(obj))
    missing = [k for k in ("question", "answer") if k not in obj]
    if missing:
        raise ConfigError(
            f"{where}:{lineno}: missing key(s) {missing}; each line needs "
            '{"image": ..., "question": ..., "answer": ...} or {"image": ..., "messages": [...]}'
        )
    return CalibRecord(img_path, _qa_messages(str(obj["question"]), str(obj["answer"])), lineno, _extra(obj))


def _extra(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in _CORE_KEYS}


def read_jsonl(path: str | Path) -> list[CalibRecord]:
    """Parse and validate a calibration/evaluation JSONL file (errors name the line and the fix)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"calibration file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            records.append(_parse_line(obj, path.parent, lineno, str(path)))
    if not records:
        raise ConfigError(f"{path} holds no samples")
    return records


def open_image(record: CalibRecord, where: str) -> Image.Image | None:
    """Decode a record's image as RGB, or say which line's image is unreadable and why."""
    if record.image is None:
        return None
    try:
        with Image.open(record.image) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = "empty file" if record.image.stat().st_size == 0 else f"{type(exc).__name__}: {exc}"
        raise ConfigError(f"{where}:{record.line}: image {str(record.image)!r} cannot be decoded ({reason}); replace or remove that line") from None


def verify_images(records: list[CalibRecord], where: str) -> None:
    """Decode every image before any model loads, so a bad one fails in seconds with its line number."""
    for record in records:
        open_image(record, where)


def choose(records: list[CalibRecord], num_samples: int, seed: int) -> list[CalibRecord]:
    """A seeded random subset of ``num_samples`` records (file order kept), or all if fewer."""
    if num_samples <= 0:
        raise ConfigError(f"--num-samples must be positive, got {num_samples}")
    if len(records) <= num_samples:
        return list(records)
    idx = sorted(random.Random(seed).sample(range(len(records)), num_samples))
    return [records[i] for i in idx]


def reference_answer(record: CalibRecord) -> str:
    """The first assistant turn's text: what an evaluation's exact-match accuracy compares against."""
    msg = next(m for m in record.messages if m["role"] == "assistant")
    content = msg["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
