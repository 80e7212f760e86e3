"""Issue #5 acceptance: the ComfyUI simulator (vastai/comfy image: auth proxy on 8188, ComfyUI on 18188).

Upload → prompt → WebSocket completion → history → view through the auth proxy; 401 without the token;
ComfyUI's validation error shapes; and each injectable failure (OOM, restart mid-job), plus interrupt,
queue management, caching and per-client WebSocket routing.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from hybrid_common import TEST
from sim.comfyui import RunningComfy, launch_options_from_env, portal_starts_comfyui, start_comfyui
from sim.comfyui.images import PNG_SIGNATURE, png_size, render_png
from tests.support.net import free_port
from tests.support.procs import ManagedProcess

PASSWORD = "s3cret-web-password"
CKPT = "sd_xl_base_1.0.safetensors"
Json = dict[str, Any]


def txt2img(steps: int = 8, width: int = 512, height: int = 512, batch: int = 1, text: str = "a red fox") -> Json:
    return {
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 42,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "fox", "images": ["8", 0]}},
    }


def img2img(image: str, steps: int = 8) -> Json:
    wf = txt2img(steps)
    wf["10"] = {"class_type": "LoadImage", "inputs": {"image": image}}
    wf["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    wf["3"]["inputs"]["latent_image"] = ["11", 0]
    del wf["5"]
    return wf


@pytest.fixture
async def comfy() -> AsyncIterator[RunningComfy]:
    c = await start_comfyui(web_password=PASSWORD, profile=TEST)
    try:
        yield c
    finally:
        await c.close()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


AUTH = {"Authorization": f"Bearer {PASSWORD}"}


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with http.get(url, **kw) as r:
        assert r.status == 200, (url, r.status, await r.text())
        return await r.json()


async def post_prompt(http: aiohttp.ClientSession, base: str, body: Json, **kw: Any) -> tuple[int, Json]:
    async with http.post(f"{base}/prompt", json=body, **kw) as r:
        return r.status, await r.json()


async def messages_until(
    ws: aiohttp.ClientWebSocketResponse, done: Callable[[Json], bool], timeout: float = 20.0
) -> list[Json]:
    out: list[Json] = []
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no terminal message; got {[m['type'] for m in out]}"
        msg = await ws.receive(timeout=remaining)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise AssertionError(f"socket ended: {msg.type}; got {[m['type'] for m in out]}")
        data = msg.json()
        out.append(data)
        if done(data):
            return out


def finished(prompt_id: str) -> Callable[[Json], bool]:
    return lambda m: (
        m["type"] == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == prompt_id
    )


async def upload(http: aiohttp.ClientSession, base: str, name: str, content: bytes, **fields: str) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("image", content, filename=name, content_type="image/png")
    for k, v in fields.items():
        form.add_field(k, v)
    async with http.post(f"{base}/upload/image", data=form, headers=AUTH) as r:
        return r.status, (await r.json() if r.status == 200 else None)


async def test_job_through_the_auth_proxy(http: aiohttp.ClientSession) -> None:
    # A slower clock than TEST so "history is {} until done" is observable without racing the job.
    comfy = await start_comfyui(web_password=PASSWORD, profile=TEST.with_acceleration(6))
    try:
        base = comfy.url
        # 401 without credentials; the three accepted forms (comfyui.md).
        async with http.get(f"{base}/system_stats") as r:
            assert r.status == 401
        async with http.get(f"{base}/system_stats", headers={"Authorization": "Bearer wrong"}) as r:
            assert r.status == 401
        basic = base64.b64encode(f"vastai:{PASSWORD}".encode()).decode()
        async with http.get(f"{base}/system_stats", headers={"Authorization": f"Basic {basic}"}) as r:
            assert r.status == 200
        async with http.get(f"{base}/system_stats?token={PASSWORD}") as r:
            assert r.status == 200
        stats = await get_json(http, f"{base}/system_stats", headers=AUTH)
        assert stats["devices"][0]["type"] == "cuda" and stats["system"]["comfyui_version"]
        # ComfyUI itself (the tunnel target) has no auth.
        assert (await get_json(http, f"{comfy.internal_url}/system_stats"))["devices"][0]["type"] == "cuda"

        # Upload: duplicate content reuses the name, different content gets "name (1).png".
        source = render_png(64, 48, b"input-image")
        assert await upload(http, base, "in.png", source) == (200, {"name": "in.png", "subfolder": "", "type": "input"})
        assert (await upload(http, base, "in.png", source))[1]["name"] == "in.png"
        other = render_png(64, 48, b"other-image")
        assert (await upload(http, base, "in.png", other))[1]["name"] == "in (1).png"
        assert (await upload(http, base, "in.png", source, overwrite="true"))[1]["name"] == "in.png"
        form = aiohttp.FormData()
        form.add_field("overwrite", "true")
        async with http.post(f"{base}/upload/image", data=form, headers=AUTH) as r:
            assert r.status == 400  # no file

        # The socket first, then the prompt (comfyui.md: open the WebSocket before POST /prompt).
        async with http.ws_connect(f"{base}/ws?clientId=cli-1", headers=AUTH) as ws:
            first = (await ws.receive(timeout=10)).json()
            assert first["type"] == "status" and first["data"]["sid"] == "cli-1"
            status, body = await post_prompt(
                http, base, {"prompt": img2img("in.png"), "client_id": "cli-1"}, headers=AUTH
            )
            assert status == 200 and body["node_errors"] == {} and isinstance(body["number"], int)
            prompt_id = body["prompt_id"]
            assert await get_json(http, f"{base}/history/{prompt_id}", headers=AUTH) == {}  # not done yet
            msgs = await messages_until(ws, finished(prompt_id))
            # Right after `executing` + node:null, the history is there.
            history = await get_json(http, f"{base}/history/{prompt_id}", headers=AUTH)

        kinds = [m["type"] for m in msgs if m["type"] != "status"]
        assert kinds[0] == "execution_start" and kinds[1] == "execution_cached"
        assert kinds.index("execution_success") == len(kinds) - 2 and kinds[-1] == "executing"
        executing = [m["data"]["node"] for m in msgs if m["type"] == "executing"]
        assert executing[:-1] and executing[-1] is None
        assert executing.index("4") < executing.index("3") < executing.index("8") < executing.index("9")
        progress = [m["data"] for m in msgs if m["type"] == "progress"]
        assert [p["value"] for p in progress] == list(range(1, 9)) and {p["max"] for p in progress} == {8}
        [executed] = [m["data"] for m in msgs if m["type"] == "executed"]
        assert executed["node"] == "9"

        entry = history[prompt_id]
        assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
        assert [m[0] for m in entry["status"]["messages"]] == [
            "execution_start",
            "execution_cached",
            "execution_success",
        ]
        assert entry["prompt"][1] == prompt_id and len(entry["prompt"]) == 5
        [image] = entry["outputs"]["9"]["images"]
        assert image == executed["output"]["images"][0]
        assert image["type"] == "output" and image["filename"] == "fox_00001_.png"

        async with http.get(f"{base}/view", params={**image}, headers=AUTH) as r:
            assert r.status == 200
            png = await r.read()
        assert png.startswith(PNG_SIGNATURE) and png_size(png) == (64, 48)
        # /api aliases answer the same.
        assert await get_json(http, f"{base}/api/history/{prompt_id}", headers=AUTH) == history
        assert await get_json(http, f"{base}/api/queue", headers=AUTH) == {"queue_running": [], "queue_pending": []}
        for params, expected in (
            ({"filename": "../secret.png"}, 400),
            ({"filename": "/etc/passwd"}, 400),
            ({"filename": "fox_00001_.png", "subfolder": "../../.."}, 403),
            ({"filename": "nope.png"}, 404),
            ({"filename": "fox_00001_.png [output]", "type": "input"}, 200),
        ):
            async with http.get(f"{base}/view", params=params, headers=AUTH) as r:
                assert r.status == expected, params
    finally:
        await comfy.close()


async def test_validation_errors_have_comfyui_shapes(comfy: RunningComfy, http: aiohttp.ClientSession) -> None:
    base = comfy.internal_url
    wf = txt2img()
    wf["4"]["inputs"]["ckpt_name"] = "flux1-dev.safetensors"
    status, body = await post_prompt(http, base, {"prompt": wf})
    assert status == 400
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    err = body["node_errors"]["4"]
    assert err["class_type"] == "CheckpointLoaderSimple" and err["dependent_outputs"] == ["9"]
    [reason] = err["errors"]
    assert reason["type"] == "value_not_in_list"
    assert reason["details"] == (
        "ckpt_name: 'flux1-dev.safetensors' not in "
        "['sd_xl_base_1.0.safetensors', 'v1-5-pruned-emaonly-fp16.safetensors']"
    )
    assert reason["extra_info"]["input_name"] == "ckpt_name"

    status, body = await post_prompt(http, base, {"prompt": img2img("ghost.png")})
    assert status == 400
    [reason] = body["node_errors"]["10"]["errors"]
    assert reason["type"] == "custom_validation_failed"
    assert reason["details"] == "image - Invalid image file: ghost.png"

    wf = txt2img()
    wf["12"] = {"class_type": "IPAdapterApply", "inputs": {}}
    status, body = await post_prompt(http, base, {"prompt": wf})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    assert body["error"]["message"] == "Cannot execute because node IPAdapterApply does not exist."

    wf = txt2img(steps=20000)
    del wf["6"]["inputs"]["text"]
    status, body = await post_prompt(http, base, {"prompt": wf})
    assert status == 400
    assert body["node_errors"]["3"]["errors"][0]["type"] == "value_bigger_than_max"
    assert body["node_errors"]["6"]["errors"][0]["type"] == "required_input_missing"

    # UI-format workflows: a 400 or a 500 depending on the first key (comfyui.md).
    ui_new = {"id": "2b6e", "revision": 0, "last_node_id": 9, "nodes": [{"id": 4, "type": "KSampler"}], "links": []}
    status, body = await post_prompt(http, base, {"prompt": ui_new})
    assert status == 400 and body["error"]["type"] == "invalid_prompt"
    assert body["error"]["details"] == "Node ID '#id'"
    ui_old = {"last_node_id": 9, "last_link_id": 9, "nodes": [], "links": [], "version": 0.4}
    async with http.post(f"{base}/prompt", json={"prompt": ui_old}) as r:
        assert r.status == 500

    status, body = await post_prompt(http, base, {"client_id": "x"})
    assert status == 400 and body["error"]["type"] == "no_prompt"
    status, body = await post_prompt(http, base, {"prompt": {"4": txt2img()["4"]}})
    assert status == 400 and body["error"]["type"] == "prompt_no_outputs"

    # One good output and one broken one: queued anyway, node_errors reported on the 200.
    wf = txt2img()
    wf["20"] = {"class_type": "LoadImage", "inputs": {"image": "ghost.png"}}
    wf["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
    status, body = await post_prompt(http, base, {"prompt": wf})
    assert status == 200 and list(body["node_errors"]) == ["20"]
    deadline = time.monotonic() + 20
    while not (history := await get_json(http, f"{base}/history/{body['prompt_id']}")):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert list(history[body["prompt_id"]]["outputs"]) == ["9"]


async def test_injected_oom_then_recovery(comfy: RunningComfy, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{comfy.url}/_sim/oom", json={"count": 1}) as r:  # proxy-served, no auth
        assert r.status == 200 and (await r.json())["faults"]["oom_remaining"] == 1
    async with http.ws_connect(f"{comfy.url}/ws?clientId=oom", headers=AUTH) as ws:
        _, body = await post_prompt(http, comfy.url, {"prompt": txt2img(), "client_id": "oom"}, headers=AUTH)
        msgs = await messages_until(ws, finished(body["prompt_id"]))
        [error] = [m["data"] for m in msgs if m["type"] == "execution_error"]
        assert error["node_type"] == "KSampler" and error["exception_type"] == "torch.OutOfMemoryError"
        assert "out of memory" in error["exception_message"]
        assert error["prompt_id"] == body["prompt_id"] and "4" in error["executed"]
        assert "execution_success" not in [m["type"] for m in msgs]
        history = await get_json(http, f"{comfy.url}/history/{body['prompt_id']}", headers=AUTH)
        status = history[body["prompt_id"]]["status"]
        assert status["status_str"] == "error" and status["completed"] is False
        assert status["messages"][-1][0] == "execution_error"

        # The fault is consumed: the same job now succeeds...
        _, body = await post_prompt(http, comfy.url, {"prompt": txt2img(), "client_id": "oom"}, headers=AUTH)
        msgs = await messages_until(ws, finished(body["prompt_id"]))
        assert "execution_success" in [m["type"] for m in msgs]
        # ...and a batch too big for the card runs out of memory by itself.
        _, body = await post_prompt(
            http, comfy.url, {"prompt": txt2img(width=1024, height=1024, batch=64), "client_id": "oom"}, headers=AUTH
        )
        msgs = await messages_until(ws, finished(body["prompt_id"]))
        assert [m["data"]["exception_type"] for m in msgs if m["type"] == "execution_error"] == [
            "torch.OutOfMemoryError"
        ]


async def test_restart_mid_job_loses_queue_and_history(http: aiohttp.ClientSession) -> None:
    # A slower clock (checkpoint load 1 s) so a second prompt is surely queued before the restart hits.
    comfy = await start_comfyui(web_password=PASSWORD, profile=TEST.with_acceleration(6))
    try:
        await _restart_mid_job(comfy, http)
    finally:
        await comfy.close()


async def _restart_mid_job(comfy: RunningComfy, http: aiohttp.ClientSession) -> None:
    base = comfy.url
    async with http.ws_connect(f"{base}/ws?clientId=r", headers=AUTH) as ws:
        _, first = await post_prompt(http, base, {"prompt": txt2img(), "client_id": "r"}, headers=AUTH)
        await messages_until(ws, finished(first["prompt_id"]))
    done = await get_json(http, f"{base}/history/{first['prompt_id']}", headers=AUTH)
    image = done[first["prompt_id"]]["outputs"]["9"]["images"][0]

    async with http.post(f"{base}/_sim/restart", json={"when": "mid_job", "after_progress": 3, "downtime_s": 6}) as r:
        assert (await r.json()) == {"restarting": False, "armed": True}
    async with http.ws_connect(f"{base}/ws?clientId=r", headers=AUTH) as ws:
        _, job = await post_prompt(http, base, {"prompt": txt2img(steps=400), "client_id": "r"}, headers=AUTH)
        _, pending = await post_prompt(http, base, {"prompt": txt2img(steps=5, text="x")}, headers=AUTH)
        seen: list[str] = []
        while True:  # the socket dies with the server, without execution_success or executing:null
            msg = await ws.receive(timeout=20)
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            seen.append(msg.json()["type"])
        assert "progress" in seen and "execution_success" not in seen

    # While ComfyUI is down the proxy answers 502 (no JSON): readiness must not trust the port alone.
    deadline = time.monotonic() + 20
    statuses = set()
    while True:
        async with http.get(f"{base}/system_stats", headers=AUTH) as r:
            statuses.add(r.status)
            if r.status == 200 and r.content_type == "application/json":
                break
        assert time.monotonic() < deadline, statuses
        await asyncio.sleep(0.02)
    assert 502 in statuses
    state = await get_json(http, f"{base}/_sim/state")
    assert state["boots"] == 2 and state["ready"] is True

    # Queue and history are gone for good; output files on disk are not.
    for prompt_id in (first["prompt_id"], job["prompt_id"], pending["prompt_id"]):
        assert await get_json(http, f"{base}/history/{prompt_id}", headers=AUTH) == {}
    assert await get_json(http, f"{base}/queue", headers=AUTH) == {"queue_running": [], "queue_pending": []}
    async with http.get(f"{base}/view", params=image, headers=AUTH) as r:
        assert r.status == 200

    # A restart "now" over the internal port works too, and the server comes back.
    async with http.post(f"{comfy.internal_url}/_sim/restart", json={"downtime_s": 1}) as r:
        assert r.status == 200
    deadline = time.monotonic() + 20
    while (await get_json(http, f"{base}/_sim/state"))["boots"] < 3 or not comfy.ready:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_interrupt_queue_delete_and_cache(comfy: RunningComfy, http: aiohttp.ClientSession) -> None:
    base = comfy.internal_url
    async with http.ws_connect(f"{base}/ws?clientId=q") as ws:
        _, long_job = await post_prompt(http, base, {"prompt": txt2img(steps=10000), "client_id": "q"})
        _, queued = await post_prompt(http, base, {"prompt": txt2img(steps=4, text="queued"), "client_id": "q"})
        await messages_until(ws, lambda m: m["type"] == "progress")
        queue = await get_json(http, f"{base}/queue")
        [running] = queue["queue_running"]
        [waiting] = queue["queue_pending"]
        assert running[1] == long_job["prompt_id"] and waiting[1] == queued["prompt_id"] and len(running) == 5
        async with http.post(f"{base}/queue", json={"delete": [queued["prompt_id"]]}) as r:
            assert r.status == 200
        async with http.post(f"{base}/interrupt", json={"prompt_id": "not-running"}) as r:
            assert r.status == 200  # ignored
        async with http.post(f"{base}/interrupt", json={"prompt_id": long_job["prompt_id"]}) as r:
            assert r.status == 200
        msgs = await messages_until(ws, finished(long_job["prompt_id"]))
    [stopped] = [m["data"] for m in msgs if m["type"] == "execution_interrupted"]
    assert stopped["node_id"] == "3" and stopped["node_type"] == "KSampler"
    history = await get_json(http, f"{base}/history/{long_job['prompt_id']}")
    assert history[long_job["prompt_id"]]["status"]["status_str"] == "error"
    assert await get_json(http, f"{base}/history/{queued['prompt_id']}") == {}
    assert await get_json(http, f"{base}/queue") == {"queue_running": [], "queue_pending": []}

    # An identical prompt runs nothing new: every node is cached and the outputs are the previous ones.
    wf = txt2img(steps=3)
    async with http.ws_connect(f"{base}/ws?clientId=c") as ws:
        _, one = await post_prompt(http, base, {"prompt": copy.deepcopy(wf), "client_id": "c"})
        await messages_until(ws, finished(one["prompt_id"]))
        _, two = await post_prompt(http, base, {"prompt": copy.deepcopy(wf), "client_id": "c"})
        msgs = await messages_until(ws, finished(two["prompt_id"]))
    [cached] = [m["data"]["nodes"] for m in msgs if m["type"] == "execution_cached"]
    assert sorted(cached) == sorted(wf)
    assert "progress" not in [m["type"] for m in msgs]
    h1 = (await get_json(http, f"{base}/history/{one['prompt_id']}"))[one["prompt_id"]]["outputs"]
    h2 = (await get_json(http, f"{base}/history/{two['prompt_id']}"))[two["prompt_id"]]["outputs"]
    assert h1 == h2 and h1["9"]["images"][0]["filename"].startswith("fox_")


async def test_messages_go_to_the_prompts_client_only(comfy: RunningComfy, http: aiohttp.ClientSession) -> None:
    base = comfy.internal_url
    async with http.ws_connect(f"{base}/ws?clientId=a") as a, http.ws_connect(f"{base}/ws?clientId=b") as b:
        await a.receive(timeout=5)
        await b.receive(timeout=5)
        _, job = await post_prompt(http, base, {"prompt": txt2img(), "client_id": "a"})
        await messages_until(a, finished(job["prompt_id"]))
        await asyncio.sleep(0.1)
        others: list[str] = []
        while True:
            try:
                msg = await b.receive(timeout=0.2)
            except TimeoutError:
                break
            others.append(msg.json()["type"])
    assert others and set(others) == {"status"}  # queue updates are broadcast; job messages are not


async def test_startup_delay_and_cli_process(http: aiohttp.ClientSession) -> None:
    comfy = await start_comfyui(web_password=PASSWORD, profile=TEST, startup_s=120)  # 2 s in TEST
    try:
        async with http.get(f"{comfy.url}/system_stats", headers=AUTH) as r:
            assert r.status == 502 and not comfy.ready
        await comfy.wait_ready(timeout=20)
        assert (await get_json(http, f"{comfy.url}/system_stats", headers=AUTH))["devices"]
    finally:
        await comfy.close()

    port, internal = free_port(), free_port()
    args = ["-m", "sim", "comfyui", "--port", str(port), "--internal-port", str(internal), "--web-password", "pw"]
    with ManagedProcess(args, wait_for_port=port):
        deadline = time.monotonic() + 20
        while True:
            try:
                async with http.get(f"http://127.0.0.1:{internal}/system_stats") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with http.get(f"http://127.0.0.1:{port}/system_stats") as r:
            assert r.status == 401
        async with http.get(f"http://127.0.0.1:{port}/api/system_stats", headers={"Authorization": "Bearer pw"}) as r:
            assert r.status == 200 and (await r.json())["devices"][0]["type"] == "cuda"


async def test_auth_options(http: aiohttp.ClientSession) -> None:
    open_comfy = await start_comfyui(profile=TEST)  # no password: like ENABLE_AUTH=false
    token_comfy = await start_comfyui(profile=TEST, open_button_token="obt")
    generated = await start_comfyui(profile=TEST, enable_auth=True)  # the image makes one up
    try:
        assert open_comfy.auth_headers == {}
        async with http.get(f"{open_comfy.url}/system_stats") as r:
            assert r.status == 200
        async with http.get(f"{token_comfy.url}/system_stats") as r:
            assert r.status == 401
        basic = base64.b64encode(b"vastai:obt").decode()
        for headers in ({"Authorization": "Bearer obt"}, {"Authorization": f"Basic {basic}"}):
            async with http.get(f"{token_comfy.url}/system_stats", headers=headers) as r:
                assert r.status == 200
        assert generated.web_password
        async with http.get(f"{generated.url}/system_stats") as r:
            assert r.status == 401
        async with http.get(f"{generated.url}/system_stats", headers=generated.auth_headers) as r:
            assert r.status == 200
        assert (await get_json(http, f"{generated.url}/_sim/state"))["unauthorized"] == 1
    finally:
        for c in (open_comfy, token_comfy, generated):
            await c.close()


def test_vast_image_environment() -> None:
    portal = "localhost:1111:11111:/:Instance Portal|localhost:8188:18188:/:ComfyUI"
    assert portal_starts_comfyui(portal)
    assert not portal_starts_comfyui("localhost:1111:11111:/:Instance Portal")
    assert launch_options_from_env({"WEB_PASSWORD": "pw"}) is None  # no PORTAL_CONFIG: ComfyUI never starts
    assert launch_options_from_env({"PORTAL_CONFIG": portal, "WEB_PASSWORD": "pw"}) == {
        "web_password": "pw",
        "open_button_token": None,
        "enable_auth": True,
    }
    opts = launch_options_from_env({"PORTAL_CONFIG": portal, "AUTH_EXCLUDE": "6006,8188"})
    assert opts is not None and opts["enable_auth"] is False
