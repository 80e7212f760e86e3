"""hybrid_proxy — the participant's node front on the VPS (``python -m hybrid_proxy``).

- :mod:`hybrid_proxy.node`: the inference-only ML node the dapi trusts (issue #9) — OpenAI-compatible passthrough
  to the upstream provider and the MLNode control surface of a node without a GPU, self-registered in the dapi.
- :mod:`hybrid_proxy.front`: the gateways of the rented GPU slots (one port pair per slot, version prefix stripped).
- :mod:`hybrid_proxy.service`: both wired to the bus and Redis, plus metrics, status and heartbeat.
- :mod:`hybrid_proxy.settings`: the environment it reads (``PROXY_*`` on top of the common settings).
"""
