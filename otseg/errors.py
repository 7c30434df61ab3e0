"""The one exception type for bad input, shared by the library, the command lines and the demo.

A ``UserError`` says what was wrong with what the user gave (an argument, a file, a class name,
an image, a config, a checkpoint, a download) and what to do; the command lines print it as one
line and the demo as a toast. Any other exception is a bug and keeps its traceback. It is a
``ValueError``, so ``except ValueError`` around library calls keeps working.

``run(main)`` is how every command line ends (``otseg ...``, ``train.train``, ``python app.py``):
a problem with what the user gave prints one line, ``error: <what and what to do>``, on stderr and
exits with code 2, without a traceback. Anything else is a bug and keeps its traceback;
``OTSEG_TRACEBACK=1`` shows the traceback for user errors too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong and what to do."""


class CheckpointError(UserError):
    """A file is not what it should be (wrong format, wrong or missing keys)."""


class WeightsNotFoundError(FileNotFoundError):
    """Model files could not be found locally or downloaded; the message says what to do."""


#: Exceptions that describe bad input: UserError covers CheckpointError, ImageError and
#: invalid settings; FileNotFoundError covers WeightsNotFoundError; the rest are file access.
#: A plain ValueError is a bug: it keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    UserError,
    FileNotFoundError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
USAGE_EXIT_CODE = 2  # as argparse uses for bad arguments


def fail(message: str) -> NoReturn:
    """Print ``error: message`` (first line only) on stderr and exit with code 2."""
    line = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    if not line.startswith("error:"):
        line = f"error: {line}"
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(USAGE_EXIT_CODE)


def run(main: Callable[[], object]) -> NoReturn:
    """Call ``main()`` (which parses ``sys.argv``) and exit: 0 when it returns something that is
    not an exit code, its code when it returns an int, 2 with one line for bad input."""
    try:
        result = main()
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("message"): a user-facing stop
            fail(e.code)
        raise
    except USER_ERRORS as e:
        if os.environ.get("OTSEG_TRACEBACK"):
            raise
        fail(f"{e}" or type(e).__name__)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    raise SystemExit(result if isinstance(result, int) and not isinstance(result, bool) else 0)
