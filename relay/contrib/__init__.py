"""Integrations for applications that do not hold a bare psycopg 3 connection.

Each submodule imports its framework, so each is installed as an extra:
``outbox-relay[sqlalchemy]``, ``outbox-relay[django]``, ``outbox-relay[asyncpg]``.
"""
