"""OpenAI-compatible upstream simulator (a Hyperbolic stand-in; reference: inference-proxy.md).

``start_upstream(...)`` runs it in-process; ``python -m sim upstream --port P`` as a process.
Test controls live under ``/_sim/...`` (see ``sim.upstream.app``).
"""

from sim.upstream.controls import Fault, UpstreamSettings
from sim.upstream.server import DEFAULT_API_KEY, DEFAULT_MODELS, RunningUpstream, start_upstream

__all__ = [
    "DEFAULT_API_KEY",
    "DEFAULT_MODELS",
    "Fault",
    "RunningUpstream",
    "UpstreamSettings",
    "start_upstream",
]
