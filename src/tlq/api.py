"""The Python API: ``tlq.quantize(...)`` runs the whole job and returns its report.

The CLI is a thin layer over this module, so both behave the same.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

import torch

from tlq.builtin import default_dataset, resolve_model_dir
from tlq.config import CalibConfig, ConfigError, GPTQConfig, QuantizeConfig, ScaleSearchConfig, method_preset, resolve_scheme
from tlq.data.calibration import load_calibration
from tlq.engine.layerwise import EngineResult, LayerwiseEngine, peak_memory_mb
from tlq.models import adapter_for_dir
from tlq.models.base import ModelAdapter
from tlq.quant.quantizer import group_size_of
from tlq.report import QuantizeReport
from tlq.utils.io import atomic_write_json, check_writable_output

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the checkpoint was saved in (config.json), used for export and GPU compute."""
    cfg = json.loads((model_dir / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "float32"
    return _DTYPES.get(str(name), torch.float32)


def resolve_dtype(dtype: str, device: torch.device, model_dir: Path) -> torch.dtype:
    """CPU computes in float32 (bf16 matmuls are slow and coarse there); a GPU uses the checkpoint's dtype."""
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else checkpoint_dtype(model_dir)
    if dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _resolve_model(model: str | Path, device: str, dtype: str, ctx: Any) -> tuple[ModelAdapter, Path, torch.device, torch.dtype]:
    model_dir = resolve_model_dir(model)
    adapter = adapter_for_dir(model_dir)
    dev = resolve_device(device)
    if ctx is not None:
        dev = ctx.device_for(dev)  # one GPU per local rank under torchrun
    return adapter, model_dir, dev, resolve_dtype(dtype, dev, model_dir)


def load_model(model: str | Path, device: str = "auto", dtype: str = "auto", ctx: Any = None) -> tuple[ModelAdapter, Any, Any, Path, torch.device, torch.dtype]:
    """Resolve, validate and load a model directory; returns adapter, model, processor and settings."""
    adapter, model_dir, dev, dt = _resolve_model(model, device, dtype, ctx)
    hf_model, processor = adapter.load(model_dir, dev, dt)
    adapter.check_supported(hf_model)
    return adapter, hf_model, processor, model_dir, dev, dt


def load_streamed(model: str | Path, device: str = "auto", dtype: str = "auto", ctx: Any = None) -> tuple[ModelAdapter, Any, Any, Path, torch.device, torch.dtype]:
    """Like :func:`load_model`, but only the resident parts are loaded: returns a
    ``tlq.models.streaming.StreamedModel`` (its decoder layers stay on disk) in place of the model."""
    import transformers

    from tlq.models.streaming import StreamedModel

    adapter, model_dir, dev, dt = _resolve_model(model, device, dtype, ctx)
    streamed = StreamedModel(adapter, model_dir, dev, dt)
    adapter.check_supported(streamed.model)
    processor = transformers.AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
    return adapter, streamed, processor, model_dir, dev, dt


def build_config(scheme: str = "w4a16", method: str = "gptq", *, group_size: Any = None, symmetric: bool | None = None, num_samples: int = CalibConfig.num_samples, max_seq_len: int = CalibConfig.max_seq_len, seed: int = CalibConfig.seed, damp_percent: float = GPTQConfig.damp_percent, block_size: int = GPTQConfig.block_size, act_order: bool = GPTQConfig.act_order, gptq_target: str | None = None, solver: str | None = None, scale_search: str | None = None, search_grid: int = ScaleSearchConfig.grid, search_samples: int = ScaleSearchConfig.max_samples, search_scope: str | None = None, weighting: str | None = None, token_select: bool | None = None, quantized_inputs: bool | None = None, grad_at: str | None = None, token_fraction: float | None = None, device: str = "auto", dtype: str = "auto") -> QuantizeConfig:
    """Validate user-facing options into a ``QuantizeConfig``.

    ``method`` picks a preset (``method_preset``); every ``None`` option keeps the preset's value, any
    other value overrides it (that is how ablations are expressed). ``group_size=None`` keeps the scheme's.
    """
    kw = {} if group_size is None else {"group_size": group_size}
    qscheme = resolve_scheme(scheme, symmetric=symmetric, **kw)
    preset = dict(method_preset(method, qscheme))
    preset_target = preset.pop("gptq_target", GPTQConfig.target)
    search: ScaleSearchConfig = preset["search"]
    if scale_search == "auto":  # AWQ for weight-only schemes, SmoothQuant when activations are quantized
        scale_search = "smoothquant" if qscheme.quantizes_activations else "awq"
    if scale_search is not None and scale_search != search.kind:
        search = ScaleSearchConfig(kind=scale_search, scope=search.scope)
    search = dc_replace(search, grid=search_grid, max_samples=search_samples, **({} if search_scope is None else {"scope": search_scope}))
    overrides = {"solver": solver, "weighting": weighting, "token_select": token_select, "quantized_inputs": quantized_inputs}
    parts = {**preset, **{k: v for k, v in overrides.items() if v is not None}, "search": search}
    cfg = QuantizeConfig(
        scheme=qscheme,
        method=method,
        calib=CalibConfig(num_samples=num_samples, max_seq_len=max_seq_len, seed=seed),
        gptq=GPTQConfig(damp_percent=damp_percent, block_size=block_size, act_order=act_order, target=gptq_target or preset_target),
        device=device,
        dtype=dtype,
        **parts,
    )
    if grad_at is not None:
        cfg.importance = dc_replace(cfg.importance, grad_at=grad_at)
    if token_fraction is not None:
        cfg.selection = dc_replace(cfg.selection, token_fraction=token_fraction)
    return cfg


@dataclass
class CalibratedModel:
    """A model whose decoder holds fake-quantized weights (and activation quantizers), ready to export."""

    adapter: ModelAdapter
    model: Any
    processor: Any
    model_dir: Path
    device: torch.device
    dtype: torch.dtype
    config: QuantizeConfig
    result: EngineResult
    num_samples: int
    num_tokens: int
    seconds: float
    token_set: dict[str, Any] | None = None  # summary of the token-level calibration set (this rank's), if any
    resume: Any = None  # the ResumeState, to clean up once the output is written
    streamed: Any = None  # the StreamedModel of a streamed run (decoder layers not in memory)


def check_scheme_fits(adapter: ModelAdapter, model: Any, config: QuantizeConfig) -> None:
    """Fail before calibrating if the weight groups do not tile every decoder linear."""
    for layer in adapter.decoder_layers(model):
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                group_size_of(mod.in_features, config.scheme.weights)


# How each weighting maps onto the importance integration (tlq.importance.weights.ImportanceConfig.kind).
_WEIGHTING_KIND = {"uniform": "uniform", "modality": "modality"}


def token_calibration_set(adapter: ModelAdapter, model: Any, samples: list, config: QuantizeConfig, device: torch.device, progress: bool, sample_ids: list[int] | None = None, layers: Any = None, store: Any = list) -> Any:
    """Gradient importance -> token weights (-> token budget); None for plain, unweighted calibration."""
    from tlq.importance.calibset import SelectionConfig, build_token_calibration_set

    if config.weighting == "uniform" and not config.token_select:
        return None
    kind = _WEIGHTING_KIND.get(config.weighting, config.importance.kind)
    importance = dc_replace(config.importance, kind=kind)
    selection = config.selection if config.token_select else SelectionConfig(token_fraction=1.0)
    return build_token_calibration_set(adapter, model, samples, importance, selection, device=device, progress=progress, sample_ids=sample_ids, layers=layers, store=store)


@dataclass
class RunOptions:
    """How a run executes (not what it computes): none of this changes the result."""

    progress: bool = True
    max_cpu_memory: int | None = None  # bytes of calibration activations kept in RAM; beyond: spill to disk
    spill_dir: str | None = None
    resume_dir: Path | None = None  # per-layer checkpoints; None = no resume
    overwrite: bool = False  # discard an existing resume directory of a different run
    stream: bool = False  # keep decoder layers on disk, load one at a time (models larger than memory)


def resume_dir_for(out_dir: Path) -> Path:
    """Where a run writing ``out_dir`` keeps its per-layer checkpoints (a hidden sibling)."""
    return out_dir.parent / f".{out_dir.name}.tlq-resume"


def _fingerprint_parts(config: QuantizeConfig, model_dir: Path, calib: Path) -> dict[str, Any]:
    from tlq import __version__
    from tlq.engine.checkpoint import file_sha256, model_identity

    return {
        "config": config.to_dict(),
        "model": model_identity(model_dir),
        "calibration": file_sha256(calib),
        "tlq": __version__,
        "torch": torch.__version__,
    }


def _open_resume(options: RunOptions, config: QuantizeConfig, model_dir: Path, calib: Path, ctx: Any) -> Any:
    from tlq.engine.checkpoint import ResumeState, run_fingerprint

    if options.resume_dir is None:
        return None
    parts = _fingerprint_parts(config, model_dir, calib)
    state = ResumeState(options.resume_dir, run_fingerprint(parts), parts, ctx=ctx)
    state.open(overwrite=options.overwrite)
    return state


def calibrate(model: str | Path, calib: str | Path, config: QuantizeConfig, *, progress: bool = True, options: RunOptions | None = None, ctx: Any = None, sink_factory: Any = None) -> CalibratedModel:
    """Load, calibrate layer by layer, and return the fake-quantized model (nothing is written).

    Under torchrun (``ctx`` from ``init_distributed``), every rank loads the model and calibrates its
    shard of the samples; all decisions use statistics reduced across ranks, so all ranks end with the
    same model. With ``options.stream`` the decoder layers stay on disk and are loaded one at a time
    (importance pass and calibration alike); the returned model then holds no decoder weights, and
    ``sink_factory(adapter, model, model_dir)`` gives the engine's per-layer sink (a streamed export)
    — or ``None`` on ranks that write nothing.
    """
    from tlq.engine.activations import MemoryBudget, activation_list
    from tlq.engine.distributed import DistContext, all_reduce_scalars_sum, shard_indices
    from tlq.models.streaming import StreamedLayers

    options = options or RunOptions(progress=progress)
    ctx = ctx or DistContext()
    t0 = time.perf_counter()
    streamed = layers = None
    if options.stream:
        adapter, streamed, processor, model_dir, dev, dt = load_streamed(model, config.device, config.dtype, ctx=ctx)
        hf_model, layers = streamed.model, StreamedLayers(streamed)
    else:
        adapter, hf_model, processor, model_dir, dev, dt = load_model(model, config.device, config.dtype, ctx=ctx)
    check_scheme_fits(adapter, hf_model, config)
    ids: list[int] = []

    def shard(n: int) -> list[int]:
        ids.extend(shard_indices(n, ctx))
        return ids

    samples = load_calibration(calib, processor, adapter, hf_model, num_samples=config.calib.num_samples, max_seq_len=config.calib.max_seq_len, seed=config.calib.seed, shard=shard)
    show = options.progress and ctx.is_main
    budget = MemoryBudget(options.max_cpu_memory) if options.max_cpu_memory is not None else None
    store = functools.partial(activation_list, budget=budget, spill_dir=options.spill_dir)  # streamed importance inputs
    token_set = token_calibration_set(adapter, hf_model, samples, config, dev, show, ids, layers=layers, store=store)
    weight_fn = _global_weight_fn(token_set, ids) if token_set is not None else None
    resume = _open_resume(options, config, model_dir, Path(calib), ctx)
    sink = sink_factory(adapter, hf_model, model_dir) if sink_factory is not None else None
    engine = LayerwiseEngine(adapter, hf_model, config, dev, scale_dtype=checkpoint_dtype(model_dir), token_weights=weight_fn, progress=show, ctx=ctx, budget=budget, spill_dir=options.spill_dir, layers=layers, sink=sink, keep_codes=not options.stream)
    result = engine.calibrate(samples, sample_ids=ids, resume=resume)
    num_samples, num_tokens = all_reduce_scalars_sum([len(samples), sum(s.seq_len for s in samples)])  # no-op in one process
    return CalibratedModel(
        adapter=adapter,
        model=hf_model,
        processor=processor,
        model_dir=model_dir,
        device=dev,
        dtype=dt,
        config=config,
        result=result,
        num_samples=int(num_samples),
        num_tokens=int(num_tokens),
        seconds=time.perf_counter() - t0,
        token_set=token_set.summary() if token_set is not None else None,
        resume=resume,
        streamed=streamed,
    )


def _write_output(run: CalibratedModel, streamed_export: Any, out_dir: Path, overwrite: bool) -> None:
    """Finish a streamed export (its layers are written already), or export the in-memory model."""
    from tlq.export.compressed_tensors import export_compressed_tensors

    if streamed_export is not None:
        streamed_export.finish(run.streamed.resident_state_dict())
        return
    export_compressed_tensors(run.model, run.result.quantized, run.config.scheme, out_dir, source_dir=run.model_dir, ignore=list(run.adapter.spec.ignore), save_dtype=checkpoint_dtype(run.model_dir), overwrite=overwrite)


def _global_weight_fn(token_set: Any, ids: list[int]) -> Any:
    """The engine asks by global sample id; the token set is indexed by this rank's local order."""
    local = token_set.weight_fn()
    position = {gid: i for i, gid in enumerate(ids)}
    return lambda layer, gid, linear=None: local(layer, position[gid], linear)


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
    from tlq.engine.distributed import all_gather_object, barrier, init_distributed

    cfg = config or build_config(scheme, method, **options)
    out_dir = check_writable_output(out, overwrite, "output directory")
    if report_path is not None:
        check_writable_output(report_path, overwrite, "report")
    calib_path = default_dataset(model, "calib", calib)
    ctx = init_distributed(cfg.device)
    run_opts = RunOptions(progress=progress, max_cpu_memory=max_cpu_memory, resume_dir=resume_dir_for(Path(out_dir)) if resume else None, overwrite=overwrite, stream=stream)
    exports: list[Any] = []

    def streamed_export(adapter: ModelAdapter, hf_model: Any, model_dir: Path) -> Any:
        from tlq.export.streamed import StreamedExport

        if not ctx.is_main:
            return None
        exports.append(StreamedExport(hf_model, cfg.scheme, out_dir, num_layers=len(adapter.decoder_layers(hf_model)), layer_prefix=adapter.decoder_layer_prefix, source_dir=model_dir, ignore=list(adapter.spec.ignore), save_dtype=checkpoint_dtype(model_dir), overwrite=overwrite))
        return exports[0].write_layer

    try:
        run = calibrate(model, calib_path, cfg, options=run_opts, ctx=ctx, sink_factory=streamed_export if stream else None)
        t_export = time.perf_counter()
        if ctx.is_main:
            _write_output(run, exports[0] if exports else None, out_dir, overwrite)
    except BaseException:
        for export in exports:
            export.abort()
        raise
    barrier()
    if run.resume is not None:
        run.resume.cleanup()
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
    )
    if report_path is not None and ctx.is_main:
        atomic_write_json(report_path, report.to_dict())
    return report


def evaluate(model: str | Path, quantized: list[str | Path], data: str | Path | None, *, report_path: str | Path | None = None, overwrite: bool = False, num_samples: int | None = None, device: str = "auto", dtype: str = "auto", progress: bool = True, eval_config: "EvalConfig | None" = None) -> dict[str, Any]:
    """Score the FP16 reference and each quantized checkpoint on the same VQA set, in one run.

    Returns (and optionally writes) ``{"fp16": {...}, "quantized": {...first...}, "retained_pct",
    "kl", "comparisons": [{...} per quantized checkpoint]}``; accuracies are fractions in [0, 1].
    """
    from tlq.data.calibration import choose, read_jsonl
    from tlq.eval.vqa import EvalConfig, compare, score_model
    from tlq.export.reload import load_quantized

    if not quantized:
        raise ConfigError("nothing to compare: pass at least one --quantized OUT directory")
    for q in quantized:
        if not (Path(q) / "config.json").is_file():
            raise ConfigError(f"--quantized {str(q)!r} is not a checkpoint directory (no config.json)")
    if report_path is not None:
        check_writable_output(report_path, overwrite, "report")
    ecfg = eval_config or EvalConfig()
    data = default_dataset(model, "test", data)
    records = read_jsonl(data)
    if num_samples is not None:
        records = choose(records, num_samples, seed=0)
    adapter, fp_model, processor, _model_dir, dev, dt = load_model(model, device, dtype)
    fp_scores, ref_logps = score_model("fp16", fp_model, processor, adapter, records, dev, ecfg, progress=progress)
    del fp_model
    comparisons = []
    for q in quantized:
        q_model = load_quantized(Path(q), adapter.spec.model_class, dev, dt)
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
