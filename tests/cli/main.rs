//! The `janus` binary as a process: `serve`, the client commands and their exit codes, draining
//! on SIGTERM, and connections held the way careless clients and attackers hold them.
//! One test binary; `cargo test --release --test cli drain::` runs one file's tests.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod connections;
mod drain;
