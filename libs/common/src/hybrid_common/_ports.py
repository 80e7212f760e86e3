"""Default ports of every service and simulator (docs/architecture.md shows the same table).

The simulators mirror the real systems' ports shifted into a private range so they never collide
with a real dapi on the same host: dapi public 8000 → 18000, admin 9200 → 19200, callback 9100 → 19100.
"""

from __future__ import annotations

from typing import Final, NamedTuple


class PortEntry(NamedTuple):
    port: int
    owner: str
    purpose: str


PORTS: Final[dict[str, PortEntry]] = {
    "rabbitmq": PortEntry(5672, "infra", "AMQP broker"),
    "rabbitmq.management": PortEntry(15672, "infra", "broker management UI (compose only)"),
    "redis": PortEntry(6379, "infra", "shared state"),
    "proxy.node": PortEntry(5050, "proxy", "inference-only ML node: OpenAI routes + MLNode control surface"),
    "proxy.gateway_base": PortEntry(15000, "proxy", "first node-front gateway port; each GPU slot gets a pair"),
    "proxy.gateway_last": PortEntry(15999, "proxy", "last node-front gateway port"),
    "proxy.metrics": PortEntry(9501, "proxy", "Prometheus metrics + front status"),
    "relay.public": PortEntry(9300, "callback-relay", "public PoC callback endpoint the MLNodes post to"),
    "relay.metrics": PortEntry(9502, "callback-relay", "Prometheus metrics"),
    "scheduler.metrics": PortEntry(9503, "scheduler", "Prometheus metrics"),
    "provisioner.metrics": PortEntry(9504, "provisioner", "Prometheus metrics (replicas: 0 = ephemeral)"),
    "sim.vast": PortEntry(18400, "sim", "Vast.ai API simulator"),
    "sim.vast.ssh": PortEntry(18422, "sim", "Vast.ai simulator's SSH proxy (ssh runtypes)"),
    "sim.dapi.public": PortEntry(18000, "sim", "network node public API (/v1/epochs/latest, chain REST, RPC)"),
    "sim.dapi.callback": PortEntry(19100, "sim", "network node PoC callback server"),
    "sim.dapi.admin": PortEntry(19200, "sim", "network node admin API (/admin/v1/nodes)"),
    "sim.upstream": PortEntry(18500, "sim", "OpenAI-compatible upstream (Hyperbolic stand-in)"),
    "sim.comfyui": PortEntry(18188, "sim", "ComfyUI simulator (auth proxy; ComfyUI itself on an internal port)"),
    "sim.mlnode": PortEntry(18080, "sim", "stand-alone MLNode simulator (API; inference on +1)"),
}


def port(name: str) -> int:
    return PORTS[name].port
