"""The Python API: ``tlq.quantize(...)`` and ``tlq.evaluate(...)`` run a whole job and return its report.

The CLI is a thin layer over this module, so both behave the same. Importing it is cheap: every check
that needs no model (:mod:`tlq.preflight`) runs before torch and the engine are imported
(:mod:`tlq.pipeline`), so a mistake costs seconds. The pipeline's helpers (``calibrate``,
``load_model``, ``RunOptions``...) are reachable from here too, and ``build_config`` from
:mod:`tlq.config`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlq.config import QuantizeConfig, build_config
from tlq.preflight import check_evaluate, check_quantize
from tlq.utils.io import atomic_write_json, notice
from tlq.utils.outputs import sweep_leftovers

if TYPE_CHECKING:
    from tlq.eval.vqa import EvalConfig
    from tlq.models.base import ModelAdapter
    from tlq.report import QuantizeReport

__all__ = ["build_config", "evaluate", "evaluate_lmms", "quantize"]


def __getattr__(name: str) -> Any:
    """``tlq.api.calibrate``, ``tlq.api.load_model``...: the pipeline's names, imported on first use.
    Dunder lookups (the import system asks for ``__path__``) never trigger the heavy import."""
    if name.startswith("__"):
        raise AttributeError(name)
    import tlq.pipeline

    try:
        return getattr(tlq.pipeline, name)
    except AttributeError:
        raise AttributeError(f"module 'tlq.api' has no attribute {name!r}") from None


def quantize(model: str | Path, calib: str | Path | None, out: str | Path, *, scheme: str = "w4a16", method: str = "gptq", overwrite: bool = False, report_path: str | Path | None = None, progress: bool = True, config: QuantizeConfig | None = None, max_cpu_memory: int | None = None, resume: bool = True, stream: bool = False, **options: Any) -> QuantizeReport:
    """Quantize a local VLM checkpoint and export it as a compressed-tensors directory.

    ``options`` are those of :func:`build_config` (``num_samples``, ``group_size``, ``act_order``...);
    pass ``config`` instead to give a full :class:`QuantizeConfig`. Outputs are checked before any
    work starts, so an existing ``out`` costs seconds, not a calibration. With ``resume`` (default),
    progress is checkpointed after every layer next to ``out``; the same call after a crash continues
    from the last finished layer. Under ``torchrun`` the samples are sharded across ranks and rank 0
    writes the outputs. With ``stream``, decoder layers are read from the checkpoint one at a time and
    written to the output as soon as each is calibrated, so memory does not grow with depth.
    """
    cfg = config or build_config(scheme, method, **options)
    pre = check_quantize(model, calib, out, report_path, overwrite=overwrite, scheme=cfg.scheme, num_samples=cfg.calib.num_samples)
    out_dir, calib_path = pre.out, pre.calib

    import torch  # only now: the checks above answer in seconds

    from tlq.engine.distributed import all_gather_object, barrier, init_distributed
    from tlq.engine.layerwise import peak_memory_mb
    from tlq.pipeline import RunOptions, calibrate, checkpoint_dtype, resume_dir_for, write_output
    from tlq.report import QuantizeReport

    ctx = init_distributed(cfg.device)
    run_opts = RunOptions(progress=progress, max_cpu_memory=max_cpu_memory, resume_dir=resume_dir_for(Path(out_dir)) if resume else None, overwrite=overwrite, stream=stream)
    exports: list[Any] = []

    def streamed_export(adapter: ModelAdapter, hf_model: Any, model_dir: Path) -> Any:
        from tlq.export.streamed import StreamedExport

        if not ctx.is_main:
            return None
        exports.append(StreamedExport(hf_model, cfg.scheme, out_dir, num_layers=len(adapter.decoder_layers(hf_model)), layer_prefix=adapter.decoder_layer_prefix, source_dir=model_dir, ignore=list(adapter.spec.ignore), save_dtype=checkpoint_dtype(model_dir), overwrite=overwrite))
        return exports[0].write_layer

    resumes: list[Any] = []
    try:
        run = calibrate(model, calib_path, cfg, options=run_opts, ctx=ctx, sink_factory=streamed_export if stream else None, opened=resumes.append)
        t_export = time.perf_counter()
        if ctx.is_main:
            with run.clock("export"):
                write_output(run, exports[0] if exports else None, out_dir, overwrite)
    except BaseException:
        for export in exports:
            export.abort()
        for state in resumes:
            state.discard_if_unused()
        raise
    barrier()
    if run.resume is not None:
        run.resume.cleanup()
    if ctx.is_main:
        _sweep_after_success(out_dir, pre.replaces)
    export_seconds = time.perf_counter() - t_export
    rss_per_rank = all_gather_object(peak_memory_mb(torch.device("cpu")))
    report = QuantizeReport(
        model=str(model),
        model_type=run.adapter.spec.family,
        scheme=cfg.scheme.name,
        method=cfg.method,
        output=str(out_dir),
        num_samples=run.num_samples,
        num_tokens=run.num_tokens,
        device=str(run.device),
        dtype=str(run.dtype).replace("torch.", ""),
        layers=run.result.layers,
        calibration_seconds=run.seconds,
        export_seconds=export_seconds,
        total_seconds=run.seconds + export_seconds,
        peak_rss_mb=max(rss_per_rank),
        peak_rss_mb_per_rank=rss_per_rank,
        config=cfg.to_dict(),
        world_size=ctx.world_size,
        token_set=run.token_set,
        streamed=stream,
        sequences=run.sequences,
        phases=dict(run.clock.seconds),
    )
    if report_path is not None and ctx.is_main:
        atomic_write_json(report_path, report.to_dict())
    return report


def _sweep_after_success(out_dir: Path, replaced: bool) -> None:
    """What killed or refused runs of this ``--out`` left beside it goes once a run succeeds."""
    from tlq.engine.checkpoint import discard_stale_resume_dir
    from tlq.pipeline import resume_dir_for

    sweep_leftovers(out_dir)
    discard_stale_resume_dir(resume_dir_for(out_dir))
    if replaced:
        notice(f"replaced the earlier tlq output in {out_dir}")


def evaluate(model: str | Path, quantized: list[str | Path], data: str | Path | None, *, report_path: str | Path | None = None, overwrite: bool = False, num_samples: int | None = None, device: str = "auto", dtype: str = "auto", progress: bool = True, eval_config: "EvalConfig | None" = None, allow_unquantized: bool = False) -> dict[str, Any]:
    """Score the FP16 reference and each quantized checkpoint on the same VQA set, in one run.

    Each ``quantized`` checkpoint must be quantized (``allow_unquantized`` lifts that, e.g. to compare
    two FP checkpoints) and of ``model``'s architecture and shapes; see :func:`tlq.preflight.check_evaluate`.

    Returns (and optionally writes) ``{"fp16": {...}, "quantized": {...first...}, "retained_pct",
    "kl", "comparisons": [{...} per quantized checkpoint], "paired": [...]}``; accuracies are fractions
    in [0, 1]. Each score carries ``correct`` (per sample, "1"/"0") and each quantized one its ``flips``
    against FP16 (answers right in one and wrong in the other); ``paired`` holds McNemar's exact test for
    every pair of quantized checkpoints (same samples), on accuracy and on keeping FP16's answers
    (``keeps_fp16``), so a difference can be told from chance.
    """

    records, data = check_evaluate(model, quantized, data, report_path, overwrite=overwrite, num_samples=num_samples, allow_unquantized=allow_unquantized)
    from tlq.eval.paired import flip_test, mcnemar
    from tlq.eval.vqa import EvalConfig, compare, score_model  # torch: only once the checks passed
    from tlq.export.reload import load_quantized
    from tlq.pipeline import load_model

    ecfg = eval_config or EvalConfig()
    adapter, fp_model, processor, _model_dir, dev, dt = load_model(model, device, dtype)
    fp_scores, ref_logps = score_model("fp16", fp_model, processor, adapter, records, dev, ecfg, progress=progress)
    del fp_model
    comparisons = []
    for q in quantized:
        q_model = load_quantized(Path(q), adapter.spec.model_class, dev, dt, adapter=adapter)
        scores, _ = score_model(str(q), q_model, processor, adapter, records, dev, ecfg, reference=ref_logps, progress=progress)
        comparisons.append(compare(fp_scores, scores))
        del q_model
    first = comparisons[0]
    result = {
        "model": str(model),
        "data": str(data),
        "num_samples": len(records),
        "fp16": fp_scores.to_dict(),
        "quantized": first.to_dict(),
        "retained_pct": first.retained_pct,
        "kl": first.kl,
        "comparisons": [c.to_dict() for c in comparisons],
        "paired": [
            {"first": str(a.name), "second": str(b.name), **mcnemar(a.correct, b.correct).to_dict(),
             "keeps_fp16": flip_test(fp_scores.correct, a.correct, b.correct).to_dict()}
            for i, a in enumerate(comparisons) for b in comparisons[i + 1:]
        ],
    }
    if report_path is not None:
        atomic_write_json(report_path, result)
    return result


def evaluate_lmms(model: str | Path, quantized: list[str | Path], tasks: str | list[str], **options: Any) -> dict[str, Any]:
    """Compare FP16 and quantized checkpoints on lmms-eval benchmarks (needs ``pip install 'tlq[lmms]'``).

    See :func:`tlq.eval.lmms.evaluate_lmms` for ``options`` and the returned comparison; kept here so the
    Python API offers the same two evaluations as ``tlq eval`` (with and without ``--lmms-tasks``).
    """
    from tlq.eval.lmms import evaluate_lmms as _evaluate_lmms

    return _evaluate_lmms(model, quantized, tasks, **options)
