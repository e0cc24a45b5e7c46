//! `janus-understanding`: the understanding half as a standalone gRPC server (a cluster role).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// Serve janus.v1.Understanding (+ grpc.health.v1 and reflection) on one device.
#[derive(Parser, Debug)]
#[command(name = "janus-understanding", version, about)]
struct Cli {
    #[command(flatten)]
    args: janus_understanding::Args,
}

#[tokio::main]
async fn main() {
    janus_model_service::threads::name_math_threads();
    // Inside the runtime (`#[tokio::main]`): the OTLP exporter is a tonic client.
    let _telemetry = janus_service::init_telemetry("janus-understanding");
    if let Err(e) = janus_understanding::run(Cli::parse().args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
