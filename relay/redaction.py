"""Keeping secrets and hostile text out of what the relay prints.

Secrets are found by parsing, not guessed by pattern: the database URL or conninfo is parsed the
way libpq parses it, and every password the configuration holds (database, SASL, TLS key) is
remembered with the spellings it can take in text (percent-encoded, quoted). Every log line and
every error the CLI prints passes through :func:`redact`. A URL that does not parse is never
printed at all, because nobody can say where its password starts and ends.

Text that came from outside (operation keys, reasons, a downstream's ``detail``) can carry control
characters that forge log lines or drive the operator's terminal; :func:`escape_controls` makes
them visible and harmless.
"""

from __future__ import annotations

import os
import re
import threading
import unicodedata
from urllib.parse import parse_qsl, quote, urlsplit

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict, make_conninfo

MASK = "***"
MIN_SECRET_LENGTH = 4
"""Shorter values are not masked: masking every 'ab' in a log would destroy it, and a secret
that short protects nothing anyway."""
UNPARSABLE_DSN = "<database URL not shown: it does not parse, so its password cannot be located>"

_lock = threading.Lock()
_secrets: set[str] = set()

# A last net for URLs with credentials that were never configured here (a downstream's detail,
# a library's message): the token is found by its scheme, then taken apart by urlsplit.
_URL_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
# ... and for a password given as a key-value pair (conninfo, a client's logged configuration):
# the key is found by name, the value then read as a quoted string (escapes included) or a word.
_PASSWORD_KEY = re.compile(
    r"(?:sasl_plain_password|ssl_password|password|passwd)['\"]?\s*[=:]\s*", re.IGNORECASE
)
# Bidirectional overrides and isolates reorder what a terminal shows; zero-width marks hide text.
_INVISIBLE = {0x061C, 0x200B, 0x200E, 0x200F, 0x2028, 0x2029, 0xFEFF}
_INVISIBLE |= set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


def _spellings(secret: str) -> set[str]:
    """The ways ``secret`` can appear in text: as is, percent-encoded, escaped for conninfo."""
    escaped = secret.replace("\\", "\\\\").replace("'", "\\'")
    return {secret, quote(secret, safe=""), quote(secret), escaped}


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` (in every spelling) in everything :func:`redact` sees from now on."""
    if not secret or len(secret) < MIN_SECRET_LENGTH:
        return
    with _lock:
        _secrets.update(s for s in _spellings(secret) if len(s) >= MIN_SECRET_LENGTH)


def dsn_secrets(dsn: str) -> list[str]:
    """Every password a PostgreSQL URL or conninfo string holds, found by parsing it.

    Raises :class:`ValueError` (with no part of ``dsn`` in its text) when it does not parse.
    """
    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        raise ValueError(
            "is not a valid PostgreSQL URL or conninfo string (the value is not shown: it may "
            "hold a password)"
        ) from None
    found = [str(params["password"])] if params.get("password") else []
    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
            if parts.password:
                found.append(parts.password)  # the raw, still percent-encoded spelling
            found.extend(v for k, v in parse_qsl(parts.query) if k.lower() == "password")
        except ValueError:
            pass
    return found


def register_dsn(dsn: str | None) -> None:
    """Register the passwords of ``dsn`` and of ``PGPASSWORD``; ValueError if ``dsn`` is broken."""
    register_secret(os.environ.get("PGPASSWORD"))
    if dsn:
        for secret in dsn_secrets(dsn):
            register_secret(secret)


def display_dsn(dsn: str) -> str:
    """``dsn`` rebuilt from its parsed parts with the password masked; never the raw text."""
    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        return UNPARSABLE_DSN
    if "password" in params:
        params["password"] = MASK
    return make_conninfo("", **params)


def _mask_url(match: re.Match[str]) -> str:
    token = match.group(0)
    try:
        parts = urlsplit(token)
        password = parts.password
    except ValueError:
        return token
    if password is None:
        return token
    user = parts.username or ""
    netloc = parts.netloc.replace(f"{user}:{password}@", f"{user}:{MASK}@", 1)
    return parts._replace(netloc=netloc).geturl()


def _value_end(text: str, start: int) -> int:
    """Where the value that begins at ``start`` ends: after its closing quote, or at a space."""
    if start < len(text) and text[start] in "'\"":
        quote_char, i = text[start], start + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == quote_char:
                return i + 1
            i += 1
        return len(text)
    i = start
    while i < len(text) and not text[i].isspace() and text[i] not in ",;}])'\"":
        i += 1
    return i


def _mask_pairs(text: str) -> str:
    out: list[str] = []
    pos = 0
    for match in _PASSWORD_KEY.finditer(text):
        if match.start() < pos:
            continue
        end = _value_end(text, match.end())
        if end > match.end():
            out.append(text[pos : match.end()] + MASK)
            pos = end
    return "".join(out) + text[pos:]


def redact(text: str) -> str:
    """``text`` with every registered secret, the password of any URL in it and the value of
    any ``password=`` pair masked."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, MASK)
    return _mask_pairs(_URL_TOKEN.sub(_mask_url, text))


_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _needs_escape(char: str, keep_newlines: bool) -> bool:
    if char == "\n":
        return not keep_newlines
    code = ord(char)
    if code < 0x20 or 0x7F <= code <= 0x9F or code in _INVISIBLE:
        return True
    return 0xD800 <= code <= 0xDFFF or unicodedata.category(char) == "Cc"


def escape_controls(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with control characters (C0, DEL, C1, newlines, ESC), bidirectional overrides and
    lone surrogates written as ``\\n``, ``\\xNN``, ``\\uNNNN``: one log line stays one line, and an
    operator's terminal shows the bytes instead of obeying them."""
    if text.isprintable() and not any(ord(c) in _INVISIBLE for c in text):
        return text
    return "".join(_escape_char(c) if _needs_escape(c, keep_newlines) else c for c in text)
