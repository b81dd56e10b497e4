"""The search's entry point: a gate search or a threshold search, chosen by the space file's kind.

``agsearch search`` (LightningCLI) builds its model with :func:`search_module`, whose arguments are
the gate search's (:class:`~agsearch.search.gates.PolicySearchModule`): an adaptive space
(``kind: adaptive``) gives a :class:`~agsearch.search.thresholds.ThresholdSearchModule` instead,
with the arguments that apply to it; a gate-only option set away from its default is refused.
"""

from __future__ import annotations

import inspect
import typing

from agsearch.search.base import SearchBase, is_adaptive
from agsearch.search.gates import PolicySearchModule
from agsearch.search.thresholds import ThresholdSearchModule

_HINTS = typing.get_type_hints(PolicySearchModule.__init__)
GATE_PARAMETERS = {name: p.replace(annotation=_HINTS.get(name, p.annotation))
                   for name, p in inspect.signature(PolicySearchModule.__init__).parameters.items() if name != "self"}
# What the threshold search takes besides the run's settings; the rest are gate options.
THRESHOLD_OPTIONS = ("space", "budget", "model", "pipeline", "prompts", "scheduler", "num_inference_steps",
                     "guidance_scale", "height", "width", "num_frames", "lr", "dual_lr", "distance", "temperature_start", "temperature_end", "init")


def search_module(**options) -> SearchBase:
    """The search of a space: gates, or per-step thresholds for an adaptive space (arguments:
    :class:`~agsearch.search.gates.PolicySearchModule`'s)."""
    unknown = sorted(set(options) - set(GATE_PARAMETERS))
    if unknown:
        raise TypeError(f"search_module() got unexpected arguments {', '.join(unknown)}")
    arguments = {name: options.get(name, p.default) for name, p in GATE_PARAMETERS.items()}
    if not is_adaptive(arguments["space"]):
        return PolicySearchModule(**arguments)
    _refuse_gate_options(arguments)
    return ThresholdSearchModule(**{name: arguments[name] for name in THRESHOLD_OPTIONS})


def _refuse_gate_options(arguments: dict) -> None:
    """An adaptive space has thresholds, not gates: the gate-only options must keep their defaults."""
    from agsearch.search.space import SearchSpace, SpaceError

    space = SearchSpace.load(arguments["space"])
    for name, p in GATE_PARAMETERS.items():
        value = arguments[name]
        if name in THRESHOLD_OPTIONS or value == p.default or (name == "relaxation" and value == space.relaxation):
            continue
        raise SpaceError(f"model.{name}={value!r} does not apply to the adaptive space {space.name!r} "
                         f"(it has thresholds, not gates); leave it at {p.default!r}")


# The command line reads the gate search's arguments and their documentation.
search_module.__signature__ = inspect.signature(PolicySearchModule.__init__).replace(
    parameters=list(GATE_PARAMETERS.values()), return_annotation=SearchBase)
search_module.__doc__ = PolicySearchModule.__doc__
