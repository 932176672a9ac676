//! A generated dataset of a trivial edit for the training tests: random smooth colour images
//! and their colour inverses, with the instruction "invert the colors", in the hand-made pairs
//! form (`NAME.png`, `NAME_edited.png`, `NAME.txt`). Deterministic from a seed.

#![allow(dead_code)]

use std::path::Path;

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};

/// The instruction of every example.
pub const INSTRUCTION: &str = "invert the colors";

/// A smooth random image: bilinear between four random corner colours plus a low-frequency wave.
pub fn smooth_image(size: u32, rng: &mut impl Rng) -> RgbImage {
    let corners: Vec<[f32; 3]> = (0..4)
        .map(|_| [rng.random(), rng.random(), rng.random()])
        .collect();
    let phase: f32 = rng.random::<f32>() * std::f32::consts::TAU;
    let freq: f32 = 1.0 + rng.random::<f32>() * 2.0;
    RgbImage::from_fn(size, size, |x, y| {
        let u = x as f32 / (size - 1).max(1) as f32;
        let v = y as f32 / (size - 1).max(1) as f32;
        let mut px = [0u8; 3];
        for (c, out) in px.iter_mut().enumerate() {
            let top = corners[0][c] * (1.0 - u) + corners[1][c] * u;
            let bottom = corners[2][c] * (1.0 - u) + corners[3][c] * u;
            let wave =
                0.15 * (freq * std::f32::consts::TAU * (u + v) / 2.0 + phase + c as f32).sin();
            let value = (top * (1.0 - v) + bottom * v + wave).clamp(0.0, 1.0);
            *out = (value * 255.0).round() as u8;
        }
        Rgb(px)
    })
}

/// The colour inverse.
pub fn invert(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        p.0 = p.0.map(|v| 255 - v);
    }
    out
}

/// Writes `count` pairs `ex000.png`/`ex000_edited.png`/`ex000.txt` of `size`² into `dir`.
pub fn write_invert_dataset(dir: &Path, count: usize, size: u32, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..count {
        let original = smooth_image(size, &mut rng);
        let name = format!("ex{i:03}");
        original.save(dir.join(format!("{name}.png"))).unwrap();
        invert(&original)
            .save(dir.join(format!("{name}_edited.png")))
            .unwrap();
        std::fs::write(dir.join(format!("{name}.txt")), INSTRUCTION).unwrap();
    }
}

/// Mean absolute difference of two same-size images, in levels of 255.
pub fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let total: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    total as f64 / a.as_raw().len() as f64
}
