"""Calibration cost at released shapes: wall time per phase and peak RSS of `tlq quantize`, per method,
in one run on one machine, plus the ratios the method is judged by (TLQ / GPTQ, importance pass / one FP
forward+backward).

The checkpoints have random weights and the released widths (text and vision towers, vocabulary, image
processor pixel bounds; MoE shapes: every routed expert); depth is cut by ``--layers`` (the per-layer phases
scale with it; load, vision tower and export do not) and the vision tower's by ``--vision-depth``.
Calibration images are random RGB at the resolution given (448 px: 256 visual tokens for Qwen2-VL / Qwen2.5-VL,
whose merged tokens are 28 px; 196 for Qwen3-VL / Qwen3.5, 32 px, whose processors also scale an image up to their
65536-pixel minimum: 64 tokens at least; 3699 for LLaVA-OneVision: the 384-px base tile's 729, and 2 x 2 anyres tiles'
54 x 54 features plus 54 row newlines), with a short question and answer each. Every method runs as its own
process (the OS's rusage gives its peak RSS, the report the phases and the peak GPU memory), one after
the other. ``--device cuda`` runs every process on the GPU (compute in the checkpoint's bf16); ``--stream``
has tlq read decoder layers from disk one at a time, as for a model larger than memory.

    python benchmarks/cost.py --shape qwen2-vl-2b --layers 2 --num-samples 4 --image-px 448 --methods gptq,tlq --out docs/cost
    python benchmarks/cost.py --shape qwen3.5-0.8b --layers 4 --vision-depth 1 --stream --out docs/cost-qwen3.5-0.8b
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from _report import command_line, write_report

# Released widths (config.json of each Hugging Face release): text hidden / intermediate / layers / heads /
# KV heads / vocab / tied embeddings; vision depth / width / heads; the Instruct image processors' pixel
# bounds (LLaVA-OneVision: its tile size and anyres grid). Only families whose vision tower tlq.models.tiny builds at
# its exact released width are listed.
# Every key but "family" and "layers" (the released depth, cut by --layers) is a make_tiny_vlm keyword.
#
# Qwen3-VL / Qwen3.5 values are copies of the released config.json files found in other repositories (not
# read from huggingface.co): Qwen3-VL-8B-Instruct from the vendored config in kohya-ss/musubi-tuner (agreeing
# with InternLM/xtuner's presets), its pixel bounds from the preprocessor_config.json quoted in
# QwenLM/Qwen3-VL#1836; Qwen3-VL-30B-A3B-Instruct from swedishembedded/brain crates/qwen3vlmoe/src/config.rs
# (a verbatim copy at HF commit 1fc78ad; THUDM/slime scripts/models/qwen3-vl-30b-a3b.sh agrees); Qwen3.5-0.8B
# from wlejon/brolm tests/test_qwen35_config.cpp (a mirror of its config.json; slime agrees); Qwen3.5-35B-A3B's
# text from swedishembedded/brain crates/qwen35moe/src/config.rs (slime and xtuner agree). The builder's fixed
# values equal all four releases': vision patch 16, spatial merge 2, temporal patch 2, RMSNorm eps 1e-6, and
# transformers' defaults (activations, Qwen3.5's gated attention output, always-normalised top-k routing).
# Not matched by the built checkpoints: the tokenizer (tlq's tiny BPE, so the special-token ids and the
# tokens per word differ; the embedding rows are the released vocab), and Qwen3.5's multi-token-prediction
# layer (mtp_num_hidden_layers 1), which transformers drops on load anyway.
_QWEN3_VL_VISION = {"vision_depth": 27, "vision_hidden": 1152, "vision_intermediate_size": 4304, "vision_heads": 16,
                    "vision_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}
# Qwen3-VL-8B-Instruct's preprocessor_config.json; the 30B-A3B one was not found, the 8B's is assumed.
_QWEN3_VL_PIXELS = {"min_pixels": 65536, "max_pixels": 16777216}
# No Qwen3.5 preprocessor_config.json of these two releases was found: the closest copy is Qwen3.5-2B-Base's
# (the same bounds as Qwen3-VL-8B's; Qwen3.6-35B-A3B-FP8 is reported to ship them too).
_QWEN3_5_PIXELS = {"min_pixels": 65536, "max_pixels": 16777216}
# Text values both Qwen3.5 releases share (rope, layer pattern, Gated DeltaNet head widths and conv kernel).
_QWEN3_5_TEXT = {"rope_theta": 10_000_000.0, "mrope_split": [11, 11, 10], "partial_rotary_factor": 0.25, "full_attention_interval": 4,
                 "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4}
# Qwen2.5-VL-3B-Instruct's config.json as released (transformers_version 4.41.2) is copied in whaler404/Hf-Learn
# transfomers_learn/api/models/multimodal_models/qwen2.5_vl/qwen2.5_vl.md; Qwen2.5-VL-7B-Instruct's, re-saved by
# transformers 4.53.1, in kohya-ss/sd-scripts library/hunyuan_image_text_encoder.py (QWEN2_5_VL_CONFIG_JSON), and
# NVIDIA/TensorRT-LLM tests/unittest/_torch/modeling/test_modeling_qwen2_5vl.py (QWEN2_5_VL_7B_CONFIG, depths cut for
# the test) agrees on every other value. Pixel bounds: the Qwen2.5-VL-7B-Instruct processor printed in
# Jeremy-lf/MLLM-Application Qwen-02.md (from its preprocessor_config.json); the 3B's file was only seen in Hub copies
# (Qwen/Qwen2.5-VL-3B-Instruct-AWQ, mlx-community conversions), with the same bounds. The builder's fixed values equal
# both releases': patch 14, spatial merge 2, temporal patch 2, RMSNorm eps 1e-6, the merger's out_hidden_size = the text
# width, and rope_scaling.mrope_section [16, 24, 24] (tiny.mrope_section of the released head width 128). Not matched:
# vision tokens_per_second (released 2, transformers' default 4: only video frames' temporal positions differ),
# max_window_layers / sliding_window (inert: use_sliding_window false), and the tokenizer, as above.
_QWEN2_5_VL_VISION = {"vision_depth": 32, "vision_hidden": 1280, "vision_intermediate_size": 3420, "vision_heads": 16,
                      "vision_window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "min_pixels": 3136, "max_pixels": 12845056}
# LLaVA-OneVision (llava-hf/llava-onevision-qwen2-0.5b-ov-hf, -7b-ov-hf): no complete copy of either config.json was
# found (stored Hub pages show only their start: the pinpoints below, image_token_index 151646, text_config
# "Qwen/Qwen2-0.5B-Instruct"). The values are those of the script that wrote both releases, huggingface/transformers
# src/transformers/models/llava_onevision/convert_llava_onevision_weights_to_hf.py: SiglipVisionConfig(hidden 1152,
# image 384, intermediate 4304, 16 heads, num_hidden_layers=26 "drop the last layer", patch 14, no head) -- SigLIP
# so400m-patch14-384 has 27 layers and the original LLaVA-OV reads layer -2, the release keeps 26 and reads the last
# (vision_feature_layer -1) --; LlavaOnevisionConfig's defaults (vision_feature_layer -1, select strategy "full",
# vision_aspect_ratio "anyres_max_9", the 36 image_grid_pinpoints [384 i, 384 j], i, j = 1..6, as in transformers'
# configuration_llava_onevision.py and LlavaOnevisionImageProcessor, whose defaults the released processor takes); and
# the text config of Qwen/Qwen2-0.5B-Instruct / Qwen/Qwen2-7B-Instruct (the 0.5B's from Hub copies of its config.json,
# e.g. PrunaAI/Qwen-Qwen2-0.5B-Instruct-HQQ-4bit-smashed; the 7B's from the Qwen2Config printed in Retruth/deontic
# nlp_models/qwen2/README.md), whose vocabulary the script grows by <image>, <video> and pads to a multiple of 64
# (resize_token_embeddings(vocab + 2, pad_to_multiple_of=64)): 151936 -> 152000 and 152064 -> 152128, computed from
# the script, not read from a released file. tie_word_embeddings is the text config's (0.5B true, 7B false), which
# transformers applies to the whole model (the released top-level value was not seen). The builder's fixed values equal
# the releases': select strategy "full", no SigLIP head, 729 tokens per 384-px tile, SigLIP mean / std 0.5, RMSNorm eps
# 1e-6. Not matched: the tokenizer, as above (so image_token_index 151646 / video 151647 are the tiny tokenizer's ids).
_LLAVA_OV_VISION = {"vision_depth": 26, "vision_hidden": 1152, "vision_intermediate_size": 4304, "vision_heads": 16, "image_size": 384,
                    "vision_feature_layer": -1, "vision_aspect_ratio": "anyres_max_9",
                    "grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]}
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2-vl-2b": {"family": "qwen2_vl", "hidden_size": 1536, "intermediate_size": 8960, "layers": 28, "num_heads": 12, "num_kv_heads": 2,
                    "vocab_size": 151936, "tie_word_embeddings": True, "vision_depth": 32, "vision_hidden": 1280, "vision_heads": 16,
                    "min_pixels": 3136, "max_pixels": 12845056, "max_position_embeddings": 32768},
    "qwen2-vl-7b": {"family": "qwen2_vl", "hidden_size": 3584, "intermediate_size": 18944, "layers": 28, "num_heads": 28, "num_kv_heads": 4,
                    "vocab_size": 152064, "tie_word_embeddings": False, "vision_depth": 32, "vision_hidden": 1280, "vision_heads": 16,
                    "min_pixels": 3136, "max_pixels": 12845056, "max_position_embeddings": 32768},
    "qwen3-vl-8b": {"family": "qwen3_vl", "hidden_size": 4096, "intermediate_size": 12288, "layers": 36, "num_heads": 32, "num_kv_heads": 8,
                    "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 5_000_000.0, "mrope_split": [24, 20, 20],
                    "max_position_embeddings": 262144, **_QWEN3_VL_VISION, **_QWEN3_VL_PIXELS},
    # intermediate_size: in the released config, but no layer is dense (mlp_only_layers [], decoder_sparse_step 1);
    # no shared expert.
    "qwen3-vl-30b-a3b": {"family": "qwen3_vl_moe", "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
                         "num_experts": 128, "num_experts_per_tok": 8, "mlp_only_layers": [], "layers": 48, "num_heads": 32,
                         "num_kv_heads": 4, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": False, "rope_theta": 5_000_000.0,
                         "mrope_split": [24, 20, 20], "max_position_embeddings": 262144, **_QWEN3_VL_VISION, **_QWEN3_VL_PIXELS},
    # layer_types: [linear, linear, linear, full] x 6 (full_attention_interval 4); no DeepStack in Qwen3.5.
    "qwen3.5-0.8b": {"family": "qwen3_5", "hidden_size": 1024, "intermediate_size": 3584, "layers": 24, "num_heads": 8, "num_kv_heads": 2,
                     "head_dim": 256, "vocab_size": 248320, "tie_word_embeddings": True, "max_position_embeddings": 262144, **_QWEN3_5_TEXT,
                     "linear_num_key_heads": 16, "linear_num_value_heads": 16, "vision_depth": 12, "vision_hidden": 768,
                     "vision_intermediate_size": 3072, "vision_heads": 12, "vision_position_embeddings": 2304, **_QWEN3_5_PIXELS},
    # No verbatim copy of this release's vision_config was found: its values come from transcriptions that call it
    # Qwen3-VL's tower without DeepStack (swedishembedded/brain crates/qwen35moe/src/vl.rs), xtuner's
    # Qwen3_5_VLMoE35BA3Config and derived checkpoints, all in agreement. The release has no intermediate_size.
    "qwen3.5-35b-a3b": {"family": "qwen3_5_moe", "hidden_size": 2048, "moe_intermediate_size": 512, "num_experts": 256, "num_experts_per_tok": 8,
                        "shared_expert_intermediate_size": 512, "layers": 40, "num_heads": 16, "num_kv_heads": 2, "head_dim": 256,
                        "vocab_size": 248320, "tie_word_embeddings": False, "max_position_embeddings": 262144, **_QWEN3_5_TEXT,
                        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "vision_depth": 27, "vision_hidden": 1152,
                        "vision_intermediate_size": 4304, "vision_heads": 16, "vision_position_embeddings": 2304, **_QWEN3_5_PIXELS},
    "qwen2.5-vl-3b": {"family": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "layers": 36, "num_heads": 16, "num_kv_heads": 2,
                      "vocab_size": 151936, "tie_word_embeddings": True, "rope_theta": 1_000_000.0, "max_position_embeddings": 128000,
                      **_QWEN2_5_VL_VISION},
    "qwen2.5-vl-7b": {"family": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944, "layers": 28, "num_heads": 28, "num_kv_heads": 4,
                      "vocab_size": 152064, "tie_word_embeddings": False, "rope_theta": 1_000_000.0, "max_position_embeddings": 128000,
                      **_QWEN2_5_VL_VISION},
    "llava-onevision-0.5b": {"family": "llava_onevision", "hidden_size": 896, "intermediate_size": 4864, "layers": 24, "num_heads": 14,
                             "num_kv_heads": 2, "vocab_size": 152000, "tie_word_embeddings": True, "rope_theta": 1_000_000.0,
                             "max_position_embeddings": 32768, **_LLAVA_OV_VISION},
    "llava-onevision-7b": {"family": "llava_onevision", "hidden_size": 3584, "intermediate_size": 18944, "layers": 28, "num_heads": 28,
                           "num_kv_heads": 4, "vocab_size": 152128, "tie_word_embeddings": False, "rope_theta": 1_000_000.0,
                           "max_position_embeddings": 32768, **_LLAVA_OV_VISION},
}


def shape_kwargs(shape: str, layers: int, vision_depth: int | None = None) -> tuple[str, dict[str, Any]]:
    """``shape``'s ``make_tiny_vlm`` family and keywords, cut to ``layers`` decoder layers and ``vision_depth``
    ViT blocks (None: released). Widths, experts and heads stay as released: only depth is a cost knob.

    A cut vision tower keeps DeepStack's taps, and Qwen2.5-VL's full-attention blocks, at the same relative depths
    (block ``k`` of ``D`` becomes ``k * d // D``; blocks that land on one merge), so a shallow tower still feeds
    DeepStack and still has a full-attention block."""
    s = dict(SHAPES[shape])
    family, released = s.pop("family"), s.pop("layers")
    if not 1 <= layers <= released:
        raise ValueError(f"--layers {layers}: {shape} has 1..{released} decoder layers")
    s["num_layers"] = layers
    if vision_depth is not None:
        full = s["vision_depth"]
        if not 1 <= vision_depth <= full:
            raise ValueError(f"--vision-depth {vision_depth}: {shape}'s vision tower has 1..{full} blocks")
        for key in ("deepstack_visual_indexes", "fullatt_block_indexes"):
            if key in s:
                s[key] = sorted({k * vision_depth // full for k in s[key]})
        s["vision_depth"] = vision_depth
    return family, s


def build_checkpoint(shape: str, layers: int, vision_depth: int | None, out: Path) -> Path:
    """A random-weight bf16 checkpoint of ``shape`` cut to ``layers`` decoder layers (see :func:`shape_kwargs`)."""
    import torch

    from tlq.models.tiny import build_tokenizer, make_tiny_vlm

    family, kwargs = shape_kwargs(shape, layers, vision_depth)
    return make_tiny_vlm(family, out, dtype=torch.bfloat16, tokenizer=build_tokenizer(None, family), **kwargs)


def write_calibration(out: Path, n: int, px: int, seed: int = 0) -> Path:
    """``n`` random ``px`` x ``px`` images with a question and a one-word answer each."""
    rng = np.random.RandomState(seed)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (px, px, 3), dtype=np.uint8)).save(out / f"{i:03d}.png")
        lines.append(json.dumps({"image": f"{i:03d}.png", "question": "What is in the picture? Answer in one word.", "answer": "noise"}))
    (out / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return out / "calib.jsonl"


def cut_inputs(args: Any, prefix: str) -> tuple[Path, Path]:
    """The checkpoint and calibration file a one-process benchmark measures (``args``: ``shape``, ``layers``,
    ``vision_depth``, ``num_samples``, ``image_px`` and ``work``, a folder or None for a fresh temporary one):
    built once under the same names, so that benchmarks pointed at one ``--work`` share them."""
    work = Path(args.work or tempfile.mkdtemp(prefix=prefix))
    model = build_checkpoint(args.shape, args.layers, args.vision_depth, work / f"{args.shape}-L{args.layers}-V{args.vision_depth}")
    return model, write_calibration(work / f"calib-{args.image_px}-{args.num_samples}", args.num_samples, args.image_px)


# A child's rusage counts the memory of whoever forked it (Linux carries the parent's resident set over
# fork and exec into the child's maxrss), so the process that measures must be small: this probe, a bare
# interpreter, forks and execs the command and reports the command's own peak (as /usr/bin/time does,
# which GPU machines often lack).
_RSS_PROBE = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
if os.WIFSIGNALED(status):
    sys.stderr.write(f"\\nkilled by signal {os.WTERMSIG(status)} (9: out of memory?)\\n")
sys.stderr.write(f"\\n__tlq_peak_rss_kib__={usage.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""
_RSS_MARK = "__tlq_peak_rss_kib__"


def _timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; its wall seconds and its own peak RSS in MiB (the OS's figure, through ``_RSS_PROBE``)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", _RSS_PROBE, *cmd], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    head, _sep, tail = proc.stderr.rpartition(f"\n{_RSS_MARK}=")
    if not _sep:
        raise RuntimeError(f"{' '.join(cmd)} did not start:\n{proc.stderr[-3000:]}")
    proc.stderr = head
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc, seconds, int(tail.strip()) / 1024  # Linux reports KiB


#: Named variants of a method for ``--methods`` (their flags after the preset's): the token-level set's
#: budget and draw (docs/methods.md, "Ranked, random or drawn token sets"), whose point is cost at these shapes.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    f"tlq-{rank}-{pct}": ("tlq", ["--token-rank", rank, "--token-fraction", str(pct / 100), "--token-floor", "0"])
    for rank in ("importance", "sampled", "coupled") for pct in (10, 25)
}
# MoE: a routed expert's statistics on every routed row, instead of the token set's kept rows only
VARIANTS.update({f"{name}-experts-every-row": (base, [*flags, "--experts-every-row"]) for name, (base, flags) in list(VARIANTS.items())})


def run_method(model: Path, calib: Path, scheme: str, method: str, n: int, work: Path, device: str = "cpu", stream: bool = False) -> dict[str, Any]:
    """One ``tlq quantize`` process (``stream``: decoder layers read from disk one at a time); its cost."""
    report = work / f"{method}.json"
    base, flags = VARIANTS.get(method, (method, []))
    cmd = [sys.executable, "-m", "tlq", "quantize", "--model", str(model), "--calib", str(calib), "--out", str(work / f"out-{method}"),
           "--scheme", scheme, "--method", base, "--num-samples", str(n), "--no-resume", "--quiet", "--overwrite", "--report", str(report),
           "--device", device] + (["--stream"] if stream else []) + flags
    _proc, seconds, rss = _timed(cmd)
    rep = json.loads(report.read_text())
    layers = rep["layers"]
    return {"method": method, "wall_seconds": seconds, "peak_rss_mib": rss, "phases": rep["phases"], "num_tokens": rep["num_tokens"],
            "token_union": rep["token_set"]["union_share"] if rep.get("token_set") else None,
            # MoE: routed expert linears, and those quantized by RTN for lack of rows (--gptq-min-tokens)
            "routed_linears": sum(len(r["routed_tokens"]) for r in layers), "rtn_fallback": sum(len(r["rtn_fallback"]) for r in layers),
            "num_layers": len(layers), "mean_rel_error": sum(r["rel_error"] for r in layers) / len(layers),
            # on CUDA each layer's report holds the GPU's peak allocation during that layer
            "peak_gpu_mib": max(r["peak_mem_mb"] for r in layers) if device.startswith("cuda") else None}


def fp_forward_backward(model: str, calib: str, n: int, device: str = "cpu") -> float:
    """Seconds of one plain FP forward + backward (answer-token cross-entropy) over the samples: what a
    full-model gradient costs, the yardstick of the layer-wise importance pass."""
    import torch

    from tlq.data.calibration import load_calibration
    from tlq.pipeline import load_model

    adapter, hf_model, processor, _dir, dev, _dt = load_model(model, device, "auto")
    samples = load_calibration(calib, processor, adapter, hf_model, num_samples=n, max_seq_len=None, seed=0)
    hf_model.requires_grad_(False)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def leaf_input(_m: Any, args: tuple, kwargs: dict) -> tuple:
        """Differentiate w.r.t. layer 0's input, as the importance pass does: no weight gradients."""
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_(True)}

    handle = adapter.decoder_layers(hf_model)[0].register_forward_pre_hook(leaf_input, with_kwargs=True)
    total = 0.0
    for s in samples:
        inputs = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in s.inputs.items()}
        labels = torch.where(s.answer_mask[None].to(dev), inputs["input_ids"], torch.full_like(inputs["input_ids"], -100))
        sync()
        t0 = time.perf_counter()
        loss = hf_model(**inputs, labels=labels, use_cache=False).loss
        loss.backward()
        sync()
        total += time.perf_counter() - t0
    handle.remove()
    return total


def export_inputs(model: str, calib: str, out: str, n: int) -> None:
    """The processor inputs tlq calibrates on, saved for the peer tool (same tokens, same pixels)."""
    import torch

    from tlq.data.calibration import load_calibration
    from tlq.pipeline import load_model

    adapter, hf_model, processor, *_ = load_model(model, "cpu", "auto")
    samples = load_calibration(calib, processor, adapter, hf_model, num_samples=n, max_seq_len=None, seed=0)
    torch.save([dict(s.inputs) for s in samples], out)


def run_llmcompressor(venv: Path, model: Path, calib: Path, n: int, work: Path, method: str = "gptq") -> dict[str, Any]:
    """llm-compressor's ``method`` (its own venv) on the same checkpoint and inputs; wall time and peak RSS."""
    inputs = work / "inputs.pt"
    if not inputs.is_file():
        _timed([sys.executable, __file__, "--export-inputs", str(model), str(calib), str(inputs), "--num-samples", str(n)])
    runner = Path(__file__).with_name("llmcompressor_run.py")
    from tlq.models.registry import adapter_for_dir

    ignore = json.dumps(list(adapter_for_dir(model).spec.ignore))  # what tlq keeps 16-bit, the same for both tools
    try:
        proc, seconds, rss = _timed([str(venv / "bin" / "python"), str(runner), str(model), str(inputs), str(work / f"out-llmcompressor-{method}"), method, ignore])
    except RuntimeError as exc:  # a peer tool's failure is a result to report, not a reason to lose the others
        errors = [line.strip() for line in str(exc).splitlines() if "Error" in line and ":" in line]
        last = errors[-1] if errors else str(exc).splitlines()[0]
        return {"method": f"llm-compressor {method}", "error": last[:300], "wall_seconds": None, "peak_rss_mib": None, "phases": {}}
    phases = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"method": f"llm-compressor {method}", "wall_seconds": seconds, "peak_rss_mib": rss, "phases": phases, "num_tokens": None,
            "num_layers": None, "mean_rel_error": None}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(rows: list[dict[str, Any]], fwd_bwd: float) -> dict[str, Any]:
    by = {r["method"]: r for r in rows}
    tlq, gptq = by.get("tlq"), by.get("gptq")
    imp = tlq["phases"].get("importance pass") if tlq else None
    return {"tlq_over_gptq_wall": _ratio(tlq and tlq["wall_seconds"], gptq and gptq["wall_seconds"]),
            "importance_over_fwd_bwd": _ratio(imp, fwd_bwd), "fp_forward_backward_seconds": fwd_bwd}


def to_markdown(result: dict[str, Any]) -> list[str]:
    phases = sorted({p for r in result["rows"] for p in r["phases"]}, key=lambda p: -max(r["phases"].get(p, 0) for r in result["rows"]))
    s = result["summary"]
    vision = f", vision tower cut to {result['vision_depth']} block(s)" if result.get("vision_depth") is not None else ""
    lines = [f"# Calibration cost: {result['shape']} widths, {result['layers']} decoder layer(s){vision}", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. Random bf16 weights at the released widths, {result.get('compute', 'compute in float32 on CPU')}, "
             f"{result['num_samples']} samples of {result['image_px']} px ({result['rows'][0]['num_tokens']} tokens), {result['scheme']}; "
             "llm-compressor (if a row) ran its GPTQ / AWQ recipe (as its Qwen2-VL examples configure it, with tlq's 16-bit list for the model as its ignore list) on the same checkpoint and the same encoded inputs. "
             + ("tlq streamed (`--stream`: decoder layers read from disk one at a time). " if result.get("stream") else "")
             + "Each method in its own process, one after the other; peak RSS from the OS (rusage of each process)"
             + ("; peak GPU memory: the largest per-layer `torch.cuda.max_memory_allocated` in tlq's report." if result.get("gpu") else "."), "",
             "| phase (s) | " + " | ".join(r["method"] for r in result["rows"]) + " |", "|---|" + "---:|" * len(result["rows"])]
    for p in phases:
        lines.append(f"| {p} | " + " | ".join(f"{r['phases'].get(p, 0):.1f}" for r in result["rows"]) + " |")
    lines.append("| **whole process (wall)** | " + " | ".join(f"**{r['wall_seconds']:.1f}**" if r.get("wall_seconds") else "failed" for r in result["rows"]) + " |")
    lines.append("| peak RSS (MiB) | " + " | ".join(f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else "-" for r in result["rows"]) + " |")
    if any(r.get("token_union") is not None for r in result["rows"]):
        lines.append("| tokens some weight row of a layer keeps | " + " | ".join(f"{r['token_union']:.0%}" if r.get("token_union") is not None else "all" for r in result["rows"]) + " |")
    if any(r.get("routed_linears") for r in result["rows"]):
        lines.append("| MoE expert linears quantized by RTN (too few rows) | " + " | ".join(
            f"{r['rtn_fallback']} of {r['routed_linears']}" if r.get("routed_linears") else "-" for r in result["rows"]) + " |")
    if result.get("gpu"):
        lines.append("| peak GPU memory (MiB) | " + " | ".join(f"{r['peak_gpu_mib']:.0f}" if r.get("peak_gpu_mib") else "-" for r in result["rows"]) + " |")
    lines += [f"\n{r['method']} failed: `{r['error']}`" for r in result["rows"] if r.get("error")]
    lines += ["", f"- TLQ / GPTQ whole run: {s['tlq_over_gptq_wall']:.2f}x" if s["tlq_over_gptq_wall"] else "- TLQ / GPTQ: not run",
              f"- importance pass / one FP forward+backward ({s['fp_forward_backward_seconds']:.1f} s): {s['importance_over_fwd_bwd']:.2f}x"
              if s["importance_over_fwd_bwd"] else "- importance pass: not run"]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-vl-2b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers kept (released depth: see SHAPES)")
    p.add_argument("--vision-depth", type=int, default=None, help="cut the vision tower too (default: released depth)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--image-px", type=int, default=448)
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--methods", default="gptq,tlq", help=f"tlq methods, or these variants: {', '.join(VARIANTS)}")
    p.add_argument("--work", default="/tmp/tlq-cost")
    p.add_argument("--out", default="docs/cost")
    p.add_argument("--device", default="cpu", help="cpu | cuda: where every tlq process computes (cuda: in the checkpoint's bf16)")
    p.add_argument("--stream", action="store_true", help="run tlq quantize with --stream (decoder layers read from disk one at a time)")
    p.add_argument("--llmcompressor", default=None, metavar="VENV", help="also run llm-compressor from this venv (benchmarks/setup_llmcompressor.sh)")
    p.add_argument("--llmcompressor-methods", default="gptq,awq", help="llm-compressor recipes to run (gptq, awq)")
    p.add_argument("--fwd-bwd", nargs=2, metavar=("MODEL", "CALIB"), help=argparse.SUPPRESS)  # child modes
    p.add_argument("--export-inputs", nargs=3, metavar=("MODEL", "CALIB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.fwd_bwd:
        print(json.dumps({"seconds": fp_forward_backward(args.fwd_bwd[0], args.fwd_bwd[1], args.num_samples, args.device)}))
        return 0
    if args.export_inputs:
        export_inputs(*args.export_inputs, n=args.num_samples)
        return 0
    work = Path(args.work)
    cut = f"-V{args.vision_depth}" if args.vision_depth is not None else ""
    model = build_checkpoint(args.shape, args.layers, args.vision_depth, work / f"{args.shape}-L{args.layers}{cut}")
    calib = write_calibration(work / f"calib-{args.image_px}", args.num_samples, args.image_px)
    rows = []
    for method in args.methods.split(","):
        rows.append(run_method(model, calib, args.scheme, method, args.num_samples, work, args.device, args.stream))
        print(json.dumps(rows[-1]), flush=True)
    for method in args.llmcompressor_methods.split(",") if args.llmcompressor else []:
        rows.append(run_llmcompressor(Path(args.llmcompressor), model, calib, args.num_samples, work, method))
        print(json.dumps(rows[-1]), flush=True)
    proc, _s, _rss = _timed([sys.executable, __file__, "--fwd-bwd", str(model), str(calib), "--num-samples", str(args.num_samples), "--device", args.device])
    fwd_bwd = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    import platform

    import torch

    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    result = {"command": command_line("cost.py", argv), "shape": args.shape,
              "layers": args.layers, "vision_depth": args.vision_depth, "stream": args.stream, "num_samples": args.num_samples, "image_px": args.image_px, "scheme": args.scheme,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, torch {torch.__version__}"
              + (f", {gpu}" if gpu else ""),
              "rows": rows, "summary": summarize(rows, fwd_bwd), "gpu": gpu,
              "compute": "compute in bf16 on the GPU" if gpu else "compute in float32 on CPU"}
    write_report(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
