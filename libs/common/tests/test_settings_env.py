"""Settings from the environment as compose hands it over: an empty value means unset, the simulators' addresses are
configurable for MODE=sim, and every setting the services read reaches them under compose (deploy/check_compose_env.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

from hybrid_common import PORTS
from hybrid_common.alerts import AlertSettings
from hybrid_common.settings import CommonSettings
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_proxy.front.settings import FrontSettings
from hybrid_proxy.settings import ProxySettings
from hybrid_relay.settings import RelaySettings
from hybrid_scheduler.settings import SchedulerSettings

ROOT = Path(__file__).resolve().parents[3]


def test_an_empty_variable_falls_back_to_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """compose's ``${VAR:-}`` and a ``VAR=`` line arrive as ""; the settings used to keep "" (an empty endpoint, a
    budget cap that failed to parse, an alert webhook posting to nowhere)."""
    for name in (
        "VAST_URL",
        "UPSTREAM_URL",
        "GONKA_ADMIN_API_URL",
        "VASTAI_MAX_PRICE",
        "HYBRID_TIME_PROFILE",
        "BUDGET_DAY_USD",
        "SCHEDULER_SLOTS",
        "GONKA_PARTICIPANT_ADDRESS",
        "PROXY_NODE_PORT",
        "FRONT_SCAN_INTERVAL",
        "RELAY_PUBLIC_PORT",
        "ALERT_WEBHOOK_URL",
    ):
        monkeypatch.setenv(name, "")
    common = CommonSettings(_env_file=None)
    assert common.vast_url == f"http://127.0.0.1:{PORTS['sim.vast'].port}"
    assert common.upstream_url == f"http://127.0.0.1:{PORTS['sim.upstream'].port}/v1"
    assert common.dapi_admin_url == f"http://127.0.0.1:{PORTS['sim.dapi.admin'].port}"
    assert common.vastai_max_price == 3.0 and common.time_profile is None
    assert ProvisionerSettings(_env_file=None).budget_day_usd is None
    scheduler = SchedulerSettings(_env_file=None)
    assert scheduler.slots == 1 and scheduler.participant_address is None
    assert ProxySettings(_env_file=None).node_port == PORTS["proxy.node"].port
    assert FrontSettings(_env_file=None).front_scan_interval == 2.0
    assert RelaySettings(_env_file=None).public_port == PORTS["relay.public"].port
    assert AlertSettings(_env_file=None).alert_webhook_url is None


def test_an_empty_line_in_the_env_file_is_unset_too(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text("MODE=sim\nVAST_URL=\nVASTAI_MIN_VRAM=\nRELAY_MAX_ATTEMPTS=\n")
    assert CommonSettings(_env_file=env).vast_url == f"http://127.0.0.1:{PORTS['sim.vast'].port}"
    assert CommonSettings(_env_file=env).vastai_min_vram == 40.0
    assert RelaySettings(_env_file=env).max_attempts == 40


def test_the_simulators_addresses_serve_only_the_simulated_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compose runs the simulators in their own containers: MODE=sim with an endpoint unset goes there."""
    monkeypatch.setenv("SIM_VAST_URL", "http://sim-vast:18400")
    monkeypatch.setenv("SIM_DAPI_ADMIN_URL", "http://sim-dapi:19200/")
    s = CommonSettings(_env_file=None)
    assert s.vast_url == "http://sim-vast:18400" and s.dapi_admin_url == "http://sim-dapi:19200"
    monkeypatch.setenv("VAST_URL", "http://127.0.0.1:1")  # an explicit endpoint wins
    assert CommonSettings(_env_file=None).vast_url == "http://127.0.0.1:1"
    monkeypatch.setenv("SIM_UPSTREAM_URL", "https://api.hyperbolic.xyz/v1")  # still the sim: a real one is refused
    with pytest.raises(ValueError, match="MODE=sim refuses a real endpoint for sim_upstream_url"):
        CommonSettings(_env_file=None)
    monkeypatch.delenv("SIM_UPSTREAM_URL")
    monkeypatch.delenv("VAST_URL")
    monkeypatch.setenv("MODE", "live")
    monkeypatch.setenv("GONKA_PUBLIC_API_URL", "http://dapi:8000")
    monkeypatch.setenv("DAPI_CALLBACK_URL", "http://dapi:9100")
    with pytest.raises(ValueError, match="MODE=live needs DAPI_ADMIN_URL"):
        CommonSettings(_env_file=None)  # the simulator's admin URL never stands in for the real dapi
    monkeypatch.setenv("GONKA_ADMIN_API_URL", "http://dapi:9200")
    assert CommonSettings(_env_file=None).vast_url == "https://console.vast.ai"


def test_a_validation_error_does_not_print_the_raw_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """The raw input holds the keys: an error names the problem, never the values."""
    monkeypatch.setenv("MODE", "live")
    monkeypatch.setenv("HYPERBOLIC_API_KEY", "hyp-secret-tail-0042")
    monkeypatch.setenv("VASTAI_API_KEY", "vast-secret-tail-0042")
    with pytest.raises(ValueError) as err:
        CommonSettings(_env_file=None)
    assert "needs" in str(err.value) and "secret-tail" not in str(err.value)


# ---------------------------------------------------------------------------------------------------- compose


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_compose_env", ROOT / "deploy" / "check_compose_env.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_compose_env", module)
    spec.loader.exec_module(module)
    return module


def test_compose_passes_every_setting_the_services_read() -> None:
    check = _checker().check
    compose_text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(compose_text)
    example = (ROOT / ".env.example").read_text()
    assert check(compose, example, compose_text) == []

    # The defects this guards against: a setting nobody passes, a service that does not load .env, a misspelt name.
    without_budget = "\n".join(line for line in example.splitlines() if "BUDGET_DAY_USD" not in line)
    problems = check(compose, without_budget, compose_text)
    assert problems == [
        "provisioner: ProvisionerSettings.budget_day_usd (BUDGET_DAY_USD) is neither in .env.example nor in its "
        "environment:"
    ]
    del compose["services"]["proxy"]["env_file"]
    problems = check(compose, example + "\n# PROXY_ALLOWED_SOURCE=10.0.0.0/8\n", compose_text)
    assert "proxy: does not load .env (env_file: .env): only its environment: list reaches it" in problems
    assert any("ProxySettings.allowed_sources (PROXY_ALLOWED_SOURCES)" in p for p in problems)
    assert ".env.example: PROXY_ALLOWED_SOURCE is read by no service and used by no compose substitution" in problems


def test_compose_overrides_what_differs_inside_it() -> None:
    """Inside compose the provisioner reaches the front at the proxy's name, the gateway range is the one the proxy
    publishes, and the simulators are containers."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    provisioner, proxy = services["provisioner"]["environment"], services["proxy"]
    assert provisioner["NODE_FRONT_PROBE_HOST"] == "proxy"
    assert provisioner["SIM_VAST_URL"] == "http://sim-vast:18400"
    first, last = provisioner["GATEWAY_PORT_FIRST"], provisioner["GATEWAY_PORT_LAST"]
    assert f"{first}-{last}:{first}-{last}" in proxy["ports"]
    assert proxy["environment"]["FRONT_BIND_HOST"] == "0.0.0.0"
    assert all(".env" in services[s]["env_file"] for s in ("scheduler", "provisioner", "proxy", "callback-relay"))
    assert not any(str(v).endswith(":-}") for v in provisioner.values()), "an empty default arrives as ''"
