//! Issue 15 item 5: JPEGs and PNGs of every kind decode to exactly Pillow's pixels
//! (`Image.open(p).convert("RGB")`, Pillow 13 with libjpeg-turbo 3.2), so a photo edits as in
//! diffusers. The files and Pillow's arrays are made by tests/fixtures/scripts/decode_refs.py
//! (committed under tests/fixtures/image/decode/).

use std::path::{Path, PathBuf};

use instruct_pix2pix::pipeline::image::{decode_image, load_image};

fn folder() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/image/decode")
}

/// A uint8 `.npy` of shape [H, W, 3] as numpy's `np.save` writes it (format 1.0, C order).
fn read_u8_npy(path: &Path) -> (usize, usize, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY", "{}", path.display());
    let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
    let header = std::str::from_utf8(&bytes[10..10 + header_len]).unwrap();
    assert!(header.contains("'descr': '|u1'"), "{header}");
    assert!(header.contains("'fortran_order': False"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap();
    let dims: Vec<usize> = shape
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    assert_eq!(dims.len(), 3, "{header}");
    assert_eq!(dims[2], 3, "{header}");
    let data = bytes[10 + header_len..].to_vec();
    assert_eq!(data.len(), dims[0] * dims[1] * 3, "{}", path.display());
    (dims[0], dims[1], data)
}

/// Every `NAME` with a `NAME.npy` beside it.
fn cases(extension: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(folder())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .filter(|p| Path::new(&format!("{}.npy", p.display())).exists())
        .collect();
    found.sort();
    found
}

/// Decodes each case and compares it with Pillow's array; returns the failures, and prints every
/// case's number of differing samples and largest difference.
fn compare(paths: &[PathBuf]) -> Vec<String> {
    let mut failures = Vec::new();
    let mut worst = 0u8;
    for path in paths {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let (h, w, want) = read_u8_npy(Path::new(&format!("{}.npy", path.display())));
        let started = std::time::Instant::now();
        let loaded = load_image(path);
        let took = started.elapsed();
        let got = match loaded {
            Ok(got) => got,
            Err(e) => {
                failures.push(format!("{name}: {e}"));
                continue;
            }
        };
        if got.dimensions() != (w as u32, h as u32) {
            failures.push(format!("{name}: {:?}, Pillow {w}x{h}", got.dimensions()));
            continue;
        }
        let (mut count, mut max) = (0usize, 0u8);
        for (a, b) in got.as_raw().iter().zip(&want) {
            if a != b {
                count += 1;
                max = max.max(a.abs_diff(*b));
            }
        }
        worst = worst.max(max);
        println!(
            "{name}: {count} of {} samples differ, max {max} (decoded in {took:.2?})",
            want.len()
        );
        if count > 0 {
            failures.push(format!("{name}: {count} samples differ, max {max}"));
        }
    }
    println!("largest difference over {} files: {worst}", paths.len());
    failures
}

#[test]
fn jpegs_decode_exactly_as_pillow() {
    let paths = cases("jpg");
    assert!(paths.len() >= 30, "fixtures missing: {}", paths.len());
    let failures = compare(&paths);
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn pngs_convert_to_rgb_exactly_as_pillow() {
    let paths = cases("png");
    assert!(paths.len() >= 15, "fixtures missing: {}", paths.len());
    let failures = compare(&paths);
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Pillow refuses a 2-component JPEG ("cannot identify image file"); so does the program, by name.
#[test]
fn a_two_component_jpeg_is_refused_by_name() {
    let path = folder().join("refused_2components_37x29.jpg");
    let message = load_image(&path).expect_err("2 components").to_string();
    assert!(
        message.contains("refused_2components_37x29.jpg"),
        "{message}"
    );
    let bytes = std::fs::read(&path).unwrap();
    assert!(decode_image(&bytes, "two.jpg").is_err());
}

/// Any folder of images with Pillow's arrays beside them (`NAME` and `NAME.npy`, as
/// decode_refs.py writes them), named by `IP2P_DECODE_DIR`: photos of your own, or thousands of
/// generated ones. Prints, for comparison, how far the `image` crate's own JPEG decoder
/// (zune-jpeg, which this program used before) is from Pillow on the same files. Does nothing
/// without the variable.
#[test]
fn a_folder_named_by_ip2p_decode_dir_decodes_as_pillow() {
    let Some(dir) = std::env::var_os("IP2P_DECODE_DIR") else {
        return;
    };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "npy"))
        .filter(|p| Path::new(&format!("{}.npy", p.display())).exists())
        .collect();
    paths.sort();
    let (mut before_max, mut before_files) = (0u8, 0usize);
    for path in &paths {
        let (h, w, want) = read_u8_npy(Path::new(&format!("{}.npy", path.display())));
        let bytes = std::fs::read(path).unwrap();
        if let Ok(img) = image::load_from_memory(&bytes)
            && img.width() as usize == w
            && img.height() as usize == h
            && !matches!(img.color(), image::ColorType::Rgba8)
        {
            let rgb = img.into_rgb8();
            let max = rgb
                .as_raw()
                .iter()
                .zip(&want)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            before_max = before_max.max(max);
            before_files += usize::from(max > 0);
        }
    }
    println!(
        "the image crate's decoder: {before_files} of {} files differ from Pillow, by up to {before_max}",
        paths.len()
    );
    let failures = compare(&paths);
    assert!(failures.is_empty(), "{failures:#?}");
}
