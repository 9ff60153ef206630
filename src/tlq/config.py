"""Quantization schemes and run configuration.

Every number that changes a result (bits, group size, damping, sample counts) lives here with a
documented default, so that the CLI, the Python API and the benchmarks share one source of truth.

Integer convention (the same as compressed-tensors, so that export is a copy, not a conversion):
codes are *signed* integers in ``[qmin, qmax] = [-2**(b-1), 2**(b-1) - 1]`` and
``dequant = (code - zero_point) * scale``. Symmetric schemes have ``zero_point == 0``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal

Granularity = Literal["group", "channel"]


class ConfigError(ValueError):
    """A user-facing configuration problem; the message names the problem and the fix."""


class _SignedIntRange:
    """The signed code range of a ``bits``-bit integer (the compressed-tensors convention)."""

    bits: int

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True)
class WeightQuantSpec(_SignedIntRange):
    """How the weight of one linear layer is quantized.

    ``group_size`` applies along the input dimension; ``None`` means one scale per output channel.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"weight bits must be in [2, 8], got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            raise ConfigError(f"group size must be positive or None (per channel), got {self.group_size}")


@dataclass(frozen=True)
class ActQuantSpec(_SignedIntRange):
    """Dynamic per-token symmetric activation quantization (the input of each quantized linear).

    Dynamic per-token int8 is what vLLM's W8A8 kernels and compressed-tensors' ``int-quantized``
    reload path apply, so this is the only activation mode: the calibration must see what inference does.
    """

    bits: int = 8

    def __post_init__(self) -> None:
        if not 4 <= self.bits <= 16:
            raise ConfigError(f"activation bits must be in [4, 16], got {self.bits}")


@dataclass(frozen=True)
class QuantScheme:
    """A named weight (+ optional activation) scheme, e.g. ``w4a16``."""

    name: str
    weights: WeightQuantSpec
    activations: ActQuantSpec | None = None

    @property
    def quantizes_activations(self) -> bool:
        return self.activations is not None


# Defaults follow what the field compares on (MBQ / QIG / TLQ papers) and what vLLM serves:
#  - w4a16: int4, group 128, symmetric (vLLM's Marlin kernels serve symmetric int4 g128).
#  - w3a16: int3, group 128, asymmetric (MBQ/QIG's W3 setting).
#  - w4a8 : int4 per-channel symmetric weights, int8 dynamic per-token activations (MBQ/QIG).
#  - w8a8 : int8 per-channel symmetric weights, int8 dynamic per-token activations.
SCHEMES: dict[str, QuantScheme] = {
    "w4a16": QuantScheme("w4a16", WeightQuantSpec(bits=4, group_size=128, symmetric=True)),
    "w3a16": QuantScheme("w3a16", WeightQuantSpec(bits=3, group_size=128, symmetric=False)),
    "w4a8": QuantScheme("w4a8", WeightQuantSpec(bits=4, group_size=None, symmetric=True), ActQuantSpec(8)),
    "w8a8": QuantScheme("w8a8", WeightQuantSpec(bits=8, group_size=None, symmetric=True), ActQuantSpec(8)),
}

def resolve_scheme(name: str) -> QuantScheme:
    """Look up a scheme by name (``--group-size`` and ``--symmetric`` are options: see :data:`OPTIONS`)."""
    key = name.lower()
    if key not in SCHEMES:
        raise ConfigError(f"unknown scheme {name!r}; choose one of: {', '.join(SCHEMES)}")
    return SCHEMES[key]


@dataclass
class GPTQConfig:
    """GPTQ solver settings (Frantar et al., 2023)."""

    damp_percent: float = 0.01  # dampening, as a fraction of the mean Hessian diagonal
    block_size: int = 128  # lazy-batch column block
    act_order: bool = False  # quantize columns by decreasing Hessian diagonal
    # What each linear's output is matched to: "quantized" = W X_q (plain GPTQ: the FP weights on the
    # inputs the quantized path delivers); "fp" = W X_fp (GPTAQ-style: the FP model's own output, so the
    # solver also undoes the error of the layers and linears before it). See tlq.quant.gptq.
    target: str = "quantized"
    # A linear that saw fewer positive-weight token rows than this (a rarely routed MoE expert) is
    # quantized by RTN instead: a Hessian of a handful of rows fits the solve to those rows and spreads
    # the compensation over the directions no row covered. 64: the smallest count from which GPTQ's
    # held-out error was not above RTN's beyond the spread for any linear of the trained built-ins, in two
    # seeds (docs/moe-min-tokens.md; a proxy: dense linears fed n random rows, no trained MoE yet).
    # Dense linears see thousands of rows, so it never applies to them.
    min_tokens: int = 64
    # The same for an expert's linears that read the MoE block's input (gate/up, an RMSNorm output): 16. In
    # the same measurement no linear reading a norm output was worse than RTN beyond the spread from 4 rows on,
    # and none of them was below the threshold at 16 in either seed; only ``down_proj`` (reading the gated
    # product) needed 32-64. 16, not 4: the proxy's inputs are low-rank, released experts' are wider.
    min_tokens_in: int = 16
    # The most memory the Hessians of one observation pass may hold (GiB). A MoE stage (every expert's
    # gate/up, or every down) whose float64 Hessians exceed it is observed in several passes over the layer,
    # a chunk of experts each: the same statistics (experts read the block's input independently) for one
    # extra forward per chunk. Qwen3.5-35B-A3B's 512 gate/up linears would need 16 GiB in one pass.
    stats_memory_gib: float = 4.0
    # How the FP target's shift is computed (the same W* up to float rounding): "applied" = W D accumulated
    # row by row through W and W* formed before the column loop; "deferred" = D itself for linears with
    # out >= in and W*'s second triangular product inside GPTQ's own error updates (less arithmetic; at
    # 7B widths most of the FP target's). TLQ's preset defers it: with the kept-rows passes and one record
    # pass per layer it passed a paired non-inferiority rule on the val split (docs/methods.md, "The three
    # rounding-level cuts together"); the dataclass default stays the plain form.
    fp_shift: str = "applied"

    def __post_init__(self) -> None:
        if self.fp_shift not in GPTQ_FP_SHIFTS:
            raise ConfigError(f"unknown FP-target shift {self.fp_shift!r}; choose one of: {', '.join(GPTQ_FP_SHIFTS)}")
        if not self.stats_memory_gib > 0:
            raise ConfigError(f"--gptq-stats-memory must be a positive number of GiB (default 4), got {self.stats_memory_gib}")
        if self.min_tokens < 1 or self.min_tokens_in < 1:
            raise ConfigError(f"--gptq-min-tokens and --gptq-min-tokens-in must be >= 1 (routed rows below which an expert's linear falls back to RTN, "
                              f"defaults 64 and 16), got {self.min_tokens} and {self.min_tokens_in}")
        if not 0.0 <= self.damp_percent < 1.0:
            raise ConfigError(f"--damp must be in [0, 1) (a fraction of the mean Hessian diagonal, default 0.01), got {self.damp_percent}")
        if self.block_size < 1:
            raise ConfigError(f"--block-size must be a positive number of columns (default 128), got {self.block_size}")
        if self.target not in GPTQ_TARGETS:
            raise ConfigError(f"unknown GPTQ target {self.target!r}; choose one of: {', '.join(GPTQ_TARGETS)}")


GPTQ_TARGETS = ("quantized", "fp")
GPTQ_FP_SHIFTS = ("applied", "deferred")


@dataclass
class CalibConfig:
    """How many calibration samples, and how long each may be."""

    num_samples: int = 128  # the papers' default (128 COCO/ShareGPT4V samples)
    # Longer samples lose their trailing text (visual tokens are never cut: an error says so). None = the
    # model's context length, so the processor's output for ordinary images fits whatever its size
    # (LLaVA-OneVision's anyres: ~3,700 tokens for one 448 px image); the report says what was cut.
    max_seq_len: int | None = None
    seed: int = 0
    # The per-layer error of the report (quantized stream against the FP stream) is measured on the globally
    # first this many samples when the method's steps need only one of the two streams (plain GPTQ reads the
    # quantized one, AWQ/SmoothQuant/MBQ the FP one): the other stream then runs these samples only, which
    # at 128 samples saves nearly a third of plain GPTQ's layer forwards and half its stream memory. 0 = all.
    error_samples: int = 8

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ConfigError(f"--num-samples must be positive, got {self.num_samples}")
        if self.error_samples < 0:
            raise ConfigError(f"--error-samples must be 0 (every sample) or positive, got {self.error_samples}")
        if self.max_seq_len is not None and self.max_seq_len < 1:
            raise ConfigError(f"--max-seq-len must be positive, got {self.max_seq_len}")


# Memory sizes on the command line (--max-cpu-memory): decimal and binary units.
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # single letters are binary, as in Docker and Slurm
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_memory_size(text: str | int | float, option: str = "--max-cpu-memory") -> int:
    """Bytes from ``"4GB"`` (10^9), ``"512MiB"`` (2^20), ``"8G"`` (2^30), ``"1e9"`` or a number.

    Units (case-insensitive): B; KB MB GB TB (decimal); KiB MiB GiB TiB and K M G T (binary).
    """
    if isinstance(text, bool):
        raise ConfigError(f"invalid memory size {text!r} for {option}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        m = _SIZE_RE.match(str(text))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(
                f"invalid memory size {text!r} for {option}: give bytes or a number with a unit, "
                f"e.g. 4GB, 512MiB, 8G or 1e9 (units: B, KB/MB/GB/TB = powers of 1000, KiB/MiB/GiB/TiB or K/M/G/T = powers of 1024)"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = value * _UNITS[unit]
    if not math.isfinite(size) or size < 0:
        raise ConfigError(f"invalid memory size {text!r} for {option}: must be a finite, non-negative amount")
    return int(size)


SEARCH_SCOPES = ("layer", "block")
# How the FP statistics and targets of a layer's mappings are recorded (tlq.engine.smoothing).
SEARCH_RECORDS = ("mapping", "layer")
MATMUL_DTYPES = ("auto", "compute", "bfloat16")


@dataclass
class ScaleSearchConfig:
    """Per-channel scale migration before the weights are solved (AWQ / SmoothQuant style)."""

    kind: str = "none"  # none | awq | smoothquant
    grid: int = 20  # exponents tried: i / grid for i in range(grid) (AWQ's grid)
    coarse: int = 1  # 1 = every exponent; k > 1 = every k-th, then the k-1 on each side of the best (coarse-to-fine)
    fixed_alpha: float | None = None  # skip the search and use this exponent (plain SmoothQuant: 0.5)
    max_samples: int = 64  # calibration samples the search loss runs on (cost grows with grid x samples)
    # What a candidate's loss compares: "layer" = the decoder layer's output (an attention error is seen
    # through the MLP after it; MLP mappings are measured on the MLP alone, which is the same number),
    # "block" = the output of the block holding the mapping's linears (AWQ's own loss: cheaper, blind to
    # what the rest of the layer does with the error). See docs/methods.md.
    scope: str = "layer"
    # Precision of the candidates' matmuls where the run computes in float32 (the FP targets keep it):
    # "compute" = float32 (exact); "bfloat16" = bf16 operands with float32 accumulation, about 2x the
    # float32 rate on a CPU with AVX512-BF16 or AMX; "auto" = bfloat16 unless the CPU has neither (there
    # bf16 is emulated, slower). The loss is then noisier by the bf16 rounding; docs/cost.md measures what
    # that does to the chosen exponents and to val KL.
    loss_dtype: str = "compute"
    # How the FP pass that records each mapping's channel statistics, block inputs and targets runs:
    # "mapping" = a pass before each mapping, after the folds before it; "layer" = one pass of the layer
    # before its first fold records every mapping (as AutoAWQ and llm-compressor collect them; later
    # mappings then see the layer before earlier folds, which the FP function equals up to float
    # rounding): 0.79x the search's time at LLaVA-OneVision-0.5B widths. TLQ's preset records per layer
    # (it passed the paired non-inferiority rule with the two other rounding-level cuts, docs/methods.md);
    # AWQ, SmoothQuant and MBQ keep one pass per mapping, as before.
    record: str = "mapping"

    def __post_init__(self) -> None:
        if self.record not in SEARCH_RECORDS:
            raise ConfigError(f"unknown scale-search record {self.record!r}; choose one of {', '.join(SEARCH_RECORDS)}")
        if self.loss_dtype not in MATMUL_DTYPES:
            raise ConfigError(f"unknown scale-search loss dtype {self.loss_dtype!r}; choose one of {', '.join(MATMUL_DTYPES)}")
        if self.kind not in ("none", "awq", "smoothquant"):
            raise ConfigError(f"unknown scale search {self.kind!r}; choose none, awq or smoothquant")
        if self.scope not in SEARCH_SCOPES:
            raise ConfigError(f"unknown scale search scope {self.scope!r}; choose one of {', '.join(SEARCH_SCOPES)}")
        if self.grid < 1 or self.max_samples < 1:
            raise ConfigError(f"--search-grid and --search-samples must be positive, got {self.grid} and {self.max_samples}")
        if self.coarse < 1:
            raise ConfigError(f"--search-coarse must be >= 1 (1 = try every exponent), got {self.coarse}")


SOLVERS = ("rtn", "gptq")
WEIGHTINGS = ("uniform", "modality", "token", "integrated")
# Where the importance pass takes token gradients (tlq.importance.gradients): each decoder layer's output,
# its input, or its output plus each linear's own output ("linear": per-linear token weights).
GRAD_AT = ("output", "input", "linear")
IMPORTANCE_KINDS = ("grad2", "grad", "modality", "uniform")
SAMPLE_WEIGHTS = ("equal", "curvature")
TOKEN_RANKS = ("importance", "random", "sampled", "coupled")


@dataclass(frozen=True)
class ImportanceConfig:
    """How raw token gradients become token weights (see the module docstring for the order of steps)."""

    kind: str = "grad2"  # grad2 (||g||^2) | grad (||g||) | modality (per-modality mean of grad2 = MBQ) | uniform
    per_layer: bool = True  # False: one weight per token, the mean over layers of the normalised rows
    floor: float = 0.1  # minimum weight relative to the row's mean weight, in [0, 1) (0 = no floor)
    clip_quantile: float | None = 0.99  # clip each row at this quantile of its tokens (None or 1.0 = off)
    modality_mix: float = 0.3  # lam in  w = lam * modality_mean + (1 - lam) * w  (0 = pure token weights)
    normalize_per_sample: bool = True  # mean weight 1 over each sample's tokens, per layer
    # gradient w.r.t. each decoder layer's "output" hidden state (DESIGN), its "input", or "linear": the
    # layer's output plus each linear's own output (each linear's inputs weighted by their own importance)
    grad_at: str = "output"
    # Precision of the pass's matmuls where the run computes in float32 (tlq.utils.precision): "compute"
    # = float32 (exact gradients), "bfloat16" through autocast (norms, softmax, the head's loss stay
    # float32), "auto" = bfloat16 where native: 0.62x the pass's time at LLaVA-OneVision-0.5B widths, but
    # it missed the val rule in two of six cells, so no preset uses it (docs/methods.md).
    matmul_dtype: str = "compute"
    # weighting="integrated" (QIG, tlq.importance.integrated): midpoints of the path integral, and the
    # interquartile fence the weights are clipped to; QIG's own values (32 points, Tukey's 1.5)
    ig_steps: int = 32
    ig_fence: float = 1.5
    # How much of the objective each sample gets. equal: every sample's weights have mean 1. curvature:
    # scaled by its answer's softmax curvature under the FP model, 1 - sum_v p_v^2 (the trace of the
    # second-order KL term at a logit), over the set's mean; a sure answer, which no rounding error flips,
    # then counts less than a near-tie (docs/methods.md). sample_floor: no sample below this share of the mean.
    sample_weights: str = "equal"
    sample_floor: float = 0.1

    def __post_init__(self) -> None:
        if self.ig_steps < 1:
            raise ConfigError(f"ig_steps must be a positive number of integration points, got {self.ig_steps}")
        if self.ig_fence < 0:
            raise ConfigError(f"ig_fence must be >= 0 (interquartile ranges beyond the quartiles), got {self.ig_fence}")
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ConfigError(f"unknown importance matmul dtype {self.matmul_dtype!r}; choose one of {', '.join(MATMUL_DTYPES)}")
        if self.kind not in IMPORTANCE_KINDS:
            raise ConfigError(f"unknown importance kind {self.kind!r}; choose one of {', '.join(IMPORTANCE_KINDS)}")
        if not 0.0 <= self.floor < 1.0:
            raise ConfigError(f"importance floor must be in [0, 1) (a fraction of the mean weight), got {self.floor}")
        if self.clip_quantile is not None and not 0.0 < self.clip_quantile <= 1.0:
            raise ConfigError(f"clip_quantile must be in (0, 1] or None, got {self.clip_quantile}")
        if self.grad_at not in GRAD_AT:
            raise ConfigError(f"grad_at must be one of {', '.join(GRAD_AT)}, got {self.grad_at!r}")
        if not 0.0 <= self.modality_mix <= 1.0:
            raise ConfigError(f"modality_mix must be in [0, 1], got {self.modality_mix}")
        if self.sample_weights not in SAMPLE_WEIGHTS:
            raise ConfigError(f"unknown sample weights {self.sample_weights!r}; choose one of {', '.join(SAMPLE_WEIGHTS)}")
        if not 0.0 <= self.sample_floor <= 1.0:
            raise ConfigError(f"sample_floor must be in [0, 1] (a share of the mean sample weight), got {self.sample_floor}")

    @property
    def needs_gradients(self) -> bool:
        return self.kind != "uniform"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SelectionConfig:
    """Token budget of the calibration set (per sample, per layer row)."""

    token_fraction: float = 0.5  # share of each sample's valid tokens kept (1.0 = all: weighting only); TLQ's preset: 0.1
    token_count: int | None = None  # absolute per-sample budget; overrides token_fraction when set
    min_modality_share: float = 0.1  # of the budget, reserved for each of visual / text tokens (if present)
    # Keep at least this many valid tokens over the whole calibration set (all ranks): a small set keeps
    # every token, a large one the budget above. Each sample keeps at least its share of the floor, so the
    # set keeps max(budget, floor) tokens in all. On 8-sample sets (~2k tokens) halving the tokens lost
    # accuracy; from 16 samples on it did not (docs/methods.md, "A floored token budget"). Real sets hold
    # 10^5 tokens or more, so the floor only ever binds where calibration is cheap anyway.
    token_floor: int = 2048
    # Which tokens fill the budget: the highest-weighted (importance, TLQ's set), a seeded random subset,
    # the same for every weight row of a sample (random: what a compact set without importance would keep;
    # a control for what ranking by importance buys at the same budget), or a draw in proportion to the
    # weights, re-weighted by the inverse of each token's chance (sampled: unbiased for the whole set), or
    # the same draw with a layer's rows coupled through one uniform number per token (coupled: each row as
    # unbiased, the rows overlap as much as their chances allow; no cheaper in seconds, docs/methods.md).
    # TLQ's preset draws (sampled, with 10% of the tokens; docs/methods.md, "A 10% drawn token set").
    rank: str = "importance"
    seed: int = 0  # tie-breaking permutation (and the random subsets)
    # Whether the solve step's statistics passes and the scale search's FP record passes compute only the
    # rows some linear keeps (MLP, o_proj and attention queries; tlq.engine.rows), as the search's
    # candidates always do: the same statistics up to float rounding, about half their forward work. On in
    # TLQ's preset (the paired non-inferiority rule, docs/methods.md); only a token-level set has rows to cut.
    kept_rows_passes: bool = False
    # Whether a routed MoE expert's GPTQ statistics take every token its router sends it, each with its
    # importance weight, instead of the kept ones only. Why one would: a routed group's statistics pass runs
    # every row through the experts anyway (it takes no row cuts), and a tenth of a rarely routed expert's
    # rows can leave it under --gptq-min-tokens (RTN); with a drawn set the kept rows are an unbiased sample
    # of these same weighted rows. Off: at Qwen3-VL-30B-A3B widths it made the whole run 1.22x (the rule
    # asked for at most 1.15x) while cutting the RTN fallbacks from 350 to 160 of 384 (docs/methods.md,
    # "MoE experts and the token budget").
    experts_every_row: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.token_fraction <= 1.0:
            raise ConfigError(f"token_fraction must be in (0, 1], got {self.token_fraction}")
        if self.token_count is not None and self.token_count < 1:
            raise ConfigError(f"token_count must be a positive number of tokens, got {self.token_count}")
        if not 0.0 <= self.min_modality_share <= 0.5:
            raise ConfigError(f"min_modality_share must be in [0, 0.5], got {self.min_modality_share}")
        if self.token_floor < 0:
            raise ConfigError(f"token_floor must be a number of tokens >= 0 (0: no floor), got {self.token_floor}")
        if self.rank not in TOKEN_RANKS:
            raise ConfigError(f"unknown token rank {self.rank!r}; choose one of {', '.join(TOKEN_RANKS)}")

    def budget(self, num_valid: int, total_valid: int | None = None) -> int:
        """Tokens one sample with ``num_valid`` valid tokens keeps, in a set of ``total_valid`` in all
        (needed by ``token_floor``; without it the sample counts as the whole set)."""
        k = self.token_count if self.token_count is not None else round(self.token_fraction * num_valid)
        if self.token_floor and num_valid:
            total = max(total_valid or num_valid, num_valid)
            k = max(k, math.ceil(num_valid * min(1.0, self.token_floor / total)))
        return max(1, min(int(k), num_valid)) if num_valid else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantizeConfig:
    """Everything that defines one quantization run.

    A *method* is a preset of the orthogonal parts below (see ``method_preset``); each part can be
    overridden for ablations.
    """

    scheme: QuantScheme = field(default_factory=lambda: SCHEMES["w4a16"])
    method: str = "gptq"
    solver: str = "gptq"  # how each linear's weight is solved: rtn | gptq
    search: ScaleSearchConfig = field(default_factory=ScaleSearchConfig)
    # How calibration tokens are weighted in every objective: uniform (plain PTQ), modality (MBQ:
    # one gradient-derived weight per modality), token (TLQ: per-token gradient importance), integrated
    # (QIG: per layer, integrated gradients of the layer's rounding error; for comparison).
    weighting: str = "uniform"
    token_select: bool = False  # TLQ's token-level calibration set (drop unimportant tokens)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)  # how gradients become token weights
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # the token-level calibration set's budget
    calib: CalibConfig = field(default_factory=CalibConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    # Feed each layer the outputs of the already-quantized layers (weights and activations).
    # False = FP-input calibration (what AWQ/MBQ do).
    quantized_inputs: bool = True
    # The calibration steps run on each layer, in order (names of tlq.engine.steps.STEPS). Every preset
    # searches scales, then solves; the search does nothing when ``search.kind`` is "none".
    steps: tuple[str, ...] = ("scale_search", "solve")
    device: str = "auto"  # "auto" = cuda if available else cpu
    dtype: str = "auto"  # compute dtype: "auto" = float32 on CPU, the checkpoint's dtype on GPU

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of: {', '.join(SOLVERS)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")

    def layer_steps(self) -> tuple[str, ...]:
        """The steps each layer runs: ``steps``, after the integrated-gradient weights where they are the
        weighting (they must exist before the scale search reads them). Checked here, where the run
        starts, not per field: options are applied one at a time."""
        if self.weighting == "integrated" and self.token_select:
            raise ConfigError("weighting 'integrated' computes its weights inside each layer, after the token-level set is chosen; "
                              "add --no-token-select")
        if self.importance.sample_weights != "equal" and self.weighting in ("uniform", "integrated"):
            raise ConfigError(f"sample weights {self.importance.sample_weights!r} are read off the gradient importance pass, which "
                              f"weighting {self.weighting!r} does not run; use --weighting token or modality, or --sample-weights equal")
        return ("integrated_gradients", *self.steps) if self.weighting == "integrated" else self.steps

    @property
    def fp_target(self) -> bool:
        """Whether GPTQ matches the FP model's outputs ``W X_fp``: the solve then reads the FP stream."""
        return self.solver == "gptq" and self.gptq.target == "fp"

    def streams_read(self) -> tuple[bool, bool]:
        """(FP stream, quantized stream): which of the two the method's steps read in full. The statistics
        (GPTQ's, a scale search's) read the quantized stream, or the FP one for FP-input calibration; the FP
        target reads the FP one; RTN without a search reads neither. A stream no step reads is run only for
        the report's error (``calib.error_samples``)."""
        statistics = self.solver == "gptq" or self.search.kind != "none" or self.weighting == "integrated"
        return (statistics and not self.quantized_inputs) or self.fp_target, statistics and self.quantized_inputs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Methods as their papers define them, expressed in the parts above.
METHODS = ("rtn", "gptq", "awq", "smoothquant", "mbq", "tlq")


def method_preset(method: str, scheme: QuantScheme) -> dict[str, Any]:
    """The parts of ``QuantizeConfig`` that a method name stands for.

    * rtn: round-to-nearest, no data.
    * gptq: GPTQ, each layer on the quantized outputs of the previous ones (GPTQ's own sequential mode).
    * awq: AWQ scale search on FP inputs, then RTN; each candidate judged by its block's output error
      (attention / MLP / the linear, ``scope="block"``), as AWQ's own search does.
    * smoothquant: SmoothQuant migration with the paper's alpha = 0.5, then RTN.
    * mbq: MBQ — AWQ search (weight-only) or SmoothQuant search (W-A) weighted by per-modality
      gradient weights, FP inputs per layer, block-output losses as in AWQ (MBQ builds on its search),
      then RTN.
    * tlq: token-level gradient importance + token-level calibration set + quantization-exposed
      layer-wise calibration; each layer gets a token-weighted scale search (AWQ-style for weight-only,
      SmoothQuant-style for W-A schemes), then token-weighted GPTQ. Both solvers in turn were chosen by
      measurement (docs/accuracy-selection.md): lowest KL to FP16 on both built-in models. Each linear's
      inputs are weighted by the gradient at that linear's own output (``grad_at="linear"``), chosen over
      the decoder layer's output gradient by measurement on the held-out val split (docs/methods.md).
      GPTQ matches the FP model's outputs ``W X_fp`` (``gptq_target="fp"``), also chosen on the val
      split (docs/accuracy-fp-target.md). Its scale candidates run their large matmuls in bf16 where the
      CPU has native bf16 (``loss_dtype="auto"``): 0.60-0.70x the search's time at 2B widths (docs/cost.md),
      val KL no worse in 6 of 6 cells (docs/methods.md); the baselines keep the exact float32 loss.
      It tries the exponent grid coarse-to-fine (``coarse=3``: 11 of the 20 losses, 0.55-0.64x the
      search's time): val KL within the full grid's seed spread in 6 of 6 cells, lower on average
      (docs/methods.md); the baselines keep their papers' full grid. Three cuts that change results only
      by float rounding are on together (``record="layer"``, ``kept_rows_passes``, ``fp_shift="deferred"``):
      they passed a paired non-inferiority rule written before the val run (docs/methods.md, "The three
      rounding-level cuts together"); at LLaVA-OneVision-0.5B widths TLQ went from 1.75x to 1.43x its GPTQ
      (docs/cost.md, runs 11 and 14). Its token-level set keeps 10% of each sample's tokens (above the
      2,048-token floor), drawn in proportion to importance and re-weighted by ``w / pi``
      (``rank="sampled"``): it passed a paired non-inferiority rule against the ranked 50% set written
      before the val run (docs/methods.md, "A 10% drawn token set"), and per decoder layer TLQ went from
      1.91x to 1.31x its GPTQ at LLaVA-OneVision-0.5B widths (docs/cost.md, run 15).
    """
    search_kind = "smoothquant" if scheme.quantizes_activations else "awq"
    presets: dict[str, dict[str, Any]] = {
        "rtn": {"solver": "rtn", "search": ScaleSearchConfig(), "weighting": "uniform", "quantized_inputs": True},
        "gptq": {"solver": "gptq", "search": ScaleSearchConfig(), "weighting": "uniform", "quantized_inputs": True},
        "awq": {"solver": "rtn", "search": ScaleSearchConfig(kind="awq", scope="block"), "weighting": "uniform", "quantized_inputs": False},
        "smoothquant": {
            "solver": "rtn",
            "search": ScaleSearchConfig(kind="smoothquant", fixed_alpha=0.5),
            "weighting": "uniform",
            "quantized_inputs": False,
        },
        "mbq": {"solver": "rtn", "search": ScaleSearchConfig(kind=search_kind, scope="block"), "weighting": "modality", "quantized_inputs": False},
        "tlq": {
            "solver": "gptq",
            "search": ScaleSearchConfig(kind=search_kind, loss_dtype="auto", coarse=3, record="layer"),
            "weighting": "token",
            "importance": ImportanceConfig(grad_at="linear"),
            "token_select": True,
            "selection": SelectionConfig(token_fraction=0.1, rank="sampled", kept_rows_passes=True),
            "quantized_inputs": True,
            "gptq": GPTQConfig(target="fp", fp_shift="deferred"),
        },
    }
    if method not in presets:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return presets[method]


# --------------------------------------------------------------------------------------------------
# User-facing options: one schema, from which build_config's keywords and the CLI's flags are made
# --------------------------------------------------------------------------------------------------
def _group_size_value(value: Any) -> int | None:
    """``-1`` (or None) = one scale per output channel; any other value must be a positive group size."""
    if value is None or int(value) == -1:
        return None
    if int(value) <= 0:
        raise ConfigError(f"--group-size must be a positive group size, or -1 for one scale per output channel; got {value}")
    return int(value)


def _set_path(obj: Any, path: str, value: Any) -> Any:
    """``obj`` with the dotted field ``path`` set to ``value`` (dataclasses replaced, so each validates)."""
    head, _, rest = path.partition(".")
    return replace(obj, **{head: _set_path(getattr(obj, head), rest, value) if rest else value})


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_scale_search(cfg: QuantizeConfig, kind: str) -> QuantizeConfig:
    """A different search kind starts from that kind's defaults (plain SmoothQuant's fixed 0.5 does not
    carry over) but keeps the scope, grid, coarse-to-fine step, sample count, loss dtype and record pass; ``auto`` = AWQ weight-only,
    SmoothQuant W-A."""
    if kind == "auto":
        kind = "smoothquant" if cfg.scheme.quantizes_activations else "awq"
    if kind == cfg.search.kind:
        return cfg
    s = cfg.search
    return replace(cfg, search=replace(s, kind=kind, fixed_alpha=None))  # every other search knob carries over


@dataclass(frozen=True)
class Option:
    """One knob: its keyword (``build_config``, ``tlq.quantize``, the CLI's ``dest``), the field of
    :class:`QuantizeConfig` it sets, and its help. Defaults are the dataclasses' (or the method preset's),
    so adding a knob is one field plus one line in :data:`OPTIONS`."""

    name: str
    path: str  # dotted field of QuantizeConfig
    help: str
    group: str = "calibration"
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    flag: str = ""  # CLI flag; default: --name-with-dashes
    negative: str | None = None  # booleans: the flag that sets False (None: a plain switch)
    convert: Callable[[Any], Any] | None = None  # user value -> field value
    apply: Callable[[QuantizeConfig, Any], QuantizeConfig] | None = None  # instead of setting ``path``

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def set(self, cfg: QuantizeConfig, value: Any) -> QuantizeConfig:
        if self.apply is not None:
            return self.apply(cfg, value)
        return _set_path(cfg, self.path, self.convert(value) if self.convert else value)

    def help_text(self) -> str:
        """The help with its default: the field's own, the preset's or the scheme's (unless it says)."""
        if "(default" in self.help:
            return self.help
        if any(self.path == p or self.path.startswith(p + ".") for p in _PRESET_PATHS):
            default = "the --method preset's"
        elif self.path.startswith("scheme."):
            default = "the --scheme's"
        else:
            default = str(_get_path(QuantizeConfig(), self.path))
        return f"{self.help} (default: {default})"


# What a method preset sets (method_preset): these options default to "keep the preset's".
_PRESET_PATHS = ("solver", "search.kind", "search.scope", "search.loss_dtype", "search.record", "weighting", "token_select", "importance",
                 "selection.token_fraction", "selection.rank", "selection.kept_rows_passes", "quantized_inputs", "gptq.target", "gptq.fp_shift")
_PARTS = "method parts (each overrides the --method preset; used for ablations)"

OPTIONS: tuple[Option, ...] = (
    Option("num_samples", "calib.num_samples", "calibration samples", type=int),
    Option("max_seq_len", "calib.max_seq_len", "cut the text of longer samples, never visual tokens (default: the model's context length; the report says how many were cut)", type=int),
    Option("seed", "calib.seed", "calibration subsampling seed", type=int),
    Option("error_samples", "calib.error_samples", "samples the report's per-layer error is measured on when the method reads only one "
           "of the two streams (the other then runs these samples only; 0: every sample)", type=int),
    Option("group_size", "scheme.weights.group_size", "weight group size, -1 = per channel", group="scheme", type=int, convert=_group_size_value),
    Option("symmetric", "scheme.weights.symmetric", "symmetric weights (--asymmetric: with zero points)", group="scheme", type=bool, negative="--asymmetric"),
    Option("damp_percent", "gptq.damp_percent", "GPTQ dampening, a fraction of the mean Hessian diagonal", group="GPTQ", type=float, flag="--damp"),
    Option("block_size", "gptq.block_size", "GPTQ lazy-batch block (columns)", group="GPTQ", type=int),
    Option("act_order", "gptq.act_order", "GPTQ: quantize columns by decreasing Hessian diagonal", group="GPTQ", type=bool),
    Option("gptq_min_tokens", "gptq.min_tokens", "GPTQ: a MoE expert's down projection that saw fewer routed token rows is quantized by RTN", group="GPTQ", type=int),
    Option("gptq_min_tokens_in", "gptq.min_tokens_in", "GPTQ: the same for an expert's linears reading the block's input (gate/up)", group="GPTQ", type=int),
    Option("gptq_stats_memory", "gptq.stats_memory_gib", "GPTQ: GiB the Hessians of one observation pass may hold; a MoE stage beyond it is "
           "observed in several passes, a chunk of experts each (same result)", group="GPTQ", type=float),
    Option("solver", "solver", "per-linear solver", group=_PARTS, choices=SOLVERS),
    Option("gptq_target", "gptq.target", "GPTQ matches each linear's output to W X_q (quantized: plain GPTQ) or to the FP model's W X_fp "
           "(fp: also undoes the error of the layers and linears before it; GPTAQ-style)", group=_PARTS, choices=GPTQ_TARGETS),
    Option("scale_search", "search.kind", "per-channel scale migration before solving (auto: awq for weight-only, smoothquant for W-A)",
           group=_PARTS, choices=("none", "awq", "smoothquant", "auto"), apply=_set_scale_search),
    Option("search_grid", "search.grid", "exponents tried by the scale search", group=_PARTS, type=int),
    Option("search_coarse", "search.coarse", "scale search coarse-to-fine: every k-th exponent, then the k-1 on each side of the best (1: all)", group=_PARTS, type=int),
    Option("search_scope", "search.scope", "what a scale candidate is judged by: the decoder layer's output error (layer: tlq's preset) or "
           "its block's, attention or MLP (block: AWQ's own loss, cheaper; the awq and mbq presets')", group=_PARTS, choices=SEARCH_SCOPES),
    Option("search_record", "search.record", "the scale search's FP statistics and targets: one pass before each mapping (mapping) "
           "or one pass of each layer before its first fold (layer: equal up to float rounding, fewer passes)",
           group=_PARTS, choices=SEARCH_RECORDS),
    Option("search_samples", "search.max_samples", "samples the scale-search loss runs on", group=_PARTS, type=int),
    Option("search_dtype", "search.loss_dtype", "precision of the scale candidates' matmuls in a float32 run: compute (exact), bfloat16 "
           "(about 2x faster on CPUs with AVX512-BF16/AMX and on GPUs; the targets stay float32) or auto (bfloat16 where the CPU has it)",
           group=_PARTS, choices=MATMUL_DTYPES),
    Option("weighting", "weighting", "token weights: uniform | modality (MBQ) | token (TLQ) | integrated (QIG: per layer, integrated gradients of its rounding error)", group=_PARTS, choices=WEIGHTINGS),
    Option("token_select", "token_select", "use the token-level calibration set (--no-token-select: keep every token, weighted)", group=_PARTS, type=bool, negative="--no-token-select"),
    Option("grad_at", "importance.grad_at", "token importance from the gradient at each decoder layer's output, its input, or (linear) at each linear's own output",
           group=_PARTS, choices=GRAD_AT),
    Option("importance_dtype", "importance.matmul_dtype", "precision of the importance pass's matmuls in a float32 run: compute (exact), "
           "bfloat16 (through autocast; norms, softmax and the loss stay float32) or auto (bfloat16 where the CPU has it)",
           group=_PARTS, choices=MATMUL_DTYPES),
    Option("sample_weights", "importance.sample_weights", "each sample's share of the objective: equal, or by its answer's softmax "
           "curvature under the FP model (curvature: near-ties count more than sure answers)", group=_PARTS, choices=SAMPLE_WEIGHTS),
    Option("token_fraction", "selection.token_fraction", "share of each sample's tokens kept by the token-level set", group=_PARTS, type=float),
    Option("token_floor", "selection.token_floor", "the token-level set keeps at least this many tokens over all samples "
           "(a smaller set keeps every token; 0: no floor)", group=_PARTS, type=int),
    Option("token_rank", "selection.rank", "which tokens the token-level set keeps: the highest-weighted (importance), a "
           "seeded random subset of the same size (random: a control for what ranking by importance buys), or a draw in proportion to "
           "the weights, each drawn token re-weighted by 1 / its chance (sampled: unbiased for the whole weighted set), or that draw with "
           "a layer's rows coupled by one random number per token (coupled: as unbiased, the rows overlapping)", group=_PARTS, choices=TOKEN_RANKS),
    Option("kept_rows_passes", "selection.kept_rows_passes", "the statistics and scale-search record passes compute only the rows the token-level "
           "set keeps (equal up to float rounding, about half their work)", group=_PARTS, type=bool, negative="--all-rows-passes"),
    Option("experts_every_row", "selection.experts_every_row", "a routed MoE expert's GPTQ statistics take every token routed to it, "
           "importance-weighted, not only the token-level set's (--experts-kept-rows)", group=_PARTS, type=bool, negative="--experts-kept-rows"),
    Option("gptq_fp_shift", "gptq.fp_shift", "GPTQ's FP-target shift: applied (W D row by row, W* formed first) or deferred (D where out >= in, "
           "W*'s second product inside GPTQ's error updates; equal up to float rounding, less arithmetic)", group=_PARTS, choices=GPTQ_FP_SHIFTS),
    Option("quantized_inputs", "quantized_inputs", "calibrate each layer on the quantized path (--fp-inputs: on FP inputs, as AWQ/MBQ do)", group=_PARTS, type=bool, negative="--fp-inputs"),
    Option("device", "device", "auto | cpu | cuda | cuda:N", group="compute"),
    Option("dtype", "dtype", "compute dtype: auto (float32 on CPU, the checkpoint's on a GPU) | float32 | bfloat16 | float16", group="compute"),
)
OPTION_NAMES = frozenset(o.name for o in OPTIONS)


def build_config(scheme: str = "w4a16", method: str = "gptq", **options: Any) -> QuantizeConfig:
    """Validate user-facing options into a ``QuantizeConfig``.

    ``method`` picks a preset (``method_preset``); ``options`` are :data:`OPTIONS` by name, each ``None``
    keeping the preset's (or the default) value, any other value overriding it: that is how ablations
    are expressed (``build_config("w3a16", "tlq", token_select=False)``).
    """
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; known: {', '.join(sorted(OPTION_NAMES))}")
    qscheme = resolve_scheme(scheme)
    preset = dict(method_preset(method, qscheme))
    cfg = QuantizeConfig(scheme=qscheme, method=method, **preset)
    for opt in OPTIONS:
        if options.get(opt.name) is not None:
            cfg = opt.set(cfg, options[opt.name])
    return cfg
