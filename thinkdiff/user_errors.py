"""How the command-line entry points report a user's mistake: one line on stderr and exit status 2, no traceback.

What a user can fix raises a `thinkdiff.errors.ThinkDiffUserError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import ThinkDiffUserError


def exit_status(run: Callable[[], int]) -> int:
    """`run()`'s exit status, or 2 after printing `error: <message>` when it raises a user error; 130 with one line
    when training was interrupted (SIGINT/SIGTERM) or Ctrl-C stopped a command."""
    from .train.interrupt import TrainingInterrupted

    try:
        return run()
    except ThinkDiffUserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as err:
        print(str(err), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130
