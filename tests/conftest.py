"""Test-session settings shared by every test file."""

from __future__ import annotations

import os

import pytest

# before anything imports gradio: no usage analytics or version check calls from tests
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# Tests never touch the network: the Hub is offline, weights come from local tiny models.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def fresh_accelerate():
    """Forget Accelerate's process-wide state after a test that runs ``train.train.main`` in
    process (use with ``pytestmark = pytest.mark.usefixtures("fresh_accelerate")``)."""
    yield
    from train_helpers import reset_accelerate

    reset_accelerate()
