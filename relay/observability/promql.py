"""Which metric names a PromQL expression reads: for checking that dashboards and alert rules
name only series the daemons really export (a typo there fails silently: an empty panel, an alert
that can never fire).

Not a full PromQL parser: it removes what cannot be a metric name (strings, label matchers, range
and subquery brackets, grouping label lists, Grafana variables, numbers and durations) and keeps
the identifiers that are not functions, aggregations or keywords.
"""

from __future__ import annotations

import re

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-f]+|\d+(?:\.\d*)?(?:e[+-]?\d+)?[a-z]*)", re.IGNORECASE)
_IDENT = re.compile(r"(?<![\w:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names ``expr`` selects, e.g. ``{'relay_attempts_total'}`` for
    ``sum by (outcome) (rate(relay_attempts_total{outcome!="acked"}[$__rate_interval]))``."""
    text = _STRING.sub(" ", expr)
    # {__name__="x"} selects x: keep that name before the matchers are dropped.
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = _GRAFANA_VAR.sub(" ", text)
    text = _BRACES.sub(" ", text)
    while _BRACKETS.search(text):
        text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names
