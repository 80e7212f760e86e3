"""MLNode simulator: the control API and vLLM's OpenAI routes of the Gonka MLNode image.

``start_mlnode(generation="v1"|"v2", ...)`` runs one in the current event loop; ``python -m sim mlnode
--port P [--inference-port Q] --generation v1|v2`` runs one as a process. Simulator-only route:
``GET /_sim/stats`` on the API port (state, sender counters, PoC counters, served requests).
"""

from sim.mlnode.node import (
    DEFAULT_EPOCH_MODEL,
    DEFAULT_POC_MODEL,
    MLNode,
    MLNodeConfig,
    RunningMLNode,
    start_mlnode,
)

__all__ = [
    "DEFAULT_EPOCH_MODEL",
    "DEFAULT_POC_MODEL",
    "MLNode",
    "MLNodeConfig",
    "RunningMLNode",
    "start_mlnode",
]
