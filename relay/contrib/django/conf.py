"""The relay's settings for a Django project: ``settings.RELAY``, the TOML file, or both.

``RELAY = {"CONFIG": "relay.toml"}`` reads the same file as the relay's daemons (``RELAY_CONFIG``
or ``./relay.toml`` when ``CONFIG`` is absent); any other key is a relay setting in lower or
upper case (``"effect_types": {...}``) and wins over the file, so the types can live in Django's
settings alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings as django_settings

from relay.config import Settings, load_settings
from relay.errors import ConfigError


def relay_settings() -> Settings:
    given = getattr(django_settings, "RELAY", {}) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"settings.RELAY must be a dict, not {type(given).__name__}")
    values: dict[str, Any] = {str(k).lower(): v for k, v in given.items()}
    config = values.pop("config", None)
    return load_settings(Path(config) if config else None, **values)
