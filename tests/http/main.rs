//! The OpenAI-compatible HTTP port with real `janus serve` and `janus gateway` processes.
//! (The official `openai` client, the playground in Chromium and schemathesis are in
//! `openai/check.sh`.)

#[path = "../common/mod.rs"]
mod common;

mod openai;
