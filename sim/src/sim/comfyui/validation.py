"""``POST /prompt`` validation with ComfyUI's exact error shapes (``execution.py``: validate_prompt/validate_inputs).

comfyui.md: a 400 is ``{"error": {type, message, details, extra_info}, "node_errors": {id: {"errors": [...],
"dependent_outputs": [...], "class_type"}}}``; a missing model is ``value_not_in_list`` (``"ckpt_name: 'x' not
in [...]"``), a missing image ``custom_validation_failed`` (``"image - Invalid image file: X"``), a missing
custom node ``invalid_prompt``. Quirks kept on purpose:

- The prompt's keys are walked in order and ``'class_type' not in prompt[x]`` is evaluated as Python does,
  so a UI-format workflow (``{"nodes": [...], "links": [...]}``) is a 400 ``invalid_prompt`` when its first
  key holds a string or list, and a 500 when it holds a number (``"last_node_id": 9``): comfyui.md, "a 400
  (or a 500 on some inputs)".
- When only some outputs fail, the prompt is still queued: 200 with non-empty ``node_errors``.
- When an upstream node fails, the output node's own error list is empty, so the top-level ``details``
  is usually ``""`` and the reasons are in ``node_errors``.
- Constant inputs are converted in place (``"20"`` becomes ``20``), as ComfyUI mutates the queued prompt.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sim.comfyui.nodes import NODE_CLASSES, input_spec

Error = dict[str, Any]


@dataclass
class PromptCheck:
    ok: bool
    error: Error | None
    outputs: list[str]
    node_errors: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MachineView:
    """What validation needs from the machine: dynamic choice lists and whether an input file exists."""

    choices: Callable[[str], list[str]]
    input_exists: Callable[[str], bool]


def _type_name(exc: BaseException) -> str:
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _types_match(received: str, expected: object) -> bool:
    if not isinstance(expected, str):
        return False  # a link into a choice (combo) input
    if "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def _validate_inputs(
    prompt: dict[str, Any], unique_id: str, validated: dict[str, tuple[bool, list[Error], str]], machine: MachineView
) -> tuple[bool, list[Error], str]:
    if unique_id in validated:
        return validated[unique_id]
    node = prompt[unique_id]
    inputs = node.setdefault("inputs", {})
    cls = NODE_CLASSES[node["class_type"]]
    errors: list[Error] = []
    valid = True
    info: list[Any] = []
    val: Any = None
    for x in cls.required:
        spec = input_spec(cls, x, machine.choices)
        input_type = spec[0]
        extra = spec[1] if len(spec) > 1 else {}
        info = [input_type, extra]
        if x not in inputs:
            errors.append(
                {
                    "type": "required_input_missing",
                    "message": "Required input is missing",
                    "details": f"{x}",
                    "extra_info": {"input_name": x},
                }
            )
            continue
        val = inputs[x]
        if isinstance(val, list):
            if len(val) != 2:
                errors.append(
                    {
                        "type": "bad_linked_input",
                        "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                        "details": f"{x}",
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                    }
                )
                continue
            o_id = val[0]
            # A link to a node that is not in the prompt raises here, like ComfyUI (KeyError → exception_*).
            received_type = NODE_CLASSES[prompt[o_id]["class_type"]].returns[val[1]]
            if not _types_match(received_type, input_type):
                errors.append(
                    {
                        "type": "return_type_mismatch",
                        "message": "Return type mismatch between linked nodes",
                        "details": f"{x}, received_type({received_type}) mismatch input_type({input_type})",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_type": received_type,
                            "linked_node": val,
                        },
                    }
                )
                continue
            try:
                r = _validate_inputs(prompt, str(o_id), validated, machine)
                if r[0] is False:
                    valid = False
                    continue
            except Exception as ex:
                valid = False
                reasons = [
                    {
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(ex),
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "exception_message": str(ex),
                            "exception_type": _type_name(ex),
                            "traceback": traceback.format_tb(ex.__traceback__),
                            "linked_node": val,
                        },
                    }
                ]
                validated[str(o_id)] = (False, reasons, str(o_id))
                continue
        else:
            try:
                # ComfyUI unwraps {"__value__": [...]} (how a list constant is told apart from a link).
                if isinstance(val, dict) and "__value__" in val:
                    val = val["__value__"]
                    inputs[x] = val
                if input_type == "INT":
                    val = int(val)
                    inputs[x] = val
                if input_type == "FLOAT":
                    val = float(val)
                    inputs[x] = val
                if input_type == "STRING":
                    val = str(val)
                    inputs[x] = val
                if input_type == "BOOLEAN":
                    val = bool(val)
                    inputs[x] = val
            except Exception as ex:
                errors.append(
                    {
                        "type": "invalid_input_type",
                        "message": f"Failed to convert an input value to a {input_type} value",
                        "details": f"{x}, {val}, {ex}",
                        "extra_info": {
                            "input_name": x,
                            "input_config": info,
                            "received_value": val,
                            "exception_message": str(ex),
                        },
                    }
                )
                continue
            if x in cls.custom_validated:
                continue
            if "min" in extra and val < extra["min"]:
                errors.append(
                    {
                        "type": "value_smaller_than_min",
                        "message": "Value {} smaller than min of {}".format(val, extra["min"]),
                        "details": f"{x}",
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                    }
                )
                continue
            if "max" in extra and val > extra["max"]:
                errors.append(
                    {
                        "type": "value_bigger_than_max",
                        "message": "Value {} bigger than max of {}".format(val, extra["max"]),
                        "details": f"{x}",
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                    }
                )
                continue
            if isinstance(input_type, list) and val not in input_type:
                # ComfyUI does not echo long lists (e.g. hundreds of scanned model files).
                config: list[Any] | None = info
                if len(input_type) > 20:
                    list_info = f"(list of length {len(input_type)})"
                    config = None
                else:
                    list_info = str(input_type)
                errors.append(
                    {
                        "type": "value_not_in_list",
                        "message": "Value not in list",
                        "details": f"{x}: '{val}' not in {list_info}",
                        "extra_info": {"input_name": x, "input_config": config, "received_value": val},
                    }
                )
                continue
    # VALIDATE_INPUTS (LoadImage: "Invalid image file: X"). Like ComfyUI, the error reuses the loop's
    # last `info`/`val` — for LoadImage they are those of `image`, its only input.
    for x in cls.custom_validated:
        if x in inputs and not isinstance(inputs[x], list):
            name = str(inputs[x])
            if not machine.input_exists(name):
                errors.append(
                    {
                        "type": "custom_validation_failed",
                        "message": "Custom validation failed for node",
                        "details": f"{x} - Invalid image file: {name}",
                        "extra_info": {"input_name": x, "input_config": info, "received_value": val},
                    }
                )
    result = (False, errors, unique_id) if errors or not valid else (True, [], unique_id)
    validated[unique_id] = result
    return result


def validate_prompt(prompt: Any, machine: MachineView, partial_execution_list: list[str] | None = None) -> PromptCheck:
    """ComfyUI's validate_prompt: the outputs to execute, or the 400 body's ``error`` and ``node_errors``.

    May raise (TypeError on a UI-format workflow whose first value is a number): the app lets that
    become a 500, as ComfyUI does.
    """
    outputs: list[str] = []
    for x in prompt:
        if "class_type" not in prompt[x]:
            return PromptCheck(
                False,
                {
                    "type": "invalid_prompt",
                    "message": "Cannot execute because a node is missing the class_type property.",
                    "details": f"Node ID '#{x}'",
                    "extra_info": {},
                },
                [],
            )
        class_type = prompt[x]["class_type"]
        cls = NODE_CLASSES.get(class_type)
        if cls is None:
            return PromptCheck(
                False,
                {
                    "type": "invalid_prompt",
                    "message": f"Cannot execute because node {class_type} does not exist.",
                    "details": f"Node ID '#{x}'",
                    "extra_info": {},
                },
                [],
            )
        if cls.output_node and (partial_execution_list is None or x in partial_execution_list):
            outputs.append(str(x))
    if not outputs:
        return PromptCheck(
            False,
            {"type": "prompt_no_outputs", "message": "Prompt has no outputs", "details": "", "extra_info": {}},
            [],
        )

    good: list[str] = []
    failed: list[tuple[str, list[Error]]] = []
    node_errors: dict[str, Any] = {}
    validated: dict[str, tuple[bool, list[Error], str]] = {}
    for o in outputs:
        try:
            ok, reasons, _ = _validate_inputs(prompt, o, validated, machine)
        except Exception as ex:
            ok = False
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {
                        "exception_type": _type_name(ex),
                        "traceback": traceback.format_tb(ex.__traceback__),
                    },
                }
            ]
            validated[o] = (False, reasons, o)
        if ok:
            good.append(o)
            continue
        failed.append((o, reasons))
        for node_id, (node_ok, node_reasons, _) in validated.items():
            # Nodes downstream of a failure are invalid without reasons; only nodes with reasons are reported.
            if node_ok is not True and node_reasons:
                if node_id not in node_errors:
                    node_errors[node_id] = {
                        "errors": node_reasons,
                        "dependent_outputs": [],
                        "class_type": prompt[node_id]["class_type"],
                    }
                node_errors[node_id]["dependent_outputs"].append(o)

    if not good:
        details = "\n".join(f"{e['message']}: {e['details']}" for _, errs in failed for e in errs)
        return PromptCheck(
            False,
            {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": details,
                "extra_info": {},
            },
            [],
            node_errors,
        )
    return PromptCheck(True, None, good, node_errors)
