//! Command-line flags (with environment variables) shared by the server binaries and `janus`.

use crate::server::ServerOptions;
use anyhow::Context;
use janus_pipeline::LoadOptions;
use std::time::Duration;

/// Default `--model`.
pub const DEFAULT_MODEL: &str = "deepseek-ai/Janus-Pro-1B";

/// Which checkpoint to load and where it runs.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelFlags {
    /// Checkpoint directory or Hugging Face hub id (hub cache: HF_HOME / HF_HUB_CACHE; token: HF_TOKEN; HF_HUB_OFFLINE=1 never downloads).
    #[arg(long, env = "JANUS_MODEL", default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Device: cpu or cuda:N (needs a build with `--features cuda`).
    #[arg(long, env = "JANUS_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute dtype: f32 or bf16.
    #[arg(long, env = "JANUS_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Weight storage dtype (default: the compute dtype).
    #[arg(long, env = "JANUS_WEIGHT_DTYPE")]
    pub weight_dtype: Option<String>,
    /// Context window in tokens (default: the checkpoint's).
    #[arg(long, env = "JANUS_MAX_CONTEXT")]
    pub max_context: Option<usize>,
}

impl ModelFlags {
    /// Load options for `device` (defaults to `--device`).
    pub fn load_options(&self, device: Option<&str>) -> anyhow::Result<LoadOptions> {
        Ok(LoadOptions {
            device: janus_pipeline::parse_device(device.unwrap_or(&self.device))?,
            dtype: janus_pipeline::parse_dtype(&self.dtype)?,
            weight_dtype: self
                .weight_dtype
                .as_deref()
                .map(janus_pipeline::parse_dtype)
                .transpose()?,
            max_context: self.max_context,
        })
    }

    /// Info about the model as it will be reported, for `device` (defaults to `--device`).
    pub fn info(&self, path: &std::path::Path, device: Option<&str>) -> crate::ModelInfo {
        crate::ModelInfo {
            model_id: self.model.clone(),
            model_path: path.display().to_string(),
            device: device.unwrap_or(&self.device).to_string(),
            dtype: self.dtype.clone(),
            weight_dtype: self
                .weight_dtype
                .clone()
                .unwrap_or_else(|| self.dtype.clone()),
        }
    }

    /// Resolves `--model` to a directory (may download).
    pub fn resolve(&self) -> anyhow::Result<crate::model_source::ResolvedModel> {
        crate::model_source::resolve(&self.model).context("resolving --model")
    }
}

/// Transport settings.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerFlags {
    /// Largest gRPC message received or sent, in bytes.
    #[arg(long, env = "JANUS_MAX_MESSAGE_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Seconds in-flight streams may continue after SIGTERM/ctrl-c before they are cancelled.
    #[arg(long, env = "JANUS_GRACE_PERIOD", default_value_t = 30.0)]
    pub grace_period: f64,
    /// Address of the Prometheus `GET /metrics` endpoint, e.g. 0.0.0.0:9464 (off when not given).
    #[arg(long, env = "JANUS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
}

impl ServerFlags {
    /// As options, with a fresh metrics registry labelled `service` (`janus_build_info{service}`).
    pub fn options(&self, service: &str) -> ServerOptions {
        ServerOptions {
            max_message_bytes: self.max_message_bytes,
            grace_period: Duration::from_secs_f64(self.grace_period.max(0.0)),
            metrics: janus_telemetry::Metrics::new(service, janus_telemetry::build_info!()),
        }
    }

    /// Starts the `/metrics` endpoint serving `metrics` when `--metrics-listen` is given;
    /// returns the bound address.
    pub async fn serve_metrics(
        &self,
        metrics: &janus_telemetry::Metrics,
    ) -> anyhow::Result<Option<std::net::SocketAddr>> {
        let Some(addr) = &self.metrics_listen else {
            return Ok(None);
        };
        let parsed: std::net::SocketAddr = addr.parse().with_context(|| {
            format!("--metrics-listen {addr}: expected host:port, e.g. 0.0.0.0:9464")
        })?;
        let (bound, _task) = metrics
            .serve(parsed)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        Ok(Some(bound))
    }
}

/// Understanding engine settings.
#[derive(clap::Args, Debug, Clone)]
pub struct UnderstandingFlags {
    /// Understanding requests that may wait before RESOURCE_EXHAUSTED.
    #[arg(long, env = "JANUS_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Understanding requests decoded together at most.
    #[arg(long, env = "JANUS_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Largest accepted encoded image, in bytes.
    #[arg(long, env = "JANUS_MAX_IMAGE_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub max_image_bytes: usize,
    /// Largest accepted width × height (read from the header before decoding).
    #[arg(long, env = "JANUS_MAX_IMAGE_PIXELS", default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Largest accepted sampling.max_new_tokens.
    #[arg(long, env = "JANUS_MAX_NEW_TOKENS_LIMIT", default_value_t = 2048)]
    pub max_new_tokens_limit: usize,
    /// KV-cache budget in tokens: requests join the running batch while the rows' prompt plus
    /// max_new_tokens fit (a larger request runs alone).
    #[arg(long, env = "JANUS_MAX_BATCH_TOKENS", default_value_t = 32_768)]
    pub max_batch_tokens: usize,
    /// Prompt positions prefilled per step while other requests decode (0 = all at once).
    #[arg(long, env = "JANUS_PREFILL_CHUNK", default_value_t = 256)]
    pub prefill_chunk: usize,
}

impl UnderstandingFlags {
    /// As engine configuration.
    pub fn config(&self) -> janus_engine::UnderstandingConfig {
        janus_engine::UnderstandingConfig {
            max_queue: self.max_queue,
            max_batch: self.max_batch,
            max_new_tokens_limit: self.max_new_tokens_limit,
            default_max_new_tokens: 512,
            image_limits: janus_pipeline::ImageLimits {
                max_bytes: self.max_image_bytes,
                max_pixels: self.max_image_pixels,
            },
            max_batch_tokens: self.max_batch_tokens,
            prefill_chunk: self.prefill_chunk,
            ..Default::default()
        }
    }
}

/// Generation engine settings.
#[derive(clap::Args, Debug, Clone)]
pub struct GenerationFlags {
    /// Generation requests that may wait before RESOURCE_EXHAUSTED.
    #[arg(long, env = "JANUS_MAX_QUEUE", default_value_t = 16)]
    pub max_queue: usize,
    /// Generation requests batched into one forward at most.
    #[arg(long, env = "JANUS_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Side of preview thumbnails in pixels.
    #[arg(long, env = "JANUS_PREVIEW_SIZE", default_value_t = 96)]
    pub preview_size: u32,
}

impl GenerationFlags {
    /// As engine configuration.
    pub fn config(&self) -> janus_engine::GenerationConfig {
        generation_config(self.max_queue, self.max_batch, self.preview_size)
    }
}

/// Generation engine configuration from its three knobs.
pub fn generation_config(
    max_queue: usize,
    max_batch: usize,
    preview_size: u32,
) -> janus_engine::GenerationConfig {
    janus_engine::GenerationConfig {
        max_queue,
        max_batch,
        preview_size: preview_size.clamp(8, 384),
        ..Default::default()
    }
}
