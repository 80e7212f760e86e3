"""What the dapi's public port (8000, behind its nginx) shows: the dapi's own ``/v1/epochs/latest``,
the chain's REST under ``/chain-api/`` and Tendermint RPC under ``/chain-rpc/`` (gonka-protocol.md §5).

The two renderings differ on purpose (see :mod:`sim.network.wire_format`): the dapi's JSON drops zero
fields of protobuf types and prints int64 as numbers; the chain REST prints everything, int64 as strings.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from sim.network.wire_format import int64_strings, omit_empty, proto_decimal, rest_decimal

if TYPE_CHECKING:
    from sim.network.dapi import Dapi

REST = "/chain-api/productscience/inference/inference"
CHAIN_ID = "gonka-sim"


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def rfc3339_nano(unix: float) -> str:
    t = dt.datetime.fromtimestamp(unix, dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class PublicRoutes:
    def __init__(self, dapi: Dapi) -> None:
        self.dapi = dapi

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v1/epochs/{epoch}", self.epoch)
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
                "effective_epoch_index": str(
                    chain.latest.index if h >= ctx.set_new_validators() else max(0, chain.latest.index - 1)
                ),
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
