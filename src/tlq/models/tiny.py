"""Tiny but complete local Hugging Face VLM checkpoints (no hub, no internet).

``make_tiny_vlm(family, out_dir)`` writes a directory that loads with the generic calls a user makes::

    processor = AutoProcessor.from_pretrained(out_dir)
    model = AutoModelForImageTextToText.from_pretrained(out_dir)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)   # string
    inputs = processor(text=[text], images=[pil_image], return_tensors="pt")
    model(**inputs); model.generate(**inputs, max_new_tokens=4)

It is used by the test suite, by the demo training script and by benchmarks. Families: ``FAMILIES``.

Facts found while writing this (transformers 5.24, torch 2.14.1, torchvision 0.29.1, tokenizers)
------------------------------------------------------------------------------------------------
Module layout (``model = <Family>ForConditionalGeneration``; ``model.model`` is the base model):

* Qwen2-VL / Qwen2.5-VL: vision tower + patch merger ``model.model.visual`` (merger:
  ``model.model.visual.merger``, it projects to the text hidden size), decoder layers
  ``model.model.language_model.layers`` (``Qwen2VLDecoderLayer`` / ``Qwen2_5_VLDecoderLayer``: ``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``, ``input_layernorm``, ``post_attention_layernorm``), final norm
  ``model.model.language_model.norm``, embeddings ``model.model.language_model.embed_tokens``, head
  ``model.lm_head``. No separate projector module (the merger plays that role).
* Qwen3-VL (dense): as Qwen2-VL (``model.model.visual``, ``model.model.language_model.layers``, ``Qwen3VLTextDecoderLayer``
  with the same linears plus per-head ``self_attn.q_norm`` / ``k_norm``), and DeepStack mergers
  ``model.model.visual.deepstack_merger_list.{k}`` (one per ``vision_config.deepstack_visual_indexes`` entry);
  feature ``k`` is added to the visual positions after decoder layer ``k``.
* LLaVA-OneVision: SigLIP tower ``model.model.vision_tower`` (``SiglipVisionModel``), projector
  ``model.model.multi_modal_projector`` (``linear_1`` vision->text hidden, GELU, ``linear_2``), a learned
  ``model.model.image_newline`` parameter (text hidden size), decoder ``model.model.language_model.layers``
  (a plain ``Qwen2Model``, ``Qwen2DecoderLayer``), head ``model.lm_head``.
* Saved checkpoint keys differ from in-memory names (transformers 5.24 converts on save and load):
  Qwen saves the legacy layout ``model.layers.*``, ``model.embed_tokens.weight``, ``model.norm.weight``,
  ``visual.*``, ``lm_head.weight`` (in memory: ``model.language_model.layers.*``, ``model.visual.*``);
  LLaVA-OV saves ``language_model.model.layers.*``, ``language_model.lm_head.weight``, ``vision_tower.*``,
  ``multi_modal_projector.*``, ``image_newline`` (in memory: ``model.language_model.layers.*``,
  ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.image_newline``, ``lm_head``).
  Match modules with regexes such as ``re:.*visual.*``, ``re:.*vision_tower.*``,
  ``re:.*multi_modal_projector.*``, never with concrete saved names.

Configs:

* Qwen text config takes ``rope_parameters={"rope_type": "default", "rope_theta": ..., "mrope_section": [t, h, w]}``
  with ``sum(mrope_section) == head_dim // 2`` (we use the real 1/4, 3/8, 3/8 split: head_dim 32 -> [4, 6, 6]).
  ``rope_scaling`` with ``type: mrope`` is still accepted and converted to ``rope_type: default``.
* ``Qwen2VLVisionConfig``: ``embed_dim`` (ViT width), ``hidden_size`` (= merger output = text hidden size),
  ``num_heads``, ``depth``, ``mlp_ratio``. ``Qwen2_5_VLVisionConfig``: ``hidden_size`` (ViT width),
  ``intermediate_size``, ``out_hidden_size`` (= text hidden size), ``window_size`` (pixels, 112),
  ``fullatt_block_indexes``. Both: patch 14, temporal patch 2, spatial merge 2.
* Top-level Qwen configs carry ``image_token_id``, ``video_token_id``, ``vision_start_token_id``,
  ``vision_end_token_id``: they must equal the tokenizer's ids (we build them from the tokenizer).
* ``Qwen3VLTextConfig`` needs ``head_dim`` (its default is 128 whatever the width) and takes
  ``rope_parameters={"rope_type": "default", "rope_theta": ..., "mrope_section": [t, h, w], "mrope_interleaved": True}``
  with the real 24:20:20 split (:func:`interleaved_mrope_section`; head_dim 32 -> [6, 5, 5]); it has no
  ``max_window_layers``. ``Qwen3VLVisionConfig``: ``hidden_size`` (ViT width), ``intermediate_size``, ``num_heads``,
  ``depth``, ``out_hidden_size`` (= text hidden size), ``num_position_embeddings`` (a square: learned position grid,
  resampled per image), ``deepstack_visual_indexes``; patch 16, temporal patch 2, spatial merge 2.
* ``LlavaOnevisionConfig(vision_config=SiglipVisionConfig(...), text_config=Qwen2Config(...),
  image_token_index=..., video_token_index=..., image_grid_pinpoints=..., vision_feature_select_strategy="full",
  vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")``. ``image_token_id`` is an alias of
  ``image_token_index``.

Processors:

* Qwen: ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(size={"shortest_edge":
  min_pixels, "longest_edge": max_pixels}), tokenizer=..., video_processor=Qwen2VLVideoProcessor(size=...),
  chat_template=...)`` (Qwen2.5-VL reuses the Qwen2-VL image and video processors; ``min_pixels`` /
  ``max_pixels`` kwargs are the backward-compatible spelling of ``size``). The video processor needs
  torchvision. The processor returns ``input_ids``, ``attention_mask``, ``pixel_values`` (flattened patches,
  ``[sum(t*h*w), 3*2*14*14]``), ``image_grid_thw`` ([n_images, 3], in 14-px patches) and
  ``mm_token_type_ids`` (1 = image token, 2 = video token, 0 = text). Visual tokens per image =
  ``prod(image_grid_thw) // 4``: 56x56 -> grid (1, 4, 4) -> 4 tokens; 56x84 -> (1, 4, 6) -> 6 tokens;
  images are resized to multiples of 28 within [min_pixels, max_pixels] (defaults here 28*28 and
  ``(4*image_size)**2`` = 224*224 -> at most 64 tokens). The chat template writes one
  ``<|vision_start|><|image_pad|><|vision_end|>`` per image; the processor expands ``<|image_pad|>``.
  The Qwen forward refuses image inputs without ``mm_token_type_ids``.
* Qwen3-VL: ``Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, size=...,
  image_mean=std=0.5), tokenizer=..., video_processor=Qwen3VLVideoProcessor(size=...), chat_template=...)`` (the hub
  checkpoints use the Qwen2-VL image processor too). Images are resized to multiples of 32: 56x56 -> 64x64 -> grid
  (1, 4, 4) -> 4 tokens; 84x56 (WxH) -> 96x64 -> (1, 4, 6) -> 6 tokens. Also returns ``mm_token_type_ids``.
* LLaVA-OV: ``LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(size={"height": s, "width": s},
  image_grid_pinpoints=P, crop_size=None), tokenizer=..., video_processor=LlavaOnevisionVideoProcessor(size=...),
  num_image_tokens=(s // 14) ** 2, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
  chat_template=...)``; ``s`` must equal the SigLIP ``image_size`` and ``P`` the model config's
  ``image_grid_pinpoints``. The processor returns ``input_ids``, ``attention_mask``, ``pixel_values``
  ``[n_images, max_tiles, 3, s, s]`` (base tile + anyres tiles, zero-padded to the largest tile count in the
  batch), ``image_sizes`` ([n_images, 2] as (H, W)) and ``batch_num_images``; no ``mm_token_type_ids`` by
  default (the image mask is ``input_ids == config.image_token_id``); ``processor(..., return_mm_token_type_ids=True)``
  adds them, the forward tolerates them but ``generate`` rejects them (pop before generating). Token count of one image (single-image prompt;
  a prompt with several images uses only the base tile: ``num_image_tokens + 1``):
  ``base (s/14)^2`` + unpadded anyres features (tiles ``(rows*g) x (cols*g)`` with ``g = s/14``, minus the
  padding rows/columns the aspect ratio implies) + one ``image_newline`` per feature row. With s=56,
  pinpoints [[56,56],[56,112],[112,56]]: a 56x56 image -> 16 + 16 + 4 = 36 tokens; 56x84 (HxW) -> tile grid
  1x2 -> 16 + 4*6 + 4 = 44 tokens; 84x56 (HxW) -> 2x1 -> 16 + 6*4 + 6 = 46 tokens. Visual features of the model:
  ``model.model.get_image_features(pixel_values, image_sizes, batch_num_images=...).pooler_output`` (list per
  image; Qwen: ``get_image_features(pixel_values, image_grid_thw).pooler_output``, tuple per image).

Tokenizer: a byte-level BPE (Qwen2's regex split + ``ByteLevel(use_regex=False)``, no normalizer) so that
``decode(encode(s)) == s`` for any string that contains no special-token text; ids 0..n-1 are BPE tokens,
the special tokens come last (as in Qwen). ``eos_token = <|im_end|>``, ``pad_token = <|endoftext|>``, no BOS
is added, ``padding_side="left"`` (batched generation). The BPE stops early when the corpus has no more pairs
to merge (the default corpus gives ``len(tokenizer) == 459`` for Qwen), so the model's vocab (embedding rows)
is ``vocab_size`` >= ``len(tokenizer)``, as with the padded vocabularies of the real checkpoints. Training is
deterministic (identical ``tokenizer.json`` for the same corpus).

The builder seeds ``torch`` inside ``torch.random.fork_rng`` (the caller's RNG state is untouched) and also writes
``tlq_tiny.json`` (the build arguments) beside the checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "llava_onevision")
#: Families built on the Qwen vision format (chat tokens, ``<|image_pad|>``, ``mm_token_type_ids``).
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
#: Families with Qwen3.5's hybrid decoder (Gated DeltaNet and gated full-attention layers).
QWEN3_5_FAMILIES = ("qwen3_5", "qwen3_5_moe")
#: Families with Qwen3-VL's vision tower and DeepStack.
QWEN3_VL_FAMILIES = ("qwen3_vl", "qwen3_vl_moe")
#: Families with routed experts.
MOE_FAMILIES = ("qwen3_vl_moe", "qwen3_5_moe")
#: Tiny Qwen3-VL MoE: routed experts per sparse layer, experts per token, expert width, and the layers
#: that keep a dense MLP (the last one, so both kinds of layer are exercised by a 2-layer model).
TINY_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 128, "mlp_only_layers": (-1,)}

#: Tokens of the Qwen2 / Qwen2-VL chat and vision format, in Qwen's order.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: LLaVA-OneVision: Qwen2 chat tokens plus its image / video placeholders.
LLAVA_OV_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

#: ViT blocks per family when the caller does not say (Qwen3-VL: enough for intermediate DeepStack blocks).
_DEFAULT_VISION_DEPTH = {"qwen3_vl": 3, "qwen3_vl_moe": 3}
#: Qwen3.5: every 2nd decoder layer is full attention (released models: every 4th), so a 2-layer tiny model
#: holds one layer of each kind: Gated DeltaNet (linear attention), then gated full attention.
TINY_FULL_ATTENTION_INTERVAL = 2
#: Qwen3.5 rotates a quarter of each head's dimensions (partial_rotary_factor, as released).
QWEN3_5_ROTARY_FRACTION = 0.25
#: Qwen3-VL: vision blocks whose features DeepStack adds after decoder layers 0, 1, ...
_DEFAULT_DEEPSTACK = (0, 1)
#: Qwen3-VL's vision patch size (Qwen2/2.5-VL: 14) and its 2x2 merge.
_QWEN3_PATCH, _QWEN3_MERGE = 16, 2
#: Qwen3-VL's vision learned position grid: 8 x 8 (resampled to every image's patch grid).
_QWEN3_POSITION_GRID = 8

#: Qwen2's pre-tokenizer split pattern (so the tokenizer behaves like the real one on text).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Chat templates (our own text). Content may be a string or a list of {"type": "image"|"video"|"text"} parts.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAVA_OV_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}<image>\n"
    "{% elif part['type'] == 'video' or 'video' in part %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SigLIP normalisation, as in the llava-hf LLaVA-OneVision processors and Qwen3-VL's (a SigLIP-2 tower).
_SIGLIP_MEAN = (0.5, 0.5, 0.5)
_SIGLIP_STD = (0.5, 0.5, 0.5)

_COLORS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple", "gray", "pink")
_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "bar", "dot")
_POSITIONS = ("top", "bottom", "left", "right", "center", "corner")


def default_corpus() -> list[str]:
    """A small deterministic English corpus (VQA-style questions, answers, captions, digits, punctuation)."""
    lines: list[str] = []
    for i, c in enumerate(_COLORS):
        for j, s in enumerate(_SHAPES):
            p = _POSITIONS[(i + j) % len(_POSITIONS)]
            n = (3 * i + j) % 10
            lines.append(f"What color is the {s}? The {s} is {c}.")
            lines.append(f"Where is the {c} {s}? It is at the {p} of the image.")
            lines.append(f"How many {s}s are there? There are {n} {s}s.")
            lines.append(f"Describe the image. A {c} {s} on a {_COLORS[(i + 3) % 10]} background, near the {p}.")
            lines.append(f"Is there a {c} {s}? Yes. Answer with one word: {c.capitalize()}")
    lines += [
        "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 3.14 -7 42%",
        "Question: Which digit is shown? Answer: 7",
        "The quick brown fox jumps over the lazy dog. THE END!",
        "Please answer the question using a single word or phrase.",
        "user assistant system: You are a helpful assistant.",
        "\n\n\t  (a) [b] {c} <d> \"e\" 'f' a/b a-b a_b a+b=c #1 @x $5 ^_^ ~ * & | \\",
        "Caption: two cats sitting on a sofa, one dog lying on the floor; a photo of a street at night.",
    ]
    return lines


def build_tokenizer(corpus: list[str] | None, family: str, vocab_size: int = 512, *, model_max_length: int = 4096):
    """Train a deterministic byte-level BPE on ``corpus`` and wrap it as a ``PreTrainedTokenizerFast``.

    ``vocab_size`` counts the special tokens, which take the last ids. ``corpus=None`` uses
    :func:`default_corpus`. The tokenizer gets the family's chat template too (text-only use).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _check_family(family)
    specials = QWEN_SPECIAL_TOKENS if family in QWEN_FAMILIES else LLAVA_OV_SPECIAL_TOKENS
    n_bpe = vocab_size - len(specials)
    if n_bpe < 256:
        raise ValueError(f"vocab_size={vocab_size} is too small: need >= 256 byte tokens + {len(specials)} special")
    corpus = list(default_corpus() if corpus is None else corpus)

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        padding_side="left",
    )
    hf_tok.chat_template = _QWEN_CHAT_TEMPLATE if family in QWEN_FAMILIES else _LLAVA_OV_CHAT_TEMPLATE
    return hf_tok


def mrope_section(head_dim: int) -> list[int]:
    """Qwen's M-RoPE split (t, h, w) of ``head_dim // 2`` rotary frequencies, in the real 1/4, 3/8, 3/8 ratio."""
    half = head_dim // 2
    t = max(1, half // 4)
    h = (half - t) // 2
    return [t, h, half - t - h]


def interleaved_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's interleaved M-RoPE split (t, h, w) of ``head_dim // 2`` frequencies, in the real 24:20:20
    ratio (h and w take every third frequency, so each must fit ``3 * n <= head_dim // 2``)."""
    half = head_dim // 2
    hw = max(1, half * 20 // 64)
    return [half - 2 * hw, hw, hw]


def make_tiny_vlm(
    family: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vision_hidden: int = 32,
    vision_depth: int | None = None,
    vision_heads: int = 2,
    corpus: list[str] | None = None,
    vocab_size: int = 512,
    image_size: int = 56,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    grid_pinpoints: list[list[int]] | None = None,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1_000_000.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer=None,
    deepstack_visual_indexes: list[int] | None = None,
    vision_intermediate_size: int | None = None,
    head_dim: int | None = None,
    mrope_split: list[int] | None = None,
    vision_position_embeddings: int | None = None,
    partial_rotary_factor: float | None = None,
    full_attention_interval: int | None = None,
    linear_num_key_heads: int | None = None,
    linear_num_value_heads: int | None = None,
    linear_key_head_dim: int | None = None,
    linear_value_head_dim: int | None = None,
    linear_conv_kernel_dim: int | None = None,
    num_experts: int | None = None,
    num_experts_per_tok: int | None = None,
    moe_intermediate_size: int | None = None,
    shared_expert_intermediate_size: int | None = None,
    mlp_only_layers: list[int] | None = None,
    vision_window_size: int | None = None,
    fullatt_block_indexes: list[int] | None = None,
    vision_feature_layer: int | None = None,
    vision_aspect_ratio: str | None = None,
) -> Path:
    """Build a tiny random-weight VLM of ``family`` and save model, tokenizer, processor, chat template.

    Args:
        family: one of :data:`FAMILIES`.
        out_dir: directory to write (created; existing files are overwritten).
        num_layers, hidden_size, intermediate_size, num_heads, num_kv_heads: language decoder (Qwen2).
            ``hidden_size`` and ``intermediate_size`` must be multiples of 128 (every decoder Linear then has
            in-features divisible by the default quantization group size 128).
        vision_hidden, vision_depth, vision_heads: ViT width, number of blocks and heads (Qwen ViT / SigLIP).
            ``vision_depth`` defaults to 1 block, 3 for Qwen3-VL (so that DeepStack has intermediate blocks).
        corpus, vocab_size: tokenizer training text (``None`` = :func:`default_corpus`) and model vocab size.
        image_size: LLaVA-OV: SigLIP input resolution = one anyres tile, ``(image_size // 14) ** 2`` patches (at least
            14; a remainder is cut off by the patch convolution, as in SigLIP so400m-patch14-384: 384 px -> 27 x 27).
            Qwen: a multiple of 14 that sets the default ``max_pixels = (4 * image_size) ** 2`` (224*224 -> at most
            64 visual tokens per image).
        min_pixels, max_pixels: Qwen image/video processor pixel bounds (default ``28*28`` and the above).
        grid_pinpoints: LLaVA-OV anyres resolutions (default ``[[s, s], [s, 2s], [2s, s]]`` for ``s = image_size``:
            at most two tiles + the base image).
        tie_word_embeddings: tie ``lm_head`` to the input embeddings (default False, like 7B checkpoints).
        seed: torch seed for the random weights (same seed -> identical state dict).
        dtype: dtype of the saved weights.
        tokenizer: a prebuilt tokenizer (from :func:`build_tokenizer`) to reuse instead of training one.
        deepstack_visual_indexes: Qwen3-VL: the vision blocks whose features are added after the first
            decoder layers (default ``[0, 1]``: after both layers of the default 2-layer decoder).
        vision_intermediate_size: ViT MLP width (default ``4 * vision_hidden``; Qwen2-VL: as ``mlp_ratio``).

    Released shapes (the keywords below default to the tiny values; each one a family would not use is refused,
    so a built checkpoint never silently lacks a value it was asked for):
        head_dim, mrope_split, vision_position_embeddings: Qwen3-VL / Qwen3.5 attention head width (default
            ``hidden_size // num_heads``), the M-RoPE (t, h, w) split written as ``rope_parameters.mrope_section``
            (default :func:`interleaved_mrope_section` of the rotary width), the learned vision position grid
            (a square number; default ``8 * 8``).
        partial_rotary_factor, full_attention_interval, linear_*: Qwen3.5: the rotated fraction of each head
            (default :data:`QWEN3_5_ROTARY_FRACTION`), every how many layers one is full attention (default
            :data:`TINY_FULL_ATTENTION_INTERVAL`), the Gated DeltaNet heads (defaults: ``num_kv_heads`` key heads,
            ``num_heads`` value heads, ``head_dim`` wide each) and conv kernel (default: transformers').
        num_experts, num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size, mlp_only_layers:
            MoE families (defaults :data:`TINY_MOE`; Qwen3.5's shared expert as wide as a routed one;
            ``mlp_only_layers`` Qwen3-VL MoE only, as given, default the last layer but layer 0).
        vision_window_size, fullatt_block_indexes: Qwen2.5-VL: the ViT's attention window in pixels (a multiple of the
            28-px merged patch; default 112, as released) and the ViT blocks that attend over the whole image instead
            (default ``[vision_depth - 1]``: the last block only).
        vision_feature_layer, vision_aspect_ratio: LLaVA-OV: the SigLIP hidden state the projector reads (default -1:
            the last block's output) and the anyres token budget ``"anyres_max_N"`` (default ``"anyres_max_9"``),
            written to both the model config and the processor.

    Returns: ``Path(out_dir)``.
    """
    from transformers import GenerationConfig

    _check_family(family)
    if hidden_size % 128 or intermediate_size % 128:
        raise ValueError(
            f"hidden_size ({hidden_size}) and intermediate_size ({intermediate_size}) must be multiples of 128 "
            "(the default quantization group size)"
        )
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must be divisible by num_heads, and num_heads by num_kv_heads")
    vision_depth = _DEFAULT_VISION_DEPTH.get(family, 1) if vision_depth is None else vision_depth
    deepstack = list(_DEFAULT_DEEPSTACK if deepstack_visual_indexes is None else deepstack_visual_indexes)
    if family in QWEN3_VL_FAMILIES and not all(0 <= k < vision_depth for k in deepstack):
        raise ValueError(f"deepstack_visual_indexes {deepstack} must name vision blocks 0..{vision_depth - 1}")
    if vision_hidden % vision_heads:
        raise ValueError("vision_hidden must be divisible by vision_heads")
    if family == "llava_onevision" and image_size < 14:
        raise ValueError("image_size must be at least the patch size 14")
    if family != "llava_onevision" and image_size % 14:
        raise ValueError("image_size must be a multiple of the patch size 14")
    _refuse_unused(family, QWEN3_VL_FAMILIES + QWEN3_5_FAMILIES, head_dim=head_dim, mrope_split=mrope_split,
                   vision_position_embeddings=vision_position_embeddings)
    _refuse_unused(family, QWEN3_5_FAMILIES, partial_rotary_factor=partial_rotary_factor, full_attention_interval=full_attention_interval,
                   linear_num_key_heads=linear_num_key_heads, linear_num_value_heads=linear_num_value_heads,
                   linear_key_head_dim=linear_key_head_dim, linear_value_head_dim=linear_value_head_dim,
                   linear_conv_kernel_dim=linear_conv_kernel_dim)
    _refuse_unused(family, MOE_FAMILIES, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                   moe_intermediate_size=moe_intermediate_size)
    _refuse_unused(family, ("qwen3_vl_moe",), mlp_only_layers=mlp_only_layers)
    _refuse_unused(family, ("qwen3_5_moe",), shared_expert_intermediate_size=shared_expert_intermediate_size)
    _refuse_unused(family, ("qwen2_5_vl",), vision_window_size=vision_window_size, fullatt_block_indexes=fullatt_block_indexes)
    _refuse_unused(family, ("llava_onevision",), vision_feature_layer=vision_feature_layer, vision_aspect_ratio=vision_aspect_ratio)
    if fullatt_block_indexes is not None and not all(0 <= k < vision_depth for k in fullatt_block_indexes):
        raise ValueError(f"fullatt_block_indexes {list(fullatt_block_indexes)} must name vision blocks 0..{vision_depth - 1}")
    if vision_window_size is not None and (vision_window_size <= 0 or vision_window_size % 28):
        raise ValueError(f"vision_window_size ({vision_window_size}) must be a positive multiple of the 28-px merged patch")
    if vision_feature_layer is not None and not -(vision_depth + 1) <= vision_feature_layer <= vision_depth:
        raise ValueError(f"vision_feature_layer ({vision_feature_layer}) must index the {vision_depth + 1} SigLIP hidden states")
    if vision_aspect_ratio is not None and not (vision_aspect_ratio.startswith("anyres_max_") and vision_aspect_ratio[11:].isdigit()):
        raise ValueError(f"vision_aspect_ratio ({vision_aspect_ratio!r}) must be 'anyres_max_N'")
    if vision_position_embeddings is not None and math.isqrt(vision_position_embeddings) ** 2 != vision_position_embeddings:
        raise ValueError(f"vision_position_embeddings ({vision_position_embeddings}) must be a square (a learned position grid)")
    vision_intermediate = 4 * vision_hidden if vision_intermediate_size is None else vision_intermediate_size
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = tokenizer if tokenizer is not None else build_tokenizer(corpus, family, vocab_size)
    if len(tok) > vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} tokens > vocab_size={vocab_size}")
    vocab = tok.get_vocab()
    ids = {t: vocab[t] for t in QWEN_SPECIAL_TOKENS + LLAVA_OV_SPECIAL_TOKENS if t in vocab}
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    head_dim = hidden_size // num_heads if head_dim is None else head_dim
    qwen3 = dict(mrope_split=mrope_split, vision_intermediate=vision_intermediate,
                 vision_positions=_QWEN3_POSITION_GRID**2 if vision_position_embeddings is None else vision_position_embeddings,
                 moe_fields=_moe_fields(family, num_layers, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok,
                                 moe_intermediate_size=moe_intermediate_size, shared_expert_intermediate_size=shared_expert_intermediate_size,
                                 mlp_only_layers=mlp_only_layers))

    text_kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        bos_token_id=eot,
        eos_token_id=im_end,
        pad_token_id=eot,
        tie_word_embeddings=tie_word_embeddings,
        max_window_layers=num_layers,
    )

    if family in QWEN3_5_FAMILIES:
        hybrid = dict(partial_rotary_factor=QWEN3_5_ROTARY_FRACTION if partial_rotary_factor is None else partial_rotary_factor,
                      full_attention_interval=TINY_FULL_ATTENTION_INTERVAL if full_attention_interval is None else full_attention_interval,
                      linear=_linear_attention_fields(head_dim, num_heads, num_kv_heads, linear_num_key_heads=linear_num_key_heads,
                                                      linear_num_value_heads=linear_num_value_heads, linear_key_head_dim=linear_key_head_dim,
                                                      linear_value_head_dim=linear_value_head_dim, linear_conv_kernel_dim=linear_conv_kernel_dim))
        Model, config, processor = _qwen3_5_parts(tok, ids, text_kwargs, head_dim, vision_hidden, vision_depth, vision_heads,
                                                  image_size, min_pixels, max_pixels, rope_theta, moe=family == "qwen3_5_moe", **qwen3, **hybrid)
    elif family in QWEN3_VL_FAMILIES:
        Model, config, processor = _qwen3_vl_parts(
            tok, ids, text_kwargs, head_dim, vision_hidden, vision_depth, vision_heads, deepstack,
            image_size, min_pixels, max_pixels, rope_theta, tie_word_embeddings, moe=family == "qwen3_vl_moe", **qwen3,
        )
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

        min_pixels = 28 * 28 if min_pixels is None else min_pixels
        max_pixels = (4 * image_size) ** 2 if max_pixels is None else max_pixels
        rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section(head_dim)}
        special_ids = _qwen_vision_ids(ids)
        if family == "qwen2_vl":
            from transformers import (
                Qwen2VLConfig as Cfg,
                Qwen2VLForConditionalGeneration as Model,
                Qwen2VLProcessor as Proc,
                Qwen2VLTextConfig as TextCfg,
                Qwen2VLVisionConfig as VisCfg,
            )

            vision_config = VisCfg(
                depth=vision_depth, embed_dim=vision_hidden, hidden_size=hidden_size, num_heads=vision_heads,
                mlp_ratio=vision_intermediate // vision_hidden if vision_intermediate % vision_hidden == 0 else vision_intermediate / vision_hidden
            )
        else:
            from transformers import (
                Qwen2_5_VLConfig as Cfg,
                Qwen2_5_VLForConditionalGeneration as Model,
                Qwen2_5_VLProcessor as Proc,
            )
            from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
                Qwen2_5_VLTextConfig as TextCfg,
                Qwen2_5_VLVisionConfig as VisCfg,
            )

            vision_config = VisCfg(
                depth=vision_depth,
                hidden_size=vision_hidden,
                intermediate_size=vision_intermediate,
                num_heads=vision_heads,
                out_hidden_size=hidden_size,
                window_size=112 if vision_window_size is None else vision_window_size,
                fullatt_block_indexes=[vision_depth - 1] if fullatt_block_indexes is None else list(fullatt_block_indexes),
            )
        text_config = TextCfg(rope_parameters=rope, **text_kwargs)
        config = Cfg(
            text_config=text_config.to_dict(),
            vision_config=vision_config.to_dict(),
            tie_word_embeddings=tie_word_embeddings,
            **special_ids,
        )
        size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
        processor = Proc(
            image_processor=Qwen2VLImageProcessor(size=size),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(size=dict(size)),
            chat_template=_QWEN_CHAT_TEMPLATE,
        )
    else:
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration as Model,
            LlavaOnevisionImageProcessor,
            LlavaOnevisionProcessor,
            LlavaOnevisionVideoProcessor,
            Qwen2Config,
            SiglipVisionConfig,
        )

        s = image_size
        pinpoints = [list(p) for p in (grid_pinpoints or [[s, s], [s, 2 * s], [2 * s, s]])]
        aspect = "anyres_max_9" if vision_aspect_ratio is None else vision_aspect_ratio
        vision_config = SiglipVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=vision_intermediate,
            num_hidden_layers=vision_depth,
            num_attention_heads=vision_heads,
            image_size=s,
            patch_size=14,
            vision_use_head=False,
        )
        text_config = Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **text_kwargs)
        config = LlavaOnevisionConfig(
            vision_config=vision_config.to_dict(),
            text_config=text_config.to_dict(),
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1 if vision_feature_layer is None else vision_feature_layer,
            vision_aspect_ratio=aspect,
            tie_word_embeddings=tie_word_embeddings,
        )
        processor = LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessor(
                size={"height": s, "width": s},
                image_grid_pinpoints=pinpoints,
                crop_size=None,
                image_mean=list(_SIGLIP_MEAN),
                image_std=list(_SIGLIP_STD),
            ),
            tokenizer=tok,
            video_processor=LlavaOnevisionVideoProcessor(
                size={"height": s, "width": s}, image_mean=list(_SIGLIP_MEAN), image_std=list(_SIGLIP_STD)
            ),
            num_image_tokens=(s // 14) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio=aspect,
            chat_template=_LLAVA_OV_CHAT_TEMPLATE,
        )

    config.dtype = dtype
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Model(config)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot, do_sample=False, max_new_tokens=32
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    info = {
        "built_by": "tlq.models.tiny.make_tiny_vlm",
        "family": family,
        "seed": seed,
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "vision_hidden": vision_hidden,
        "vision_depth": vision_depth,
        "vision_heads": vision_heads,
        "vocab_size": vocab_size,
        "tokenizer_size": len(tok),
        "image_size": image_size,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if family in QWEN3_VL_FAMILIES:
        info["deepstack_visual_indexes"] = deepstack
    (out_dir / "tlq_tiny.json").write_text(json.dumps(info, indent=1) + "\n")
    return out_dir


def _qwen3_vl_parts(tok: Any, ids: dict[str, int], text_kwargs: dict[str, Any], head_dim: int, vision_hidden: int, vision_depth: int, vision_heads: int, deepstack: list[int], image_size: int, min_pixels: int | None, max_pixels: int | None, rope_theta: float, tie_word_embeddings: bool, moe: bool = False, *, mrope_split: list[int] | None, vision_intermediate: int, vision_positions: int, moe_fields: dict[str, Any] | None = None) -> tuple[type, Any, Any]:
    """Model class, config and processor of a tiny Qwen3-VL (dense, or MoE with :data:`TINY_MOE`), as the
    hub checkpoints lay them out.

    Kept apart from :func:`make_tiny_vlm` because everything differs in detail from Qwen2-VL: an explicit
    ``head_dim``, interleaved M-RoPE, 16-px patches, DeepStack blocks, and no ``max_window_layers``.
    """
    from transformers import Qwen3VLProcessor

    if moe:
        from transformers import Qwen3VLMoeConfig as Qwen3VLConfig
        from transformers import Qwen3VLMoeForConditionalGeneration as Qwen3VLForConditionalGeneration
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeTextConfig as Qwen3VLTextConfig
        from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import Qwen3VLMoeVisionConfig as Qwen3VLVisionConfig
    else:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
        from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

    rope = {
        "rope_type": "default",
        "rope_theta": rope_theta,
        "mrope_section": interleaved_mrope_section(head_dim) if mrope_split is None else list(mrope_split),
        "mrope_interleaved": True,
    }
    text = {k: v for k, v in text_kwargs.items() if k != "max_window_layers"}
    if moe:
        text.update(moe_fields)
    text_config = Qwen3VLTextConfig(head_dim=head_dim, rope_parameters=rope, **text)
    vision_config = Qwen3VLVisionConfig(
        **_qwen3_vision(vision_hidden, vision_depth, vision_heads, text_config.hidden_size, vision_intermediate, vision_positions),
        deepstack_visual_indexes=list(deepstack),
    )
    config = Qwen3VLConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), tie_word_embeddings=tie_word_embeddings, **_qwen_vision_ids(ids)
    )
    return Qwen3VLForConditionalGeneration, config, _qwen3_processor(tok, Qwen3VLProcessor, image_size, min_pixels, max_pixels)


def _qwen3_vision(hidden: int, depth: int, heads: int, out_hidden: int, intermediate: int, positions: int) -> dict[str, Any]:
    """The vision-config fields Qwen3-VL and Qwen3.5 share: 16-px patches merged 2x2, a learned position grid."""
    return dict(depth=depth, hidden_size=hidden, intermediate_size=intermediate, num_heads=heads, out_hidden_size=out_hidden,
                patch_size=_QWEN3_PATCH, spatial_merge_size=_QWEN3_MERGE, num_position_embeddings=positions)


def _qwen_vision_ids(ids: dict[str, int]) -> dict[str, int]:
    """The special-token ids of the Qwen vision format, as config fields."""
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen3_processor(tok: Any, processor_cls: type, image_size: int, min_pixels: int | None, max_pixels: int | None) -> Any:
    """The Qwen3-VL / Qwen3.5 processor: 16-px patches merged 2x2, SigLIP normalisation."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLVideoProcessor

    factor = _QWEN3_PATCH * _QWEN3_MERGE
    size = {"shortest_edge": factor * factor if min_pixels is None else min_pixels,
            "longest_edge": (4 * image_size) ** 2 if max_pixels is None else max_pixels}
    return processor_cls(
        image_processor=Qwen2VLImageProcessor(
            size=size, patch_size=_QWEN3_PATCH, merge_size=_QWEN3_MERGE, image_mean=list(_SIGLIP_MEAN), image_std=list(_SIGLIP_STD)
        ),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(size=dict(size), patch_size=_QWEN3_PATCH, merge_size=_QWEN3_MERGE),
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


def _qwen3_5_parts(tok: Any, ids: dict[str, int], text_kwargs: dict[str, Any], head_dim: int, vision_hidden: int, vision_depth: int, vision_heads: int, image_size: int, min_pixels: int | None, max_pixels: int | None, rope_theta: float, moe: bool = False, *, mrope_split: list[int] | None, vision_intermediate: int, vision_positions: int, partial_rotary_factor: float, full_attention_interval: int, linear: dict[str, int], moe_fields: dict[str, Any] | None = None) -> tuple[type, Any, Any]:
    """Model class, config and processor of a tiny Qwen3.5 (dense, or MoE: :data:`TINY_MOE` routed experts
    plus a gated shared expert in every layer): Qwen3-VL's vision format without DeepStack, a hybrid
    decoder (``layer_types``: Gated DeltaNet every layer but each ``full_attention_interval``-th (tiny default
    :data:`TINY_FULL_ATTENTION_INTERVAL`), which is gated full attention with partial rotary), and ``(1 + w)`` RMSNorms."""
    from transformers import Qwen3VLProcessor

    if moe:
        from transformers import Qwen3_5MoeConfig as Qwen3_5Config
        from transformers import Qwen3_5MoeForConditionalGeneration as Qwen3_5ForConditionalGeneration
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeTextConfig as Qwen3_5TextConfig
        from transformers.models.qwen3_5_moe.configuration_qwen3_5_moe import Qwen3_5MoeVisionConfig as Qwen3_5VisionConfig
    else:
        from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration
        from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5TextConfig, Qwen3_5VisionConfig

    rotary = int(head_dim * partial_rotary_factor)  # partial rotary, as released
    rope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_interleaved": True, "partial_rotary_factor": partial_rotary_factor,
            "mrope_section": interleaved_mrope_section(rotary) if mrope_split is None else list(mrope_split)}
    text = {k: v for k, v in text_kwargs.items() if k != "max_window_layers"}
    if moe:  # every layer is MoE, with a shared expert
        text.pop("intermediate_size")
        text.update(moe_fields)
    layers = text["num_hidden_layers"]
    text_config = Qwen3_5TextConfig(
        head_dim=head_dim,
        rope_parameters=rope,
        layer_types=["full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention" for i in range(layers)],
        **linear,
        **text,
    )
    vision_config = Qwen3_5VisionConfig(
        **_qwen3_vision(vision_hidden, vision_depth, vision_heads, text_config.hidden_size, vision_intermediate, vision_positions)
    )
    config = Qwen3_5Config(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                           tie_word_embeddings=text["tie_word_embeddings"], **_qwen_vision_ids(ids))
    return Qwen3_5ForConditionalGeneration, config, _qwen3_processor(tok, Qwen3VLProcessor, image_size, min_pixels, max_pixels)


def _refuse_unused(family: str, families: tuple[str, ...], **given: Any) -> None:
    """A keyword ``family`` has no use for is an error: a silently dropped value would leave a checkpoint that
    claims a shape it does not have."""
    used = [k for k, v in given.items() if v is not None]
    if used and family not in families:
        raise ValueError(f"{', '.join(used)}: only for families {families}, not {family!r}")


def _moe_fields(family: str, num_layers: int, **given: Any) -> dict[str, Any] | None:
    """The MoE text-config fields of ``family`` (None for a dense one): :data:`TINY_MOE` where not ``given``.
    Qwen3.5's shared expert defaults to the routed width; Qwen3-VL MoE's dense layers (``mlp_only_layers``)
    are taken as given, else the tiny default's (the last, never layer 0, none in a 1-layer model)."""
    if family not in MOE_FAMILIES:
        return None
    fields = {k: v if given.get(k) is None else given[k] for k, v in TINY_MOE.items() if k != "mlp_only_layers"}
    if family == "qwen3_5_moe":
        shared = given.get("shared_expert_intermediate_size")
        fields["shared_expert_intermediate_size"] = fields["moe_intermediate_size"] if shared is None else shared
    else:
        dense = given.get("mlp_only_layers")
        default = sorted({i % num_layers for i in TINY_MOE["mlp_only_layers"]} - {0} if num_layers > 1 else set())
        fields["mlp_only_layers"] = default if dense is None else list(dense)
    return fields


def _linear_attention_fields(head_dim: int, num_heads: int, num_kv_heads: int, **given: int | None) -> dict[str, int]:
    """Qwen3.5's Gated DeltaNet fields: the tiny defaults (key heads = KV heads, value heads = query heads, each
    ``head_dim`` wide; transformers' conv kernel) where not ``given``."""
    fields = {"linear_num_key_heads": num_kv_heads, "linear_num_value_heads": num_heads, "linear_key_head_dim": head_dim,
              "linear_value_head_dim": head_dim}
    fields.update({k: v for k, v in given.items() if v is not None})
    return fields


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


__all__ = [
    "FAMILIES",
    "QWEN_SPECIAL_TOKENS",
    "LLAVA_OV_SPECIAL_TOKENS",
    "QWEN_FAMILIES",
    "QWEN3_VL_FAMILIES",
    "QWEN3_5_FAMILIES",
    "MOE_FAMILIES",
    "QWEN3_5_ROTARY_FRACTION",
    "TINY_MOE",
    "build_tokenizer",
    "interleaved_mrope_section",
    "default_corpus",
    "make_tiny_vlm",
    "mrope_section",
]

