"""`hybridctl comfy create|exec|oneshot|destroy` — ComfyUI on rented GPUs with local tunnels.

Money safety: whatever this module rents it gives back when it cannot hand it over. A failed or interrupted
``create`` releases its slot; ``oneshot`` releases its instance whatever happened to the job (failure, Ctrl-C,
SIGTERM); ``destroy`` waits for the provisioner to confirm. While a release runs, Ctrl-C is ignored: a second
Ctrl-C must not abandon a GPU that bills by the hour.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hybrid_common.settings import CommonSettings
from hybridctl.comfy.lifecycle import ComfyConfig, ComfyCreateError, CreatedInstance, Rental, create, release
from hybridctl.comfy.tunnels import Tunnel, TunnelStore, ensure_keeper, keeper_pid, wait_ports_free, wait_up
from hybridctl.comfy.workflow import WorkflowError, load_workflow
from hybridctl.output import console, err, fail, print_json

# The HTTP client (aiohttp) is imported where ComfyUI is called: `hybridctl` loads this module on every invocation.

comfy_app = typer.Typer(no_args_is_help=True, help="ComfyUI on rented GPUs, reached through local SSH tunnels.")

SLOT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # the provisioner's SlotId
RELEASE_CONFIRM_S = 60.0
INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C

AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
Inputs = Annotated[list[Path] | None, typer.Option("--input", help="input file to upload (repeatable)")]
Out = Annotated[Path, typer.Option(help="where outputs go")]
Deadline = Annotated[float, typer.Option(help="overall job deadline, seconds (then the job is interrupted)")]
Timeout = Annotated[float, typer.Option(help="seconds to wait for ComfyUI to be ready")]


def _settings() -> CommonSettings:
    try:
        return CommonSettings()
    except ValueError as exc:
        raise fail(f"bad configuration: {exc}") from None


def _where(settings: CommonSettings) -> str:
    return settings.amqp_url.split("@")[-1]  # never print the broker's credentials


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while a release runs (asyncio.run installs no SIGINT handler over SIG_IGN)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _term_as_interrupt(signum: int, frame: FrameType | None) -> None:
    os.kill(os.getpid(), signal.SIGINT)


@comfy_app.callback()
def _comfy() -> None:
    # SIGTERM (a supervisor, `kill`) takes the Ctrl-C path, which gives back what was rented.
    signal.signal(signal.SIGTERM, _term_as_interrupt)


def _release(settings: CommonSettings, slot: str, what: str) -> tuple[bool, str]:
    """Release ``slot`` and wait for the provisioner's confirmation; (confirmed, a line saying what happened)."""
    from hybrid_common.bus import Unroutable

    err.print(f"releasing {what} (slot {slot}); Ctrl-C is ignored until the provisioner confirms…", highlight=False)
    with _interrupts_deferred():
        try:
            ok = asyncio.run(release(settings, slot, confirm_within=RELEASE_CONFIRM_S))
        except (OSError, TimeoutError, Unroutable) as exc:
            return False, (
                f"could not release {what}: {exc} (broker at {_where(settings)}); it may still bill: "
                f"run `hybridctl release {slot}` once the broker and the provisioner are back"
            )
    if ok:
        return True, f"{what} destroyed (slot {slot} released): nothing left billing"
    return False, (
        f"release of {what} (slot {slot}) requested but not confirmed within {RELEASE_CONFIRM_S:.0f} s: "
        "check `hybridctl status`"
    )


def _give_back(settings: CommonSettings, rental: Rental, created: CreatedInstance | None, store: TunnelStore) -> str:
    """After a failed or interrupted create: drop the local records and release whatever the slot holds."""
    if created is not None:
        store.remove(created.instance_id)
    if not rental.needs_release:
        return "nothing was left rented" if rental.requested else "nothing was rented"
    what = f"instance {created.instance_id}" if created else f"the GPU rented for slot {rental.slot_id}"
    ok, line = _release(settings, rental.slot_id, what)
    if ok and created is not None:
        store.forget_rental(created.instance_id)
    return line


def _ssh_key(config: ComfyConfig, config_path: Path, settings: CommonSettings) -> str:
    key = os.path.expanduser(config.ssh_key or settings.ssh_key_path)
    if not os.path.isfile(key):
        source = f"ssh_key in {config_path}" if config.ssh_key else "SSH_KEY_PATH"
        raise fail(f"SSH key {key!r} does not exist ({source}): the tunnel needs the key the provisioner attaches")
    return key


def _open_tunnel(store: TunnelStore, created: CreatedInstance, key_path: str) -> Tunnel:
    store.allocate(
        Tunnel(
            instance_id=created.instance_id,
            local_port=0,
            ssh_host=created.ssh_host,
            ssh_port=created.ssh_port,
            key_path=key_path,
            label=created.slot_id,
        )
    )
    ensure_keeper()
    return wait_up(store, created.instance_id, timeout=30)


async def _comfy_answers(tunnel: Tunnel) -> None:
    from hybridctl.comfy.client import ComfyClient

    async with ComfyClient(tunnel.url, timeout=10) as client:
        await client.wait_ready(within=20)


def _create(config_path: Path, name: str | None, timeout: float) -> tuple[CreatedInstance, Tunnel]:
    """Rent, tunnel, check ComfyUI answers through the tunnel. On any failure or Ctrl-C, give everything back."""
    from hybrid_common.bus import Unroutable
    from hybridctl.comfy.client import ComfyError

    settings = _settings()
    try:
        config = ComfyConfig.load(config_path)
    except ComfyCreateError as exc:
        raise fail(str(exc)) from None
    slot = name or f"comfy-{uuid.uuid4().hex[:6]}"
    if not SLOT_PATTERN.match(slot):
        raise fail(
            f"invalid name {slot!r}: letters, digits, '.', '_' and '-', at most 64, starting with a letter/digit"
        )
    key = _ssh_key(config, config_path, settings)
    store = TunnelStore()
    rental = Rental(slot)
    created: CreatedInstance | None = None
    try:
        with Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
        ) as progress:
            task = progress.add_task(f"renting ComfyUI ({slot})…", total=None)
            created = asyncio.run(
                create(
                    settings,
                    config,
                    rental,
                    timeout=timeout,
                    on_event=lambda t: progress.update(task, description=f"{slot}: {t}"),
                )
            )
            store.remember_rental(created.instance_id, slot)
            progress.update(task, description=f"{slot}: opening the SSH tunnel")
            try:
                tunnel = _open_tunnel(store, created, key)
            except RuntimeError as exc:
                raise ComfyError(f"SSH tunnel to instance {created.instance_id} failed: {exc}") from None
        try:
            asyncio.run(_comfy_answers(tunnel))
        except ComfyError as exc:
            raise ComfyError(f"the tunnel to instance {created.instance_id} is up, but: {exc}") from None
        return created, tunnel
    except (ComfyCreateError, ComfyError) as exc:
        outcome = _give_back(settings, rental, created, store)
        raise fail(f"{exc}\n{outcome}", 1) from None
    except (OSError, TimeoutError) as exc:
        outcome = _give_back(settings, rental, created, store) if rental.needs_release else "nothing was rented"
        raise fail(f"cannot reach the broker at {_where(settings)}: {exc}\n{outcome}", 1) from None
    except Unroutable:
        raise fail(
            f"no provisioner takes commands in namespace {settings.namespace!r}: nothing was rented", 1
        ) from None
    except KeyboardInterrupt:
        outcome = _give_back(settings, rental, created, store)
        raise fail(f"interrupted: {outcome}", INTERRUPTED) from None


@comfy_app.command("create")
def create_cmd(
    config: Annotated[
        Path, typer.Argument(help="YAML/JSON: gpu_names, min_vram_gb, max_dph, image, env, ssh_key, profile")
    ],
    name: Annotated[str | None, typer.Option(help="slot name (default comfy-<random>)")] = None,
    timeout: Timeout = 1800,
    as_json: AsJson = False,
) -> None:
    """Rent a GPU with ComfyUI, wait until it answers, open a local tunnel and print its URL."""
    created, tunnel = _create(config, name, timeout)
    if as_json:
        print_json(
            {
                "instance_id": created.instance_id,
                "slot_id": created.slot_id,
                "gpu_name": created.gpu_name,
                "local_port": tunnel.local_port,
                "url": tunnel.url,
                "seconds": round(created.seconds, 1),
            }
        )
        return
    console.print(
        f"instance {created.instance_id} ({created.gpu_name}) ready in {created.seconds:.0f} s: ComfyUI at {tunnel.url}",
        highlight=False,
    )


def _check_inputs(inputs: list[Path]) -> None:
    for path in inputs:
        if not path.is_file():
            raise fail(f"input file {str(path)!r} does not exist (missing input image)")


def _load(workflow: Path) -> None:
    try:
        load_workflow(workflow)
    except WorkflowError as exc:
        raise fail(str(exc)) from None


def _run_job(instance: int, workflow: Path, inputs: list[Path], out: Path, deadline: float) -> None:
    """Run one job through the instance's tunnel. A Ctrl-C interrupts the job on the server and propagates."""
    import aiohttp

    from hybridctl.comfy.client import ComfyClient, ComfyError

    store = TunnelStore()
    tunnel = store.get(instance)
    if tunnel is None:
        known = ", ".join(str(t.instance_id) for t in store.all()) or "none"
        raise fail(f"no tunnel for instance {instance} here (tunnels for: {known}): `hybridctl comfy create` first")
    try:
        wf = load_workflow(workflow)
    except WorkflowError as exc:
        raise fail(str(exc)) from None
    _check_inputs(inputs)
    if keeper_pid() is None or tunnel.status != "up":
        ensure_keeper()  # the keeper died (a reboot?): it re-opens every recorded tunnel
        try:
            tunnel = wait_up(store, instance, timeout=30)
        except RuntimeError as exc:
            raise fail(f"the tunnel to instance {instance} is down: {exc}", 1) from None
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("running", total=1.0)

        async def go() -> list[Path]:
            async with ComfyClient(tunnel.url) as client:
                result = await client.run(
                    wf,
                    inputs=inputs,
                    out_dir=out,
                    deadline_s=deadline,
                    progress=lambda node, v, m: progress.update(
                        task, completed=v / max(m, 1), description=f"node {node}"
                    ),
                )
                return result.outputs

        try:
            files = asyncio.run(go())
        except ComfyError as exc:
            raise fail(str(exc), 1) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise fail(f"ComfyUI at {tunnel.url} (instance {instance}) unreachable: {reason}", 1) from None
    for f in files:
        console.print(f"output: {f}", highlight=False)


@comfy_app.command("exec")
def exec_cmd(
    instance: Annotated[int, typer.Argument(help="instance id (from `comfy create`)")],
    workflow: Annotated[Path, typer.Argument(help="an API-format workflow JSON")],
    input_: Inputs = None,
    out: Out = Path("comfy-out"),
    deadline: Deadline = 1800,
) -> None:
    """Upload inputs, submit the workflow, follow it, download the outputs."""
    try:
        _run_job(instance, workflow, input_ or [], out, deadline)
    except KeyboardInterrupt:
        raise fail(
            f"interrupted: the job on instance {instance} was interrupted; the instance keeps running "
            f"(`hybridctl comfy destroy {instance}` releases it)",
            INTERRUPTED,
        ) from None


def _destroy(instance: int, slot: str | None = None) -> tuple[bool, str]:
    """Close the instance's tunnel and release it; (confirmed, what happened)."""
    settings = _settings()
    store = TunnelStore()
    tunnel = store.get(instance)
    slot = slot or store.rental_slot(instance) or (tunnel.label if tunnel else None)
    if not slot:
        raise fail(
            f"instance {instance} was not created here (no record in {store.path}): use `hybridctl destroy {instance}`"
        )
    store.remove(instance)
    ok, line = _release(settings, slot, f"instance {instance}")
    if ok:
        store.forget_rental(instance)
    if tunnel is not None:
        freed = wait_ports_free([tunnel.local_port], timeout=10)
        line += f"; local port {tunnel.local_port} {'freed' if freed else 'still in use (is the keeper stuck?)'}"
    return ok, line


@comfy_app.command("destroy")
def destroy_cmd(instance: Annotated[int, typer.Argument(help="instance id")]) -> None:
    """Close the instance's tunnel (freeing its local port) and release the instance."""
    ok, line = _destroy(instance)
    if not ok:
        raise fail(line, 1)
    console.print(line, highlight=False)


@comfy_app.command("oneshot")
def oneshot_cmd(
    config: Annotated[Path, typer.Argument(help="the create config")],
    workflow: Annotated[Path, typer.Argument(help="an API-format workflow JSON")],
    input_: Inputs = None,
    out: Out = Path("comfy-out"),
    deadline: Deadline = 1800,
    timeout: Timeout = 1800,
    name: Annotated[str | None, typer.Option(help="slot name (default comfy-<random>)")] = None,
) -> None:
    """Create → exec → outputs → destroy; the instance is destroyed even on failure, Ctrl-C or SIGTERM."""
    _load(workflow)  # refuse a bad workflow or a missing input before renting anything
    _check_inputs(input_ or [])
    created, _ = _create(config, name, timeout)  # gives back what it rented when it fails
    try:
        _run_job(created.instance_id, workflow, input_ or [], out, deadline)
    except KeyboardInterrupt:
        _, line = _destroy(created.instance_id, created.slot_id)
        raise fail(f"interrupted: {line}", INTERRUPTED) from None
    except BaseException:  # the job failed (its error is printed): the instance goes back all the same
        ok, line = _destroy(created.instance_id, created.slot_id)
        (err if not ok else console).print(line, highlight=False)
        raise
    ok, line = _destroy(created.instance_id, created.slot_id)
    if not ok:
        raise fail(line, 1)
    console.print(line, highlight=False)
