//! Image I/O against PIL + diffusers references made by tests/fixtures/scripts/image_refs.py
//! (committed under tests/fixtures/image/). Pixel results must be exactly equal: the edit's parity
//! with diffusers starts here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use instruct_pix2pix::pipeline::image::{
    ImageError, MAX_IMAGE_PIXELS, decode_image, edit_size, load_image, read_png_text,
    resize_lanczos, save_image,
};
use instruct_pix2pix::pipeline::image_tensor::{to_images, to_tensor};
use instruct_pix2pix::pipeline::preview::latents_to_preview;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image")
}

/// Expected images are PNGs written by PIL; decode them with the `image` crate directly, not with
/// the code under test.
fn expected_png(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_rgb8()
}

/// Number of differing samples and the largest difference.
fn diff(a: &RgbImage, b: &RgbImage) -> (usize, u8) {
    assert_eq!(a.dimensions(), b.dimensions(), "sizes differ");
    let mut count = 0;
    let mut max = 0;
    for (x, y) in a.as_raw().iter().zip(b.as_raw()) {
        if x != y {
            count += 1;
            max = max.max(x.abs_diff(*y));
        }
    }
    (count, max)
}

fn processor_refs() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("processor.safetensors"), &Device::Cpu)
        .expect("processor.safetensors")
}

/// Inputs whose decoded pixels must equal diffusers' load_image exactly.
const EXACT_INPUTS: &[&str] = &[
    "rgb_67x45.png",
    "rgb_300x201.png",
    "png_named.jpg",
    "rgba_50x37.png",
    "gray_41x29.png",
    "gray_alpha_33x21.png",
    "rgb16_23x17.png",
    "palette_40x30.png",
    "exif6_30x20.png",
    "exif8_30x20.webp",
    "rgb_45x33_lossless.webp",
    "rgba_45x33_lossless.webp",
    "rgb_37x23.bmp",
    "rgb_37x23.tiff",
    "rgb_37x23_lzw.tiff",
    // JPEGs: libjpeg-turbo's decoding, ported (src/pipeline/jpeg), with EXIF orientations.
    "rgb_67x45_q90.jpg",
    "rgb_67x45_444.jpg",
    "exif6_48x32.jpg",
    "exif3_48x32.jpg",
    "gray_41x29.jpg",
    // 16-bit gray saturates at 255 as PIL's I;16 -> RGB does.
    "gray16_23x17.png",
];

#[test]
fn lossless_inputs_load_exactly_as_diffusers_load_image() {
    for name in EXACT_INPUTS {
        let got = load_image(&fixtures().join("in").join(name)).unwrap();
        let want = expected_png(&fixtures().join("loaded").join(format!("{name}.png")));
        assert_eq!(got.dimensions(), want.dimensions(), "{name}: size");
        assert_eq!(diff(&got, &want), (0, 0), "{name}: pixels differ");
    }
}

#[test]
fn lossy_webp_loads_exactly_as_diffusers_load_image() {
    // image-webp reproduces libwebp's lossy decoding (including its fancy chroma upsampling).
    let name = "rgb_45x33_lossy.webp";
    let got = load_image(&fixtures().join("in").join(name)).unwrap();
    let want = expected_png(&fixtures().join("loaded").join(format!("{name}.png")));
    assert_eq!(diff(&got, &want), (0, 0));
}

#[test]
fn decode_from_bytes_matches_load() {
    let path = fixtures().join("in/exif6_48x32.jpg");
    let bytes = std::fs::read(&path).unwrap();
    let from_bytes = decode_image(&bytes, "clipboard").unwrap();
    assert_eq!(from_bytes, load_image(&path).unwrap());
    // Orientation 6 turns 48x32 into 32x48.
    assert_eq!(from_bytes.dimensions(), (32, 48));
}

/// Every resize the script made: resized/<input>.<w>x<h>.png from loaded/<input>.png.
#[test]
fn lanczos_resize_matches_pil_exactly() {
    let mut checked = 0;
    let mut failed = Vec::new();
    for entry in std::fs::read_dir(fixtures().join("resized")).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let stem = file.strip_suffix(".png").unwrap();
        let (input, size) = stem.rsplit_once('.').unwrap();
        let (w, h) = size.split_once('x').unwrap();
        let (w, h): (u32, u32) = (w.parse().unwrap(), h.parse().unwrap());
        let source = expected_png(&fixtures().join("loaded").join(format!("{input}.png")));
        let want = expected_png(&path);
        let got = resize_lanczos(&source, w, h);
        let d = diff(&got, &want);
        println!("{file}: {d:?}");
        if d != (0, 0) {
            failed.push(file.clone());
        }
        checked += 1;
    }
    assert!(failed.is_empty(), "differ from PIL: {failed:?}");
    assert!(checked >= 16, "only {checked} resize fixtures");
}

#[test]
fn resize_to_same_size_is_identity() {
    let source = expected_png(&fixtures().join("loaded/rgb_67x45.png.png"));
    assert_eq!(resize_lanczos(&source, 67, 45), source);
}

fn assert_bitwise_equal(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let w = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let differing = g
        .iter()
        .zip(&w)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "{what}: {differing} values differ");
}

#[test]
fn preprocess_matches_vae_image_processor_bitwise() {
    let refs = processor_refs();
    for name in ["rgb_67x45.png", "exif6_48x32.jpg"] {
        // From the file to the tensor, as diffusers' load_image + VaeImageProcessor.
        let img = load_image(&fixtures().join("in").join(name)).unwrap();
        let (w, h) = edit_size(img.width(), img.height(), 4096, 8).unwrap();
        let tensor = to_tensor(&resize_lanczos(&img, w, h), &Device::Cpu).unwrap();
        assert_bitwise_equal(&tensor, &refs[&format!("preprocess.{name}")], name);
    }
    let img = load_image(&fixtures().join("in/rgb_300x201.png")).unwrap();
    let tensor = to_tensor(&resize_lanczos(&img, 96, 64), &Device::Cpu).unwrap();
    assert_bitwise_equal(&tensor, &refs["preprocess.rgb_300x201.png.96x64"], "96x64");
}

#[test]
fn postprocess_matches_diffusers_pil_output() {
    let refs = processor_refs();
    for dtype in ["f32", "f16"] {
        let input = &refs[&format!("postprocess.{dtype}.in")];
        let want = &refs[&format!("postprocess.{dtype}.out")]; // [B, H, W, 3] u8
        assert_eq!(
            input.dtype(),
            if dtype == "f32" {
                DType::F32
            } else {
                DType::F16
            }
        );
        let images = to_images(input).unwrap();
        let (b, h, w, _) = want.dims4().unwrap();
        assert_eq!(images.len(), b);
        let want = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        for (i, img) in images.iter().enumerate() {
            assert_eq!(img.dimensions(), (w as u32, h as u32));
            let expected = &want[i * h * w * 3..(i + 1) * h * w * 3];
            assert_eq!(img.as_raw().as_slice(), expected, "{dtype} image {i}");
        }
    }
}

#[test]
fn preprocess_then_postprocess_round_trips() {
    let img = load_image(&fixtures().join("in/rgb_67x45.png")).unwrap();
    let back = to_images(&to_tensor(&img, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(back, vec![img]);
}

#[test]
fn load_errors_name_the_problem_and_the_file() {
    let dir = fixtures().join("in");
    let missing = dir.join("no_such_image.png");
    match load_image(&missing) {
        Err(ImageError::NotFound { path }) => assert_eq!(path, missing),
        other => panic!("missing file: {other:?}"),
    }
    let err = load_image(&dir.join("truncated.png")).unwrap_err();
    assert!(matches!(err, ImageError::Unreadable { .. }), "{err:?}");
    assert!(err.to_string().contains("truncated.png"), "{err}");

    let err = load_image(&dir.join("random_bytes.png")).unwrap_err();
    assert!(
        matches!(err, ImageError::UnsupportedFormat { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("random_bytes.png"), "{err}");

    match load_image(&dir.join("zero_width.png")) {
        Err(ImageError::Empty { w: 0, h: 5, .. }) => {}
        other => panic!("zero width png: {other:?}"),
    }
    let err = load_image(&dir.join("zero_width.bmp")).unwrap_err();
    assert!(
        matches!(err, ImageError::Empty { w: 0, h: 5, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("zero_width.bmp"), "{err}");

    let start = Instant::now();
    match load_image(&dir.join("huge_dims.png")) {
        Err(ImageError::TooLarge {
            w: 100_000,
            h: 100_000,
            limit,
            ..
        }) => assert_eq!(limit, MAX_IMAGE_PIXELS),
        other => panic!("huge png: {other:?}"),
    }
    // Refused from the header, not after trying to allocate 30 GB.
    assert!(start.elapsed().as_secs_f64() < 1.0);

    let err = decode_image(b"not an image at all", "pasted bytes").unwrap_err();
    assert!(err.to_string().contains("pasted bytes"), "{err}");
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn sample_image() -> RgbImage {
    load_image(&fixtures().join("in/rgb_67x45.png")).unwrap()
}

#[test]
fn png_text_round_trips_in_order_including_non_latin1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edit.png");
    let text = vec![
        ("prompt".to_string(), "make the mountains snowy".to_string()),
        (
            "negative".to_string(),
            "ünïcödé in Latin-1: café".to_string(),
        ),
        ("prompt_ja".to_string(), "山を雪にして 🏔️".to_string()),
        (
            "settings".to_string(),
            r#"{"steps": 20, "guidance_scale": 7.5}"#.to_string(),
        ),
        ("empty".to_string(), String::new()),
    ];
    let img = sample_image();
    save_image(&path, &img, &text).unwrap();
    assert_eq!(read_png_text(&path).unwrap(), text);
    assert_eq!(load_image(&path).unwrap(), img);
    assert_eq!(
        files_in(dir.path()),
        vec!["edit.png"],
        "temp file left behind"
    );

    // The non-Latin-1 value went to iTXt, the others to tEXt.
    let bytes = std::fs::read(&path).unwrap();
    let count = |kind: &[u8]| bytes.windows(4).filter(|w| *w == kind).count();
    assert_eq!(count(b"iTXt"), 1);
    assert_eq!(count(b"tEXt"), 4);

    // Overwriting replaces atomically.
    save_image(&path, &img, &[]).unwrap();
    assert!(read_png_text(&path).unwrap().is_empty());
}

#[test]
fn reads_text_written_by_pil() {
    // The PIL-made fixtures have no text; a PNG with none gives an empty list, a JPEG an error.
    assert!(
        read_png_text(&fixtures().join("in/rgb_67x45.png"))
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        read_png_text(&fixtures().join("in/rgb_67x45_q90.jpg")),
        Err(ImageError::UnsupportedFormat { .. })
    ));
}

#[test]
fn webp_is_lossless_and_jpeg_close() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image();
    let webp = dir.path().join("out.webp");
    save_image(&webp, &img, &[]).unwrap();
    assert_eq!(load_image(&webp).unwrap(), img);

    let jpeg = dir.path().join("out.JPEG");
    save_image(&jpeg, &img, &[("ignored".into(), "x".into())]).unwrap();
    let back = load_image(&jpeg).unwrap();
    assert_eq!(back.dimensions(), img.dimensions());
    // Quality 95 on a noisy gradient with hard edges: small mean error.
    let mean: f64 = back
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / img.as_raw().len() as f64;
    assert!(mean < 4.0, "mean abs error {mean}");
    assert_eq!(files_in(dir.path()), vec!["out.JPEG", "out.webp"]);
}

#[test]
fn save_errors_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let img = sample_image();

    let unknown = dir.path().join("out.gif");
    match save_image(&unknown, &img, &[]) {
        Err(ImageError::UnsupportedOutputExtension { path }) => assert_eq!(path, unknown),
        other => panic!("gif: {other:?}"),
    }
    assert!(save_image(&dir.path().join("no_extension"), &img, &[]).is_err());

    let missing = dir.path().join("missing/out.png");
    let err = save_image(&missing, &img, &[]).unwrap_err();
    assert!(matches!(err, ImageError::Write { .. }), "{err:?}");
    assert!(err.to_string().contains("missing/out.png"), "{err}");

    let bad_key = save_image(
        &dir.path().join("k.png"),
        &img,
        &[("キー".into(), "v".into())],
    );
    assert!(
        matches!(bad_key, Err(ImageError::InvalidTextKey { .. })),
        "{bad_key:?}"
    );

    // A read-only folder (skipped when running as root, which can write anywhere).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let locked = dir.path().join("locked");
        std::fs::create_dir(&locked).unwrap();
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
        let probe = locked.join("probe");
        if std::fs::write(&probe, b"x").is_err() {
            let err = save_image(&locked.join("out.png"), &img, &[]).unwrap_err();
            assert!(matches!(err, ImageError::Write { .. }), "{err:?}");
            assert!(files_in(&locked).is_empty());
        } else {
            std::fs::remove_file(&probe).unwrap();
        }
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // A target path that is a folder: the rename fails after the data was written.
    let folder_target = dir.path().join("taken.png");
    std::fs::create_dir(&folder_target).unwrap();
    let err = save_image(&folder_target, &img, &[]).unwrap_err();
    assert!(matches!(err, ImageError::Write { .. }), "{err:?}");

    let mut left = files_in(dir.path());
    left.retain(|n| n != "locked" && n != "taken.png");
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(files_in(&folder_target).is_empty());
}

#[test]
fn preview_matches_the_linear_reference() {
    let refs = candle_core::safetensors::load(fixtures().join("preview.safetensors"), &Device::Cpu)
        .unwrap();
    let latents = &refs["latents"];
    let want = refs["preview"]
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap();
    let (_, _, h, w) = latents.dims4().unwrap();
    let got = latents_to_preview(latents, w as u32, h as u32).unwrap();
    // Same factors and formula; the matmul's float summation order may differ from torch's, so a
    // value right at an integer boundary can truncate one lower or higher.
    let worst = got
        .as_raw()
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(worst <= 1, "max difference {worst}");
    // Works from f16 and bf16 latents too, and upsamples to the requested size.
    for dtype in [DType::F16, DType::BF16] {
        let p = latents_to_preview(&latents.to_dtype(dtype).unwrap(), 160, 96).unwrap();
        assert_eq!(p.dimensions(), (160, 96));
    }
}

fn constant_latents(values: [f32; 4]) -> Tensor {
    let data: Vec<f32> = values
        .iter()
        .flat_map(|&v| std::iter::repeat_n(v, 8 * 8))
        .collect();
    Tensor::from_vec(data, (1, 4, 8, 8), &Device::Cpu).unwrap()
}

#[test]
fn preview_colours_are_plausible() {
    let pixel = |values: [f32; 4]| {
        latents_to_preview(&constant_latents(values), 64, 64)
            .unwrap()
            .get_pixel(31, 31)
            .0
    };
    // Zero latents: mid grey.
    let grey = pixel([0.0; 4]);
    assert!(grey.iter().all(|&c| (126..=128).contains(&c)), "{grey:?}");
    // Channel 0 is luminance-like: brighter in all three colours.
    let bright = pixel([2.0, 0.0, 0.0, 0.0]);
    assert!(bright.iter().all(|&c| c > 180), "{bright:?}");
    // Channel 3 negative is the blue direction (SD latents: yellow <-> blue).
    let blue = pixel([0.0, 0.0, 0.0, -1.5]);
    assert!(
        blue[2] > 230 && blue[2] > blue[0] + 60 && blue[2] > blue[1] + 60,
        "{blue:?}"
    );
    let yellow = pixel([0.0, 0.0, 0.0, 1.5]);
    assert!(
        yellow[0] > yellow[2] + 60 && yellow[1] > yellow[2] + 60,
        "{yellow:?}"
    );
    // Channel 2 negative is red, positive green/blue-ish.
    let red = pixel([0.0, 0.0, -1.5, 0.0]);
    assert!(red[0] > red[1] + 60 && red[0] > red[2] + 60, "{red:?}");
}

#[test]
fn preview_is_fast_and_rejects_wrong_shapes() {
    let latents = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &Device::Cpu).unwrap();
    latents_to_preview(&latents, 512, 512).unwrap(); // warm-up
    let runs = 20;
    let start = Instant::now();
    for _ in 0..runs {
        latents_to_preview(&latents, 512, 512).unwrap();
    }
    let per_call = start.elapsed().as_secs_f64() * 1000.0 / runs as f64;
    println!("latents_to_preview 64x64 -> 512x512: {per_call:.2} ms");
    // Generous bound for a shared 2-core machine (measured value is printed above).
    assert!(per_call < 50.0, "{per_call} ms");

    let three = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    assert!(latents_to_preview(&three, 64, 64).is_err());
}
