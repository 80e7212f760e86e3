"""Weight earned per epoch: what the chain gave this participant, recorded in the epoch's PoC campaign.

The chain fixes weights in the block where PoC validation ends and stores the epoch's ``ActiveParticipants`` at its
``set_new_validators`` (gonka-protocol.md §3, §5); the dapi's public ``/v1/epochs/{epoch}/participants`` serves that
record. Once the observed height passes the epoch's ``set_new_validators``, the leader reads it and writes our
participant's weight (by account address, ``GONKA_PARTICIPANT_ADDRESS``) and the PoC weight of each of our slots into
the PoC campaign, so ``scheduler:epochs`` — and ``hybridctl status`` — show the weight earned next to what it cost.

A participant missing from the list earned nothing that epoch (the chain lists only participants with weight): 0.
No record yet (404) or an unreadable answer is retried every ``weight_retry_seconds`` until the epoch after next
begins; after that the weight stays unknown rather than guessed.
"""

from __future__ import annotations

import functools
import logging

from hybrid_common.messages.domain import Purpose
from hybrid_scheduler import telemetry
from hybrid_scheduler.book import Campaign, EpochBook
from hybrid_scheduler.chain import ChainClient, ChainUnavailable, ChainView, EpochParticipants
from hybrid_scheduler.window import InvalidChainData

log = logging.getLogger("hybrid.scheduler.weights")


class EpochWeights:
    def __init__(self, client: ChainClient, book: EpochBook, address: str | None, retry_seconds: float) -> None:
        self.client = client
        self.book = book
        self.address = address
        self.retry_seconds = retry_seconds
        self._tried: dict[str, float] = {}

    def due(self, campaign: Campaign, view: ChainView, now: float) -> bool:
        """A PoC campaign whose epoch's participants should be on chain and whose weight is not recorded yet."""
        if campaign.purpose is not Purpose.POC or campaign.weight is not None:
            return False
        if campaign.epoch_index is None or campaign.window is None:
            return False
        if view.epoch_index not in (campaign.epoch_index, campaign.epoch_index + 1):
            return False  # too early, or given up: the epoch after next has begun
        if view.block_height < campaign.window.set_new_validators:
            return False
        return now - self._tried.get(campaign.key, float("-inf")) >= self.retry_seconds

    async def record(self, view: ChainView, campaigns: dict[str, Campaign], token: int, now: float) -> None:
        """Read and record the weight of every campaign that is due (the leader's tick; fenced writes)."""
        if self.address is None:
            return
        for campaign in sorted(campaigns.values(), key=lambda c: c.epoch_index or 0):
            if not self.due(campaign, view, now):
                continue
            self._tried[campaign.key] = now
            assert campaign.epoch_index is not None
            try:
                answer = await self.client.participants(campaign.epoch_index)
            except (ChainUnavailable, InvalidChainData) as exc:
                log.warning("epoch %d: cannot read its participants (retrying): %s", campaign.epoch_index, exc)
                continue
            if answer is None:
                log.info("epoch %d: no participants on chain yet", campaign.epoch_index)
                continue
            result = await self.book.update(campaign.key, functools.partial(self._write, answer=answer), fence=token)
            if result is not None:
                campaigns[campaign.key] = result[0]

    def _write(self, c: Campaign, answer: EpochParticipants) -> None:
        if c.weight is not None:
            return
        assert self.address is not None
        listed = self.address in answer.weights
        weight = answer.weights.get(self.address, 0)
        nodes = answer.node_weights.get(self.address, {})
        c.weight = float(weight)
        c.weight_height = answer.created_at_height
        c.node_weights = {slot: w for slot, w in sorted(nodes.items()) if slot in c.candidates}
        ours = sum(c.node_weights.values())
        c.note(
            f"weight {weight} for epoch {c.epoch_index} (our slots {ours})"
            if listed
            else f"weight 0 for epoch {c.epoch_index}: {self.address} is not among its active participants"
        )
        telemetry.EPOCH_WEIGHT.set(weight)
        log.info("epoch %s: weight %d recorded (our slots %d)", c.epoch_index, weight, ours)
