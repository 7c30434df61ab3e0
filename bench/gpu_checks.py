"""ZegOT training and inference on a GPU, and the demo's ZeroGPU boundary on CUDA, in one run.

    python bench/gpu_checks.py                       # CUDA, ViT-B/16 dimensions, random weights
    python bench/gpu_checks.py --device cpu --quick  # smoke test of both sections, tiny models

(zegot) training steps of ``zegot-voc-inductive`` and ``zegot-coco-transductive`` (171 classes:
    4 learned prompts × K class names through the text tower with gradients) on synthetic 512²
    batches of 4 (``train.step_timer``, the step of a run, the original Sinkhorn rule unless
    ``--iterations``): median seconds per step and peak GPU memory, the transductive preset at a
    step of each phase of its schedule (seen classes only, frozen-copy pseudo-labels, self
    pseudo-labels); then the predictor on one 512² photo, ZegOT vs OTSeg, fp32 and bf16.
(app) the demo's sequence through ``app.gpu`` (image tower → text embeddings → head maps, one
    user's ``OTSegPredictor`` around ``RemoteModel``) for an OTSeg and a ZegOT, the model on the
    device, against the same model on the CPU: every boundary result must be a CPU tensor, and
    the labels and probabilities must match.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a plain checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_core import segmenter, uptime  # noqa: E402
from bench_gpu import timed  # noqa: E402

import otseg  # noqa: E402, F401 - torchvision patch before open_clip
from otseg.inference.predictor import OTSegPredictor  # noqa: E402
from otseg.models.otseg import build_model  # noqa: E402
from otseg.models.zegot import build_zegot, zegot_tiny_config  # noqa: E402
from otseg.models.zegot.towers import build_random_clip  # noqa: E402
from otseg.registry import get_preset  # noqa: E402


def peak_gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def build_pair(quick: bool) -> dict[str, torch.nn.Module]:
    """An OTSeg and a ZegOT with random frozen towers (ViT-B/16, VOC presets; tiny with quick),
    both with a text tower, in eval mode on the CPU."""
    torch.manual_seed(0)
    if quick:
        sys.path.insert(0, str(REPO / "tests"))
        from factories import tiny_config

        zcfg = zegot_tiny_config()
        ocfg = tiny_config()
        clip, tokenizer = build_random_clip(ocfg.vision, zcfg.text)
    else:
        zcfg = get_preset("zegot-voc-inductive").replace(clip_model=None, clip_pretrained=None)
        ocfg = get_preset("voc-inductive").replace(clip_model=None, clip_pretrained=None)
        clip, tokenizer = build_random_clip(zcfg.vision, zcfg.text)
    otseg_model = build_model(ocfg, clip=clip, tokenizer=tokenizer).eval()
    return {"OTSeg": otseg_model, "ZegOT": build_zegot(zcfg).eval()}


def photo(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A smooth random RGB photo (H, W, 3) uint8 (blocks of colour, so labels form regions)."""
    g = np.random.default_rng(seed)
    h, w = size
    small = g.integers(0, 256, size=(-(-h // 32), -(-w // 32), 3), dtype=np.uint8)
    return np.kron(small, np.ones((32, 32, 1), dtype=np.uint8))[:h, :w].copy()


# -- (zegot) ---------------------------------------------------------------------------------


def section_train(device: torch.device, quick: bool, steps: int, iterations: int | None) -> bool:
    from accelerate.state import AcceleratorState, GradientState

    from train.step_timer import time_training_step

    run_length = 10 if quick else 80000  # the COCO recipe's iterations (its phases: 20 %, 50 %)
    if quick:
        trans = zegot_tiny_config(setting="transductive")
        cases = [("zegot-tiny", "zegot-tiny", 0), ("zegot-tiny transductive", trans, 0)]
        cases += [("zegot-tiny transductive", trans, 3), ("zegot-tiny transductive", trans, 6)]
        batch = 2
    else:
        cases = [("zegot-voc-inductive", "zegot-voc-inductive", 0)]
        cases += [("zegot-coco-transductive", "zegot-coco-transductive", s) for s in (0, 24000)]
        cases += [("zegot-coco-transductive", "zegot-coco-transductive", 60000)]
        batch = 4
    rule = "original Sinkhorn rule" if iterations is None else f"{iterations} fixed Sinkhorn its"
    print(
        f"\n(zegot) training step (train.step_timer), batch {batch}, bf16, {rule}, median of {steps}"
    )
    ok = True
    for name, preset, at in cases:
        config = get_preset(preset) if isinstance(preset, str) else preset
        phase = _phase(config, at, run_length)
        trained = config.replace(setting="inductive") if phase == "seen" else config
        k = len(trained.training_class_ids)
        row = f"  {name:<26} step {at:>6} ({phase:<6} {k:>3} classes, {k * config.head.num_prompts:>3} text sequences)"
        AcceleratorState._reset_state(reset_partial_state=True)  # one setting per Accelerator
        GradientState._reset_state()
        reset_peak(device)
        try:
            seconds = time_training_step(
                preset, batch=batch, mixed_precision="bf16", steps=steps, warmup=2,
                sinkhorn_iters=iterations, tf32=True, cpu=device.type == "cpu", at_step=at,
                iterations=run_length,
            )  # fmt: skip
        except Exception as e:  # e.g. out of memory: the other presets still run
            print(f"{row}  FAILED {type(e).__name__}: {str(e)[:300]}  peak {peak_gib(device)}")
            ok = False
            continue
        print(f"{row}  {seconds:.3f} s/step ({1 / seconds:.2f} steps/s)  peak {peak_gib(device)}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # step_timer turns TF32 on
        torch.backends.cudnn.allow_tf32 = False
    return ok


def _phase(config, step: int, iterations: int) -> str:
    if config.setting != "transductive":
        return config.setting[:6]  # "induct" (seen classes) or "fully"
    if step < round(config.self_train_start * iterations):
        return "seen"
    return "frozen" if step < round(config.frozen_teacher_until * iterations) else "self"


def section_predictor(models: dict, device: torch.device, repeats: int) -> None:
    """set_image + predict on one photo of the preset's crop size (one slide window)."""
    print(f"\n(zegot) predictor, one {_crop(models)}² photo (1 window), mean ms of {repeats}")
    for name, model in models.items():
        model = model.to(device)
        s = model.config.test_crop
        image = photo((s, s))
        row = []
        for precision in ("fp32", "bf16"):
            run = segmenter(model, image, precision)
            row.append(f"{precision} {timed(run, device, repeats):.1f}")
        print(f"  {name}: " + ", ".join(row))
        model.to("cpu")


def _crop(models: dict) -> int:
    return next(iter(models.values())).config.test_crop


# -- (app) -----------------------------------------------------------------------------------


def checked_boundary(gpu, results: list[str]):
    """Wrap every ``app.gpu`` boundary function: each result's tensors must be on the CPU."""
    originals = {name: getattr(gpu, name) for name in gpu.GPU_FUNCTIONS}

    def wrap(name, fn):
        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            tensors = _tensors(out)
            bad = [str(t.device) for t in tensors if t.device.type != "cpu"]
            results.append(f"{name}: {len(tensors)} tensors" + (f", NOT CPU {bad}" if bad else ""))
            return out

        return call

    for name, fn in originals.items():
        setattr(gpu, name, wrap(name, fn))
    return originals


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for x in out for t in _tensors(x)]
    return []


def demo_sequence(gpu, model, precision: str, image: np.ndarray, names: list[str]):
    """What the demo's Segment does: register, a user's predictor around ``RemoteModel``,
    image tower, vocabulary (``RemoteModel`` sends the names in batches), predict."""
    key = gpu.register(model, precision)
    predictor = OTSegPredictor(gpu.RemoteModel(key), mode="slide")
    predictor.set_image(image)
    predictor.set_vocabulary(names)
    return predictor.predict()


def section_app(models: dict, device: torch.device) -> bool:
    from app import gpu

    image = photo((375, 500), seed=1) if _crop(models) >= 512 else photo((80, 112), seed=1)
    print(
        f"\n(app) the demo's sequence through app.gpu on a {image.shape[0]}×{image.shape[1]} "
        f"photo, model on {device} vs on cpu (fp32)"
    )
    ok = True
    for name, model in models.items():
        names = list(model.config.class_names)
        ref = demo_sequence(gpu, model.to("cpu"), "fp32", image, names)
        on_device = model.to(device)  # (ZegOT holds a lock: no deepcopy)
        for precision in ("fp32", "bf16"):
            results: list[str] = []
            originals = checked_boundary(gpu, results)
            try:
                with torch.no_grad():
                    got = demo_sequence(gpu, on_device, precision, image, names)
            finally:
                for fn_name, fn in originals.items():
                    setattr(gpu, fn_name, fn)
            cpu_only = not any("NOT CPU" in r for r in results)
            agree = float((got.labels == ref.labels).mean())
            diff = float(np.abs(got.probs - ref.probs).max())
            calls = {r.split(":")[0] for r in results}
            print(
                f"  {name} {precision}: {len(results)} boundary calls "
                f"({', '.join(sorted(calls))}), all results CPU tensors: {cpu_only}; labels equal "
                f"{agree:.4f}, max |Δ prob| {diff:.1e}, prompt maps "
                f"{'same shape' if _same_shape(got, ref) else 'DIFFER'}"
            )
            if not cpu_only:
                print("    " + "; ".join(r for r in results if "NOT CPU" in r))
            ok &= cpu_only and (precision != "fp32" or agree > 0.999)
        model.to("cpu")
    print(f"  boundary check {'passed' if ok else 'FAILED'}")
    return ok


def _same_shape(a, b) -> bool:
    fields = [f.name for f in dataclasses.fields(a) if f.name in ("labels", "probs", "prompt_maps")]
    return all(np.shape(getattr(a, f)) == np.shape(getattr(b, f)) for f in fields)


def guarded(fn) -> bool:
    """Run a section; a failure is printed and the next section still runs."""
    try:
        return bool(fn())
    except Exception:
        traceback.print_exc(file=sys.stdout)
        return False


def predictors(models: dict, device: torch.device, repeats: int) -> bool:
    with torch.inference_mode():
        section_predictor(models, device, repeats)
    print(f"  peak GPU memory of the predictors {peak_gib(device)}")
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny models, few repeats (smoke test)")
    ap.add_argument("--only", default="zegot,app", help="comma-separated sections: zegot, app")
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=None, help="fixed Sinkhorn iterations")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.quick:
        args.train_steps, args.repeats = 1, 1
    only = set(args.only.split(","))
    unknown = only - {"zegot", "app"}
    if unknown:
        ap.error(f"--only takes zegot and/or app, got {sorted(unknown)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"torch {torch.__version__}, device {device} ({name}), uptime: {uptime()}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
        torch.backends.cudnn.allow_tf32 = False
    ok = True
    t0 = time.perf_counter()
    if "app" in only:  # first: the quickest, and a pass/fail check
        ok = guarded(lambda: section_app(build_pair(args.quick), device))
    if "zegot" in only:
        reset_peak(device)
        ok &= guarded(lambda: predictors(build_pair(args.quick), device, args.repeats))
        ok &= guarded(lambda: section_train(device, args.quick, args.train_steps, args.iterations))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; uptime: {uptime()}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
