//! The transformers ("HF") layout: `model-hf/` is the fixture converted by transformers' own
//! conversion script (tools/fixtures/convert_to_hf.py). Loaded through the layout mapping it must
//! be the same model as `model/` to the bit: every tensor, the understanding logits and greedy
//! tokens, the guided image logits, greedy image tokens and decoded pixels, and the VQ encoder's
//! codes. Broken HF checkpoints (unknown `model_type`, a missing tensor, an untied head dropped,
//! a wrong `image_token_id`) fail with errors naming the problem.

use candle_core::{DType, Device, Tensor};
use janus_pipeline::generation::{GenBatch, GenerateParams, GenerationModel};
use janus_pipeline::layout::{self, Layout};
use janus_pipeline::understand::{Conversation, TokenEvent, UnderstandingModel};
use janus_pipeline::weights::WeightFiles;
use janus_pipeline::{Error, JanusConfig, LoadOptions, Message, Role, SamplingParams};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny")
}

fn ds_dir() -> PathBuf {
    fixture().join("model")
}

fn hf_dir() -> PathBuf {
    fixture().join("model-hf")
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("golden.json")).unwrap()).unwrap()
}

fn cases(kind: &str) -> Vec<(String, Value)> {
    let g = golden();
    let out: Vec<(String, Value)> = g["cases"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, c)| c["kind"] == kind)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(!out.is_empty(), "no {kind} cases");
    out
}

/// Bit-equality of two tensors (same shape, same f32 bits).
fn assert_bits(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shape");
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    let (x, y) = (bits(a), bits(b));
    let diff = x.iter().zip(&y).filter(|(p, q)| p != q).count();
    assert_eq!(diff, 0, "{what}: {diff} of {} values differ", x.len());
}

fn conversation(conv: &Value) -> Conversation {
    let mut messages = Vec::new();
    let mut images = Vec::new();
    for m in conv.as_array().unwrap() {
        messages.push(Message {
            role: Role::parse(m["role"].as_str().unwrap()).unwrap(),
            content: m["content"].as_str().unwrap().to_string(),
        });
        for f in m["images"].as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
            let bytes = std::fs::read(fixture().join(f.as_str().unwrap())).unwrap();
            images.push(janus_pipeline::decode_rgb(&bytes, &Default::default()).unwrap());
        }
    }
    Conversation { messages, images }
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams {
        max_new_tokens: n,
        min_new_tokens: n,
        temperature: 0.0,
        ..Default::default()
    }
}

fn run_greedy(model: &UnderstandingModel, convs: &[Conversation], n: usize) -> Vec<Vec<u32>> {
    let prepared = convs
        .iter()
        .map(|c| model.prepare(c, greedy(n)).unwrap())
        .collect::<Vec<_>>();
    let (mut batch, mut events) = model.start(prepared).unwrap();
    while !batch.is_done() {
        events.extend(model.step(&mut batch).unwrap());
    }
    let mut out = vec![Vec::new(); convs.len()];
    for e in events {
        if let TokenEvent::Token { row, id, .. } = e {
            out[row].push(id);
        }
    }
    out
}

#[test]
fn hf_config_translates_to_the_deepseek_config() {
    let ds = JanusConfig::from_dir(&ds_dir()).unwrap();
    let hf = JanusConfig::from_dir(&hf_dir()).unwrap();
    assert_eq!(ds.layout, Layout::DeepSeek);
    assert_eq!(hf.layout, Layout::Transformers);
    assert_eq!(hf.image_token_id, Some(1203));
    // Every number the loaders read is the same.
    assert_eq!(hf.llm, ds.llm);
    assert_eq!(hf.vision, ds.vision);
    assert_eq!(hf.aligner, ds.aligner);
    assert_eq!(hf.vq, ds.vq);
    assert_eq!(hf.gen_aligner, ds.gen_aligner);
    assert_eq!(hf.gen_head, ds.gen_head);
    assert_eq!(Layout::of_dir(&hf_dir()).unwrap(), Layout::Transformers);
    assert_eq!(
        janus_pipeline::checkpoint_dtype(&hf_dir()).unwrap(),
        janus_pipeline::checkpoint_dtype(&ds_dir()).unwrap()
    );
}

/// Every DeepSeek tensor the conversion keeps is served from `model-hf` under its DeepSeek name
/// with the same bits, and every `model-hf` tensor is reached by some DeepSeek name.
#[test]
fn every_tensor_maps_back_bit_equal() {
    let ds_index = WeightFiles::find(&ds_dir()).unwrap().open().unwrap();
    let hf_index = WeightFiles::find(&hf_dir()).unwrap().open().unwrap();
    let ds_names: Vec<String> = ds_index.names().map(String::from).collect();
    let hf_vb = layout::var_builder(&hf_dir(), DType::F32, &Device::Cpu).unwrap();
    let mut reached = HashSet::new();
    let mut dropped = Vec::new();
    for name in &ds_names {
        let Some(src) = layout::hf_source(name) else {
            dropped.push(name.clone());
            continue;
        };
        let (_, shape) = ds_index.info(name).unwrap();
        let ours = hf_vb
            .get(shape.to_vec(), name)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let want = ds_index.read(name, DType::F32, &Device::Cpu).unwrap();
        assert_bits(name, &ours, &want);
        reached.extend(src.names().into_iter().map(String::from));
    }
    // Only what transformers' script drops: the attention-pool head (13 tensors) and the codebook
    // counter (which the fixture does not have).
    dropped.sort();
    assert!(
        dropped
            .iter()
            .all(|n| n.starts_with("vision_model.vision_tower.attn_pool.")
                || n == "gen_vision_model.quantize.codebook_used"),
        "unmapped: {dropped:?}"
    );
    assert_eq!(dropped.len(), 13, "{dropped:?}");
    let hf_names: HashSet<String> = hf_index.names().map(String::from).collect();
    let unreached: Vec<&String> = hf_names.difference(&reached).collect();
    assert!(
        unreached.is_empty(),
        "HF tensors no DeepSeek name reaches: {unreached:?}"
    );
    assert_eq!(ds_names.len() - dropped.len() + 8, hf_names.len()); // + 2 layers × (w, b) × 2
}

#[test]
fn understanding_from_hf_equals_deepseek() {
    let opts = LoadOptions::default();
    let ds = UnderstandingModel::load(&ds_dir(), &opts).unwrap();
    let hf = UnderstandingModel::load(&hf_dir(), &opts).unwrap();
    assert_eq!(hf.tokenizer().ids, ds.tokenizer().ids);
    for (case, c) in cases("understanding") {
        let convs: Vec<Conversation> = c["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .map(conversation)
            .collect();
        let n = c["max_new_tokens"].as_u64().unwrap() as usize;
        for (i, cv) in convs.iter().enumerate() {
            let (p_ds, p_hf) = (
                ds.prepare(cv, greedy(n)).unwrap(),
                hf.prepare(cv, greedy(n)).unwrap(),
            );
            assert_eq!(p_hf.prompt, p_ds.prompt, "{case}[{i}]: prompt");
            assert_eq!(p_hf.ids, p_ds.ids, "{case}[{i}]: ids");
            if !p_ds.images.is_empty() {
                let (v_ds, a_ds) = ds.image_features(&p_ds.images).unwrap();
                let (v_hf, a_hf) = hf.image_features(&p_hf.images).unwrap();
                assert_bits(&format!("{case}[{i}] vision features"), &v_hf, &v_ds);
                assert_bits(&format!("{case}[{i}] aligned features"), &a_hf, &a_ds);
            }
            let l_ds = ds.prompt_logits(p_ds, usize::MAX).unwrap();
            let l_hf = hf.prompt_logits(p_hf, usize::MAX).unwrap();
            assert_bits(&format!("{case}[{i}] last logits"), &l_hf, &l_ds);
        }
        let t_ds = run_greedy(&ds, &convs, n);
        let t_hf = run_greedy(&hf, &convs, n);
        assert_eq!(t_hf, t_ds, "{case}: greedy tokens");
        // And both are DeepSeek's reference tokens (the parity suite checks model/ in depth).
        let g = candle_core::safetensors::load(fixture().join("golden.safetensors"), &Device::Cpu)
            .unwrap();
        let want: Vec<u32> = g[&format!("{case}.greedy_tokens")]
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect();
        assert_eq!(t_hf.concat(), want, "{case}: golden greedy tokens");
    }
}

#[test]
fn generation_from_hf_equals_deepseek() {
    let opts = LoadOptions::default();
    let ds = GenerationModel::load(&ds_dir(), &opts).unwrap();
    let hf = GenerationModel::load(&hf_dir(), &opts).unwrap();
    let g =
        candle_core::safetensors::load(fixture().join("golden.safetensors"), &Device::Cpu).unwrap();
    for (case, c) in cases("generation") {
        let prompt = c["prompt"].as_str().unwrap();
        let params = GenerateParams {
            n: 1,
            cfg_weight: c["cfg_weight"].as_f64().unwrap() as f32,
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(
            hf.tokenizer().encode_generation(prompt).unwrap(),
            ds.tokenizer().encode_generation(prompt).unwrap(),
            "{case}: prompt ids"
        );
        // Guided logits of the first steps, the golden tokens fed back.
        let golden_tokens: Vec<u32> = g[&format!("{case}.greedy_image_tokens")]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&x| x as u32)
            .collect();
        let (mut b_ds, mut b_hf) = (GenBatch::new(), GenBatch::new());
        ds.join(&mut b_ds, 0, ds.start(prompt, &params).unwrap())
            .unwrap();
        hf.join(&mut b_hf, 0, hf.start(prompt, &params).unwrap())
            .unwrap();
        for (step, &tok) in golden_tokens.iter().take(8).enumerate() {
            let l_ds = ds.guided_logits(&mut b_ds).unwrap();
            let l_hf = hf.guided_logits(&mut b_hf).unwrap();
            assert_bits(&format!("{case} guided logits step {step}"), &l_hf, &l_ds);
            ds.advance(&mut b_ds, &[tok]).unwrap();
            hf.advance(&mut b_hf, &[tok]).unwrap();
        }
        // The whole greedy generation: tokens and pixels.
        let i_ds = ds.generate(prompt, &params, |_, _| {}).unwrap();
        let i_hf = hf.generate(prompt, &params, |_, _| {}).unwrap();
        assert_eq!(
            i_hf[0].tokens, i_ds[0].tokens,
            "{case}: greedy image tokens"
        );
        assert_eq!(
            i_hf[0].image.data, i_ds[0].image.data,
            "{case}: decoded pixels"
        );
        // The golden tokens decode to the same pixels too.
        let d_ds = ds.decode_raw(std::slice::from_ref(&golden_tokens)).unwrap();
        let d_hf = hf.decode_raw(std::slice::from_ref(&golden_tokens)).unwrap();
        assert_bits(&format!("{case} decoded golden tokens"), &d_hf, &d_ds);
    }
}

/// The VQ encoder (`encoder.down`, not used by generation) maps too: same codes, same decode.
#[test]
fn vq_encoder_from_hf_equals_deepseek() {
    let cfg = JanusConfig::from_dir(&hf_dir()).unwrap();
    let load = |dir: &Path| {
        let vb = layout::var_builder(dir, DType::F32, &Device::Cpu).unwrap();
        janus_vq::VqModel::load(vb.pp("gen_vision_model"), &cfg.vq, true, DType::F32).unwrap()
    };
    let (ds, hf) = (load(&ds_dir()), load(&hf_dir()));
    let g =
        candle_core::safetensors::load(fixture().join("golden.safetensors"), &Device::Cpu).unwrap();
    for (case, _) in cases("vq_roundtrip") {
        let u8s = g[&format!("{case}.preprocessed_u8")]
            .to_dtype(DType::F32)
            .unwrap();
        let pixels = ((u8s / 127.5).unwrap() - 1.0).unwrap();
        let c_ds = ds.encode(&pixels).unwrap();
        let c_hf = hf.encode(&pixels).unwrap();
        assert_eq!(c_hf, c_ds, "{case}: codes");
        assert_bits(
            &format!("{case} decode"),
            &hf.decode_codes(&c_hf, 1).unwrap(),
            &ds.decode_codes(&c_ds, 1).unwrap(),
        );
    }
}

/// A copy of `model-hf` in a fresh temporary directory.
fn copy_hf() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(hf_dir()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

/// Rewrites `model.safetensors` without `name`.
fn drop_tensor(dir: &Path, name: &str) {
    let path = dir.join("model.safetensors");
    let mut all: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    assert!(all.remove(name).is_some(), "{name} not in the fixture");
    candle_core::safetensors::save(&all, &path).unwrap();
}

#[test]
fn unknown_model_type_is_named() {
    let dir = copy_hf();
    edit_config(dir.path(), |v| v["model_type"] = "janus_flow".into());
    for err in [
        UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap_err(),
        GenerationModel::load(dir.path(), &LoadOptions::default()).unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(matches!(err, Error::Config { .. }), "{msg}");
        assert!(
            msg.contains("config.json") && msg.contains("model_type 'janus_flow'"),
            "{msg}"
        );
    }
    edit_config(dir.path(), |v| {
        v.as_object_mut().unwrap().remove("model_type");
    });
    let err = UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no model_type"), "{err}");
}

#[test]
fn missing_hf_tensors_are_named() {
    // One of the parts the vision tower's qkv is concatenated from.
    let k = "model.vision_model.encoder.layers.1.self_attn.k_proj.bias";
    let dir = copy_hf();
    drop_tensor(dir.path(), k);
    let err = UnderstandingModel::load(dir.path(), &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Weights(_)), "{msg}");
    assert!(
        msg.contains(k)
            && msg.contains("vision_model.vision_tower.blocks.1.attn.qkv.bias")
            && msg.contains("model.safetensors"),
        "{msg}"
    );
    // The untied head, as transformers 5 drops it when the config says tie_word_embeddings.
    let dir = copy_hf();
    drop_tensor(dir.path(), "lm_head.weight");
    let msg = UnderstandingModel::load(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("lm_head.weight")
            && msg.contains("untied")
            && msg.contains("model.safetensors"),
        "{msg}"
    );
    // Generation does not need the head, but does need the VQ decoder.
    assert!(GenerationModel::load(dir.path(), &LoadOptions::default()).is_ok());
    let up = "model.vqmodel.decoder.up.0.block.1.conv2.weight";
    let dir = copy_hf();
    drop_tensor(dir.path(), up);
    let msg = GenerationModel::load(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(up)
            && msg.contains("gen_vision_model.decoder.conv_blocks.0.res.1.conv2.weight"),
        "{msg}"
    );
}

#[test]
fn inconsistent_hf_configs_are_named() {
    let load_err = |f: &dyn Fn(&mut Value)| {
        let dir = copy_hf();
        edit_config(dir.path(), f);
        UnderstandingModel::load(dir.path(), &LoadOptions::default())
            .unwrap_err()
            .to_string()
    };
    let msg = load_err(&|v| v["image_token_id"] = 7.into());
    assert!(
        msg.contains("image_token_id 7") && msg.contains("1203"),
        "{msg}"
    );
    let msg = load_err(&|v| v["vision_config"]["hidden_act"] = "gelu_pytorch_tanh".into());
    assert!(msg.contains("vision_config.hidden_act"), "{msg}");
    let msg = load_err(&|v| {
        v["text_config"]["rope_parameters"] =
            serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4})
    });
    assert!(
        msg.contains("text_config.rope_parameters.rope_type"),
        "{msg}"
    );
    let msg = load_err(&|v| {
        v.as_object_mut().unwrap().remove("vq_config");
    });
    assert!(msg.contains("vq_config"), "{msg}");
    // A width the weights do not have: the shape error names the stored tensor, the file and
    // both shapes.
    let msg = load_err(&|v| v["vision_config"]["mlp_ratio"] = 2.0.into());
    assert!(
        msg.contains("model.vision_model.encoder.layers.0.mlp.fc1.weight")
            && msg.contains("model.safetensors")
            && msg.contains("[128, 64]")
            && msg.contains("[256, 64]"),
        "{msg}"
    );
}
