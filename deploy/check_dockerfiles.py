"""Check each service Dockerfile copies and installs only its own package and libs/common (issue #2).

Reads the COPY and `uv sync` lines, then replays them in a scratch directory with the workspace's uv (no Docker
engine here) and imports the package: a service that imports something it never declared fails this check.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {
    "services/scheduler": ("hybrid-scheduler", "hybrid_scheduler"),
    "services/provisioner": ("hybrid-provisioner", "hybrid_provisioner"),
    "services/proxy": ("hybrid-proxy", "hybrid_proxy"),
    "services/callback-relay": ("hybrid-callback-relay", "hybrid_relay"),
}
ALLOWED_ROOT = {"pyproject.toml", "uv.lock", "./"}


def check(service_dir: str, dist: str, module: str, uv: Path) -> list[str]:
    problems: list[str] = []
    text = (ROOT / service_dir / "Dockerfile").read_text()
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.M)
    allowed = {"libs/common", service_dir}
    for line in copies:
        for src in line.split()[:-1]:
            if src in ALLOWED_ROOT or any(src == a or src.startswith(a + "/") for a in allowed):
                continue
            problems.append(
                f"{service_dir}/Dockerfile copies {src!r}: only root manifests, libs/common, its own package"
            )
    syncs = re.findall(r"uv sync (.+)$", text, re.M)
    if not syncs or any(f"--package {dist}" not in s for s in syncs):
        problems.append(f"{service_dir}/Dockerfile must `uv sync --package {dist}` in each stage")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for f in ("pyproject.toml", "uv.lock"):
            shutil.copy(ROOT / f, t / f)
        for d in allowed:
            shutil.copytree(ROOT / d, t / d, ignore=shutil.ignore_patterns("__pycache__", "tests", "Dockerfile"))
        env = {
            **os.environ,
            "UV_PROJECT_ENVIRONMENT": str(t / ".venv"),
            "UV_PYTHON": sys.executable,
            "UV_PYTHON_DOWNLOADS": "never",
            "UV_LINK_MODE": "copy",
        }
        r = subprocess.run(
            [str(uv), "sync", "--frozen", "--no-dev", "--quiet", "--package", dist],
            cwd=t,
            env=env,
            capture_output=True,
            text=True,
        )
        if r.returncode:
            return [*problems, f"{dist}: uv sync failed: {r.stderr.strip()[-400:]}"]
        others = [m for d, (_, m) in SERVICES.items() if d != service_dir]
        probe = (
            f"import {module}, hybrid_common, importlib.util as u; assert not any(u.find_spec(m) for m in {others!r})"
        )
        r = subprocess.run([str(t / ".venv" / "bin" / "python"), "-c", probe], capture_output=True, text=True)
        if r.returncode:
            problems.append(f"{dist}: isolated install broken: {r.stderr.strip()[-400:]}")
    return problems


def main() -> int:
    uv = ROOT / ".uv" / "bin" / "uv"
    problems = [p for d, (dist, mod) in SERVICES.items() for p in check(d, dist, mod, uv)]
    for p in problems:
        print(p, file=sys.stderr)  # noqa: T201
    if not problems:
        print(f"dockerfiles: {len(SERVICES)} services install only their own package and libs/common")  # noqa: T201
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
