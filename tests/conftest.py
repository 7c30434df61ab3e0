"""Test-session settings shared by every test file."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest

# before anything imports gradio: no usage analytics or version check calls from tests
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

# Tests never touch the network: the Hub is offline, weights come from local tiny models.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Converted image towers (otseg.inference.engine) go to one folder per test session, shared by
# the tests (its keys include the weights), never to the user's cache.
os.environ["OTSEG_ENGINE_CACHE"] = tempfile.mkdtemp(prefix="otseg-engines-")
atexit.register(shutil.rmtree, os.environ["OTSEG_ENGINE_CACHE"], True)


def _absl_to_real_stderr() -> None:
    """``import openvino`` imports ``absl.logging``, whose handler keeps the ``sys.stderr`` of
    that moment (pytest's capture) and closes it when a later ``logging.config.dictConfig``
    (uvicorn's, when a test launches the demo) shuts handlers down: pytest then fails on its
    own closed capture. Point that handler at the real stderr, which it never closes."""
    try:
        from absl import logging as absl_logging
    except ImportError:  # no openvino, no absl: nothing to fix
        return
    absl_logging.get_absl_handler().python_handler.setStream(sys.__stderr__)


_absl_to_real_stderr()


@pytest.fixture
def fresh_accelerate():
    """Forget Accelerate's process-wide state after a test that runs ``train.train.main`` in
    process (use with ``pytestmark = pytest.mark.usefixtures("fresh_accelerate")``)."""
    yield
    from train_helpers import reset_accelerate

    reset_accelerate()
