"""The one exception type for bad input, shared by the library, the command lines and the demo.

A ``UserError`` says what was wrong with what the user gave (an argument, a file, a class name,
an image, a config, a checkpoint, a download) and what to do; the command lines print it as one
line and the demo as a toast. Any other exception is a bug and keeps its traceback. It is a
``ValueError``, so ``except ValueError`` around library calls keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong and what to do."""
