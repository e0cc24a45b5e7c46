//! In-process tests of the model and the engines on the tiny fixture, no sockets: parity with
//! DeepSeek's reference (both fixture copies, f32 and bf16), the transformers-layout copy
//! against DeepSeek's, batching, `synth` checkpoints, bad checkpoints and requests at the
//! pipeline, the engines' fairness by event order, and the prefix
//! and image caches, and quantized weights against bf16.
//! One test binary; `cargo test --release --test pipeline parity::` runs one file's tests.

mod bad_input;
mod batching;
mod bf16;
mod fairness;
mod hf_layout;
mod parity;
mod prefix_cache;
mod quant;
mod synth;
