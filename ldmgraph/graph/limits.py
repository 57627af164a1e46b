"""Bounds on text that hostile input controls, measured without recursion."""

from __future__ import annotations


def json_nesting(text: str) -> int:
    """The deepest bracket nesting of JSON text (strings skipped), in one loop: a parser that recurses
    can then be given only text known to be shallow (2,000 nested lists crash ``json.loads``)."""
    if text.count("[") + text.count("{") <= 1:
        return min(1, text.count("[") + text.count("{"))
    depth = deepest = 0
    quoted = escaped = False
    for char in text:
        if quoted:
            escaped, quoted = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            quoted = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest
