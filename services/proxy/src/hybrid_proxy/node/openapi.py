"""The node's OpenAPI document (served at ``/openapi.json``), written by hand: aiohttp has no generator, and the
shapes here are the protocol's, not a framework's (gonka-protocol.md §1, §4, §7, §9; the OpenAI API).

Every path is also served under any ``/vX.Y.Z`` prefix (the dapi's ``mlnode_version``); the document lists the bare
paths once and says so. The property test of issue #9 generates requests from it.
"""

from __future__ import annotations

from typing import Any

_ERR = {"$ref": "#/components/schemas/OpenAIError"}
_DETAIL = {"$ref": "#/components/schemas/Detail"}


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"description": description or "OK", "content": {"application/json": {"schema": schema}}}


def _op(
    summary: str,
    responses: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    required: bool = True,
    tag: str,
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if body is not None:
        op["requestBody"] = {"required": required, "content": {"application/json": {"schema": body}}}
    return op


_OBJ: dict[str, Any] = {"type": "object"}
_OPENAI_FAILS = {
    "400": _json(_ERR, "the upstream refused the request (passed through)"),
    "403": _json(_ERR, "source address not allowed"),
    "413": _json(_ERR, "body over PROXY_MAX_REQUEST_BYTES"),
    "429": _json(_ERR, "upstream rate limit (passed through)"),
    "502": _json(_ERR, "upstream unreachable or broke off"),
    "503": _json(_ERR, "upstream overloaded, or (enforced_tokens) no validating GPU node"),
    "504": _json(_ERR, "upstream timed out"),
}

SCHEMAS: dict[str, Any] = {
    "OpenAIError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "Detail": {"type": "object", "properties": {"detail": {}}},
    "Message": {
        "type": "object",
        "required": ["role"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"type": ["string", "null"]},
        },
    },
    "ChatCompletionRequest": {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": {"$ref": "#/components/schemas/Message"}, "minItems": 1},
            "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "max_tokens": {"type": "integer", "minimum": 1},
            "seed": {"type": "integer"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "minimum": 0, "maximum": 1},
            "n": {"type": "integer", "minimum": 1, "maximum": 16},
            "stop": {"type": ["string", "array"]},
            "skip_special_tokens": {"type": "boolean", "description": "added by the dapi (gonka-protocol.md §4)"},
            "enforced_tokens": {
                "type": "object",
                "description": "validation: forwarded to a rented GPU node, never to the upstream; 503 when none",
                "properties": {"tokens": {"type": "array", "items": {"type": "object"}}},
            },
        },
    },
    "CompletionRequest": {
        "type": "object",
        "required": ["model", "prompt"],
        "properties": {
            "model": {"type": "string"},
            "prompt": {"type": ["string", "array"]},
            "stream": {"type": "boolean"},
            "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "max_tokens": {"type": "integer", "minimum": 1},
            "seed": {"type": "integer"},
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        },
    },
    "TokenizeRequest": {
        "type": "object",
        "required": ["prompt"],
        "properties": {"model": {"type": "string"}, "prompt": {"type": ["string", "array"]}},
    },
    "InferenceUp": {
        "type": "object",
        "required": ["model"],
        "properties": {
            "model": {"type": "string"},
            "dtype": {"type": "string"},
            "additional_args": {"type": ["array", "null"], "items": {"type": "string"}},
        },
    },
    "PowInitV1": {
        "type": "object",
        "properties": {
            "node_id": {"type": "integer"},
            "node_count": {"type": "integer"},
            "block_hash": {"type": "string"},
            "block_height": {"type": "integer"},
            "public_key": {"type": "string"},
            "batch_size": {"type": "integer"},
            "r_target": {"type": "number"},
            "fraud_threshold": {"type": "number"},
            "params": {"type": "object"},
            "url": {"type": "string"},
        },
    },
    "PocInitV2": {
        "type": "object",
        "properties": {
            "block_hash": {"type": "string"},
            "block_height": {"type": "integer"},
            "public_key": {"type": "string"},
            "node_id": {"type": "integer"},
            "node_count": {"type": "integer"},
            "batch_size": {"type": "integer"},
            "params": {"type": "object"},
            "url": {"type": "string"},
            "poc_stronger_rng": {"type": "boolean"},
        },
    },
}


def _paths() -> dict[str, Any]:
    ok = {"200": _json(_OBJ)}
    poc = {"200": _json(_OBJ, "accepted; nothing is produced (no GPU)"), "413": _json(_DETAIL)}
    return {
        "/v1/chat/completions": {
            "post": _op(
                "Chat completion, JSON or SSE, passed through from the upstream",
                {"200": _json(_OBJ, "the upstream's bytes (text/event-stream when stream=true)"), **_OPENAI_FAILS},
                body={"$ref": "#/components/schemas/ChatCompletionRequest"},
                tag="inference",
            )
        },
        "/v1/completions": {
            "post": _op(
                "Text completion, JSON or SSE, passed through from the upstream",
                {"200": _json(_OBJ), **_OPENAI_FAILS},
                body={"$ref": "#/components/schemas/CompletionRequest"},
                tag="inference",
            )
        },
        "/v1/models": {"get": _op("The model ids configured for the dapi", ok, tag="inference")},
        "/tokenize": {
            "post": _op(
                "Token count of a prompt",
                {"200": _json({"type": "object", "properties": {"count": {"type": "integer"}}}), "400": _json(_ERR)},
                body={"$ref": "#/components/schemas/TokenizeRequest"},
                tag="inference",
            )
        },
        "/health": {"get": _op("200 while the upstream answers, else 503", {**ok, "503": _json(_OBJ)}, tag="mlnode")},
        "/livez": {"get": _op("The process is alive", ok, tag="mlnode")},
        "/api/v1/state": {"get": _op("MLNode state (STOPPED | INFERENCE | POW) and 3.0.12 fields", ok, tag="mlnode")},
        "/api/v1/stop": {"post": _op("Stop: state STOPPED", ok, tag="mlnode")},
        "/api/v1/inference/up": {
            "post": _op(
                "Serve a model the upstream serves: state INFERENCE",
                {**ok, "400": _json(_DETAIL), "413": _json(_DETAIL), "422": _json(_DETAIL), "503": _json(_DETAIL)},
                body={"$ref": "#/components/schemas/InferenceUp"},
                tag="mlnode",
            )
        },
        "/api/v1/inference/down": {"post": _op("Stop serving: state STOPPED", ok, tag="mlnode")},
        "/api/v1/gpu/devices": {"get": _op("No GPU: an empty list", ok, tag="mlnode")},
        "/api/v1/pow/init/generate": {
            "post": _op(
                "PoC v1 init (answered, nothing produced)",
                poc,
                body={"$ref": "#/components/schemas/PowInitV1"},
                required=False,
                tag="poc",
            )
        },
        "/api/v1/pow/init/validate": {
            "post": _op(
                "PoC v1 validate init (answered, nothing produced)",
                poc,
                body={"$ref": "#/components/schemas/PowInitV1"},
                required=False,
                tag="poc",
            )
        },
        "/api/v1/pow/phase/generate": {"post": _op("PoC v1 phase switch", ok, tag="poc")},
        "/api/v1/pow/phase/validate": {"post": _op("PoC v1 phase switch", ok, tag="poc")},
        "/api/v1/pow/validate": {
            "post": _op("PoC v1 batch to validate (ignored)", poc, body=_OBJ, required=False, tag="poc")
        },
        "/api/v1/pow/status": {"get": _op("PoC v1 status: IDLE", ok, tag="poc")},
        "/api/v1/pow/stop": {"post": _op("PoC v1 stop", ok, tag="poc")},
        "/api/v1/inference/pow/init/generate": {
            "post": _op(
                "PoC v2 init (answered, nothing produced)",
                poc,
                body={"$ref": "#/components/schemas/PocInitV2"},
                required=False,
                tag="poc",
            )
        },
        "/api/v1/inference/pow/generate": {
            "post": _op("PoC v2 generate/validate (accepted, not done)", poc, body=_OBJ, required=False, tag="poc")
        },
        "/api/v1/inference/pow/status": {"get": _op("PoC v2 status: IDLE", ok, tag="poc")},
        "/api/v1/inference/pow/stop": {"post": _op("PoC v2 stop", ok, tag="poc")},
    }


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gonka-hybrid proxy node",
            "version": "0.1.0",
            "description": (
                "The inference-only ML node a Gonka network node (dapi) drives: OpenAI-compatible routes passed "
                "through to a hosted upstream, and the MLNode control surface of a node without a GPU. Every path is "
                "also served under a version prefix such as /v3.0.8 (the dapi's mlnode_version)."
            ),
        },
        "paths": _paths(),
        "components": {"schemas": SCHEMAS},
    }
