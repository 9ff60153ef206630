"""Side-by-side evaluation of the FP16 reference and quantized models on a VQA JSONL set.

Every figure of a comparison comes from one run over the same samples: exact-match accuracy of greedy
answers, mean answer-token negative log-likelihood, and mean KL(FP16 || quantized) of the next-token
distributions over the answer tokens (the most sensitive of the three: it moves before accuracy does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm.auto import tqdm

from tlq.data.calibration import build_sample
from tlq.data.records import CalibRecord, reference_answer
from tlq.eval.paired import Flips, flips
from tlq.models.base import ModelAdapter, tree_to


@dataclass
class EvalConfig:
    max_new_tokens: int = 8  # answers in short-answer VQA are a few tokens
    max_seq_len: int | None = None  # None: the model's context length (visual tokens are never cut)


@dataclass
class ModelScores:
    """Scores of one model over the evaluation set."""

    name: str
    accuracy: float  # exact match, fraction in [0, 1]
    nll: float  # mean answer-token negative log-likelihood (nats)
    kl: float | None = None  # mean KL(FP16 || this) over answer tokens; None for the reference
    retained_pct: float | None = None  # 100 * accuracy / FP16 accuracy
    num_samples: int = 0
    predictions: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)  # per sample, for paired tests between models
    flips: Flips | None = None  # answers whose right/wrong differs from FP16's; None for the reference

    @property
    def correct_bits(self) -> str:
        """``correct`` as a "1"/"0" string: how reports store it (compact, and pairs line up by position)."""
        return "".join("1" if c else "0" for c in self.correct)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "accuracy": self.accuracy,
            "nll": self.nll,
            "kl": self.kl,
            "retained_pct": self.retained_pct,
            "num_samples": self.num_samples,
            "correct": self.correct_bits,
            "flips": None if self.flips is None else self.flips.to_dict(),
        }


def normalize_answer(text: str) -> str:
    """Lower-case, trim, drop a trailing period and collapse spaces (the usual VQA exact-match rule)."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".").strip()


def _prompt_inputs(processor: Any, record: CalibRecord) -> dict[str, Tensor]:
    """The conversation up to (not including) the first assistant answer, with the generation prompt."""
    first_answer = next(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    text = processor.apply_chat_template(record.messages[:first_answer], tokenize=False, add_generation_prompt=True)
    image = Image.open(record.image).convert("RGB") if record.image is not None else None
    return dict(processor(text=[text], images=[image] if image is not None else None, return_tensors="pt"))


@torch.no_grad()
def greedy_answer(model: nn.Module, processor: Any, record: CalibRecord, device: torch.device, max_new_tokens: int) -> str:
    inputs = tree_to(_prompt_inputs(processor, record), device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = out[0, inputs["input_ids"].shape[1]:]
    return processor.tokenizer.decode(new_tokens, skip_special_tokens=True)


@torch.no_grad()
def teacher_forced(model: nn.Module, processor: Any, adapter: ModelAdapter, record: CalibRecord, device: torch.device, max_seq_len: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """One forward over the whole conversation: the log-probabilities predicting each answer token
    ([n_answer, vocab], float32 CPU), their targets, and the answer tokens' positions in the sequence."""
    sample = build_sample(record, processor, adapter, model, max_seq_len)
    logits = model(**tree_to(sample.inputs, device), use_cache=False).logits[0].float().cpu()
    ids = sample.inputs["input_ids"][0]
    pos = sample.answer_mask.nonzero().flatten()
    pos = pos[pos > 0]
    return F.log_softmax(logits[pos - 1], dim=-1), ids[pos], pos


# Generation settings that make greedy decoding differ from the plain arg-max of the logits (penalties,
# banned or forced tokens, a minimum length, beams), each with the values that leave it the arg-max.
_ARG_MAX_VALUES: dict[str, tuple[Any, ...]] = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "min_length": (None, 0), "min_new_tokens": (None, 0), "num_beams": (None, 1),
    "guidance_scale": (None, 1.0), "bad_words_ids": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "exponential_decay_length_penalty": (None,), "penalty_alpha": (None,), "dola_layers": (None,), "watermarking_config": (None,),
}


def _leaves_arg_max(value: Any, neutral: tuple[Any, ...]) -> bool:
    """One generation setting is neutral: one of its neutral values, or an empty list (no banned tokens)."""
    return value == [] or value in neutral


def shortcut_eos_ids(model: nn.Module) -> set[int]:
    """The end-of-sequence ids that let a teacher-forced answer stand for a generated one; empty (no
    shortcut) when the model's generation config makes greedy decoding more than the arg-max, as a
    released model's repetition penalty does."""
    gc = getattr(model, "generation_config", None)
    if gc is None or not all(_leaves_arg_max(getattr(gc, k, None), ok) for k, ok in _ARG_MAX_VALUES.items()):
        return set()
    eos = gc.eos_token_id
    return set() if eos is None else {int(e) for e in ([eos] if isinstance(eos, int) else eos)}


def greedy_from_teacher_forcing(lp: Tensor, targets: Tensor, pos: Tensor, record: CalibRecord, eos: set[int], max_new_tokens: int) -> Tensor | None:
    """The tokens greedy decoding would produce, read off the teacher-forced forward when it already
    shows them: the record has one answer, every answer token (its end-of-turn token included) is the
    arg-max after its prefix, the last is an end-of-sequence token and the answer fits ``max_new_tokens``.
    None otherwise, and the caller decodes for real.

    Why: on a model that answers right, generation repeats the forward the NLL already needs, token by
    token; skipping it saves about a quarter of the cost of scoring a model that answers three in four
    right. A sample the model gets wrong still goes through ``generate``, so what it predicts (and how
    the answer is normalised) is unchanged.
    """
    if sum(m["role"] == "assistant" for m in record.messages) != 1 or len(targets) == 0 or len(targets) > max_new_tokens:
        return None
    if bool((pos.diff() != 1).any()) or int(targets[-1]) not in eos:
        return None
    return targets if bool((lp.argmax(dim=-1) == targets).all()) else None


def score_model(name: str, model: nn.Module, processor: Any, adapter: ModelAdapter, records: list[CalibRecord], device: torch.device, cfg: EvalConfig, reference: list[Tensor] | None = None, progress: bool = True) -> tuple[ModelScores, list[Tensor]]:
    """Accuracy, NLL and (given the reference's log-probs) KL of one model; returns its log-probs too."""
    nll_sum, n_tok, kl_sum = 0.0, 0, 0.0
    logps: list[Tensor] = []
    preds: list[str] = []
    hits: list[bool] = []
    eos = shortcut_eos_ids(model)
    for i, rec in enumerate(tqdm(records, desc=f"eval {name}", disable=not progress, unit="sample")):
        lp, targets, pos = teacher_forced(model, processor, adapter, rec, device, cfg.max_seq_len)
        greedy = greedy_from_teacher_forcing(lp, targets, pos, rec, eos, cfg.max_new_tokens)
        if greedy is not None:
            pred = processor.tokenizer.decode(greedy, skip_special_tokens=True)
        else:
            pred = greedy_answer(model, processor, rec, device, cfg.max_new_tokens)
        preds.append(pred)
        hits.append(normalize_answer(pred) == normalize_answer(reference_answer(rec)))
        nll_sum += float(-lp.gather(1, targets[:, None]).sum())
        n_tok += len(targets)
        if reference is not None:
            ref = reference[i]
            kl_sum += float((ref.exp() * (ref - lp)).sum())
        logps.append(lp)
    scores = ModelScores(
        name=name,
        accuracy=sum(hits) / len(records),
        nll=nll_sum / max(n_tok, 1),
        kl=kl_sum / max(n_tok, 1) if reference is not None else None,
        num_samples=len(records),
        predictions=preds,
        correct=hits,
    )
    return scores, logps


def compare(reference: ModelScores, scores: ModelScores) -> ModelScores:
    """Fill in the % of the reference's accuracy that ``scores`` retains (None if the reference scores 0) and
    its flips against the reference (same samples)."""
    scores.retained_pct = 100.0 * scores.accuracy / reference.accuracy if reference.accuracy > 0 else None
    scores.flips = flips(reference.correct, scores.correct)
    return scores
