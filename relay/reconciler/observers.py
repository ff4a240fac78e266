"""Observers: ask the downstream system whether an UNKNOWN effect really happened.

Two kinds, declared per effect type: an HTTP observer (a URL template over the business key and
the operation key; 404 = absent, 200 with ``{"count": 1}`` = present, a count above 1 =
duplicate, anything else or a timeout = inconclusive) and a Python callable named by import path
that receives an :class:`ObservedEffect` and returns an :class:`Observation` (or just the answer
as a string). An observer that raises is inconclusive: only a clear answer moves an effect.

"absent" is the one dangerous answer (it re-sends the effect), so the HTTP observer follows no
redirect: a 404 from wherever a redirect leads (a login page, a gateway) says nothing about the
effect. Any 3xx is inconclusive. A call is bounded as a whole by ``timeout_s``, not only per
socket operation, so a server that trickles its answer cannot hold it.
"""

from __future__ import annotations

import http.client
import importlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from relay.config import ObserverSpec
from relay.errors import ConfigError

Answer = Literal["present", "absent", "duplicate", "inconclusive"]
ANSWERS: tuple[Answer, ...] = ("present", "absent", "duplicate", "inconclusive")
BODY_LIMIT = 65_536


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A 3xx comes back as an HTTPError with its status, instead of being followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True)
class ObservedEffect:
    """What an observer is told about the effect it must look for."""

    operation_key: str
    effect_type: str
    business_key: str | None
    payload: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0


@dataclass(frozen=True)
class Observation:
    answer: Answer
    count: int | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.answer not in ANSWERS:
            raise ValueError(f"an observation answers one of {ANSWERS}, not {self.answer!r}")
        if self.count is not None and (
            isinstance(self.count, bool) or not isinstance(self.count, int)
        ):
            raise ValueError(f"an observation's count is a whole number, not {self.count!r}")


class Observer(Protocol):
    def observe(self, effect: ObservedEffect) -> Observation: ...


class HttpObserver:
    """GET the URL template filled with the effect's keys; the status and count decide."""

    def __init__(self, url_template: str, timeout_s: float) -> None:
        self.url_template = url_template
        self.timeout_s = timeout_s

    def url_for(self, effect: ObservedEffect) -> str:
        def quoted(value: str | None) -> str:
            return urllib.parse.quote(value or "", safe="")

        return self.url_template.replace("{business_key}", quoted(effect.business_key)).replace(
            "{operation_key}", quoted(effect.operation_key)
        )

    def observe(self, effect: ObservedEffect) -> Observation:
        if "{business_key}" in self.url_template and effect.business_key is None:
            return Observation("inconclusive", detail="the effect has no business key to look up")
        url = self.url_for(effect)
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        deadline = time.monotonic() + self.timeout_s
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                status = response.status
                body = _read_until(response, deadline) if status == 200 else b""
        except urllib.error.HTTPError as exc:
            status, body = exc.code, b""
            exc.close()
        except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, reset, timeout
            return Observation("inconclusive", detail=f"GET {url}: {type(exc).__name__}: {exc}")
        if body is None or time.monotonic() > deadline:
            why = f"GET {url}: no complete answer within {self.timeout_s}s"
            return Observation("inconclusive", detail=why)
        if status == 404:
            return Observation("absent", count=0, detail=f"GET {url}: 404")
        if status != 200:
            return Observation("inconclusive", detail=f"GET {url}: HTTP {status}")
        try:
            count = json.loads(body)["count"]
        except (ValueError, KeyError, TypeError):
            return Observation("inconclusive", detail=f"GET {url}: 200 without a JSON count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            return Observation("inconclusive", detail=f"GET {url}: 200 with count {count!r}")
        answer: Answer = "present" if count == 1 else "duplicate"
        return Observation(answer, count=count, detail=f"GET {url}: 200, count {count}")


def _read_until(response: http.client.HTTPResponse, deadline: float) -> bytes | None:
    """The body (up to BODY_LIMIT), or None when it is not complete by ``deadline``. One socket
    read at a time: each is bounded by the socket timeout, the whole by the deadline."""
    chunks: list[bytes] = []
    size = 0
    while size < BODY_LIMIT:
        if time.monotonic() > deadline:
            return None
        chunk = response.read1(min(16_384, BODY_LIMIT - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


class PythonObserver:
    """A function ``package.module:name`` called with the effect; any exception = inconclusive."""

    def __init__(self, path: str) -> None:
        self.path = path
        module_name, _, name = path.partition(":")
        try:
            target = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"observer {path!r} cannot be imported: {exc}") from None
        if not callable(target):
            raise ConfigError(f"observer {path!r} is not callable")
        self._call: Callable[[ObservedEffect], Any] = target

    def observe(self, effect: ObservedEffect) -> Observation:
        try:
            answer = self._call(effect)
        except Exception as exc:  # noqa: BLE001 - an observer's failure is an answer: inconclusive
            return Observation(
                "inconclusive", detail=f"{self.path} raised {type(exc).__name__}: {exc}"
            )
        if isinstance(answer, Observation):
            return answer
        if isinstance(answer, str) and answer in ANSWERS:
            return Observation(answer)
        return Observation("inconclusive", detail=f"{self.path} returned {answer!r}")


def make_observer(spec: ObserverSpec) -> Observer:
    if spec.http_url is not None:
        return HttpObserver(spec.http_url, spec.timeout_s)
    assert spec.python is not None
    return PythonObserver(spec.python)
