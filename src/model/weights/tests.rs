//! Unit tests of weight selection, safetensors checks and the streaming reader.

use super::*;

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn chosen(list: &[&str], base: &str, variant: Variant) -> Option<(String, Variant)> {
    select_weights(&names(list), base, variant).map(|s| {
        let name = match s.entry {
            WeightEntry::Single(n) => n,
            WeightEntry::Sharded { index } => index,
        };
        (name, s.variant)
    })
}

#[test]
fn preference_order_follows_diffusers() {
    let all = [
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.bin",
        "diffusion_pytorch_model.fp16.safetensors",
    ];
    let base = DIFFUSERS_WEIGHTS;
    assert_eq!(
        chosen(&all, base, Variant::Default),
        Some((
            "diffusion_pytorch_model.safetensors".into(),
            Variant::Default
        ))
    );
    assert_eq!(
        chosen(&all, base, Variant::Fp16),
        Some((
            "diffusion_pytorch_model.fp16.safetensors".into(),
            Variant::Fp16
        ))
    );
    // A component with fp16 files only as .bin keeps the variant (diffusers' rule: the
    // variant's files when the component has any).
    assert_eq!(
        chosen(&all[..3], base, Variant::Fp16),
        Some(("diffusion_pytorch_model.fp16.bin".into(), Variant::Fp16))
    );
    // No fp16 files: the default ones.
    assert_eq!(
        chosen(&all[..2], base, Variant::Fp16),
        Some((
            "diffusion_pytorch_model.safetensors".into(),
            Variant::Default
        ))
    );
    assert_eq!(chosen(&["config.json"], base, Variant::Default), None);
}

#[test]
fn sharded_and_transformers_names() {
    // Names as diffusers 0.42 / transformers 5 write them (checked with save_pretrained).
    assert_eq!(
        chosen(
            &["diffusion_pytorch_model.safetensors.index.fp16.json"],
            DIFFUSERS_WEIGHTS,
            Variant::Fp16
        ),
        Some((
            "diffusion_pytorch_model.safetensors.index.fp16.json".into(),
            Variant::Fp16
        ))
    );
    assert_eq!(
        chosen(
            &["diffusion_pytorch_model.safetensors.fp16.index.json"],
            DIFFUSERS_WEIGHTS,
            Variant::Fp16
        )
        .map(|c| c.1),
        Some(Variant::Fp16),
        "legacy variant index name"
    );
    assert_eq!(
        chosen(
            &["pytorch_model.bin", "model.safetensors.index.json"],
            TRANSFORMERS_WEIGHTS,
            Variant::Default
        ),
        Some(("model.safetensors.index.json".into(), Variant::Default))
    );
    assert_eq!(
        chosen(&["pytorch_model.bin"], TRANSFORMERS_WEIGHTS, Variant::Fp16),
        Some(("pytorch_model.bin".into(), Variant::Default))
    );
}

#[test]
fn shard_names_reject_paths_outside_the_folder() {
    let dir = tempfile::tempdir().expect("temp dir");
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"a": "model-1.safetensors", "b": "../../etc/passwd"}}"#,
    )
    .expect("write");
    let err = shard_names(&index).expect_err("unsafe shard");
    assert!(err.to_string().contains("not a file name"), "{err}");
    std::fs::write(
        &index,
        r#"{"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors", "c": "m-1.safetensors"}}"#,
    )
    .expect("write");
    assert_eq!(
        shard_names(&index).expect("index"),
        ["m-1.safetensors", "m-2.safetensors"]
    );
}

/// Writes a safetensors file of `header` and `data_len` zero bytes of data.
fn write_safetensors(path: &Path, header: &str, data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    std::fs::write(path, bytes).expect("write");
}

#[test]
fn header_sizes_must_match_dtype_and_shape() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("w.safetensors");
    let write = |header: &str, data_len: usize| write_safetensors(&path, header, data_len);
    write(
        r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
        16,
    );
    check_safetensors(&path).expect("a valid file");
    write(
        r#"{"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,16]}}"#,
        16,
    );
    let err = check_safetensors(&path).expect_err("wrong size");
    assert!(err.to_string().contains("expected 8"), "{err}");
    write(
        r#"{"w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#,
        12,
    );
    let err = check_safetensors(&path).expect_err("short");
    assert!(matches!(err, WeightsError::Truncated { .. }), "{err:?}");
    assert!(err.to_string().contains("(4 missing)"), "{err}");
}

/// Issue 16 item 9: two tensors sharing bytes, or bytes of no tensor, are not a valid file
/// (the safetensors format requires the ranges to tile the data).
#[test]
fn overlapping_or_gapped_data_offsets_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("w.safetensors");
    let write = |header: &str, data_len: usize| write_safetensors(&path, header, data_len);
    write(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}"#,
        24,
    );
    check_safetensors(&path).expect("tiled ranges are valid");
    write(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
        16,
    );
    let err = check_safetensors(&path).expect_err("overlap");
    assert!(
        matches!(err, WeightsError::InvalidSafetensors { .. }),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("w.safetensors") && message.contains("overlapping"),
        "{message}"
    );
    assert!(
        message.contains("tensor b") && message.contains("tensor a"),
        "{message}"
    );
    write(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}}"#,
        20,
    );
    let err = check_safetensors(&path).expect_err("hole");
    assert!(err.to_string().contains("bytes 8 to 12"), "{err}");
}

/// Damaged copies of a valid file (a byte changed, cut, or a digit of the header changed)
/// are accepted only when the header still describes the file exactly, and never panic: a
/// small deterministic fuzz of the header check.
#[test]
fn damaged_headers_never_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("fuzz.safetensors");
    let header = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F16","shape":[3],"data_offsets":[16,22]}}"#;
    let mut valid = (header.len() as u64).to_le_bytes().to_vec();
    valid.extend_from_slice(header.as_bytes());
    valid.extend(std::iter::repeat_n(7u8, 22));
    let mut rng = crate::test_support::XorShift::new(0x2545_F491_4F6C_DD1D);
    let mut refused = 0;
    for _ in 0..500 {
        let bytes = rng.damage(&valid, 8..8 + header.len());
        std::fs::write(&path, &bytes).expect("write");
        match read_checked_header(&path) {
            Ok(checked) => {
                // Whatever passed describes byte ranges inside the file.
                for info in checked.entries.values() {
                    if let Some([_, end]) = u64_list(info.get("data_offsets"))
                        .and_then(|o| <[u64; 2]>::try_from(o).ok())
                    {
                        assert!(checked.data_start + end <= bytes.len() as u64);
                    }
                }
            }
            Err(err) => {
                assert!(err.to_string().contains("fuzz.safetensors"), "{err}");
                refused += 1;
            }
        }
    }
    assert!(refused > 150, "only {refused} of 500 damaged files refused");
}

/// Issue 16 item 5: a FIFO or a device in place of a weight file is refused when chosen,
/// naming it, without blocking or reading endlessly.
#[cfg(unix)]
#[test]
fn special_files_as_weights_are_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let link = dir.path().join("diffusion_pytorch_model.safetensors");
    std::os::unix::fs::symlink("/dev/zero", &link).expect("symlink");
    let files = component_weights(dir.path(), DIFFUSERS_WEIGHTS, Variant::Default)
        .expect("the link is chosen");
    assert_eq!(files, std::slice::from_ref(&link));
    let err = check_safetensors(&link).expect_err("a device");
    let message = err.to_string();
    assert!(
        message.contains("diffusion_pytorch_model.safetensors")
            && message.contains("character device"),
        "{message}"
    );
}
