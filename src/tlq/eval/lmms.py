"""Optional bridge to lmms-eval: score the FP16 model and each quantized checkpoint on public benchmarks.

``tlq eval --lmms-tasks textvqa_val,...`` runs lmms-eval's own CLI once per checkpoint (FP16 first), reads
the results JSON each run writes, and compares every task's headline score: FP16, each quantized
checkpoint, and the % of the FP16 score it retains. lmms-eval is an install extra
(``pip install 'tlq[lmms]'``); nothing else in tlq, and none of the tests, need it.

Why a subprocess of lmms-eval's CLI and not its Python API: the CLI is its stable, documented surface;
it owns model loading, accelerate set-up and dataset download, and one process per checkpoint frees
each model's GPU memory before the next one loads.

What this relies on (read in EvolvingLMMs-Lab/lmms-eval at commit 75571cfe, version 0.7.2):

- Command line (``lmms_eval/__main__.py``, the legacy flat form that ``lmms_eval/cli/dispatch.py`` still
  routes to ``eval``): ``python -m lmms_eval --model NAME --model_args pretrained=DIR[,k=v...] --tasks
  T1,T2 --batch_size 1 --output_path DIR [--limit N] [--device D] [--log_samples]``. ``--limit N``
  keeps the first N documents of each task; ``--device`` is passed to the model class's constructor.
- ``--model_args`` is split on commas into ``key=value`` pairs (``utils.simple_parse_args_string``), so
  a checkpoint path must not contain a comma; every key goes to the model class's ``__init__``, and the
  classes used here reject keys they do not know (``assert kwargs == {}``).
- Model names (``lmms_eval/models/__init__.py``, ``AVAILABLE_SIMPLE_MODELS`` /
  ``AVAILABLE_CHAT_TEMPLATE_MODELS``) for the transformers checkpoints tlq quantizes:
  ``qwen2_vl`` (``models/simple/qwen2_vl.py``: ``Qwen2VLForConditionalGeneration.from_pretrained(
  pretrained, torch_dtype="auto", device_map=...)``), ``qwen2_5_vl`` (resolves to the chat class in
  ``models/chat/qwen2_5_vl.py``, which subclasses ``models/simple/qwen2_5_vl.py``:
  ``Qwen2_5_VLForConditionalGeneration.from_pretrained(pretrained, torch_dtype="bfloat16", ...)``), and
  ``llava_hf`` for LLaVA-OneVision (``models/simple/llava_hf.py`` picks
  ``LlavaOnevisionForConditionalGeneration`` from ``config.model_type == "llava_onevision"``). Not
  ``llava_onevision``: that class (``models/simple/llava_onevision.py``) loads through the LLaVA-NeXT
  ``llava`` package and expects the original lmms-lab checkpoint layout, not a transformers
  ``llava-hf``-style directory such as the ones tlq reads and writes.
- Output (``loggers/evaluation_tracker.py``, ``save_results_aggregated``):
  ``OUTPUT_PATH/<sanitized model name>/<date>_results.json``, the sanitized name being the last two
  components of ``pretrained`` joined by ``__`` (``utils.sanitize_model_name``). Each run here gets a
  fresh output directory, so the one ``*_results.json`` below it is that run's.
- Results layout (``evaluator.py`` ``results_dict`` and ``evaluator_utils.py`` ``consolidate_results``)::

      {"results": {TASK: {"alias": TASK, "exact_match,none": 0.81, "exact_match_stderr,none": 0.005,
                          "samples": 5000, "submission,none": ...}},
       "configs": {TASK: {"metric_list": [{"metric": "exact_match", ...}, ...], ...}},
       "higher_is_better": {TASK: {"exact_match": true, ...}},
       "n-samples": {TASK: {"original": 5000, "effective": 5000}},
       "config": {"model": ..., "model_args": ..., "model_backend": ..., "limit": ...},
       "lmms_eval_version": ..., ...}

  Metric keys are ``"<metric>,<filter>"`` (filter ``none`` unless the task defines filters);
  ``"samples"`` is a count, not a metric. The headline metric of a task is the first entry of its
  ``metric_list`` that has a numeric value (``textvqa_val``: ``exact_match``; ``mmmu_val``:
  ``mmmu_acc``); entries without one (groups without an aggregate, submission-only test splits) are
  not compared.
- Errors: ``cli_evaluate`` catches an exception raised during a run, prints its traceback and exits 0
  (unless ``--verbosity DEBUG``); a failed save only logs a warning. So a run counts as failed when it
  exits non-zero *or* leaves no ``*_results.json``.

Quantized checkpoints: lmms-eval calls ``from_pretrained`` itself, so a tlq export loads on
transformers' default compressed-tensors route, exactly as ``from_pretrained(out)`` does (see the
README's scheme table). That works for ``w4a16``, ``w8a8`` and ``w4a8``. ``w3a16`` (int3 asymmetric,
packed zero points) needs ``CompressedTensorsConfig(dequantize=True)`` (``tlq.export.reload``), which
lmms-eval's model classes do not pass, so it would fail to load; the bridge refuses such checkpoints
before any run (with a ``--lmms-model`` override the choice of loader is the user's, and nothing is
refused). Score ``w3a16`` with the built-in ``tlq eval --data`` instead.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tlq.builtin import is_builtin
from tlq.config import ConfigError

_TAIL_CHARS = 4000  # how much of a failed run's output goes into the error message


@dataclass
class ProcessResult:
    """What the bridge needs from one lmms-eval run: its exit code and the end of its output."""

    returncode: int
    output_tail: str


Runner = Callable[[list[str]], ProcessResult]


# ----------------------------------------------------------------------------- running lmms-eval


def require_lmms_eval() -> None:
    """Fail before any work when the extra is not installed (the default runner imports it)."""
    if importlib.util.find_spec("lmms_eval") is None:
        raise ConfigError("--lmms-tasks needs lmms-eval, which is not installed; run: pip install 'tlq[lmms]'")


def run_subprocess(cmd: list[str], echo: bool = True) -> ProcessResult:
    """Run ``cmd``, passing its output through to our stderr live and keeping the tail for errors.

    Output is read in raw chunks, not lines, so progress bars (which redraw with ``\\r``) stay live.
    """
    tail: deque[bytes] = deque()
    kept = 0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as proc:
        assert proc.stdout is not None
        while chunk := proc.stdout.read1(65536):
            if echo:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
            tail.append(chunk)
            kept += len(chunk)
            while kept - len(tail[0]) >= _TAIL_CHARS:
                kept -= len(tail.popleft())
        returncode = proc.wait()
    text = b"".join(tail).decode("utf-8", errors="replace")
    return ProcessResult(returncode, text[-_TAIL_CHARS:])


def build_command(lmms_model: str, pretrained: Path, tasks: Sequence[str], output_dir: Path, *, model_args: str | None = None, limit: int | None = None, device: str | None = None, log_samples: bool = False, python: str | None = None) -> list[str]:
    """lmms-eval's command line for one checkpoint (flags as in ``lmms_eval/__main__.py``)."""
    margs = f"pretrained={pretrained}" + (f",{model_args}" if model_args else "")
    cmd = [python or sys.executable, "-m", "lmms_eval", "--model", lmms_model, "--model_args", margs,
           "--tasks", ",".join(tasks), "--batch_size", "1", "--output_path", str(output_dir)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if device is not None:
        cmd += ["--device", device]
    if log_samples:
        cmd.append("--log_samples")
    return cmd


def _failure(what: str, cmd: list[str], tail: str) -> ConfigError:
    lines = tail.strip() or "(no output)"
    return ConfigError(f"lmms-eval {what} for this command:\n  {subprocess.list2cmdline(cmd)}\n--- end of its output ---\n{lines}")


def results_files(output_dir: Path) -> set[Path]:
    """Every ``*_results.json`` lmms-eval has written under ``output_dir``."""
    return set(output_dir.rglob("*_results.json")) if output_dir.is_dir() else set()


def run_checkpoint(runner: Runner, cmd: list[str], output_dir: Path) -> tuple[dict[str, Any], Path]:
    """Run lmms-eval for one checkpoint and return its parsed results JSON and the file's path.

    Only a file this run wrote counts: a kept ``output_dir`` may hold an older run's results.
    """
    before = results_files(output_dir)
    outcome = runner(cmd)
    if outcome.returncode != 0:
        raise _failure(f"exited with code {outcome.returncode}", cmd, outcome.output_tail)
    new = sorted(results_files(output_dir) - before, key=lambda p: p.name)  # names start with the run's date
    if not new:  # lmms-eval reports a failed evaluation on its output but still exits 0
        raise _failure(f"wrote no new *_results.json under {output_dir}", cmd, outcome.output_tail)
    path = new[-1]
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read lmms-eval results {str(path)!r}: {exc}") from None


# ----------------------------------------------------------------------------- reading results


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_name(key: str) -> str:
    return key.split(",", 1)[0]


def _numeric_metrics(entry: dict[str, Any]) -> list[tuple[str, float]]:
    """``("metric,filter", value)`` pairs of a task's entry, without stderrs, alias or sample count."""
    return [(k, float(v)) for k, v in entry.items() if "," in k and "_stderr" not in k and _is_number(v)]


def headline_metric(results: dict[str, Any], task: str) -> tuple[str, float] | None:
    """The task's first ``metric_list`` metric with a numeric value; else its first numeric metric."""
    entry = results.get("results", {}).get(task) or results.get("groups", {}).get(task) or {}
    numeric = _numeric_metrics(entry)
    listed = [m.get("metric") for m in results.get("configs", {}).get(task, {}).get("metric_list", []) if isinstance(m, dict)]
    for name in listed:
        for key, value in numeric:
            if _metric_name(key) == name:
                return key, value
    return numeric[0] if numeric else None


def higher_is_better(results: dict[str, Any], task: str, key: str) -> bool:
    """From the results' ``higher_is_better`` table; an unknown metric counts as higher-is-better."""
    flag = results.get("higher_is_better", {}).get(task, {}).get(_metric_name(key))
    return flag is not False


def retained_pct(fp16: float, quantized: float, higher_better: bool) -> float | None:
    """100 * quantized / FP16; None where a ratio means nothing (FP16 score 0, lower-is-better metric)."""
    if not higher_better or fp16 == 0:
        return None
    return 100.0 * quantized / fp16


def score_of(results: dict[str, Any], task: str, key: str, source: Path) -> float:
    entry = results.get("results", {}).get(task) or results.get("groups", {}).get(task) or {}
    value = entry.get(key)
    if not _is_number(value):
        raise ConfigError(f"lmms-eval results {str(source)!r} have no numeric {key!r} for task {task!r}, which the FP16 run reported")
    return float(value)


def compare_results(fp16: dict[str, Any], quantized: Sequence[tuple[str, dict[str, Any], Path]], fp16_source: Path) -> list[dict[str, Any]]:
    """One entry per task of the FP16 results that has a headline score, in lmms-eval's order.

    ``quantized`` holds ``(name, results, results_file)`` per checkpoint, in ``--quantized`` order. Tasks
    come from the FP16 results rather than from ``--lmms-tasks``: a group or tag expands to subtasks
    there, and each gets a row.
    """
    rows = []
    for task in fp16.get("results", {}):
        head = headline_metric(fp16, task)
        if head is None:
            continue
        key, fp_score = head
        better = higher_is_better(fp16, task, key)
        scores = [(name, score_of(res, task, key, src)) for name, res, src in quantized]
        rows.append({
            "task": task,
            "metric": key,
            "higher_is_better": better,
            "fp16": fp_score,
            "quantized": [{"name": name, "score": s, "retained_pct": retained_pct(fp_score, s, better)} for name, s in scores],
        })
    if not rows:
        raise ConfigError(f"lmms-eval reported no numeric score for any task in {str(fp16_source)!r}; check the task names (lmms-eval --tasks list)")
    return rows


# ----------------------------------------------------------------------------- orchestration


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [t for t in names if t]
    if not names:
        raise ConfigError("--lmms-tasks is empty; pass lmms-eval task names, e.g. --lmms-tasks textvqa_val,mmmu_val")
    return names


def lmms_model_for(model_dir: Path) -> str:
    """The lmms-eval model class for a checkpoint: model knowledge, so its adapter's spec names it
    (``ModelSpec.lmms_eval_model``; why these names: the module docstring)."""
    from tlq.models import adapter_for_dir

    spec = adapter_for_dir(model_dir).spec
    if spec.lmms_eval_model is None:
        raise ConfigError(f"no lmms-eval model is known for family {spec.family!r}; name one with --lmms-model")
    return spec.lmms_eval_model


def _checked_checkpoint(path: str | Path, flag: str) -> Path:
    """An absolute checkpoint directory that ``--model_args`` can carry."""
    if is_builtin(path):
        raise ConfigError(f"{flag} {str(path)!r} is a built-in demo model, which lmms-eval cannot run (its tasks are real "
                          "benchmarks); use --lmms-tasks with a local Hugging Face checkpoint, or drop --lmms-tasks to score the built-in test set")
    p = Path(path).resolve()
    if not (p / "config.json").is_file():
        raise ConfigError(f"{flag} {str(path)!r} is not a checkpoint directory (no config.json)")
    if "," in str(p):
        raise ConfigError(f"{flag} {str(p)!r} contains a comma, which lmms-eval's --model_args cannot carry; rename or symlink the directory")
    return p


def _refuse_dequantize_route(quantized: list[Path]) -> None:
    from tlq.export.reload import needs_dequantize_route

    for q in quantized:
        if needs_dequantize_route(q):
            raise ConfigError(f"--quantized {str(q)!r} holds int3 asymmetric weights (w3a16), which load only with "
                              "CompressedTensorsConfig(dequantize=True); lmms-eval's from_pretrained cannot load them. "
                              "Score it with the built-in `tlq eval --data`, or pass --lmms-model for a loader that can")


def _check_model_args(model_args: str | None) -> None:
    if model_args and any(part.strip().startswith("pretrained=") for part in model_args.split(",")):
        raise ConfigError("--lmms-args must not set pretrained=; the bridge sets it to --model and each --quantized")


def evaluate_lmms(model: str | Path, quantized: Sequence[str | Path], tasks: str | Sequence[str], *, lmms_model: str | None = None, model_args: str | None = None, limit: int | None = None, device: str | None = None, report_path: str | Path | None = None, overwrite: bool = False, output_dir: str | Path | None = None, log_samples: bool = False, progress: bool = True, runner: Runner | None = None) -> dict[str, Any]:
    """Run lmms-eval on the FP16 model and every quantized checkpoint; compare the headline scores.

    Returns (and writes under key ``"lmms"`` of ``report_path``) ``{"model", "lmms_model", "tasks",
    "runs": [{name, path, command, results_file, lmms_eval_version, results}], "comparison": [{task,
    metric, higher_is_better, fp16, quantized: [{name, score, retained_pct}]}]}``. ``output_dir`` keeps
    lmms-eval's own outputs (a temporary directory otherwise). ``runner`` replaces the subprocess (it
    then decides where lmms-eval runs, so its installation is not checked here).
    """
    from tlq.utils.io import atomic_write_json, check_writable_output

    task_list = parse_tasks(tasks)
    fp_dir = _checked_checkpoint(model, "--model")
    if not quantized:
        raise ConfigError("nothing to compare: pass at least one --quantized OUT directory")
    q_dirs = [_checked_checkpoint(q, "--quantized") for q in quantized]
    _check_model_args(model_args)
    if report_path is not None:
        check_writable_output(report_path, overwrite, "report")
    name = lmms_model or lmms_model_for(fp_dir)
    if lmms_model is None:
        _refuse_dequantize_route(q_dirs)
    if runner is None:
        require_lmms_eval()
        runner = partial(run_subprocess, echo=progress)
    checkpoints = [("fp16", fp_dir)] + [(str(q), d) for q, d in zip(quantized, q_dirs)]
    with tempfile.TemporaryDirectory(prefix="tlq-lmms-") as tmp:
        root = Path(output_dir) if output_dir is not None else Path(tmp)
        runs, parsed = [], []
        for i, (label, path) in enumerate(checkpoints):
            out = root / f"{i:02d}-{path.name}"
            cmd = build_command(name, path, task_list, out, model_args=model_args, limit=limit, device=device, log_samples=log_samples)
            results, source = run_checkpoint(runner, cmd, out)
            parsed.append((label, results, source))
            runs.append({"name": label, "path": str(path), "command": cmd, "results_file": str(source) if output_dir is not None else None,
                         "lmms_eval_version": results.get("lmms_eval_version"), "results": results.get("results", {})})
        comparison = compare_results(parsed[0][1], parsed[1:], parsed[0][2])
    result = {"model": str(model), "lmms_model": name, "tasks": task_list, "limit": limit, "runs": runs, "comparison": comparison}
    if report_path is not None:
        atomic_write_json(report_path, {"lmms": result})
    return result


# ----------------------------------------------------------------------------- table


def render_lmms_table(result: dict[str, Any], console: Any = None) -> None:
    """One row per checkpoint, one column per task: the score and, for quantized rows, % of FP16."""
    from rich.console import Console
    from rich.table import Table

    from tlq.eval.table import _pct, _short

    console = console or Console()
    rows = result["comparison"]
    table = Table(title=f"{_short(result['model'])} with lmms-eval ({result['lmms_model']})", title_justify="left")
    table.add_column("model")
    for row in rows:
        arrow = "" if row["higher_is_better"] else " (lower is better)"
        table.add_column(f"{row['task']}\n{_metric_name(row['metric'])}{arrow}", justify="right")
    table.add_row("FP16", *(f"{row['fp16']:.4g}" for row in rows))
    for i, run in enumerate(result["runs"][1:]):
        cells = [f"{row['quantized'][i]['score']:.4g} ({_pct(row['quantized'][i]['retained_pct'])})" for row in rows]
        table.add_row(_short(run["name"]), *cells)
    console.print(table)

