//! Bad checkpoints and bad requests give typed errors that name the problem, never a panic.

use candle_core::Device;
use janus_pipeline::generation::{GenBatch, GenerateParams, GenerationModel};
use janus_pipeline::understand::{Conversation, UnderstandingModel};
use janus_pipeline::{Error, ImageLimits, LoadOptions, Message, Role, SamplingParams};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny")
}

/// A copy of a fixture checkpoint in a fresh temporary directory.
fn copy_checkpoint(which: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture().join(which)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

fn user(text: &str, images: Vec<image::RgbImage>) -> Conversation {
    Conversation {
        messages: vec![Message {
            role: Role::User,
            content: text.into(),
        }],
        images,
    }
}

fn wide() -> image::RgbImage {
    let bytes = std::fs::read(fixture().join("wide.png")).unwrap();
    janus_pipeline::decode_rgb(&bytes, &ImageLimits::default()).unwrap()
}

#[test]
fn missing_files_are_named() {
    for (file, what) in [
        ("config.json", "config"),
        ("tokenizer.json", "tokenizer"),
        ("model.safetensors", "weights"),
    ] {
        let dir = copy_checkpoint("model");
        std::fs::remove_file(dir.path().join(file)).unwrap();
        let err = UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, Error::MissingFile { .. }), "{what}: {err}");
        assert!(
            err.to_string().contains(file),
            "{what}: message should name {file}: {err}"
        );
    }
    let dir = copy_checkpoint("model-pth");
    std::fs::remove_file(dir.path().join("pytorch_model-00002-of-00002.bin")).unwrap();
    let err = GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("pytorch_model-00002-of-00002.bin"),
        "{err}"
    );
    let err = UnderstandingModel::load(Path::new("/nonexistent/janus"), &LoadOptions::default())
        .unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
}

#[test]
fn unknown_tower_or_vq_model_in_config() {
    let dir = copy_checkpoint("model");
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    let params = v["vision_config"]["params"].as_object_mut().unwrap();
    params.insert("model_name".into(), "siglip_so400m_patch14_384".into());
    params.remove("width");
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let err = UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownVisionTower(n) if n == "siglip_so400m_patch14_384"),
        "{err}"
    );

    let mut v: serde_json::Value = serde_json::from_str(&cfg).unwrap();
    v["gen_vision_config"]["cls"] = "VQ-8".into();
    v["gen_vision_config"]["params"]
        .as_object_mut()
        .unwrap()
        .remove("ch_mult");
    std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
    let err = GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::UnknownVqModel(n) if n == "VQ-8"),
        "{err}"
    );

    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let err = GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Config { .. }), "{err}");
}

#[test]
fn wrong_weight_shape_names_the_tensor() {
    let dir = copy_checkpoint("model");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let name = "aligner.layers.0.weight";
    let t = tensors[name].narrow(0, 0, 32).unwrap();
    tensors.insert(name.to_string(), t);
    let gen_name = "gen_head.vision_head.weight";
    let g = tensors[gen_name].narrow(0, 0, 100).unwrap();
    tensors.insert(gen_name.to_string(), g);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Weights(_)), "{err}");
    assert!(err.to_string().contains(name), "{err}");
    let err = GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains(gen_name), "{err}");
}

#[test]
fn missing_weight_is_named() {
    let dir = copy_checkpoint("model");
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    tensors.remove("language_model.model.norm.weight");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        err.to_string().contains("language_model.model.norm.weight"),
        "{err}"
    );
}

#[test]
fn truncated_pickle_is_an_error() {
    let dir = copy_checkpoint("model-pth");
    let shard = dir.path().join("pytorch_model-00002-of-00002.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let err = GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Weights(_)), "{err}");
    assert!(
        err.to_string().contains("pytorch_model-00002-of-00002.bin"),
        "{err}"
    );
}

#[test]
fn bad_images_are_refused() {
    let limits = ImageLimits::default();
    let png = std::fs::read(fixture().join("wide.png")).unwrap();
    assert!(
        janus_pipeline::decode_rgb(&png[..png.len() / 2], &limits).is_err(),
        "truncated"
    );
    assert!(
        janus_pipeline::decode_rgb(b"definitely not an image", &limits).is_err(),
        "garbage"
    );
    assert!(janus_pipeline::decode_rgb(&[], &limits).is_err(), "empty");
    // A PNG header claiming 50 000 × 50 000 pixels is refused from the header alone.
    let err = janus_pipeline::decode_rgb(&png_claiming(50_000, 50_000), &limits).unwrap_err();
    assert!(err.to_string().contains("50000"), "{err}");
    // 0 × 0.
    let zero = png_claiming(0, 0);
    assert!(janus_pipeline::decode_rgb(&zero, &limits).is_err(), "0x0");
}

/// A PNG whose header claims `w × h` pixels, followed by the start of a zlib stream (a real
/// bomb would continue it for gigabytes).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend(data);
        png.extend(&body);
        png.extend(crc32(&body).to_be_bytes());
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0xed, 0xc1, 0x01, 0x0d, 0x00, 0x00]);
    chunk(b"IEND", &[]);
    png
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = 0xFFFF_FFFFu32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

#[test]
fn bad_understanding_requests() {
    let m = UnderstandingModel::load(&fixture().join("model"), &LoadOptions::default()).unwrap();
    let p = SamplingParams::default();
    let err = m
        .prepare(
            &user("<image_placeholder> and <image_placeholder>?", vec![wide()]),
            p.clone(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImageCountMismatch {
                placeholders: 2,
                images: 1
            }
        ),
        "{err}"
    );
    let err = m
        .prepare(&user("No tag here", vec![wide()]), p.clone())
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImageCountMismatch {
                placeholders: 0,
                images: 1
            }
        ),
        "{err}"
    );
    let err = m
        .prepare(
            &Conversation {
                messages: vec![],
                images: vec![],
            },
            p.clone(),
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                field: "messages",
                ..
            }
        ),
        "{err}"
    );
    let sys_only = Conversation {
        messages: vec![Message {
            role: Role::System,
            content: "x".into(),
        }],
        images: vec![],
    };
    assert!(matches!(
        m.prepare(&sys_only, p.clone()),
        Err(Error::InvalidArgument {
            field: "messages",
            ..
        })
    ));
    for (bad, field) in [
        (
            SamplingParams {
                top_p: 0.0,
                ..p.clone()
            },
            "top_p",
        ),
        (
            SamplingParams {
                top_p: 1.01,
                ..p.clone()
            },
            "top_p",
        ),
        (
            SamplingParams {
                temperature: -0.5,
                ..p.clone()
            },
            "temperature",
        ),
        (
            SamplingParams {
                temperature: f32::INFINITY,
                ..p.clone()
            },
            "temperature",
        ),
        (
            SamplingParams {
                max_new_tokens: 0,
                ..p.clone()
            },
            "max_new_tokens",
        ),
        (
            SamplingParams {
                max_new_tokens: 4,
                min_new_tokens: 5,
                ..p.clone()
            },
            "min_new_tokens",
        ),
    ] {
        let err = m.prepare(&user("hi", vec![]), bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }
    // Longer than the context window (one image alone is 578 tokens).
    let small = UnderstandingModel::load(
        &fixture().join("model"),
        &LoadOptions {
            max_context: Some(600),
            ..Default::default()
        },
    )
    .unwrap();
    // The images' tokens alone are counted before any image is decoded (`check` sees only
    // how many there are): 578 + 512 new tokens do not fit 600.
    let msgs = user("<image_placeholder>\nDescribe.", vec![]).messages;
    let err = small.check(msgs.clone(), 1, p.clone()).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { field: "prompt", ref reason } if reason.contains("context window of 600")),
        "{err}"
    );
    // 578 + 16 fit, but not with the template's tokens: the exact count after tokenizing.
    let p16 = SamplingParams {
        max_new_tokens: 16,
        ..p.clone()
    };
    let checked = small.check(msgs, 1, p16.clone()).unwrap();
    let err = small.prepare_checked(checked, &[wide()]).unwrap_err();
    assert!(
        matches!(err, Error::PromptTooLong { context: 600, .. }),
        "{err}"
    );
    let err = small
        .prepare(&user("<image_placeholder>\nDescribe.", vec![wide()]), p16)
        .unwrap_err();
    assert!(
        matches!(err, Error::PromptTooLong { context: 600, .. }),
        "{err}"
    );
    // The model still serves good requests afterwards.
    assert!(m
        .prepare(&user("<image_placeholder>\nok?", vec![wide()]), p)
        .is_ok());
}

#[test]
fn bad_generation_requests() {
    let m = GenerationModel::load(&fixture().join("model"), &LoadOptions::default()).unwrap();
    let ok = GenerateParams::default();
    for (bad, field) in [
        (GenerateParams { n: 0, ..ok.clone() }, "n"),
        (
            GenerateParams {
                n: 17,
                ..ok.clone()
            },
            "n",
        ),
        (
            GenerateParams {
                cfg_weight: -1.0,
                ..ok.clone()
            },
            "cfg_weight",
        ),
        (
            GenerateParams {
                cfg_weight: f32::NAN,
                ..ok.clone()
            },
            "cfg_weight",
        ),
        (
            GenerateParams {
                temperature: -1.0,
                ..ok.clone()
            },
            "temperature",
        ),
        (
            GenerateParams {
                temperature: f32::NAN,
                ..ok.clone()
            },
            "temperature",
        ),
        (
            GenerateParams {
                top_p: 0.0,
                ..ok.clone()
            },
            "top_p",
        ),
        (
            GenerateParams {
                top_p: 2.0,
                ..ok.clone()
            },
            "top_p",
        ),
    ] {
        let err = m.start("a cat", &bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { field: f, .. } if f == field),
            "{field}: {err}"
        );
    }
    let mut batch = GenBatch::new();
    m.join(&mut batch, 0, m.start("a cat", &ok).unwrap())
        .unwrap();
    assert!(
        m.advance(&mut batch, &[99_999]).is_err(),
        "code outside the codebook"
    );
    assert!(m.advance(&mut batch, &[1, 2]).is_err(), "wrong token count");
    let long = "word ".repeat(20_000);
    assert!(matches!(
        m.start(&long, &ok),
        Err(Error::PromptTooLong { .. })
    ));
}
