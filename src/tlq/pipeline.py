"""The calibration pipeline behind ``tlq quantize``: load the model, encode the calibration data, build
the token calibration set, run the layer-wise engine; plus the model-loading helpers the evaluation,
the importance report and the benchmarks share.

It imports torch and the engine; :mod:`tlq.api` imports it only after every check that needs no model
has passed, so a mistake on the command line costs seconds.
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

from tlq.config import ConfigError, QuantizeConfig, SelectionConfig
from tlq.data.calibration import CalibSample, answers_cut, check_answers_kept, context_length, load_calibration
from tlq.engine.distributed import all_reduce_max_, all_reduce_scalar_sum, all_reduce_scalars_sum
from tlq.engine.layerwise import EngineResult, LayerwiseEngine
from tlq.models.base import ModelAdapter
from tlq.preflight import check_model_dir
from tlq.quant.quantizer import group_size_of
from tlq.utils.finite import check_weights
from tlq.utils.io import notice
from tlq.utils.timing import PhaseClock

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
    model_dir, adapter = check_model_dir(model)
    dev = resolve_device(device)
    if ctx is not None:
        dev = ctx.device_for(dev)  # one GPU per local rank under torchrun
    return adapter, model_dir, dev, resolve_dtype(dtype, dev, model_dir)


def load_model(model: str | Path, device: str = "auto", dtype: str = "auto", ctx: Any = None) -> tuple[ModelAdapter, Any, Any, Path, torch.device, torch.dtype]:
    """Resolve, validate and load a model directory; returns adapter, model, processor and settings."""
    adapter, model_dir, dev, dt = _resolve_model(model, device, dtype, ctx)
    hf_model, processor = adapter.load(model_dir, dev, dt)
    adapter.check_supported(hf_model)
    check_weights(hf_model.named_parameters(), str(model_dir), dt)
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
    sequences: dict[str, int] | None = None  # the --max-seq-len cap and what it cut (sequence_summary)
    clock: PhaseClock | None = None  # seconds per phase so far (the export adds its own)
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


def token_calibration_set(adapter: ModelAdapter, model: Any, samples: list, config: QuantizeConfig, device: torch.device, progress: bool, sample_ids: list[int] | None = None, layers: Any = None, store: Any = list, layer0: list | None = None) -> Any:
    """Gradient importance -> token weights (-> token budget); None for plain, unweighted calibration."""
    from tlq.importance.calibset import build_token_calibration_set, sample_valid_mask

    if config.weighting in ("uniform", "integrated") and not config.token_select:
        return None  # integrated-gradient weights are computed in each layer (tlq.importance.integrated)
    kind = _WEIGHTING_KIND.get(config.weighting, config.importance.kind)
    importance = dc_replace(config.importance, kind=kind)
    selection = config.selection if config.token_select else SelectionConfig(token_fraction=1.0)
    # The floor is over the whole set: a sample's budget must not depend on which rank holds it.
    total_valid = int(all_reduce_scalar_sum(sum(int(sample_valid_mask(s).sum()) for s in samples)))
    return build_token_calibration_set(adapter, model, samples, importance, selection, device=device, progress=progress, sample_ids=sample_ids, layers=layers, store=store, layer0=layer0,
                                       total_valid=total_valid, reduce_sums=all_reduce_scalars_sum,
                                       keep_unbudgeted=adapter.routes_tokens and config.selection.experts_every_row)


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
    done = state.open(overwrite=options.overwrite)
    if done:
        notice(f"resuming from {options.resume_dir}: {done} decoder layer(s) already calibrated")
    return state


def calibrate(model: str | Path, calib: str | Path, config: QuantizeConfig, *, progress: bool = True, options: RunOptions | None = None, ctx: Any = None, sink_factory: Any = None, opened: Any = None) -> CalibratedModel:
    """Load, calibrate layer by layer, and return the fake-quantized model (nothing is written).

    Under torchrun (``ctx`` from ``init_distributed``), every rank loads the model and calibrates its
    shard of the samples; all decisions use statistics reduced across ranks, so all ranks end with the
    same model. With ``options.stream`` the decoder layers stay on disk and are loaded one at a time
    (importance pass and calibration alike); the returned model then holds no decoder weights, and
    ``sink_factory(adapter, model, model_dir)`` gives the engine's per-layer sink (a streamed export)
    — or ``None`` on ranks that write nothing. ``opened(state)`` is told the resume state as soon as it
    exists, so a caller can take it back if the run fails before finishing a layer.
    """
    from tlq.engine.activations import MemoryBudget, activation_list
    from tlq.engine.distributed import DistContext, shard_indices
    from tlq.engine.steps import check_steps
    from tlq.models.streaming import StreamedLayers

    check_steps(config.layer_steps())  # a misspelt step costs seconds, not a model load
    options = options or RunOptions(progress=progress)
    ctx = ctx or DistContext()
    t0 = time.perf_counter()
    clock = PhaseClock()
    streamed = layers = None
    with clock("load"):
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

    cap = config.calib.max_seq_len or context_length(hf_model)
    with clock("calibration data"):
        samples = load_calibration(calib, processor, adapter, hf_model, num_samples=config.calib.num_samples, max_seq_len=cap, seed=config.calib.seed, shard=shard)
    lengths = sequence_summary(samples, cap, str(calib))
    cut, total = all_reduce_scalars_sum([answers_cut(samples), len(samples)])  # every rank decides alike
    check_answers_kept(int(cut), int(total), cap, str(calib))
    show = options.progress and ctx.is_main
    budget = MemoryBudget(options.max_cpu_memory) if options.max_cpu_memory is not None else None
    store = functools.partial(activation_list, budget=budget, spill_dir=options.spill_dir)  # streamed importance inputs
    engine = LayerwiseEngine(adapter, hf_model, config, dev, scale_dtype=checkpoint_dtype(model_dir), progress=show, ctx=ctx, budget=budget, spill_dir=options.spill_dir, layers=layers, keep_codes=not options.stream, clock=clock)
    # the vision tower and layer 0's inputs, once per sample: the importance pass and the engine share them
    with clock("vision tower + layer-0 capture"):
        layer0 = engine.capture_inputs(samples)
    with clock("importance pass"):
        token_set = token_calibration_set(adapter, hf_model, samples, config, dev, show, ids, layers=layers, store=store, layer0=layer0)
    engine.token_weights = _global_weight_fn(token_set, ids) if token_set is not None else None
    resume = _open_resume(options, config, model_dir, Path(calib), ctx)
    if resume is not None and opened is not None:
        opened(resume)
    engine.sink = sink_factory(adapter, hf_model, model_dir) if sink_factory is not None else None
    result = engine.calibrate(samples, sample_ids=ids, resume=resume, inputs=layer0)  # takes layer0 over
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
        sequences=lengths,
        clock=clock,
        resume=resume,
        streamed=streamed,
    )


def sequence_summary(samples: list[CalibSample], cap: int, where: str) -> dict[str, int]:
    """The length cap and its effect over all ranks: the longest sample as the processor made it, and
    how many samples lost trailing text to the cap (said as a warning too)."""
    longest = torch.tensor([max((s.full_len for s in samples), default=0)], dtype=torch.float64)
    all_reduce_max_(longest)
    (truncated,) = all_reduce_scalars_sum([sum(s.full_len > s.seq_len for s in samples)])
    if truncated:
        notice(f"{where}: {int(truncated)} sample(s) longer than --max-seq-len {cap} lost their trailing text (longest: {int(longest[0])} tokens)")
    return {"max_seq_len": cap, "longest_sample_tokens": int(longest[0]), "truncated_samples": int(truncated)}


def write_output(run: CalibratedModel, streamed_export: Any, out_dir: Path, overwrite: bool) -> None:
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
    return lambda layer, gid, linear=None, every_token=False: local(layer, position[gid], linear, every_token)
