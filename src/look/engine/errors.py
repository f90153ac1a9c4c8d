"""One-line messages for errors, also for those PyTorch re-raises from a DataLoader worker."""

from __future__ import annotations

import re

__all__ = ["error_message"]

# The line Python ends a traceback with: the exception's qualified type, then its message.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*: ")


def error_message(exc: BaseException) -> str:
    """The one-line message of ``exc``, also for errors re-raised from a DataLoader worker.

    PyTorch re-raises a worker's exception as the same type, with the worker's whole traceback as
    its message; the user needs its last line (our own message), not the traceback. An error
    that wraps such a message (``"step 3 failed …: <worker traceback>. The last good checkpoint
    is kept."``) keeps its own words around the worker's message.
    """
    text = str(exc)
    marker = "\nOriginal Traceback"
    if marker not in text:
        return text
    before, _, traceback_and_after = text.partition(marker)
    lines = traceback_and_after.rstrip().splitlines()
    # Where the worker's traceback ends: its last line naming an exception type, then whatever
    # a wrapping error added after it (on the lines that follow, or after the traceback's last
    # line break).
    last = max(i for i, line in enumerate(lines) if _EXCEPTION_LINE.match(line) or i == 0)
    worker = _EXCEPTION_LINE.sub("", lines[last], count=1)
    after = " ".join(line.strip() for line in lines[last + 1 :])
    # The wrapper's text before the worker's ("step 3 failed …: Caught … in DataLoader worker").
    prefix = before.rsplit("Caught ", 1)[0] if "Caught " in before else ""
    if after:  # the wrapper's words go on after the worker's: no space before its full stop
        worker += after if after[0] in ".,;:" else " " + after
    return f"{prefix}{worker}".strip()
