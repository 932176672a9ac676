//! Pixels to tensors and back: diffusers' `VaeImageProcessor.preprocess` ([`to_tensor`]) and
//! `postprocess` ([`to_images`]). Files and resizing are [`super::image`], which stays free of
//! candle so the window can use it.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

/// diffusers' `VaeImageProcessor.preprocess` for one RGB8 image already at the edit size:
/// `[1, 3, H, W]` float32 in [-1, 1], computed as numpy/torch do it in float32:
/// `(x / 255) * 2 - 1`.
pub fn to_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let raw = img.as_raw();
    let mut data = Vec::with_capacity(3 * w * h);
    for c in 0..3 {
        data.extend(
            raw.chunks_exact(3)
                .map(|px| 2.0f32 * (f32::from(px[c]) / 255.0f32) - 1.0f32),
        );
    }
    Tensor::from_vec(data, (1, 3, h, w), device)
}

/// VAE output `[B, 3, H, W]` (any float dtype, any device) → RGB8 images, as diffusers'
/// `postprocess(output_type="pil")` does: `(x * 0.5 + 0.5).clamp(0, 1)` in the tensor's dtype,
/// then in float32 `* 255`, numpy's round (half to even) and the cast to `uint8`. NaN gives 0.
pub fn to_images(decoded: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, c, h, w) = decoded.dims4()?;
    if c != 3 {
        candle_core::bail!(
            "to_images: expected [B, 3, H, W] VAE output, got {:?}",
            decoded.dims()
        );
    }
    let cpu = decoded.to_device(&Device::Cpu)?;
    // Denormalised values in [0, 1] as float32, in [B, C, H, W] order.
    let unit: Vec<f32> = match cpu.dtype() {
        DType::F16 => denormalise(&cpu, half::f16::from_f32(0.5), half::f16::to_f32)?,
        DType::BF16 => denormalise(&cpu, half::bf16::from_f32(0.5), half::bf16::to_f32)?,
        DType::F64 => denormalise(&cpu, 0.5f64, |x| x as f32)?,
        _ => denormalise(&cpu.to_dtype(DType::F32)?, 0.5f32, |x| x)?,
    };
    let plane = h * w;
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        let item = &unit[i * 3 * plane..(i + 1) * 3 * plane];
        let mut raw = Vec::with_capacity(3 * plane);
        for p in 0..plane {
            for ch in 0..3 {
                raw.push(unit_to_byte(item[ch * plane + p]));
            }
        }
        let img = RgbImage::from_raw(w as u32, h as u32, raw)
            .ok_or_else(|| candle_core::Error::Msg("to_images: buffer size mismatch".into()))?;
        images.push(img);
    }
    Ok(images)
}

/// `(x * 0.5 + 0.5).clamp(0, 1)` over every element, computed in `T` (the tensor's dtype; `half`
/// is 0.5 in it), then widened to f32.
fn denormalise<T>(cpu: &Tensor, half: T, to_f32: impl Fn(T) -> f32) -> candle_core::Result<Vec<f32>>
where
    T: candle_core::WithDType + std::ops::Mul<Output = T> + std::ops::Add<Output = T> + From<u8>,
{
    Ok(cpu
        .flatten_all()?
        .to_vec1::<T>()?
        .into_iter()
        .map(|x| to_f32(clamp_unit(x * half + half)))
        .collect())
}

/// torch's `clamp(0, 1)`: NaN stays NaN.
fn clamp_unit<T: PartialOrd + From<u8> + Copy>(x: T) -> T {
    let (zero, one) = (T::from(0u8), T::from(1u8));
    if x < zero {
        zero
    } else if x > one {
        one
    } else {
        x
    }
}

/// numpy's `(x * 255).round().astype("uint8")` for x in [0, 1] (NaN → 0).
fn unit_to_byte(x: f32) -> u8 {
    let v = (x * 255.0f32).round_ties_even();
    if v.is_nan() {
        0
    } else {
        v.clamp(0.0, 255.0) as u8
    }
}
