"""Issue #2: the generated catalogue must match the schemas; a schema change without regeneration fails."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from hybrid_common import catalogue
from hybrid_common.messages import Event, registry

DOCS = Path(__file__).resolve().parents[2] / "docs"
CATALOGUE = DOCS / "messages.md"


def test_checked_in_catalogue_is_current() -> None:
    assert CATALOGUE.read_text() == catalogue.render(), "docs/messages.md is stale: run `make catalogue`"
    assert (DOCS / "state-and-ports.md").read_text() == catalogue.render_tables()
    assert catalogue.main(["--check", str(DOCS)]) == 0


def test_a_schema_change_makes_the_catalogue_stale(monkeypatch) -> None:
    class InstanceReadyV2(Event):
        TYPE: ClassVar[str] = "instance.ready"
        slot_id: str
        brand_new_field: int

    monkeypatch.setitem(registry.REGISTRY, "instance.ready", InstanceReadyV2)
    assert "brand_new_field" in catalogue.render()
    assert catalogue.main(["--check", str(DOCS)]) == 1


def test_every_command_and_query_has_exactly_one_owner_queue() -> None:
    from hybrid_common.topology import OWNER_QUEUES, owner_queue

    for type_, model in registry.REGISTRY.items():
        if model.KIND in {"command", "query"}:
            assert owner_queue(type_) in {q.name for q in OWNER_QUEUES}
