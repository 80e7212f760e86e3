"""What the dapi's public port (8000, behind its nginx) shows: the dapi's own ``/v1/epochs/latest`` and
``/v1/epochs/{epoch|current}/participants``, the chain's REST under ``/chain-api/`` and Tendermint RPC under
``/chain-rpc/`` (gonka-protocol.md §5).

The two renderings differ on purpose (see :mod:`sim.network.wire_format`): the dapi's JSON drops zero
fields of protobuf types and prints int64 as numbers; the chain REST prints everything, int64 as strings.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sim.network.chain import EpochRecord
from sim.network.epochs import EpochContext
from sim.network.wire_format import int64_strings, omit_empty, proto_decimal, rest_decimal

if TYPE_CHECKING:
    from sim.network.dapi import Dapi

REST = "/chain-api/productscience/inference/inference"
CHAIN_ID = "gonka-sim"

# The simulated participant's account address: bech32("gonka", ripemd160(sha256(pubkey))) of the account key the admin
# API's /admin/v1/config shows (NetworkParams.participant_public_key, "02" + "5a" * 32). The operator knows it (it is
# ``inferenced keys show <KEY_NAME> -a``); the scheduler's GONKA_PARTICIPANT_ADDRESS defaults to it in MODE=sim.
SIM_PARTICIPANT_ADDRESS = "gonka16egtfj93fd349hqu9xj9l9cmd52sjpezhtqwre"
# Two other participants of the simulated network (addresses of the keys "03" + "a1" * 32 and "03" + "b2" * 32), so
# a client has to pick its own participant out of the list rather than take the first one.
SIM_PEERS = ("gonka1keplur8gsfau8aatgjaqlyxr3fy5kc33dgzjzq", "gonka13th5wqqae6keru6c7qptmttqwmzg9x20w4hw5l")
NO_PARTICIPANTS = "No active participants found for the specified epoch. Looks like PoC failed!"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _echo_error(status: int, message: str) -> web.Response:
    """An ``echo.NewHTTPError`` as the dapi's echo server renders it."""
    return _json({"message": message}, status)


def rfc3339_nano(unix: float) -> str:
    t = dt.datetime.fromtimestamp(unix, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class PublicRoutes:
    def __init__(self, dapi: Dapi) -> None:
        self.dapi = dapi

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/epochs/{epoch}", self.epoch)
        r.add_get("/v1/epochs/{epoch}/participants", self.participants)
        r.add_get(f"{REST}/epoch_info", self.rest_epoch_info)
        r.add_get(f"{REST}/params", self.rest_params)
        r.add_get(f"{REST}/mlnode_version", self.rest_mlnode_version)
        r.add_get(f"{REST}/active_confirmation_poc_event", self.rest_confirmation)
        r.add_get("/chain-rpc/status", self.rpc_status)

    # --- shared pieces ---------------------------------------------------------------------

    def _epoch_params_proto(self) -> dict[str, Any]:
        p = self.dapi.params.epoch
        return {
            "epoch_length": p.epoch_length,
            "epoch_multiplier": p.epoch_multiplier,
            "epoch_shift": p.epoch_shift,
            "default_unit_of_compute_price": p.default_unit_of_compute_price,
            "poc_stage_duration": p.poc_stage_duration,
            "poc_exchange_duration": p.poc_exchange_duration,
            "poc_validation_delay": p.poc_validation_delay,
            "poc_validation_duration": p.poc_validation_duration,
            "set_new_validators_delay": p.set_new_validators_delay,
            "inference_validation_cutoff": p.inference_validation_cutoff,
            "inference_pruning_epoch_threshold": p.inference_pruning_epoch_threshold,
            "inference_pruning_max": p.inference_pruning_max,
            "poc_pruning_max": p.poc_pruning_max,
            "poc_slot_allocation": proto_decimal(0.5),
            "confirmation_poc_safety_window": p.confirmation_poc_safety_window,
        }

    def _latest_epoch(self) -> dict[str, Any]:
        latest = self.dapi.chain.latest
        return {"index": latest.index, "poc_start_block_height": latest.poc_start}

    def _effective_epoch(self) -> int:
        """The epoch whose validators are active: the latest one from its ``set_new_validators`` on."""
        chain = self.dapi.chain
        if chain.height >= chain.context().set_new_validators():
            return chain.latest.index
        return max(0, chain.latest.index - 1)

    # --- dapi ------------------------------------------------------------------------------

    async def epoch(self, request: web.Request) -> web.Response:
        if request.match_info["epoch"] != "latest":
            return _json({"error": "Only getting info for current epoch is supported at the moment"}, 400)
        chain = self.dapi.chain
        ctx = chain.context()
        h = chain.height
        params_proto = omit_empty(self._epoch_params_proto())
        event = chain.active_event
        body: dict[str, Any] = {
            "block_height": h,
            "latest_epoch": self._latest_epoch(),
            "phase": ctx.phase(h),
            "epoch_stages": ctx.stages(),
            "next_epoch_stages": ctx.next().stages(),
            "epoch_params": params_proto,
            "is_confirmation_poc_active": event is not None,
        }
        if event is not None:
            body["active_confirmation_poc_event"] = omit_empty(event.as_proto(self.dapi.params.epoch))
        return _json(body)

    async def participants(self, request: web.Request) -> web.Response:
        """``GET /v1/epochs/{epoch}/participants``: the epoch's active participants with their weight.

        The dapi's handler (decentralized-api ``getParticipantsByEpoch``): ``current`` is the chain's effective epoch;
        epoch 0 is refused; the ``ActiveParticipants`` record is stored by the chain at ``set_new_validators`` from the
        weights fixed at the end of PoC validation (gonka-protocol.md §3), so before that block, or for an epoch whose
        PoC gave nobody weight, the answer is 404. Go's ``encoding/json`` of the gogoproto types: zero fields vanish,
        int64 are numbers. There is no Merkle proof here (``proof_ops`` and ``block`` are null) and
        ``active_participants_bytes`` is the hex of the record's JSON, not of its protobuf.
        """
        raw = request.match_info["epoch"]
        if raw == "current":
            epoch = self._effective_epoch()
        elif raw.isascii() and raw.isdigit():
            epoch = int(raw)
        else:
            return _echo_error(400, "Invalid epoch id")
        if epoch == 0:
            return _echo_error(400, "Epoch enumeration starts with 1")
        record = next((r for r in self.dapi.chain.epochs if r.index == epoch), None)
        if record is None or record.weights_fixed_at is None:
            return _echo_error(404, NO_PARTICIPANTS)
        created = EpochContext(index=record.index, poc_start=record.poc_start, params=self.dapi.params.epoch)
        created_at = created.set_new_validators()
        if self.dapi.chain.height < created_at:
            return _echo_error(404, NO_PARTICIPANTS)
        members = self._members(record)
        active = omit_empty(
            {
                "participants": [self._participant(record, *m) for m in members],
                "epoch_group_id": record.index,
                "poc_start_block_height": record.poc_start,
                "effective_block_height": created_at,
                "created_at_block_height": created_at,
                "epoch_id": record.index,
            }
        )
        keys = [_validator_key(address) for address, _, _ in members]
        return _json(
            {
                "active_participants": active,
                "addresses": [_consensus_address(k) for k in keys],
                "active_participants_bytes": orjson.dumps(active).hex(),
                "proof_ops": None,
                "validators": [
                    {"address": _consensus_address(k), "pub_key": k, "voting_power": w, "proposer_priority": 0}
                    for k, (_, w, _) in zip(keys, members, strict=True)
                ],
                "block": None,
            }
        )

    def _members(self, record: EpochRecord) -> list[tuple[str, int, dict[str, int]]]:
        """(address, weight, node id → PoC weight) of every participant with weight, sorted by address.

        This participant's weight is the record the report shows (``total_weight``, summed over the nodes that were in
        the chain's node list at the end of PoC validation); a participant that earned nothing is not active.
        """
        out: list[tuple[str, int, dict[str, int]]] = []
        if record.total_weight > 0:
            nodes = {
                node_id: int(rec.weight or 0)
                for node_id, rec in sorted(record.nodes.items())
                if node_id in record.chain_nodes_at_weights
            }
            out.append((SIM_PARTICIPANT_ADDRESS, record.total_weight, nodes))
        for i, address in enumerate(SIM_PEERS):
            digest = hashlib.sha256(f"{self.dapi.seed}:{record.index}:{address}".encode()).digest()
            weight = 1000 + int.from_bytes(digest[:2], "big") % 1000
            out.append((address, weight, {f"node{i + 1}": weight}))
        return sorted(out)

    def _participant(self, record: EpochRecord, address: str, weight: int, nodes: dict[str, int]) -> dict[str, Any]:
        p = self.dapi.params
        signature = hashlib.sha256(f"seed:{address}:{record.index}".encode()).hexdigest() * 2
        ours = address == SIM_PARTICIPANT_ADDRESS
        return omit_empty(
            {
                "index": address,
                "validator_key": _validator_key(address),
                "weight": weight,
                "inference_url": self.dapi.public_url if ours else f"http://{address[-8:]}.gonka-sim:8000",
                "models": [p.epoch_model],
                "seed": omit_empty({"participant": address, "epoch_index": record.index, "signature": signature}),
                "ml_nodes": [
                    {
                        "ml_nodes": [
                            omit_empty({"node_id": n, "poc_weight": w, "timeslot_allocation": [True, False]})
                            for n, w in nodes.items()
                        ]
                    }
                ],
            }
        )

    # --- chain REST --------------------------------------------------------------------------

    def _rest_params(self) -> dict[str, Any]:
        params = self.dapi.params
        epoch = self._epoch_params_proto()
        del epoch["poc_slot_allocation"]
        return {
            "epoch_params": int64_strings(epoch) | {"poc_slot_allocation": rest_decimal(0.5)},
            "validation_params": {
                "false_positive_rate": rest_decimal(0.05),
                "min_ramp_up_measurements": 10,
                "pass_value": rest_decimal(0.99),
                "expiration_blocks": "20",
                "timestamp_expiration": "60",
                "timestamp_advance": "30",
                "logprobs_mode": "processed_logprobs",
            },
            "poc_params": {
                "default_difficulty": 5,
                "validation_sample_size": 200,
                "poc_data_pruning_epoch_threshold": "1",
                "weight_scale_factor": rest_decimal(1),
                "model_params": None,
                "model_id": params.poc_model,
                "seq_len": str(params.poc_seq_len),
                "poc_v2_enabled": params.poc_v2_enabled,
                "confirmation_poc_v2_enabled": params.poc_v2_enabled,
                "stat_test": {
                    "dist_threshold": rest_decimal(0.4),
                    "p_mismatch": rest_decimal(0.1),
                    "p_value_threshold": rest_decimal(0.05),
                },
                "validation_slots": 0,
                "poc_normalization_enabled": False,
            },
            "confirmation_poc_params": {
                "expected_confirmations_per_epoch": str(params.expected_confirmations_per_epoch),
                "alpha_threshold": rest_decimal(params.alpha_threshold),
                "slash_fraction": rest_decimal(params.slash_fraction),
                "upgrade_protection_window": "500",
            },
        }

    def _rest_event(self) -> dict[str, Any] | None:
        event = self.dapi.chain.active_event
        if event is None:
            return None
        return int64_strings(event.as_proto(self.dapi.params.epoch), keep_numbers=frozenset({"phase"}))

    def _rest_stages(self, stages: dict[str, Any]) -> dict[str, Any]:
        return int64_strings(stages)

    async def rest_epoch_info(self, request: web.Request) -> web.Response:
        chain = self.dapi.chain
        ctx = chain.context()
        h = chain.height
        event = self._rest_event()
        return _json(
            {
                "block_height": str(h),
                "params": self._rest_params(),
                "latest_epoch": int64_strings(self._latest_epoch()),
                "is_confirmation_poc_active": event is not None,
                "active_confirmation_poc_event": event,
                "phase": ctx.phase(h),
                "epoch_stages": self._rest_stages(ctx.stages()),
                "next_epoch_stages": self._rest_stages(ctx.next().stages()),
                "effective_epoch_index": str(self._effective_epoch()),
            }
        )

    async def rest_params(self, request: web.Request) -> web.Response:
        return _json({"params": self._rest_params()})

    async def rest_mlnode_version(self, request: web.Request) -> web.Response:
        return _json({"mlnode_version": {"current_version": self.dapi.params.mlnode_version}})

    async def rest_confirmation(self, request: web.Request) -> web.Response:
        event = self._rest_event()
        return _json({"is_active": event is not None, "event": event})

    # --- Tendermint RPC ----------------------------------------------------------------------

    async def rpc_status(self, request: web.Request) -> web.Response:
        chain = self.dapi.chain
        h = chain.height
        return _json(
            {
                "jsonrpc": "2.0",
                "id": -1,
                "result": {
                    "node_info": {
                        "protocol_version": {"p2p": "8", "block": "11", "app": "0"},
                        "network": CHAIN_ID,
                        "version": "0.38.17",
                        "moniker": "gonka-sim",
                    },
                    "sync_info": {
                        "latest_block_hash": chain.block_hash(h),
                        "latest_app_hash": chain.block_hash(-h),
                        "latest_block_height": str(h),
                        "latest_block_time": rfc3339_nano(chain.last_block_time),
                        "earliest_block_height": "1",
                        "catching_up": False,
                    },
                    "validator_info": {"address": chain.block_hash(0)[:40], "voting_power": "0"},
                },
            }
        )


def _validator_key(address: str) -> str:
    """A participant's consensus key (ed25519, base64), fixed per address."""
    return base64.b64encode(hashlib.sha256(f"validator:{address}".encode()).digest()).decode()


def _consensus_address(validator_key: str) -> str:
    """CometBFT's address of an ed25519 key: the first 20 bytes of its SHA-256, upper-case hex (tmhash)."""
    return hashlib.sha256(base64.b64decode(validator_key)).digest()[:20].hex().upper()
