//! DeepSeek-LLM (the Llama architecture) as Janus-Pro uses it, shared by both services.
//!
//! Follows `transformers.LlamaForCausalLM`: RMSNorm, rotate-half RoPE (θ from the config), SiLU
//! MLP, no biases, `num_key_value_heads` honoured. Unlike a text-only Llama it runs from input
//! embeddings (image features are spliced in by the caller), returns the *final-normed hidden
//! states* (the image-generation head reads them) and computes `lm_head` logits only where asked.
//! The KV cache is ragged: every row (sequence) has its own length and storage, so rows of
//! different lengths share a forward without padding, and a prompt can be prefilled in chunks
//! against its cache with O(chunk × context) extra memory.
//!
//! - `config.rs`: `language_config` ([`LlmConfig`]).
//! - `model.rs`: [`Llm`], embeddings, the stack of blocks, final norm, `lm_head`; RoPE tables
//!   and causal masks for a step.
//! - `block.rs`: one decoder layer, `Block::forward` (RMSNorm, attention with the cache, MLP).
//! - `kv_cache.rs`: [`KvCache`], the ragged per-row cache and its row operations.
//! - [`linear`]: [`Linear`], which picks the CPU kernel or candle's matmul per call, and holds
//!   its weight dense, packed or as 8/4-bit blocks.
//! - [`attention`]: scaled dot-product attention on the CPU kernels or candle.

pub mod attention;
mod block;
mod config;
mod kv_cache;
pub mod linear;
mod model;

pub use config::LlmConfig;
pub use janus_kernels::quant::QFormat;
pub use kv_cache::KvCache;
pub use linear::Linear;
pub use model::{Llm, Quantize};
