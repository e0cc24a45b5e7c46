//! Batching across requests gives the same outputs as running each request alone.

use janus_pipeline::generation::{GenerateParams, GenerationModel};
use janus_pipeline::GenBatch;
use janus_pipeline::LoadOptions;
use std::collections::HashMap;
use std::path::Path;

fn model() -> GenerationModel {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny/model");
    GenerationModel::load(&dir, &LoadOptions::default()).unwrap()
}

/// A request alone: a batch of one.
fn alone(m: &GenerationModel, prompt: &str, p: &GenerateParams) -> Vec<Vec<u32>> {
    let mut batch = GenBatch::new();
    m.join(&mut batch, 0, m.start(prompt, p).unwrap()).unwrap();
    while batch.rows() > 0 {
        m.step_batch(&mut batch).unwrap();
    }
    let mut finished = batch.take_finished();
    assert_eq!(finished.len(), 1);
    finished.pop().unwrap().tokens
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

/// Continuous batching for understanding: a request that joins a running batch mid-decode, and
/// one that leaves early (cancelled), leave the others' greedy tokens unchanged.
#[test]
fn understanding_rows_join_and_leave_mid_batch() {
    use janus_pipeline::understand::{Conversation, TokenEvent, UnderstandingModel};
    use janus_pipeline::{Message, Role, SamplingParams};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny");
    let m = UnderstandingModel::load(&dir.join("model"), &LoadOptions::default()).unwrap();
    let img = |f: &str| {
        janus_pipeline::decode_rgb(&std::fs::read(dir.join(f)).unwrap(), &Default::default())
            .unwrap()
    };
    let conv = |text: &str, images| Conversation {
        messages: vec![Message {
            role: Role::User,
            content: text.into(),
        }],
        images,
    };
    let greedy = |n| SamplingParams {
        max_new_tokens: n,
        min_new_tokens: n,
        ..Default::default()
    };
    let convs = [
        (
            conv(
                "<image_placeholder>\nWhat is shown in this picture?",
                vec![img("wide.png")],
            ),
            greedy(20),
        ),
        (conv("Write a haiku about the sea.", vec![]), greedy(12)),
        (
            conv(
                "Compare <image_placeholder> and <image_placeholder>.",
                vec![img("tall.png"), img("square.png")],
            ),
            greedy(16),
        ),
        (conv("This one is cancelled.", vec![]), greedy(30)),
    ];
    let alone: Vec<Vec<u32>> = convs
        .iter()
        .map(|(c, p)| {
            let mut toks = Vec::new();
            m.understand(c, p.clone(), |e| {
                if let TokenEvent::Token { id, .. } = e {
                    toks.push(*id)
                }
            })
            .unwrap();
            toks
        })
        .collect();
    // Request 0 and 3 start together; 1 joins after 3 steps, 2 after 7; 3 is cancelled at step 5.
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut owner: HashMap<usize, usize> = HashMap::new();
    let record =
        |events: Vec<TokenEvent>, owner: &HashMap<usize, usize>, got: &mut Vec<Vec<u32>>| {
            for e in events {
                if let TokenEvent::Token { row, id, .. } = e {
                    got[owner[&row]].push(id);
                }
            }
        };
    let prep = |i: usize| m.prepare(&convs[i].0, convs[i].1.clone()).unwrap();
    let (mut batch, ev) = m.start(vec![prep(0), prep(3)]).unwrap();
    owner.insert(0, 0);
    owner.insert(1, 3);
    record(ev, &owner, &mut got);
    let mut max_rows = 0;
    for step in 1..40 {
        for (at, req) in [(3, 1), (7, 2)] {
            if step == at {
                let (other, ev) = m.start(vec![prep(req)]).unwrap();
                let mut tmp = HashMap::new();
                tmp.insert(0, req);
                record(ev, &tmp, &mut got);
                let ids = batch.merge(other).unwrap();
                owner.insert(ids[0].unwrap(), req);
            }
        }
        if step == 5 {
            let row = *owner.iter().find(|(_, &r)| r == 3).unwrap().0;
            batch.cancel(row);
        }
        max_rows = max_rows.max(batch.rows());
        record(m.step(&mut batch).unwrap(), &owner, &mut got);
        if batch.is_done() {
            break;
        }
    }
    assert!(max_rows >= 3, "requests overlapped in one batch");
    for i in 0..3 {
        assert_eq!(got[i], alone[i], "request {i}");
    }
    assert!(
        got[3].len() < alone[3].len() && got[3] == alone[3][..got[3].len()],
        "cancelled row stopped early"
    );
}

/// With the prefix cache on, requests whose prompts have the same length share the
/// unconditional prefill, a prompt generated again reuses its conditional one, scopes share
/// nothing, and the outputs equal those without the cache.
#[test]
fn prompt_prefills_are_reused() {
    let off = model();
    let mut on = model();
    on.set_cache_limits(1 << 30);
    let p = GenerateParams {
        n: 1,
        temperature: 0.0,
        ..Default::default()
    };
    let first = alone(&on, "a cat", &p);
    assert_eq!(first, alone(&off, "a cat", &p));
    let s = on.cache_stats();
    assert_eq!((s.hits, s.misses, s.entries), (0, 2, 2), "{s:?}");
    // "a dog" tokenizes to as many tokens as "a cat" in this vocabulary: same unconditional
    // row, taken from the cache (all but its last position), and the start of the prompt.
    let (c1, u1) = on.tokenizer().encode_generation("a cat").unwrap();
    let (c2, _) = on.tokenizer().encode_generation("a dog").unwrap();
    assert_eq!(c1.len(), c2.len());
    assert_eq!(alone(&on, "a dog", &p), alone(&off, "a dog", &p));
    let s = on.cache_stats();
    assert_eq!(s.hits, 2, "both rows: {s:?}");
    // The same prompt again: both rows whole, with their last hidden states (nothing
    // recomputed, so the outputs are bit-equal).
    let before = on.cache_stats().hit_tokens;
    assert_eq!(
        alone(&on, "a cat", &p),
        first,
        "a reused prefill gives the same tokens"
    );
    assert_eq!(
        on.cache_stats().hit_tokens - before,
        (c1.len() + u1.len()) as u64
    );
    // Another scope reuses only the shared unconditional row.
    let mut prepared = on.prepare("a cat", &p).unwrap();
    prepared.scope = janus_pipeline::Scope::Key([7; 32]);
    let before = on.cache_stats().hit_tokens;
    let _ = on.begin(prepared).unwrap();
    assert_eq!(on.cache_stats().hit_tokens - before, u1.len() as u64);
}

/// Chunked prefill (a long prompt prefilled in pieces between other requests' decode steps)
/// produces the same tokens as a one-shot prefill.
#[test]
fn chunked_prefill_equals_one_shot() {
    use janus_pipeline::understand::{Conversation, TokenEvent, UnderstandingModel};
    use janus_pipeline::{Message, Role, SamplingParams};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny");
    let m = UnderstandingModel::load(&dir.join("model"), &LoadOptions::default()).unwrap();
    let img = janus_pipeline::decode_rgb(
        &std::fs::read(dir.join("wide.png")).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let conv = Conversation {
        messages: vec![Message {
            role: Role::User,
            content: "<image_placeholder>\nWhat is shown in this picture?".into(),
        }],
        images: vec![img],
    };
    let p = SamplingParams {
        max_new_tokens: 12,
        min_new_tokens: 12,
        ..Default::default()
    };
    let tokens = |batch: &mut janus_pipeline::UnderstandBatch, mut events: Vec<TokenEvent>| {
        let mut out = Vec::new();
        loop {
            for e in &events {
                if let TokenEvent::Token { id, .. } = e {
                    out.push(*id);
                }
            }
            if batch.is_done() {
                return out;
            }
            events = m.step(batch).unwrap();
        }
    };
    let (mut b, ev) = m.start(vec![m.prepare(&conv, p.clone()).unwrap()]).unwrap();
    let one_shot = tokens(&mut b, ev);
    // The scheduler's path: at most 100 budget units per call, the image's tower blocks first.
    let mut pre = m.begin(m.prepare(&conv, p.clone()).unwrap()).unwrap();
    let (mut calls, mut vision_calls, mut last) = (0, 0, 0);
    let (mut b, ev) = loop {
        calls += 1;
        if pre.in_vision() {
            vision_calls += 1;
        }
        if let Some(done) = m.prefill(&mut pre, 100).unwrap() {
            break done;
        }
        let (done, total) = pre.progress();
        assert!(done >= last && done < total);
        last = done;
    };
    assert!(vision_calls >= 1, "the tower ran in the budgeted calls");
    assert!(
        calls - vision_calls >= 7,
        "681 prompt positions need at least 7 chunks of 100"
    );
    assert_eq!(tokens(&mut b, ev), one_shot);
    // And the logits of the last prompt position.
    let whole = m
        .prompt_logits(m.prepare(&conv, p.clone()).unwrap(), usize::MAX)
        .unwrap();
    let chunked = m.prompt_logits(m.prepare(&conv, p).unwrap(), 100).unwrap();
    let d = (whole - chunked)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "chunked logits differ by {d}");
}

/// A seeded, sampled request gives the same tokens whether its prompt rows came from the prefix
/// cache or not: a prompt generated again takes its rows whole, with their last hidden states,
/// so nothing is recomputed. (Recomputing the last position alone rounds differently from the
/// whole prompt's forward: here a draw 35 tokens in changes.)
#[test]
fn sampled_requests_reproduce_across_cache_state() {
    let mut m = model();
    m.set_cache_limits(1 << 30);
    let p = GenerateParams {
        n: 2,
        temperature: 1.0,
        seed: 100,
        ..Default::default()
    };
    let miss = alone(&m, "a cat on a mat", &p);
    let hit = alone(&m, "a cat on a mat", &p);
    assert_eq!(m.cache_stats().hits, 2, "both prompt rows");
    assert_eq!(miss, hit);
    let other = alone(&m, "a cat on a mat", &GenerateParams { seed: 101, ..p });
    assert_ne!(other, hit, "another seed gives other tokens");
}
