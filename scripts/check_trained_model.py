#!/usr/bin/env python3
# Checks that a final model folder written by this crate (`train::output::write_final_model`)
# loads with `StableDiffusionInstructPix2PixPipeline.from_pretrained` and edits, and that its UNet
# holds the weights this crate was given (`source_unet.safetensors` beside it, when present).
#
# Pinned: torch 2.15.0 (CPU), diffusers 0.42.1, transformers 5.24.0, safetensors, numpy, pillow.
# Make the input (from the repository root), then run:
#   INSTRUCT_PIX2PIX_EXPORT_DIR=/tmp/t3-export cargo test --test integration train_persist::
#   python scripts/check_trained_model.py /tmp/t3-export/final_model
# Any trained output folder works too: python scripts/check_trained_model.py OUTPUT_DIR
import argparse
import os

import numpy as np
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image
from safetensors.torch import load_file

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("--prompt", default="invert the colors")
parser.add_argument("--steps", type=int, default=3)
args = parser.parse_args()

torch.set_num_threads(2)
pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model_dir)
print(f"loaded {type(pipe).__name__}: unet in_channels {pipe.unet.config.in_channels}, "
      f"components {sorted(k for k, v in pipe.components.items() if v is not None)}")
ok = pipe.unet.config.in_channels == 8

source = os.path.join(args.model_dir, "source_unet.safetensors")
if os.path.exists(source):
    expected = load_file(source)
    state = pipe.unet.state_dict()
    missing = sorted(set(expected) ^ set(state))
    worst = max((state[k] - v).abs().max().item() for k, v in expected.items() if k in state)
    print(f"UNet weights vs the tensors given to this crate: {len(expected)} tensors, "
          f"{len(missing)} names differ, max |diff| {worst:.3e}")
    ok = ok and not missing and worst == 0.0

rng = np.random.default_rng(0)
image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
result = pipe(
    args.prompt, image=image, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0),
    output_type="np",
).images[0]
finite = bool(np.isfinite(result).all())
print(f"edit {args.prompt!r}: image {result.shape}, mean {result.mean():.4f}, finite {finite}")
ok = ok and finite
print("OK" if ok else "MISMATCH")
raise SystemExit(0 if ok else 1)
