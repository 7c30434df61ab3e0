"""Hugging Face Space entry point: ``python app.py [--model ORG/NAME] [--host H] [--port P]``.

See ``app/main.py`` for every setting and its environment variable (``OTSEG_MODEL``, ...).
"""

from app.main import main

if __name__ == "__main__":
    main()
