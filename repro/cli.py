"""What the scripts share: bad input ends the program with one clear line, not a traceback."""

from __future__ import annotations

import sys
from typing import Callable

USER_ERRORS = (ValueError, FileNotFoundError)  # wrong flags, missing or unfit files; bugs keep tracebacks


def run(work: Callable[[], object]) -> int:
    """Exit code 0 when `work` succeeds; 2 with `error: ...` on stderr for a user error."""
    try:
        work()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
