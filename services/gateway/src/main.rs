//! `janus-gateway`: the public endpoint of a Janus-Pro cluster (no model).

use clap::Parser;

/// Forward janus.v1.Understanding and janus.v1.Generation to health-checked backends.
#[derive(Parser, Debug)]
#[command(name = "janus-gateway", version, about)]
struct Cli {
    #[command(flatten)]
    args: janus_gateway::Args,
}

#[tokio::main]
async fn main() {
    // Inside the runtime (`#[tokio::main]`): the OTLP exporter is a tonic client.
    let _telemetry = janus_service::init_telemetry("janus-gateway");
    if let Err(e) = janus_gateway::run(Cli::parse().args).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
