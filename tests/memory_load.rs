//! Loading reads each tensor straight into its destination buffer: the process's peak RSS
//! while reading is the tensors' size, not twice it, and no file pages stay mapped. One test
//! in its own binary, so nothing else moves the RSS meanwhile.

use candle_core::{DType, Device, Tensor};
use janus_pipeline::weights::WeightFiles;
use std::collections::HashMap;

fn status_kb(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
        .unwrap()
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

#[test]
fn loading_holds_each_tensor_once() {
    const MB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    // 8 tensors of 32 MiB (bf16) = 256 MiB of weights.
    let mut tensors = HashMap::new();
    for i in 0..8 {
        let t = Tensor::arange(0f32, (16 << 20) as f32, &Device::Cpu)
            .unwrap()
            .affine(1e-6, i as f64)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        tensors.insert(format!("w{i}"), t);
    }
    let path = dir.path().join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let expected: Vec<Vec<u16>> = (0..8)
        .map(|i| {
            tensors[&format!("w{i}")]
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        })
        .collect();
    drop(tensors);

    for (dtype, bytes) in [(DType::BF16, 256 * MB), (DType::F32, 512 * MB)] {
        let index = WeightFiles::Safetensors(vec![path.clone()]).open().unwrap();
        let rss0 = status_kb("VmRSS:") * 1024;
        let file0 = status_kb("RssFile:") * 1024;
        let can_peak = reset_peak();
        let loaded: Vec<Tensor> = (0..8)
            .map(|i| index.read(&format!("w{i}"), dtype, &Device::Cpu).unwrap())
            .collect();
        let rss1 = status_kb("VmRSS:") * 1024;
        let peak = status_kb("VmHWM:") * 1024;
        let file1 = status_kb("RssFile:") * 1024;
        let grew = rss1.saturating_sub(rss0);
        eprintln!(
            "{dtype:?}: rss {} -> {} MiB, peak {} MiB, file-backed {} -> {} MiB",
            rss0 / MB,
            rss1 / MB,
            peak / MB,
            file0 / MB,
            file1 / MB
        );
        assert!(
            grew <= bytes * 11 / 10 + 16 * MB,
            "{dtype:?}: RSS grew by {} MiB for {} MiB of tensors",
            grew / MB,
            bytes / MB
        );
        // No checkpoint pages stay mapped (an mmap loader adds the file's 256 MiB here).
        assert!(
            file1 <= file0 + 16 * MB,
            "file-backed RSS grew by {} MiB",
            (file1 - file0) / MB
        );
        if can_peak {
            // Transient memory: at most a conversion chunk, never a second copy.
            assert!(
                peak <= rss1 + 32 * MB,
                "{dtype:?}: peak {} MiB over the final {} MiB",
                peak / MB,
                rss1 / MB
            );
        }
        for (i, t) in loaded.iter().enumerate() {
            let bits: Vec<u16> = t
                .to_dtype(DType::BF16)
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert!(bits == expected[i], "{dtype:?} w{i} differs");
        }
        drop(loaded);
    }
}
