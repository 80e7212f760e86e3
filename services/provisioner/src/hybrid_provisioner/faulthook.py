"""A **test-only** fault hook: the process SIGKILLs itself the first time a job reaches a named point.

``PROVISIONER_TEST_DIE_AT=creating,created,loading`` names the points (see :data:`POINTS`); with
``PROVISIONER_TEST_DIE_DIR=<dir>`` "first time" is across every replica on the machine (an ``O_EXCL`` marker file
per point), so exactly one replica dies per point however many run. Without it, the first time in this process.
Never set in production: it exists so a test can kill the replica holding a job at each lifecycle state
deterministically, without sleeps.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Final

log = logging.getLogger("hybrid.provisioner.faulthook")

POINTS: Final = (
    "accepted",  # the driver took the job
    "offer",  # an offer is chosen, nothing recorded yet
    "creating",  # the create intent is recorded, the create not sent
    "created",  # the create answered, its instance id not recorded yet
    "loading",  # the instance id is recorded
    "running",  # the instance runs
    "reachable",  # its addresses are known
    "service_up",  # the workload answered
    "ready",  # the front answers for the slot
    "registering",  # the dapi upsert is sent, not recorded
    "registered",  # the slot is registered
    "releasing",  # a release is recorded
    "deregistered",  # the node is out of the dapi, the instance not destroyed
    "destroying",  # the destroy is sent, not recorded
    "released",  # the job is done
)


class FaultHook:
    def __init__(self, spec: str, once_dir: str | None) -> None:
        self.points = {p.strip() for p in spec.split(",") if p.strip()}
        unknown = self.points - set(POINTS)
        if unknown:
            raise ValueError(f"PROVISIONER_TEST_DIE_AT: unknown points {sorted(unknown)}; known: {', '.join(POINTS)}")
        self.once_dir = Path(once_dir) if once_dir else None
        self._fired: set[str] = set()

    def __call__(self, point: str) -> None:
        if point not in self.points or point in self._fired:
            return
        self._fired.add(point)
        if self.once_dir is not None:
            try:
                fd = os.open(self.once_dir / point, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # another replica already died here
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        log.warning("test fault hook: dying at %s (pid %d)", point, os.getpid())
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
