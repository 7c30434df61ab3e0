"""Tiny random models for tests, saved in exactly the formats the Hub would serve."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

import otseg  # noqa: F401 - applies the torchvision patch before open_clip
from otseg.config import OTSegConfig, tiny_config
from otseg.models.otseg import OTSeg, build_model
from otseg.models.zegot import ZegOT

PARITY_DIR = Path(
    os.environ.get("OTSEG_PARITY_DIR", Path(__file__).resolve().parents[2] / "shared" / "parity")
)


def skip_or_fail(message: str, *, allow_module_level: bool = False) -> None:
    """Skip locally; under CI (CI=true) fail instead, so a skip never hides something CI lacks."""
    import pytest

    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message, allow_module_level=allow_module_level)


def parity_fixture(name: str) -> Path:
    """A parity fixture directory; missing fixtures fail under CI (CI=true) and skip locally."""
    path = PARITY_DIR / name
    if not (path / "fixture.json").is_file():
        skip_or_fail(f"parity fixture {name!r} not found under {PARITY_DIR} (set OTSEG_PARITY_DIR)")
    return path


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def fill_hf_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """Lay out ``files`` as the Hugging Face cache holds a downloaded repo; returns the snapshot."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        (snapshot / name).write_bytes(Path(src).read_bytes())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def save_tiny_clip(directory: Path, seed: int = 0) -> Path:
    """A random open_clip model (QuickGELU ViT 64×64, 2-layer text tower) as an open_clip dir."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}})
    )
    model = open_clip.CLIP(**{k: v for k, v in TINY_CLIP_CFG.items()})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


def randomise_(module: torch.nn.Module, seed: int, spread: float = 0.3) -> torch.nn.Module:
    """Give every parameter of ``module`` a random value, in place: at their default
    initialisation (LayerNorms at weight 1 / bias 0, zero attention biases) two norms or a bias
    left unscaled cannot be told apart. Matrices get fan-in-scaled normal entries; vectors
    ``spread``-wide normal entries (around 1 for norm weights). Returns ``module``."""
    g = torch.Generator().manual_seed(seed)
    norms = {
        id(m.weight)
        for m in module.modules()
        if isinstance(m, torch.nn.LayerNorm | torch.nn.GroupNorm) and m.weight is not None
    }
    with torch.no_grad():
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            if id(p) in norms:
                p.copy_(1.0 + spread * noise)
            elif p.dim() >= 2:
                p.copy_(noise * p[0].numel() ** -0.5)
            else:
                p.copy_(spread * noise)
    return module


def tiny_model(seed: int = 0, clip: str | None = None, **changes) -> OTSeg:
    """A tiny OTSeg; with ``clip`` (an open_clip name such as 'local-dir:/x') it has a text tower."""
    from otseg.weights.clip import load_clip

    torch.manual_seed(seed)
    cfg = tiny_config(**changes)
    if clip is None:
        names = cfg.class_names
        bank = {
            n: torch.nn.functional.normalize(torch.randn(cfg.num_prompts, 32), dim=-1)
            for n in names
        }
        return build_model(cfg, text_bank=bank).eval()
    cfg = cfg.replace(clip_model=clip, clip_pretrained=None)
    model, tokenizer = load_clip(clip)
    return build_model(cfg, clip=model, tokenizer=tokenizer).eval()


def tiny_zegot(seed: int = 0, **changes) -> ZegOT:
    """A tiny ZegOT (``zegot_tiny_config(**changes)``, random towers), in eval mode."""
    from otseg.models.zegot import build_zegot, zegot_tiny_config

    torch.manual_seed(seed)
    return build_zegot(zegot_tiny_config(**changes)).eval()


def fixture_config(fixture_dir: Path) -> OTSegConfig:
    """The OTSegConfig of an original-implementation parity fixture (from its fixture.json)."""
    fx = json.loads((fixture_dir / "fixture.json").read_text())
    arch = fx["architecture"]
    enc, head = arch["image_encoder"], arch["decode_head"]
    seg = arch["segmentor"]
    n = arch["text_embedding"]["N"]
    transductive = bool(seg["self_training"])
    return OTSegConfig(
        vision=otseg.config.VisionConfig(
            image_size=enc["input_resolution"],
            patch_size=enc["patch_size"],
            width=enc["width"],
            layers=enc["layers"],
            heads=enc["heads"],
            mlp_ratio=enc["mlp_hidden"] / enc["width"],
            embed_dim=enc["output_dim"],
            num_prompt_tokens=enc["num_prompt_tokens"],
            deep_prompt_layers=enc["total_d_layer"],
        ),
        head=otseg.config.HeadConfig(
            num_layers=head["num_layers"],
            ffn_dim=head["dim_feedforward"],
            sinkhorn_eps=head["sinkhorn"]["eps_mps"],
            sinkhorn_max_iter=head["sinkhorn"]["max_iter"],
            sinkhorn_thresh=head["sinkhorn"]["thresh"],
        ),
        dataset="parity",
        class_names=tuple(seg["class_names"]),
        unseen=tuple(seg["novel_class"]),
        setting="transductive" if transductive else "inductive",
        templates=tuple(f"prompt {i} of {{}}" for i in range(n)),
        ensemble_lambda=1.0 - head["ensemble_weight_decoder"],
        calibration=0.0 if transductive else head["calibration_weight_on_seen"],
        resize_short=seg["test_cfg"]["crop_size"][0],
        test_crop=seg["test_cfg"]["crop_size"][0],
        test_stride=seg["test_cfg"]["stride"][0],
        pixel_mean=tuple(seg["img_norm_cfg"]["mean"]),
        pixel_std=tuple(seg["img_norm_cfg"]["std"]),
        clip_model=None,
        clip_pretrained=None,
    )


def random_photo(h: int = 80, w: int = 112, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 smooth random image."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(h // 8 + 2, w // 8 + 2, 3)).astype(np.float32)
    img = torch.nn.functional.interpolate(
        torch.from_numpy(base).permute(2, 0, 1)[None], size=(h, w), mode="bilinear"
    )
    return img[0].permute(1, 2, 0).clamp(0, 255).to(torch.uint8).numpy()
