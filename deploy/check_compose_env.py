"""Every setting a service reads reaches its container under docker compose (run by deploy/check-compose.sh).

A compose service gets the variables its ``environment:`` lists and, with ``env_file: .env``, every variable of
``.env`` — which operators create from ``.env.example``. So a setting a service's settings class reads must be set in
``environment:`` or named in ``.env.example`` (commented lines count: uncommenting one passes it through), and each
service must load ``.env``. The other way round, every name in ``.env.example`` must be one some service reads or one
docker-compose.yml substitutes: a misspelt name would be silently ignored.

Usage: ``python deploy/check_compose_env.py`` (exit 1 naming what is missing).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel
from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parents[1]

# Names read outside the settings classes: hybrid_common.current_profile (every service) and the provisioner's
# per-profile image overrides (PROVISIONER_IMAGE_<PROFILE>, services/provisioner/src/hybrid_provisioner/profiles.py).
EXTRA_NAMES = ("HYBRID_TIME_PROFILE", "HYBRID_ACCELERATION", "HYBRID_BLOCK_SECONDS")
DYNAMIC_PREFIXES = ("PROVISIONER_IMAGE_",)
# Test-only fault hooks: never an operator's setting (hybrid_provisioner.faulthook).
NOT_FOR_OPERATORS = frozenset({"PROVISIONER_TEST_DIE_AT", "PROVISIONER_TEST_DIE_DIR"})

_NAME_LINE = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=", re.MULTILINE)
_SUBSTITUTED = re.compile(r"\$\{([A-Z][A-Z0-9_]*)")


def service_settings() -> dict[str, list[type[BaseSettings]]]:
    """The settings classes each compose service's process builds."""
    from hybrid_common.alerts import AlertSettings
    from hybrid_provisioner.settings import ProvisionerSettings
    from hybrid_proxy.front.settings import FrontSettings
    from hybrid_proxy.settings import ProxySettings
    from hybrid_relay.settings import RelaySettings
    from hybrid_scheduler.settings import SchedulerSettings

    return {
        "scheduler": [SchedulerSettings, AlertSettings],
        "provisioner": [ProvisionerSettings],
        "proxy": [ProxySettings, FrontSettings],
        "callback-relay": [RelaySettings],
    }


def env_names(cls: type[BaseSettings]) -> dict[str, tuple[list[str], bool]]:
    """field → (the environment names it is read from, whether it also takes ``NAME__FIELD`` nested names)."""
    prefix = str(cls.model_config.get("env_prefix") or "")
    nested = bool(cls.model_config.get("env_nested_delimiter"))
    out: dict[str, tuple[list[str], bool]] = {}
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names = [c for c in alias.choices if isinstance(c, str)]
        elif isinstance(alias, str):
            names = [alias]
        else:
            names = [(prefix + name).upper()]
        model = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        out[name] = ([n.upper() for n in names], nested and model)
    return out


def example_names(text: str) -> set[str]:
    """Names a ``NAME=`` line of .env.example sets, commented or not."""
    return set(_NAME_LINE.findall(text))


def _provided(service: dict[str, Any], example: set[str]) -> tuple[set[str], list[str]]:
    problems = []
    env_file = service.get("env_file")
    files = [env_file] if isinstance(env_file, str) else list(env_file or [])
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    provided = set(environment)
    if ".env" in files:
        provided |= example
    else:
        problems.append("does not load .env (env_file: .env): only its environment: list reaches it")
    return provided, problems


def check(compose: dict[str, Any], example_text: str, compose_text: str = "") -> list[str]:
    """What is wrong, one line each (empty: every setting reaches its service)."""
    problems: list[str] = []
    example = example_names(example_text)
    services = compose.get("services") or {}
    read: set[str] = set(EXTRA_NAMES)
    for service, classes in service_settings().items():
        if service not in services:
            problems.append(f"{service}: not in docker-compose.yml")
            continue
        provided, bad = _provided(services[service], example)
        problems += [f"{service}: {b}" for b in bad]
        for cls in classes:
            for field, (names, nested) in env_names(cls).items():
                read.update(names)
                if set(names) & NOT_FOR_OPERATORS:
                    continue
                if set(names) & provided:
                    continue
                if nested and any(p.startswith(f"{n}__") for n in names for p in provided):
                    continue
                problems.append(
                    f"{service}: {cls.__name__}.{field} ({' / '.join(names)}) is neither in .env.example "
                    "nor in its environment:"
                )
        for name in EXTRA_NAMES:
            if name not in provided:
                problems.append(f"{service}: {name} is neither in .env.example nor in its environment:")
    substituted = set(_SUBSTITUTED.findall(compose_text))
    for name in sorted(example - read - substituted):
        if name.startswith(DYNAMIC_PREFIXES) or any(name.startswith(f"{r}__") for r in read):
            continue
        problems.append(f".env.example: {name} is read by no service and used by no compose substitution")
    return problems


def main(argv: Iterable[str] = ()) -> int:
    compose_text = (ROOT / "docker-compose.yml").read_text()
    problems = check(yaml.safe_load(compose_text), (ROOT / ".env.example").read_text(), compose_text)
    for p in problems:
        print(f"compose env: {p}", file=sys.stderr)  # noqa: T201
    if not problems:
        print("compose env: every setting the services read reaches them (.env.example + environment:)")  # noqa: T201
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
