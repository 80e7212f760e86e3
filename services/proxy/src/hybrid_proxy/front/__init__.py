"""The node front for rented GPUs (design: "Why a node front", "Reaching a GPU").

The dapi calls every node at ``http://{host}:{port}/{version}/api/v1/...`` and the MLNode image does not strip the
version (gonka-protocol.md §1); a GPU rented on Vast.ai has no nginx in front and may be reachable only through SSH.
So the provisioner registers each GPU slot in the dapi with *this machine's* address and the slot's two gateway
ports, and the front forwards them to wherever the slot's GPU is now:

- **Gateway listeners.** Per slot a pair (PoC/API port → container 8080, inference port → container 5000) on the
  ports the provisioner allocated (Redis ``gateway:ports``; also carried by ``instance.reachable``). They stay open for
  the slot's life: a replaced GPU is the same slot, same ports, so the dapi's node id and ``node_num`` stay
  (gonka-protocol.md §3). While no GPU answers, they answer ``503`` with a JSON reason at once — never a hang. When the
  provisioner returns the pair to the pool (the slot's last job ended, its node deleted) the next scan closes them; a
  pair already handed to a new slot is taken from the old one at once.
- **Routes** come from ``instance.reachable`` / ``instance.destroyed`` / ``instance.failed`` (queue ``proxy.front``).
  Direct: ``public_ip`` (stripped) + the mapped host port (vastai-api.md: never ``ssh_host`` for HTTP). Tunnel: an
  asyncssh local forward over ``ssh_host:ssh_port`` as ``root`` with ``SSH_KEY_PATH``. A direct route whose address
  stays silent for ``FRONT_DIRECT_FALLBACK_AFTER`` seconds is tried through SSH and switched when only that works.
  Each route is probed (``GET /api/v1/state``) every ``FRONT_PROBE_INTERVAL``: ``state`` is ``up`` when the GPU
  answers through the front, ``connecting`` before it first did, ``down`` after. Redis ``front:routes`` holds them
  (the proxy node reads it for validation requests, the CLI for status) and a restarted front restores from it.
- **Callbacks through the tunnel.** A GPU reached only through SSH usually cannot reach the relay's public URL
  either. For tunnel routes (``FRONT_CALLBACK_TUNNEL``, on by default, needs ``RELAY_PUBLIC_URL``) the tunnel also
  holds a remote forward: the GPU's ``localhost:<R>`` → the relay as this machine reaches it (``FRONT_RELAY_LOCAL_URL``,
  default ``RELAY_PUBLIC_URL``; plain HTTP). ``R`` is the relay URL's port when free on the GPU, else a random high
  port, and stays the same across re-opened tunnels. How the URL lines up: the dapi hands every MLNode one callback
  base (``DAPI_API__POC_CALLBACK_URL`` = the relay's public URL, gonka-protocol.md §2) inside the ``url`` field of the
  PoC commands (``pow/init/*``, ``inference/pow/init/generate``, ``inference/pow/generate``). On those few small
  bodies — and only for tunnel routes — the front replaces the relay's origin ``scheme://host:port`` by
  ``http://127.0.0.1:R`` as bytes (no JSON parsing), keeping the path, so the MLNode posts to its own localhost and the
  batch arrives at the relay through SSH. Every other body is streamed untouched.
- **Tunnels** are kept per instance (Redis ``tunnels``), health-checked by SSH keepalives and a close watcher,
  re-opened with capped backoff on the same local/remote ports, and closed when the instance goes. Lifecycle events:
  ``tunnel.opened`` / ``tunnel.closed`` / ``tunnel.failed``. Commands ``tunnel.open`` (an extra local forward to a
  container port of a known instance), ``tunnel.close`` and the query ``tunnel.list`` come on ``proxy.commands``.

Use: ``NodeFront(settings, redis, connection, topology)``; ``await front.start()`` / ``await front.stop()`` /
``front.status()``. Alone: ``python -m hybrid_proxy.front``.
"""

from hybrid_proxy.front.forwarding import strip_version
from hybrid_proxy.front.node_front import NodeFront
from hybrid_proxy.front.routes import Route
from hybrid_proxy.front.settings import FrontSettings

__all__ = ["FrontSettings", "NodeFront", "Route", "strip_version"]
