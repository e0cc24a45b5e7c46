//! `gen_head` and classifier-free guidance: code logits from the LLM's hidden states, and the
//! guided logits `uncond + cfg_weight · (cond − uncond)` of every interleaved row pair.

use super::GenerationModel;
use crate::error::{Error, Result};
use candle_core::{DType, Module, Tensor};
use janus_llm::Linear;

/// `vision_head` of the reference: Linear → GELU (erf) → Linear to code logits.
#[derive(Debug, Clone)]
pub(super) struct GenHead {
    pub(super) output_mlp_projector: Linear,
    pub(super) vision_head: Linear,
}

impl GenHead {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.vision_head
            .forward(&self.output_mlp_projector.forward(x)?.gelu_erf()?)
    }
}

impl GenerationModel {
    /// `gen_head` logits `[rows, codes]` for final-normed hidden states `[rows, hidden]`.
    pub(crate) fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.gen_head.forward(hidden)?.to_dtype(DType::F32)?)
    }

    /// Classifier-free guidance for interleaved `[c0, u0, c1, u1, …]` hidden states
    /// `[2k, hidden]` with one weight per pair: `[k, codes]` (f32).
    pub(crate) fn guide(&self, hidden: &Tensor, weights: &[f32]) -> Result<Tensor> {
        let logits = self.head_logits(hidden)?;
        let (rows, v) = logits.dims2()?;
        if rows != 2 * weights.len() {
            return Err(Error::invalid(
                "weights",
                format!("{} guidance weights for {rows} rows", weights.len()),
            ));
        }
        let pairs = logits.reshape((rows / 2, 2, v))?;
        let cond = pairs.narrow(1, 0, 1)?.squeeze(1)?;
        let uncond = pairs.narrow(1, 1, 1)?.squeeze(1)?;
        let w = Tensor::from_vec(weights.to_vec(), (rows / 2, 1), logits.device())?;
        Ok((&uncond + (cond - &uncond)?.broadcast_mul(&w)?)?.to_dtype(DType::F32)?)
    }
}
