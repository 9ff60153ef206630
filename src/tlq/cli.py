"""``tlq`` command line: ``tlq quantize ...``.

Bad input ends with one line naming the problem and the fix (exit code 2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from tlq.config import METHODS, OPTIONS, SCHEMES, ConfigError, parse_memory_size
from tlq.utils.io import say


def _add_options(p: argparse.ArgumentParser) -> None:
    """Every :data:`tlq.config.OPTIONS` knob as a flag (``dest`` = its keyword, default None = keep the
    preset's or the field's default), grouped as the schema says."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        g = groups.setdefault(opt.group, p.add_argument_group(opt.group))
        if opt.type is bool:
            both = g.add_mutually_exclusive_group() if opt.negative else g
            both.add_argument(opt.cli_flag, dest=opt.name, action="store_true", default=None, help=opt.help_text())
            if opt.negative:
                both.add_argument(opt.negative, dest=opt.name, action="store_false", help=f"the opposite of {opt.cli_flag}")
        else:
            g.add_argument(opt.cli_flag, dest=opt.name, type=opt.type, choices=opt.choices, default=None, help=opt.help_text())


def _add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a local VLM checkpoint and export it (compressed-tensors)")
    p.add_argument("--model", required=True, help="local Hugging Face model directory, or builtin:NAME")
    p.add_argument("--calib", default=None, help="calibration JSONL ({image, question, answer} per line); built-in models default to their own")
    p.add_argument("--out", required=True, help="output directory (refused if it exists, unless --overwrite)")
    p.add_argument("--scheme", default="w4a16", help=f"one of {', '.join(SCHEMES)} (default: w4a16)")
    p.add_argument("--method", default="gptq", help=f"one of {', '.join(METHODS)} (default: gptq); see docs/methods.md")
    _add_options(p)
    p.add_argument("--report", default=None, help="write the run's report (per-layer errors, times, memory) as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier tlq output in --out (never other files) and an existing --report; discard a resume state")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")
    run = p.add_argument_group("execution (does not change the result)")
    run.add_argument("--nproc", type=int, default=1, help="shard calibration over N processes via torchrun (one GPU each on CUDA)")
    run.add_argument("--max-cpu-memory", default=None, help="RAM for calibration activations per process, e.g. 8GiB; the rest spills to disk")
    run.add_argument("--no-resume", dest="resume", action="store_false", help="do not checkpoint after each layer (no resume after a crash)")
    run.add_argument("--stream", action="store_true", help="keep decoder layers on disk and load one at a time (for models larger than RAM/GPU memory)")
    p.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tlq.api import quantize  # cheap: torch loads only once the checks that need no model passed
    from tlq.utils.io import raise_on_sigterm

    if args.nproc > 1:
        from tlq.engine.distributed import launch_torchrun

        return launch_torchrun(args.nproc, args.argv)
    raise_on_sigterm()  # torchrun stops workers with SIGTERM: let cleanup (temp dirs) run
    max_cpu = parse_memory_size(args.max_cpu_memory) if args.max_cpu_memory is not None else None

    try:
        report = quantize(
            args.model,
            args.calib,
            args.out,
            scheme=args.scheme,
            method=args.method,
            overwrite=args.overwrite,
            report_path=args.report,
            progress=not args.quiet,
            max_cpu_memory=max_cpu,
            resume=args.resume,
            stream=args.stream,
            **{opt.name: getattr(args, opt.name) for opt in OPTIONS},
        )
    finally:
        _leave_process_group()
    if not args.quiet and os.environ.get("RANK", "0") == "0":
        from tlq.report import render_summary

        render_summary(report)
    return 0


def _leave_process_group() -> None:
    """Every rank leaves the process group before exiting (see ``distributed.shutdown``). The module is
    loaded only once a run got past the checks; a run refused before that has no group to leave, and
    importing it (and torch) just to say so would slow every refusal down."""
    dist = sys.modules.get("tlq.engine.distributed")
    if dist is not None:
        dist.shutdown()


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="compare quantized checkpoints against the FP16 model on a VQA set")
    p.add_argument("--model", required=True, help="the FP16 reference: local model directory or builtin:NAME")
    p.add_argument("--quantized", required=True, action="append", help="quantized output directory (repeatable)")
    p.add_argument("--data", default=None, help="evaluation JSONL ({image, question, answer} per line); built-in models default to their own")
    p.add_argument("--num-samples", type=int, default=None, help="evaluate a seeded subset of this size")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto | float32 | bfloat16 | float16")
    p.add_argument("--report", default=None, help="write the scores as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --report")
    p.add_argument("--allow-unquantized", action="store_true", help="accept a --quantized checkpoint without a quantization_config (e.g. to compare two FP checkpoints)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    lm = p.add_argument_group("lmms-eval bridge (pip install 'tlq[lmms]'; replaces the built-in VQA scoring)")
    lm.add_argument("--lmms-tasks", default=None, metavar="TASKS", help="comma-separated lmms-eval tasks, e.g. textvqa_val,mmmu_val; --num-samples becomes lmms-eval's --limit")
    lm.add_argument("--lmms-model", default=None, help="lmms-eval model name (default: from the model family: qwen2_vl, qwen2_5_vl, qwen3_vl, llava_hf)")
    lm.add_argument("--lmms-args", default=None, metavar="K=V,...", help="extra lmms-eval --model_args, e.g. max_pixels=1003520 (pretrained= is set by tlq)")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from tlq.api import evaluate
    from tlq.eval.table import render_eval_table

    if args.lmms_tasks is not None:
        from tlq.eval.lmms import evaluate_lmms, render_lmms_table

        if args.data is not None or args.dtype != "auto":
            raise ConfigError("--data and --dtype belong to the built-in VQA scoring; with --lmms-tasks, lmms-eval brings the task data "
                              "and its model class picks the dtype (pass model options with --lmms-args)")
        lmms = evaluate_lmms(args.model, args.quantized, args.lmms_tasks, lmms_model=args.lmms_model, model_args=args.lmms_args, limit=args.num_samples,
                             device=None if args.device == "auto" else args.device, report_path=args.report, overwrite=args.overwrite, progress=not args.quiet)
        render_lmms_table(lmms)
        return 0
    result = evaluate(
        args.model,
        args.quantized,
        args.data,
        report_path=args.report,
        overwrite=args.overwrite,
        num_samples=args.num_samples,
        device=args.device,
        dtype=args.dtype,
        progress=not args.quiet,
        allow_unquantized=args.allow_unquantized,
    )
    render_eval_table(result)
    return 0


def _add_importance(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("importance", help="write per-token gradient importances and heatmap PNGs per sample")
    p.add_argument("--model", required=True, help="local model directory or builtin:NAME")
    p.add_argument("--calib", default=None, help="calibration JSONL; built-in models default to their own")
    p.add_argument("--out", required=True, help="output directory (importance.safetensors, importance.json, sample_XXX.png)")
    p.add_argument("--num-samples", type=int, default=8, help="samples to analyse (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=None, help="as for quantize (default: the model's context length)")
    p.add_argument("--kind", choices=("grad2", "grad", "modality", "uniform"), default="grad2", help="importance from ||g||^2, ||g||, per-modality mean (MBQ) or uniform")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-png", action="store_true", help="skip the per-sample PNGs")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `tlq importance` output in --out (never other files)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_importance)


def _cmd_importance(args: argparse.Namespace) -> int:
    from tlq.importance import ImportanceConfig, run_importance

    summary = run_importance(
        args.model,
        args.calib,
        args.out,
        num_samples=args.num_samples,
        max_seq_len=args.max_seq_len,
        cfg=ImportanceConfig(kind=args.kind),
        device=args.device,
        seed=args.seed,
        overwrite=args.overwrite,
        draw=not args.no_png,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(f"wrote importances of {summary.get('num_samples', args.num_samples)} samples to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlq", description="Token-level importance-aware layer-wise quantization of VLMs")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected system error")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_importance(sub)
    for p in sub.choices.values():  # also accepted after the command (SUPPRESS: do not hide the global one)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an unexpected system error")
    return parser


def _silence_libraries() -> None:
    """--quiet: no progress bars from transformers either."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _interrupted_hint(args: argparse.Namespace) -> str:
    if args.command == "quantize" and getattr(args, "resume", False):
        return "; rerun the same command to resume from the last finished decoder layer"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if getattr(args, "quiet", False):
        _silence_libraries()
    try:
        return int(args.func(args))
    except ConfigError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say(f"interrupted{_interrupted_hint(args)}")
        return 130
    except OSError as exc:  # disk full, permissions, a vanished file: the system's words, one line
        if args.debug:
            raise
        say(f"error: {exc.strerror or exc}{f': {exc.filename!r}' if exc.filename else ''} (rerun with --debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
