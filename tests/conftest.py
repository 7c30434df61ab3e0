"""Test-session settings shared by every test file."""

from __future__ import annotations

import os

# before anything imports gradio: no usage analytics or version check calls from tests
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# Tests never touch the network: the Hub is offline, weights come from local tiny models.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
