"""The Django app: add ``"relay.contrib.django"`` to ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig


class RelayConfig(AppConfig):
    name = "relay.contrib.django"
    label = "relay"  # the last part of the name, "django", would only confuse
    verbose_name = "Outbox relay"
