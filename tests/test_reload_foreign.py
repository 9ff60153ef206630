"""Checkpoints written by other tools: llm-compressor names its ignore list in checkpoint keys.

transformers 5.x matches ``quantization_config.ignore`` against runtime module names, so an entry such as
``visual.blocks.0.attn.qkv`` (the key in the file) misses ``model.visual.blocks.0.attn.qkv`` (the module)
and the vision tower would be quantized on load. ``tlq.export.reload`` translates the entries first.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText

from tlq.config import SCHEMES
from tlq.export.compressed_tensors import export_compressed_tensors
from tlq.export.reload import load_quantized, runtime_ignore

from test_export import _image_inputs, _load, _logits, _rtn_in_memory


def test_runtime_ignore_renames_checkpoint_keys_only(tiny_vlm_dir):
    src = tiny_vlm_dir("qwen2_vl")
    cls = transformers.Qwen2VLForConditionalGeneration
    got = runtime_ignore(cls, AutoConfig.from_pretrained(src), ["visual.blocks.0.attn.qkv", "lm_head", "re:.*visual.*", "model.visual.merger.mlp.0", "no.such.module"])
    assert got == ["model.visual.blocks.0.attn.qkv", "lm_head", "re:.*visual.*", "model.visual.merger.mlp.0", "no.such.module"]


def test_export_with_checkpoint_key_ignore_list_reloads_exactly(tmp_path, tiny_vlm_dir):
    src = tiny_vlm_dir("qwen2_vl")
    scheme = SCHEMES["w4a16"]
    inputs = _image_inputs(src)
    model = _load(src)
    quantized, _ = _rtn_in_memory(model, scheme)
    out = export_compressed_tensors(model, quantized, scheme, tmp_path / "q", source_dir=src)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    vision = [n.removeprefix("model.") for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.visual.")]
    assert vision
    cfg["quantization_config"]["ignore"] = vision + ["lm_head"]  # as llm-compressor 0.14 writes it
    cfg_path.write_text(json.dumps(cfg))

    reloaded = load_quantized(out, type(model).__name__, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model, inputs), atol=1e-5, rtol=1e-5)
    # without the translation transformers quantizes the vision tower too: it fails or answers differently
    try:
        plain = _logits(AutoModelForImageTextToText.from_pretrained(out).eval(), inputs)
    except (ValueError, RuntimeError):
        return
    with pytest.raises(AssertionError):
        torch.testing.assert_close(plain, _logits(model, inputs), atol=1e-5, rtol=1e-5)
