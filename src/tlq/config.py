"""Quantization schemes and run configuration.

Every number that changes a result (bits, group size, damping, sample counts) lives here with a
documented default, so that the CLI, the Python API and the benchmarks share one source of truth.

Integer convention (the same as compressed-tensors, so that export is a copy, not a conversion):
codes are *signed* integers in ``[qmin, qmax] = [-2**(b-1), 2**(b-1) - 1]`` and
``dequant = (code - zero_point) * scale``. Symmetric schemes have ``zero_point == 0``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

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

_UNSET: Any = object()


def resolve_scheme(name: str, *, group_size: Any = _UNSET, symmetric: bool | None = None) -> QuantScheme:
    """Look up a scheme by name and apply the user's overrides.

    ``group_size`` may be an int, ``None``/0/-1 (per channel) or left unset (scheme default).
    """
    key = name.lower()
    if key not in SCHEMES:
        raise ConfigError(f"unknown scheme {name!r}; choose one of: {', '.join(SCHEMES)}")
    scheme = SCHEMES[key]
    w = scheme.weights
    if group_size is not _UNSET:
        gs = None if group_size in (None, 0, -1) else int(group_size)
        w = replace(w, group_size=gs)
    if symmetric is not None:
        w = replace(w, symmetric=symmetric)
    return replace(scheme, weights=w)


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

    def __post_init__(self) -> None:
        if self.target not in GPTQ_TARGETS:
            raise ConfigError(f"unknown GPTQ target {self.target!r}; choose one of: {', '.join(GPTQ_TARGETS)}")


GPTQ_TARGETS = ("quantized", "fp")


@dataclass
class CalibConfig:
    """How many calibration samples, and how long each may be."""

    num_samples: int = 128  # the papers' default (128 COCO/ShareGPT4V samples)
    max_seq_len: int = 2048  # longer samples are truncated (visual tokens are never cut)
    seed: int = 0


SEARCH_SCOPES = ("layer", "block")


@dataclass
class ScaleSearchConfig:
    """Per-channel scale migration before the weights are solved (AWQ / SmoothQuant style)."""

    kind: str = "none"  # none | awq | smoothquant
    grid: int = 20  # exponents tried: i / grid for i in range(grid) (AWQ's grid)
    fixed_alpha: float | None = None  # skip the search and use this exponent (plain SmoothQuant: 0.5)
    max_samples: int = 64  # calibration samples the search loss runs on (cost grows with grid x samples)
    # What a candidate's loss compares: "layer" = the decoder layer's output (an attention error is seen
    # through the MLP after it; MLP mappings are measured on the MLP alone, which is the same number),
    # "block" = the output of the block holding the mapping's linears (AWQ's own loss: cheaper, blind to
    # what the rest of the layer does with the error). See docs/methods.md.
    scope: str = "layer"

    def __post_init__(self) -> None:
        if self.kind not in ("none", "awq", "smoothquant"):
            raise ConfigError(f"unknown scale search {self.kind!r}; choose none, awq or smoothquant")
        if self.scope not in SEARCH_SCOPES:
            raise ConfigError(f"unknown scale search scope {self.scope!r}; choose one of {', '.join(SEARCH_SCOPES)}")
        if self.grid < 1 or self.max_samples < 1:
            raise ConfigError("scale search grid and max_samples must be positive")


def _default_importance() -> Any:
    from tlq.importance.weights import ImportanceConfig  # imported late: that module imports this one

    return ImportanceConfig()


def _default_selection() -> Any:
    from tlq.importance.calibset import SelectionConfig

    return SelectionConfig()


SOLVERS = ("rtn", "gptq")
WEIGHTINGS = ("uniform", "modality", "token")
# Where the importance pass takes token gradients (tlq.importance.gradients): each decoder layer's output,
# its input, or its output plus each linear's own output ("linear": per-linear token weights).
GRAD_AT = ("output", "input", "linear")


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
    # one gradient-derived weight per modality), token (TLQ: per-token gradient importance).
    weighting: str = "uniform"
    token_select: bool = False  # TLQ's token-level calibration set (drop unimportant tokens)
    importance: Any = field(default_factory=_default_importance)  # tlq.importance.ImportanceConfig
    selection: Any = field(default_factory=_default_selection)  # tlq.importance.SelectionConfig
    calib: CalibConfig = field(default_factory=CalibConfig)
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    # Feed each layer the outputs of the already-quantized layers (weights and activations).
    # False = FP-input calibration (what AWQ/MBQ do).
    quantized_inputs: bool = True
    device: str = "auto"  # "auto" = cuda if available else cpu
    dtype: str = "auto"  # compute dtype: "auto" = float32 on CPU, the checkpoint's dtype on GPU

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r}; choose one of: {', '.join(SOLVERS)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown weighting {self.weighting!r}; choose one of: {', '.join(WEIGHTINGS)}")

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
      split (docs/accuracy-fp-target.md).
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
            "search": ScaleSearchConfig(kind=search_kind),
            "weighting": "token",
            "importance": replace(_default_importance(), grad_at="linear"),
            "token_select": True,
            "quantized_inputs": True,
            "gptq_target": "fp",
        },
    }
    if method not in presets:
        raise ConfigError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    return presets[method]
