//! `synth` writes checkpoints that both halves load and run.

use janus_pipeline::generate::{GenerateParams, GenerationModel};
use janus_pipeline::synth::{preset_config, write_checkpoint, Preset};
use janus_pipeline::understand::{Conversation, UnderstandingModel};
use janus_pipeline::{JanusConfig, LoadOptions, Message, Role, SamplingParams};
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
    let mut job = gen
        .start(
            "a cat",
            &GenerateParams {
                n: 2,
                ..Default::default()
            },
        )
        .unwrap();
    for _ in 0..3 {
        gen.step(&mut job).unwrap();
    }
    assert_eq!(job.tokens.len(), 2);
    assert_eq!(job.step(), 3);
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
