"""Issue #12: the README's commands, copied as written into a fresh shell on this machine, work.

Every line of the README's shell blocks is one command as written: no shell operator may hide in it (an
``a | b`` list of alternatives would run as a pipe, ``<placeholder>`` as a redirection). Then, by kind:

- ``make run`` / ``make test``: ``make -n`` resolves them in a fresh shell; ``make run`` ends in
  ``python -m hybridctl.run``, the process set ``test_operator_run.py`` runs end to end (not started here: it runs
  until Ctrl-C), and ``make test`` ends in pytest (not recursed into).
- ``.venv/bin/hybridctl ...``: the entry point answers in a fresh shell; each line's arguments are parsed by the CLI's
  own command tree (names, option types, required arguments; nothing is sent, nothing rented), and the repository
  files it names exist. ``status --json`` needs no running system and is run for real. The commands themselves run
  against the running world in ``test_operator_run.py``.
- ``docker compose ...``: this machine has no Docker engine (``make test``'s compose check validates the file the
  same way): the profile, the services and the ``--scale`` target the line names exist in ``docker-compose.yml``, and a
  scaled service pins neither a container name nor a host port.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.main import get_command

from hybridctl.app import app
from tests.support.procs import REPO

README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)
SHELL_LANGS = {"bash", "sh", "shell", "console"}
OPERATORS = {"|", "||", "&", "&&", ";", "<", ">", ">>", "<<", "(", ")"}

pytestmark = pytest.mark.timeout(120)


def readme_commands() -> list[str]:
    lines = []
    for lang, body in FENCE.findall(README.read_text()):
        if lang in SHELL_LANGS:
            lines += [line.strip() for line in body.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return lines


COMMANDS = readme_commands()


def fresh_shell(line: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``line`` in a new, non-login bash at the repository root, with nothing of this session's environment but PATH."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", line],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def shell_operators(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    return [token for token in lexer if token in OPERATORS]


def parse_hybridctl(argv: list[str]) -> str:
    """The CLI's own parse of ``argv`` down to the leaf command (raises typer's usage errors, which name what is wrong);
    never invokes a command. Returns the command path."""
    command: Any = get_command(app)
    ctx = command.make_context("hybridctl", list(argv))
    path = ["hybridctl"]
    while hasattr(command, "resolve_command"):  # a group: the rest of the line belongs to a subcommand
        name, sub, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert sub is not None and name is not None, argv
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub
        path.append(name)
    return " ".join(path)


def test_the_parse_refuses_what_the_cli_refuses() -> None:
    assert parse_hybridctl(["offers", "mlnode-v1", "--limit", "3"]) == "hybridctl offers"
    assert parse_hybridctl(["tunnel", "close-all"]) == "hybridctl tunnel close-all"
    for wrong in (
        ["offers", "mlnode-v1", "--limit", "many"],
        ["destroy", "1", "2"],
        ["no-such"],
        ["comfy", "exec", "X"],
    ):
        with pytest.raises(typer.TyperException):
            parse_hybridctl(wrong)


def test_the_readme_has_the_commands_this_test_knows() -> None:
    heads = {shlex.split(line, comments=True)[0] for line in COMMANDS}
    assert {"make", ".venv/bin/hybridctl", "docker"} >= heads, heads
    assert "make run" in COMMANDS[0] and "make test" in COMMANDS[1]


@pytest.mark.parametrize("line", COMMANDS)
def test_each_line_is_one_command_as_written(line: str) -> None:
    assert not shell_operators(line), f"a shell would not run this as one command: {line!r}"


@pytest.mark.parametrize("target", ["run", "test"])
def test_make_targets_resolve(target: str) -> None:
    assert any(shlex.split(line, comments=True) == ["make", target] for line in COMMANDS)
    dry = fresh_shell(f"make -n {target}")
    assert dry.returncode == 0, dry.stderr
    recipe = [line for line in dry.stdout.splitlines() if line.strip()]
    if target == "run":
        assert recipe[-1] == ".venv/bin/python -m hybridctl.run", recipe  # test_operator_run.py runs exactly this
        assert "bash deploy/local/ensure-infra.sh" in recipe  # RabbitMQ and Redis started if they are not running
    else:
        assert recipe[-1].startswith(".venv/bin/pytest"), recipe
        assert any("ruff check" in x for x in recipe) and any("mypy" in x for x in recipe)


def test_the_cli_answers_in_a_fresh_shell() -> None:
    helped = fresh_shell(".venv/bin/hybridctl --help")
    assert helped.returncode == 0, helped.stderr
    status = fresh_shell(".venv/bin/hybridctl status --json")  # read-only: fine with or without a running system
    assert status.returncode == 0, status.stderr
    assert {"chain", "epochs", "instances"} <= set(json.loads(status.stdout))


HYBRIDCTL = [line for line in COMMANDS if line.startswith(".venv/bin/hybridctl ")]


@pytest.mark.parametrize("line", HYBRIDCTL)
def test_hybridctl_lines_parse(line: str) -> None:
    argv = shlex.split(line, comments=True)
    assert Path(REPO / argv[0]).is_file() and os.access(REPO / argv[0], os.X_OK)
    try:
        parse_hybridctl(argv[1:])
    except typer.TyperException as exc:
        pytest.fail(f"{line!r} does not parse: {exc}")
    for word in argv[1:]:
        if word.startswith("examples/"):
            assert (REPO / word).is_file(), f"{line!r} names {word}, which the repository does not have"


DOCKER = [line for line in COMMANDS if line.startswith("docker ")]


@pytest.mark.parametrize("line", DOCKER)
def test_compose_lines_match_the_compose_file(line: str) -> None:
    argv = shlex.split(line, comments=True)
    assert argv[:2] == ["docker", "compose"], line
    compose: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services: dict[str, Any] = compose["services"]
    profiles = [argv[i + 1] for i, word in enumerate(argv) if word == "--profile"]
    scales = [argv[i + 1] for i, word in enumerate(argv) if word == "--scale"]
    assert "up" in argv, line
    for profile in profiles:
        assert any(profile in (s.get("profiles") or []) for s in services.values()), f"no service in profile {profile}"
    default = {name for name, s in services.items() if not s.get("profiles")}
    assert {"rabbitmq", "redis", "scheduler", "provisioner", "proxy", "callback-relay"} <= default
    for scale in scales:
        name, _, count = scale.partition("=")
        assert name in default and count.isdigit(), scale
        assert "container_name" not in services[name], f"{name} cannot be scaled with a fixed container name"
        fixed = [p for p in services[name].get("ports") or [] if ":" in str(p)]
        assert not fixed, f"{name} cannot be scaled while it binds host ports {fixed}"
