//! Batching across requests gives the same outputs as running each request alone.

use janus_pipeline::gen_batch::GenBatch;
use janus_pipeline::generate::{GenerateParams, GenerationModel};
use janus_pipeline::LoadOptions;
use std::collections::HashMap;
use std::path::Path;

fn model() -> GenerationModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny/model");
    GenerationModel::load(&dir, &LoadOptions::default()).unwrap()
}

fn alone(m: &GenerationModel, prompt: &str, p: &GenerateParams) -> Vec<Vec<u32>> {
    let mut job = m.start(prompt, p).unwrap();
    while !job.is_done() {
        m.step(&mut job).unwrap();
    }
    job.tokens
}

/// Three greedy requests with different prompts, prompt lengths, image counts and guidance
/// weights join at different steps next to a sampled one that is cancelled midway. The greedy
/// requests' tokens equal their solo runs. (Sampled requests are not compared: batching changes
/// float summation order, which can move a sample drawn near a probability boundary.)
#[test]
fn generation_batch_equals_requests_alone() {
    let m = model();
    let reqs: Vec<(u64, &str, GenerateParams, usize)> = vec![
        (
            1,
            "A red apple on a wooden table, studio light.",
            GenerateParams {
                n: 1,
                temperature: 0.0,
                ..Default::default()
            },
            0,
        ),
        (
            2,
            "a cat",
            GenerateParams {
                n: 2,
                temperature: 0.0,
                ..Default::default()
            },
            5,
        ),
        (
            3,
            "a dog in the snow",
            GenerateParams {
                n: 1,
                cfg_weight: 3.0,
                temperature: 0.0,
                ..Default::default()
            },
            9,
        ),
        (
            4,
            "to be cancelled",
            GenerateParams {
                n: 3,
                temperature: 1.0,
                ..Default::default()
            },
            2,
        ),
    ];
    let mut batch = GenBatch::new();
    let mut done: HashMap<u64, Vec<Vec<u32>>> = HashMap::new();
    let mut step = 0;
    let mut max_rows = 0;
    while done.len() < 3 {
        for (id, prompt, p, at) in &reqs {
            if *at == step {
                m.join(&mut batch, *id, m.start(prompt, p).unwrap())
                    .unwrap();
            }
        }
        if step == 40 {
            assert!(batch.cancel(4));
        }
        max_rows = max_rows.max(batch.rows());
        m.step_batch(&mut batch).unwrap();
        for f in batch.take_finished() {
            done.insert(f.id, f.tokens);
        }
        step += 1;
        assert!(step < 2000, "batch never finished");
    }
    assert!(batch.is_empty());
    assert_eq!(
        max_rows,
        2 * (1 + 2 + 1 + 3),
        "all requests were stepped together"
    );
    assert!(!done.contains_key(&4));
    for (id, prompt, p, _) in &reqs[..3] {
        assert_eq!(done[id], alone(&m, prompt, p), "request {id}");
    }
}
