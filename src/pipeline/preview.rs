//! A cheap latent → RGB preview, for showing an edit forming step by step without running the VAE
//! decoder.
//!
//! Stable Diffusion 1.x/2.x latents (4 channels, in the diffusion space, i.e. already multiplied
//! by the VAE's `scaling_factor`) map to RGB almost linearly: `rgb = Σ_c latent[c] · F[c] + bias`,
//! then `(rgb + 1) / 2` clamped to [0, 1]. The factors are ComfyUI's `SD15.latent_rgb_factors`
//! (`comfy/latent_formats.py`, the successor of keturn's least-squares fit published for SD 1.4
//! and used by most SD front-ends); ComfyUI defines no bias for SD 1.5, so it is zero. The result
//! at latent resolution is upsampled to the requested size with a bilinear (triangle) filter.
//! It looks best on the model's denoised estimate; raw noisy latents of early steps show noise.

use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;

/// Latent channel → (R, G, B) contribution, one row per latent channel (ComfyUI's SD 1.5 table).
pub const LATENT_RGB_FACTORS: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// Per-colour offset added after the factors (zero for SD 1.5, as in ComfyUI).
pub const LATENT_RGB_BIAS: [f32; 3] = [0.0, 0.0, 0.0];

/// A preview of `[1, 4, h, w]` latents (any float dtype, any device; only the first batch item is
/// used) as a `width`×`height` RGB8 image.
pub fn latents_to_preview(
    latents: &Tensor,
    width: u32,
    height: u32,
) -> candle_core::Result<RgbImage> {
    let (_, channels, h, w) = latents.dims4()?;
    if channels != LATENT_RGB_FACTORS.len() {
        candle_core::bail!(
            "latents_to_preview: expected 4 latent channels, got {:?}",
            latents.dims()
        );
    }
    if h == 0 || w == 0 || width == 0 || height == 0 {
        candle_core::bail!("latents_to_preview: empty latents {:?}", latents.dims());
    }
    // Small (4·h·w values): move to the CPU first so any device works.
    let flat = latents
        .i(0)?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .reshape((channels, h * w))?;
    let factors_t: Vec<f32> = (0..3)
        .flat_map(|rgb| LATENT_RGB_FACTORS.iter().map(move |row| row[rgb]))
        .collect();
    let factors_t = Tensor::from_vec(factors_t, (3, channels), &Device::Cpu)?;
    let bias = Tensor::from_slice(&LATENT_RGB_BIAS, (3, 1), &Device::Cpu)?;
    // Colours in [-1, 1], then ((x + 1) / 2).clamp(0, 1) as ComfyUI does, at latent resolution,
    // and * 255 here already (it commutes with the resize) so the big image gets only the cast.
    let unit = factors_t.matmul(&flat)?.broadcast_add(&bias)?;
    let unit = ((unit + 1.0)? / 2.0)?
        .clamp(0f32, 1f32)?
        .affine(255.0, 0.0)?
        .reshape((3, h, w))?;
    // Separable bilinear resize as two matrix products, ordered so that the result comes out
    // directly as interleaved RGB rows: [3, h, w]·Rxᵀ → [3, h, W] → [h, W·3] → Ry· → [H, W·3].
    let (out_w, out_h) = (width as usize, height as usize);
    let rx = bilinear_matrix(w, out_w)?; // [W, w]
    let ry = bilinear_matrix(h, out_h)?; // [H, h]
    let rows = unit
        .reshape((3 * h, w))?
        .matmul(&rx.t()?)?
        .reshape((3, h * out_w))?
        .t()?
        .contiguous()?
        .reshape((h, out_w * 3))?;
    let rgb = ry.matmul(&rows)?;
    // Truncated to bytes, as ComfyUI's `.to(torch.uint8)`.
    let bytes = rgb.to_dtype(DType::U8)?.flatten_all()?.to_vec1::<u8>()?;
    RgbImage::from_raw(width, height, bytes)
        .ok_or_else(|| candle_core::Error::Msg("latents_to_preview: buffer size mismatch".into()))
}

/// `[out, in]` weights of 1-D bilinear resampling with PyTorch's `align_corners=False` rule
/// (sample at `(i + 0.5) · in / out − 0.5`, clamped to the edges); the identity when sizes match.
fn bilinear_matrix(input: usize, output: usize) -> candle_core::Result<Tensor> {
    let mut weights = vec![0f32; output * input];
    let scale = input as f64 / output as f64;
    for (i, row) in weights.chunks_exact_mut(input).enumerate() {
        let src = ((i as f64 + 0.5) * scale - 0.5).max(0.0);
        let lo = (src.floor() as usize).min(input - 1);
        let hi = (lo + 1).min(input - 1);
        let frac = (src - lo as f64).clamp(0.0, 1.0) as f32;
        row[lo] += 1.0 - frac;
        row[hi] += frac;
    }
    Tensor::from_vec(weights, (output, input), &Device::Cpu)
}
