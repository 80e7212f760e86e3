"""Workflow files: API format only, and readable explanations of ComfyUI's validation errors (comfyui.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class WorkflowError(ValueError):
    """A workflow ComfyUI refused or would refuse; the message says what to change."""


def load_workflow(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkflowError(f"workflow file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"workflow file {str(path)!r} is not JSON: {exc}") from None
    check_api_format(data, str(path))
    return data  # type: ignore[no-any-return]


def check_api_format(data: Any, name: str = "workflow") -> None:
    """Refuse the UI format (``{"nodes": [...], "links": [...]}``): ComfyUI's /prompt takes only the API format."""
    if isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data:
        raise WorkflowError(
            f"{name} is in ComfyUI's UI format (nodes/links). /prompt accepts only the API format: in ComfyUI enable "
            "'Dev mode' in the settings, then use 'Save (API Format)' / 'Export (API)', and pass that file."
        )
    if (
        not isinstance(data, dict)
        or not data
        or not all(isinstance(v, dict) and "class_type" in v for v in data.values())
    ):
        raise WorkflowError(
            f"{name} is not an API-format workflow: expected {{node_id: {{'class_type': ..., 'inputs': {{...}}}}}}"
        )


def explain_prompt_error(body: dict[str, Any], workflow: dict[str, Any] | None = None) -> str:
    """Turn a 400 from POST /prompt into lines naming the node, the input, what was received and what is allowed."""
    lines: list[str] = []
    err = body.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('type', 'error')}: {err.get('message', '')}".strip())
        if err.get("details"):
            lines.append(f"  {err['details']}")
    node_errors = body.get("node_errors") or {}
    for node_id, info in node_errors.items():
        class_type = info.get("class_type") or (workflow or {}).get(node_id, {}).get("class_type", "?")
        for e in info.get("errors", []):
            extra = e.get("extra_info") or {}
            input_name = extra.get("input_name")
            what = e.get("type", "error")
            if what == "value_not_in_list":
                allowed = extra.get("input_config")
                installed = ""
                if isinstance(allowed, list) and allowed and isinstance(allowed[0], list):
                    installed = f"; installed: {', '.join(map(str, allowed[0])) or 'none'}"
                received = extra.get("received_value")
                lines.append(
                    f"node {node_id} ({class_type}): input {input_name!r}: {received!r} is not installed on the "
                    f"instance (missing model?){installed}"
                )
            elif what == "custom_validation_failed" and "image" in str(e.get("details", "")).lower():
                lines.append(
                    f"node {node_id} ({class_type}): input {input_name!r}: {e.get('details')} — upload it with "
                    "--input FILE (missing input image)"
                )
            else:
                detail = e.get("details") or e.get("message")
                lines.append(f"node {node_id} ({class_type}): {what}: input {input_name!r}: {detail}")
    return "\n".join(lines) or json.dumps(body)[:500]
