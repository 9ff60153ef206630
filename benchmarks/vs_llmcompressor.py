"""tlq against llm-compressor on a built-in model: cost and accuracy of the same job, in one run.

Both tools quantize the same checkpoint at W4A16 (int4, group 128) from the same calibration samples (the
tensors tlq's processor makes, handed to llm-compressor pre-encoded); each method runs as its own process
(wall time and peak RSS from ``/usr/bin/time -v``). Then one ``tlq eval`` scores FP16 and every export on
the same test samples: accuracy, KL to FP16, and McNemar's paired test between every two exports.
llm-compressor runs from its own venv (``benchmarks/setup_llmcompressor.sh``); a recipe that fails (its
AWQ needs an accelerator) is reported with its error, not dropped.

    python benchmarks/vs_llmcompressor.py --llmcompressor /tmp/venv-llmc --model digits-qwen2vl --out docs/vs-llmcompressor
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from _report import command_line, write_report
from cost import _timed, run_llmcompressor, run_method

from tlq.builtin import builtin_dir, builtin_set


def evaluate(model: str, exports: dict[str, Path], n: int, work: Path) -> dict[str, Any]:
    """One ``tlq eval`` over every export that exists: scores by method name, and the paired tests."""
    report = work / "eval.json"
    names = {str(path): name for name, path in exports.items()}
    cmd = [sys.executable, "-m", "tlq", "eval", "--model", model, "--num-samples", str(n), "--report", str(report), "--overwrite", "--quiet"]
    for path in exports.values():
        cmd += ["--quantized", str(path)]
    _timed(cmd)
    res = json.loads(report.read_text())
    scores = {"FP16": res["fp16"], **{names[c["name"]]: c for c in res["comparisons"]}}
    paired = [{**t, "first": names[t["first"]], "second": names[t["second"]]} for t in res["paired"]]
    return {"num_samples": res["num_samples"], "scores": scores, "paired": paired}


def to_markdown(result: dict[str, Any]) -> list[str]:
    ev = result["eval"]
    lines = [f"# tlq vs llm-compressor on builtin:{result['model']} ({result['scheme']})", "",
             f"Command: `{result['command']}`", "",
             f"Machine: {result['machine']}. {result['num_calib']} calibration samples for every method (the same encoded inputs); "
             f"scored by one `tlq eval` on {ev['num_samples']} test samples. llm-compressor {result['llmcompressor_version']} ran in its "
             "own venv; its W4A16 is int4 symmetric group 128 (tlq's w4a16), its AWQ recipe W4A16_ASYM.", "",
             "| method | wall (s) | peak RSS (MiB) | accuracy (%) | KL(FP16‖q) |", "|---|---:|---:|---:|---:|"]
    fp = ev["scores"]["FP16"]
    lines.append(f"| FP16 | - | - | {100 * fp['accuracy']:.2f} | - |")
    for row in result["rows"]:
        s = ev["scores"].get(row["method"])
        wall = f"{row['wall_seconds']:.1f}" if row.get("wall_seconds") else "failed"
        rss = f"{row['peak_rss_mib']:.0f}" if row.get("peak_rss_mib") else "-"
        acc = f"{100 * s['accuracy']:.2f}" if s else "-"
        kl = f"{s['kl']:.2e}" if s else "-"
        lines.append(f"| {row['method']} | {wall} | {rss} | {acc} | {kl} |")
    lines += [f"\n{r['method']} failed: `{r['error']}`" for r in result["rows"] if r.get("error")]
    lines += ["", "Paired tests (McNemar, exact; wins = samples only the first answers right):", "",
              "| first | second | wins | losses | p |", "|---|---|---:|---:|---:|"]
    lines += [f"| {t['first']} | {t['second']} | {t['wins']} | {t['losses']} | {t['p']:.3g} |" for t in ev["paired"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-qwen2vl", help="built-in model name")
    p.add_argument("--llmcompressor", required=True, metavar="VENV", help="llm-compressor's venv (benchmarks/setup_llmcompressor.sh)")
    p.add_argument("--methods", default="gptq,awq,tlq", help="tlq methods")
    p.add_argument("--llmcompressor-methods", default="gptq,awq")
    p.add_argument("--num-calib", type=int, default=64)
    p.add_argument("--num-test", type=int, default=500)
    p.add_argument("--work", default="/tmp/tlq-vs-llmc")
    p.add_argument("--out", default="docs/vs-llmcompressor")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = builtin_dir(f"builtin:{args.model}")
    calib = builtin_set(model_dir, "calib")
    rows, exports = [], {}
    for method in args.methods.split(","):
        rows.append({**run_method(model_dir, calib, "w4a16", method, args.num_calib, work), "method": f"tlq {method}"})
        exports[f"tlq {method}"] = work / f"out-{method}"
        print(json.dumps(rows[-1]), flush=True)
    for method in args.llmcompressor_methods.split(","):
        rows.append(run_llmcompressor(Path(args.llmcompressor), model_dir, calib, args.num_calib, work, method))
        if not rows[-1].get("error"):
            exports[rows[-1]["method"]] = work / f"out-llmcompressor-{method}"
        print(json.dumps(rows[-1]), flush=True)
    version, _s, _r = _timed([str(Path(args.llmcompressor) / "bin" / "python"), "-c", "import llmcompressor; print(llmcompressor.__version__)"])
    import torch

    result = {"command": command_line("vs_llmcompressor.py", argv),
              "model": args.model, "scheme": "w4a16", "num_calib": args.num_calib, "llmcompressor_version": version.stdout.strip().splitlines()[-1],
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, torch {torch.__version__}",
              "rows": rows, "eval": evaluate(f"builtin:{args.model}", exports, args.num_test, work)}
    write_report(args.out, result, to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
