"""The Vast.ai simulator: the REST API of /work/shared/reference/vastai-api.md, quirks included.

Start it in-process::

    from sim.vast import start_vast
    vast = await start_vast(port=0, api_key="test", seed=0, profile=TEST, boot_scale=0.1)
    ... vast.url ...
    await vast.close()

or as a process: ``python -m sim vast --port P [--seed N] [--api-key K] [--boot-scale X]``.

Public API (``Authorization: Bearer <key>``): ``POST /api/v0/bundles/``, ``PUT /api/v0/search/asks/``,
``PUT /api/v0/asks/{offer}/``, ``GET|PUT|DELETE /api/v0/instances/{id}/``, ``GET /api/v1/instances/``,
``GET /api/v0/instances/`` (410), ``PUT /api/v0/instances/reboot/{id}/``,
``PUT /api/v0/instances/request_logs/{id}/`` (→ ``result_url`` at ``/instance_logs/<token>.log``),
``POST /api/v0/instances/{id}/ssh/``, ``GET|POST /api/v0/ssh/``, ``GET /api/v0/users/current``,
``GET /api/v0/gpu_names/unique/``, ``GET /api/v0/gpu_types/``, ``GET /api/v0/instances/filters/``.

Test control (no auth):

- ``GET /_sim/health``
- ``GET /_sim/ledger`` — every instance ever created: label, status history, wall and billed seconds
  (billed = wall × the profile's acceleration), cost; ``spent`` and ``instances_live`` totals.
- ``GET|POST|DELETE /_sim/faults``, ``DELETE /_sim/faults/{id}`` — see :mod:`sim.vast.faults`.
- ``GET|POST /_sim/config`` — ``boot_scale``, ``start_gpu_taken_probability``, ``credit``, ``rate_limits``,
  ``rate_limit_overrides`` (real-world seconds per endpoint: create, destroy, show, list, manage; 0 = none).
- ``GET /_sim/instances/{id}`` — internals: container port → host port map, SSH port, logs, environment.
- ``GET|POST /_sim/offers/{id}`` — ``{"rented_elsewhere": true}`` lets another client take that machine.

Simulated instances bind every container port on a random 127.0.0.1 port; ``-p`` ports show in ``ports``
(``HostPort`` a string) once running; ssh runtypes get an SSH server (user ``root``) on ``ssh_host:ssh_port``.
"""

from sim.vast.faults import KINDS as FAULT_KINDS
from sim.vast.faults import Fault
from sim.vast.server import RunningVast, start_vast
from sim.vast.world import VastSettings, VastWorld

__all__ = ["FAULT_KINDS", "Fault", "RunningVast", "VastSettings", "VastWorld", "start_vast"]
