"""``python -m otseg COMMAND ...``: the ``otseg`` command (see :mod:`otseg.cli`)."""

from .cli import main

main()
