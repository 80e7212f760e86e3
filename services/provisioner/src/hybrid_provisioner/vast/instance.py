"""Reading an instance as the API shows it (vastai-api.md "Show"): addresses, ports, and failure signatures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybrid_common.messages.domain import FailureCause

# vastai-api.md "Failure signatures": the words a status_msg carries when the instance will never run.
_PULL_WORDS = ("manifest", "pull access denied", "repository does not exist", "no such image", "failed to pull")
_OCI_WORDS = ("oci runtime", "failed to create task", "failed to create shim")
_ERROR_WORDS = ("error response from daemon", "error:", "failed")


@dataclass(frozen=True)
class Address:
    """How an instance is reached: ``public_ip`` + mapped ports (never ``ssh_host`` for HTTP), and SSH."""

    public_ip: str | None
    ports: dict[int, int]
    ssh_host: str | None
    ssh_port: int | None


def address(inst: dict[str, Any]) -> Address:
    raw_ip = inst.get("public_ipaddr")
    ip = raw_ip.strip() if isinstance(raw_ip, str) and raw_ip.strip() else None  # may carry whitespace
    ports: dict[int, int] = {}
    for key, bindings in (inst.get("ports") or {}).items():  # only once running; may be null
        container, _, proto = str(key).partition("/")
        if proto not in ("", "tcp") or not isinstance(bindings, list) or not bindings:
            continue
        try:
            ports[int(container)] = int(bindings[0]["HostPort"])  # HostPort is a string
        except (KeyError, TypeError, ValueError):
            continue
    ssh_port = inst.get("ssh_port")
    return Address(
        public_ip=ip,
        ports=ports,
        ssh_host=inst.get("ssh_host") or None,
        ssh_port=int(ssh_port) if isinstance(ssh_port, (int, str)) and str(ssh_port).isdigit() else None,
    )


def status_signature(inst: dict[str, Any]) -> str:
    """A fingerprint of the status fields; a loading instance whose fingerprint never changes is stuck."""
    return "|".join(
        str(inst.get(k)) for k in ("actual_status", "intended_status", "cur_state", "next_state", "status_msg")
    )


def failure(inst: dict[str, Any], *, expect_stopped: bool = False) -> tuple[FailureCause, str] | None:
    """The terminal failure this status shows, if any."""
    actual = inst.get("actual_status")
    msg = str(inst.get("status_msg") or "")
    low = msg.lower()
    if actual == "offline":
        return FailureCause.HOST_OFFLINE, f"host offline: {msg}".strip()
    if actual in ("exited", "unknown") and not expect_stopped:
        return FailureCause.START_FAILED, f"instance {actual}: {msg}".strip()
    if any(w in low for w in _OCI_WORDS):
        return FailureCause.OCI_ERROR, msg
    if any(w in low for w in _PULL_WORDS) and ("error" in low or "not found" in low or "denied" in low):
        return FailureCause.PULL_FAILED, msg
    stopped = inst.get("cur_state") == inst.get("intended_status") == inst.get("next_state") == "stopped"
    if stopped and not expect_stopped:
        # An outbid spot or a create that left a stopped instance: its GPU is gone.
        return FailureCause.START_FAILED, f"instance stopped: {msg}".strip()
    if actual == "created" and any(w in low for w in _ERROR_WORDS) and inst.get("intended_status") == "running":
        return FailureCause.START_FAILED, msg
    return None
