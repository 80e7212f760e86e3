"""ComfyUI's HTTP and WebSocket API (``server.py`` of ComfyUI v0.3.6x), as served on the internal port.

ComfyUI has no authentication of its own (comfyui.md); on the Vast image it listens on 127.0.0.1:18188
and a proxy with auth fronts it on 8188 (see auth_proxy.py). Every route also answers under ``/api``.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sim.comfyui.files import UploadRefused
from sim.comfyui.nodes import NODE_CLASSES, object_info
from sim.comfyui.validation import validate_prompt

if TYPE_CHECKING:
    from sim.comfyui.process import ComfyProcess

COMFYUI_VERSION = "0.3.66"
MAX_UPLOAD_SIZE = 100 * 1024 * 1024  # ComfyUI's --max-upload-size default (MB)
_INDEX_HTML = (
    "<!doctype html><html lang='en'><head><meta charset='UTF-8'><title>ComfyUI</title></head>"
    "<body class='litegraph grid'><div id='vue-app'></div></body></html>"
)


def dump_json(data: Any) -> bytes:
    try:
        return orjson.dumps(data)
    except TypeError:  # integers beyond 64 bits (a seed typed by hand): Python's json copes, like ComfyUI's
        return json.dumps(data).encode()


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=dump_json(data), status=status, content_type="application/json")


class ComfyApi:
    def __init__(self, process: ComfyProcess) -> None:
        self.process = process
        self.machine = process.machine

    def build(self, extra_routes: list[web.RouteDef]) -> web.Application:
        routes = [
            web.get("/", self.index),
            web.get("/ws", self.websocket),
            web.get("/embeddings", self.embeddings),
            web.get("/models", self.model_types),
            web.get("/models/{folder}", self.model_files),
            web.get("/extensions", self.extensions),
            web.post("/upload/image", self.upload_image),
            web.get("/view", self.view),
            web.get("/system_stats", self.system_stats),
            web.get("/features", self.features),
            web.get("/prompt", self.get_prompt),
            web.post("/prompt", self.post_prompt),
            web.get("/object_info", self.object_info_all),
            web.get("/object_info/{node_class}", self.object_info_one),
            web.get("/history", self.get_history),
            web.get("/history/{prompt_id}", self.get_history_item),
            web.post("/history", self.post_history),
            web.get("/queue", self.get_queue),
            web.post("/queue", self.post_queue),
            web.post("/interrupt", self.interrupt),
            web.post("/free", self.free),
        ]
        app = web.Application(client_max_size=MAX_UPLOAD_SIZE)
        # ComfyUI registers each route twice: as is, and under /api (what the new frontend calls).
        app.add_routes(routes)
        app.add_routes([web.route(r.method, "/api" + r.path, r.handler) for r in routes if r.path != "/"])
        app.add_routes(extra_routes)
        return app

    # -- pages and catalogues -------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=_INDEX_HTML, content_type="text/html")

    async def embeddings(self, request: web.Request) -> web.Response:
        return _json([name.rsplit(".", 1)[0] for name in self.machine.models.get("embeddings", [])])

    async def model_types(self, request: web.Request) -> web.Response:
        return _json(list(self.machine.models))

    async def model_files(self, request: web.Request) -> web.Response:
        folder = request.match_info["folder"]
        if folder not in self.machine.models:
            return web.Response(status=404)
        return _json(self.machine.choices(folder))

    async def extensions(self, request: web.Request) -> web.Response:
        return _json([])

    async def features(self, request: web.Request) -> web.Response:
        return _json({"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE})

    async def system_stats(self, request: web.Request) -> web.Response:
        gpu = self.machine.gpu
        used = 2_147_483_648 if self.machine.prompts_executed else 0
        return _json(
            {
                "system": {
                    "os": "posix",
                    "ram_total": 135_081_639_936,
                    "ram_free": 121_346_572_288,
                    "comfyui_version": COMFYUI_VERSION,
                    "required_frontend_version": "1.28.8",
                    "installed_templates_version": "0.2.4",
                    "required_templates_version": "0.2.4",
                    "python_version": "3.12.11 (main, Jun  4 2025, 08:56:18) [GCC 11.4.0]",
                    "pytorch_version": "2.8.0+cu128",
                    "embedded_python": False,
                    "argv": ["main.py", "--disable-auto-launch", "--port", "18188", "--enable-cors-header"],
                },
                "devices": [
                    {
                        "name": f"cuda:0 {gpu.name} : cudaMallocAsync",
                        "type": "cuda",
                        "index": 0,
                        "vram_total": gpu.vram_total,
                        "vram_free": gpu.vram_total - used - 536_870_912,
                        "torch_vram_total": used,
                        "torch_vram_free": used // 8,
                    }
                ],
            }
        )

    async def object_info_all(self, request: web.Request) -> web.Response:
        return _json({name: object_info(cls, self.machine.choices) for name, cls in NODE_CLASSES.items()})

    async def object_info_one(self, request: web.Request) -> web.Response:
        name = request.match_info["node_class"]
        cls = NODE_CLASSES.get(name)
        return _json({name: object_info(cls, self.machine.choices)} if cls else {})

    # -- files ------------------------------------------------------------------------------------------

    async def upload_image(self, request: web.Request) -> web.Response:
        post = await request.post()
        image = post.get("image")
        if not isinstance(image, web.FileField):
            return web.Response(status=400)
        overwrite = post.get("overwrite")
        type_ = post.get("type")
        subfolder = post.get("subfolder", "")
        try:
            saved = self.machine.files.save_upload(
                image.filename or "",
                image.file.read(),
                type_=str(type_) if type_ is not None else None,
                subfolder=str(subfolder),
                overwrite=overwrite in ("true", "1"),
            )
        except UploadRefused as refused:
            return web.Response(status=refused.status)
        return _json(saved)

    async def view(self, request: web.Request) -> web.StreamResponse:
        query = request.rel_url.query
        if "filename" not in query:
            return web.Response(status=404)
        found = self.machine.files.view_path(query["filename"], query.get("type"), query.get("subfolder"))
        if isinstance(found, int):
            return web.Response(status=found)
        return web.FileResponse(found, headers={"Content-Disposition": f'filename="{found.name}"'})

    # -- prompts ----------------------------------------------------------------------------------------

    async def get_prompt(self, request: web.Request) -> web.Response:
        return _json(self.process.queue_info())

    async def post_prompt(self, request: web.Request) -> web.Response:
        json_data = await request.json()  # malformed JSON is an unhandled error, a 500, as in ComfyUI
        process = self.process
        if "number" in json_data:
            number: float = float(json_data["number"])
        else:
            number = process.number
            if json_data.get("front"):
                number = -number
            process.number += 1
        if "prompt" not in json_data:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return _json({"error": error, "node_errors": {}}, status=400)
        prompt = json_data["prompt"]
        prompt_id = str(json_data.get("prompt_id", uuid.uuid4()))
        check = validate_prompt(prompt, self.machine.view(), json_data.get("partial_execution_targets"))
        extra_data = json_data.get("extra_data", {})
        if "client_id" in json_data:
            extra_data["client_id"] = json_data["client_id"]
        if not check.ok:
            return _json({"error": check.error, "node_errors": check.node_errors}, status=400)
        process.queue.put((number, prompt_id, prompt, extra_data, check.outputs))
        return _json({"prompt_id": prompt_id, "number": number, "node_errors": check.node_errors})

    async def get_history(self, request: web.Request) -> web.Response:
        query = request.rel_url.query
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query.get("offset", -1))
        return _json(self.process.queue.get_history(max_items=max_items, offset=offset))

    async def get_history_item(self, request: web.Request) -> web.Response:
        return _json(self.process.queue.get_history(prompt_id=request.match_info["prompt_id"]))

    async def post_history(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("clear"):
            self.process.queue.wipe_history()
        for prompt_id in json_data.get("delete", []):
            self.process.queue.delete_history(prompt_id)
        return web.Response(status=200)

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.process.queue.current()
        return _json({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        json_data = await request.json()
        if json_data.get("clear"):
            self.process.queue.wipe()
        for prompt_id in json_data.get("delete", []):
            self.process.queue.delete(prompt_id)
        return web.Response(status=200)

    async def interrupt(self, request: web.Request) -> web.Response:
        try:
            json_data = await request.json()
        except ValueError:
            json_data = {}
        if isinstance(json_data, dict) and "prompt_id" in json_data:
            # Only the running prompt with that id; anything else is logged and ignored.
            if json_data["prompt_id"] in self.process.queue.running_ids():
                self.process.executor.interrupt_flag = True
        else:
            self.process.executor.interrupt_flag = True
        return web.Response(status=200)

    async def free(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    # -- websocket ----------------------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        hub = self.process.hub
        sid = request.rel_url.query.get("clientId", "")
        if sid:
            hub.sockets.pop(sid, None)  # reusing a session: the old socket stops getting messages
        else:
            sid = uuid.uuid4().hex
        hub.sockets[sid] = ws
        try:
            hub.send_sync("status", {"status": self.process.queue_info(), "sid": sid}, sid)
            executor = self.process.executor
            if executor.client_id == sid and executor.last_node_id is not None:
                hub.send_sync("executing", {"node": executor.last_node_id}, sid)
            async for _ in ws:
                pass  # ComfyUI reads client messages (feature flags) and otherwise ignores them
        finally:
            # As in ComfyUI, by id: an old socket closing late also unregisters its replacement.
            hub.sockets.pop(sid, None)
        return ws
