#!/usr/bin/env python3
"""Time diffusers' train_instruct_pix2pix.py training step on CPU: the reference numbers the Rust
`train` command is compared with (docs/benchmarks.md, "Fine-tuning").

The step is the script's loop body (diffusers 0.42.1 examples/instruct_pix2pix): frozen VAE and
text encoder, `latent_dist.sample() * scaling_factor`, DDPM `add_noise`, conditioning dropout,
`F.mse_loss(float32)`, backward, `clip_grad_norm_(1.0)`, AdamW (lr 1e-4, the script's betas, eps and
weight decay), `optimizer.step()`, `zero_grad()`, and the EMA step with `--use_ema`. With `--lora-rank
N`, peft LoRA adapters on to_q/to_k/to_v/to_out.0 (as train_text_to_image_lora.py) train instead of
the UNet. Batch 1 at SIZE², one generated image pair; STEPS timed steps after one untimed warm-up
step. Prints one JSON line: seconds per step (mean, median), the peak RSS of the process.

Pinned versions: diffusers 0.42.1, transformers 5.24.0, torch 2.15.0 (CPU), peft.

    /work/pyenv/bin/python scripts/bench_train_diffusers.py MODEL_DIR --size 256 --steps 3
    /work/pyenv/bin/python scripts/bench_train_diffusers.py MODEL_DIR --size 256 --steps 3 --lora-rank 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from transformers import CLIPTextModel, CLIPTokenizer

parser = argparse.ArgumentParser()
parser.add_argument("model_dir")
parser.add_argument("--size", type=int, default=256)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--lora-rank", type=int, default=None)
parser.add_argument("--use-ema", action="store_true")
parser.add_argument("--threads", type=int, default=None)
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

started = time.perf_counter()
tokenizer = CLIPTokenizer.from_pretrained(args.model_dir, subfolder="tokenizer")
text_encoder = CLIPTextModel.from_pretrained(args.model_dir, subfolder="text_encoder")
vae = AutoencoderKL.from_pretrained(args.model_dir, subfolder="vae")
unet = UNet2DConditionModel.from_pretrained(args.model_dir, subfolder="unet")
noise_scheduler = DDPMScheduler.from_pretrained(args.model_dir, subfolder="scheduler")
vae.requires_grad_(False)
text_encoder.requires_grad_(False)
load_seconds = time.perf_counter() - started

if args.lora_rank:
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=["to_k", "to_q", "to_v", "to_out.0"],
        )
    )
params = [p for p in unet.parameters() if p.requires_grad]
ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config) if args.use_ema else None
unet.train()
optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

rng = np.random.default_rng(0)
original = torch.tensor(rng.integers(0, 256, (1, 3, args.size, args.size)), dtype=torch.float32)
original = 2 * (original / 255) - 1
edited = -original
input_ids = tokenizer(
    ["invert the colors"], max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
    return_tensors="pt",
).input_ids
null_conditioning = text_encoder(
    tokenizer([""], max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt").input_ids
)[0]
conditioning_dropout_prob = 0.05
generator = torch.Generator().manual_seed(0)


def step():
    latents = vae.encode(edited).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,)).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids)[0]
    original_image_embeds = vae.encode(original).latent_dist.mode()
    random_p = torch.rand(bsz, generator=generator)
    prompt_mask = (random_p < 2 * conditioning_dropout_prob).reshape(bsz, 1, 1)
    encoder_hidden_states = torch.where(prompt_mask, null_conditioning, encoder_hidden_states)
    image_mask = 1 - (
        (random_p >= conditioning_dropout_prob).to(original_image_embeds.dtype)
        * (random_p < 3 * conditioning_dropout_prob).to(original_image_embeds.dtype)
    )
    original_image_embeds = image_mask.reshape(bsz, 1, 1, 1) * original_image_embeds
    concatenated = torch.cat([noisy_latents, original_image_embeds], dim=1)
    model_pred = unet(concatenated, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if ema is not None:
        ema.step(unet.parameters())
    return loss.item()


step()  # warm-up, untimed
times = []
for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)

print(json.dumps({
    "impl": "diffusers",
    "size": args.size,
    "lora_rank": args.lora_rank,
    "use_ema": args.use_ema,
    "trainable_params": sum(p.numel() for p in params),
    "step_mean_s": statistics.mean(times),
    "step_median_s": statistics.median(times),
    "steps": args.steps,
    "load_s": load_seconds,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
}))
