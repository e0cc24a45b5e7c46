//! The handle to the understanding model thread.

use super::runner::Runner;
use super::{UnderstandEvent, UnderstandTicket, UnderstandingConfig, UnderstandingEngine, Work};
use crate::control::{Control, Output, RequestMeta, StatsSnapshot};
use crate::error::Result;
use janus_pipeline::UnderstandingModel;
use std::sync::Arc;
use tokio::sync::mpsc;

impl UnderstandingEngine {
    /// Starts the engine thread that owns `model`.
    pub fn start(mut model: UnderstandingModel, config: UnderstandingConfig) -> Self {
        model.set_cache_limits(config.prefix_cache_bytes, config.image_cache_bytes);
        let per_token = model.llm().kv_bytes_per_token();
        tracing::info!(
            kv_bytes_per_token = per_token,
            max_batch_tokens = config.max_batch_tokens,
            kv_budget_gib = (per_token * config.max_batch_tokens) as f64 / (1u64 << 30) as f64,
            "understanding engine: KV cache budget"
        );
        let model = Arc::new(model);
        let (m, c) = (model.clone(), config.clone());
        let control = Control::spawn("janus-understanding", config.max_queue, move |control| {
            Runner::new(m, control, c).run()
        });
        Self {
            model,
            control,
            config,
        }
    }

    /// The loaded model (configuration, tokenizer, context window).
    pub fn model(&self) -> &UnderstandingModel {
        &self.model
    }

    /// The limits this engine enforces.
    pub fn config(&self) -> &UnderstandingConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.control.snapshot()
    }

    /// Queues a prepared request. Events arrive on the returned receiver; dropping it cancels
    /// the request at the engine's next step.
    pub fn submit(
        &self,
        ticket: UnderstandTicket,
        meta: RequestMeta,
    ) -> Result<mpsc::Receiver<Result<UnderstandEvent>>> {
        // Every token, a possible flush at EOS and the final event fit: the engine never waits.
        let (tx, rx) = mpsc::channel(ticket.prepared.params.max_new_tokens + 4);
        self.control.submit(Work {
            ticket,
            out: Output::new(tx, meta),
        })?;
        Ok(rx)
    }

    /// Stops accepting requests; queued and running ones continue.
    pub fn close(&self) {
        self.control.close();
    }

    /// Ends all queued and running requests at the next step (finish reason `Cancelled`).
    pub fn abort(&self) {
        self.control.abort();
    }
}
