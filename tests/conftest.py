"""Test-session settings shared by every test file."""

from __future__ import annotations

import os

# before anything imports gradio: no usage analytics or version check calls from tests
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
