"""The commands the scheduler sends to the provisioner (``provision``, ``start``, ``release``).

Every ``provision`` and ``release`` carries an idempotency key derived from the slot id alone (slot ids are unique per
campaign and candidate), so a restarted scheduler, a standby taking over, or a re-sent outbox entry produces the
same key and the provisioner applies it once: no double rental.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hybrid_common.bus import Publisher
from hybrid_common.messages.commands import Provision, Release, StartStandby
from hybrid_common.messages.domain import OfferFilter
from hybrid_scheduler.book import Campaign, CandidateRecord


def provision_key(cand: CandidateRecord) -> str:
    return f"{cand.slot_id}:provision"


def release_key(cand: CandidateRecord) -> str:
    return f"{cand.slot_id}:release"


def _correlation(campaign: Campaign) -> str:
    return f"epoch-{campaign.epoch_index}" if campaign.epoch_index is not None else campaign.key


class ProvisionerCommands:
    def __init__(
        self,
        publisher: Publisher,
        *,
        min_inet_down_mbps: float | None = None,
        images: dict[str, str | None] | None = None,
        deadline: float = 10.0,
    ) -> None:
        self.publisher = publisher
        self.min_inet_down_mbps = min_inet_down_mbps
        self.images = images or {}
        self.deadline = deadline  # how long a publish may wait through a broker outage before the outbox retries

    async def provision(self, campaign: Campaign, cand: CandidateRecord, *, start_stopped: bool, hedge: bool) -> None:
        assert campaign.profile is not None
        window = campaign.window
        deadline_at = campaign.deadline_at
        await self.publisher.publish(
            Provision(
                idempotency_key=provision_key(cand),
                profile=campaign.profile,
                slot_ids=[cand.slot_id],
                purpose=campaign.purpose,
                epoch_index=campaign.epoch_index,
                deadline=datetime.fromtimestamp(deadline_at, UTC) if deadline_at is not None else None,
                deadline_height=window.poc_start if window is not None else None,
                register_node=True,
                hedge=hedge,
                start_stopped=start_stopped,
                offer_filter=OfferFilter(min_inet_down_mbps=self.min_inet_down_mbps)
                if self.min_inet_down_mbps
                else None,
                image=self.images.get(campaign.generation or ""),
            ),
            correlation_id=_correlation(campaign),
            deadline=self.deadline,
        )

    async def start(self, campaign: Campaign, cand: CandidateRecord, reason: str) -> None:
        await self.publisher.publish(
            StartStandby(slot_ids=[cand.slot_id], reason=reason[:200]),
            correlation_id=_correlation(campaign),
            deadline=self.deadline,
        )

    async def release(self, campaign: Campaign, cand: CandidateRecord, *, how: str, reason: str) -> None:
        await self.publisher.publish(
            Release(
                idempotency_key=release_key(cand),
                slot_ids=[cand.slot_id],
                epoch_index=campaign.epoch_index,
                how=how,
                reason=reason[:200],
            ),
            correlation_id=_correlation(campaign),
            deadline=self.deadline,
        )
