"""Peak memory of a streamed calibration against the checkpoint's size, measured from the OS.

    python benchmarks/streaming_memory.py            # writes docs/streaming_memory.{md,json}

1. Writes synthetic deep checkpoints: the Qwen2-VL architecture with a hidden-2048 decoder (intermediate
   5632, 16 heads, 2 KV heads; 88 MB of bf16 per layer) at each depth asked for, random weights, one
   safetensors shard per layer and an index, the way hub checkpoints are laid out (legacy key names
   included). They are written layer by layer, so the benchmark itself never holds a model. Processor,
   tokenizer and vision tower come from a small Qwen2-VL built by ``tlq.models.tiny`` (the vision tower
   is small; the decoder is what is deep).
2. Runs ``tlq quantize`` for each ``LAYERS:MODE:METHOD[:GRID]`` of ``--runs`` (MODE ``stream`` =
   ``--stream``, ``memory`` = the default in-memory path; GRID, for the methods with a scale search, is
   ``--search-grid``, default the method's own) as a child process under ``/usr/bin/time -v`` and reads
   its "Maximum resident set size": the peak RSS the OS measured for the whole process. The grid points
   are tried one after the other on the same buffers, so the grid changes the time, not the peak: a
   deep TLQ run can use a short grid (the benchmark can show both on a shallow checkpoint).
3. Reports peak RSS / checkpoint size (the issue's target for streaming: at most 35%) and, across
   depths, whether the streamed peak depends on depth (it should not).

The outputs of the runs are deleted after each run; the checkpoints at the end (``--workdir`` keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tlq.builtin import resolve_model_dir
from tlq.models.tiny import make_tiny_vlm

from _report import command_line, write_report

_LAYER_KEY = re.compile(r"(.*\.layers\.)0(\..*)")


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def write_deep_checkpoint(out: Path, *, layers: int, hidden: int, intermediate: int, heads: int, kv_heads: int, seed: int = 0) -> int:
    """Write the synthetic checkpoint into ``out``; returns the size of its weights in bytes."""
    from safetensors.torch import save_file

    small = make_tiny_vlm("qwen2_vl", out.parent / "one-layer", num_layers=1, hidden_size=hidden, intermediate_size=intermediate,
                          num_heads=heads, num_kv_heads=kv_heads, dtype=torch.bfloat16, seed=seed)
    out.mkdir(parents=True)
    for f in small.iterdir():
        if f.is_file() and not f.name.startswith("model"):
            shutil.copy2(f, out / f.name)
    cfg = json.loads((small / "config.json").read_text())
    text = cfg["text_config"]
    text.update(num_hidden_layers=layers, max_window_layers=layers, layer_types=["full_attention"] * layers)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    tensors = {}
    for f in sorted(small.glob("*.safetensors")):
        tensors.update(_read(f))
    layer0 = {k: v for k, v in tensors.items() if _LAYER_KEY.match(k)}
    resident = {k: v for k, v in tensors.items() if k not in layer0}
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    n_files = layers + 1
    for i in range(layers):
        shard = {}
        for key, t in layer0.items():
            name = _LAYER_KEY.sub(rf"\g<1>{i}\g<2>", key)
            if t.dim() == 1 and "norm" in key:
                shard[name] = torch.ones_like(t)
            else:
                shard[name] = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
        file = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file(shard, str(out / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    file = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
    save_file(resident, str(out / file), metadata={"format": "pt"})
    weight_map.update({k: file for k in resident})
    total += sum(t.numel() * t.element_size() for t in resident.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    shutil.rmtree(small)
    return total


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The synthetic checkpoint's decoder shape (a 2B-class width by default) and the calibration size."""
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--num-samples", type=int, default=32)


def peak_rss_mib(stderr: str) -> float:
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr)
    if m is None:
        raise RuntimeError("no 'Maximum resident set size' in /usr/bin/time -v output:\n" + stderr[-2000:])
    return int(m.group(1)) / 1024


def import_floor_mib() -> float:
    """Peak RSS of a process that only imports what ``tlq quantize`` imports (torch, transformers,
    compressed-tensors): the part of every figure below that no calibration strategy can remove."""
    code = "import torch, transformers, compressed_tensors, tlq.api, tlq.cli; from transformers import Qwen2VLForConditionalGeneration"
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return peak_rss_mib(proc.stderr)


def run_quantize(model: Path, out: Path, method: str, stream: bool, num_samples: int, report: Path, search_grid: int | None = None) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "tlq", "quantize", "--model", str(model), "--out", str(out),
           "--calib", str(resolve_model_dir("builtin:digits-qwen2vl") / "calib.jsonl"), "--scheme", "w4a16", "--method", method,
           "--num-samples", str(num_samples), "--quiet", "--report", str(report)] + (["--stream"] if stream else [])
    cmd += [] if search_grid is None else ["--search-grid", str(search_grid)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rep = json.loads(report.read_text())
    return {"mode": "stream" if stream else "in-memory", "method": method, "search_grid": search_grid, "peak_rss_mib": peak_rss_mib(proc.stderr),
            "seconds": time.perf_counter() - t0, "num_layers": len(rep["layers"]), "num_tokens": rep["num_tokens"],
            "max_layer_rel_error": max(layer["rel_error"] for layer in rep["layers"])}


def to_markdown(result: dict) -> list[str]:
    """The report's Markdown lines, from its JSON (also for a run's rows assembled afterwards)."""
    rows = result["rows"]
    md = ["# Streaming: peak memory against checkpoint size", "",
          f"Command: `{result['command'].strip()}` on {result['machine']}.",
          f"Synthetic Qwen2-VL checkpoints: hidden {result['hidden']}, intermediate {result['intermediate']}, random bf16 weights, "
          f"one safetensors shard per decoder layer. W4A16 (g128), {result['num_samples']} calibration samples "
          f"({rows[0]['num_tokens'] if rows else '?'} tokens), CPU, compute in float32. Peak RSS: `/usr/bin/time -v` \"Maximum "
          "resident set size\" of the whole `tlq quantize` process. Of it, "
          f"{result['import_floor_mib']:.0f} MiB is the import floor: the peak RSS of a process that only imports torch, "
          "transformers, compressed-tensors and tlq (measured in the same run).", ""]
    if result.get("note"):
        md += [f"Note: {result['note']}", ""]
    md += ["| layers | checkpoint (GiB) | mode | method | search grid | peak RSS (MiB) | peak RSS / checkpoint | wall time (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        grid = r.get("search_grid") or "default"
        md.append(f"| {r['layers']} | {r['checkpoint_bytes'] / 2**30:.2f} | {r['mode']} | {r['method']} | {grid} | {r['peak_rss_mib']:.0f} | "
                  f"{100 * r['rss_over_checkpoint']:.1f}% | {r['seconds']:.0f} |")
    return md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    # 64:memory:rtn would need about 22 GiB (4.4x the checkpoint, measured at 16 layers): not on a 24 GiB machine.
    p.add_argument("--runs", default="64:stream:gptq,64:stream:rtn,8:stream:tlq,16:stream:rtn,16:memory:rtn",
                   help="comma list of LAYERS:MODE:METHOD[:GRID], MODE in stream|memory, GRID the scale search's --search-grid")
    p.add_argument("--workdir", default=None, help="where the checkpoint and outputs go (default: a temporary directory)")
    p.add_argument("--out", default="docs/streaming_memory")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="tlq-streammem-"))
    sizes: dict[int, int] = {}
    floor = import_floor_mib()
    print(f"import floor: {floor:.0f} MiB", flush=True)
    result = {"command": command_line("streaming_memory.py", argv),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "hidden": args.hidden, "intermediate": args.intermediate, "num_samples": args.num_samples,
              "import_floor_mib": floor, "rows": []}
    try:
        for run in args.runs.split(","):
            layers_text, mode, method, *grid = run.split(":")
            layers, search_grid = int(layers_text), int(grid[0]) if grid else None
            model = work / f"deep-qwen2vl-{layers}"
            if layers not in sizes:
                t0 = time.perf_counter()
                sizes[layers] = write_deep_checkpoint(model, layers=layers, hidden=args.hidden, intermediate=args.intermediate,
                                                      heads=args.heads, kv_heads=args.kv_heads)
                print(f"checkpoint {layers} layers: {sizes[layers] / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
            name = f"{layers}-{mode}-{method}" + (f"-grid{search_grid}" if search_grid else "")
            row = run_quantize(model, work / f"out-{name}", method, mode == "stream", args.num_samples, work / f"{name}.json", search_grid)
            row.update(layers=layers, checkpoint_bytes=sizes[layers], rss_over_checkpoint=row["peak_rss_mib"] * 2**20 / sizes[layers])
            result["rows"].append(row)
            print(row, flush=True)
            write_report(args.out, result, to_markdown(result))  # after every row: a long run that dies still reports
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
