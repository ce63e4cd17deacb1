"""The reference pages cannot drift from the code: every setting is described, the generated
pages equal what ``stream_classifier.ops.docgen`` renders, and every dead-letter reason is
documented in the message contract."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from stream_classifier.config import Settings
from stream_classifier.ops import docgen
from stream_classifier.ops.metrics import DEAD_LETTER_REASONS

DOCS = Path(__file__).resolve().parents[2] / "docs"
REGENERATE = "regenerate it: python -m stream_classifier.ops.docgen"


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str | None]]:
    found = []
    for name, field in model.model_fields.items():
        found.append((prefix + name, field.description))
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            found.extend(_fields(field.annotation, f"{prefix}{name}."))
    return found


def test_every_setting_has_a_description() -> None:
    missing = [name for name, description in _fields(Settings) if not (description or "").strip()]
    assert not missing, f"settings without Field(description=...): {missing}"


def test_configuration_page_is_generated() -> None:
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert page == docgen.configuration_page(), f"docs/configuration.md is stale; {REGENERATE}"


def test_operations_metrics_table_is_generated() -> None:
    page = (DOCS / "operations.md").read_text(encoding="utf-8")
    assert page == docgen.with_metrics_table(page), (
        f"the metrics table of docs/operations.md is stale; {REGENERATE}"
    )


def test_metrics_table_markers_are_required() -> None:
    with pytest.raises(ValueError, match="markers"):
        docgen.with_metrics_table("no table here")


@pytest.mark.parametrize("reason", DEAD_LETTER_REASONS)
def test_every_dead_letter_reason_is_documented(reason: str) -> None:
    page = (DOCS / "message-contract.md").read_text(encoding="utf-8")
    assert f"`{reason}`" in page, (
        f"docs/message-contract.md does not document the dead-letter reason {reason!r}"
    )
