"""compressed-tensors export: stored codes, config, reload in transformers, and output-directory safety.

Each reload test quantizes every decoder Linear of a tiny float32 VLM by RTN *in memory* (weights replaced
by their dequantized codes, plus dynamic per-token int8 input fake-quantization hooks for W-A schemes),
exports it, reloads it with ``AutoModelForImageTextToText.from_pretrained`` and compares the logits of an
image+text prompt with the in-memory model. Tolerance: ``atol = rtol = 1e-5`` on float32 logits (observed
difference: 0.0, bit-identical; bf16 checkpoints would need ~1e-2). The reload route per scheme is the one
that applies the scheme's activation quantization where transformers can:

* w4a16, w8a8, w4a8 -> default ``from_pretrained`` (``dequantize=False``: decompress on first forward,
  applies dynamic per-token int8 input quantization);
* w3a16 (``pack-quantized``) -> ``CompressedTensorsConfig(dequantize=True)``: the default route fails on the
  packed int3 zero points (asserted below, so a fixed transformers shows up here);
* w3a16 stored ``naive-quantized`` (``ct_format`` override) -> default route.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, CompressedTensorsConfig

from tlq.config import SCHEMES, ConfigError
from tlq.utils.finite import NonFiniteError
from tlq.utils.outputs import MARKER, OutputError
from tlq.export.compressed_tensors import (
    DEFAULT_IGNORE,
    ExportExistsError,
    export_compressed_tensors,
    read_stored_weights,
)
from tlq.export.reload import load_quantized
from tlq.quant.quantizer import QuantizedWeight, add_input_quantizer, compute_qparams, quantize_codes

ATOL = RTOL = 1e-5
VISION_PREFIXES = ("model.visual.", "model.vision_tower.", "model.multi_modal_projector.", "model.image_newline")

# (scheme, family, ct_format override, reload route: "default" | "dequantize")
CASES = [
    ("w4a16", "qwen2_vl", None, "default"),
    ("w3a16", "qwen2_vl", None, "dequantize"),
    ("w3a16", "qwen2_vl", "naive-quantized", "default"),
    ("w8a8", "qwen2_vl", None, "default"),
    ("w4a8", "qwen2_vl", None, "default"),
    ("w4a16", "qwen2_5_vl", None, "default"),
    ("w4a16", "qwen3_vl", None, "default"),
    ("w4a8", "qwen3_vl", None, "default"),
    ("w4a16", "llava_onevision", None, "default"),
    ("w8a8", "llava_onevision", None, "default"),
]
EXPECTED_FORMAT = {
    "w4a16": "pack-quantized",
    "w3a16": "pack-quantized",
    "w8a8": "int-quantized",
    "w4a8": "pack-quantized",
}


def _image_inputs(model_dir):
    processor = AutoProcessor.from_pretrained(model_dir)
    img = Image.fromarray(np.random.RandomState(0).randint(0, 256, (56, 56, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the square?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return dict(processor(text=[text], images=[img], return_tensors="pt"))


def _load(model_dir, route: str = "default"):
    kwargs = {}
    if route == "dequantize":
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    return AutoModelForImageTextToText.from_pretrained(model_dir, **kwargs).eval()


def _rtn_in_memory(model, scheme):
    """RTN-quantize every decoder Linear in place; return {name: QuantizedWeight} and the hook handles."""
    quantized, hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".language_model.layers." in name:
            scale, zero = compute_qparams(mod.weight, scheme.weights)
            codes = quantize_codes(mod.weight, scale, zero, scheme.weights)
            qw = QuantizedWeight(codes, scale, zero, scheme.weights)
            with torch.no_grad():
                mod.weight.copy_(qw.dequantize(mod.weight.dtype))
            quantized[name] = qw
            if scheme.activations is not None:
                hooks.append(add_input_quantizer(mod, scheme.activations))
    return quantized, hooks


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs, use_cache=False).logits


def _vision_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(VISION_PREFIXES)}


@pytest.mark.parametrize(
    "scheme_name,family,ct_format,route", CASES, ids=[f"{c[0]}-{c[1]}-{c[2] or 'default'}" for c in CASES]
)
def test_export_reload_reproduces_fake_quant_model(tmp_path, tiny_vlm_dir, scheme_name, family, ct_format, route):
    src = tiny_vlm_dir(family)
    scheme = SCHEMES[scheme_name]
    inputs = _image_inputs(src)
    model = _load(src)
    vision_before = _vision_state(model)
    lm_head_before = model.lm_head.weight.detach().clone()
    quantized, _hooks = _rtn_in_memory(model, scheme)
    ref = _logits(model, inputs)

    out = export_compressed_tensors(model, quantized, scheme, tmp_path / "q", source_dir=src, ct_format=ct_format)

    # the caller's model is untouched and still runs the same
    torch.testing.assert_close(_logits(model, inputs), ref, atol=0, rtol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]  # no temporary directories left behind

    # config.json: our scheme, format and regex ignore list
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "compressed-tensors"
    assert qcfg["format"] == (ct_format or EXPECTED_FORMAT[scheme_name])
    assert qcfg["ignore"] == DEFAULT_IGNORE
    (group,) = qcfg["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w = group["weights"]
    assert (w["num_bits"], w["symmetric"], w["group_size"]) == (
        scheme.weights.bits,
        scheme.weights.symmetric,
        scheme.weights.group_size,
    )
    if scheme.activations is None:
        assert group["input_activations"] is None
    else:
        a = group["input_activations"]
        assert (a["num_bits"], a["strategy"], a["dynamic"], a["symmetric"]) == (8, "token", True, True)

    # stored codes (decoded from the safetensors files) are exactly ours; matched by the decoder-relative
    # suffix, independently of the exporter's own name mapping
    stored = read_stored_weights(out)
    assert len(stored) == len(quantized)
    for name, qw in quantized.items():
        suffix = name[name.index("layers.") :]
        (key,) = [k for k in stored if k.endswith(suffix)]
        assert torch.equal(stored[key].codes, qw.codes)
        torch.testing.assert_close(stored[key].scale.float(), qw.scale, atol=0, rtol=0)
        if not scheme.weights.symmetric:
            assert torch.equal(stored[key].zero_point, qw.zero_point)
    assert not any(re.search(r"visual|vision_tower|multi_modal_projector|lm_head", k) for k in stored)

    # processor files came along and load
    for f in ("tokenizer.json", "chat_template.jinja", "processor_config.json", "generation_config.json"):
        assert (out / f).is_file(), f
    reloaded_inputs = _image_inputs(out)
    assert all(torch.equal(reloaded_inputs[k], inputs[k]) for k in inputs)

    # reload: logits equal the in-memory fake-quantized model; vision tower / projector / head unchanged
    reloaded = _load(out, route)
    torch.testing.assert_close(_logits(reloaded, inputs), ref, atol=ATOL, rtol=RTOL)
    vision_after = _vision_state(reloaded)
    assert vision_after.keys() == vision_before.keys() and vision_after
    assert all(torch.equal(vision_after[k], vision_before[k]) for k in vision_before)
    assert torch.equal(reloaded.lm_head.weight, lm_head_before)
    if scheme.activations is None and route == "default":  # weight-only: both routes give the same model
        torch.testing.assert_close(_logits(_load(out, "dequantize"), inputs), ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("scheme_name,tied", [("w4a16", True), ("w8a8", False)])
def test_bf16_model_reloads_exactly(tmp_path, tiny_vlm_dir, scheme_name, tied):
    """The realistic case: a bf16 model with scales computed in bf16 (``scale_dtype``). Stored scales are
    then exact and the reloaded bf16 model reproduces the in-memory one (observed: bit-identical); tied
    input/output embeddings survive the custom state dict."""
    src = tiny_vlm_dir("qwen2_vl", tie_word_embeddings=tied)
    scheme = SCHEMES[scheme_name]
    model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.bfloat16).eval()
    quantized, _hooks = {}, []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".language_model.layers." in name:
            scale, zero = compute_qparams(mod.weight, scheme.weights, scale_dtype=torch.bfloat16)
            qw = QuantizedWeight(quantize_codes(mod.weight, scale, zero, scheme.weights), scale, zero, scheme.weights)
            with torch.no_grad():
                mod.weight.copy_(qw.dequantize(torch.bfloat16))
            quantized[name] = qw
            if scheme.activations is not None:
                _hooks.append(add_input_quantizer(mod, scheme.activations))
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in _image_inputs(src).items()}
    ref = _logits(model, inputs)
    out = export_compressed_tensors(model, quantized, scheme, tmp_path / "q", source_dir=src)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = _load(out)
    assert reloaded.dtype == torch.bfloat16
    assert (reloaded.lm_head.weight is reloaded.model.language_model.embed_tokens.weight) == tied
    torch.testing.assert_close(_logits(reloaded, inputs), ref)  # bf16 tolerance: rtol 1.6e-2, atol 1e-5


def test_save_dtype_casts_dense_tensors_and_scales(tmp_path, tiny_vlm_dir):
    from safetensors import safe_open

    src = tiny_vlm_dir("qwen2_vl")
    model = _load(src)
    quantized, _ = _rtn_in_memory(model, SCHEMES["w4a16"])
    out = export_compressed_tensors(
        model, quantized, SCHEMES["w4a16"], tmp_path / "q", source_dir=src, save_dtype=torch.bfloat16
    )
    assert model.dtype == torch.float32  # the caller's model is not cast
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == cfg["text_config"]["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if k.endswith("weight_packed")} == {"I32"}
    assert {d for k, d in dtypes.items() if not k.endswith(("weight_packed", "weight_shape"))} == {"BF16"}
    assert all(stored.scale.dtype == torch.bfloat16 for stored in read_stored_weights(out).values())


def test_w3a16_pack_quantized_default_route_fails_to_load(tmp_path, tiny_vlm_dir):
    """Documented limitation (transformers 5.24 + compressed-tensors 0.20): the default route builds
    ``weight_zero_point`` as [out, groups] but the checkpoint stores it packed; use dequantize=True."""
    src = tiny_vlm_dir("qwen2_vl")
    model = _load(src)
    quantized, _ = _rtn_in_memory(model, SCHEMES["w3a16"])
    out = export_compressed_tensors(model, quantized, SCHEMES["w3a16"], tmp_path / "q", source_dir=src)
    with pytest.raises(RuntimeError, match="mismatched_sizes"):
        _load(out, "default")


def test_w8a8_activation_quantization_only_on_default_route(tmp_path, tiny_vlm_dir):
    """The default route applies the int8 per-token input quantization; dequantize=True does not
    (it reproduces the model with the quantized weights and FP activations)."""
    src = tiny_vlm_dir("qwen2_vl")
    scheme = SCHEMES["w8a8"]
    inputs = _image_inputs(src)
    model = _load(src)
    quantized, hooks = _rtn_in_memory(model, scheme)
    ref_wa = _logits(model, inputs)
    out = export_compressed_tensors(model, quantized, scheme, tmp_path / "q", source_dir=src)
    for h in hooks:
        h.remove()
    ref_w_only = _logits(model, inputs)
    assert not torch.allclose(ref_wa, ref_w_only, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(_logits(_load(out, "default"), inputs), ref_wa, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(_logits(_load(out, "dequantize"), inputs), ref_w_only, atol=ATOL, rtol=RTOL)


def test_existing_out_dir_needs_overwrite(tmp_path, tiny_vlm_dir):
    src = tiny_vlm_dir("qwen2_vl")
    scheme = SCHEMES["w4a16"]
    model = _load(src)
    quantized, _ = _rtn_in_memory(model, scheme)
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportExistsError, match="--overwrite"):
        export_compressed_tensors(model, quantized, scheme, out, source_dir=src)
    with pytest.raises(OutputError, match=r"holds files tlq did not write \(keep.txt\)"):  # not ours: never replaced
        export_compressed_tensors(model, quantized, scheme, out, source_dir=src, overwrite=True)
    assert (out / "keep.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["q"]

    (out / "keep.txt").unlink()  # an empty directory may be filled
    export_compressed_tensors(model, quantized, scheme, out, source_dir=src, overwrite=True)
    assert (out / MARKER).is_file() and (out / "config.json").is_file()
    (out / "notes.txt").write_bytes(b"x")  # added to a tlq output by its user: theirs, so refused
    with pytest.raises(OutputError, match=r"holds files tlq did not write \(notes.txt\)"):
        export_compressed_tensors(model, quantized, scheme, out, source_dir=src, overwrite=True)
    (out / "notes.txt").unlink()
    (out / "config.json").write_text("{}")  # a file tlq wrote, changed since: still tlq's to replace
    export_compressed_tensors(model, quantized, scheme, out, source_dir=src, overwrite=True)
    assert json.loads((out / "config.json").read_text()) and (out / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # old copy and temp dir removed

    with pytest.raises(ConfigError, match="source checkpoint"):
        export_compressed_tensors(model, quantized, scheme, src, source_dir=src, overwrite=True)


def test_export_refuses_inconsistent_input_and_cleans_up(tmp_path, tiny_vlm_dir):
    src = tiny_vlm_dir("qwen2_vl")
    scheme = SCHEMES["w4a16"]
    model = _load(src)
    quantized, _ = _rtn_in_memory(model, scheme)
    out = tmp_path / "q"

    missing = dict(quantized)
    dropped = missing.popitem()[0]
    with pytest.raises(ConfigError, match="not quantized"):
        export_compressed_tensors(model, missing, scheme, out)

    vision = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".visual." in n)
    with pytest.raises(ConfigError, match="ignored"):
        export_compressed_tensors(model, {**quantized, vision: quantized[dropped]}, scheme, out)

    with torch.no_grad():
        model.get_submodule(dropped).weight.add_(0.5 * quantized[dropped].scale.max())
    with pytest.raises(ConfigError, match="not the dequantized value"):
        export_compressed_tensors(model, quantized, scheme, out)
    with torch.no_grad():
        model.get_submodule(dropped).weight.copy_(quantized[dropped].dequantize())

    vision_weight = model.get_submodule(vision).weight  # a dense (16-bit) tensor: checked before writing too
    kept = vision_weight.detach().clone()
    with torch.no_grad():
        vision_weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=rf"tensor '{re.escape(vision)}.weight'.*nothing was written"):
        export_compressed_tensors(model, quantized, scheme, out)
    with torch.no_grad():
        vision_weight.copy_(kept)

    class BrokenProcessor:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_compressed_tensors(model, quantized, scheme, out, processor=BrokenProcessor())
    assert list(tmp_path.iterdir()) == []  # nothing written, temporary directory removed


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "llava_onevision"])
def test_load_quantized_generates_like_the_in_memory_model(tmp_path, tiny_vlm_dir, family):
    """``tlq.export.reload.load_quantized`` decompresses at load time and drops compressed-tensors'
    offloading wrappers, which turn ``ModelOutput`` arguments into plain dicts: without that,
    ``generate`` on a reloaded LLaVA-OneVision fails on its pre-encoded image features. The reloaded
    model then decodes the same tokens as the fake-quantized model in memory (W4A8: activations too)."""
    src = tiny_vlm_dir(family)
    scheme = SCHEMES["w4a8"]
    inputs = _image_inputs(src)
    model = _load(src)
    quantized, _hooks = _rtn_in_memory(model, scheme)
    out = export_compressed_tensors(model, quantized, scheme, tmp_path / "q", source_dir=src)
    reloaded = load_quantized(out, type(model).__name__, torch.device("cpu"), torch.float32)
    assert not any("_original_forward_func" in m.__dict__ for m in reloaded.modules())
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        got = reloaded.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model, inputs), atol=ATOL, rtol=RTOL)
