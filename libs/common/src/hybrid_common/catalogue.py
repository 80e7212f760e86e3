"""The message catalogue, generated from the schemas (never written by hand).

``python -m hybrid_common.catalogue --write docs`` regenerates ``docs/messages.md`` and ``docs/state-and-ports.md``
(the Redis key table and port map) and rewrites the generated block of ``docs/architecture.md`` — the same key table
and port map between the marker comments ``<!-- generated:state-and-ports -->`` and ``<!-- /generated -->``, the
hand-written text around them untouched. ``--check docs`` exits 1 when a checked-in page or block differs from what
the code says, or when the block's markers are missing.
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


def _state_and_ports(level: int) -> list[str]:
    """The key table and the port map under headings of ``level`` (``#`` count)."""
    h = "#" * level
    out = [
        "Generated from `hybrid_common.redis_keys.KEY_TABLE` and `hybrid_common.PORTS` by `make catalogue`.",
        "Every key has one writing owner. Keys are prefixed with `<HYBRID_NAMESPACE>:` when a namespace is set.",
        "",
        f"{h} Redis keys",
        "",
        "| key | writer | readers | lifetime | what |",
        "|---|---|---|---|---|",
    ]
    out += [f"| `{k.pattern}` | {k.owner} | {k.readers} | {k.lifetime} | {k.purpose} |" for k in KEY_TABLE]
    out += ["", f"{h} Ports", "", "| name | port | owner | what |", "|---|---|---|---|"]
    out += [f"| `{name}` | {e.port} | {e.owner} | {e.purpose} |" for name, e in PORTS.items()]
    return out


def render_tables() -> str:
    """The Redis key table and the port map, from the code that defines them (``docs/state-and-ports.md``)."""
    return "\n".join(["# Shared state and ports", "", *_state_and_ports(2)]) + "\n"


# The generated block inside docs/architecture.md: everything between the markers belongs to `make catalogue`.
BLOCK_START = "<!-- generated:state-and-ports -->"
BLOCK_END = "<!-- /generated -->"


class MissingBlock(ValueError):
    """A page that should hold a generated block lacks its markers (or has them out of order)."""


def render_block() -> str:
    """The generated block of docs/architecture.md, markers included (headings one level below the page's ``##``)."""
    return "\n".join([BLOCK_START, *_state_and_ports(3), BLOCK_END])


def splice(page: str, block: str) -> str:
    """``page`` with the text from its start marker to its end marker replaced by ``block``."""
    start = page.find(BLOCK_START)
    end = page.find(BLOCK_END, start + len(BLOCK_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        raise MissingBlock(f"no {BLOCK_START} ... {BLOCK_END} block")
    return page[:start] + block + page[end + len(BLOCK_END) :]


DOCS = {"messages.md": render, "state-and-ports.md": render_tables}
# Pages written by hand that carry a generated block.
BLOCKS = {"architecture.md": render_block}


def _stale(docs: Path) -> list[str]:
    stale = [n for n, fn in DOCS.items() if not (docs / n).exists() or (docs / n).read_text() != fn()]
    for name, block in BLOCKS.items():
        page = docs / name
        try:
            current = page.read_text()
            fresh = splice(current, block())
        except (OSError, MissingBlock):
            stale.append(name)
            continue
        if fresh != current:
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", type=Path, metavar="DOCS_DIR", help="write the generated pages into this folder")
    ap.add_argument("--check", type=Path, metavar="DOCS_DIR", help="exit 1 if a generated page there is stale")
    args = ap.parse_args(argv)
    if args.write:
        for name, fn in DOCS.items():
            (args.write / name).write_text(fn())
        for name, block in BLOCKS.items():
            page = args.write / name
            try:
                page.write_text(splice(page.read_text(), block()))
            except (OSError, MissingBlock) as exc:
                print(f"{page}: cannot rewrite its generated block: {exc}", file=sys.stderr)  # noqa: T201
                return 1
    elif args.check:
        stale = _stale(args.check)
        if stale:
            print(f"stale generated docs: {', '.join(stale)}: run `make catalogue`", file=sys.stderr)  # noqa: T201
            return 1
    else:
        sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
