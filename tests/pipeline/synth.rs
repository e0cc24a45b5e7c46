//! `synth` writes checkpoints that both halves load and run.

use janus_pipeline::generation::{GenBatch, GenerateParams, GenerationModel};
use janus_pipeline::understand::{Conversation, UnderstandingModel};
use janus_pipeline::{JanusConfig, LoadOptions, Message, Role, SamplingParams};
use janus_synth::{preset_config, write_checkpoint, Preset};
use std::path::Path;

fn tokenizer() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny/model/tokenizer.json")
}

#[test]
fn tiny_checkpoint_loads_and_runs_both_halves() {
    let dir = tempfile::tempdir().unwrap();
    let params = write_checkpoint(Preset::Tiny, Some(1), &tokenizer(), dir.path(), 7).unwrap();
    assert!(params > 0);
    let cfg = JanusConfig::from_dir(dir.path()).unwrap();
    assert_eq!(cfg.llm.num_hidden_layers, 1);
    let und = UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let img = image::RgbImage::from_pixel(50, 80, image::Rgb([200, 10, 10]));
    let conv = Conversation {
        messages: vec![Message {
            role: Role::User,
            content: "<image_placeholder>\nWhat colour?".into(),
        }],
        images: vec![img],
    };
    let p = SamplingParams {
        max_new_tokens: 4,
        min_new_tokens: 4,
        ..Default::default()
    };
    let (_, reason) = und.understand(&conv, p, |_| {}).unwrap();
    assert_eq!(reason, janus_pipeline::FinishReason::Length);
    let gen = GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap();
    let ready = gen
        .start(
            "a cat",
            &GenerateParams {
                n: 2,
                ..Default::default()
            },
        )
        .unwrap();
    let mut batch = GenBatch::new();
    gen.join(&mut batch, 0, ready).unwrap();
    for _ in 0..3 {
        gen.step_batch(&mut batch).unwrap();
    }
    assert_eq!(batch.tokens(0).unwrap().len(), 2);
    assert_eq!(batch.progress(0).unwrap().0, 3);
}

#[test]
fn real_presets_parse_with_their_known_names() {
    for (preset, hidden, layers) in [(Preset::Pro1b, 2048, 24), (Preset::Pro7b, 4096, 30)] {
        let cfg = JanusConfig::from_json(&preset_config(preset, None).to_string()).unwrap();
        assert_eq!(cfg.llm.hidden_size, hidden);
        assert_eq!(cfg.llm.num_hidden_layers, layers);
        assert_eq!(cfg.vision.width, 1024);
        assert_eq!(cfg.vq.ch_mult, vec![1, 1, 2, 2, 4]);
        assert_eq!(cfg.image_tokens(), 576);
    }
    let cfg = JanusConfig::from_json(&preset_config(Preset::Pro1b, Some(4)).to_string()).unwrap();
    assert_eq!(cfg.llm.num_hidden_layers, 4);
}

use janus_pipeline::weights::WeightFiles;
use janus_synth::{write_checkpoint_with, Format, SynthOptions};

/// Greedy understanding tokens and generation tokens of a checkpoint (both halves).
fn outputs(dir: &Path) -> (Vec<u32>, Vec<Vec<u32>>) {
    let opts = LoadOptions::default();
    let und = UnderstandingModel::load(dir, &opts).unwrap();
    let img = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 3, y as u8 * 5, 77]));
    let conv = Conversation {
        messages: vec![Message {
            role: Role::User,
            content: "<image_placeholder>\nWhat is shown?".into(),
        }],
        images: vec![img],
    };
    let p = SamplingParams {
        max_new_tokens: 6,
        min_new_tokens: 6,
        ..Default::default()
    };
    let mut tokens = Vec::new();
    und.understand(&conv, p, |e| {
        if let janus_pipeline::TokenEvent::Token { id, .. } = e {
            tokens.push(*id);
        }
    })
    .unwrap();
    let gen = GenerationModel::load(dir, &opts).unwrap();
    let ready = gen
        .start(
            "a red apple",
            &GenerateParams {
                n: 2,
                temperature: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
    let mut batch = GenBatch::new();
    gen.join(&mut batch, 0, ready).unwrap();
    for _ in 0..4 {
        gen.step_batch(&mut batch).unwrap();
    }
    (tokens, batch.tokens(0).unwrap().to_vec())
}

fn synth(dir: &Path, format: Format, shard_bytes: u64) {
    write_checkpoint_with(
        Preset::Tiny,
        &tokenizer(),
        dir,
        &SynthOptions {
            llm_layers: Some(1),
            seed: 11,
            format,
            shard_bytes,
        },
    )
    .unwrap();
}

#[test]
fn pth_and_safetensors_synths_hold_the_same_tensors_and_give_the_same_outputs() {
    let st = tempfile::tempdir().unwrap();
    let pth = tempfile::tempdir().unwrap();
    synth(st.path(), Format::Safetensors, 0);
    // Small shards: the sharded layout of Janus-Pro-7B on the hub.
    synth(pth.path(), Format::Pth, 2_000_000);
    assert!(!pth.path().join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pth.path().join("pytorch_model.bin.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let mut shards: Vec<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    let n = shards.len();
    assert!(n >= 2, "{shards:?}");
    for (i, s) in shards.iter().enumerate() {
        assert_eq!(*s, format!("pytorch_model-{:05}-of-{n:05}.bin", i + 1));
    }

    // Every tensor equal, bit for bit, through our reader and through candle's own pickle
    // reader (an independent check of the archive and pickle format).
    let a = WeightFiles::find(st.path()).unwrap().open().unwrap();
    let b = WeightFiles::find(pth.path()).unwrap().open().unwrap();
    assert_eq!(a.len(), b.len());
    assert_eq!(map.len(), a.len());
    let mut candle: std::collections::HashMap<String, candle_core::Tensor> = Default::default();
    for s in &shards {
        for (name, t) in candle_core::pickle::read_all(pth.path().join(s)).unwrap() {
            candle.insert(name, t);
        }
    }
    assert_eq!(candle.len(), a.len());
    let bits = |t: &candle_core::Tensor| -> Vec<u16> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    for name in a.names() {
        assert_eq!(a.info(name).unwrap().0, candle_core::DType::BF16);
        let x = a
            .read(name, candle_core::DType::BF16, &candle_core::Device::Cpu)
            .unwrap();
        let y = b
            .read(name, candle_core::DType::BF16, &candle_core::Device::Cpu)
            .unwrap();
        assert_eq!(x.dims(), y.dims(), "{name}");
        assert_eq!(bits(&x), bits(&y), "{name}");
        assert_eq!(bits(&x), bits(&candle[name]), "{name}");
        // Converting reads (bf16 storage → f32) equal candle's conversion.
        let xf = a
            .read(name, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let yf = x.to_dtype(candle_core::DType::F32).unwrap();
        assert_eq!(
            xf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            yf.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }

    let (ut, gt) = outputs(st.path());
    let (up, gp) = outputs(pth.path());
    assert_eq!(ut.len(), 6);
    assert_eq!(gt.len(), 2);
    assert_eq!(gt[0].len(), 4);
    assert_eq!(ut, up);
    assert_eq!(gt, gp);
}

#[test]
fn pth_synth_is_a_torch_save_archive() {
    let dir = tempfile::tempdir().unwrap();
    // Everything fits one shard: a single pytorch_model.bin and no index, as Janus-Pro-1B.
    synth(dir.path(), Format::Pth, janus_synth::DEFAULT_SHARD_BYTES);
    assert!(!dir.path().join("pytorch_model.bin.index.json").exists());
    let path = dir.path().join("pytorch_model.bin");
    let file = std::fs::File::open(&path).unwrap();
    let mut zip = zip::ZipArchive::new(file).unwrap();
    let names: Vec<String> = zip.file_names().map(|s| s.unwrap().to_string()).collect();
    assert_eq!(names[0], "archive/data.pkl");
    assert_eq!(names.last().unwrap(), "archive/version");
    assert!(names.contains(&"archive/byteorder".to_string()));
    let storages = names
        .iter()
        .filter(|n| n.starts_with("archive/data/"))
        .count();
    for i in 0..zip.len() {
        let f = zip.by_index(i).unwrap();
        let name = f.name().unwrap().to_string();
        assert_eq!(f.compression(), zip::CompressionMethod::Stored, "{name}");
        if name.starts_with("archive/data/") {
            assert_eq!(
                f.data_start().unwrap() % 64,
                0,
                "{name} is not 64-byte aligned"
            );
        }
    }
    let mut pkl = Vec::new();
    std::io::Read::read_to_end(&mut zip.by_name("archive/data.pkl").unwrap(), &mut pkl).unwrap();
    assert_eq!(&pkl[..2], &[0x80, 2], "pickle protocol 2");
    let text = String::from_utf8_lossy(&pkl);
    assert!(text.contains("collections\nOrderedDict\n"));
    assert!(text.contains("torch._utils\n_rebuild_tensor_v2\n"));
    assert!(text.contains("torch\nBFloat16Storage\n"));
    assert_eq!(*pkl.last().unwrap(), b'.');
    let infos = candle_core::pickle::read_pth_tensor_info(&path, false, None).unwrap();
    assert_eq!(infos.len(), storages);
    // Python's own unpickler (without torch) walks the opcodes when python3 is around.
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import sys, zipfile, pickletools\n\
             z = zipfile.ZipFile(sys.argv[1]); assert z.testzip() is None\n\
             pickletools.dis(z.read('archive/data.pkl'), out=open('/dev/null', 'w'))\n\
             print(z.read('archive/version').decode().strip())",
        )
        .arg(&path)
        .output();
    if let Ok(out) = out {
        if out.status.success() || !String::from_utf8_lossy(&out.stderr).contains("No module") {
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "3");
        }
    }
    // And it loads.
    UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap();
}
