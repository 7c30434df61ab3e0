"""Final export: the otseg model directory the demo loads, optionally pushed to the Hub."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

logger = logging.getLogger("train")


def push_problem(repo_id: str) -> str | None:
    """Why pushing to ``repo_id`` at the end of training would fail (offline, no token,
    Hub unreachable, token rejected), or None; checked at the start so a run can warn early."""
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 forbids uploads"
    if get_token() is None:
        return "no Hugging Face token (run `hf auth login` or set HF_TOKEN)"
    from otseg.weights.hub import hub_unreachable_reason

    unreachable = hub_unreachable_reason()
    if unreachable:
        return unreachable
    try:
        HfApi().whoami()
    except Exception as e:  # any failure means the upload would fail the same way
        return f"the Hub rejected the token ({type(e).__name__}: {e})"
    return None


# train.train's exit status when training and the local export succeeded but the upload failed
# (2 is bad input, 1 a crash): a script can tell, and push the intact export later.
PUSH_FAILED_EXIT_CODE = 3


def push_later_hint(directory: Path, repo_id: str) -> str:
    return f"push it later with: hf upload {repo_id} {directory} --repo-type model"


def export_model(
    accelerator: Accelerator,
    model: Any,
    directory: Path,
    *,
    card: dict[str, Any],
    push_to_hub: str | None = None,
) -> str | None:
    """Write ``directory`` (config.json, model.safetensors, text embeddings when stored,
    README.md model card with ``card``) on the main process, atomically: a folder is written
    beside it and renamed into place, then upload it to ``push_to_hub``. Collective: call on
    every process.

    A failed upload does not raise: it is logged with how to push the intact export later, and
    that message is returned on every process (None: no upload asked, or it succeeded)."""
    failure = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(model)
        tmp = directory.with_name(f".tmp-{directory.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        net.save_pretrained(tmp, card=card)
        if directory.exists():
            old = directory.with_name(f".old-{directory.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            shutil.rmtree(old)
        os.replace(tmp, directory)
        if push_to_hub:
            try:
                url = net.push_to_hub(push_to_hub, card=card)
                logger.info(f"pushed to https://huggingface.co/{push_to_hub} ({url})")
            except Exception as e:  # network, auth, quota...: the local export is what matters
                failure = (
                    f"push to {push_to_hub} failed ({type(e).__name__}: {str(e)[:300]}); the "
                    f"exported model in {directory} is intact; "
                    f"{push_later_hint(directory, push_to_hub)}"
                )
                logger.error(failure)
    accelerator.wait_for_everyone()
    if push_to_hub and accelerator.num_processes > 1:
        failure = broadcast_object_list([failure])[0]
    return failure
