"""Calibration data: records (the JSONL format, :mod:`tlq.data.records`) -> processor inputs with
modality and answer masks.

The model's own processor and chat template build the inputs, so calibration sees the same token
layout as inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from tlq.config import ConfigError
from tlq.data.records import CalibRecord, choose, open_image, read_jsonl
from tlq.utils.io import notice


@dataclass
class CalibSample:
    """Processor inputs for one sample plus the per-token masks the method needs."""

    inputs: dict[str, torch.Tensor]  # batch of one, on CPU
    visual_mask: torch.Tensor  # bool [seq]: image/video tokens
    answer_mask: torch.Tensor  # bool [seq]: tokens of the assistant's answer(s)
    full_len: int = 0  # tokens the processor produced, before the --max-seq-len cut (0 = not recorded)

    @property
    def seq_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])


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


def context_length(model: Any) -> int:
    """The decoder's context window (the text config's ``max_position_embeddings``): the default cap on
    a sample's length, so that whatever the model's own processor makes of an ordinary image fits
    (LLaVA-OneVision's anyres turns one 448 px image into ~3,700 tokens, 7,000 for larger ones)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "max_position_embeddings", None)
    if not n:
        raise ConfigError("the model's config has no max_position_embeddings; pass --max-seq-len")
    return int(n)


def _truncate(inputs: dict[str, torch.Tensor], visual: torch.Tensor, max_seq_len: int, where: str) -> dict[str, torch.Tensor]:
    seq = inputs["input_ids"].shape[1]
    if seq <= max_seq_len:
        return inputs
    if visual[max_seq_len:].any():
        raise ConfigError(f"{where}: visual tokens extend past --max-seq-len {max_seq_len}; raise it or use smaller images")
    return {k: (v[:, :max_seq_len] if v.dim() == 2 and v.shape[1] == seq else v) for k, v in inputs.items()}


def build_sample(record: CalibRecord, processor: Any, adapter: Any, model: Any, max_seq_len: int | None, where: str = "") -> CalibSample:
    """Encode one record; text past ``max_seq_len`` (None: the model's :func:`context_length`) is cut,
    visual tokens never are (an error says so)."""
    image = open_image(record, where)
    inputs = _encode(processor, record.messages, image, False)
    visual = adapter.visual_mask(model, inputs)[0]
    answer = _answer_mask(processor, record, image, inputs["input_ids"][0])
    full = int(inputs["input_ids"].shape[1])
    inputs = _truncate(inputs, visual, max_seq_len or context_length(model), f"{where}:{record.line}")
    seq = inputs["input_ids"].shape[1]
    return CalibSample(inputs=inputs, visual_mask=visual[:seq], answer_mask=answer[:seq], full_len=full)


def load_calibration(path: str | Path, processor: Any, adapter: Any, model: Any, *, num_samples: int, max_seq_len: int | None, seed: int, shard: Callable[[int], list[int]] | None = None) -> list[CalibSample]:
    """Read, subsample and encode a JSONL calibration set.

    ``shard(n)`` picks which of the ``n`` chosen samples this process encodes (distributed runs);
    the default encodes all of them.
    """
    records = choose(read_jsonl(path), num_samples, seed)
    ids = shard(len(records)) if shard is not None else range(len(records))
    return [build_sample(records[i], processor, adapter, model, max_seq_len, str(path)) for i in ids]


def answers_cut(samples: list[CalibSample]) -> int:
    """How many samples lost their whole answer to ``--max-seq-len`` (answer-less samples count too)."""
    return sum(1 for s in samples if not bool(s.answer_mask.any()))


def check_answers_kept(cut: int, total: int, max_seq_len: int, where: str) -> None:
    """Answers past ``--max-seq-len`` are cut away: when all of them are, importance has no loss and the
    calibration set no answer tokens at all, so refuse; when some are, say how many."""
    if total and cut == total:
        raise ConfigError(f"{where}: every answer lies past --max-seq-len {max_seq_len} (all {cut} samples); raise --max-seq-len")
    if cut:
        notice(f"{where}: {cut} of {total} answers lie past --max-seq-len {max_seq_len} and are cut away")
