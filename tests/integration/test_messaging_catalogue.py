"""Issue #2: the generated catalogue must match the schemas; a schema change without regeneration fails.
Issue #12: docs/architecture.md carries the key table and port map in a generated block that must match the code too."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import ClassVar

import pytest

from hybrid_common import catalogue
from hybrid_common.messages import Event, registry
from hybrid_common.redis_keys import KEY_TABLE, KeySpec

DOCS = Path(__file__).resolve().parents[2] / "docs"
CATALOGUE = DOCS / "messages.md"
ARCHITECTURE = DOCS / "architecture.md"


def test_checked_in_catalogue_is_current() -> None:
    assert CATALOGUE.read_text() == catalogue.render(), "docs/messages.md is stale: run `make catalogue`"
    assert (DOCS / "state-and-ports.md").read_text() == catalogue.render_tables()
    page = ARCHITECTURE.read_text()
    assert catalogue.render_block() in page, (
        "docs/architecture.md's key table / port map is stale: run `make catalogue`"
    )
    assert page.count(catalogue.BLOCK_START) == 1 and page.count(catalogue.BLOCK_END) == 1
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


def _docs_copy(tmp_path: Path) -> Path:
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    return docs


def test_a_stale_architecture_block_fails_the_check_and_write_repairs_only_the_block(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = _docs_copy(tmp_path)
    page = docs / "architecture.md"
    original = page.read_text()
    # A hand edit inside the block (a key row dropped), the pages around it untouched.
    row = next(line for line in catalogue.render_block().splitlines() if line.startswith("| `jobs`"))
    page.write_text(original.replace(row + "\n", "", 1))
    assert catalogue.main(["--check", str(docs)]) == 1
    assert "architecture.md" in capsys.readouterr().err
    assert catalogue.main(["--write", str(docs)]) == 0
    assert page.read_text() == original  # the block is back and the hand-written text is as it was
    assert catalogue.main(["--check", str(docs)]) == 0


def test_a_key_table_change_makes_the_architecture_block_stale(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = KeySpec("brand:new:{key}", "scheduler", "CLI status", "1 day", "a key the docs do not know yet")
    monkeypatch.setattr(catalogue, "KEY_TABLE", (*KEY_TABLE, extra))
    assert "brand:new:{key}" in catalogue.render_block()
    assert catalogue.main(["--check", str(DOCS)]) == 1
    stale = capsys.readouterr().err
    assert "architecture.md" in stale and "state-and-ports.md" in stale


def test_missing_markers_fail_the_check_and_the_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = _docs_copy(tmp_path)
    page = docs / "architecture.md"
    unmarked = page.read_text().replace(catalogue.BLOCK_END, "")
    page.write_text(unmarked)
    assert catalogue.main(["--check", str(docs)]) == 1
    assert "architecture.md" in capsys.readouterr().err
    assert catalogue.main(["--write", str(docs)]) == 1
    assert page.read_text() == unmarked  # never rewritten by guesswork
