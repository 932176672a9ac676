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
    python scripts/bench_train_diffusers.py MODEL_DIR --device cuda --batch 4 --mixed-precision fp16 \
        [--gradient-checkpointing]

With `--mixed-precision fp16|bf16` the step is accelerate's: the frozen networks in that dtype, the
UNet under autocast with float32 weights (LoRA: the frozen base in that dtype, the adapters float32),
torch's GradScaler for fp16. On a GPU the peak of torch's allocator is reported too.
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
parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
parser.add_argument("--batch", type=int, default=1, help="train_batch_size")
parser.add_argument("--gradient-checkpointing", action="store_true")
parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
args = parser.parse_args()
device = torch.device(args.device)
cuda = device.type == "cuda"
# accelerate's --mixed_precision: weight_dtype for the frozen networks, autocast for the UNet,
# GradScaler for fp16.
weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]


def sync():
    if cuda:
        torch.cuda.synchronize(device)
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
vae.to(device, dtype=weight_dtype)
text_encoder.to(device, dtype=weight_dtype)
unet.to(device)
if args.gradient_checkpointing:
    unet.enable_gradient_checkpointing()
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
    if args.mixed_precision != "no":
        # As diffusers' LoRA scripts: the frozen base in weight_dtype, the adapters in float32.
        unet.to(dtype=weight_dtype)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
params = [p for p in unet.parameters() if p.requires_grad]
scaler = torch.amp.GradScaler("cuda" if cuda else "cpu", enabled=args.mixed_precision == "fp16")
ema = EMAModel(unet.parameters(), model_cls=UNet2DConditionModel, model_config=unet.config) if args.use_ema else None
unet.train()
optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

rng = np.random.default_rng(0)
original = torch.tensor(rng.integers(0, 256, (args.batch, 3, args.size, args.size)), dtype=torch.float32)
original = (2 * (original / 255) - 1).to(device, dtype=weight_dtype)
edited = -original
input_ids = tokenizer(
    ["invert the colors"] * args.batch, max_length=tokenizer.model_max_length, padding="max_length",
    truncation=True, return_tensors="pt",
).input_ids.to(device)
null_conditioning = text_encoder(
    tokenizer([""], max_length=tokenizer.model_max_length, padding="max_length", return_tensors="pt")
    .input_ids.to(device)
)[0]
conditioning_dropout_prob = 0.05
generator = torch.Generator().manual_seed(0)


def step():
    latents = vae.encode(edited).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(latents)
    bsz = latents.shape[0]
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=device).long()
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(input_ids)[0]
    original_image_embeds = vae.encode(original).latent_dist.mode()
    random_p = torch.rand(bsz, generator=generator).to(device)
    prompt_mask = (random_p < 2 * conditioning_dropout_prob).reshape(bsz, 1, 1)
    encoder_hidden_states = torch.where(prompt_mask, null_conditioning, encoder_hidden_states)
    image_mask = 1 - (
        (random_p >= conditioning_dropout_prob).to(original_image_embeds.dtype)
        * (random_p < 3 * conditioning_dropout_prob).to(original_image_embeds.dtype)
    )
    original_image_embeds = image_mask.reshape(bsz, 1, 1, 1) * original_image_embeds
    concatenated = torch.cat([noisy_latents, original_image_embeds], dim=1)
    with torch.autocast(device.type, dtype=weight_dtype, enabled=args.mixed_precision != "no"):
        model_pred = unet(concatenated, timesteps, encoder_hidden_states, return_dict=False)[0]
    loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    if ema is not None:
        ema.step(unet.parameters())
    return loss.item()


step()  # warm-up, untimed
sync()
if cuda:
    torch.cuda.reset_peak_memory_stats(device)
times = []
for _ in range(args.steps):
    t0 = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - t0)

print(json.dumps({
    "impl": "diffusers",
    "size": args.size,
    "batch": args.batch,
    "device": args.device,
    "gradient_checkpointing": args.gradient_checkpointing,
    "mixed_precision": args.mixed_precision,
    "lora_rank": args.lora_rank,
    "use_ema": args.use_ema,
    "trainable_params": sum(p.numel() for p in params),
    "step_mean_s": statistics.mean(times),
    "step_median_s": statistics.median(times),
    "steps": args.steps,
    "load_s": load_seconds,
    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    "peak_gpu_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
    "threads": torch.get_num_threads(),
    "torch": torch.__version__,
}))
