"""Simulated Gonka network node ("dapi") and chain, as gonka-protocol.md describes them.

Start in-process with :func:`start_dapi` or as a process with ``python -m sim dapi [--public-port P]
[--admin-port A] [--callback-port C] [--callback-base URL] [--poc-v2]``. Three ports:

* public (``hybrid_common.port("sim.dapi.public")``): ``GET /v1/epochs/latest``; chain REST
  ``/chain-api/productscience/inference/inference/{epoch_info,params,mlnode_version,
  active_confirmation_poc_event}``; Tendermint ``GET /chain-rpc/status``; and the ``/_sim/`` routes below.
* admin (``sim.dapi.admin``): ``/admin/v1/nodes`` (POST upsert, POST batch, PUT, GET, DELETE,
  ``/{id}/enable``, ``/{id}/disable``) and ``GET /admin/v1/config`` (``api.poc_callback_url``).
* callback (``sim.dapi.callback``): ``/v1/poc-batches/generated|validated`` (+ ``/mlnode/v1/...``),
  ``/v2/poc-batches[/<model id>]/generated|validated``.

Simulator routes (public port, JSON in and out; errors are ``{"error": ...}``):

``GET /_sim/params``
    Every live parameter: ``epoch_params`` (epoch_length, poc_stage_duration, poc_exchange_duration,
    poc_validation_delay, poc_validation_duration, set_new_validators_delay, inference_validation_cutoff,
    confirmation_poc_safety_window, epoch_shift, ...), ``block_seconds``, ``poc_v2_enabled``,
    ``mlnode_version``, ``epoch_model``, ``poc_model``, ``governance_models``, ``callback_base``,
    ``v2_callback_model_path``, ``node_sync_seconds`` / ``status_poll_seconds`` /
    ``inference_interval_seconds`` (real seconds, scaled by the profile), ``validation_rate``,
    ``confirmation_poc_enabled``, ``expected_confirmations_per_epoch``, ``alpha_threshold``, ...
``POST /_sim/params``  body: any subset, flat or epoch ones under ``epoch_params``
    → ``{"changed": [...], "params": {...}}``; 400 on an unknown name or a bad value (nothing changes).
    ``{"callback_base": "http://relay:9300"}`` points the MLNodes at a relay from the next PoC command.
``GET /_sim/report``
    Per epoch: nodes (id, node_num, registered_at_height, admin_epoch, status_history incl. FAILED,
    batches accepted/duplicate/out_of_window/rejected, weight), total weight, inference ok/failed,
    confirmation PoC events — schema in :mod:`sim.network.report`.
``GET /_sim/batches[?epoch=N&node_id=ID&kind=generated|validated]``
    Every callback received: arrival height, chain height, stage, node, nonces, status, reason.
``GET /_sim/clock``, ``POST /_sim/clock/pause``, ``POST /_sim/clock/resume``
    Pausing freezes block production (the dapi "stops seeing blocks"); resuming continues from there.
``POST /_sim/clock/jump``  body ``{"height": H}`` or ``{"blocks": n}``
    Moves the clock forward; every skipped height is still processed, in order.
``POST /_sim/callback/stop``, ``POST /_sim/callback/start``
    The callback server goes dark (connections reset, port kept) and comes back: "the dapi is down".
``POST /_sim/confirmation-poc``
    Fires a confirmation PoC at the next Inference-phase block (409 if one is active). Random
    events are off by default; ``{"confirmation_poc_enabled": true}`` turns them on (seeded).
``POST /_sim/inference``  body ``{"node_id"?, "stream"?, "validate"?, "body"?}``
    One inference routed like the dapi does (body rewrites, response checks, optional validation with
    ``enforced_tokens``); returns what happened. Background traffic runs every
    ``inference_interval_seconds`` (real seconds; 0 turns it off).
"""

from sim.network.dapi import Dapi, RunningDapi, start_dapi
from sim.network.params import DEFAULT_EPOCH_MODEL, DEFAULT_POC_MODEL

__all__ = ["DEFAULT_EPOCH_MODEL", "DEFAULT_POC_MODEL", "Dapi", "RunningDapi", "start_dapi"]
