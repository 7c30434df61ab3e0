"""Hugging Face Space entry point: ``python app.py [--model ORG/NAME] [--host H] [--port P]``.

See ``app/main.py`` for every setting and its environment variable (``OTSEG_MODEL``, ...).
"""

import contextlib

with contextlib.suppress(ImportError):  # on ZeroGPU, spaces comes before anything touches CUDA
    import spaces  # noqa: F401

from app.main import main  # noqa: E402

if __name__ == "__main__":
    from otseg.errors import run

    run(main)
