"""Turning a failed trial's or run's (Ray-wrapped) traceback into the one line a leaderboard reader
needs: the innermost ``SomeError: message``, not the stack.
"""

from __future__ import annotations

import re

__all__ = ["summarize_error"]

_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Warning)\w*)(?:\([\w.]+\))?: (.*)$")


def summarize_error(error: BaseException | str) -> str:
    """The innermost ``SomeError: message`` line of a (Ray-wrapped) traceback, and when the message
    ends with a colon the lines that complete it: the cause a leaderboard reader needs, not the stack."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    found = None
    for i, line in enumerate(lines):
        m = _ERROR_LINE.match(line)
        if m and "ray::" not in m.group(2):
            found = i
    if found is None:
        last = lines[-1] if lines else ""
        return (f"{type(error).__name__}: {last}" if isinstance(error, BaseException) else last)[:300]
    m = _ERROR_LINE.match(lines[found])
    text = f"{m.group(1)}: {m.group(2)}"
    for line in lines[found + 1:found + 4]:
        if not text.endswith(":") or line.endswith("("):
            break
        text += " " + line
    return text[:300]
