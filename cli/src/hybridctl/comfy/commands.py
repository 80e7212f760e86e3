"""`hybridctl comfy create|exec|oneshot|destroy` — ComfyUI on rented GPUs with local tunnels."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hybrid_common.settings import CommonSettings
from hybridctl.comfy.client import ComfyClient, ComfyError
from hybridctl.comfy.lifecycle import ComfyConfig, ComfyCreateError, CreatedInstance, create, release
from hybridctl.comfy.tunnels import Tunnel, TunnelStore, ensure_keeper, wait_up
from hybridctl.comfy.workflow import WorkflowError, load_workflow
from hybridctl.output import console, fail

comfy_app = typer.Typer(no_args_is_help=True, help="ComfyUI on rented GPUs, reached through local SSH tunnels.")


def _settings() -> CommonSettings:
    try:
        return CommonSettings()
    except ValueError as exc:
        raise fail(f"bad configuration: {exc}") from None


def _open_tunnel(created: CreatedInstance, key_path: str) -> Tunnel:
    store = TunnelStore()
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
    try:
        return wait_up(store, created.instance_id, timeout=30)
    except RuntimeError as exc:
        raise fail(f"SSH tunnel to instance {created.instance_id} failed: {exc}", 1) from None


def _create(config_path: Path, name: str | None, timeout: float) -> tuple[CreatedInstance, Tunnel]:
    settings = _settings()
    try:
        config = ComfyConfig.load(config_path)
    except ComfyCreateError as exc:
        raise fail(str(exc)) from None
    slot = name or f"comfy-{uuid.uuid4().hex[:6]}"
    key = os.path.expanduser(config.ssh_key or settings.ssh_key_path)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as progress:
        task = progress.add_task(f"renting ComfyUI ({slot})…", total=None)
        try:
            created = asyncio.run(
                create(
                    settings,
                    config,
                    slot,
                    timeout=timeout,
                    on_event=lambda t: progress.update(task, description=f"{slot}: {t}"),
                )
            )
        except ComfyCreateError as exc:
            raise fail(str(exc), 1) from None
        progress.update(task, description=f"{slot}: opening the SSH tunnel")
        tunnel = _open_tunnel(created, key)

    async def check() -> bool:
        async with ComfyClient(tunnel.url) as client:
            return await client.ready()

    if not asyncio.run(check()):
        raise fail(f"the tunnel to instance {created.instance_id} is up but ComfyUI does not answer /system_stats", 1)
    return created, tunnel


@comfy_app.command("create")
def create_cmd(
    config: Annotated[Path, typer.Argument(help="YAML/JSON: gpu_names, min_vram_gb, max_dph, image, env, ssh_key")],
    name: Annotated[str | None, typer.Option(help="slot name (default comfy-<random>)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for ComfyUI")] = 1800,
) -> None:
    """Rent a GPU with ComfyUI, wait until it answers, open a local tunnel and print its URL."""
    created, tunnel = _create(config, name, timeout)
    console.print(
        f"instance {created.instance_id} ({created.gpu_name}) ready in {created.seconds:.0f} s: ComfyUI at {tunnel.url}"
    )


def _run_job(instance: int, workflow: Path, inputs: list[Path], out: Path, deadline: float) -> None:
    tunnel = TunnelStore().get(instance)
    if tunnel is None:
        raise fail(f"no tunnel for instance {instance}: create it with `hybridctl comfy create` first")
    try:
        wf = load_workflow(workflow)
    except WorkflowError as exc:
        raise fail(str(exc)) from None
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
    for f in files:
        console.print(f"output: {f}")


@comfy_app.command("exec")
def exec_cmd(
    instance: Annotated[int, typer.Argument(help="instance id (from `comfy create`)")],
    workflow: Annotated[Path, typer.Argument(help="an API-format workflow JSON")],
    input_: Annotated[list[Path] | None, typer.Option("--input", help="input file to upload (repeatable)")] = None,
    out: Annotated[Path, typer.Option(help="where outputs go")] = Path("comfy-out"),
    deadline: Annotated[float, typer.Option(help="overall job deadline, seconds (then interrupt)")] = 1800,
) -> None:
    """Upload inputs, submit the workflow, follow it, download the outputs."""
    _run_job(instance, workflow, input_ or [], out, deadline)


def _destroy(instance: int, slot: str | None = None) -> None:
    store = TunnelStore()
    tunnel = store.remove(instance)
    slot = slot or (tunnel.label if tunnel else None)
    if not slot:
        raise fail(
            f"instance {instance} is not one of ours here (no tunnel record); use `hybridctl destroy {instance}`"
        )
    asyncio.run(release(_settings(), slot))
    port = f", local port {tunnel.local_port} freed" if tunnel else ""
    console.print(f"instance {instance} ({slot}) released{port}")


@comfy_app.command("destroy")
def destroy_cmd(instance: Annotated[int, typer.Argument(help="instance id")]) -> None:
    """Close the instance's tunnel (freeing its local port) and release the instance."""
    _destroy(instance)


@comfy_app.command("oneshot")
def oneshot_cmd(
    config: Annotated[Path, typer.Argument(help="the create config")],
    workflow: Annotated[Path, typer.Argument(help="an API-format workflow JSON")],
    input_: Annotated[list[Path] | None, typer.Option("--input", help="input file to upload (repeatable)")] = None,
    out: Annotated[Path, typer.Option(help="where outputs go")] = Path("comfy-out"),
    deadline: Annotated[float, typer.Option(help="overall job deadline, seconds")] = 1800,
    timeout: Annotated[float, typer.Option(help="seconds to wait for ComfyUI")] = 1800,
) -> None:
    """Create → exec → outputs → destroy; the instance is destroyed even on failure or Ctrl-C."""
    try:
        load_workflow(workflow)  # refuse a bad workflow before renting anything
    except WorkflowError as exc:
        raise fail(str(exc)) from None
    slot = f"comfy-{uuid.uuid4().hex[:6]}"
    created: CreatedInstance | None = None
    try:
        created, _ = _create(config, slot, timeout)
        _run_job(created.instance_id, workflow, input_ or [], out, deadline)
    finally:
        if created is not None:
            _destroy(created.instance_id, slot)
        else:
            asyncio.run(release(_settings(), slot))  # a rental still in flight must not outlive us
