//! `janus-generation`: the generation half as a standalone gRPC server (a cluster role).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

/// Serve janus.v1.Generation (+ grpc.health.v1 and reflection) on one device.
#[derive(Parser, Debug)]
#[command(name = "janus-generation", version, about)]
struct Cli {
    #[command(flatten)]
    args: janus_generation::Args,
}

#[tokio::main]
async fn main() {
    janus_model_service::threads::name_math_threads();
    // Inside the runtime (`#[tokio::main]`): the OTLP exporter is a tonic client.
    let _telemetry = janus_service::init_telemetry("janus-generation");
    if let Err(e) = janus_generation::run(Cli::parse().args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
