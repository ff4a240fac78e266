"""Who is asking, and what they may do: the console's own sign-in (scrypt-hashed credentials from
a file), or an authenticating proxy's header trusted only from the proxies' addresses; signed
session cookies; CSRF tokens tied to the session; the same-origin check of every POST.

Rights: ``viewer`` reads; ``operator`` also decides. The read-only switch takes deciding away
from everyone. Nothing here touches the database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from relay.config import Settings
from relay.errors import ConfigError

Right = Literal["viewer", "operator"]
RIGHTS: tuple[Right, ...] = ("viewer", "operator")
# scrypt's cost: 16 MiB of memory and about 50 ms per check on one core.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
COOKIE = "relay-console"
SECURE_COOKIE = "__Host-relay-console"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError("not base64") from exc


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), as a users file holds it."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32
    )
    return "$".join(
        ["scrypt", str(SCRYPT_N), str(SCRYPT_R), str(SCRYPT_P), _b64(salt), _b64(digest)]
    )


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(
            password.encode(),
            salt=_unb64(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(_unb64(digest)),
            maxmem=256 * 1024 * 1024,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


# A hash that no password matches, checked when the user is unknown: a sign-in takes as long
# whether or not the name exists.
_NOBODY = hash_password(secrets.token_urlsafe(16), salt=b"\0" * 16)


@dataclass(frozen=True)
class User:
    name: str
    right: Right
    password_hash: str


def load_users(path: str | Path) -> dict[str, User]:
    """``name:right:hash`` per line; blank lines and ``#`` comments are skipped. A plain password
    where a hash belongs is refused: the file must never hold one."""
    users: dict[str, User] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"console_users_file {path}: {exc.strerror or exc}") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or parts[1] not in RIGHTS or not parts[2].startswith("scrypt$"):
            raise ConfigError(
                f"console_users_file {path}, line {number}: expected 'name:viewer|operator:"
                "scrypt$...' (make the hash with `relay console --hash-password NAME`)"
            )
        name, right, digest = parts
        if not name or name in users:
            raise ConfigError(f"console_users_file {path}, line {number}: empty or repeated name")
        users[name] = User(name, right, digest)  # type: ignore[arg-type]  # checked just above
    if not users:
        raise ConfigError(f"console_users_file {path} names no user")
    return users


@dataclass(frozen=True)
class Identity:
    """A person the console has recognised, with the session their browser holds."""

    name: str
    right: Right
    auth: Literal["login", "proxy"]
    session: str  # the session's random nonce: CSRF tokens are tied to it

    @property
    def actor(self) -> str:
        """How decisions record them: the name and that the console carried it."""
        return f"{self.name} [console]"


class Guard:
    """The console's rules of identity, built once from the settings (and refusing to build
    from settings that would be unsafe)."""

    def __init__(self, settings: Settings, *, secret: bytes | None = None) -> None:
        self.settings = settings
        configured = settings.console_secret
        self.secret = (
            secret
            if secret is not None
            else configured.get_secret_value().encode()
            if configured is not None
            else secrets.token_bytes(32)
        )
        self.mode = settings.console_auth
        self.users: dict[str, User] = {}
        self.proxies = [
            ipaddress.ip_network(a, strict=False) for a in settings.console_proxy_addresses
        ]
        self.header = settings.console_proxy_header.lower()
        if self.mode == "proxy":
            if not self.proxies:
                raise ConfigError(
                    "console_auth is 'proxy' but console_proxy_addresses is empty: the identity "
                    "header would be trusted from anyone. Name the proxies' addresses."
                )
        else:
            if not settings.console_users_file:
                raise ConfigError(
                    "console_auth is 'login' but no console_users_file is set: nobody could sign "
                    "in (make lines with `relay console --hash-password NAME`)"
                )
            self.users = load_users(settings.console_users_file)

    # -- sessions ------------------------------------------------------------------------------

    def _sign(self, data: bytes) -> str:
        return _b64(hmac.new(self.secret, data, hashlib.sha256).digest())

    def make_session(self, name: str = "") -> str:
        """A cookie value: who (empty in proxy mode: the proxy says who), a fresh nonce, the
        expiry; signed."""
        body = json.dumps(
            {
                "u": name,
                "n": secrets.token_urlsafe(16),
                "e": int(time.time() + self.settings.console_session_s),
            },
            separators=(",", ":"),
        ).encode()
        return f"{_b64(body)}.{self._sign(body)}"

    def read_session(self, cookie: str | None) -> tuple[str, str] | None:
        """(user name, nonce) of a valid, unexpired cookie; None otherwise."""
        if not cookie or cookie.count(".") != 1:
            return None
        body_b64, signature = cookie.split(".")
        try:
            body = _unb64(body_b64)
        except ValueError:
            return None
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        try:
            data = json.loads(body)
            name, nonce, expiry = str(data["u"]), str(data["n"]), float(data["e"])
        except (ValueError, KeyError, TypeError):
            return None
        if expiry < time.time():
            return None
        return name, nonce

    def csrf_token(self, identity: Identity) -> str:
        return self._sign(f"csrf|{identity.session}|{identity.name}".encode())

    def csrf_ok(self, identity: Identity, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(identity))

    # -- who is asking -------------------------------------------------------------------------

    def trusted_proxy(self, address: str | None) -> bool:
        if not address:
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    def identify(
        self, headers: Mapping[str, str], peer: str | None, session: tuple[str, str] | None
    ) -> Identity | None:
        """The person behind a request, or None. In proxy mode the header counts only when the
        connection comes from a configured proxy; from anyone else it is ignored."""
        if self.mode == "proxy":
            if session is None or not self.trusted_proxy(peer):
                return None
            name = (headers.get(self.header) or "").strip()
            if not name or len(name) > 256:
                return None
            right: Right = "operator" if name in self.settings.console_operators else "viewer"
            return Identity(name, right, "proxy", session[1])
        if session is None:
            return None
        user = self.users.get(session[0])
        if user is None:
            return None
        return Identity(user.name, user.right, "login", session[1])

    def sign_in(self, name: str, password: str) -> User | None:
        user = self.users.get(name)
        ok = check_password(password, user.password_hash if user else _NOBODY)
        return user if ok and user is not None else None

    def may_decide(self, identity: Identity) -> bool:
        return identity.right == "operator" and not self.settings.console_read_only


def same_origin(headers: Mapping[str, str], host: str | None) -> bool:
    """A state-changing request must come from the console's own pages: ``Sec-Fetch-Site:
    same-origin`` where the browser sends it, else an ``Origin`` naming this very host."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site == "same-origin"
    origin = headers.get("origin")
    if not origin or not host:
        return False
    scheme, _, rest = origin.partition("://")
    return scheme in ("http", "https") and rest == host
