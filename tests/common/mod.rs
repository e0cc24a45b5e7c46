//! Shared harness of the gRPC tests: real servers on 127.0.0.1 ephemeral ports with the
//! vendored tiny checkpoint, clients, golden data and bounded waits.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use janus_engine::{GenerationConfig, UnderstandingConfig};
use janus_gateway::{GatewayOptions, GatewayTuning};
use janus_pipeline::LoadOptions;
use janus_proto::v1 as pb;
use janus_proto::v1::generation_client::GenerationClient;
use janus_proto::v1::understanding_client::UnderstandingClient;
use janus_service::{Lifecycle, ModelInfo, Running, ServerOptions};
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// Generous bound on anything a test waits for.
pub const WAIT: Duration = Duration::from_secs(60);

/// Awaits `f` or panics after `limit` (no test can hang).
pub async fn within<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {limit:?}"),
    }
}

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny")
}

pub fn model_dir() -> PathBuf {
    fixture().join("model")
}

/// How to configure a test stack.
#[derive(Clone)]
pub struct StackConfig {
    pub und: UnderstandingConfig,
    pub gen: GenerationConfig,
    pub load: LoadOptions,
    pub server: ServerOptions,
}

impl Default for StackConfig {
    fn default() -> Self {
        Self {
            und: UnderstandingConfig::default(),
            gen: GenerationConfig::default(),
            load: LoadOptions::default(),
            server: ServerOptions {
                grace_period: Duration::from_secs(2),
                ..Default::default()
            },
        }
    }
}

/// Both services and a gateway in front of them.
pub struct Stack {
    pub und: Running,
    pub gen: Running,
    pub gw: Running,
}

fn info(device: &str) -> ModelInfo {
    ModelInfo {
        model_id: "janus-tiny".into(),
        model_path: model_dir().display().to_string(),
        device: device.into(),
        dtype: "f32".into(),
        weight_dtype: "f32".into(),
    }
}

pub async fn bind() -> tokio::net::TcpListener {
    tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()
}

/// A standalone understanding server.
pub async fn start_understanding(cfg: &StackConfig) -> Running {
    let (load, c) = (cfg.load.clone(), cfg.und.clone());
    let engine =
        tokio::task::spawn_blocking(move || janus_understanding::load(&model_dir(), &load, c))
            .await
            .unwrap()
            .unwrap();
    janus_understanding::serve(
        engine,
        info("cpu"),
        cfg.server.clone(),
        bind().await,
        Lifecycle::new(),
    )
    .await
    .unwrap()
}

/// A standalone generation server.
pub async fn start_generation(cfg: &StackConfig) -> Running {
    let (load, c) = (cfg.load.clone(), cfg.gen.clone());
    let engine =
        tokio::task::spawn_blocking(move || janus_generation::load(&model_dir(), &load, c))
            .await
            .unwrap()
            .unwrap();
    janus_generation::serve(
        engine,
        info("cpu"),
        cfg.server.clone(),
        bind().await,
        Lifecycle::new(),
    )
    .await
    .unwrap()
}

/// A gateway over the given backend addresses.
pub async fn start_gateway(und: Vec<String>, gen: Vec<String>, server: ServerOptions) -> Running {
    janus_gateway::serve(
        GatewayOptions {
            understanding: und,
            generation: gen,
            tuning: GatewayTuning {
                health_interval: 0.2,
                connect_timeout: 1.0,
                ..Default::default()
            },
            server,
            backend_tls: None,
        },
        bind().await,
        Lifecycle::new(),
    )
    .await
    .unwrap()
}

/// Services + gateway, waiting until the gateway sees both services healthy.
pub async fn start_stack(cfg: StackConfig) -> Stack {
    let und = start_understanding(&cfg).await;
    let gen = start_generation(&cfg).await;
    let gw = start_gateway(vec![und.url()], vec![gen.url()], cfg.server.clone()).await;
    let ch = channel(&gw.url()).await;
    for svc in [
        janus_proto::UNDERSTANDING_SERVICE,
        janus_proto::GENERATION_SERVICE,
    ] {
        wait_for(
            Duration::from_secs(20),
            "gateway sees backends healthy",
            || {
                let ch = ch.clone();
                async move { health_status(ch, svc).await == Some(1) }
            },
        )
        .await;
    }
    Stack { und, gen, gw }
}

pub async fn channel(url: &str) -> Channel {
    within(
        Duration::from_secs(10),
        "connect",
        Endpoint::from_shared(url.to_string()).unwrap().connect(),
    )
    .await
    .unwrap()
}

pub async fn und_client(url: &str) -> UnderstandingClient<Channel> {
    UnderstandingClient::new(channel(url).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

pub async fn gen_client(url: &str) -> GenerationClient<Channel> {
    GenerationClient::new(channel(url).await)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// grpc.health.v1 status number of `service` (1 = SERVING), None on error.
pub async fn health_status(ch: Channel, service: &str) -> Option<i32> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        }),
    )
    .await
    .ok()?
    .ok()?;
    Some(r.get_ref().status)
}

/// Polls `cond` every 20 ms until true; panics after `limit`.
pub async fn wait_for<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > limit {
            panic!("{what}: not reached within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn png_bytes(path: &str) -> Vec<u8> {
    std::fs::read(fixture().join(path)).unwrap()
}

/// A small valid PNG of `w`×`h`.
pub fn small_png(w: u32, h: u32) -> Vec<u8> {
    let img =
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn user(content: &str, images: Vec<Vec<u8>>) -> pb::ChatMessage {
    pb::ChatMessage {
        role: "user".into(),
        content: content.into(),
        images: images
            .into_iter()
            .map(|d| pb::Image {
                data: d.into(),
                mime_type: "image/png".into(),
            })
            .collect(),
    }
}

pub fn greedy_sampling(n: u32) -> pb::SamplingParams {
    pb::SamplingParams {
        max_new_tokens: Some(n),
        min_new_tokens: Some(n),
        temperature: Some(0.0),
        ..Default::default()
    }
}

/// Everything an Understand stream produced.
#[derive(Debug, Default)]
pub struct Answer {
    pub ids: Vec<u32>,
    pub text: String,
    pub fin: Option<pb::UnderstandFinal>,
}

/// Reads an Understand stream to the end.
pub async fn collect_answer(
    client: &mut UnderstandingClient<Channel>,
    req: tonic::Request<pb::UnderstandRequest>,
) -> Result<Answer, tonic::Status> {
    within(WAIT, "understand", async {
        let mut s = client.understand(req).await?.into_inner();
        let mut a = Answer::default();
        while let Some(m) = s.message().await? {
            match m.event.unwrap() {
                pb::understand_response::Event::Token(t) => {
                    assert_eq!(
                        t.index as usize,
                        a.ids.len(),
                        "token indices are consecutive"
                    );
                    a.ids.push(t.token_id);
                    a.text.push_str(&t.text);
                }
                pb::understand_response::Event::Final(f) => {
                    assert!(a.fin.is_none(), "one final message");
                    a.fin = Some(f);
                }
            }
        }
        Ok(a)
    })
    .await
}

/// Everything a Generate stream produced.
#[derive(Debug, Default)]
pub struct Generated {
    pub steps: Vec<u32>,
    pub total: u32,
    pub previews: Vec<pb::Preview>,
    pub images: Vec<pb::GeneratedImage>,
    pub fin: Option<pb::GenerateFinal>,
}

/// Reads a Generate stream to the end.
pub async fn collect_images(
    client: &mut GenerationClient<Channel>,
    req: tonic::Request<pb::GenerateRequest>,
) -> Result<Generated, tonic::Status> {
    within(WAIT, "generate", async {
        let mut s = client.generate(req).await?.into_inner();
        let mut g = Generated::default();
        while let Some(m) = s.message().await? {
            match m.event.unwrap() {
                pb::generate_response::Event::Progress(p) => {
                    g.steps.push(p.step);
                    g.total = p.total_steps;
                }
                pb::generate_response::Event::Preview(p) => g.previews.push(p),
                pb::generate_response::Event::Image(i) => g.images.push(i),
                pb::generate_response::Event::Final(f) => g.fin = Some(f),
            }
        }
        Ok(g)
    })
    .await
}

/// Golden outputs of DeepSeek's reference (`golden.json` + `golden.safetensors`).
pub struct Golden {
    pub json: Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Golden {
    pub fn load() -> Self {
        let dir = fixture();
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let tensors =
            candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
        Self { json, tensors }
    }

    pub fn cases(&self, kind: &str) -> Vec<(String, Value)> {
        let v: Vec<(String, Value)> = self.json["cases"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, c)| c["kind"] == kind)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert!(!v.is_empty(), "no {kind} cases");
        v
    }

    pub fn u32s(&self, case: &str, name: &str) -> Vec<u32> {
        self.tensors[&format!("{case}.{name}")]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    }

    pub fn f32s(&self, case: &str, name: &str) -> Vec<f32> {
        self.tensors[&format!("{case}.{name}")]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// A golden conversation as protocol messages.
    pub fn messages(conv: &Value) -> Vec<pb::ChatMessage> {
        conv.as_array()
            .unwrap()
            .iter()
            .map(|m| pb::ChatMessage {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
                images: m["images"]
                    .as_array()
                    .map(|a| a.as_slice())
                    .unwrap_or(&[])
                    .iter()
                    .map(|f| pb::Image {
                        data: png_bytes(f.as_str().unwrap()).into(),
                        mime_type: "image/png".into(),
                    })
                    .collect(),
            })
            .collect()
    }
}
