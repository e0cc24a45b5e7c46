//! `janus`: the command-line entry point — the single-machine server (`serve`), the cluster
//! roles (`serve-understanding`, `serve-generation`, `gateway`), the gRPC client
//! (`understand`, `generate`, `info`, `health`; local inference with `--model`), synthetic
//! checkpoints and benchmarks.

mod bench;
mod client;
mod local;
mod memtrim;
mod quant;
mod serve;

/// Large tensors are allocated and freed every op; the system allocator returns them to the OS
/// each time (page faults on every reuse), mimalloc keeps them until the process goes quiet
/// (see `memtrim`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Result;
use clap::{Parser, Subcommand};
use janus_pipeline::LoadOptions;
use std::path::PathBuf;

/// Janus-Pro inference: serve, ask about images, generate images, benchmark, synthesise checkpoints.
#[derive(Parser, Debug)]
#[command(name = "janus", version, about, after_help = EXIT_CODES)]
struct Cli {
    /// Worker threads for tensor math (sets RAYON_NUM_THREADS); default: all cores.
    #[arg(long, global = true, env = "JANUS_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Exit codes, also in README.md.
const EXIT_CODES: &str =
    "Exit codes: 0 success; 1 internal or unexpected error; 2 invalid request \
(INVALID_ARGUMENT, bad image or parameter); 3 model or checkpoint not found; 4 server unreachable, \
UNAVAILABLE or connection lost (retryable); 5 server overloaded (RESOURCE_EXHAUSTED); 6 deadline exceeded; 7 health check: \
not serving; 8 not authenticated (UNAUTHENTICATED: API key missing or unknown, see --api-key).";

/// Where and how to load a checkpoint (`bench`).
#[derive(clap::Args, Debug, Clone)]
struct ModelArgs {
    /// Checkpoint directory in the DeepSeek layout (config.json, tokenizer.json, weights).
    #[arg(long, env = "JANUS_MODEL")]
    model: PathBuf,
    /// Device: cpu, cuda:N (needs the `cuda` feature) or metal:N.
    #[arg(long, default_value = "cpu", env = "JANUS_DEVICE")]
    device: String,
    /// Compute dtype: auto (bf16 on CUDA and on CPUs with AVX512-BF16, f32 on other CPUs), f32
    /// (the reference's numerics) or bf16.
    #[arg(long, default_value = "auto", env = "JANUS_DTYPE")]
    dtype: String,
    /// Weight storage: f32, bf16, f16, or q8 / q4 (the language model's linear layers as 8-bit
    /// or 4-bit blocks, quantized at load). Default: the checkpoint's, bf16 for the hub
    /// checkpoints; `bf16` with `--dtype f32` halves the memory held and read per decode step
    /// on the CPU.
    #[arg(long, env = "JANUS_WEIGHT_DTYPE")]
    weight_dtype: Option<String>,
}

impl ModelArgs {
    fn options(&self) -> Result<LoadOptions> {
        local::load_options(&self.device, &self.dtype, self.weight_dtype.as_deref())
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Single machine: the gateway and both services in one process, one public port.
    Serve(serve::ServeArgs),
    /// Cluster role: the understanding service alone (janus.v1.Understanding).
    ServeUnderstanding(janus_understanding::Args),
    /// Cluster role: the generation service alone (janus.v1.Generation).
    ServeGeneration(janus_generation::Args),
    /// Cluster role: the gateway alone (no model; forwards to backends).
    Gateway(janus_gateway::Args),
    /// Answer a question about images, streaming the answer to stdout (via the server; locally with --model).
    Understand(client::UnderstandArgs),
    /// Generate images from a prompt and write them to a directory (via the server; locally with --model).
    Generate(client::GenerateArgs),
    /// Show what the server has loaded (model, dtype, device, limits, counters) for both services.
    Info(client::InfoArgs),
    /// Check the server's grpc.health.v1 status (exit 0 when serving, 7 when not).
    Health(client::HealthArgs),
    /// Write a random-weight checkpoint at real shapes (tiny, pro-1b, pro-7b).
    Synth {
        /// Shape preset: tiny, pro-1b or pro-7b.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// Override the number of LLM layers (smaller checkpoints for benchmarks).
        #[arg(long)]
        llm_layers: Option<usize>,
        /// tokenizer.json to ship with the checkpoint.
        #[arg(long)]
        tokenizer: PathBuf,
        /// Output directory (created).
        #[arg(long, short)]
        out: PathBuf,
        /// Seed of the random weights (the same seed gives the same weights in every format).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight files: safetensors (one model.safetensors) or pth (PyTorch pickle as the hub
        /// ships Janus-Pro: pytorch_model.bin, or pytorch_model-0000N-of-0000M.bin shards and
        /// pytorch_model.bin.index.json).
        #[arg(long, default_value = "safetensors")]
        format: String,
        /// Largest pickle shard of --format pth, in bytes or with a unit (KB, MB, GB: powers of
        /// 1000, as transformers' max_shard_size). 10GB: pro-7b gets 2 shards, pro-1b one file.
        #[arg(long, default_value = "10GB", value_parser = parse_size)]
        shard_size: u64,
    },
    /// Benchmark understanding and generation on a checkpoint; prints JSON.
    Bench(bench::BenchArgs),
    /// Write a copy of a checkpoint with the language model's linear layers stored as 8- or
    /// 4-bit blocks (loads directly, no quantization at load); prints JSON.
    Quantize(quant::QuantizeArgs),
    /// Measure how far quantized weights, or bf16 compute, land from the checkpoint's own
    /// weights in f32 (logits cosine, greedy tokens, guided image logits, images); prints JSON.
    Quality(quant::QualityArgs),
}

/// `10GB`, `500MB`, `64KB` (powers of 1000, as transformers' `max_shard_size`) or plain bytes.
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let units = [
        ("GB", 1_000_000_000u64),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| upper.strip_suffix(u).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((upper.clone(), 1));
    let v: f64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a size such as 10GB, 500MB or 1048576"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("'{s}': the size must be positive"));
    }
    Ok((v * mult as f64) as u64)
}

fn main() {
    // Keep freed memory committed while busy (per-op tensors of tens of MB are freed and
    // reallocated every layer; returning them to the OS makes every reuse fault in zeroed pages
    // again), and let the servers' trimmer return it once the process goes quiet (memtrim.rs).
    let trimming = memtrim::enabled();
    memtrim::configure_allocator(trimming);
    let cli = Cli::parse();
    if trimming
        && matches!(
            cli.command,
            Command::Serve(_) | Command::ServeUnderstanding(_) | Command::ServeGeneration(_)
        )
    {
        memtrim::spawn_trimmer(memtrim::Policy::default());
    }
    if !matches!(
        cli.command,
        Command::Serve(_)
            | Command::ServeUnderstanding(_)
            | Command::ServeGeneration(_)
            | Command::Gateway(_)
    ) {
        // Commands that print: a closed pipe (`janus info --json | head`) ends the process
        // quietly, as for any Unix filter, instead of a panic in `println!`. Servers keep
        // Rust's default (SIGPIPE ignored; socket writes report errors).
        // SAFETY: resetting a signal disposition before any thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Some(t) = cli.threads {
        // Before any pool is built: rayon and candle read these once.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    }
    janus_model_service::threads::name_math_threads();
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(exit_code(&e));
    }
}

/// The documented exit code of an error (see [`EXIT_CODES`]).
fn exit_code(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if let Some(c) = cause.downcast_ref::<client::ExitCode>() {
            return c.0;
        }
        if let Some(s) = cause.downcast_ref::<tonic::Status>() {
            return client::code_for(s);
        }
        if cause.downcast_ref::<tonic::transport::Error>().is_some() {
            return 4;
        }
        if cause
            .downcast_ref::<janus_model_service::model_source::ModelSourceError>()
            .is_some()
        {
            return 3;
        }
        if let Some(pe) = cause.downcast_ref::<janus_pipeline::Error>() {
            return match pe {
                pe if pe.is_client_error() => 2,
                janus_pipeline::Error::MissingFile { .. } => 3,
                _ => 1,
            };
        }
    }
    1
}

/// A multi-threaded runtime for the async commands.
fn runtime() -> Result<tokio::runtime::Runtime> {
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .on_thread_park(memtrim::on_worker_park)
        .build()?;
    memtrim::register_runtime(rt.handle().clone(), workers);
    Ok(rt)
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        // Telemetry is set up inside the runtime (the OTLP exporter is a tonic client); the
        // guard flushes buffered spans when the server returns.
        Command::Serve(args) => runtime()?.block_on(async {
            let _telemetry = janus_service::init_telemetry("janus");
            serve::run(args).await
        }),
        Command::ServeUnderstanding(args) => runtime()?.block_on(async {
            let _telemetry = janus_service::init_telemetry("janus-understanding");
            janus_understanding::run(args).await
        }),
        Command::ServeGeneration(args) => runtime()?.block_on(async {
            let _telemetry = janus_service::init_telemetry("janus-generation");
            janus_generation::run(args).await
        }),
        Command::Gateway(args) => runtime()?.block_on(async {
            let _telemetry = janus_service::init_telemetry("janus-gateway");
            janus_gateway::run(args).await
        }),
        Command::Understand(args) => match args.local.model.clone() {
            Some(model) => local::understand(&model, &args),
            None => runtime()?.block_on(client::understand(args)),
        },
        Command::Generate(args) => match args.local.model.clone() {
            Some(model) => local::generate(&model, &args),
            None => runtime()?.block_on(client::generate(args)),
        },
        Command::Info(args) => runtime()?.block_on(client::info(args)),
        Command::Health(args) => runtime()?.block_on(client::health(args)),
        Command::Synth {
            preset,
            llm_layers,
            tokenizer,
            out,
            seed,
            format,
            shard_size,
        } => {
            let preset: janus_synth::Preset = preset.parse()?;
            let opts = janus_synth::SynthOptions {
                llm_layers,
                seed,
                format: format.parse()?,
                shard_bytes: shard_size,
            };
            let t = std::time::Instant::now();
            let params = janus_synth::write_checkpoint_with(preset, &tokenizer, &out, &opts)?;
            eprintln!(
                "wrote {} ({params} parameters) in {:.1}s",
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Quantize(args) => quant::quantize(args),
        Command::Quality(args) => quant::quality(args),
    }
}
