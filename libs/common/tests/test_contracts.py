"""Contracts of libs/common that need no broker: envelope, registry, settings, logging, time profile."""

from __future__ import annotations

import io
import logging
import uuid

import orjson
import pytest

from hybrid_common import PORTS, TEST, current_profile
from hybrid_common.logs import SecretRedactor, setup_logging
from hybrid_common.messages import REGISTRY, InvalidMessage, UnknownMessageType, make, parse
from hybrid_common.messages.commands import Destroy, Provision
from hybrid_common.messages.events import InstanceReady
from hybrid_common.settings import CommonSettings


def test_envelope_round_trip_keeps_type_and_ids() -> None:
    env = make(
        Provision(idempotency_key="e1", profile="mlnode-v1", slot_ids=["gpu-1", "gpu-2"]),
        source="cli",
        correlation_id="epoch-7",
    )
    back = parse(env.to_bytes())
    assert back == env
    assert isinstance(back.payload, Provision) and back.payload.slot_ids == ["gpu-1", "gpu-2"]
    follow = make(
        InstanceReady(job_id="j", slot_id="gpu-1", instance_id=1, profile="p", gpu_name="g", boot_seconds=1.0),
        source="prov",
        **back.caused(),
    )
    assert follow.correlation_id == "epoch-7" and follow.causation_id == str(env.id)


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json", "not JSON"),
        (b"[1,2]", "JSON object"),
        (b'{"source":"x"}', "no string 'type'"),
        (b'{"type":"nope.nothing","source":"x","payload":{}}', "unknown message type"),
        (b'{"type":"provision","source":"x","payload":{"profile":"p","slot_ids":[]}}', "idempotency_key"),
        (
            b'{"type":"provision","source":"x","payload":{"idempotency_key":"k","profile":"p","slot_ids":["bad id!"]}}',
            "slot_ids",
        ),
    ],
)
def test_invalid_messages_are_rejected_with_a_reason(body: bytes, error: str) -> None:
    with pytest.raises(InvalidMessage, match=error):
        parse(body)


def test_unknown_type_is_its_own_error() -> None:
    with pytest.raises(UnknownMessageType):
        parse(orjson.dumps({"id": str(uuid.uuid4()), "type": "x.y", "source": "s", "payload": {}}))


def test_registry_names_the_design_messages() -> None:
    for t in (
        "epoch.observed",
        "poc.window_planned",
        "confirmation_poc.detected",
        "provision",
        "release",
        "destroy",
        "instance.created",
        "instance.reachable",
        "instance.ready",
        "instance.failed",
        "instance.destroyed",
        "node.registered",
        "tunnel.opened",
        "tunnel.closed",
        "callback.accepted",
        "callback.forwarded",
        "callback.duplicate",
        "callback.dead",
        "budget.blocked",
        "scheduler.pause",
        "scheduler.resume",
        "scheduler.rehearse",
        "offers.query",
        "logs.query",
        "tunnel.list",
    ):
        assert t in REGISTRY, t


def test_destroy_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Destroy()
    with pytest.raises(ValueError, match="exactly one"):
        Destroy(instance_id=1, all_labelled=True)
    assert Destroy(all_labelled=True).all_labelled


def test_settings_accept_the_seeds_names_and_hide_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VASTAI_API_KEY", "vast-real-key-123")
    monkeypatch.setenv("HYPERBOLIC_API_KEY", "hyp-real-key-456")
    monkeypatch.setenv("VASTAI_MAX_PRICE", "1.25")
    monkeypatch.setenv("VASTAI_MIN_VRAM", "80")
    monkeypatch.setenv("VASTAI_GPU_TYPE", "H100 SXM")
    monkeypatch.setenv("VASTAI_DISK_SIZE", "150")
    monkeypatch.setenv("GONKA_ADMIN_API_URL", "http://127.0.0.1:9200")
    monkeypatch.setenv("MLNODE_PORT", "8081")
    monkeypatch.setenv("MLNODE_STARTUP_TIMEOUT", "900")
    monkeypatch.setenv("POC_EXECUTION_TIMEOUT", "1200")
    monkeypatch.setenv("DOCKER_IMAGE", "ghcr.io/gonka-ai/mlnode:3.0.14-post2")
    s = CommonSettings(_env_file=None)
    assert (s.vastai_max_price, s.vastai_min_vram, s.vastai_gpu_type, s.vastai_disk_size) == (1.25, 80, "H100 SXM", 150)
    assert s.dapi_admin_url == "http://127.0.0.1:9200" and s.mlnode_port == 8081
    assert (s.mlnode_startup_timeout, s.poc_execution_timeout) == (900, 1200)
    assert s.docker_image == "ghcr.io/gonka-ai/mlnode:3.0.14-post2"
    assert "vast-real-key-123" not in repr(s) and "hyp-real-key-456" not in str(s.model_dump())
    # MODE=sim: the simulator gets the simulator's key, never the real one.
    assert s.mode == "sim" and s.secret("vastai_api_key") == "test"
    assert s.vast_url == f"http://127.0.0.1:{PORTS['sim.vast'].port}"


def test_sim_mode_refuses_real_endpoints_and_live_mode_uses_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VAST_URL", "https://console.vast.ai")
    with pytest.raises(ValueError, match="MODE=sim refuses a real endpoint"):
        CommonSettings(_env_file=None)
    monkeypatch.setenv("MODE", "live")
    monkeypatch.setenv("VASTAI_API_KEY", "k-live-1")
    monkeypatch.setenv("GONKA_ADMIN_API_URL", "http://dapi:9200")
    monkeypatch.setenv("GONKA_PUBLIC_API_URL", "http://dapi:8000")
    monkeypatch.setenv("DAPI_CALLBACK_URL", "http://dapi:9100")
    s = CommonSettings(_env_file=None)
    assert s.vast_url == "https://console.vast.ai" and s.upstream_url == "https://api.hyperbolic.xyz/v1"
    assert s.secret("vastai_api_key") == "k-live-1"
    with pytest.raises(ValueError, match="HYPERBOLIC_API_KEY is required"):
        s.secret("hyperbolic_api_key")


def test_logs_never_print_secrets() -> None:
    buf = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        _check_redaction(buf)
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])


def _check_redaction(buf: io.StringIO) -> None:
    red = setup_logging("t", secrets=["sk-verysecret-1"])
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buf)
    log = logging.getLogger("probe")
    log.warning("calling with key %s", "sk-verysecret-1")
    log.warning("Authorization: Bearer abcdef123456 and api_key=zzzz9999 and ?token=qwerty12")
    out = buf.getvalue()
    for leaked in ("sk-verysecret-1", "abcdef123456", "zzzz9999", "qwerty12"):
        assert leaked not in out
    assert out.count("***") >= 4 and isinstance(red, SecretRedactor)
    assert orjson.loads(out.splitlines()[0])["service"] == "t"


def test_time_profile_scales_real_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    assert TEST.scale(60) == pytest.approx(1.0)
    assert TEST.blocks_to_seconds(TEST.epoch.epoch_length) == pytest.approx(60.0)
    monkeypatch.setenv("HYBRID_TIME_PROFILE", "demo")
    monkeypatch.setenv("HYBRID_ACCELERATION", "120")
    assert current_profile().acceleration == 120 and current_profile().name == "demo"
    monkeypatch.setenv("HYBRID_TIME_PROFILE", "nope")
    with pytest.raises(ValueError, match="HYBRID_TIME_PROFILE='nope'"):
        current_profile()


def test_port_map_has_no_collisions() -> None:
    ports = [e.port for e in PORTS.values()]
    assert len(ports) == len(set(ports))
