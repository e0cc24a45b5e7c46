//! `janus bench`: times the pieces of both pipelines on one checkpoint and prints JSON.

use crate::ModelArgs;
use anyhow::Result;
use janus_pipeline::generation::{GenBatch, GenerateParams, GenerationModel};
use janus_pipeline::understand::{Conversation, UnderstandingModel};
use janus_pipeline::{Message, Role, SamplingParams};
use serde_json::json;
use std::time::Instant;

/// Options of `janus bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Decode steps timed for understanding.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Generation steps timed (576 = one whole image; fewer extrapolates s/image from the median step).
    #[arg(long, default_value_t = 576)]
    gen_steps: usize,
    /// Images per request to time generation steps at, comma-separated (e.g. 1,4,16). The
    /// first is also timed end to end (s per image, VQ decode); the others report ms per step.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    gen_n: Vec<usize>,
    /// Warm runs of the vision tower, the prefill and the VQ decode, each reported as the
    /// median (`vision_s`, `prefill_s`, `vq_decode_s`) with every run listed (`*_runs_s`), as
    /// `tools/bench/torch_reference_cpu.py --repeats` reports the reference.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeats: u32,
    /// Skip the understanding half.
    #[arg(long)]
    skip_understanding: bool,
    /// Skip the generation half.
    #[arg(long)]
    skip_generation: bool,
}

/// What the generation timing keeps of its request: the tokens when every step ran.
struct GenRun {
    prompt_tokens: usize,
    total_steps: usize,
    tokens: Option<Vec<Vec<u32>>>,
}

fn secs(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

fn round(x: f64, digits: i32) -> f64 {
    let p = 10f64.powi(digits);
    (x * p).round() / p
}

/// A deterministic 640×360 test image (a gradient), so the bench needs no input file.
fn test_image() -> image::RgbImage {
    image::RgbImage::from_fn(640, 360, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    })
}

/// `f` timed `n` times: the median and every run, in order.
fn timed_runs(n: u32, mut f: impl FnMut() -> Result<f64>) -> Result<(f64, Vec<f64>)> {
    let runs = (0..n).map(|_| f()).collect::<Result<Vec<f64>>>()?;
    let med = median(&mut runs.clone());
    Ok((med, runs))
}

fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| round(x, 3)).collect()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    // Checked before either half loads.
    let ns = if args.gen_n.is_empty() {
        vec![1]
    } else {
        args.gen_n.clone()
    };
    if let Some(bad) = ns.iter().find(|&&n| n == 0 || n > 16) {
        anyhow::bail!("--gen-n: {bad} images per request is outside 1..=16");
    }
    let opts = args.model.options()?;
    let mut out = json!({
        "model": args.model.model.display().to_string(),
        "device": args.model.device,
        "dtype": janus_pipeline::dtype_name(opts.dtype),
        "weight_dtype": janus_pipeline::dtype_name(opts.resolve_weight_dtype(
            janus_pipeline::checkpoint_dtype(&args.model.model)?,
        )),
        "quantized_layers": opts.quant.map(|q| q.name()),
        "threads": std::env::var("RAYON_NUM_THREADS").ok().and_then(|t| t.parse::<usize>().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "simd": janus_kernels::simd_level(),
    });
    if !args.skip_understanding {
        let t = Instant::now();
        let m = UnderstandingModel::load(&args.model.model, &opts)?;
        let load_s = secs(t);
        let conv = Conversation {
            messages: vec![Message {
                role: Role::User,
                content: "<image_placeholder>\nDescribe this image in detail. What is shown, and what colours dominate?".into(),
            }],
            images: vec![test_image()],
        };
        let params = SamplingParams {
            max_new_tokens: args.decode_tokens + 1,
            min_new_tokens: args.decode_tokens + 1,
            ..Default::default()
        };
        let prepared = m.prepare(&conv, params)?;
        // First runs pay one-off costs (thread pools, first-touch of buffers); both are reported.
        let vision_once = || -> Result<f64> {
            let t = Instant::now();
            m.image_features(&prepared.images)?;
            Ok(secs(t))
        };
        let vision_cold_s = vision_once()?;
        let (vision_s, vision_runs) = timed_runs(args.repeats, vision_once)?;
        // The prompt alone: the image goes through the tower first (not timed), then the whole
        // prompt is prefilled in one call.
        let prefill_once = || -> Result<f64> {
            let mut pre = m.begin(prepared.clone())?;
            let vision = m.cost_left(&pre) - prepared.ids.len();
            m.prefill(&mut pre, vision)?;
            let t = Instant::now();
            m.prefill(&mut pre, usize::MAX)?;
            Ok(secs(t))
        };
        let prefill_cold_s = prefill_once()?;
        let (prefill_s, prefill_runs) = timed_runs(args.repeats, prefill_once)?;
        let (mut batch, _) = m.start(vec![prepared.clone()])?;
        let t = Instant::now();
        let mut n = 0;
        while n < args.decode_tokens && !batch.is_done() {
            m.step(&mut batch)?;
            n += 1;
        }
        let decode_s = secs(t);
        // Achieved GFLOP/s (2 × multiply-adds of the matmuls, attention included) of the
        // large-M parts; see `gflop` below for what is counted.
        let (vision_gf, prefill_gf) = gflop(m.config(), prepared.ids.len());
        out["understanding"] = json!({
            "load_s": round(load_s, 3),
            "vision_s": round(vision_s, 3),
            "vision_runs_s": rounded(&vision_runs),
            "vision_cold_s": round(vision_cold_s, 3),
            "prompt_tokens": prepared.ids.len(),
            "prefill_s": round(prefill_s, 3),
            "prefill_runs_s": rounded(&prefill_runs),
            "prefill_cold_s": round(prefill_cold_s, 3),
            "decode_tokens": n,
            "decode_tok_per_s": round(n as f64 / decode_s, 2),
            "vision_gflop": round(vision_gf, 1),
            "vision_gflop_per_s": round(vision_gf / vision_s, 1),
            "prefill_gflop": round(prefill_gf, 1),
            "prefill_gflop_per_s": round(prefill_gf / prefill_s, 1),
        });
        if let Some((used, _)) = janus_pipeline::device_memory(&opts.device) {
            out["understanding"]["device_memory_gb"] = json!(round(used as f64 / 1e9, 2));
        }
        eprintln!("{}", serde_json::to_string(&out["understanding"])?);
    }
    if !args.skip_generation {
        let t = Instant::now();
        let m = GenerationModel::load(&args.model.model, &opts)?;
        let load_s = secs(t);
        let prompt = "A red apple on a wooden table, studio light.";
        // Times `gen_steps` steps of one request of `n` images; returns the job, its `by_n`
        // row, the prefill s, the steps' total s and their median s.
        let timed = |n: usize| -> Result<_> {
            let params = GenerateParams {
                n,
                ..Default::default()
            };
            let t = Instant::now();
            let ready = m.start(prompt, &params)?;
            let prefill_s = secs(t);
            let (prompt_tokens, total_steps) = (ready.prompt_tokens(), ready.total_steps());
            // A batch of one: the engine's step.
            let mut batch = GenBatch::new();
            m.join(&mut batch, 0, ready)?;
            let steps = args.gen_steps.min(total_steps);
            let mut times = Vec::with_capacity(steps);
            for _ in 0..steps {
                let t = Instant::now();
                m.step_batch(&mut batch)?;
                times.push(secs(t));
            }
            let done = steps == total_steps;
            let job = GenRun {
                prompt_tokens,
                total_steps,
                tokens: if done {
                    batch.take_finished().pop().map(|f| f.tokens)
                } else {
                    None
                },
            };
            let total: f64 = times.iter().sum();
            let med = median(&mut times);
            let mut row = json!({
                "n": n,
                "prefill_s": round(prefill_s, 3),
                "steps_timed": steps,
                "median_step_ms": round(med * 1e3, 2),
                "mean_step_ms": round(total / steps.max(1) as f64 * 1e3, 2),
                "step_ms_per_image": round(med * 1e3 / n as f64, 3),
            });
            // With the request's KV cache still held.
            if let Some((used, _)) = janus_pipeline::device_memory(&opts.device) {
                row["device_memory_gb"] = json!(round(used as f64 / 1e9, 2));
            }
            eprintln!("{row}");
            Ok((job, row, prefill_s, total, med))
        };
        // The first n last, so its job is the one decoded and reported on top.
        let mut by_n = vec![json!(null)];
        for &n in &ns[1..] {
            by_n.push(timed(n)?.1);
        }
        let (job, row, prefill_s, total_steps_s, median_step) = timed(ns[0])?;
        by_n[0] = row;
        let steps = args.gen_steps.min(job.total_steps);
        // One image's grid through the VQ decoder (a fixed pseudo-random grid if not all
        // steps ran); the request's steps are shared by its n images.
        let grid: Vec<u32> = match &job.tokens {
            Some(tokens) => tokens[0].clone(),
            None => (0..job.total_steps as u32)
                .map(|i| (i * 7919) % 16384)
                .collect(),
        };
        // Cold, then warm (`--repeats`), as vision and prefill: the first decode also faults
        // in the allocator's pages for the decoder's activations (hundreds of MB), which a
        // serving process keeps.
        let vq_once = || -> Result<f64> {
            let t = Instant::now();
            m.decode(std::slice::from_ref(&grid))?;
            Ok(secs(t))
        };
        let vq_cold_s = vq_once()?;
        let (vq_s, vq_runs) = timed_runs(args.repeats, vq_once)?;
        let measured = steps == job.total_steps;
        let steps_s = if measured {
            total_steps_s
        } else {
            median_step * job.total_steps as f64
        };
        let per_image = (prefill_s + steps_s) / ns[0] as f64 + vq_s;
        out["generation"] = json!({
            "load_s": round(load_s, 3),
            "n": ns[0],
            "by_n": by_n,
            "prompt_tokens": job.prompt_tokens,
            "prefill_s": round(prefill_s, 3),
            "steps_timed": steps,
            "median_step_ms": round(median_step * 1e3, 2),
            "mean_step_ms": round(total_steps_s / steps.max(1) as f64 * 1e3, 2),
            "s_per_image": round(per_image, 2),
            "s_per_image_measured": measured,
        });
        out["vq_decode_s"] = json!(round(vq_s, 3));
        out["vq_decode_runs_s"] = json!(rounded(&vq_runs));
        out["vq_decode_cold_s"] = json!(round(vq_cold_s, 3));
        if let Some((_, total)) = janus_pipeline::device_memory(&opts.device) {
            out["device_memory_total_gb"] = json!(round(total as f64 / 1e9, 2));
        }
        let vq = &m.config().vq;
        let side = (job.total_steps as f64).sqrt() as usize;
        let vq_gf = 2.0 * vq.decoder_macs(side, side) as f64 / 1e9;
        out["vq_decode_gflop"] = json!(round(vq_gf, 1));
        out["vq_decode_gflop_per_s"] = json!(round(vq_gf / vq_s, 1));
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// GFLOP (2 × multiply-adds) of one image through the vision tower (patch embedding and the
/// blocks' matmuls, attention included) and of a `tokens`-long prefill through the LLM layers
/// (projections, MLP, causal attention; embedding, norms and the last position's logits not
/// counted).
fn gflop(cfg: &janus_pipeline::config::JanusConfig, tokens: usize) -> (f64, f64) {
    let v = &cfg.vision;
    let (n, w) = (v.num_patches(), v.width);
    let hid = (w as f64 * v.mlp_ratio) as usize;
    let patch = n * w * 3 * v.patch_size * v.patch_size;
    let vision = patch + v.layers * (n * (4 * w * w + 2 * w * hid) + 2 * n * n * w);
    let l = &cfg.llm;
    let h = l.hidden_size;
    let head_dim = h / l.num_attention_heads.max(1);
    let kv = l.num_key_value_heads.unwrap_or(l.num_attention_heads) * head_dim;
    let t = tokens;
    let per_layer = t * (2 * h * h + 2 * h * kv + 3 * h * l.intermediate_size) + t * (t + 1) * h;
    let prefill = l.num_hidden_layers * per_layer;
    (2.0 * vision as f64 / 1e9, 2.0 * prefill as f64 / 1e9)
}
