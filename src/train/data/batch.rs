//! Preprocessing examples into a training batch: the script's resize, crop, flip and scaling,
//! stacked into tensors (the only part of `train::data` that builds tensors).

use candle_core::{Device, Tensor};
use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::{DataError, Example};
use crate::train::resize::resize_bicubic;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CropMode {
    /// `transforms.CenterCrop(resolution)`.
    Center,
    /// `transforms.RandomCrop(resolution)` (the script's default).
    #[default]
    Random,
}

/// The script's `convert_to_np` without the transpose: `image.convert("RGB").resize((R, R))`
/// with Pillow's default BICUBIC filter.
pub fn resize_to_square(img: &RgbImage, resolution: u32) -> RgbImage {
    resize_bicubic(img, resolution, resolution)
}

/// The crop to `resolution`. After [`resize_to_square`] the image already has that size, and
/// both torchvision crops are then the identity (`RandomCrop` returns the whole image without a
/// random draw when the sizes match); other sizes are cropped at the centre for both modes
/// (torchvision's `CenterCrop` offsets, Python's `round((size - R) / 2)`, halves to even), padding with black where the
/// image is smaller.
pub fn crop_to(img: &RgbImage, resolution: u32, _mode: CropMode) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (resolution, resolution) {
        return img.clone();
    }
    let offset = |size: u32| -> i64 {
        ((i64::from(size) - i64::from(resolution)) as f64 / 2.0).round_ties_even() as i64
    };
    let (left, top) = (offset(w), offset(h));
    RgbImage::from_fn(resolution, resolution, |x, y| {
        let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
        if sx >= 0 && sy >= 0 && sx < i64::from(w) && sy < i64::from(h) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// A batch ready for a training step (the script's `collate_fn` output): what
/// [`crate::train::step::TrainingModels::micro_batch_loss`] takes; it tokenizes the prompts itself.
#[derive(Debug, Clone)]
pub struct TrainBatch {
    /// `original_pixel_values`: `[N, 3, R, R]` float32 in [-1, 1].
    pub original_pixel_values: Tensor,
    /// `edited_pixel_values`: `[N, 3, R, R]` float32 in [-1, 1].
    pub edited_pixel_values: Tensor,
    /// The instructions, in batch order (tokenize them for `input_ids`).
    pub prompts: Vec<String>,
    /// The examples' names, for messages.
    pub names: Vec<String>,
}

/// The script's `preprocess_train` + `collate_fn` for `examples` with one flip decision each:
/// resize to `resolution`² (BICUBIC), crop, flip input and edited image together when
/// `flips[i]`, `2 * (x / 255) - 1` in float32, CHW, stacked.
pub fn prepare_batch(
    examples: &[Example],
    flips: &[bool],
    resolution: u32,
    crop: CropMode,
    device: &Device,
) -> Result<TrainBatch, DataError> {
    if examples.is_empty() {
        return Err(DataError::InvalidSetting(
            "a batch needs at least one example".to_string(),
        ));
    }
    if flips.len() != examples.len() {
        return Err(DataError::InvalidSetting(format!(
            "{} flip decisions for {} examples",
            flips.len(),
            examples.len()
        )));
    }
    if resolution == 0 {
        return Err(DataError::InvalidSetting(
            "the resolution must be at least 1".to_string(),
        ));
    }
    let r = resolution as usize;
    let plane = r * r;
    let mut original = Vec::with_capacity(examples.len() * 3 * plane);
    let mut edited = Vec::with_capacity(examples.len() * 3 * plane);
    for (example, &flip) in examples.iter().zip(flips) {
        for (img, out) in [
            (&example.original, &mut original),
            (&example.edited, &mut edited),
        ] {
            let square = crop_to(&resize_to_square(img, resolution), resolution, crop);
            push_chw(&square, flip, out);
        }
    }
    let n = examples.len();
    Ok(TrainBatch {
        original_pixel_values: Tensor::from_vec(original, (n, 3, r, r), device)?,
        edited_pixel_values: Tensor::from_vec(edited, (n, 3, r, r), device)?,
        prompts: examples.iter().map(|e| e.prompt.clone()).collect(),
        names: examples.iter().map(|e| e.name.clone()).collect(),
    })
}

/// Appends `img` as CHW float32 `2 * (x / 255) - 1` (torch's float32 arithmetic), mirrored left
/// to right when `flip`.
fn push_chw(img: &RgbImage, flip: bool, out: &mut Vec<f32>) {
    let (w, h) = img.dimensions();
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let sx = if flip { w - 1 - x } else { x };
                let v = f32::from(img.get_pixel(sx, y).0[c]);
                out.push(2.0f32 * (v / 255.0f32) - 1.0f32);
            }
        }
    }
}
