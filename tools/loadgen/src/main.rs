//! `janus-loadgen`: drives the gateway (or one service) with N concurrent clients and prints
//! throughput and latency percentiles as JSON, one entry per concurrency level.
//!
//! Understanding: time to first token, time per output token (inter-token gaps), tokens/s.
//! Generation: time to first progress event, time per step, seconds per image, images/minute.
//! Every request gets its own prompt (and seed), so batching cannot share identical work.
//! Errors are counted by gRPC status code (`errors_by_code`); `request_ms` has the latency of
//! whole requests.

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use janus_proto::v1 as pb;
use serde_json::json;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Mode {
    Understand,
    Generate,
}

/// Load generator for the Janus gRPC API.
#[derive(Parser, Debug, Clone)]
#[command(name = "janus-loadgen", version, about)]
struct Args {
    /// gRPC endpoint (the gateway, or a service directly).
    #[arg(long, default_value = "http://127.0.0.1:50051", env = "JANUS_SERVER")]
    server: String,
    /// Which RPC to load.
    #[arg(long, value_enum, default_value = "understand")]
    mode: Mode,
    /// Concurrency levels to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    concurrency: Vec<usize>,
    /// Requests per level (per level, spread over the clients; at least one per client).
    #[arg(long)]
    requests: Option<usize>,
    /// Understanding: tokens per answer (forced with min_new_tokens so every answer has the same length).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: u32,
    /// Understanding: an image file sent with every question (default: text-only questions).
    #[arg(long)]
    image: Option<std::path::PathBuf>,
    /// Generation: images per request.
    #[arg(short, long, default_value_t = 1)]
    n: u32,
    /// Generation: `png` measures whole images (VQ decode and encoding included); `tokens`
    /// stops at the 576 image tokens.
    #[arg(long, default_value = "png")]
    format: String,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
    /// Run each level for this many seconds instead of a request count: every client sends
    /// requests back to back until the time is up (requests running then finish, bounded by
    /// --timeout-s).
    #[arg(long)]
    duration_s: Option<f64>,
}

/// One finished request's measurements.
#[derive(Debug, Default, Clone)]
struct Sample {
    first_ms: f64,
    gaps_ms: Vec<f64>,
    total_ms: f64,
    units: usize,
}

fn percentiles(mut v: Vec<f64>) -> serde_json::Value {
    if v.is_empty() {
        return json!(null);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| {
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        (v[i] * 100.0).round() / 100.0
    };
    json!({"p50": p(0.5), "p90": p(0.9), "p99": p(0.99), "max": p(1.0), "mean": (v.iter().sum::<f64>() / v.len() as f64 * 100.0).round() / 100.0, "count": v.len()})
}

async fn understand_once(
    ch: Channel,
    args: &Args,
    i: usize,
    image: Option<Vec<u8>>,
) -> Result<Sample> {
    let mut client = pb::understanding_client::UnderstandingClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let topics = [
        "the sea",
        "a mountain",
        "a city at night",
        "a forest",
        "the desert",
        "a river",
        "snow",
        "the sun",
    ];
    let mut content = format!(
        "Write a short poem about {} (variant {i}).",
        topics[i % topics.len()]
    );
    let mut images = Vec::new();
    if let Some(data) = image {
        content = format!("<image_placeholder>\nDescribe this picture, request {i}.");
        images.push(pb::Image {
            data: data.into(),
            mime_type: String::new(),
        });
    }
    let req = pb::UnderstandRequest {
        messages: vec![pb::ChatMessage {
            role: "user".into(),
            content,
            images,
        }],
        sampling: Some(pb::SamplingParams {
            max_new_tokens: Some(args.max_new_tokens),
            min_new_tokens: Some(args.max_new_tokens),
            temperature: Some(0.0),
            seed: Some(i as u64),
            ..Default::default()
        }),
        request_id: format!("loadgen-u-{i}"),
    };
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs(args.timeout_s));
    let t0 = Instant::now();
    let mut stream = client.understand(request).await?.into_inner();
    let mut s = Sample::default();
    let mut last = t0;
    while let Some(msg) = stream.message().await? {
        if let Some(pb::understand_response::Event::Token(_)) = msg.event {
            let now = Instant::now();
            if s.units == 0 {
                s.first_ms = (now - t0).as_secs_f64() * 1e3;
            } else {
                s.gaps_ms.push((now - last).as_secs_f64() * 1e3);
            }
            last = now;
            s.units += 1;
        }
    }
    s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(s)
}

async fn generate_once(ch: Channel, args: &Args, i: usize) -> Result<Sample> {
    let mut client =
        pb::generation_client::GenerationClient::new(ch).max_decoding_message_size(64 << 20);
    let subjects = [
        "a red apple",
        "a cat",
        "a lighthouse",
        "a bowl of ramen",
        "a mountain lake",
        "a robot",
        "a sunflower",
        "a sailing ship",
    ];
    let req = pb::GenerateRequest {
        prompt: format!(
            "{} on a wooden table, studio light, variant {i}",
            subjects[i % subjects.len()]
        ),
        n: Some(args.n),
        seed: Some(1000 + i as u64),
        output_format: if args.format == "tokens" {
            pb::OutputFormat::TokensOnly
        } else {
            pb::OutputFormat::Png
        } as i32,
        request_id: format!("loadgen-g-{i}"),
        ..Default::default()
    };
    let mut request = tonic::Request::new(req);
    request.set_timeout(Duration::from_secs(args.timeout_s));
    let t0 = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let mut s = Sample::default();
    let mut last = t0;
    let mut steps = 0;
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Progress(_)) => {
                let now = Instant::now();
                if steps == 0 {
                    s.first_ms = (now - t0).as_secs_f64() * 1e3;
                } else {
                    s.gaps_ms.push((now - last).as_secs_f64() * 1e3);
                }
                last = now;
                steps += 1;
            }
            Some(pb::generate_response::Event::Image(_)) => s.units += 1,
            _ => {}
        }
    }
    s.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    if s.units == 0 {
        bail!("request {i} returned no image");
    }
    Ok(s)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let ch = Endpoint::from_shared(args.server.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", args.server))?;
    let image = match &args.image {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?),
        None => None,
    };
    let mut levels = Vec::new();
    let mut next_id = 0usize;
    for &c in &args.concurrency {
        let c = c.max(1);
        let total = args.requests.unwrap_or(c).max(c);
        let ids: Vec<usize> = (next_id..next_id + total).collect();
        next_id += total;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        // With --duration-s, ids past this level's are drawn from a shared counter.
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(next_id + 1_000_000));
        for w in 0..c {
            let mine: Vec<usize> = ids.iter().copied().skip(w).step_by(c).collect();
            let (ch, args2, image) = (ch.clone(), args.clone(), image.clone());
            let counter = counter.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                let one = |i: usize| {
                    let (ch, args2, image) = (ch.clone(), args2.clone(), image.clone());
                    async move {
                        match args2.mode {
                            Mode::Understand => understand_once(ch, &args2, i, image).await,
                            Mode::Generate => generate_once(ch, &args2, i).await,
                        }
                    }
                };
                match args2.duration_s {
                    Some(d) => {
                        while t0.elapsed().as_secs_f64() < d {
                            let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            out.push(one(i).await);
                        }
                    }
                    None => {
                        for i in mine {
                            out.push(one(i).await);
                        }
                    }
                }
                out
            }));
        }
        let mut samples = Vec::new();
        let mut errors = Vec::new();
        let mut by_code = std::collections::BTreeMap::<String, usize>::new();
        for t in tasks {
            for r in t.await? {
                match r {
                    Ok(s) => samples.push(s),
                    Err(e) => {
                        let code = match e.downcast_ref::<tonic::Status>() {
                            Some(s) => format!("{:?}", s.code()),
                            None => "client".to_string(),
                        };
                        *by_code.entry(code).or_default() += 1;
                        errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        let wall = t0.elapsed().as_secs_f64();
        let units: usize = samples.iter().map(|s| s.units).sum();
        let first: Vec<f64> = samples.iter().map(|s| s.first_ms).collect();
        let gaps: Vec<f64> = samples
            .iter()
            .flat_map(|s| s.gaps_ms.iter().copied())
            .collect();
        let mut level = json!({
            "concurrency": c,
            "requests": samples.len(),
            "errors": errors.len(),
            "errors_by_code": by_code,
            "wall_s": (wall * 1000.0).round() / 1000.0,
            "request_ms": percentiles(samples.iter().map(|s| s.total_ms).collect()),
        });
        match args.mode {
            Mode::Understand => {
                level["tokens"] = json!(units);
                level["tokens_per_s"] = json!((units as f64 / wall * 100.0).round() / 100.0);
                level["ttft_ms"] = percentiles(first);
                level["per_token_ms"] = percentiles(gaps);
            }
            Mode::Generate => {
                let per_image: Vec<f64> = samples
                    .iter()
                    .map(|s| s.total_ms / 1e3 / s.units.max(1) as f64)
                    .collect();
                level["images"] = json!(units);
                level["images_per_min"] =
                    json!((units as f64 / wall * 60.0 * 100.0).round() / 100.0);
                level["first_progress_ms"] = percentiles(first);
                level["per_step_ms"] = percentiles(gaps);
                level["request_s_per_image"] = percentiles(per_image);
            }
        }
        if let Some(e) = errors.first() {
            level["first_error"] = json!(e);
        }
        eprintln!("{level}");
        levels.push(level);
    }
    let mode = match args.mode {
        Mode::Understand => "understand",
        Mode::Generate => "generate",
    };
    let mut summary = json!({"server": args.server, "mode": mode, "levels": levels});
    if matches!(args.mode, Mode::Generate) {
        summary["format"] = json!(args.format);
    }
    // Throughput of each level relative to the first (usually concurrency 1).
    let key = match args.mode {
        Mode::Understand => "tokens_per_s",
        Mode::Generate => "images_per_min",
    };
    if let Some(base) = summary["levels"][0][key].as_f64().filter(|b| *b > 0.0) {
        let ratios: Vec<serde_json::Value> = summary["levels"]
            .as_array()
            .map(|ls| ls.iter().map(|l| json!({"concurrency": l["concurrency"], "speedup": (l[key].as_f64().unwrap_or(0.0) / base * 100.0).round() / 100.0})).collect())
            .unwrap_or_default();
        summary["speedup_vs_first_level"] = json!(ratios);
    }
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
