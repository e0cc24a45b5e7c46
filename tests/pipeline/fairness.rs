//! Bounded, fair engines: no request stalls the others. Each test runs real engines on the tiny
//! fixture and checks the *order* in which events reach their clients (never wall-clock
//! thresholds): a short request completes while a long prompt is still being prefilled, running
//! rows keep producing tokens while another request's images are encoded, generation steps
//! continue while another request's pixels (previews, final images) are made, and a request
//! cancelled while its images are decoded stops there.

use janus_engine::{
    GenerateEvent, GenerateInput, GenerationConfig, GenerationEngine, InputImage, InputMessage,
    OutputFormat, RequestMeta, SamplingInput, UnderstandEvent, UnderstandInput,
    UnderstandingConfig, UnderstandingEngine,
};
use janus_pipeline::generation::GenerationModel;
use janus_pipeline::{LoadOptions, UnderstandingModel};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny")
}

fn und_engine(cfg: UnderstandingConfig) -> UnderstandingEngine {
    let m = UnderstandingModel::load(&fixture().join("model"), &LoadOptions::default()).unwrap();
    UnderstandingEngine::start(m, cfg)
}

fn gen_engine(cfg: GenerationConfig) -> GenerationEngine {
    let m = GenerationModel::load(&fixture().join("model"), &LoadOptions::default()).unwrap();
    GenerationEngine::start(m, cfg)
}

/// Events of all requests of a test, in the order their clients received them.
type Log = Arc<Mutex<Vec<(&'static str, String)>>>;

fn kind_u(e: &UnderstandEvent) -> String {
    match e {
        UnderstandEvent::Token { .. } => "token".into(),
        UnderstandEvent::Finished { .. } => "finished".into(),
    }
}

fn kind_g(e: &GenerateEvent) -> String {
    match e {
        GenerateEvent::Progress { .. } => "progress".into(),
        GenerateEvent::Preview { .. } => "preview".into(),
        GenerateEvent::Image { .. } => "image".into(),
        GenerateEvent::Finished { .. } => "finished".into(),
    }
}

/// Forwards a request's events into the shared log as they arrive.
fn record<E: Send + 'static>(
    log: &Log,
    name: &'static str,
    mut rx: mpsc::Receiver<janus_engine::Result<E>>,
    kind: fn(&E) -> String,
) -> tokio::task::JoinHandle<usize> {
    let log = log.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Some(ev) = rx.recv().await {
            let k = match &ev {
                Ok(e) => kind(e),
                Err(e) => format!("error: {e}"),
            };
            log.lock().unwrap().push((name, k));
            n += 1;
        }
        n
    })
}

fn ask(engine: &UnderstandingEngine, text: &str, images: &[&str], max_new: u32) -> UnderstandInput {
    let _ = engine;
    UnderstandInput {
        messages: vec![InputMessage {
            role: "user".into(),
            content: text.into(),
            images: images
                .iter()
                .map(|f| InputImage {
                    data: std::fs::read(fixture().join(f)).unwrap().into(),
                    mime_type: String::new(),
                })
                .collect(),
        }],
        sampling: SamplingInput {
            max_new_tokens: Some(max_new),
            min_new_tokens: Some(max_new),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn submit_u(
    engine: &UnderstandingEngine,
    input: UnderstandInput,
) -> mpsc::Receiver<janus_engine::Result<UnderstandEvent>> {
    let ticket = engine.prepare(input).unwrap();
    engine.submit(ticket, RequestMeta::new("t", None)).unwrap()
}

fn position(log: &[(&str, String)], name: &str, kind: &str) -> Option<usize> {
    log.iter().position(|(n, k)| *n == name && k == kind)
}

fn last_position(log: &[(&str, String)], name: &str, kind: &str) -> Option<usize> {
    log.iter().rposition(|(n, k)| *n == name && k == kind)
}

fn count_between(log: &[(&str, String)], name: &str, kind: &str, from: usize, to: usize) -> usize {
    log[from..to]
        .iter()
        .filter(|(n, k)| *n == name && k == kind)
        .count()
}

/// The longest prompt the context allows, prefilled in chunks of the step budget: a short
/// request sent right after it streams all its tokens and finishes before the long prompt's
/// first token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_request_completes_while_a_long_prompt_prefills() {
    let engine = und_engine(UnderstandingConfig {
        step_tokens: 128,
        max_new_tokens_limit: 64,
        ..Default::default()
    });
    let context = engine.model().context();
    // The most words whose prompt still fits the context window with 4 new tokens.
    let fits = |words: usize| {
        engine
            .prepare(ask(&engine, &"sea ".repeat(words), &[], 4))
            .is_ok()
    };
    let (mut lo, mut hi) = (1, context);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let long_text = "sea ".repeat(lo);
    let long = engine.prepare(ask(&engine, &long_text, &[], 4)).unwrap();
    assert!(
        long.prompt_tokens() > context - 80,
        "{}",
        long.prompt_tokens()
    );
    let log: Log = Default::default();
    let long_rx = engine.submit(long, RequestMeta::new("long", None)).unwrap();
    let a = record(&log, "long", long_rx, kind_u);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = record(
        &log,
        "short",
        submit_u(&engine, ask(&engine, "Hi", &[], 4)),
        kind_u,
    );
    let (na, nb) = (a.await.unwrap(), b.await.unwrap());
    assert_eq!((na, nb), (5, 5), "4 tokens and a final event each");
    let log = log.lock().unwrap();
    let short_done = position(&log, "short", "finished").unwrap();
    let long_first = position(&log, "long", "token").unwrap();
    assert!(
        short_done < long_first,
        "the short request finished before the long prompt's first token: {log:?}"
    );
}

/// A burst of image questions: first tokens arrive one after another, and the earliest request
/// keeps streaming tokens while the later ones' images are encoded and prompts prefilled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_rows_stream_while_a_burst_of_images_is_encoded() {
    let engine = und_engine(UnderstandingConfig {
        step_tokens: 256,
        ..Default::default()
    });
    let log: Log = Default::default();
    let names = ["q0", "q1", "q2", "q3"];
    let mut tasks = Vec::new();
    for name in names {
        let rx = submit_u(
            &engine,
            ask(
                &engine,
                "<image_placeholder>\nWhat is shown?",
                &["wide.png"],
                24,
            ),
        );
        tasks.push(record(&log, name, rx, kind_u));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 25);
    }
    let log = log.lock().unwrap();
    let firsts: Vec<usize> = names
        .iter()
        .map(|n| position(&log, n, "token").unwrap())
        .collect();
    assert!(
        firsts.windows(2).all(|w| w[0] < w[1]),
        "first tokens in arrival order: {firsts:?}"
    );
    // While q3's image and prompt went through the model, q0 kept producing tokens.
    let streamed = count_between(&log, "q0", "token", firsts[0], firsts[3]);
    assert!(
        streamed >= 4,
        "q0 produced {streamed} tokens before q3's first token: {log:?}"
    );
}

fn gen_input(prompt: &str, n: u32, format: OutputFormat, preview: u32) -> GenerateInput {
    GenerateInput {
        prompt: prompt.into(),
        n: Some(n),
        temperature: Some(0.0),
        seed: Some(1),
        format,
        preview_interval: preview,
        ..Default::default()
    }
}

fn submit_g(
    engine: &GenerationEngine,
    input: GenerateInput,
) -> mpsc::Receiver<janus_engine::Result<GenerateEvent>> {
    let ticket = engine.prepare(input).unwrap();
    engine.submit(ticket, RequestMeta::new("t", None)).unwrap()
}

/// Final images are decoded off the model thread: while request A's four images go through the
/// VQ decoder, request B keeps stepping (its progress events arrive between A's last step and
/// A's first image). Previews of A (every row) interleave with B's steps too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_steps_continue_while_pixels_are_made() {
    let engine = gen_engine(GenerationConfig::default());
    let log: Log = Default::default();
    let a = record(
        &log,
        "a",
        submit_g(&engine, gen_input("a red apple", 4, OutputFormat::Png, 1)),
        kind_g,
    );
    // B starts when A is a third of the way through, so it is still stepping when A finishes.
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let n = log
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, k)| *n == "a" && k == "progress")
            .count();
        if n >= engine.model().image_tokens() / 3 {
            break;
        }
    }
    let b = record(
        &log,
        "b",
        submit_g(
            &engine,
            gen_input("a blue car", 1, OutputFormat::TokensOnly, 0),
        ),
        kind_g,
    );
    a.await.unwrap();
    b.await.unwrap();
    let log = log.lock().unwrap();
    let a_last_step = last_position(&log, "a", "progress").unwrap();
    let a_first_image = position(&log, "a", "image").unwrap();
    let during_decode = count_between(&log, "b", "progress", a_last_step, a_first_image);
    assert!(
        during_decode >= 5,
        "B stepped {during_decode} times while A's images were decoded"
    );
    let b_first = position(&log, "b", "progress").unwrap();
    let previews_after_b = log[b_first..]
        .iter()
        .filter(|(n, k)| *n == "a" && k == "preview")
        .count();
    assert!(previews_after_b > 0, "A's previews continued beside B");
    let side = (engine.model().image_tokens() as f64).sqrt() as usize;
    let previews = log
        .iter()
        .filter(|(n, k)| *n == "a" && k == "preview")
        .count();
    assert!(previews > 0 && previews <= 4 * side, "{previews} previews");
}

/// The decode worker decodes a final image beside the model's steps on its own one-thread pool,
/// and one whose decode starts while the model thread is idle on the model's whole pool: the
/// pixels do not depend on which. A and B ask for the same greedy image; A finishes while B is
/// still stepping (beside), B finishes last (the engine idle), and their PNGs are equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_images_are_the_same_beside_the_steps_and_on_the_idle_pool() {
    let engine = gen_engine(GenerationConfig::default());
    let input = || gen_input("a red apple", 1, OutputFormat::Png, 0);
    async fn image(mut rx: mpsc::Receiver<janus_engine::Result<GenerateEvent>>) -> Vec<u8> {
        let mut png = Vec::new();
        while let Some(ev) = rx.recv().await {
            if let GenerateEvent::Image { data, .. } = ev.unwrap() {
                png = data;
            }
        }
        png
    }
    let mut a_rx = submit_g(&engine, input());
    // B starts when A is a third of the way through, so it is still stepping when A finishes.
    let mut a_steps = 0;
    while a_steps < engine.model().image_tokens() / 3 {
        if let GenerateEvent::Progress { .. } = a_rx.recv().await.unwrap().unwrap() {
            a_steps += 1;
        }
    }
    let b = tokio::spawn(image(submit_g(&engine, input())));
    let a = image(a_rx).await;
    let b = b.await.unwrap();
    assert!(!a.is_empty());
    assert!(
        a == b,
        "the image decoded on the idle pool differs from the one beside the steps"
    );
    assert_eq!(engine.stats().completed, 2);
}

/// A client that goes away while its images are being decoded: the decode stops (the request is
/// counted cancelled, not completed) and the worker is free for the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_during_the_decode_stops_it() {
    let engine = gen_engine(GenerationConfig::default());
    let mut rx = submit_g(&engine, gen_input("a cat", 16, OutputFormat::Png, 0));
    let total = engine.model().image_tokens() as u32;
    while let Some(ev) = rx.recv().await {
        if let Ok(GenerateEvent::Progress { step, .. }) = ev {
            if step == total {
                break;
            }
        }
    }
    // The last token is in: the 16 images are now in the decoder. Leave.
    drop(rx);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while engine.stats().cancelled == 0 && engine.stats().completed == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no outcome");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = engine.stats();
    assert_eq!((s.cancelled, s.completed), (1, 0), "{s:?}");
    assert_eq!(s.active, 0);
    // The worker is free: the next request gets its image.
    let mut rx = submit_g(&engine, gen_input("a dog", 1, OutputFormat::Png, 0));
    let mut images = 0;
    while let Some(ev) = rx.recv().await {
        if let GenerateEvent::Image { data, .. } = ev.unwrap() {
            assert!(!data.is_empty());
            images += 1;
        }
    }
    assert_eq!(images, 1);
}
