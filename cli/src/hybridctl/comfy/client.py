"""A ComfyUI API client that runs one job the way comfyui.md says the good automations do.

Readiness: ``/system_stats`` must answer JSON with a CUDA device (a provisioning log viewer answers 200 HTML).
A job: upload inputs with ``overwrite=true``; open the WebSocket with a ``clientId`` **before** ``POST /prompt``; done
is ``executing`` with ``node: null`` (sent after history is written — ``execution_success`` comes before it); reconnect
the socket on drops with the same clientId and fall back to ``/history/{id}`` + ``/queue``; an overall deadline ends in
``POST /interrupt``; then ``/history/{id}`` → ``/view`` each non-temp output.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from hybridctl.comfy.workflow import WorkflowError, check_api_format, explain_prompt_error


class ComfyError(RuntimeError):
    """A job that did not produce its outputs; the message is meant for the operator."""


class ComfyAuthError(ComfyError):
    """The image's auth proxy refused us."""


@dataclass
class JobResult:
    prompt_id: str
    outputs: list[Path] = field(default_factory=list)
    seconds: float = 0.0


Progress = Callable[[str, float, float], None]  # (node, value, max)


class ComfyClient:
    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 30.0) -> None:
        self.base = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=timeout))

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> ComfyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def system_stats(self) -> dict[str, Any]:
        # No redirects: ai-dock's proxy answers an unauthorised request with a 302 to its login page (comfyui.md).
        async with self.session.get(f"{self.base}/system_stats", allow_redirects=False) as r:
            if r.status == 401 or (r.status in (302, 303, 307) and "login" in r.headers.get("Location", "")):
                raise ComfyAuthError(
                    f"ComfyUI refused the request: {r.status} (auth rejected — wrong WEB_PASSWORD/token? the SSH "
                    "tunnel reaches ComfyUI itself on 18188, which needs none)"
                )
            if r.status != 200 or "json" not in r.headers.get("Content-Type", ""):
                raise ComfyError(f"/system_stats answered {r.status} {r.headers.get('Content-Type')} (not ready)")
            data: dict[str, Any] = await r.json()
            return data

    async def ready(self) -> bool:
        try:
            stats = await self.system_stats()
        except (TimeoutError, ComfyError, aiohttp.ClientError):
            return False
        return _has_cuda(stats)

    async def wait_ready(self, within: float, on_wait: Callable[[float], None] | None = None) -> None:
        """Until ``/system_stats`` answers JSON with a CUDA device (a log viewer answers 200 HTML while the image
        provisions: comfyui.md). An auth refusal ends the wait at once; the deadline's error names the last answer."""
        start = time.monotonic()
        last = "no answer"
        while True:
            try:
                if _has_cuda(await self.system_stats()):
                    return
                last = "/system_stats lists no CUDA device"
            except ComfyAuthError:
                raise
            except ComfyError as exc:
                last = str(exc)
            except (TimeoutError, aiohttp.ClientError) as exc:
                last = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if time.monotonic() - start > within:
                raise ComfyError(
                    f"ComfyUI did not answer /system_stats with a CUDA device within {within:.0f} s: {last}"
                )
            if on_wait:
                on_wait(time.monotonic() - start)
            await asyncio.sleep(0.5)

    async def upload(self, path: Path) -> str:
        if not path.is_file():
            raise ComfyError(f"input file {str(path)!r} does not exist (missing input image)")
        form = aiohttp.FormData()
        form.add_field("image", path.read_bytes(), filename=path.name)
        form.add_field("overwrite", "true")
        form.add_field("type", "input")
        async with self.session.post(f"{self.base}/upload/image", data=form) as r:
            if r.status != 200:
                raise ComfyError(f"upload of {path.name} failed: {r.status} {await r.text()}")
            body = await r.json()
            return str(body["name"])

    async def submit(self, workflow: dict[str, Any], client_id: str) -> str:
        try:
            check_api_format(workflow)
        except WorkflowError as exc:
            raise ComfyError(str(exc)) from None
        async with self.session.post(f"{self.base}/prompt", json={"prompt": workflow, "client_id": client_id}) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise ComfyError("ComfyUI refused the workflow:\n" + explain_prompt_error(body, workflow))
            return str(body["prompt_id"])

    async def history(self, prompt_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.base}/history/{prompt_id}") as r:
            data: dict[str, Any] = await r.json(content_type=None)
            return data.get(prompt_id, {})  # type: ignore[no-any-return]

    async def in_queue(self, prompt_id: str) -> bool:
        async with self.session.get(f"{self.base}/queue") as r:
            q = await r.json(content_type=None)
        return any(
            len(item) > 1 and item[1] == prompt_id
            for key in ("queue_running", "queue_pending")
            for item in q.get(key, [])
        )

    async def interrupt(self, prompt_id: str | None = None) -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with self.session.post(f"{self.base}/interrupt", json={"prompt_id": prompt_id} if prompt_id else {}):
                pass

    async def download(self, image: dict[str, Any], out_dir: Path) -> Path:
        params = {
            "filename": image["filename"],
            "subfolder": image.get("subfolder", ""),
            "type": image.get("type", "output"),
        }
        async with self.session.get(f"{self.base}/view", params=params) as r:
            if r.status != 200:
                raise ComfyError(f"/view {image['filename']} answered {r.status}")
            data = await r.read()
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / Path(image["filename"]).name
        target.write_bytes(data)
        return target

    async def run(
        self,
        workflow: dict[str, Any],
        *,
        inputs: Sequence[Path] = (),
        out_dir: Path,
        deadline_s: float = 1800,
        progress: Progress | None = None,
    ) -> JobResult:
        """Upload, submit, follow, download. Raises :class:`ComfyError` with a readable reason on any failure."""
        start = time.monotonic()
        for path in inputs:
            await self.upload(path)
        client_id = uuid.uuid4().hex
        ws_url = self.base.replace("http", "ws", 1) + f"/ws?clientId={client_id}"
        ws = await self._connect_ws(ws_url)
        prompt_id = await self.submit(workflow, client_id)
        try:
            await self._follow(ws, ws_url, prompt_id, start + deadline_s, progress)
        except TimeoutError:
            await self.interrupt(prompt_id)
            raise ComfyError(f"job {prompt_id} passed its {deadline_s:.0f} s deadline; interrupted") from None
        except asyncio.CancelledError:
            # Ctrl-C: stop the job on the GPU too, or it keeps the queue busy for whoever comes next.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.interrupt(prompt_id), 5)
            raise
        finally:
            if ws is not None:
                await ws.close()
        entry = await self.history(prompt_id)
        status = entry.get("status", {})
        if status.get("status_str") == "error":
            raise ComfyError(_execution_error(status))
        images = [
            img
            for out in entry.get("outputs", {}).values()
            for img in out.get("images", [])
            if img.get("type") != "temp"
        ]
        files = [await self.download(img, out_dir) for img in images]
        return JobResult(prompt_id, files, time.monotonic() - start)

    async def _connect_ws(self, url: str) -> aiohttp.ClientWebSocketResponse | None:
        try:
            return await self.session.ws_connect(url, heartbeat=10)
        except (TimeoutError, aiohttp.ClientError):
            return None  # fall back to polling

    async def _follow(
        self,
        ws: aiohttp.ClientWebSocketResponse | None,
        ws_url: str,
        prompt_id: str,
        deadline: float,
        progress: Progress | None,
    ) -> None:
        last_poll = 0.0
        while True:
            now = time.monotonic()
            if now > deadline:
                raise TimeoutError
            if ws is None or ws.closed:
                ws = await self._connect_ws(ws_url)  # same clientId: ComfyUI keeps sending to it
                if ws is None:
                    await asyncio.sleep(0.2)
            if ws is not None:
                try:
                    msg = await ws.receive(timeout=min(1.0, max(deadline - now, 0.01)))
                except TimeoutError:
                    msg = None
                if msg is not None and msg.type == aiohttp.WSMsgType.TEXT:
                    event = msg.json()
                    data = event.get("data", {})
                    if data.get("prompt_id") not in (None, prompt_id):
                        continue
                    kind = event.get("type")
                    if kind == "progress" and progress:
                        progress(str(data.get("node")), float(data.get("value", 0)), float(data.get("max", 1)))
                    elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                        return
                    elif kind == "execution_error":
                        raise ComfyError(_execution_error({"messages": [["execution_error", data]]}))
                    elif kind == "execution_interrupted":
                        raise ComfyError(f"job {prompt_id} was interrupted on the server")
                    continue
                if msg is not None and msg.type in (
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                    aiohttp.WSMsgType.CLOSE,
                ):
                    ws = None
            else:
                await asyncio.sleep(0.5)
            if time.monotonic() - last_poll > 2.0:
                # Socket quiet or gone: history says if it finished; an empty history and an empty queue mean the
                # server lost the job (restarted mid-job: comfyui.md, queue and history are lost).
                last_poll = time.monotonic()
                try:
                    entry = await self.history(prompt_id)
                    queued = bool(entry) or await self.in_queue(prompt_id)
                except (TimeoutError, aiohttp.ClientError):
                    continue  # server unreachable for now (restarting?): keep trying until the deadline
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return
                if not queued:
                    raise ComfyError(
                        f"job {prompt_id} vanished: not in /history nor /queue — the ComfyUI server restarted "
                        "mid-job and lost it; submit again"
                    )


def _has_cuda(stats: dict[str, Any]) -> bool:
    return any(d.get("type") == "cuda" for d in stats.get("devices", []))


def _execution_error(status: dict[str, Any]) -> str:
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            text = str(data.get("exception_message", "")).strip()
            node = f"node {data.get('node_id')} ({data.get('node_type')})"
            if "memory" in text.lower() or "oom" in text.lower():
                return f"{node} ran out of GPU memory (OOM): {text} — use a bigger GPU or a smaller batch/resolution"
            return f"{node} failed: {data.get('exception_type', 'error')}: {text}"
    return "the job ended with an error"
