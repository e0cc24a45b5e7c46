//! `janus quantize` (write a checkpoint whose language model is stored as 8- or 4-bit blocks)
//! and `janus quality` (how far quantized weights, or another compute dtype, land from the
//! checkpoint's own weights in f32), both on a checkpoint directory, in this process.

use anyhow::{Context, Result};
use janus_pipeline::{quality, LoadOptions, QFormat};
use serde_json::json;
use std::path::PathBuf;

/// `janus quantize`.
#[derive(clap::Args, Debug)]
pub struct QuantizeArgs {
    /// Source checkpoint directory (safetensors or PyTorch pickle, DeepSeek's or transformers'
    /// layout).
    #[arg(long, env = "JANUS_MODEL")]
    pub model: PathBuf,
    /// Output directory (created; must not hold weights): config, tokenizer and processor files
    /// copied, one model.safetensors with the language model's linear layers as blocks.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Block format: q8 (Q8_0, 8.5 bits a weight) or q4 (Q4_1, 5 bits a weight).
    #[arg(long, default_value = "q8")]
    pub weight_dtype: String,
}

/// The block format `--weight-dtype` names (q8 / q4 only).
fn format(s: &str) -> Result<QFormat> {
    match janus_pipeline::parse_weight_dtype(s)? {
        (_, Some(q)) => Ok(q),
        _ => anyhow::bail!("--weight-dtype {s}: expected q8 or q4"),
    }
}

pub fn quantize(args: QuantizeArgs) -> Result<()> {
    let f = format(&args.weight_dtype)?;
    let t = std::time::Instant::now();
    let w = janus_pipeline::quantize::quantize_dir(&args.model, &args.out, f)
        .with_context(|| format!("quantizing {}", args.model.display()))?;
    println!(
        "{}",
        json!({
            "out": args.out.display().to_string(),
            "format": f.name(),
            "quantized_tensors": w.quantized,
            "copied_tensors": w.copied,
            "source_bytes": w.source_bytes,
            "written_bytes": w.written_bytes,
            "seconds": (t.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        })
    );
    Ok(())
}

/// `janus quality`.
#[derive(clap::Args, Debug)]
pub struct QualityArgs {
    /// Checkpoint directory.
    #[arg(long, env = "JANUS_MODEL")]
    pub model: PathBuf,
    /// The quantization measured: q8 or q4 (against the checkpoint's own weights). Default:
    /// q8, unless `--test-dtype` names what is measured instead.
    #[arg(long)]
    pub weight_dtype: Option<String>,
    /// Compute dtype of the baseline (and of the measured run unless `--test-dtype` is given):
    /// auto (as `janus serve` picks it for each half), f32 or bf16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Compute dtype of the measured run, e.g. bf16 against the f32 baseline: the precision
    /// decision `--dtype auto` makes on CPUs with AVX512-BF16 (see the README).
    #[arg(long)]
    pub test_dtype: Option<String>,
    /// Image asked about (default: a generated gradient).
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Greedy answer tokens compared.
    #[arg(long, default_value_t = 24)]
    pub tokens: usize,
    /// Generation steps compared teacher-forced (both models then generate a whole greedy image).
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Image prompt.
    #[arg(long, default_value = "A red apple on a wooden table, studio light.")]
    pub prompt: String,
    /// Skip the understanding half.
    #[arg(long)]
    pub skip_understanding: bool,
    /// Skip the generation half.
    #[arg(long)]
    pub skip_generation: bool,
}

pub fn quality(args: QualityArgs) -> Result<()> {
    let f = match (&args.weight_dtype, &args.test_dtype) {
        (Some(w), _) => Some(format(w)?),
        (None, Some(_)) => None,
        (None, None) => Some(QFormat::Q8_0),
    };
    let device = janus_pipeline::Device::Cpu;
    let base = LoadOptions {
        dtype: janus_pipeline::parse_dtype_for(&args.dtype, &device)?,
        ..LoadOptions::for_device(device.clone())
    };
    let test = LoadOptions {
        quant: f,
        dtype: match &args.test_dtype {
            Some(d) => janus_pipeline::parse_dtype_for(d, &device)?,
            None => base.dtype,
        },
        ..base.clone()
    };
    anyhow::ensure!(
        test.quant.is_some() || test.dtype != base.dtype,
        "nothing to compare: --test-dtype {} is the baseline's dtype",
        janus_pipeline::dtype_name(test.dtype)
    );
    let image = match &args.image {
        Some(p) => janus_pipeline::decode_rgb(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
            &Default::default(),
        )?,
        None => image::RgbImage::from_fn(384, 384, |x, y| {
            image::Rgb([
                (x * 255 / 383) as u8,
                (y * 255 / 383) as u8,
                ((x + y) % 256) as u8,
            ])
        }),
    };
    let mut out = json!({
        "model": args.model.display().to_string(),
        "format": f.map(QFormat::name),
        "dtype": janus_pipeline::dtype_name(base.dtype),
        "test_dtype": janus_pipeline::dtype_name(test.dtype),
    });
    if !args.skip_understanding {
        let r = quality::understanding(
            &args.model,
            &base,
            &test,
            &quality::question(image),
            args.tokens,
        )?;
        out["understanding"] = serde_json::to_value(r)?;
    }
    if !args.skip_generation {
        let r = quality::generation(&args.model, &base, &test, &args.prompt, args.steps)?;
        out["generation"] = serde_json::to_value(r)?;
    }
    println!("{out}");
    Ok(())
}
