#!/usr/bin/env python3
"""Time diffusers' InstructPix2Pix edit on CPU: the reference numbers the Rust crate is compared with.

Loads MODEL_DIR (e.g. the output of scripts/make_bench_model.py), edits a generated SIZExSIZE image
with guidance (three-way UNet batch) for STEPS steps, after one untimed 1-step warm-up edit, and prints
one JSON line: seconds for the whole edit, per UNet-loop step (mean and median), for the text encoder,
the VAE encode and decode, the model load, and the peak RSS of the process.

Pinned versions: diffusers 0.42.1, transformers 5.24.0, torch 2.15.0 (CPU).

    /work/pyenv/bin/python scripts/bench_diffusers.py MODEL_DIR --size 256 --steps 10
    /work/pyenv/bin/python scripts/bench_diffusers.py MODEL_DIR --size 256 --steps 10 --dtype bfloat16
    python scripts/bench_diffusers.py MODEL_DIR --size 512 --steps 20 --dtype float16 --device cuda

On a GPU (`--device cuda`) every timer waits for the device first, and the peak GPU memory
(torch's allocator) is reported too.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

import diffusers
from diffusers import StableDiffusionInstructPix2PixPipeline

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_input_image(size: int):
    path = REPO / "tests" / "fixtures" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_input_image(size, size, 0)


class Timer:
    """Accumulates wall-clock seconds of wrapped calls under a name."""

    def __init__(self, sync=lambda: None):
        self.seconds: dict[str, float] = {}
        self.sync = sync

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        return timed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--size", type=int, default=256, help="input image width and height")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--image-guidance-scale", type=float, default=1.5)
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    diffusers.utils.logging.disable_progress_bar()
    dtype = DTYPES[args.dtype]

    start = time.perf_counter()
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model_dir, dtype=dtype)
    pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - start
    cuda = args.device.startswith("cuda")

    def sync():
        # GPU work is asynchronous: a time is only a time once the device is done.
        if cuda:
            torch.cuda.synchronize(args.device)

    image = make_input_image(args.size)
    factor = pipe.vae_scale_factor
    latent_shape = (1, pipe.vae.config.latent_channels, args.size // factor, args.size // factor)

    def edit(steps: int, callback=None):
        latents = torch.randn(latent_shape, generator=torch.Generator("cpu").manual_seed(0))
        latents = latents.to(device=args.device, dtype=dtype)
        return pipe(
            prompt="make it snowy",
            image=image,
            num_inference_steps=steps,
            guidance_scale=args.guidance_scale,
            image_guidance_scale=args.image_guidance_scale,
            latents=latents,
            output_type="np",
            callback_on_step_end=callback,
        )

    with torch.inference_mode():
        if not args.no_warmup:
            edit(1)

        timer = Timer(sync)
        if cuda:
            torch.cuda.reset_peak_memory_stats(args.device)
        pipe.text_encoder.forward = timer.wrap("text_encoder", pipe.text_encoder.forward)
        pipe.vae.encode = timer.wrap("vae_encode", pipe.vae.encode)
        pipe.vae.decode = timer.wrap("vae_decode", pipe.vae.decode)
        pipe.unet.forward = timer.wrap("unet", pipe.unet.forward)
        step_ends: list[float] = []

        def on_step_end(_pipe, _i, _t, _kwargs):
            sync()
            step_ends.append(time.perf_counter())
            return {}

        # The loop starts right after the VAE encode and the initial latents: take the first UNet
        # call's start as the start of step 0.
        first_unet_start: list[float] = []
        unet_forward = pipe.unet.forward

        @functools.wraps(unet_forward)
        def marking_unet(*a, **k):
            if not first_unet_start:
                first_unet_start.append(time.perf_counter())
            return unet_forward(*a, **k)

        pipe.unet.forward = marking_unet
        sync()
        start = time.perf_counter()
        edit(args.steps, on_step_end)
        sync()
        edit_s = time.perf_counter() - start

    boundaries = first_unet_start + step_ends
    step_s = [b - a for a, b in zip(boundaries, boundaries[1:])]
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "model_dir": str(args.model_dir),
        "size": args.size,
        "steps": args.steps,
        "dtype": args.dtype,
        "guided": args.guidance_scale > 1.0 and args.image_guidance_scale >= 1.0,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 3),
        "edit_s": round(edit_s, 3),
        "unet_loop_s": round(sum(step_s), 3),
        "s_per_step_mean": round(statistics.mean(step_s), 3),
        "s_per_step_median": round(statistics.median(step_s), 3),
        "unet_s": round(timer.seconds.get("unet", 0.0), 3),
        "text_encoder_s": round(timer.seconds.get("text_encoder", 0.0), 3),
        "vae_encode_s": round(timer.seconds.get("vae_encode", 0.0), 3),
        "vae_decode_s": round(timer.seconds.get("vae_decode", 0.0), 3),
        "peak_rss_gib": round(peak_rss_kib / 2**20, 3),
        "device": args.device,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated(args.device) / 2**30, 3) if cuda else None,
        "gpu": torch.cuda.get_device_name(args.device) if cuda else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
