"""A minimal Django project for the tests of relay.contrib.django: Django's postgresql backend
(psycopg 3) on the database the test module made, named by the environment."""

from __future__ import annotations

import os

from tests.contrib import parts
from tests.support import effect_types

_db = parts(os.environ["CONTRIB_DJANGO_DATABASE"])

SECRET_KEY = "only-for-tests"
USE_TZ = True
INSTALLED_APPS = ["relay.contrib.django"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _db["dbname"],
        "USER": _db["user"],
        "PASSWORD": _db["password"] or "",
        "HOST": _db["host"],
        "PORT": str(_db["port"]),
    }
}
RELAY = {"effect_types": effect_types(os.environ["CONTRIB_DJANGO_PREFIX"])}
