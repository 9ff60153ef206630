"""The calibration steps a method runs on each decoder layer, by name, in the order its preset lists
(``QuantizeConfig.steps``), between the FP stream and the quantized stream.

A step is ``step(ctx: LayerContext, state: LayerState) -> None``: it reads the layer, its inputs and the
configuration from the context, changes the layer (folds scales, writes solved weights) and leaves what
it decided in the state. Each has the phase name the run's report times it under. A new algorithm (say
AutoRound-style rounding) is a module with one such function, an entry here and a line in a preset.
"""

from __future__ import annotations

from typing import Callable

from tlq.config import ConfigError
from tlq.engine.context import LayerContext, LayerState
from tlq.engine.smoothing import scale_search_step
from tlq.engine.solve import solve_step
from tlq.importance.integrated import integrated_gradients_step

Step = Callable[[LayerContext, LayerState], None]

# name -> (phase in the report, step)
STEPS: dict[str, tuple[str, Step]] = {
    "integrated_gradients": ("integrated-gradient token weights (QIG)", integrated_gradients_step),
    "scale_search": ("scale search", scale_search_step),
    "solve": ("statistics + solve (GPTQ/RTN, FP target)", solve_step),
}


def check_steps(names: tuple[str, ...]) -> list[tuple[str, Step]]:
    """The steps of ``names`` in order; an unknown name is refused before any model is loaded."""
    unknown = [n for n in names if n not in STEPS]
    if unknown or not names:
        raise ConfigError(f"unknown calibration step(s) {unknown or list(names)}; steps are {', '.join(STEPS)} (QuantizeConfig.steps)")
    return [STEPS[n] for n in names]
