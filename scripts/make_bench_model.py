#!/usr/bin/env python3
"""Make a random-weight InstructPix2Pix pipeline with exactly timbrooks/instruct-pix2pix's shapes.

For benchmarks only (the Hub cannot be reached here, so the real weights cannot be had): SD 1.5 UNet
with 8 input channels, the SD VAE, the CLIP ViT-L/14 text encoder with the full real CLIP tokenizer
(openai-clip's vocabulary, written as vocab.json + merges.txt like timbrooks' repo) and timbrooks'
EulerAncestral scheduler config. Saved by diffusers' save_pretrained in float32 safetensors, about
4.3 GB: never commit the output.

Pinned versions: diffusers 0.42.1, transformers 5.24.0, torch 2.15.0, openai-clip (vocabulary only).

    /work/pyenv/bin/python scripts/make_bench_model.py OUT_DIR            # builds and saves (~2 min)
    /work/pyenv/bin/python scripts/make_bench_model.py OUT_DIR --dry-run  # shapes and counts only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

REPO = Path(__file__).resolve().parent.parent


def load_fixture_helpers():
    """tests/fixtures/make_fixtures.py owns the CLIP vocabulary and tokenizer-file writers."""
    path = REPO / "tests" / "fixtures" / "make_fixtures.py"
    spec = importlib.util.spec_from_file_location("make_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# timbrooks/instruct-pix2pix unet/config.json: SD 1.5's UNet with 8 input channels.
UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# The Stable Diffusion VAE (vae/config.json of SD 1.x and timbrooks/instruct-pix2pix).
VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# The text part of openai/clip-vit-large-patch14 (text_encoder/config.json of SD 1.x).
TEXT_ENCODER_CONFIG = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(fixtures, device: str) -> StableDiffusionInstructPix2PixPipeline:
    """The pipeline; device "meta" builds the models without memory or initialisation (counts only)."""
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    vocab, merges = fixtures.clip_vocab(None)
    if len(vocab) != TEXT_ENCODER_CONFIG["vocab_size"]:
        raise SystemExit(f"full CLIP vocabulary has {len(vocab)} tokens, expected 49408")
    tokenizer = fixtures.in_memory_tokenizer(vocab, merges, pad="<|endoftext|>")
    scheduler = EulerAncestralDiscreteScheduler.from_config(fixtures.TIMBROOKS_SCHEDULER_CONFIG)
    return StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="build on the meta device, print counts")
    args = parser.parse_args()
    fixtures = load_fixture_helpers()

    pipe = build(fixtures, "meta" if args.dry_run else "cpu")
    counts = {name: count(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")}
    print(json.dumps({"parameters": counts, "float32_bytes": 4 * sum(counts.values())}))
    if args.dry_run:
        return

    pipe.save_pretrained(args.out_dir, safe_serialization=True)
    vocab, merges = fixtures.clip_vocab(None)
    tokenizer_dir = args.out_dir / "tokenizer"
    for stale in tokenizer_dir.iterdir():
        stale.unlink()
    fixtures.write_legacy_clip_tokenizer(tokenizer_dir, vocab, merges, pad="<|endoftext|>")
    # The legacy files must load back and tokenize like the tokenizer that was built in memory.
    fixtures.check_tokenizer_equal(CLIPTokenizer.from_pretrained(tokenizer_dir), pipe.tokenizer)
    print(f"saved to {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
