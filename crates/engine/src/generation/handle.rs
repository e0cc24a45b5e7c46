//! The handle to the generation model thread.

use super::runner::Runner;
use super::{GenerateEvent, GenerateTicket, GenerationConfig, GenerationEngine, Work};
use crate::control::{Control, Output, RequestMeta, StatsSnapshot};
use crate::error::Result;
use janus_pipeline::GenerationModel;
use std::sync::Arc;
use tokio::sync::mpsc;

impl GenerationEngine {
    /// Starts the engine thread that owns `model`.
    pub fn start(mut model: GenerationModel, config: GenerationConfig) -> Self {
        model.set_cache_limits(config.prefix_cache_bytes);
        let model = Arc::new(model);
        let (m, c) = (model.clone(), config.clone());
        let control = Control::spawn("janus-generation", config.max_queue, move |control| {
            Runner::new(m, control, c).run()
        });
        Self {
            model,
            control,
            config,
        }
    }

    /// The loaded model.
    pub fn model(&self) -> &GenerationModel {
        &self.model
    }

    /// Capacities and output settings.
    pub fn config(&self) -> &GenerationConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.control.snapshot()
    }

    /// Side of a generated image in pixels.
    pub fn image_size(&self) -> usize {
        self.model.config().vision.image_size
    }

    /// Queues a prepared request. Dropping the receiver cancels it at the next step.
    pub fn submit(
        &self,
        ticket: GenerateTicket,
        meta: RequestMeta,
    ) -> Result<mpsc::Receiver<Result<GenerateEvent>>> {
        let total = self.model.image_tokens();
        let previews = if ticket.preview_interval == 0 {
            0
        } else {
            total / (self.side() * ticket.preview_interval as usize) + 1
        };
        // Progress per step, previews, images and the final event all fit.
        let cap = total + (previews + 1) * ticket.params().n + 4;
        let (tx, rx) = mpsc::channel(cap);
        self.control.submit(Work {
            ticket,
            out: Output::new(tx, meta),
        })?;
        Ok(rx)
    }

    fn side(&self) -> usize {
        (self.model.image_tokens() as f64).sqrt().round().max(1.0) as usize
    }

    /// Stops accepting requests; queued and running ones continue.
    pub fn close(&self) {
        self.control.close();
    }

    /// Ends all queued and running requests at the next step (`Unavailable`).
    pub fn abort(&self) {
        self.control.abort();
    }
}
