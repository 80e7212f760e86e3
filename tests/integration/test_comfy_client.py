"""Issue #14: a ComfyUI job through the client, and each usual failure's message (ComfyUI simulator)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hybrid_common import TEST
from hybridctl.comfy.client import ComfyClient, ComfyError
from hybridctl.comfy.workflow import WorkflowError, load_workflow
from sim.comfyui import RunningComfy, start_comfyui

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "comfy"


@pytest.fixture
async def comfy() -> AsyncIterator[RunningComfy]:
    c = await start_comfyui(web_password="pw-1234", profile=TEST)
    try:
        await c.wait_ready()
        yield c
    finally:
        await c.close()


def _png(path: Path) -> Path:
    # The smallest valid PNG (1x1), enough for ComfyUI's image check.
    path.write_bytes(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
            "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
        )
    )
    return path


async def test_a_job_runs_and_its_outputs_are_downloaded(comfy: RunningComfy, tmp_path: Path) -> None:
    wf = load_workflow(EXAMPLES / "img2img.api.json")
    seen: list[float] = []
    async with ComfyClient(comfy.internal_url) as client:
        assert await client.ready()
        result = await client.run(
            wf,
            inputs=[_png(tmp_path / "input.png")],
            out_dir=tmp_path / "out",
            deadline_s=60,
            progress=lambda node, v, m: seen.append(v / m),
        )
    assert result.outputs and all(p.stat().st_size > 0 for p in result.outputs)
    assert result.outputs[0].read_bytes().startswith(b"\x89PNG")
    assert seen, "progress frames from the WebSocket"


async def test_auth_proxy_refuses_without_the_token(comfy: RunningComfy) -> None:
    async with ComfyClient(comfy.url) as client:
        with pytest.raises(ComfyError, match="401 \\(auth rejected"):
            await client.system_stats()
    async with ComfyClient(comfy.url, token="pw-1234") as client:
        assert await client.ready()


def test_ui_format_is_refused_with_how_to_export(tmp_path: Path) -> None:
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps({"nodes": [{"id": 1, "type": "KSampler"}], "links": [], "version": 0.4}))
    with pytest.raises(WorkflowError, match="UI format.*Save \\(API Format\\)"):
        load_workflow(ui)


async def test_missing_model_names_node_input_and_installed(comfy: RunningComfy, tmp_path: Path) -> None:
    wf = load_workflow(EXAMPLES / "txt2img.api.json")
    wf["4"]["inputs"]["ckpt_name"] = "nonexistent-model.safetensors"
    async with ComfyClient(comfy.internal_url) as client:
        with pytest.raises(ComfyError) as err:
            await client.run(wf, out_dir=tmp_path, deadline_s=30)
    text = str(err.value)
    assert "node 4 (CheckpointLoaderSimple)" in text and "'ckpt_name'" in text
    assert "nonexistent-model.safetensors" in text and "sd_xl_base_1.0.safetensors" in text


async def test_missing_input_image_is_named(comfy: RunningComfy, tmp_path: Path) -> None:
    wf = load_workflow(EXAMPLES / "img2img.api.json")
    async with ComfyClient(comfy.internal_url) as client:
        with pytest.raises(ComfyError) as err:
            await client.run(wf, out_dir=tmp_path, deadline_s=30)
        assert "missing input image" in str(err.value) and "input.png" in str(err.value)
        with pytest.raises(ComfyError, match="does not exist \\(missing input image\\)"):
            await client.run(wf, inputs=[tmp_path / "nope.png"], out_dir=tmp_path, deadline_s=30)


async def test_oom_is_reported_as_out_of_memory(comfy: RunningComfy, tmp_path: Path) -> None:
    comfy.inject_oom(count=1)
    wf = load_workflow(EXAMPLES / "txt2img.api.json")
    async with ComfyClient(comfy.internal_url) as client:
        with pytest.raises(ComfyError, match="out of GPU memory \\(OOM\\)"):
            await client.run(wf, out_dir=tmp_path, deadline_s=30)


async def test_server_restart_mid_job_is_detected(comfy: RunningComfy, tmp_path: Path) -> None:
    wf = load_workflow(EXAMPLES / "txt2img.api.json")
    wf["3"]["inputs"]["steps"] = 40
    comfy.restart_mid_job(after_progress=1, downtime_s=0.5)
    async with ComfyClient(comfy.internal_url) as client:
        with pytest.raises(ComfyError, match="restarted mid-job"):
            await asyncio.wait_for(client.run(wf, out_dir=tmp_path, deadline_s=60), 90)
