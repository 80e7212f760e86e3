"""A slot's route: which GPU its gateway ports lead to now, and how (Redis ``front:routes``, the proxy its only writer).

The record is what other parts read: the proxy node sends validation requests to a slot whose ``state`` is ``up``
(``http://{host}:{gateway_inference_port}/v1/chat/completions``), the CLI shows it, and a restarted front rebuilds its
listeners and tunnels from it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from hybrid_common.messages.domain import Connectivity

RouteState = Literal["up", "connecting", "down"]


class Route(BaseModel):
    slot_id: str
    gateway_poc_port: int
    gateway_inference_port: int
    host: str = Field(description="where this machine reaches the gateway ports")
    state: RouteState = "down"
    reason: str = "no GPU yet"
    since: float = Field(default_factory=time.time, description="when state last changed")
    instance_id: int | None = None
    connectivity: Connectivity | None = None
    fell_back_to_tunnel: bool = Field(default=False, description="the event said direct; only SSH reached the GPU")
    public_ip: str | None = None
    ports: dict[int, int] = Field(default_factory=dict, description="container port → public host port")
    ssh_host: str | None = None
    ssh_port: int | None = None
    api_container_port: int = 8080
    inference_container_port: int = 5000
    from_port_table: bool = Field(default=False, description="the slot is listed in gateway:ports")
    listen_error: str | None = None
    reachable: dict[str, Any] | None = Field(default=None, description="the instance.reachable routed now")
    standby: list[dict[str, Any]] = Field(
        default_factory=list,
        description="instance.reachable of other live instances of this slot (a hedge racing): used if this one goes",
    )

    def has_gpu(self) -> bool:
        return self.instance_id is not None

    def set_state(self, state: RouteState, reason: str) -> bool:
        """Change state; True when the state (not just the reason) changed."""
        changed = state != self.state
        if changed:
            self.since = time.time()
        self.state = state
        self.reason = reason
        return changed

    def clear_gpu(self, reason: str) -> None:
        self.reachable = None
        self.instance_id = None
        self.connectivity = None
        self.fell_back_to_tunnel = False
        self.public_ip = None
        self.ports = {}
        self.ssh_host = None
        self.ssh_port = None
        self.set_state("down", reason)
