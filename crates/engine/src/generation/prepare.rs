//! A request checked and its prompt tokenized, before it is queued.

use super::*;
use crate::control::guarded;
use crate::error::{EngineError, Result};
use janus_pipeline::generation::GenerateParams;

impl GenerationEngine {
    /// Validates a request and tokenizes its prompt (CPU work for a blocking pool).
    pub fn prepare(&self, input: GenerateInput) -> Result<GenerateTicket> {
        if input.prompt.len() > self.config.max_prompt_bytes {
            return Err(EngineError::invalid(
                "prompt",
                format!(
                    "{} bytes, at most {} allowed",
                    input.prompt.len(),
                    self.config.max_prompt_bytes
                ),
            ));
        }
        // The settings are checked once, by the pipeline's `prepare` (`GenerateParams::validate`,
        // whose field names are the wire's).
        let params = GenerateParams {
            n: input.n.unwrap_or(1) as usize,
            cfg_weight: input.cfg_weight.unwrap_or(5.0),
            temperature: input.temperature.unwrap_or(1.0),
            top_k: input.top_k.unwrap_or(0) as usize,
            top_p: input.top_p.unwrap_or(1.0),
            seed: input.seed.unwrap_or_else(crate::random_seed),
        };
        let mut prepared = guarded("prepare", || self.model.prepare(&input.prompt, &params))?;
        prepared.scope = input.scope.clone();
        Ok(GenerateTicket {
            prepared,
            format: input.format,
            preview_interval: input.preview_interval,
            cached_tokens: 0,
        })
    }
}
