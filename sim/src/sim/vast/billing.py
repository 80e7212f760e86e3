"""What an instance costs (vastai-api.md "Billing"): storage from creation, GPU from ``running``.

A stopped instance still bills storage; an instance nobody destroys bills forever. Wall seconds are what
elapsed here; *billed* seconds are world seconds (wall × the profile's acceleration), the clock Vast's
invoices would use in the simulated world.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BillingMeter:
    storage_dph: float  # $/h for the allocated disk
    gpu_dph: float  # $/h while the GPU is held (on-demand price, or the bid)
    opened_at: float
    closed_at: float | None = None
    gpu_since: float | None = None
    gpu_wall_done: float = 0.0

    def gpu_on(self, now: float) -> None:
        if self.gpu_since is None and self.closed_at is None:
            self.gpu_since = now

    def gpu_off(self, now: float) -> None:
        if self.gpu_since is not None:
            self.gpu_wall_done += max(0.0, now - self.gpu_since)
            self.gpu_since = None

    def close(self, now: float) -> None:
        self.gpu_off(now)
        if self.closed_at is None:
            self.closed_at = now

    @property
    def gpu_running(self) -> bool:
        return self.gpu_since is not None

    def storage_wall(self, now: float) -> float:
        end = self.closed_at if self.closed_at is not None else now
        return max(0.0, end - self.opened_at)

    def gpu_wall(self, now: float) -> float:
        running = max(0.0, now - self.gpu_since) if self.gpu_since is not None else 0.0
        return self.gpu_wall_done + running

    def cost(self, now: float, acceleration: float) -> tuple[float, float]:
        """(storage $, GPU $) so far, in world time."""
        storage = self.storage_wall(now) * acceleration / 3600.0 * self.storage_dph
        gpu = self.gpu_wall(now) * acceleration / 3600.0 * self.gpu_dph
        return storage, gpu
