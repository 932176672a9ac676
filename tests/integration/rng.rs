//! torch's CPU generator against torch 2.15's own draws (tests/fixtures/scripts/rng_refs.py):
//! every value must be bitwise identical, for both of torch's float Box-Muller kernels, across
//! successive calls on one generator (state and the cached scalar normal carry over).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use instruct_pix2pix::pipeline::rng::{BoxMullerKernel, TorchGenerator};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/rng")
}

/// The manifest and the concatenated float32 draws of one variant.
fn load(variant: &str) -> (Value, Vec<f32>) {
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("{variant}.json"))).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(fixtures().join(format!("{variant}.bin"))).unwrap();
    let values = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (manifest, values)
}

/// Compares every draw bit for bit; reports the first differing elements.
fn check_variant(variant: &str, kernel: BoxMullerKernel) {
    let (manifest, reference) = load(variant);
    let mut failures = Vec::new();
    let mut compared = 0;
    for sequence in manifest["sequences"].as_array().unwrap() {
        let seed: u64 = sequence["seed"].as_str().unwrap().parse().unwrap();
        let mut generator = TorchGenerator::with_kernel(seed, kernel);
        for draw in sequence["draws"].as_array().unwrap() {
            let n = draw["n"].as_u64().unwrap() as usize;
            let offset = draw["offset"].as_u64().unwrap() as usize;
            let got = generator.randn_f32(n);
            let expected = &reference[offset..offset + n];
            assert_eq!(got.len(), n);
            let differing: Vec<usize> = (0..n)
                .filter(|&i| got[i].to_bits() != expected[i].to_bits())
                .collect();
            compared += n;
            if let Some(&i) = differing.first() {
                failures.push(format!(
                    "seed {seed}, randn({n}) at offset {offset}: {} of {n} differ, first [{i}] got {} expected {}",
                    differing.len(),
                    got[i],
                    expected[i]
                ));
            }
        }
    }
    assert!(compared > 20_000);
    assert!(failures.is_empty(), "{variant}:\n{}", failures.join("\n"));
}

#[test]
fn libm_kernel_matches_torch_bitwise() {
    check_variant("libm", BoxMullerKernel::Libm);
}

#[test]
fn avx2_kernel_matches_torch_bitwise() {
    check_variant("avx2", BoxMullerKernel::Avx2Polynomial);
}

/// `new` picks the kernel torch runs on this CPU: on this x86 machine with AVX2 (and AVX-512),
/// torch 2.15's default dispatch produced exactly the "avx2" reference.
#[test]
fn new_uses_the_kernel_torch_uses_here() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        assert_eq!(BoxMullerKernel::native(), BoxMullerKernel::Avx2Polynomial);
    }
    let kernel = BoxMullerKernel::native();
    let variant = match kernel {
        BoxMullerKernel::Avx2Polynomial => "avx2",
        BoxMullerKernel::Libm => "libm",
    };
    let (manifest, reference) = load(variant);
    let first = &manifest["sequences"][1];
    assert_eq!(first["seed"].as_str().unwrap(), "42");
    let mut generator = TorchGenerator::new(42);
    assert_eq!(generator.kernel(), kernel);
    for draw in first["draws"].as_array().unwrap() {
        let n = draw["n"].as_u64().unwrap() as usize;
        let offset = draw["offset"].as_u64().unwrap() as usize;
        let got: Vec<u32> = generator.randn_f32(n).iter().map(|v| v.to_bits()).collect();
        let expected: Vec<u32> = reference[offset..offset + n]
            .iter()
            .map(|v| v.to_bits())
            .collect();
        assert_eq!(got, expected, "randn({n})");
    }
}

/// torch keeps only the low 32 bits of the seed for the Mersenne Twister.
#[test]
fn seeds_equal_in_their_low_32_bits_draw_the_same() {
    let mut a = TorchGenerator::with_kernel(5, BoxMullerKernel::Avx2Polynomial);
    let mut b = TorchGenerator::with_kernel((1 << 32) + 5, BoxMullerKernel::Avx2Polynomial);
    for n in [3, 40, 1] {
        assert_eq!(a.randn_f32(n), b.randn_f32(n));
    }
}

/// A shaped tensor is the flat stream reshaped (row-major), as torch.randn((1, 4, 8, 8)).
#[test]
fn shaped_tensor_matches_torch_and_casts() {
    let (manifest, reference) = load("avx2");
    let shaped = &manifest["shaped"];
    let seed: u64 = shaped["seed"].as_str().unwrap().parse().unwrap();
    let shape: Vec<usize> = shaped["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let offset = shaped["offset"].as_u64().unwrap() as usize;
    let count: usize = shape.iter().product();
    let expected = &reference[offset..offset + count];

    let mut generator = TorchGenerator::with_kernel(seed, BoxMullerKernel::Avx2Polynomial);
    let tensor = generator.randn(&shape, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(tensor.dims(), shape.as_slice());
    let got = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        got.iter()
            .zip(expected)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );

    // Drawn in f32, then cast: the bf16 tensor is the rounded f32 stream.
    let mut generator = TorchGenerator::with_kernel(seed, BoxMullerKernel::Avx2Polynomial);
    let bf16 = generator.randn(&shape, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(bf16.dtype(), DType::BF16);
    let got = bf16.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap();
    assert!(
        got.iter()
            .zip(expected)
            .all(|(a, b)| *a == half::bf16::from_f32(*b))
    );
}
