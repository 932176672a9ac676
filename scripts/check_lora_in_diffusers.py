#!/usr/bin/env python3
# Checks that a LoRA written by this crate (`UNetLora::save`) loads in diffusers and gives the same
# UNet output as this crate's UNet with the adapter attached.
#
# Pinned: torch 2.15.0 (CPU), diffusers 0.42.1, peft 0.21.2, safetensors, numpy.
# Make the input (from the repository root), then run:
#   INSTRUCT_PIX2PIX_EXPORT_DIR=/tmp/t3-export cargo test --test integration train_persist::
#   python scripts/check_lora_in_diffusers.py /tmp/t3-export/lora
# DIR holds pytorch_lora_weights.safetensors and cases.safetensors (sample, timesteps,
# encoder_hidden_states, and `output`: this crate's UNet output with the adapter), made for the
# pipeline tests/fixtures/pipelines/sd1-tiny (override with --pipeline).
import argparse
import os

import numpy as np
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from PIL import Image
from safetensors.torch import load_file

parser = argparse.ArgumentParser()
parser.add_argument("lora_dir")
parser.add_argument("--pipeline", default=os.path.join("tests", "fixtures", "pipelines", "sd1-tiny"))
args = parser.parse_args()

torch.set_num_threads(2)
pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.pipeline, safety_checker=None)
case = load_file(os.path.join(args.lora_dir, "cases.safetensors"))
with torch.no_grad():
    base = pipe.unet(case["sample"], case["timesteps"], encoder_hidden_states=case["encoder_hidden_states"]).sample
pipe.load_lora_weights(args.lora_dir)  # what a user does with the output folder
n_lora = sum(1 for n, _ in pipe.unet.named_parameters() if "lora_" in n)
with torch.no_grad():
    out = pipe.unet(case["sample"], case["timesteps"], encoder_hidden_states=case["encoder_hidden_states"]).sample
ours = case["output"]
scale = ours.abs().max().item()
diff = (out - ours).abs().max().item()
print(f"LoRA tensors loaded by diffusers: {n_lora}")
print(f"adapter effect, max |lora - base| / max|out| = {(out - base).abs().max().item() / scale:.4f}")
print(f"diffusers vs this crate, max |diff| = {diff:.3e}, relative {diff / scale:.3e}")

# And an edit with the LoRA, end to end.
rng = np.random.default_rng(0)
image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
result = pipe(
    "invert the colors", image=image, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
    output_type="np",
).images[0]
print(f"edit with the LoRA: image {result.shape}, mean {result.mean():.4f}, finite {np.isfinite(result).all()}")
ok = diff / scale < 1e-4
print("OK" if ok else "MISMATCH")
raise SystemExit(0 if ok else 1)
