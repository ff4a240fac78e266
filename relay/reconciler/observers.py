"""Observers: ask the downstream system whether an UNKNOWN effect really happened.

Two kinds, declared per effect type: an HTTP observer (a URL template over the business key and
the operation key; 404 = absent, 200 with ``{"count": 1}`` = present, a count above 1 =
duplicate, anything else or a timeout = inconclusive) and a Python callable named by import path
that receives an :class:`ObservedEffect` and returns an :class:`Observation` (or just the answer
as a string). An observer that raises is inconclusive: only a clear answer moves an effect.
"""

from __future__ import annotations

import importlib
import json
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
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                status, body = response.status, response.read(BODY_LIMIT)
        except urllib.error.HTTPError as exc:
            status, body = exc.code, b""
            exc.close()
        except (OSError, ValueError) as exc:  # refused, reset, timeout, bad URL
            return Observation("inconclusive", detail=f"GET {url}: {type(exc).__name__}: {exc}")
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
