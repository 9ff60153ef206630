"""What the calibration steps of one decoder layer share.

The engine runs each layer between its two streams (FP stream, then the method's steps, then the
quantized stream). The steps (:mod:`tlq.engine.steps`: scale search, statistics and solve) all need the
same few things: the layer, its per-sample keyword arguments, the run's configuration and adapter, where
to compute, this rank's sample ids and token weights, how to store activations, the process group.
:class:`LayerContext` carries them and :class:`LayerState` what the steps hand each other and the
layer's report, so a step is a function ``step(ctx, state)`` and a new algorithm is a module holding one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tlq.config import QuantizeConfig
from tlq.engine.distributed import DistContext
from tlq.models.base import ModelAdapter, tree_to
from tlq.quant.quantizer import QuantizedWeight

# Per-token weights for one layer's statistics: (layer index, global sample id[, linear name within the
# layer][, every_token=True]) -> [seq] or None. Without a linear name: the weights of the layer's output,
# which are also every linear's unless the importance is per linear; every_token: the layer's weights
# before the token set's budget (asked only for routed MoE experts).
TokenWeightFn = Callable[..., Tensor | None]


@dataclass
class LayerContext:
    """One decoder layer's calibration, as its steps see it."""

    index: int
    layer: nn.Module
    kwargs: list[dict[str, Any]]  # per sample of this rank, this layer's own (ModelAdapter.layer_kwargs applied)
    config: QuantizeConfig
    adapter: ModelAdapter
    device: torch.device
    scale_dtype: torch.dtype | None
    sample_ids: list[int]  # global ids of this rank's samples (token weights are keyed by them)
    token_weights: TokenWeightFn | None
    store: Callable[[list[Tensor]], Any]  # a per-sample activation list (in RAM, or spilling to disk)
    dist: DistContext = field(default_factory=DistContext)  # this process's place in the job (statistics are all-reduced)
    # activation quantizers the steps put on (W-A schemes); the engine owns them and removes them at the end
    act_hooks: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """The layer's module name in the model."""
        return self.adapter.decoder_layer_prefix(self.index)

    def dev(self, x: Any) -> Any:
        return tree_to(x, self.device)

    def weights(self, sample: int, linear: str | None = None, every_token: bool = False) -> Tensor | None:
        """Token weights of this rank's ``sample``-th sample, for the inputs of ``linear`` (a name within
        the layer) or, without one, for the layer's output; ``every_token``: the layer's weights before the
        token set's budget (a routed expert's statistics, ``SelectionConfig.experts_every_row``)."""
        if self.token_weights is None:
            return None
        gid = self.sample_ids[sample]
        if every_token:
            return self.token_weights(self.index, gid, every_token=True)
        return self.token_weights(self.index, gid) if linear is None else self.token_weights(self.index, gid, linear)



@dataclass
class LayerState:
    """The layer's inputs on both paths, and what its steps leave for each other and for its report."""

    x_fp: Any  # per sample: this layer's inputs on the FP path
    x_q: Any  # per sample: its inputs on the quantized path (what it sees at inference)
    search_alphas: dict[str, float] = field(default_factory=dict)  # producer -> chosen exponent (NaN = unscaled)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # full linear name -> codes and scales
    routed_tokens: dict[str, int] = field(default_factory=dict)  # MoE: rows each routed linear was solved on
    rtn_fallback: list[str] = field(default_factory=list)  # MoE: routed linears solved by RTN for lack of rows

    def inputs(self, config: QuantizeConfig) -> Any:
        """What the statistics are taken on: the quantized path, or the FP one (FP-input calibration)."""
        return self.x_q if config.quantized_inputs else self.x_fp
