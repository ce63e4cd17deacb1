"""Which values are secret, and the settings shown with them masked."""

from __future__ import annotations

import re
from typing import Any

from stream_classifier.config.settings import Settings

# Client property names whose values are secret, in either client's naming: passwords, SASL
# JAAS and OAUTHBEARER configuration and client secrets, PEM key material, tokens. Matched by
# pattern, so that pass-through properties are masked wherever settings are shown.
_SECRET_PROPERTY = re.compile(r"password|secret|jaas|token|credential|pem|oauthbearer\.config|api.?key", re.I)
MASK = "**********"


def is_secret_property(name: str) -> bool:
    """Whether a client property (either client's naming) holds a secret."""
    return _SECRET_PROPERTY.search(name) is not None


def masked_dump(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data: secrets, pass-through secret properties included,
    replaced by :data:`MASK`."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    for section in ("consumer_properties", "producer_properties"):
        properties = data["kafka"].get(section) or {}
        data["kafka"][section] = {k: (MASK if is_secret_property(k) else v) for k, v in properties.items()}
    return data
