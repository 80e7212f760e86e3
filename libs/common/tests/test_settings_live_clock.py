"""MODE=live runs on the real clock: the time profile is ``real`` unless set, and an accelerated one is refused at start
by every service's settings and by ``make run`` (cli/src/hybridctl/run.py). Money is real: a live provisioner on the
``test`` profile polled Vast.ai five times a second and gave up a paid boot after 30 s.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hybrid_common import current_profile
from hybrid_common.settings import CommonSettings
from hybrid_provisioner.settings import ProvisionerSettings
from hybrid_relay.settings import RelaySettings
from hybridctl import run

LIVE_ENDPOINTS = {
    "GONKA_ADMIN_API_URL": "http://dapi:9200",
    "GONKA_PUBLIC_API_URL": "http://dapi:8000",
    "DAPI_CALLBACK_URL": "http://dapi:9100",
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No mode or clock in the environment, and whatever a test (or the settings) puts there undone afterwards:
    setenv-then-delenv records each name, so monkeypatch restores it even when it was absent."""
    names = ("MODE", "HYBRID_MODE", "HYBRID_TIME_PROFILE", "HYBRID_TIME_PROFILE_SIM", "HYBRID_ACCELERATION")
    for name in (*names, "HYBRID_BLOCK_SECONDS"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    yield monkeypatch


def _live(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODE", "live")
    for name, value in LIVE_ENDPOINTS.items():
        monkeypatch.setenv(name, value)


def test_live_defaults_to_the_real_clock(clean_env: pytest.MonkeyPatch) -> None:
    _live(clean_env)
    assert current_profile().name == "real" and current_profile().acceleration == 1.0
    s = ProvisionerSettings(_env_file=None)
    # Real-world durations, undivided (the test profile made them 0.25 s polls and a 30 s boot limit).
    assert (s.lease_ttl, s.scan_interval, s.tick, s.status_poll) == (15.0, 2.0, 1.0, 10.0)
    assert s.effective_boot_timeout == 1800.0 and s.stall_timeout == 600.0
    relay = RelaySettings(_env_file=None)
    assert relay.profile.name == "real"
    clean_env.setenv("HYBRID_TIME_PROFILE", "real")  # stated explicitly: the same
    assert ProvisionerSettings(_env_file=None).tick == 1.0


@pytest.mark.parametrize("profile", ["demo", "test"])
def test_live_refuses_an_accelerated_profile(clean_env: pytest.MonkeyPatch, profile: str) -> None:
    _live(clean_env)
    clean_env.setenv("HYBRID_TIME_PROFILE", profile)
    with pytest.raises(ValueError, match=f"MODE=live runs on the real clock: HYBRID_TIME_PROFILE='{profile}'"):
        CommonSettings(_env_file=None)
    with pytest.raises(ValueError, match="MODE=live runs on the real clock"):
        ProvisionerSettings(_env_file=None)


def test_live_refuses_a_re_accelerated_real_profile(clean_env: pytest.MonkeyPatch) -> None:
    _live(clean_env)
    clean_env.setenv("HYBRID_ACCELERATION", "40")
    with pytest.raises(ValueError, match="HYBRID_ACCELERATION=40 is refused"):
        CommonSettings(_env_file=None)


def test_live_from_the_env_file_also_puts_the_process_on_the_real_clock(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """MODE=live only in .env (not the process environment): the scaled defaults still see the real clock."""
    env = tmp_path / ".env"
    env.write_text("MODE=live\n" + "".join(f"{k}={v}\n" for k, v in LIVE_ENDPOINTS.items()))
    assert current_profile().name == "test"  # before the settings are read
    s = ProvisionerSettings(_env_file=env)
    assert s.mode == "live" and s.lease_ttl == 15.0 and s.tick == 1.0
    assert os.environ["HYBRID_TIME_PROFILE"] == "real" and current_profile().name == "real"
    env.write_text(env.read_text() + "HYBRID_TIME_PROFILE=demo\n")
    clean_env.delenv("HYBRID_TIME_PROFILE")
    with pytest.raises(ValueError, match="HYBRID_TIME_PROFILE='demo'"):
        ProvisionerSettings(_env_file=env)


def test_the_simulated_world_keeps_its_accelerated_clocks(clean_env: pytest.MonkeyPatch) -> None:
    assert current_profile().name == "test"
    assert ProvisionerSettings(_env_file=None).tick == 0.05  # 1 s / 60, floored
    clean_env.setenv("HYBRID_TIME_PROFILE", "demo")
    assert CommonSettings(_env_file=None).time_profile == "demo" and current_profile().acceleration == 40.0


def test_compose_runs_services_on_the_simulators_clock_in_sim_and_on_the_real_one_live(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """docker-compose.yml leaves HYBRID_TIME_PROFILE empty and gives every container HYBRID_TIME_PROFILE_SIM=demo: a
    service on the real clock against the demo-speed simulators would plan real lead times into two-minute epochs."""
    clean_env.setenv("HYBRID_TIME_PROFILE", "")
    clean_env.setenv("HYBRID_TIME_PROFILE_SIM", "demo")
    assert current_profile().name == "demo"
    _live(clean_env)
    ProvisionerSettings(_env_file=None)
    assert current_profile().name == "real"


def test_make_run_plans_live_on_the_real_clock(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, env = run.plan(live=True, state=tmp_path)
    assert env["HYBRID_TIME_PROFILE"] == "real"
    assert "VAST_URL" not in env  # live: no simulator address either
    _, env = run.plan(live=False, state=tmp_path)
    assert env["HYBRID_TIME_PROFILE"] == "demo"
    clean_env.setenv("HYBRID_TIME_PROFILE", "test")
    assert run.plan(live=False, state=tmp_path)[1]["HYBRID_TIME_PROFILE"] == "test"
    with pytest.raises(ValueError, match="MODE=live runs on the real clock: HYBRID_TIME_PROFILE=test"):
        run.plan(live=True, state=tmp_path)


def test_make_run_refuses_live_on_an_accelerated_clock_before_starting_anything(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"make run started {args[0]!r} on a live, accelerated clock")

    clean_env.setattr(subprocess, "Popen", no_process)  # even a regression starts nothing live here
    clean_env.setenv("MODE", "live")
    clean_env.setenv("HYBRID_TIME_PROFILE", "demo")
    clean_env.setenv("HYBRID_RUN_STATE", str(tmp_path))
    assert run.main() == 2
    err = capsys.readouterr().err
    assert "MODE=live runs on the real clock: HYBRID_TIME_PROFILE=demo" in err
    assert not (tmp_path / "logs").exists()  # nothing was started
