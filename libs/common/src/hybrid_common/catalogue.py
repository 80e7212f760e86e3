"""The message catalogue, generated from the schemas (never written by hand).

``python -m hybrid_common.catalogue --write docs`` regenerates ``docs/messages.md`` and ``docs/state-and-ports.md``
(the Redis key table and port map); ``--check docs`` exits 1 when a checked-in page differs from what the code says.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hybrid_common._ports import PORTS
from hybrid_common.messages import REGISTRY, Payload
from hybrid_common.redis_keys import KEY_TABLE
from hybrid_common.topology import OWNER_QUEUES, SUBSCRIPTIONS

_KIND_TITLES = {
    "event": "Events (exchange `events`)",
    "command": "Commands (exchange `commands`, mandatory)",
    "query": "Queries (request/reply over `commands`)",
    "reply": "Replies (to `reply_to`)",
}


def _type_str(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " \\| ".join(_type_str(s, defs) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    t = schema.get("type", "any")
    if t == "array":
        return f"list[{_type_str(schema.get('items', {}), defs)}]"
    if t == "object" and "additionalProperties" in schema and isinstance(schema["additionalProperties"], dict):
        return f"dict[str, {_type_str(schema['additionalProperties'], defs)}]"
    fmt = schema.get("format")
    return f"{t} ({fmt})" if fmt else str(t)


def _routes(model: type[Payload]) -> str:
    if model.KIND in {"command", "query"}:
        owners = [q.name for q in OWNER_QUEUES if model.TYPE in q.bindings]
        return "owner queue: " + (", ".join(f"`{o}`" for o in owners) or "**none**")
    if model.KIND == "event":
        subs = [q.name for q in SUBSCRIPTIONS if any(_matches(b, model.TYPE) for b in q.bindings)]
        return "subscribers: " + (", ".join(f"`{s}`" for s in subs) or "none yet")
    return "sent to the asker's `reply_to`"


def _matches(binding: str, key: str) -> bool:
    b, k = binding.split("."), key.split(".")
    if "#" in b:
        return True
    return len(b) == len(k) and all(x in {"*", y} for x, y in zip(b, k, strict=True))


def render() -> str:
    out = [
        "# Message catalogue",
        "",
        "Generated from `libs/common/src/hybrid_common/messages` by `make catalogue`; do not edit by hand.",
        "Every message travels in the envelope: `id` (uuid, also the AMQP `message_id`), `type`, `version`,",
        "`occurred_at`, `correlation_id`, `causation_id`, `source`, `payload` (below). Routing key = `type`.",
        "",
    ]
    for kind, title in _KIND_TITLES.items():
        models = [m for m in REGISTRY.values() if kind == m.KIND]
        out += [f"## {title}", ""]
        for model in models:
            schema = model.model_json_schema()
            defs = schema.get("$defs", {})
            doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
            out += [f"### `{model.TYPE}` — {model.__name__} (v{model.VERSION})", ""]
            if doc:
                out += [doc, ""]
            out += [_routes(model), "", "| field | type | required | notes |", "|---|---|---|---|"]
            required = set(schema.get("required", []))
            for name, prop in schema.get("properties", {}).items():
                notes = prop.get("description", "")
                if "default" in prop and name not in required:
                    notes = (f"default `{prop['default']}`. " + notes).strip()
                out.append(f"| `{name}` | {_type_str(prop, defs)} | {'yes' if name in required else 'no'} | {notes} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_tables() -> str:
    """The Redis key table and the port map, from the code that defines them."""
    out = [
        "# Shared state and ports",
        "",
        "Generated from `hybrid_common.redis_keys.KEY_TABLE` and `hybrid_common.PORTS` by `make catalogue`.",
        "Every key has one writing owner. Keys are prefixed with `<HYBRID_NAMESPACE>:` when a namespace is set.",
        "",
        "## Redis keys",
        "",
        "| key | writer | readers | lifetime | what |",
        "|---|---|---|---|---|",
    ]
    out += [f"| `{k.pattern}` | {k.owner} | {k.readers} | {k.lifetime} | {k.purpose} |" for k in KEY_TABLE]
    out += ["", "## Ports", "", "| name | port | owner | what |", "|---|---|---|---|"]
    out += [f"| `{name}` | {e.port} | {e.owner} | {e.purpose} |" for name, e in PORTS.items()]
    return "\n".join(out) + "\n"


DOCS = {"messages.md": render, "state-and-ports.md": render_tables}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", type=Path, metavar="DOCS_DIR", help="write the generated pages into this folder")
    ap.add_argument("--check", type=Path, metavar="DOCS_DIR", help="exit 1 if a generated page there is stale")
    args = ap.parse_args(argv)
    if args.write:
        for name, fn in DOCS.items():
            (args.write / name).write_text(fn())
    elif args.check:
        stale = [n for n, fn in DOCS.items() if not (args.check / n).exists() or (args.check / n).read_text() != fn()]
        if stale:
            print(f"stale generated docs: {', '.join(stale)}: run `make catalogue`", file=sys.stderr)  # noqa: T201
            return 1
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
