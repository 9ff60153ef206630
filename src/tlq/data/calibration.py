"""Calibration data: JSONL records -> processor inputs with modality and answer masks.

One sample per line, exactly ``{"image": "...", "question": "...", "answer": "..."}`` (image path
relative to the JSONL file, or absolute), or ``{"image": "...", "messages": [...]}`` in the usual chat
format. The model's own processor and chat template build the inputs, so calibration sees the same
token layout as inference.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from tlq.config import ConfigError

_ROLES = ("system", "user", "assistant")


@dataclass
class CalibRecord:
    """One parsed JSONL line: an image path and a chat conversation."""

    image: Path | None
    messages: list[dict[str, Any]]
    line: int


@dataclass
class CalibSample:
    """Processor inputs for one sample plus the per-token masks the method needs."""

    inputs: dict[str, torch.Tensor]  # batch of one, on CPU
    visual_mask: torch.Tensor  # bool [seq]: image/video tokens
    answer_mask: torch.Tensor  # bool [seq]: tokens of the assistant's answer(s)

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


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
        return CalibRecord(img_path, msgs, lineno)
    missing = [k for k in ("question", "answer") if k not in obj]
    if missing:
        raise ConfigError(
            f"{where}:{lineno}: missing key(s) {missing}; each line needs "
            '{"image": ..., "question": ..., "answer": ...} or {"image": ..., "messages": [...]}'
        )
    return CalibRecord(img_path, _qa_messages(str(obj["question"]), str(obj["answer"])), lineno)


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


def choose(records: list[CalibRecord], num_samples: int, seed: int) -> list[CalibRecord]:
    """A seeded random subset of ``num_samples`` records (file order kept), or all if fewer."""
    if num_samples <= 0:
        raise ConfigError(f"--num-samples must be positive, got {num_samples}")
    if len(records) <= num_samples:
        return list(records)
    idx = sorted(random.Random(seed).sample(range(len(records)), num_samples))
    return [records[i] for i in idx]


def _encode(processor: Any, messages: list[dict[str, Any]], image: Image.Image | None, add_generation_prompt: bool) -> dict[str, torch.Tensor]:
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    images = [image] if image is not None else None
    return dict(processor(text=[text], images=images, return_tensors="pt"))


def _answer_mask(processor: Any, record: CalibRecord, image: Image.Image | None, input_ids: torch.Tensor) -> torch.Tensor:
    """Mark the tokens of every assistant turn: its text and its end-of-turn token.

    The span runs from the turn's prompt to the end of the turn as the chat template renders it; the
    template's trailing whitespace after the end-of-turn token (e.g. Qwen's newline) is dropped: the
    model is never asked to predict it, and its loss would swamp the answer's in NLL and gradients.
    """
    seq_len = input_ids.shape[0]
    mask = torch.zeros(seq_len, dtype=torch.bool)
    for i, msg in enumerate(record.messages):
        if msg["role"] != "assistant":
            continue
        start = _encode(processor, record.messages[:i], image, True)["input_ids"].shape[1]
        end = min(_encode(processor, record.messages[: i + 1], image, False)["input_ids"].shape[1], seq_len)
        while end > start and not processor.tokenizer.decode(input_ids[end - 1 : end]).strip():
            end -= 1
        mask[start:end] = True
    return mask


def _truncate(inputs: dict[str, torch.Tensor], visual: torch.Tensor, max_seq_len: int, where: str) -> dict[str, torch.Tensor]:
    seq = inputs["input_ids"].shape[1]
    if seq <= max_seq_len:
        return inputs
    if visual[max_seq_len:].any():
        raise ConfigError(f"{where}: visual tokens extend past --max-seq-len {max_seq_len}; raise it or use smaller images")
    return {k: (v[:, :max_seq_len] if v.dim() == 2 and v.shape[1] == seq else v) for k, v in inputs.items()}


def build_sample(record: CalibRecord, processor: Any, adapter: Any, model: Any, max_seq_len: int, where: str = "") -> CalibSample:
    image = Image.open(record.image).convert("RGB") if record.image is not None else None
    inputs = _encode(processor, record.messages, image, False)
    visual = adapter.visual_mask(model, inputs)[0]
    answer = _answer_mask(processor, record, image, inputs["input_ids"][0])
    inputs = _truncate(inputs, visual, max_seq_len, f"{where}:{record.line}")
    seq = inputs["input_ids"].shape[1]
    return CalibSample(inputs=inputs, visual_mask=visual[:seq], answer_mask=answer[:seq])


def load_calibration(path: str | Path, processor: Any, adapter: Any, model: Any, *, num_samples: int, max_seq_len: int, seed: int, shard: Callable[[int], list[int]] | None = None) -> list[CalibSample]:
    """Read, subsample and encode a JSONL calibration set.

    ``shard(n)`` picks which of the ``n`` chosen samples this process encodes (distributed runs);
    the default encodes all of them.
    """
    records = choose(read_jsonl(path), num_samples, seed)
    ids = shard(len(records)) if shard is not None else range(len(records))
    return [build_sample(records[i], processor, adapter, model, max_seq_len, str(path)) for i in ids]
