"""A rented instance: its contract, its status fields as the API shows them, and its history.

vastai-api.md "Show": ``actual_status`` is nullable and moves ``null → created → loading → running``;
``ports`` appears only once running, ``HostPort`` is a string; ``public_ipaddr`` carries trailing
whitespace; ``start_date`` is a float and ``extra_env`` a list of pairs (the CLI crashes without them).
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any, Final

from sim.vast.billing import BillingMeter
from sim.vast.catalogue import Offer
from sim.workloads import ContainerNetwork, ImageSpec, RunningContainer, has_jupyter, has_ssh

# vastai-api.md: "public_ipaddr (may carry whitespace — strip)"
PUBLIC_IPADDR: Final = "127.0.0.1 "
_PORT_OPTION = re.compile(r"^-p\s+(?:(\d+):)?(\d+)(?:/(tcp|udp))?$")


def published_ports(env: dict[str, str]) -> list[tuple[int, str]]:
    """The ``-p`` options of a create's ``env`` dict → [(container port, proto)]."""
    out: list[tuple[int, str]] = []
    for key in env:
        m = _PORT_OPTION.match(key.strip())
        if m:
            out.append((int(m.group(2)), m.group(3) or "tcp"))
    return out


def container_variables(env: dict[str, str]) -> dict[str, str]:
    """The environment variables of a create's ``env`` dict (docker options start with ``-``)."""
    return {k: v for k, v in env.items() if not k.startswith("-")}


@dataclass
class StatusChange:
    at: float
    actual_status: str | None
    intended_status: str
    cur_state: str
    status_msg: str | None

    def as_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "actual_status": self.actual_status,
            "intended_status": self.intended_status,
            "cur_state": self.cur_state,
            "status_msg": self.status_msg,
        }


@dataclass
class Instance:
    id: int
    offer: Offer
    image: str
    image_spec: ImageSpec | None
    env: dict[str, str]
    runtype: str
    args: list[str] | None
    onstart: str | None
    label: str | None
    disk: float
    bid_price: float | None
    created_at: float
    instance_api_key: str
    ssh_host: str
    ssh_port: int
    meter: BillingMeter
    authorized_keys: list[str] = field(default_factory=list)
    actual_status: str | None = None
    intended_status: str = "running"
    cur_state: str = "running"
    next_state: str = "running"
    status_msg: str | None = None
    image_pulled: bool = False
    gpu_taken: bool = False
    stuck: bool = False
    offline: bool = False
    running_since: float | None = None
    destroyed_at: float | None = None
    history: list[StatusChange] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)
    network: ContainerNetwork | None = None
    container: RunningContainer | None = None
    sshd: Any = None  # InstanceSshd while the SSH server runs
    task: asyncio.Task[None] | None = None

    @property
    def destroyed(self) -> bool:
        return self.destroyed_at is not None

    @property
    def gives_ssh(self) -> bool:
        return has_ssh(self.runtype) or has_jupyter(self.runtype)

    @property
    def direct_ssh(self) -> bool:
        return any(t.endswith("_direc") or t.endswith("_direct") for t in self.runtype.split())

    @property
    def sshd_port(self) -> int:
        """Where the SSH server really listens. The official CLI (ssh-url) connects to ``ssh_port + 1``
        for jupyter runtypes: the proxy's port after Jupyter's."""
        return self.ssh_port + 1 if "jupyter" in self.runtype else self.ssh_port

    @property
    def dph_total(self) -> float:
        return round(self.meter.gpu_dph + self.meter.storage_dph, 6)

    def log(self, line: str) -> None:
        self.logs.append(line)
        del self.logs[:-5000]

    def record(self, now: float) -> None:
        last = self.history[-1] if self.history else None
        change = StatusChange(now, self.actual_status, self.intended_status, self.cur_state, self.status_msg)
        if last is None or (last.actual_status, last.intended_status, last.cur_state, last.status_msg) != (
            change.actual_status,
            change.intended_status,
            change.cur_state,
            change.status_msg,
        ):
            self.history.append(change)

    def ports_json(self) -> dict[str, list[dict[str, str]]] | None:
        """``ports`` as the API shows it: only while running (vastai-api.md)."""
        if self.actual_status != "running" or self.network is None:
            return None
        ports: dict[str, list[dict[str, str]]] = {}
        for container_port, proto in published_ports(self.env):
            host_port = self.network.lookup(container_port)
            if host_port is not None:
                ports[f"{container_port}/{proto}"] = [{"HostIp": "0.0.0.0", "HostPort": str(host_port)}]
        if self.direct_ssh:
            ports["22/tcp"] = [{"HostIp": "0.0.0.0", "HostPort": str(self.sshd_port)}]
        return ports

    def container_environment(self) -> dict[str, str]:
        """What ``env`` prints inside the container: the create's variables plus Vast's own."""
        env = dict(container_variables(self.env))
        env.update(
            {
                "CONTAINER_ID": str(self.id),
                "VAST_CONTAINERLABEL": f"C.{self.id}",
                "PUBLIC_IPADDR": PUBLIC_IPADDR.strip(),
                "CONTAINER_API_KEY": self.instance_api_key,
            }
        )
        if self.network is not None:
            # vastai-api.md: inside the container VAST_TCP_PORT_5070 holds the external port.
            for container_port, proto in published_ports(self.env):
                host_port = self.network.lookup(container_port)
                if host_port is not None:
                    env[f"VAST_{proto.upper()}_PORT_{container_port}"] = str(host_port)
            if self.direct_ssh:
                env["VAST_TCP_PORT_22"] = str(self.sshd_port)
        return env

    def as_json(self, now: float) -> dict[str, Any]:
        offer = self.offer
        ports = self.ports_json()
        host_ports = [int(v[0]["HostPort"]) for k, v in (ports or {}).items() if k != "22/tcp"]
        uptime = (now - self.running_since) / 60.0 if self.running_since is not None else 0.0
        runtype_label = self.runtype
        return {
            "id": self.id,
            "machine_id": offer.machine_id,
            "host_id": offer.host_id,
            "bundle_id": offer.id,
            "ask_contract_id": offer.id,
            "label": self.label,
            "actual_status": self.actual_status,
            "intended_status": self.intended_status,
            "cur_state": self.cur_state,
            "next_state": self.next_state,
            "status_msg": self.status_msg,
            "image_uuid": self.image,
            "image_runtype": runtype_label,
            "image_args": list(self.args or []),
            "onstart": self.onstart,
            "extra_env": [[k, v] for k, v in self.env.items()],
            "template_id": None,
            "template_hash_id": None,
            "template_name": None,
            "public_ipaddr": PUBLIC_IPADDR,
            "local_ipaddrs": "10.0.0.2 172.17.0.1\n",
            "ssh_host": self.ssh_host,
            "ssh_port": self.ssh_port,
            "ssh_idx": "1",
            "ports": ports,
            "direct_port_start": min(host_ports) if host_ports else -1,
            "direct_port_end": max(host_ports) if host_ports else -1,
            "direct_port_count": offer.direct_port_count,
            "machine_dir_ssh_port": self.sshd_port if self.direct_ssh else None,
            "jupyter_token": None,
            "instance_api_key": None,
            "gpu_name": offer.gpu.name,
            "num_gpus": offer.num_gpus,
            "gpu_ram": offer.gpu.vram_mb,
            "gpu_totalram": offer.gpu.vram_mb * offer.num_gpus,
            "gpu_util": 0.0 if self.actual_status == "running" else None,
            "gpu_temp": 41.0 if self.actual_status == "running" else None,
            "gpu_arch": "nvidia",
            "compute_cap": offer.gpu.compute_cap,
            "cuda_max_good": offer.cuda_max_good,
            "driver_version": offer.driver_version,
            "cpu_cores": offer.cpu_cores,
            "cpu_cores_effective": float(offer.cpu_cores),
            "cpu_ram": offer.cpu_ram,
            "cpu_util": 0.0,
            "mem_limit": None,
            "mem_usage": None,
            "disk_space": self.disk,
            "disk_usage": 0.0 if self.image_pulled else None,
            "disk_util": 0.0 if self.image_pulled else None,
            "volume_info": None,
            "inet_up": offer.inet_up,
            "inet_down": offer.inet_down,
            "reliability2": offer.reliability,
            "verification": "verified" if offer.verified else "unverified",
            "geolocation": offer.geolocation,
            "dph_base": self.meter.gpu_dph,
            "dph_total": self.dph_total,
            "storage_cost": offer.storage_cost,
            "storage_total_cost": round(self.meter.storage_dph, 6),
            "is_bid": self.bid_price is not None,
            "min_bid": offer.min_bid,
            "start_date": self.created_at,
            "end_date": None,
            "duration": None,
            "uptime_mins": round(uptime, 3),
            "logo": "/static/logos/vastai_small2.png",
        }
