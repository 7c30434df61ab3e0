"""Final export: the otseg model directory the demo loads, optionally pushed to the Hub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator


def export_model(
    accelerator: Accelerator,
    model: Any,
    directory: Path,
    *,
    card: dict[str, Any],
    push_to_hub: str | None = None,
) -> Path:
    """Write ``directory`` (config.json, model.safetensors, text embeddings when stored,
    README.md model card with ``card``) on the main process, atomically: a folder is written
    beside it and renamed into place. Collective: call on every process."""
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
            url = net.push_to_hub(push_to_hub, card=card)
            print(f"pushed to https://huggingface.co/{push_to_hub} ({url})")
    accelerator.wait_for_everyone()
    return directory
