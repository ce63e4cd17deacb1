"""What every settings section shares: the environment prefix, list parsing, strictness."""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict
from pydantic_settings import NoDecode

ENV_PREFIX = "STREAM_CLASSIFIER_"


def split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string for list settings given as text."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


StrList = Annotated[list[str], NoDecode]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
