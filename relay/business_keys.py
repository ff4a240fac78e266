"""Whether two business-key templates can make the same key.

A business key is what an observer searches the downstream by, so two effect types whose
templates can make one key could each be taken for the other's effect (issue 18 item 8b). The
rule mirrors ``relay.business_key`` in SQL: a template's literal text is written as it is, and a
field's value has the template's own characters (and ``%``) written as ``%XX``. So a character of
a template's text appears in its keys exactly as often as in that text, and every key starts with
the text before the first field and ends with the text after the last. Templates are apart when
one of those three facts tells their keys apart; anything else may overlap and is refused.
"""

from __future__ import annotations

import re

_PART = re.compile(r"\{([A-Za-z0-9_]+)\}|([^{]+|\{)")


def literal_parts(template: str) -> list[str]:
    """The template's text between its fields: one more part than fields, possibly empty."""
    parts = [""]
    for match in _PART.finditer(template):
        if match.group(1) is None:
            parts[-1] += match.group(2)
        else:
            parts.append("")
    return parts


def _prefixes_differ(a: str, b: str) -> bool:
    return not (a.startswith(b) or b.startswith(a))


def templates_apart(first: str, second: str) -> bool:
    """True when no key of ``first`` can be a key of ``second`` (a sufficient test)."""
    a, b = literal_parts(first), literal_parts(second)
    if _prefixes_differ(a[0], b[0]) or _prefixes_differ(a[-1][::-1], b[-1][::-1]):
        return True
    text_a, text_b = "".join(a), "".join(b)
    # A character both templates write as text (and escape in their fields) occurs in each
    # one's keys as often as in its text: different counts, no common key. Not so for '%' and
    # the hex digits, which the escapes themselves write.
    shared = set(text_a) & set(text_b) - set("%0123456789ABCDEF")
    return any(text_a.count(c) != text_b.count(c) for c in shared)
