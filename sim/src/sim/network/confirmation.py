"""Confirmation PoC events (gonka-protocol.md §8) — off unless ``confirmation_poc_enabled``.

Each block of the Inference phase of an epoch > 1, with no event active, fires with probability
``expected_confirmations_per_epoch / window length`` inside ``[set_new_validators, next_poc_start −
cutoff − (stage + exchange + validation delay + validation + set-new-validators delay + safety)]``;
the draw is a pure function of (seed, epoch, height), so a run is reproducible. ``POST
/_sim/confirmation-poc`` fires one at the next block regardless. Timeline from trigger T: generation
starts at G = T + max(inference_validation_cutoff, 1), phases GRACE_PERIOD → GENERATION → VALIDATION →
COMPLETED. At completion the confirmation weight is compared with the epoch's weight: ratio =
min(confirmed / expected / 0.909, 1); below ``alpha_threshold`` the participant would be INACTIVE.

An event belongs to the epoch it was triggered in. The random window ends well before the next PoC, but a
manual one fired late runs on into the next epoch: its batches still count for it inside its own window,
and it is completed and reported under its own epoch, measured against that epoch's weight.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sim.network.chain import Chain
from sim.network.epochs import CPOC_COMPLETED, CPOC_GRACE_PERIOD, INFERENCE, ConfirmationEvent, EpochContext
from sim.network.params import NetworkParams

RATIO_NORMALISER = 0.909


class ConfirmationPoC:
    def __init__(self, chain: Chain, params: NetworkParams, seed: int) -> None:
        self.chain = chain
        self.params = params
        self.seed = seed

    def window(self, ctx: EpochContext) -> tuple[int, int]:
        p = ctx.params
        tail = (
            p.inference_validation_cutoff
            + p.poc_stage_duration
            + p.poc_exchange_duration
            + p.poc_validation_delay
            + p.poc_validation_duration
            + p.set_new_validators_delay
            + p.confirmation_poc_safety_window
        )
        return ctx.set_new_validators(), ctx.next_poc_start() - tail

    def _draw(self, epoch: int, height: int) -> float:
        digest = hashlib.blake2b(f"cpoc:{self.seed}:{epoch}:{height}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    def _fires(self, height: int, ctx: EpochContext) -> bool:
        if not self.params.confirmation_poc_enabled or ctx.index <= 1 or ctx.phase(height) != INFERENCE:
            return False
        lo, hi = self.window(ctx)
        if not lo <= height <= hi:
            return False
        probability = self.params.expected_confirmations_per_epoch / max(1, hi - lo + 1)
        return self._draw(ctx.index, height) < probability

    def on_block(self, height: int, ctx: EpochContext) -> None:
        chain = self.chain
        event = chain.active_event
        if event is not None:
            phase = event.expected_phase(height, self.params.epoch)
            if phase != event.phase:
                event.phase = phase
                self._report(event)["phase"] = phase
            if phase == CPOC_COMPLETED:
                self._complete(event, height)
                chain.active_event = None
            return
        manual = chain.pending_confirmation_trigger and ctx.phase(height) == INFERENCE
        if manual or self._fires(height, ctx):
            chain.pending_confirmation_trigger = False
            self._start(height, ctx, "manual" if manual else "random")

    def _start(self, height: int, ctx: EpochContext, cause: str) -> None:
        chain = self.chain
        seq = chain.event_sequence.get(ctx.index, 0)
        chain.event_sequence[ctx.index] = seq + 1
        g = height + max(self.params.epoch.inference_validation_cutoff, 1)
        event = ConfirmationEvent(
            epoch_index=ctx.index,
            event_sequence=seq,
            trigger_height=height,
            generation_start_height=g,
            poc_seed_block_hash=chain.block_hash(g - 1),
            phase=CPOC_GRACE_PERIOD,
        )
        chain.active_event = event
        record = chain.record_of(event)
        record.nonces.setdefault(height, {})
        record.confirmation_events.append(
            {
                **event.as_proto(self.params.epoch),
                "cause": cause,
                "completed_at_height": None,
                "node_weights": {},
                "confirmation_weight": None,
                "expected_weight": None,
                "ratio": None,
                "outcome": "active",
            }
        )

    def _report(self, event: ConfirmationEvent) -> dict[str, Any]:
        # Under the epoch that triggered the event, not the latest one: an event triggered late in an epoch
        # runs on into the next (gonka-protocol.md §8 timeline) and is still that epoch's event.
        item: dict[str, Any]
        for item in reversed(self.chain.record_of(event).confirmation_events):
            if item["trigger_height"] == event.trigger_height:
                return item
        return {}

    def _complete(self, event: ConfirmationEvent, height: int) -> None:
        # The nonces stored for the event and the weight it is measured against are its own epoch's.
        record = self.chain.record_of(event)
        stored = record.nonces.get(event.trigger_height, {})
        per_node = {node_id: len(nonces) for node_id, nonces in sorted(stored.items())}
        confirmed = sum(per_node.values())
        expected = record.total_weight
        ratio = 1.0 if expected <= 0 else min(confirmed / expected / RATIO_NORMALISER, 1.0)
        inactive = ratio < self.params.alpha_threshold
        self._report(event).update(
            completed_at_height=height,
            node_weights=per_node,
            confirmation_weight=confirmed,
            expected_weight=expected,
            ratio=round(ratio, 6),
            outcome="inactive" if inactive else "passed",
            slashed_fraction=self.params.slash_fraction if inactive else 0.0,
        )
