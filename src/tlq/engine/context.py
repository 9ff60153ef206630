"""What the calibration steps of one decoder layer share.

The engine runs each layer as a sequence of steps (FP stream, scale search, statistics and solve,
quantized stream). They all need the same few things: the layer, its per-sample keyword arguments, the
run's configuration and adapter, where to compute, this rank's sample ids and token weights, and how to
store activations. :class:`LayerContext` carries them, so a step is a function of the context and its
own inputs, not of a dozen arguments, and a new step (a new algorithm) is a module that takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from tlq.config import QuantizeConfig
from tlq.models.base import ModelAdapter, run_layer, tree_to

# Per-token weights for one layer's statistics: (layer index, global sample id[, linear name within the
# layer]) -> [seq] or None. Without a linear name: the weights of the layer's output, which are also
# every linear's unless the importance is per linear.
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

    @property
    def prefix(self) -> str:
        """The layer's module name in the model."""
        return self.adapter.decoder_layer_prefix(self.index)

    def dev(self, x: Any) -> Any:
        return tree_to(x, self.device)

    def weights(self, sample: int, linear: str | None = None) -> Tensor | None:
        """Token weights of this rank's ``sample``-th sample, for the inputs of ``linear`` (a name within
        the layer) or, without one, for the layer's output."""
        if self.token_weights is None:
            return None
        gid = self.sample_ids[sample]
        return self.token_weights(self.index, gid) if linear is None else self.token_weights(self.index, gid, linear)

    @torch.no_grad()
    def run(self, xs: Any, kwargs: list[dict[str, Any]] | None = None) -> Any:
        """The layer's own outputs on ``xs``, without what the model adds between layers: what a replay of
        the layer alone is compared with. Never a stream (the streams take the adapter's whole step)."""
        kwargs = self.kwargs if kwargs is None else kwargs
        return self.store([run_layer(self.layer, self.dev(x), self.dev(kw)).to("cpu") for x, kw in zip(xs, kwargs)])
