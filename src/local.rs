//! Local inference (`janus understand|generate --model …`): the model runs in this process.

use crate::client::{Format, GenerateArgs, UnderstandArgs};
use anyhow::{Context, Result};
use janus_pipeline::generation::{GenerateParams, GenerationModel};
use janus_pipeline::understand::{Conversation, TokenEvent, UnderstandingModel};
use janus_pipeline::{LoadOptions, Message, Role, SamplingParams};
use std::io::Write;

/// Load options from the device/dtype flags (`--dtype auto` resolved for the device).
pub fn load_options(device: &str, dtype: &str, weight_dtype: Option<&str>) -> Result<LoadOptions> {
    let device = janus_pipeline::parse_device(device)?;
    let (weight_dtype, quant) = match weight_dtype {
        Some(w) => janus_pipeline::parse_weight_dtype(w)?,
        None => (None, None),
    };
    Ok(LoadOptions {
        dtype: janus_pipeline::parse_dtype_for(dtype, &device)?,
        device,
        weight_dtype,
        quant,
        max_context: None,
        special_tokens_in_text: false,
    })
}

fn resolve(model: &str) -> Result<std::path::PathBuf> {
    Ok(janus_model_service::model_source::resolve(model)?.path)
}

/// Runs one conversation locally, streaming the answer to stdout.
pub fn understand(model: &str, args: &UnderstandArgs) -> Result<()> {
    let l = &args.local;
    let opts = load_options(&l.device, &l.dtype, l.weight_dtype.as_deref())?;
    let m = UnderstandingModel::load(&resolve(model)?, &opts)?;
    let mut decoded = Vec::new();
    for (i, p) in args.images.iter().enumerate() {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        decoded.push(
            janus_pipeline::decode_rgb(&bytes, &Default::default())
                .map_err(|source| janus_pipeline::Error::Image { index: i, source })?,
        );
    }
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message {
            role: Role::System,
            content: s.clone(),
        });
    }
    messages.push(Message {
        role: Role::User,
        content: args.content(),
    });
    let conv = Conversation {
        messages,
        images: decoded,
    };
    let params = SamplingParams {
        max_new_tokens: args.max_new_tokens.unwrap_or(512) as usize,
        min_new_tokens: args.min_new_tokens.unwrap_or(0) as usize,
        temperature: args.temperature,
        top_k: args.top_k as usize,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed.unwrap_or(42),
        stop: args.stop.clone(),
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

/// Generates images locally and writes them to `--out`.
pub fn generate(model: &str, args: &GenerateArgs) -> Result<()> {
    crate::client::prepare_out_dir(&args.out)?;
    let l = &args.local;
    let opts = load_options(&l.device, &l.dtype, l.weight_dtype.as_deref())?;
    let m = GenerationModel::load(&resolve(model)?, &opts)?;
    let params = GenerateParams {
        n: args.n as usize,
        cfg_weight: args.cfg_weight,
        temperature: args.temperature,
        top_k: args.top_k as usize,
        top_p: args.top_p,
        seed: args.seed.unwrap_or(12345),
    };
    let total = m.image_tokens() as u64;
    let mut bar = crate::client::StepProgress::new(total, args.quiet);
    let images = m.generate(&args.prompt, &params, |done, _| bar.set(done as u64, total))?;
    bar.bar().finish_and_clear();
    for (i, img) in images.iter().enumerate() {
        let path = match args.format {
            Format::Tokens => {
                let p = args.out.join(format!("image_{i}.tokens.json"));
                std::fs::write(&p, serde_json::to_string(&img.tokens)?)?;
                p
            }
            f => {
                let ext = if f == Format::Jpeg { "jpg" } else { "png" };
                let p = args.out.join(format!("image_{i}.{ext}"));
                image::RgbImage::from_raw(
                    img.image.width,
                    img.image.height,
                    img.image.data.clone(),
                )
                .context("image buffer")?
                .save(&p)?;
                p
            }
        };
        println!("{} (seed {})", path.display(), img.seed);
    }
    Ok(())
}
