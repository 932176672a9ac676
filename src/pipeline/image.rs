//! Image files and pixels, without tensors (the window uses this module, and it never links
//! candle), reproducing what diffusers does with PIL so that an edit is pixel-for-pixel the same:
//!
//! - decoding ([`load_image`], [`decode_image`]): diffusers' `load_image` (`ImageOps.exif_transpose`
//!   then `convert("RGB")`), with decompression-bomb limits;
//! - the edit size ([`edit_size`]) and PIL's Lanczos resampling ([`resize_lanczos`]);
//! - saving results atomically with their settings as PNG text ([`save_image`], [`read_png_text`]).
//!
//! The conversion to and from the model's tensors is [`super::image_tensor`].

use std::fs::File;
use std::io::{BufWriter, Cursor, Write};
use std::path::{Path, PathBuf};

use image::codecs::jpeg::JpegEncoder;
use image::codecs::webp::WebPEncoder;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

/// Largest image accepted, in pixels: PIL's own decompression-bomb error threshold
/// (`2 * Image.MAX_IMAGE_PIXELS` = 2 × 89 478 485). Checked on the declared size, before any
/// pixel buffer is allocated.
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// Largest allocation a decoder may make (the biggest accepted image as 16-bit RGBA).
const MAX_DECODER_ALLOC: u64 = MAX_IMAGE_PIXELS * 8;

/// Largest image file read: the biggest accepted image, uncompressed as 16-bit RGBA (a BMP or
/// TIFF can store it so). Files are read whole, and only regular files are read: a FIFO would
/// block and `/dev/zero` never ends.
pub const MAX_IMAGE_FILE_BYTES: u64 = MAX_DECODER_ALLOC;

/// Extensions of the formats [`load_image`] decodes (it goes by content; file pickers filter by
/// these).
pub const INPUT_EXTENSIONS: [&str; 7] = ["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"];

/// JPEG quality used by [`save_image`].
pub const JPEG_QUALITY: u8 = 95;

/// What can go wrong reading, converting or writing an image. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file does not exist.
    #[error("image file not found: {}", path.display())]
    NotFound { path: PathBuf },
    /// The file exists but could not be read or decoded (I/O error, truncated or corrupt data).
    #[error("cannot read image {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    /// The content is not PNG, JPEG, WebP, BMP or TIFF.
    #[error("{} is not a supported image (PNG, JPEG, WebP, BMP or TIFF expected)", path.display())]
    UnsupportedFormat { path: PathBuf },
    /// The image has no pixels.
    #[error("image {} is empty ({w}x{h} pixels)", path.display())]
    Empty { path: PathBuf, w: u32, h: u32 },
    /// The declared size exceeds [`MAX_IMAGE_PIXELS`] (`limit`, in pixels).
    #[error(
        "image {} is too large: {w}x{h} pixels, more than the limit of {limit} pixels",
        path.display()
    )]
    TooLarge {
        path: PathBuf,
        w: u32,
        h: u32,
        limit: u64,
    },
    /// An edit size request that leaves no pixels (a side would round to 0).
    #[error(
        "cannot fit a {width}x{height} image into {max_side} pixels in multiples of {multiple}: \
         a side would become 0"
    )]
    InvalidSize {
        width: u32,
        height: u32,
        max_side: u32,
        multiple: u32,
    },
    /// Writing the file failed (missing or unwritable folder, disk full, encoder error).
    #[error("cannot write image {}: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
    /// The extension does not name a format [`save_image`] can write.
    #[error(
        "cannot save {}: unknown image extension (use .png, .jpg/.jpeg or .webp)",
        path.display()
    )]
    UnsupportedOutputExtension { path: PathBuf },
    /// A PNG text key or value that PNG cannot store.
    #[error("cannot save {}: invalid PNG text key {key:?}: {reason}", path.display())]
    InvalidTextKey {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

/// Decodes PNG/JPEG/WebP/BMP/TIFF (by content, not extension), applies the EXIF orientation, drops
/// alpha (as PIL's `convert("RGB")` does: no compositing) and converts gray/16-bit/palette to RGB8.
/// Rejects zero-sized images and images larger than [`MAX_IMAGE_PIXELS`] before allocating them.
///
/// Pixels equal PIL's (`Image.open(p).convert("RGB")`, Pillow 13): JPEGs through
/// [`ip2p_jpeg`], a port of libjpeg-turbo's decoding; 16-bit RGB/RGBA/gray+alpha PNGs keep the
/// high byte of each sample (PIL's `;16B` unpackers: truncation, not rounding); 16-bit
/// *grayscale* PNGs are PIL's mode `I;16`, whose conversion to RGB saturates: a value above 255
/// becomes 255, below it stays as it is (so such a picture comes out nearly white, as it does in
/// diffusers; this loader used to keep the high byte instead).
pub fn load_image(path: &Path) -> Result<RgbImage, ImageError> {
    decode_at(&read_image_file(path)?, path)
}

/// The bytes of an image file: a regular file of at most [`MAX_IMAGE_FILE_BYTES`].
fn read_image_file(path: &Path) -> Result<Vec<u8>, ImageError> {
    crate::model::files::read_limited(path, MAX_IMAGE_FILE_BYTES).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::NotFound {
            path: path.to_path_buf(),
        },
        _ => ImageError::Unreadable {
            path: path.to_path_buf(),
            reason: e.to_string(),
        },
    })
}

/// Decodes an image from bytes (clipboard, drag and drop) with the same rules as [`load_image`];
/// `name` stands for the file in error messages.
pub fn decode_image(bytes: &[u8], name: &str) -> Result<RgbImage, ImageError> {
    decode_at(bytes, Path::new(name))
}

fn decode_at(bytes: &[u8], path: &Path) -> Result<RgbImage, ImageError> {
    let unreadable = |reason: String| ImageError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    // The PNG and BMP decoders refuse a zero side as a format error; look first so the error
    // says "empty".
    if let Some((w, h)) = declared_png_size(bytes).or_else(|| declared_bmp_size(bytes))
        && (w == 0 || h == 0)
    {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
            w,
            h,
        });
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| unreadable(e.to_string()))?;
    if !is_supported_format(reader.format()) {
        return Err(ImageError::UnsupportedFormat {
            path: path.to_path_buf(),
        });
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) {
        return decode_jpeg(bytes, path);
    }
    // Headers only so far: the size check below happens before any pixel allocation.
    reader.no_limits();
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| map_decode_error(e, path))?;
    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(ImageError::Empty {
            path: path.to_path_buf(),
            w,
            h,
        });
    }
    if u64::from(w) * u64::from(h) > MAX_IMAGE_PIXELS {
        return Err(ImageError::TooLarge {
            path: path.to_path_buf(),
            w,
            h,
            limit: MAX_IMAGE_PIXELS,
        });
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_DECODER_ALLOC);
    decoder
        .set_limits(limits)
        .map_err(|e| map_decode_error(e, path))?;
    // A broken EXIF block is ignored, as PIL's exif_transpose ignores what it cannot parse.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let decoded = DynamicImage::from_decoder(decoder).map_err(|e| map_decode_error(e, path))?;
    let mut rgb = DynamicImage::ImageRgb8(to_rgb8_like_pil(decoded));
    rgb.apply_orientation(orientation);
    Ok(rgb.into_rgb8())
}

/// A JPEG, decoded to Pillow's exact pixels (see [`ip2p_jpeg`]), with its EXIF orientation
/// applied as PIL's `exif_transpose` does.
fn decode_jpeg(bytes: &[u8], path: &Path) -> Result<RgbImage, ImageError> {
    use ip2p_jpeg::JpegError;
    let unreadable = |reason: String| ImageError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    // libjpeg fills what is missing with grey; PIL refuses such a file ("image file is
    // truncated"), and so does this loader.
    if jpeg_is_truncated(bytes) {
        return Err(unreadable(JpegError::Truncated.to_string()));
    }
    let decoded = ip2p_jpeg::decode(bytes, MAX_IMAGE_PIXELS).map_err(|e| match e {
        JpegError::Empty { width, height } => ImageError::Empty {
            path: path.to_path_buf(),
            w: width,
            h: height,
        },
        JpegError::TooLarge { width, height } => ImageError::TooLarge {
            path: path.to_path_buf(),
            w: width,
            h: height,
            limit: MAX_IMAGE_PIXELS,
        },
        other => unreadable(other.to_string()),
    })?;
    let orientation = decoded
        .exif
        .and_then(image::metadata::Orientation::from_exif_chunk)
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let rgb = RgbImage::from_raw(decoded.width, decoded.height, decoded.rgb)
        .ok_or_else(|| unreadable("the decoded JPEG has the wrong size".to_string()))?;
    let mut rgb = DynamicImage::ImageRgb8(rgb);
    rgb.apply_orientation(orientation);
    Ok(rgb.into_rgb8())
}

/// Whether the guessed format is one the program reads: PNG, JPEG, WebP, BMP or TIFF.
pub fn is_supported_format(format: Option<image::ImageFormat>) -> bool {
    matches!(
        format,
        Some(
            image::ImageFormat::Png
                | image::ImageFormat::Jpeg
                | image::ImageFormat::WebP
                | image::ImageFormat::Bmp
                | image::ImageFormat::Tiff,
        )
    )
}

/// Whether a JPEG ends before its end-of-image marker (FF D9). The marker segments before the
/// first scan are walked by their lengths (so an EXIF thumbnail's own end marker is skipped);
/// after the first start-of-scan, FF D9 cannot occur inside entropy-coded data (an FF byte there
/// is followed by 00 or a restart marker), so any FF D9 later in the file is the end. Bytes that
/// do not look like JPEG markers are left to the decoder to judge.
fn jpeg_is_truncated(bytes: &[u8]) -> bool {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return false;
    }
    let mut pos = 2;
    loop {
        if pos >= bytes.len() {
            return true;
        }
        if bytes[pos] != 0xFF {
            return false;
        }
        // Fill bytes: any number of FF before the marker code.
        while pos < bytes.len() && bytes[pos] == 0xFF {
            pos += 1;
        }
        let Some(&marker) = bytes.get(pos) else {
            return true;
        };
        pos += 1;
        match marker {
            // End of image before any scan: no picture, which the decoder reports itself.
            0xD9 => return false,
            // Markers without a length.
            0x01 | 0xD0..=0xD7 => {}
            _ => {
                let Some(len) = bytes.get(pos..pos + 2) else {
                    return true;
                };
                let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
                if marker == 0xDA {
                    let scan = bytes.get(pos + len..).unwrap_or_default();
                    return !scan.windows(2).any(|w| w == [0xFF, 0xD9]);
                }
                pos += len;
            }
        }
    }
}

/// Width and height from a PNG's IHDR, if `bytes` start like a PNG.
fn declared_png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.len() < 24 || !bytes.starts_with(SIGNATURE) || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let h = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    Some((w, h))
}

/// Width and height from a BMP's info header, if `bytes` start like a BMP.
fn declared_bmp_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 26 || !bytes.starts_with(b"BM") {
        return None;
    }
    let le_u16 = |at: usize| u32::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]));
    let le_i32 =
        |at: usize| i32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let header_size = le_i32(14);
    if header_size == 12 {
        // BITMAPCOREHEADER: 16-bit sizes.
        Some((le_u16(18), le_u16(20)))
    } else {
        // Negative height means top-down rows.
        Some((le_i32(18).unsigned_abs(), le_i32(22).unsigned_abs()))
    }
}

fn map_decode_error(e: image::ImageError, path: &Path) -> ImageError {
    match e {
        image::ImageError::Unsupported(_) => ImageError::UnsupportedFormat {
            path: path.to_path_buf(),
        },
        other => ImageError::Unreadable {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

/// PIL's `convert("RGB")`: alpha dropped without compositing, gray replicated, 16-bit samples
/// reduced to their high byte (PIL's `;16B` unpackers), except 16-bit gray alone, which PIL
/// holds as `I;16` and saturates at 255 (Convert.c `I16_RGB`).
fn to_rgb8_like_pil(img: DynamicImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let from_fn = |f: &dyn Fn(u32, u32) -> [u8; 3]| RgbImage::from_fn(w, h, |x, y| f(x, y).into());
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(i) => from_fn(&|x, y| {
            let p = i.get_pixel(x, y).0;
            [p[0], p[1], p[2]]
        }),
        DynamicImage::ImageLuma8(i) => from_fn(&|x, y| [i.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLumaA8(i) => from_fn(&|x, y| [i.get_pixel(x, y).0[0]; 3]),
        DynamicImage::ImageLuma16(i) => from_fn(&|x, y| [saturate(i.get_pixel(x, y).0[0]); 3]),
        DynamicImage::ImageLumaA16(i) => from_fn(&|x, y| [high_byte(i.get_pixel(x, y).0[0]); 3]),
        DynamicImage::ImageRgb16(i) => from_fn(&|x, y| i.get_pixel(x, y).0.map(high_byte)),
        DynamicImage::ImageRgba16(i) => from_fn(&|x, y| {
            let p = i.get_pixel(x, y).0;
            [high_byte(p[0]), high_byte(p[1]), high_byte(p[2])]
        }),
        // Float TIFFs: no PIL equivalent worth copying (PIL clips floats to 0..255 unscaled).
        other => other.to_rgb8(),
    }
}

fn high_byte(v: u16) -> u8 {
    (v >> 8) as u8
}

fn saturate(v: u16) -> u8 {
    v.min(255) as u8
}

/// The size an edit runs at. If the long side exceeds `max_side`, the image is scaled down so the
/// long side is exactly `max_side` and the short side is `short * max_side / long` rounded to the
/// nearest integer (halves up, exact integer arithmetic); it is never scaled up. Then each side is
/// floored to a multiple of `multiple` (the VAE factor), as diffusers'
/// `VaeImageProcessor.get_default_height_width` does (`x - x % vae_scale_factor`).
///
/// diffusers itself never scales down (its pipeline only floors to the multiple, which is what
/// `max_side >= max(width, height)` gives); the long-side cap and its rounding are this crate's
/// choice, so large photos fit in memory.
///
/// Errors if a side would become 0 (or `multiple`/`max_side` is 0).
pub fn edit_size(
    width: u32,
    height: u32,
    max_side: u32,
    multiple: u32,
) -> Result<(u32, u32), ImageError> {
    let invalid = || ImageError::InvalidSize {
        width,
        height,
        max_side,
        multiple,
    };
    if multiple == 0 || max_side == 0 || width == 0 || height == 0 {
        return Err(invalid());
    }
    let long = width.max(height);
    let (w, h) = if long > max_side {
        let scale = |side: u32| -> u32 {
            let scaled = (u64::from(side) * u64::from(max_side) * 2 + u64::from(long))
                / (2 * u64::from(long));
            // scaled <= max_side because side <= long.
            scaled as u32
        };
        (scale(width), scale(height))
    } else {
        (width, height)
    };
    let (w, h) = (w - w % multiple, h - h % multiple);
    if w == 0 || h == 0 {
        return Err(invalid());
    }
    Ok((w, h))
}

/// PIL's `Image.resize(size, Image.LANCZOS)` on RGB8, reproduced exactly: Pillow's `Resample.c`
/// coefficients (support 3 × the downscale factor, normalised to sum 1, rounded to 22-bit fixed
/// point), two passes each rounded and clipped to 8 bits, in Pillow 13's order (see
/// `vertical_first`; Pillow ≤ 12 always ran the horizontal pass first), and a pass skipped when
/// its axis keeps its size. Returns a copy of the input when the size is the same.
/// A zero target size gives an empty image.
pub fn resize_lanczos(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    super::resize::resize(img, width, height, super::resize::Filter::Lanczos)
}

/// The formats [`save_image`] writes, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OutputFormat {
    Png,
    Jpeg,
    WebP,
}

/// Whether [`save_image`] can write `path`, judged by its extension (`.png`, `.jpg`/`.jpeg`,
/// `.webp`, any letter case).
pub fn writes_format(path: &Path) -> bool {
    output_format(path).is_some()
}

fn output_format(path: &Path) -> Option<OutputFormat> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "png" => Some(OutputFormat::Png),
        "jpg" | "jpeg" => Some(OutputFormat::Jpeg),
        "webp" => Some(OutputFormat::WebP),
        _ => None,
    }
}

/// Writes `img` as PNG (with `text` as PNG text chunks, in order: tEXt when key and value are
/// Latin-1, iTXt otherwise), JPEG (quality [`JPEG_QUALITY`]) or WebP (lossless), chosen by the
/// extension. Atomic: the data goes to a temporary file in the same folder, is fsynced and then
/// renamed over `path`; on any error nothing is left behind. Unknown extensions and invalid PNG
/// text keys are refused before any work. JPEG and WebP files carry no text.
pub fn save_image(
    path: &Path,
    img: &RgbImage,
    text: &[(String, String)],
) -> Result<(), ImageError> {
    let format = output_format(path).ok_or_else(|| ImageError::UnsupportedOutputExtension {
        path: path.to_path_buf(),
    })?;
    if format == OutputFormat::Png {
        for (key, _) in text {
            check_png_key(path, key)?;
        }
    }
    let write_err = |reason: String| ImageError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !folder.is_dir() {
        return Err(write_err(format!(
            "folder {} does not exist",
            folder.display()
        )));
    }
    let mut builder = tempfile::Builder::new();
    builder.prefix(".tmp-").suffix(".part");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // Like a normal file creation (the umask applies), not tempfile's private 0600.
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let temp = builder
        .tempfile_in(&folder)
        .map_err(|e| write_err(format!("cannot create a file in {}: {e}", folder.display())))?;
    {
        let mut out = BufWriter::new(temp.as_file());
        match format {
            OutputFormat::Png => write_png(&mut out, img, text),
            OutputFormat::Jpeg => JpegEncoder::new_with_quality(&mut out, JPEG_QUALITY)
                .encode_image(img)
                .map_err(|e| e.to_string()),
            OutputFormat::WebP => WebPEncoder::new_lossless(&mut out)
                .encode(
                    img.as_raw(),
                    img.width(),
                    img.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(|e| e.to_string()),
        }
        .map_err(&write_err)?;
        out.flush().map_err(|e| write_err(e.to_string()))?;
    }
    temp.as_file()
        .sync_all()
        .map_err(|e| write_err(e.to_string()))?;
    // On failure the returned error owns the temp file and deletes it when dropped.
    temp.persist(path)
        .map_err(|e| write_err(e.error.to_string()))?;
    // Make the rename itself durable; not all platforms can open a folder, so best effort.
    if let Ok(dir) = File::open(&folder) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

/// PNG keywords: 1–79 Latin-1 characters, printable (no NUL or control characters), no leading,
/// trailing or double spaces (PNG spec 11.3.4.2).
fn check_png_key(path: &Path, key: &str) -> Result<(), ImageError> {
    let reason = if key.is_empty() || key.chars().count() > 79 {
        Some("keys must be 1 to 79 characters")
    } else if !is_latin1(key) {
        Some("keys must be Latin-1")
    } else if key.chars().any(|c| c.is_control()) {
        Some("keys cannot contain control characters")
    } else if key.starts_with(' ') || key.ends_with(' ') || key.contains("  ") {
        Some("keys cannot have leading, trailing or consecutive spaces")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ImageError::InvalidTextKey {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: reason.to_string(),
        }),
        None => Ok(()),
    }
}

fn write_png<W: Write>(out: W, img: &RgbImage, text: &[(String, String)]) -> Result<(), String> {
    let mut encoder = png::Encoder::new(out, img.width(), img.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    for (key, value) in text {
        // NUL cannot appear in tEXt text; iTXt is UTF-8 and takes anything else.
        if is_latin1(value) && !value.contains('\0') {
            writer.write_text_chunk(&png::text_metadata::TEXtChunk::new(key, value))
        } else {
            writer.write_text_chunk(&png::text_metadata::ITXtChunk::new(key, value))
        }
        .map_err(|e| e.to_string())?;
    }
    writer
        .write_image_data(img.as_raw())
        .map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

/// Reads back a PNG's text chunks (tEXt, zTXt and iTXt, decompressed) as `(key, value)` pairs in
/// file order, without decoding the pixels.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>, ImageError> {
    let unreadable = |reason: String| ImageError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = read_image_file(path)?;
    if declared_png_size(&bytes).is_none() {
        return Err(ImageError::UnsupportedFormat {
            path: path.to_path_buf(),
        });
    }
    let mut decoder = png::Decoder::new(Cursor::new(&bytes[..]));
    decoder.set_ignore_text_chunk(false);
    let mut reader = decoder.read_info().map_err(|e| unreadable(e.to_string()))?;
    // Skips the pixel data and reads the chunks after it.
    reader.finish().map_err(|e| unreadable(e.to_string()))?;
    let info = reader.info();
    let mut latin1 = info.uncompressed_latin1_text.iter();
    let mut compressed = info.compressed_latin1_text.iter();
    let mut utf8 = info.utf8_text.iter();
    // png keeps the three kinds apart; walk the chunk list to put them back in file order.
    let mut pairs = Vec::new();
    for kind in png_chunk_kinds(&bytes) {
        match &kind {
            b"tEXt" => {
                if let Some(c) = latin1.next() {
                    pairs.push((c.keyword.clone(), c.text.clone()));
                }
            }
            b"zTXt" => {
                if let Some(c) = compressed.next() {
                    let text = c.get_text().map_err(|e| unreadable(e.to_string()))?;
                    pairs.push((c.keyword.clone(), text));
                }
            }
            b"iTXt" => {
                if let Some(c) = utf8.next() {
                    let text = c.get_text().map_err(|e| unreadable(e.to_string()))?;
                    pairs.push((c.keyword.clone(), text));
                }
            }
            _ => {}
        }
    }
    Ok(pairs)
}

/// The chunk types of a PNG in file order (stops at the first malformed length).
fn png_chunk_kinds(bytes: &[u8]) -> Vec<[u8; 4]> {
    let mut kinds = Vec::new();
    let mut pos = 8;
    while pos + 8 <= bytes.len() {
        let len = u32::from_be_bytes([bytes[pos], bytes[pos + 1], bytes[pos + 2], bytes[pos + 3]]);
        let kind = [
            bytes[pos + 4],
            bytes[pos + 5],
            bytes[pos + 6],
            bytes[pos + 7],
        ];
        kinds.push(kind);
        if &kind == b"IEND" {
            break;
        }
        pos = match pos.checked_add(12 + len as usize) {
            Some(next) => next,
            None => break,
        };
    }
    kinds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_size_floors_to_multiple_without_scaling() {
        // diffusers: x - x % 8.
        assert_eq!(edit_size(67, 45, 1024, 8).unwrap(), (64, 40));
        assert_eq!(edit_size(512, 512, 512, 8).unwrap(), (512, 512));
        // Never scaled up.
        assert_eq!(edit_size(100, 60, 512, 8).unwrap(), (96, 56));
    }

    #[test]
    fn edit_size_scales_long_side_down() {
        // 1000x750 into 512: 750 * 512 / 1000 = 384 exactly.
        assert_eq!(edit_size(1000, 750, 512, 8).unwrap(), (512, 384));
        // 3000x2001 into 512 (portrait too): 2001 * 512 / 3000 = 341.504 -> 342 -> floored 336.
        assert_eq!(edit_size(3000, 2001, 512, 8).unwrap(), (512, 336));
        assert_eq!(edit_size(2001, 3000, 512, 8).unwrap(), (336, 512));
        // Rounding halves up: 3 * 2 / 4 = 1.5 -> 2; 5 * 2 / 4 = 2.5 -> 3.
        assert_eq!(edit_size(4, 3, 2, 1).unwrap(), (2, 2));
        assert_eq!(edit_size(5, 4, 2, 1).unwrap(), (2, 2));
        assert_eq!(edit_size(4, 5, 2, 1).unwrap(), (2, 2));
        assert_eq!(edit_size(10, 5, 4, 1).unwrap(), (4, 2));
        assert_eq!(edit_size(8, 5, 4, 1).unwrap(), (4, 3));
    }

    #[test]
    fn edit_size_rejects_vanishing_sides() {
        assert!(matches!(
            edit_size(5, 100, 1024, 8),
            Err(ImageError::InvalidSize { .. })
        ));
        // 20 * 64 / 1000 = 1.28 -> 1 -> floored to 0.
        assert!(edit_size(1000, 20, 64, 8).is_err());
        assert!(edit_size(64, 64, 64, 0).is_err());
        assert!(edit_size(0, 64, 64, 8).is_err());
    }

    /// A 64×48 gradient as a JPEG (with an EXIF-like APP1 segment holding an FF D9 of its own,
    /// as an embedded thumbnail has).
    fn sample_jpeg() -> Vec<u8> {
        let img = RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, 90])
        });
        let mut bytes = Vec::new();
        JpegEncoder::new_with_quality(&mut bytes, 90)
            .encode_image(&img)
            .expect("encode");
        let app1 = [0xFF, 0xE1, 0x00, 0x06, 0xFF, 0xD9, 0xFF, 0xD9];
        bytes.splice(2..2, app1);
        bytes
    }

    /// Issue 16 item 9: a JPEG cut short is refused as PIL refuses it, not filled with grey.
    #[test]
    fn a_truncated_jpeg_is_refused() {
        let bytes = sample_jpeg();
        decode_image(&bytes, "whole.jpg").expect("the whole file decodes");
        assert!(!jpeg_is_truncated(&bytes));
        // Trailing bytes after the end marker are accepted (PIL ignores them too).
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(b"trailing junk");
        decode_image(&trailing, "trailing.jpg").expect("trailing bytes are ignored");
        for cut in [bytes.len() - 2, bytes.len() * 2 / 3, 40] {
            let err = decode_image(&bytes[..cut], "cut.jpg").expect_err("truncated");
            let message = err.to_string();
            assert!(
                message.contains("cut.jpg") && message.contains("truncated"),
                "cut at {cut}: {message}"
            );
        }
    }

    /// Damaged JPEGs and PNGs (a byte changed, or cut) decode or are refused, never panic: a
    /// small deterministic fuzz of the decoder path and the truncation check.
    #[test]
    fn damaged_images_never_panic() {
        let jpeg = sample_jpeg();
        let mut png = Vec::new();
        write_png(
            &mut png,
            &RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 7])),
            &[],
        )
        .expect("png");
        let mut rng = crate::test_support::XorShift::new(0x1234_5678_9ABC_DEF1);
        for valid in [&jpeg, &png] {
            for _ in 0..150 {
                let mut bytes = valid.clone();
                if rng.below(2) == 0 {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.below(256) as u8;
                } else {
                    bytes.truncate(rng.below(bytes.len()));
                }
                if let Ok(img) = decode_image(&bytes, "fuzz") {
                    assert!(img.width() > 0 && img.height() > 0);
                }
                let _ = jpeg_is_truncated(&bytes);
            }
        }
    }

    /// Issue 16 item 5: only regular files are read; a device would never end.
    #[cfg(unix)]
    #[test]
    fn a_device_as_image_is_refused_by_name() {
        let err = load_image(Path::new("/dev/zero")).expect_err("a device");
        let message = err.to_string();
        assert!(
            message.contains("/dev/zero") && message.contains("not a regular file"),
            "{message}"
        );
    }

    #[test]
    fn png_keys_are_validated() {
        let p = Path::new("x.png");
        assert!(check_png_key(p, "parameters").is_ok());
        assert!(check_png_key(p, "").is_err());
        assert!(check_png_key(p, &"k".repeat(80)).is_err());
        assert!(check_png_key(p, "名前").is_err());
        assert!(check_png_key(p, " lead").is_err());
        assert!(check_png_key(p, "a\0b").is_err());
    }
}
