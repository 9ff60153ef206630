#!/usr/bin/env python
"""Train the built-in VLMs from scratch on CPU (``builtin:digits-*`` and ``builtin:needle-*``).

Reproduce the shipped models (fixed seed, deterministic data; see docs/builtin-models.md)::

    OMP_NUM_THREADS=1 python scripts/train_digits.py --family qwen2_vl --out src/tlq/builtin/digits-qwen2vl
    OMP_NUM_THREADS=1 python scripts/train_digits.py --family llava_onevision --out src/tlq/builtin/digits-llavaov
    OMP_NUM_THREADS=1 python scripts/train_digits.py --task needle --family qwen2_vl --out src/tlq/builtin/needle-qwen2vl
    OMP_NUM_THREADS=1 python scripts/train_digits.py --family qwen3_vl_moe --out src/tlq/builtin/digits-qwen3vlmoe

``--family qwen3_vl_moe`` is Qwen3-VL-30B-A3B's architecture (routed experts, DeepStack, 16-px patches) at the
digits models' width, with ``--experts`` routed experts (``--experts-per-tok`` per token) in every decoder
layer but the last, trained with the family's load-balancing loss: the trained router whose skew decides how
many rows each expert gets from a calibration set.

``--task digits`` (default) is the 2x2 digits VQA of ``tlq.data.digits``; ``--task needle`` is the sparse-relevance
needle VQA of ``tlq.data.needle`` (64 visual tokens, one of which holds the answer, behind a preamble).

What it does, in order:

1. ``tlq.models.tiny.make_tiny_vlm`` writes an untrained checkpoint (config, tokenizer trained on the digits
   corpus, processor, chat template) into ``--out``; the weights are then trained in memory.
2. Vision pretraining (``--vision-steps``): vision tower + merger/projector with an auxiliary linear classifier
   that reads each visual token and predicts the digit under it.
3. Joint training (``--steps``): every sequence holds ``turns_per_sample`` question/answer turns about one
   image (multi-turn from step 0), cross-entropy only on answer tokens (+ their ``<|im_end|>``), the
   auxiliary digit loss kept on with weight ``--aux-weight``. AdamW, linear warm-up, cosine decay.
   Training data are drawn on the fly from the digits ``train`` split (batch ``k`` = samples
   ``k*B .. k*B+B-1``), validation is greedy exact match on the ``val`` split.
   Stops at ``--steps`` or at the wall-clock budget ``--max-minutes``, whichever comes first.
4. Outlier reparametrisation (``--outlier-scale a``, a power of two): for every decoder layer and each of its
   two RMSNorms, the ``--outlier-channels`` channels with the largest norm weight get their norm weight
   divided by ``a`` and the matching input column of every Linear that reads that norm (q/k/v after
   ``input_layernorm``, gate/up after ``post_attention_layernorm``) multiplied by ``a``. Exact in float32 and
   bfloat16 (powers of two); the script checks the logits are unchanged. It gives the decoder weights the
   outlier columns real LLMs have, which makes RTN damage measurable (docs/builtin-models.md).
5. Saves safetensors (``--save-dtype``) in the same directory, writes ``calib.jsonl`` (128 samples,
   calibration split) and ``test.jsonl`` (500 samples, test split) with their images, and
   ``tlq_tiny.json`` with the training record and measurements.
6. Measures greedy exact-match accuracy on ``test.jsonl`` for the FP model and in-memory RTN W3A16 / W4A16
   (every Linear of ``model.model.language_model.layers`` replaced by its fake-quantized weight).

``--measure-only`` skips 1-5 and measures an existing directory; ``--sweep-scales 1,4,8`` measures
what other outlier scales would give (on a copy in memory, nothing written).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dataclasses import dataclass, field
from typing import Any

from tlq.data import digits, needle
from tlq.data.digits import DigitsVQAConfig
from tlq.data.needle import NeedleVQAConfig

# Question types of the built-in benchmark. "sum" (two-token answers 0..36, needs exact 4-term addition) and
# "parity" are left out: a 4-layer, 128-wide decoder does not learn them within a CPU half hour, and they
# would cap FP accuracy below the 90% the benchmark needs.
BUILTIN_QUESTION_TYPES = ("digit", "compare", "count", "max", "min")


@dataclass
class Task:
    """What the script needs to know about a dataset: its generator, configs, cell grid and aux targets.

    ``marks`` is the auxiliary per-cell class a small head predicts from each visual token: the cell's
    position for digits (so a token knows where it is), the frame colour for needle (so a token knows
    whether, and how, it is marked).
    """

    name: str
    data: Any  # the tlq.data module: generate_samples(split, n, cfg, start=), corpus(cfg)
    cfg: Any  # training data config
    bench_cfg: Any  # config of the shipped calib/val/test sets
    image_size: int  # make_tiny_vlm's image_size (Qwen: max_pixels = (4 * image_size) ** 2)
    num_marks: int
    bench_sets: dict[str, tuple[str, int]] = field(default_factory=dict)  # file stem -> (split, size)
    # Words naming marks 1..num_marks-1 (needle: the frame colours). When given, those marks are classified
    # with the decoder's own input embeddings of the words, as digits are with "0".."9": a token framed in
    # red lands near the word " red", so the question's colour word can find it by attention.
    mark_words: tuple[str, ...] = ()
    # Training data of the first --curriculum-steps (needle: no unframed digits, no background strokes, so
    # the answer's token is one of few and the lookup gets a gradient before it must ignore clutter).
    easy_cfg: Any = None

    @property
    def grid(self) -> tuple[int, int]:
        return (self.cfg.rows, self.cfg.cols)

    @property
    def num_cells(self) -> int:
        return self.cfg.num_cells

    def generate(self, split: str, n: int, start: int = 0, bench: bool = False, easy: bool = False) -> list:
        cfg = self.bench_cfg if bench else (self.easy_cfg if easy and self.easy_cfg is not None else self.cfg)
        return self.data.generate_samples(split, n, cfg, start=start)

    def digit_targets(self, samples) -> torch.Tensor:
        """[B, cells] digit under each cell, -100 where there is none (ignored by the loss)."""
        t = torch.tensor([s.labels for s in samples])
        return t.masked_fill(t < 0, -100)

    def mark_targets(self, samples) -> torch.Tensor:
        if self.name == "digits":
            return torch.arange(self.num_cells).repeat(len(samples), 1)
        return torch.tensor([s.marks for s in samples])


def needle_options(pairs: list[str]) -> dict:
    """``["noise_std=0.25", "intensity_range=(0.4, 1.0)"]`` -> NeedleVQAConfig overrides, each value parsed
    as a Python literal and checked against the field's default type (so a typo fails before training)."""
    import ast
    from dataclasses import fields

    known = {f.name: f.default for f in fields(NeedleVQAConfig)}
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--needle-option {pair!r}: expected FIELD=VALUE with FIELD one of {', '.join(known)}")
        value = ast.literal_eval(text)
        if isinstance(known[key], float) and isinstance(value, int):
            value = float(value)
        if known[key] is not None and type(value) is not type(known[key]):
            raise SystemExit(f"--needle-option {pair!r}: {key} takes a {type(known[key]).__name__}, got {value!r}")
        out[key] = value
    return out


# make_tiny_vlm's image_size for the 224-px needle pages (8 x 8 cells of 28 px). Qwen2-VL: 56 gives
# max_pixels 224^2, so each 28-px cell is one merged token. LLaVA-OneVision: the SigLIP base tile is the
# page resized to 112 px, so each cell (14 px there, the 8-px digit scans still legible) is one 14-px
# patch, and the anyres tile of the default pinpoints adds a second 64-token view plus one newline per row.
NEEDLE_IMAGE_SIZE = {"qwen2_vl": 56, "llava_onevision": 112}

#: Families whose ViT is ``model.model.visual`` and yields one merged token per digits cell (Qwen2-VL: 28-px
#: cells of the 56-px image; Qwen3-VL: the processor resizes it to 64 px, 32-px cells), in reading order.
QWEN_VISION_FAMILIES = ("qwen2_vl", "qwen3_vl_moe")
#: The short family name in a built-in's name (``digits-qwen3vlmoe``).
FAMILY_TAGS = {"qwen2_vl": "qwen2vl", "llava_onevision": "llavaov", "qwen3_vl_moe": "qwen3vlmoe"}
MOE_FAMILY = "qwen3_vl_moe"


def make_task(args) -> Task:
    if args.task == "needle":
        asked = tuple(args.needle_asked.split(",")) if args.needle_asked else tuple(needle.FRAME_COLOURS)
        cfg = NeedleVQAConfig(seed=args.seed, asked_colours=asked, **needle_options(args.needle_option))
        sets = {"calib": ("calibration", args.calib_samples), "val": ("val", args.bench_val_samples), "test": ("test", args.test_samples or 1000)}
        from dataclasses import replace

        # the easy data of the curriculum: no clutter, or the fields --curriculum-option names
        # (a count question keeps its digits: the plain ones are what it counts)
        clutter = {"num_fragments": 0} if cfg.question == "count" else {"num_plain": 0, "num_fragments": 0}
        easy = replace(cfg, **needle_options(args.curriculum_option)) if args.curriculum_option else replace(cfg, **clutter)
        size = NEEDLE_IMAGE_SIZE[args.family]
        return Task("needle", needle, cfg, cfg, size, 1 + len(needle.FRAME_COLOURS), sets, tuple(needle.FRAME_COLOURS), easy)
    cfg = DigitsVQAConfig(seed=args.seed, question_types=BUILTIN_QUESTION_TYPES)
    bench_types = BUILTIN_QUESTION_TYPES if args.bench_question_types == "train" else tuple(args.bench_question_types.split(","))
    bench_cfg = DigitsVQAConfig(seed=args.seed, question_types=bench_types)
    sets = {"calib": ("calibration", args.calib_samples), "val": ("val", args.bench_val_samples), "test": ("test", args.test_samples or 500)}
    return Task("digits", digits, cfg, bench_cfg, 56, cfg.num_digits, sets)

ANSWER_PREFIX = "<|im_start|>assistant\n"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data
def conversation(turns, first_with_image: bool = True):
    msgs = []
    for k, (q, a) in enumerate(turns):
        content = [{"type": "image"}, {"type": "text", "text": q}] if (k == 0 and first_with_image) else [{"type": "text", "text": q}]
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": a}]})
    return msgs


class Batcher:
    """Encodes digits samples with the model's own processor and chat template."""

    def __init__(self, processor, family: str):
        self.processor = processor
        self.family = family
        tok = processor.tokenizer
        self.prefix = tok(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
        self.im_end = tok.convert_tokens_to_ids("<|im_end|>")
        # ids that are never text: special tokens and the image's placeholder (text_lm_loss skips them)
        self.non_text_ids = torch.tensor(sorted(set(tok.all_special_ids) | {getattr(processor, "image_token_id", -1)}))

    def answer_labels(self, ids: torch.Tensor) -> torch.Tensor:
        """Labels = ids on answer tokens (from after '<|im_start|>assistant\\n' through '<|im_end|>'), else -100."""
        labels = torch.full_like(ids, -100)
        p = len(self.prefix)
        for b in range(ids.shape[0]):
            row = ids[b].tolist()
            i = 0
            while i <= len(row) - p:
                if row[i : i + p] == self.prefix:
                    j = i + p
                    while j < len(row) and row[j] != self.im_end:
                        j += 1
                    labels[b, i + p : min(j + 1, len(row))] = ids[b, i + p : min(j + 1, len(row))]
                    i = j
                else:
                    i += 1
        return labels

    def train_batch(self, samples) -> dict:
        texts = [self.processor.apply_chat_template(conversation(s.turns), tokenize=False) for s in samples]
        enc = dict(self.processor(text=texts, images=[s.image for s in samples], return_tensors="pt", padding=True))
        enc["labels"] = self.answer_labels(enc["input_ids"])
        return enc

    def images(self, samples) -> dict:
        return dict(self.processor.image_processor([s.image for s in samples], return_tensors="pt"))

    def prompt(self, image, question: str) -> dict:
        text = self.processor.apply_chat_template(conversation([(question, None)]), tokenize=False, add_generation_prompt=True)
        return dict(self.processor(text=[text], images=[image], return_tensors="pt"))


def text_lm_loss(logits: torch.Tensor, enc: dict, batcher: Batcher) -> torch.Tensor:
    """Next-token loss on every text token of the user turns (not the image's tokens, not padding, not the
    answers, which the answer loss has). Why: a model trained on answers alone keeps only what answers
    need and squeezes the rest of the sequence into a few directions of its residual stream; a released
    VLM is a language model first, whose hidden states carry the text's words. Predicting the prompt
    makes this one carry them too (``--lm-weight``)."""
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()
    text = mask & ~torch.isin(ids, batcher.non_text_ids) & (enc["labels"] == -100)
    target = ids[:, 1:].masked_fill(~text[:, 1:], -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------- vision auxiliary
class VisionAux(nn.Module):
    """Auxiliary per-visual-token losses on the features the decoder receives (training only, not saved).

    * digit: the token's digit, with the decoder's own input embeddings of the text tokens "0".."9" as the
      classifier weights, so a visual token that shows a 7 ends up close to the embedding of the word "7"
      (reading, copying and matching digits in the decoder then come easily);
    * position: the token's cell (0..rows*cols-1) with a small linear head, so each visual token also
      carries where it is (Qwen's ViT and M-RoPE only give relative positions).
    """

    def __init__(self, family: str, model, task: Task, digit_ids: list[int], mark_ids: list[int] | None = None):
        super().__init__()
        self.family = family
        self.task = task
        self.num_cells = task.num_cells
        self.rows, self.cols = task.grid
        hidden = model.config.text_config.hidden_size
        self.register_buffer("digit_ids", torch.tensor(digit_ids), persistent=False)
        self.embed = model.model.language_model.embed_tokens  # shared with the model, not owned
        self.digit_bias = nn.Parameter(torch.zeros(10))
        self.digit_scale = nn.Parameter(torch.tensor(4.0))
        self.pos_head = nn.Linear(hidden, task.num_marks)
        self.register_buffer("mark_ids", torch.tensor(mark_ids or [], dtype=torch.long), persistent=False)
        self.none_mark = nn.Parameter(torch.randn(1, hidden) * 0.02)  # class 0 ("no mark") when marks are words
        self.mark_scale = nn.Parameter(torch.tensor(4.0))

    def parameters(self, recurse: bool = True):  # exclude the shared embedding
        return iter([self.digit_bias, self.digit_scale, self.none_mark, self.mark_scale, *self.pos_head.parameters()])

    def mark_logits(self, feats: torch.Tensor) -> torch.Tensor:
        if not len(self.mark_ids):
            return self.pos_head(feats)
        classes = torch.cat([self.none_mark, self.embed.weight[self.mark_ids]])  # [num_marks, hidden]
        return self.mark_scale.exp() * F.normalize(feats, dim=-1) @ F.normalize(classes, dim=-1).T

    def features(self, model, enc: dict) -> torch.Tensor:
        """[B, tokens, hidden] visual features of each image (base tile for LLaVA-OV)."""
        if self.family in QWEN_VISION_FAMILIES:
            out = model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"]).pooler_output
            # one merged token per cell, raster order = the cells' reading order
            return out.reshape(-1, self.num_cells, out.shape[-1])
        pv = enc["pixel_values"][:, 0]  # base tile: the whole image at the SigLIP resolution
        hs = model.model.vision_tower(pv, output_hidden_states=True, return_dict=True).hidden_states[-1]
        return model.model.multi_modal_projector(hs)  # [B, g*g, hidden]

    def token_cells(self, n_tokens: int) -> torch.Tensor:
        if self.family in QWEN_VISION_FAMILIES:
            return torch.arange(self.num_cells)
        g = int(math.isqrt(n_tokens))  # g x g patches over the rows x cols grid of digits
        r = torch.arange(g)[:, None] * self.rows // g
        c = torch.arange(g)[None, :] * self.cols // g
        return (r * self.cols + c).reshape(-1)

    def loss_acc(self, model, enc: dict, samples) -> tuple[torch.Tensor, float]:
        feats = self.features(model, enc)
        cells = self.token_cells(feats.shape[1])
        target = self.task.digit_targets(samples)[:, cells]  # [B, tokens]
        emb = self.embed.weight[self.digit_ids]  # [10, hidden]
        f = F.normalize(feats, dim=-1)
        e = F.normalize(emb, dim=-1)
        logits = self.digit_scale.exp() * f @ e.T + self.digit_bias
        loss = F.cross_entropy(logits.reshape(-1, 10), target.reshape(-1), ignore_index=-100)
        mark_logits = self.mark_logits(feats)
        marks = self.task.mark_targets(samples)[:, cells]
        loss = loss + F.cross_entropy(mark_logits.reshape(-1, self.task.num_marks), marks.reshape(-1))
        has = target >= 0
        acc = float((logits.argmax(-1) == target)[has].float().mean())
        return loss, acc


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def greedy(model, batcher: Batcher, image, question: str, max_new_tokens: int = 6) -> str:
    inputs = batcher.prompt(image, question)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return batcher.processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def norm_answer(s: str) -> str:
    return " ".join(s.strip().lower().split()).rstrip(".").strip()


@torch.no_grad()
def accuracy(model, batcher: Batcher, samples) -> float:
    was_training = model.training
    model.eval()
    ok = sum(norm_answer(greedy(model, batcher, s.image, s.question)) == norm_answer(s.answer) for s in samples)
    model.train(was_training)
    return ok / max(len(samples), 1)


@torch.no_grad()
def accuracy_by_type(model, batcher: Batcher, samples) -> tuple[float, dict]:
    model.eval()
    per: dict[str, list[int]] = {}
    for s in samples:
        ok = norm_answer(greedy(model, batcher, s.image, s.question)) == norm_answer(s.answer)
        per.setdefault(s.qtype, []).append(int(ok))
    total = sum(sum(v) for v in per.values()) / max(len(samples), 1)
    return total, {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}


# ------------------------------------------------------------------------------- quantization helpers
def decoder_layers(model) -> nn.ModuleList:
    return model.model.language_model.layers


@torch.no_grad()
def rtn_fake_quant(model, scheme: str) -> None:
    """Replace every decoder Linear weight by its RTN quantize-dequantize (in place)."""
    from tlq.config import SCHEMES
    from tlq.quant.quantizer import compute_qparams, dequantize_codes, quantize_codes

    spec = SCHEMES[scheme].weights
    for w in decoder_weights(model):
        scale, zero = compute_qparams(w, spec)
        codes = quantize_codes(w, scale, zero, spec)
        w.copy_(dequantize_codes(codes, scale, zero, spec).to(w.dtype))


def decoder_weights(model) -> list[torch.Tensor]:
    """Every quantization target of the decoder as an [out, in] matrix: each Linear's weight, and each routed
    expert's gate_up / down matrix (slices of the experts' 3-D parameters, so writing one writes the model).
    The router stays in 16 bits, as tlq keeps it."""
    out = []
    for mod in decoder_layers(model).modules():
        if isinstance(mod, nn.Linear):
            out.append(mod.weight.data)
        elif hasattr(mod, "gate_up_proj") and hasattr(mod, "down_proj") and not isinstance(mod.down_proj, nn.Module):
            out += [*mod.gate_up_proj.data.unbind(0), *mod.down_proj.data.unbind(0)]
    return out


@torch.no_grad()
def add_outliers(model, scale: float, channels: int) -> list[dict]:
    """Exact function-preserving reparametrisation: norm channel / a, reading Linear input column * a."""
    if scale == 1 or channels <= 0:
        return []
    if 2.0 ** round(math.log2(scale)) != scale:
        raise ValueError(f"--outlier-scale must be a power of two (exact in bf16/fp32), got {scale}")
    record = []
    for li, layer in enumerate(decoder_layers(model)):
        for name in NORMS:
            norm = getattr(layer, name)
            idx = torch.topk(norm.weight.detach().abs().float(), channels).indices.sort().values
            norm.weight[idx] /= scale
            for w in norm_readers(layer, name):
                w[..., idx] *= scale
            record.append({"layer": li, "norm": name, "channels": idx.tolist()})
    return record


NORMS = ("input_layernorm", "post_attention_layernorm")


def norm_readers(layer, norm: str) -> list[torch.Tensor]:
    """The weights that read ``norm``'s output, input channels on the last dim: q/k/v after the input norm;
    after the post-attention norm gate/up, or in a MoE layer every expert's gate_up and the router (whose
    logits, and so the routing, the reparametrisation then leaves unchanged)."""
    if norm == "input_layernorm":
        return [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]
    mlp = layer.mlp
    if hasattr(mlp, "experts"):
        return [mlp.experts.gate_up_proj, mlp.gate.weight]
    return [mlp.gate_proj.weight, mlp.up_proj.weight]


@torch.no_grad()
def max_logit_diff(model_a, model_b, batcher: Batcher, samples) -> float:
    diff = 0.0
    for s in samples:
        inputs = batcher.prompt(s.image, s.question)
        la = model_a(**inputs).logits
        lb = model_b(**inputs).logits
        diff = max(diff, float((la - lb).abs().max()))
    return diff


def measure(model, batcher: Batcher, test_samples, label: str = "") -> dict:
    res = {}
    for scheme in ("fp", "w3a16", "w4a16"):
        m = model if scheme == "fp" else copy.deepcopy(model)
        if scheme != "fp":
            rtn_fake_quant(m, scheme)
        t0 = time.time()
        acc, per = accuracy_by_type(m, batcher, test_samples)
        res[scheme] = {"accuracy": round(acc, 4), "by_type": per}
        log(f"{label}{scheme:6s} test accuracy {100 * acc:.1f}%  {per}  ({time.time() - t0:.0f}s)")
    return res


# ------------------------------------------------------------------------------------------- training
def lr_at(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * t))


def vision_params(model, family: str):
    if family in QWEN_VISION_FAMILIES:
        return list(model.model.visual.parameters())
    return list(model.model.vision_tower.parameters()) + list(model.model.multi_modal_projector.parameters())


def train(args, model, processor, task: Task, aux: VisionAux, val_samples) -> dict:
    batcher = Batcher(processor, args.family)
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes
    hist: dict = {"vision": [], "joint": []}
    from tqdm.auto import tqdm

    # --- stage 1: vision tower + merger/projector with the per-token digit classifier
    if args.vision_steps > 0:
        params = vision_params(model, args.family) + list(aux.parameters()) + [aux.embed.weight]
        opt = torch.optim.AdamW(params, lr=args.vision_lr, weight_decay=0.0)
        model.train()
        bar = tqdm(range(args.vision_steps), desc="vision", mininterval=10, file=sys.stdout)
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.vision_steps, 20, args.vision_lr, args.vision_lr * 0.1)
            n = 2 * args.batch_size
            samples = task.generate("train", n, start=10_000_000 + step * n, easy=args.vision_easy)
            enc = batcher.images(samples)
            loss, acc = aux.loss_acc(model, enc, samples)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}", refresh=False)
            if step % 50 == 0 or step == args.vision_steps - 1:
                hist["vision"].append({"step": step, "loss": round(loss.item(), 4), "token_acc": round(acc, 4)})
        log(f"vision stage done: token acc {acc:.3f} ({time.time() - t_start:.0f}s)")

    # --- stage 2: everything, multi-turn answer loss (+ auxiliary digit loss)
    params = list(model.parameters()) + list(aux.parameters())
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    best = -1.0
    ema = None
    steps_done = 0
    bar = tqdm(range(args.steps), desc="train", mininterval=10, file=sys.stdout)
    for step in bar:
        if time.time() > deadline:
            print(file=sys.stdout)
            log(f"wall-clock budget of {args.max_minutes} min reached at step {step}")
            break
        lr = lr_at(step, args.steps, args.warmup, args.lr, args.lr * args.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        samples = task.generate("train", args.batch_size, start=step * args.batch_size, easy=step < args.curriculum_steps)
        enc = batcher.train_batch(samples)
        # the MoE family's load-balancing loss (router_aux_loss_coef) is part of out.loss when asked for,
        # as in the released models' training; out.aux_loss is it alone
        out = model(**enc, use_cache=False, **({"output_router_logits": True} if args.family == MOE_FAMILY else {}))
        loss = out.loss
        if args.lm_weight > 0:
            loss = loss + args.lm_weight * text_lm_loss(out.logits, enc, batcher)
        if args.aux_weight > 0:
            aux_loss, _ = aux.loss_acc(model, enc, samples)
            loss = loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        steps_done = step + 1
        balance = getattr(out, "aux_loss", None)
        answer_loss = out.loss.item() - (0.0 if balance is None else balance.item() * model.config.text_config.router_aux_loss_coef)
        ema = answer_loss if ema is None else 0.98 * ema + 0.02 * answer_loss
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}", refresh=False)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc, per = accuracy_by_type(model, batcher, val_samples)
            model.train()
            best = max(best, acc)
            hist["joint"].append({"step": step + 1, "loss_ema": round(ema, 4), "val_acc": round(acc, 4), "val_by_type": per, "minutes": round((time.time() - t_start) / 60, 2)})
            print(file=sys.stdout)
            log(f"step {step + 1}: answer loss {ema:.4f}, val acc {100 * acc:.1f}% {per} ({(time.time() - t_start) / 60:.1f} min)")
    model.eval()
    return {"steps_done": steps_done, "minutes": round((time.time() - t_start) / 60, 2), "history": hist}


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=("digits", "needle"), default="digits", help="training data (tlq.data.<task>)")
    p.add_argument("--family", choices=tuple(FAMILY_TAGS), required=True)
    p.add_argument("--needle-asked", default="", help="needle: frame colours questions name (comma list; default all)")
    p.add_argument("--needle-option", action="append", default=[], metavar="FIELD=VALUE", help="needle: override a NeedleVQAConfig field (repeatable), e.g. noise_std=0.25")
    p.add_argument("--out", required=True, help="model directory to write (e.g. src/tlq/builtin/digits-qwen2vl)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core CPU)")
    # architecture
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vision-hidden", type=int, default=64)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--experts", type=int, default=16, help="qwen3_vl_moe: routed experts per MoE layer")
    p.add_argument("--experts-per-tok", type=int, default=2, help="qwen3_vl_moe: experts each token is routed to")
    p.add_argument("--moe-intermediate", type=int, default=128, help="qwen3_vl_moe: each expert's MLP width (a multiple of 128)")
    p.add_argument(
        "--rope-theta",
        type=float,
        default=None,
        help="RoPE base (default: 10 for qwen2_vl digits, else 1e6). Qwen's M-RoPE gives the image rows and "
        "columns only the lowest frequencies; with base 1e6 and head_dim 32 neighbouring visual tokens differ by "
        "<0.03 rad, so the decoder cannot tell the 2x2 image tokens apart by position",
    )
    # training
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--max-minutes", type=float, default=28.0, help="wall-clock budget for both stages")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--vision-steps", type=int, default=600)
    p.add_argument("--vision-easy", action="store_true", help="the vision stage trains on the curriculum's easy data too")
    p.add_argument("--init-from", default="", help="start from this trained model directory (its outlier reparametrisation undone) instead of random weights")
    p.add_argument(
        "--grow-layers", type=int, default=0,
        help="with --init-from: deepen the decoder to this many layers, new layers inserted as identities (see grow_decoder)",
    )
    p.add_argument(
        "--grow-init", choices=GROW_INITS, default="identity",
        help="with --grow-layers: identity = copies with zeroed outputs (exact); split = every copy and its original share the original's outputs equally (see grow_decoder)",
    )
    p.add_argument(
        "--grow-intermediate", type=int, default=0,
        help="with --init-from: widen every decoder MLP to this many neurons, the new ones copies of old ones' reads with zero outputs (exact; see widen_mlps)",
    )
    p.add_argument("--curriculum-steps", type=int, default=0, help="joint steps trained on the task's easy data first (needle: no clutter)")
    p.add_argument("--curriculum-option", action="append", default=[], metavar="FIELD=VALUE",
                   help="needle: the curriculum's data is the task's config with these fields instead of without clutter, e.g. noise_std=0.04")
    p.add_argument("--vision-lr", type=float, default=3e-3)
    p.add_argument("--aux-weight", type=float, default=0.2)
    p.add_argument("--lm-weight", type=float, default=0.0, help="weight of a next-token loss on the prompt's text (see text_lm_loss)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--val-samples", type=int, default=150)
    # outliers, output, measurement
    p.add_argument("--outlier-scale", type=float, default=8.0, help="power of two; 1 disables the reparametrisation")
    p.add_argument("--outlier-channels", type=int, default=4, help="channels per RMSNorm")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--bench-question-types",
        default="max,min",
        help="question types of the shipped calib.jsonl / test.jsonl (comma list; 'train' = the training types). "
        "The default keeps the types a CPU-trained model answers >= 90%% (see docs/builtin-models.md)",
    )
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--test-samples", type=int, default=None, help="shipped test set size (default: digits 500, needle 1000)")
    p.add_argument("--bench-val-samples", type=int, default=300, help="shipped val set size (choose defaults on it)")
    p.add_argument("--no-measure", action="store_true", help="skip the FP / RTN test measurement")
    p.add_argument("--measure-only", action="store_true", help="only measure the model already in --out")
    p.add_argument(
        "--reparam-only",
        action="store_true",
        help="undo the recorded outlier reparametrisation of the model in --out, apply --outlier-scale / "
        "--outlier-channels instead (logits checked), save, then measure as --measure-only does",
    )
    p.add_argument("--sweep-scales", default="", help="comma list of outlier scales to measure on an in-memory copy")
    return p.parse_args(argv)


def load(out: Path, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(out, dtype=dtype)
    processor = AutoProcessor.from_pretrained(out)
    return model.eval(), processor


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    task = make_task(args)
    if args.rope_theta is None:
        # base 10 separates the 2x2 digits tokens by position (see --rope-theta); the needle lookup is by
        # content across 100+ tokens, where base 10 turns every long-range q.k into position noise
        args.rope_theta = 10.0 if args.family in QWEN_VISION_FAMILIES and task.name == "digits" else 1_000_000.0
    info_path = out / "tlq_tiny.json"
    test_split, test_n = task.bench_sets["test"]

    if args.reparam_only:
        model, processor = load(out)
        batcher = Batcher(processor, args.family)
        info = json.loads(info_path.read_text())
        undo_outliers(model, info.get("outlier_reparametrisation", {}))
        info["outlier_reparametrisation"] = add_outliers_checked(args, model, batcher, task.generate("val", 20))
        info.setdefault("commands", []).append("python scripts/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv))
        model.to(getattr(torch, args.save_dtype)).save_pretrained(out)
        info_path.write_text(json.dumps(info, indent=1) + "\n")
        args.measure_only = True

    if args.measure_only:
        model, processor = load(out)
        batcher = Batcher(processor, args.family)
        write_bench(out, task)
        test = task.generate(test_split, test_n, bench=True)
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info["measured"] = measure(model, batcher, test)
        sweep(args, model, batcher, test, info)
        info_path.write_text(json.dumps(info, indent=1) + "\n")
        return 0

    from tlq.models.tiny import make_tiny_vlm

    torch.manual_seed(args.seed)
    if args.init_from:
        model, processor, init_info = init_from(Path(args.init_from), out)
        if args.grow_layers:
            grow_decoder(model, args.grow_layers, args.grow_init)
        if args.grow_intermediate:
            widen_mlps(model, args.grow_intermediate)
        return finish_training(args, task, out, info_path, model, processor, test_split, test_n, argv, init_info)
    log(f"building untrained {args.family} checkpoint in {out}")
    # the digits questions/answers + the chat roles, so "<|im_start|>assistant\n" is 3 tokens, not 9
    corpus = task.data.corpus(task.cfg) + ["user", "assistant", "system"] * 8
    make_tiny_vlm(
        args.family,
        out,
        num_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        vision_hidden=args.vision_hidden,
        vision_depth=args.vision_depth,
        vision_heads=args.vision_heads,
        corpus=corpus,
        vocab_size=args.vocab_size,
        image_size=task.image_size,
        rope_theta=args.rope_theta,
        seed=args.seed,
        dtype=torch.float32,
        **moe_shape(args),
    )
    model, processor = load(out)
    return finish_training(args, task, out, info_path, model, processor, test_split, test_n, argv)


def moe_shape(args) -> dict:
    """make_tiny_vlm's MoE keywords for the MoE family (it refuses them for a dense one)."""
    if args.family != MOE_FAMILY:
        return {}
    if args.moe_intermediate % 128:
        raise SystemExit(f"--moe-intermediate {args.moe_intermediate}: must be a multiple of 128 (the quantization group size)")
    if not 0 < args.experts_per_tok <= args.experts:
        raise SystemExit(f"--experts-per-tok {args.experts_per_tok}: must be between 1 and --experts ({args.experts})")
    return {"num_experts": args.experts, "num_experts_per_tok": args.experts_per_tok, "moe_intermediate_size": args.moe_intermediate}


def init_from(init: Path, out: Path):
    """Start from a trained built-in: its files copied to ``out``, its outlier reparametrisation undone
    (the run adds its own at the end). Returns model, processor and the starting model's info."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for f in init.iterdir():
        if f.is_file() and f.suffix in (".json", ".safetensors", ".jinja"):
            shutil.copy2(f, out / f.name)
    init_info = json.loads((init / "tlq_tiny.json").read_text())
    model, processor = load(out)
    undo_outliers(model, init_info.get("outlier_reparametrisation", {}))
    log(f"starting from {init} ({init_info.get('command', '?')})")
    return model, processor, init_info


GROW_INITS = ("identity", "split")  # --grow-init


@torch.no_grad()
def grow_decoder(model, n_layers: int, init: str = "identity") -> None:
    """Deepen a trained decoder (nearly) without changing what it computes, so that depth can be studied
    on a model that already solves the task (learning the needle lookup from scratch is luck at these
    budgets).

    New layers are spread evenly between the old ones; each starts as a copy of the layer before it, so
    its reads already look at the subspaces the trained model uses. ``init="identity"``: the copies'
    residual-branch outputs (``o_proj``, ``down_proj``) are zeroed, an exact identity; training grows
    them, but slowly (K7m's copies ended with 3-5x smaller output weights than the originals, so the
    12-layer model was 4 working layers and 8 light ones). ``init="split"``: an original and its k - 1
    copies each keep 1/k of its output weights, so they start as k small steps along the original's
    update, close to the same function (not exact: each step reads the residual after the one before),
    and every layer carries an equal share of the computation from the start."""
    if init not in GROW_INITS:
        raise SystemExit(f"--grow-init {init!r}: choose one of {', '.join(GROW_INITS)}")
    layers = decoder_layers(model)
    old = len(layers)
    if n_layers <= old:
        raise SystemExit(f"--grow-layers {n_layers}: the model already has {old} layers; pass a larger number")
    # slot i of the new stack holds old layer floor(i * old / n_layers) first time it appears, a copy after
    src = [i * old // n_layers for i in range(n_layers)]
    share = {j: 1.0 / src.count(j) for j in set(src)}
    grown = []
    for i, j in enumerate(src):
        layer = copy.deepcopy(layers[j]) if i > 0 and src[i - 1] == j else layers[j]
        if layer is not layers[j] and init == "identity":
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        grown.append(layer)
    if init == "split":  # after the copies are taken, so each holds the original's full outputs first
        for layer, j in zip(grown, src):
            layer.self_attn.o_proj.weight.mul_(share[j])
            layer.mlp.down_proj.weight.mul_(share[j])
    for i, layer in enumerate(grown):
        layer.self_attn.layer_idx = i
    model.model.language_model.layers = nn.ModuleList(grown)
    cfg = model.config.text_config
    cfg.num_hidden_layers = n_layers
    cfg.layer_types = [cfg.layer_types[0]] * n_layers
    if getattr(cfg, "max_window_layers", None) == old:
        cfg.max_window_layers = n_layers
    how = "new layers start as identities" if init == "identity" else "each original's outputs split among its copies"
    log(f"decoder grown from {old} to {n_layers} layers ({how})")


@torch.no_grad()
def widen_mlps(model, intermediate: int) -> None:
    """Widen every decoder MLP of a trained model to ``intermediate`` neurons without changing what it
    computes, so that a model can carry released models' MLP shape (intermediate about 5x the width:
    Qwen2-VL-7B 18,944 / 3,584) on top of what it already learned.

    Why it matters for quantization: ``down_proj`` reads the gated product, the one input whose per-token
    peak (max |x| / rms x, at most sqrt(inputs)) can grow past the residual stream's, and its per-channel
    int4 grid spans ``intermediate / 128`` groups' worth of inputs instead of the one or two of a 2x MLP.
    New neuron j reads like old neuron ``j mod old`` (its ``gate_proj`` / ``up_proj`` rows copied) and
    writes nothing (its ``down_proj`` column zero): an exact identity that training grows, the copies
    drifting apart from their originals as soon as their output columns differ."""
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise SystemExit(f"--grow-intermediate: decoder layer {i} has no dense gate/up/down MLP (a MoE block?)")
        old = mlp.up_proj.out_features
        if intermediate <= old or intermediate % 128:
            raise SystemExit(f"--grow-intermediate {intermediate}: must exceed the current {old} and be a multiple of 128 (the quantization group size)")
        src = torch.arange(intermediate) % old
        for name in ("gate_proj", "up_proj"):
            lin = getattr(mlp, name)
            wide = nn.Linear(lin.in_features, intermediate, bias=lin.bias is not None, dtype=lin.weight.dtype)
            wide.weight.copy_(lin.weight[src])
            if lin.bias is not None:
                wide.bias.copy_(lin.bias[src])
            setattr(mlp, name, wide)
        down = mlp.down_proj
        wide = nn.Linear(intermediate, down.out_features, bias=down.bias is not None, dtype=down.weight.dtype)
        wide.weight.zero_()
        wide.weight[:, :old] = down.weight
        if down.bias is not None:
            wide.bias.copy_(down.bias)
        mlp.down_proj = wide
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = intermediate
    model.config.text_config.intermediate_size = intermediate
    log(f"decoder MLPs widened to {intermediate} neurons (new ones write nothing yet)")


def finish_training(args, task, out: Path, info_path: Path, model, processor, test_split: str, test_n: int, argv, init_info: dict | None = None) -> int:
    """Train ``model`` (vision stage, then joint), save it with its sets and measure it."""
    n_params = sum(p.numel() for p in model.parameters())
    n_dec = sum(p.numel() for p in decoder_layers(model).parameters())
    log(f"parameters: {n_params / 1e6:.2f}M total, {n_dec / 1e6:.2f}M in decoder layers")
    torch.manual_seed(args.seed)
    digit_ids = [processor.tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    mark_ids = [processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.tokenize(" " + w)[0]) for w in task.mark_words]
    aux = VisionAux(args.family, model, task, digit_ids, mark_ids)
    val = task.generate("val", args.val_samples)
    record = train(args, model, processor, task, aux, val)

    batcher = Batcher(processor, args.family)
    reparam = add_outliers_checked(args, model, batcher, val)

    # save the trained weights in the untrained checkpoint's layout (tokenizer/processor files stay)
    save_dtype = getattr(torch, args.save_dtype)
    model.to(save_dtype).save_pretrained(out)
    model.to(torch.float32)
    for f in out.glob("*.safetensors"):
        mb = f.stat().st_size / 2**20
        log(f"{f.name}: {mb:.2f} MiB")
        if mb > 25:
            log("WARNING: above the 25 MB package limit")
    write_bench(out, task)

    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    command = "python scripts/train_digits.py " + " ".join(sys.argv[1:] if argv is None else argv)
    info.update(
        {
            "name": f"{task.name}-{FAMILY_TAGS[args.family]}",
            "built_by": "scripts/train_digits.py",
            "command": command,
            "args": vars(args),
            "num_layers": len(decoder_layers(model)),  # after --grow-layers, not the starting model's
            "initialized_from": None if init_info is None else {"dir": args.init_from, "command": init_info.get("command")},
            "lineage": lineage(init_info, command),
            "task": task.name,
            "data_config": _jsonable(task.cfg),
            "bench_data_config": _jsonable(task.bench_cfg),
            "sets": {f"{stem}.jsonl": {"split": split, "samples": n} for stem, (split, n) in task.bench_sets.items()},
            "parameters": n_params,
            "decoder_parameters": n_dec,
            "training": record,
            "outlier_reparametrisation": reparam,
        }
    )
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    if not args.no_measure:
        # measure what was saved (reload: the checkpoint, not the in-memory model)
        model, processor = load(out)
        batcher = Batcher(processor, args.family)
        test = task.generate(test_split, test_n, bench=True)
        info["measured"] = measure(model, batcher, test)
        sweep(args, model, batcher, test, info)
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    log("done")
    return 0


def lineage(init_info: dict | None, command: str) -> list[str]:
    """Every command from random weights to this model, in order: a model grown through several
    ``--init-from`` stages is reproduced by running them all, and each stage only records its parent."""
    if init_info is None:
        return [command]
    return list(init_info.get("lineage") or [init_info.get("command", "?")]) + [command]


def _jsonable(cfg) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()}


def write_bench(out: Path, task: Task) -> None:
    """The model's own sets: digits ships calib.jsonl / test.jsonl with their images; needle, whose
    1,428 noisy PNGs would be ~75 MB, ships sets.json, the recipe tlq.builtin generates them from on
    first use, with each set's digest computed here from a generated copy."""
    import shutil
    import tempfile

    from tlq.builtin import SETS_FILE, set_digest, write_set

    for stem, (split, n) in task.bench_sets.items():
        shutil.rmtree(out / f"{stem}_images", ignore_errors=True)
        (out / f"{stem}.jsonl").unlink(missing_ok=True)
        if task.name == "digits":
            digits.write_jsonl(task.generate(split, n, bench=True), out, stem)
    if task.name == "digits":
        return
    recipe = {"generator": task.name, "config": _jsonable(task.bench_cfg), "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for stem, (split, n) in task.bench_sets.items():
            path = write_set(recipe, split, n, Path(tmp), stem)
            recipe["sets"][stem] = {"split": split, "samples": n, "sha256": set_digest(path)}
    (out / SETS_FILE).write_text(json.dumps(recipe, indent=1) + "\n")


def add_outliers_checked(args, model, batcher: Batcher, val) -> dict:
    if args.outlier_scale == 1 or args.outlier_channels <= 0:
        return {"applied": False}
    ref = copy.deepcopy(model)
    chans = add_outliers(model, args.outlier_scale, args.outlier_channels)
    diff = max_logit_diff(ref, model, batcher, val[:20])
    log(f"outlier reparametrisation a={args.outlier_scale:g}, {args.outlier_channels} channel(s) per norm: max |logit diff| = {diff:.3g}")
    del ref
    return {"applied": True, "scale": args.outlier_scale, "channels_per_norm": args.outlier_channels, "max_abs_logit_diff": diff, "channels": chans}


def sweep(args, model, batcher: Batcher, test, info: dict) -> None:
    if not args.sweep_scales:
        return
    base = copy.deepcopy(model)
    undo_outliers(base, info.get("outlier_reparametrisation", {}))
    res = {}
    for s in [float(x) for x in args.sweep_scales.split(",")]:
        m = copy.deepcopy(base)
        add_outliers(m, s, args.outlier_channels)
        res[f"{s:g}"] = measure(m, batcher, test, label=f"a={s:g} ")
    info["sweep_outlier_scale"] = res


@torch.no_grad()
def undo_outliers(model, reparam: dict) -> None:
    """Invert a recorded reparametrisation exactly (back to the trained weights)."""
    if not reparam.get("applied"):
        return
    a = reparam["scale"]
    for rec in reparam["channels"]:
        layer = decoder_layers(model)[rec["layer"]]
        idx = torch.tensor(rec["channels"])
        getattr(layer, rec["norm"]).weight[idx] *= a
        for w in norm_readers(layer, rec["norm"]):
            w[..., idx] /= a


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
