"""What a Hugging Face Space installs and preloads: the CPU requirements keep the runtime pins,
the demo runs without the training packages, and the preloaded CLIP file is the one the demo
loads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import otseg  # noqa: F401 - before open_clip: its torchvision fix

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("accelerate", "tensorboard")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_cpu_space_requirements_are_the_runtime_pins_with_the_cpu_torch_index():
    runtime = _pins(ROOT / "requirements.txt")
    cpu = ROOT / "space" / "requirements-cpu.txt"
    assert _pins(cpu) == runtime
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu.read_text().splitlines()
    assert not set(TRAINING_ONLY) & set(runtime)
    assert set(TRAINING_ONLY) <= set(_pins(ROOT / "requirements-train.txt"))


def test_the_demo_runs_without_the_training_packages(tmp_path):
    """app.py's imports and the page build with accelerate and tensorboard unimportable."""
    script = (
        "import sys\n"
        + "".join(f"sys.modules[{name!r}] = None\n" for name in TRAINING_ONLY)
        + "import app.main, otseg\n"
        "from app.inference import LoadedModel\n"
        "app.main.build_demo(LoadedModel(None, 'none', 'no model'))\n"
        "print('OK')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.stdout.strip().endswith("OK"), out.stderr[-2000:]


def test_the_space_preloads_the_clip_file_the_demo_loads():
    import open_clip  # after otseg (imported above): its torchvision fix comes first

    from app.main import parse_args
    from otseg.weights.hub import CLIP_WEIGHT_NAMES

    front = (ROOT / "README.md").read_text().split("---")[1]
    entries = re.findall(r"^\s+- (\S+) (\S+)$", front.split("preload_from_hub:")[1], re.M)
    args = parse_args([])
    repo = open_clip.get_pretrained_cfg(args.clip, args.clip_pretrained)["hf_hub"].rstrip("/")
    assert (repo, CLIP_WEIGHT_NAMES[0]) in entries  # the file load_clip takes first
