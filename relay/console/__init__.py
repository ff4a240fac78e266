"""The operator console (``relay console``): what needs a person, an effect's story and the
decisions (resolve, unblock, cancel) in a browser; server-rendered HTML, no JavaScript.

Only ``relay.cli`` imports this package; it needs the ``console`` extra (Starlette, uvicorn):
``pip install outbox-relay[console]``.
"""
