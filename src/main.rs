//! `janus`: the command-line entry point (synthetic checkpoints, benchmarks, local inference).

mod bench;

/// Large tensors are allocated and freed every op; the system allocator returns them to the OS
/// each time (page faults on every reuse), mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use janus_pipeline::generate::{GenerateParams, GenerationModel};
use janus_pipeline::understand::{Conversation, TokenEvent, UnderstandingModel};
use janus_pipeline::{LoadOptions, Message, Role, SamplingParams};
use std::io::Write;
use std::path::PathBuf;

/// Janus-Pro inference: understand images, generate images, benchmark, synthesise checkpoints.
#[derive(Parser, Debug)]
#[command(name = "janus", version, about)]
struct Cli {
    /// Worker threads for tensor math (sets RAYON_NUM_THREADS); default: all cores.
    #[arg(long, global = true, env = "JANUS_THREADS")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

/// Where and how to load a checkpoint.
#[derive(clap::Args, Debug, Clone)]
struct ModelArgs {
    /// Checkpoint directory in the DeepSeek layout (config.json, tokenizer.json, weights).
    #[arg(long, env = "JANUS_MODEL")]
    model: PathBuf,
    /// Device: cpu, cuda:N (needs the `cuda` feature) or metal:N.
    #[arg(long, default_value = "cpu", env = "JANUS_DEVICE")]
    device: String,
    /// Compute dtype: f32 or bf16.
    #[arg(long, default_value = "f32", env = "JANUS_DTYPE")]
    dtype: String,
    /// Weight storage dtype (default: the compute dtype). `bf16` with `--dtype f32` halves the
    /// memory read per decode step on the CPU.
    #[arg(long, env = "JANUS_WEIGHT_DTYPE")]
    weight_dtype: Option<String>,
}

impl ModelArgs {
    fn options(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            device: janus_pipeline::parse_device(&self.device)?,
            dtype: janus_pipeline::parse_dtype(&self.dtype)?,
            weight_dtype: self
                .weight_dtype
                .as_deref()
                .map(janus_pipeline::parse_dtype)
                .transpose()?,
            max_context: None,
        })
    }
}

#[derive(Subcommand, Debug)]
enum Command {
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
        /// Seed of the random weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Benchmark understanding and generation on a checkpoint; prints JSON.
    Bench(bench::BenchArgs),
    /// Answer a question about images, streaming the answer to stdout (runs the model locally).
    Understand {
        #[command(flatten)]
        model: ModelArgs,
        /// Image files, one per <image_placeholder> (prepended to the question if it has none).
        #[arg(long = "image")]
        images: Vec<PathBuf>,
        /// Maximum new tokens.
        #[arg(long, default_value_t = 512)]
        max_new_tokens: usize,
        /// Temperature (0 = greedy).
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        /// Nucleus mass.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        /// Seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// The question.
        question: String,
    },
    /// Generate images from a prompt and write PNGs (runs the model locally).
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        /// Number of images (1–16).
        #[arg(short, long, default_value_t = 1)]
        n: usize,
        /// Classifier-free guidance weight.
        #[arg(long, default_value_t = 5.0)]
        cfg_weight: f32,
        /// Temperature (0 = greedy).
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// Seed (image i uses seed + i).
        #[arg(long, default_value_t = 12345)]
        seed: u64,
        /// Output directory.
        #[arg(short, long, default_value = "out")]
        out: PathBuf,
        /// The prompt.
        prompt: String,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Some(t) = cli.threads {
        // Before any pool is built: rayon and candle read these once.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", t.to_string());
    }
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e:#}");
        let code = match e.downcast_ref::<janus_pipeline::Error>() {
            Some(pe) if pe.is_client_error() => 2,
            Some(janus_pipeline::Error::MissingFile { .. }) => 3,
            _ => 1,
        };
        std::process::exit(code);
    }
}

fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Synth {
            preset,
            llm_layers,
            tokenizer,
            out,
            seed,
        } => {
            let preset: janus_pipeline::synth::Preset = preset.parse()?;
            let t = std::time::Instant::now();
            let params = janus_pipeline::synth::write_checkpoint(
                preset, llm_layers, &tokenizer, &out, seed,
            )?;
            eprintln!(
                "wrote {} ({params} parameters) in {:.1}s",
                out.display(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
        Command::Understand {
            model,
            images,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            question,
        } => {
            let m = UnderstandingModel::load(&model.model, &model.options()?)?;
            let mut decoded = Vec::new();
            for (i, p) in images.iter().enumerate() {
                let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                decoded.push(
                    janus_pipeline::decode_rgb(&bytes, &Default::default())
                        .map_err(|source| janus_pipeline::Error::Image { index: i, source })?,
                );
            }
            let mut content = question;
            if !content.contains("<image_placeholder>") {
                content = format!("{}{content}", "<image_placeholder>\n".repeat(decoded.len()));
            }
            let conv = Conversation {
                messages: vec![Message {
                    role: Role::User,
                    content,
                }],
                images: decoded,
            };
            let params = SamplingParams {
                max_new_tokens,
                temperature,
                top_p,
                seed,
                ..Default::default()
            };
            let mut out = std::io::stdout();
            let (_, reason) = m.understand(&conv, params, |e| {
                if let TokenEvent::Token { text, .. } = e {
                    let _ = out.write_all(text.as_bytes());
                    let _ = out.flush();
                }
            })?;
            println!();
            eprintln!("finish: {reason:?}");
            Ok(())
        }
        Command::Generate {
            model,
            n,
            cfg_weight,
            temperature,
            seed,
            out,
            prompt,
        } => {
            let m = GenerationModel::load(&model.model, &model.options()?)?;
            let params = GenerateParams {
                n,
                cfg_weight,
                temperature,
                seed,
                ..Default::default()
            };
            let images = m.generate(&prompt, &params, |done, total| {
                if done % 24 == 0 || done == total {
                    eprint!("\rstep {done}/{total}");
                }
            })?;
            eprintln!();
            std::fs::create_dir_all(&out)?;
            for (i, img) in images.iter().enumerate() {
                let path = out.join(format!("image_{i}.png"));
                image::RgbImage::from_raw(
                    img.image.width,
                    img.image.height,
                    img.image.data.clone(),
                )
                .context("image buffer")?
                .save(&path)?;
                println!("{}", path.display());
            }
            Ok(())
        }
    }
}
