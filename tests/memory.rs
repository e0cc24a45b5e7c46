//! Memory: the two halves share one LLM (`load_both`), weights are stored in the checkpoint's
//! dtype by default, and loading reads tensors without mapping or holding the files.

use janus_pipeline::generation::{GenBatch, GenerateParams, GenerationModel};
use janus_pipeline::understand::{Conversation, TokenEvent, UnderstandingModel};
use janus_pipeline::{load_both, DType, LoadOptions, Message, Role, SamplingParams};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixture(which: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/janus-tiny")
        .join(which)
}

fn und_tokens(m: &UnderstandingModel) -> Vec<u32> {
    let img = image::open(fixture("wide.png")).unwrap().to_rgb8();
    let conv = Conversation {
        messages: vec![Message {
            role: Role::User,
            content: "<image_placeholder>\nWhat is shown?".into(),
        }],
        images: vec![img],
    };
    let p = SamplingParams {
        max_new_tokens: 8,
        min_new_tokens: 8,
        ..Default::default()
    };
    let mut out = Vec::new();
    m.understand(&conv, p, |e| {
        if let TokenEvent::Token { id, .. } = e {
            out.push(*id);
        }
    })
    .unwrap();
    out
}

fn gen_tokens(m: &GenerationModel) -> Vec<Vec<u32>> {
    let ready = m
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
    m.join(&mut batch, 0, ready).unwrap();
    for _ in 0..6 {
        m.step_batch(&mut batch).unwrap();
    }
    batch.tokens(0).unwrap().to_vec()
}

/// The tensors' dtypes as `Debug` prints them (`; bf16]`), counted.
fn count_dtype(llm: &janus_llm::Llm, dtype: DType) -> usize {
    format!("{llm:?}")
        .matches(&format!("; {}", dtype.as_str()))
        .count()
}

#[test]
fn load_both_shares_one_llm_and_matches_separate_halves() {
    for dir in [fixture("model"), fixture("model-pth")] {
        let opts = LoadOptions::default();
        let (und, gen) = load_both(&dir, &opts, &opts).unwrap();
        assert!(
            Arc::ptr_eq(und.llm(), gen.llm()),
            "{}: the halves hold different LLMs",
            dir.display()
        );
        // One LLM object: its weight tensors (and their storage) exist once, referenced twice.
        assert!(Arc::strong_count(und.llm()) >= 2);

        let und_alone = UnderstandingModel::load(&dir, &opts).unwrap();
        let gen_alone = GenerationModel::load(&dir, &opts).unwrap();
        assert!(!Arc::ptr_eq(und_alone.llm(), gen_alone.llm()));
        assert_eq!(
            und_tokens(&und),
            und_tokens(&und_alone),
            "{}",
            dir.display()
        );
        assert_eq!(
            gen_tokens(&gen),
            gen_tokens(&gen_alone),
            "{}",
            dir.display()
        );

        // Different weight dtypes cannot share.
        let f32_weights = LoadOptions {
            weight_dtype: Some(DType::F32),
            ..LoadOptions::default()
        };
        let (und2, gen2) = load_both(&dir, &opts, &f32_weights).unwrap();
        assert!(!Arc::ptr_eq(und2.llm(), gen2.llm()));
        assert_eq!(count_dtype(gen2.llm(), DType::BF16), 0);
        assert!(count_dtype(und2.llm(), DType::BF16) > 0);
        // Nor different compute dtypes.
        let bf16 = LoadOptions {
            dtype: DType::BF16,
            ..LoadOptions::default()
        };
        let (und3, gen3) = load_both(&dir, &opts, &bf16).unwrap();
        assert!(!Arc::ptr_eq(und3.llm(), gen3.llm()));
        assert_eq!(gen3.llm().dtype(), DType::BF16);
        assert_eq!(und3.llm().dtype(), DType::F32);
    }
}

#[test]
fn weights_default_to_the_checkpoint_dtype() {
    for dir in [fixture("model"), fixture("model-pth")] {
        // The fixture copies are bf16, like the hub checkpoints.
        assert_eq!(janus_pipeline::checkpoint_dtype(&dir).unwrap(), DType::BF16);
        let m = UnderstandingModel::load(&dir, &LoadOptions::default()).unwrap();
        assert_eq!(m.llm().dtype(), DType::F32, "compute dtype on the CPU");
        assert!(count_dtype(m.llm(), DType::BF16) > 0, "{}", dir.display());
        let f32_weights = LoadOptions {
            weight_dtype: Some(DType::F32),
            ..LoadOptions::default()
        };
        let m = UnderstandingModel::load(&dir, &f32_weights).unwrap();
        assert_eq!(count_dtype(m.llm(), DType::BF16), 0);
    }
    let o = LoadOptions::default();
    assert_eq!(o.dtype, DType::F32);
    assert_eq!(o.resolve_weight_dtype(DType::BF16), DType::BF16);
    assert_eq!(o.resolve_weight_dtype(DType::F32), DType::F32);
    // Never stored wider than computed, nor in a 16-bit format the kernels would convert.
    let bf16 = LoadOptions {
        dtype: DType::BF16,
        ..LoadOptions::default()
    };
    assert_eq!(bf16.resolve_weight_dtype(DType::F32), DType::BF16);
    assert_eq!(o.resolve_weight_dtype(DType::F16), DType::F32);
    let cpu = janus_pipeline::Device::Cpu;
    // `auto`: bf16 where the CPU multiplies bf16 natively, f32 elsewhere; the library's
    // default stays f32 (the reference's numerics).
    let native = janus_kernels::gemm::has_bf16_dot();
    assert_eq!(
        janus_pipeline::parse_dtype_for("auto", &cpu).unwrap(),
        if native { DType::BF16 } else { DType::F32 }
    );
    assert_eq!(janus_pipeline::default_dtype(&cpu), DType::F32);
    assert_eq!(
        janus_pipeline::parse_dtype_for("bf16", &cpu).unwrap(),
        DType::BF16
    );
    assert!(janus_pipeline::parse_dtype_for("fp8", &cpu).is_err());
}

#[test]
fn info_reports_resolved_dtypes() {
    use clap::Parser;
    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        model: janus_model_service::flags::ModelFlags,
    }
    let dir = fixture("model-pth");
    let d = dir.to_str().unwrap();
    let info = |args: &[&str]| {
        let f = Flags::parse_from([&["janus", "--model", d], args].concat());
        let opts = f.model.load_options(None).unwrap();
        (f.model.info(&dir, None), opts)
    };
    // Defaults: `auto` resolves to bf16 on CPUs with native bf16 products, else f32; weights
    // in the checkpoint's bf16.
    let auto = if janus_kernels::gemm::has_bf16_dot() {
        DType::BF16
    } else {
        DType::F32
    };
    let (i, opts) = info(&[]);
    assert_eq!(
        (i.dtype.as_str(), i.weight_dtype.as_str()),
        (janus_pipeline::dtype_name(auto), "bf16")
    );
    assert_eq!((opts.dtype, opts.weight_dtype), (auto, None));
    let (i, _) = info(&["--weight-dtype", "f32"]);
    assert_eq!(
        (i.dtype.as_str(), i.weight_dtype.as_str()),
        (janus_pipeline::dtype_name(auto), "f32")
    );
    let (i, opts) = info(&["--dtype", "bf16"]);
    assert_eq!(
        (i.dtype.as_str(), i.weight_dtype.as_str()),
        ("bf16", "bf16")
    );
    assert_eq!(opts.dtype, DType::BF16);
    // On CUDA `auto` is bf16 (resolved by name, no device is opened).
    let i = Flags::parse_from(["janus", "--model", d])
        .model
        .info(&dir, Some("cuda:0"));
    assert_eq!(
        (i.dtype.as_str(), i.weight_dtype.as_str()),
        ("bf16", "bf16")
    );
}
