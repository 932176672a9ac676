//! Images as egui textures: the conversion from the worker's RGB images, the scale-down for
//! images too large for a GPU texture, and how result textures are filtered.

use egui::TextureOptions;
use image::RgbImage;

/// The most pixels a side of a shown texture may have; larger images are shown scaled down (the
/// edit still gets the full image).
pub const MAX_TEXTURE_SIDE: u32 = 4096;

/// Smooth when scaled down, crisp pixels when zoomed in.
pub const IMAGE_TEXTURE: TextureOptions = TextureOptions {
    magnification: egui::TextureFilter::Nearest,
    ..TextureOptions::LINEAR
};

/// The image as a texture source, scaled down (triangle filter) when a side is too large for a
/// GPU texture.
pub fn display_image(image: &RgbImage) -> egui::ColorImage {
    let (width, height) = image.dimensions();
    let long = width.max(height);
    if long <= MAX_TEXTURE_SIDE {
        return to_color_image(image);
    }
    let scale = MAX_TEXTURE_SIDE as f64 / long as f64;
    let new_width = ((width as f64 * scale).round() as u32).max(1);
    let new_height = ((height as f64 * scale).round() as u32).max(1);
    let small = image::imageops::resize(
        image,
        new_width,
        new_height,
        image::imageops::FilterType::Triangle,
    );
    to_color_image(&small)
}

/// An RGB image as egui's image type.
pub fn to_color_image(image: &RgbImage) -> egui::ColorImage {
    let size = [image.width() as usize, image.height() as usize];
    egui::ColorImage::from_rgb(size, image.as_raw())
}
