//! A request checked, its images decoded and its conversation tokenized, before it is queued.

use super::*;
use crate::control::guarded;
use crate::error::{EngineError, Result};
use janus_pipeline::{prompt::IMAGE_TAG, Message, Role, SamplingParams};

fn sampling_field(f: &str) -> String {
    match f {
        "prompt" | "messages" => "messages".to_string(),
        "images" => "messages[].images".to_string(),
        f if f.starts_with("images[") => format!("messages[].{f}"),
        f => format!("sampling.{f}"),
    }
}

impl UnderstandingEngine {
    /// Validates a request, decodes its images and tokenizes it. CPU-bound: call it from a
    /// blocking pool, not an async worker. Runs in a `preprocess` span, a child of the current
    /// span (enter the request's span around the call on a blocking thread).
    ///
    /// Checked here: the server's limits (text bytes, `max_new_tokens`, stop strings) and the
    /// wire's structure (roles, each message's tags against its images, mime types). The
    /// sampling settings, the conversation's shape and the context bound are the pipeline's
    /// checks, run once: [`UnderstandingModel::check`](janus_pipeline::UnderstandingModel::check)
    /// before any image is decoded, the exact ones in `prepare_checked` after.
    pub fn prepare(&self, input: UnderstandInput) -> Result<UnderstandTicket> {
        let _span = tracing::info_span!("preprocess").entered();
        let cfg = &self.config;
        let text: usize = input.messages.iter().map(|m| m.content.len()).sum();
        if text > cfg.max_prompt_bytes {
            return Err(EngineError::invalid(
                "messages",
                format!(
                    "{text} bytes of message text, at most {} allowed",
                    cfg.max_prompt_bytes
                ),
            ));
        }
        let s = &input.sampling;
        let max_new_tokens = match s.max_new_tokens {
            None => cfg.default_max_new_tokens.min(cfg.max_new_tokens_limit),
            Some(n) if n as usize > cfg.max_new_tokens_limit => {
                return Err(EngineError::invalid(
                    "sampling.max_new_tokens",
                    format!(
                        "{n} is over the server limit of {}",
                        cfg.max_new_tokens_limit
                    ),
                ))
            }
            Some(n) => n as usize,
        };
        if s.stop.len() > cfg.max_stop_strings {
            return Err(EngineError::invalid(
                "sampling.stop",
                format!(
                    "{} stop strings, at most {} allowed",
                    s.stop.len(),
                    cfg.max_stop_strings
                ),
            ));
        }
        let params = SamplingParams {
            max_new_tokens,
            min_new_tokens: s.min_new_tokens.unwrap_or(0) as usize,
            temperature: s.temperature.unwrap_or(0.0),
            top_k: s.top_k.unwrap_or(0) as usize,
            top_p: s.top_p.unwrap_or(1.0),
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            seed: s.seed.unwrap_or_else(crate::random_seed),
            stop: s.stop.clone(),
        };
        // Roles, and the cheap checks that must come before any image is decoded.
        let mut messages = Vec::with_capacity(input.messages.len());
        let mut images = 0usize;
        let mut system: Option<usize> = None;
        for (i, m) in input.messages.iter().enumerate() {
            let role = Role::parse(&m.role).ok_or_else(|| {
                EngineError::invalid(
                    format!("messages[{i}].role"),
                    format!(
                        "unknown role '{}' (system, user or assistant, any letter case)",
                        m.role
                    ),
                )
            })?;
            if role == Role::System {
                if let Some(first) = system {
                    return Err(EngineError::invalid(
                        format!("messages[{i}].role"),
                        format!("a second system message (messages[{first}] is one; at most one)"),
                    ));
                }
                system = Some(i);
            }
            // Each message's images fill that message's own placeholders, in order.
            let tags = m.content.matches(IMAGE_TAG).count();
            if tags != m.images.len() {
                return Err(EngineError::invalid(
                    format!("messages[{i}].images"),
                    format!(
                        "message {i} has {tags} {IMAGE_TAG} tag(s) but {} image(s)",
                        m.images.len()
                    ),
                ));
            }
            images += m.images.len();
            messages.push(Message {
                role,
                content: m.content.clone(),
            });
        }
        // The pipeline's own checks that need no image, before any image is decoded.
        let checked = self
            .model
            .check(messages, images, params)
            .map_err(|e| EngineError::from_pipeline(e, sampling_field))?;

        // Images in the order the template writes their tags: the system message comes first.
        let mut decoded = Vec::with_capacity(images);
        let order = system
            .into_iter()
            .chain((0..input.messages.len()).filter(|&i| Some(i) != system));
        for i in order {
            let m = &input.messages[i];
            for (j, img) in m.images.iter().enumerate() {
                let field = || format!("messages[{i}].images[{j}]");
                let mime = img.mime_type.trim().to_ascii_lowercase();
                if !matches!(mime.as_str(), "" | "image/png" | "image/jpeg" | "image/jpg") {
                    return Err(EngineError::invalid(
                        format!("{}.mime_type", field()),
                        format!(
                            "'{}' is not supported (image/png, image/jpeg)",
                            img.mime_type
                        ),
                    ));
                }
                let rgb = janus_pipeline::decode_rgb(&img.data, &cfg.image_limits)
                    .map_err(|e| EngineError::invalid(field(), e.to_string()))?;
                decoded.push(rgb);
            }
        }
        let mut prepared = guarded("prepare", || self.model.prepare_checked(checked, &decoded))
            .map_err(|e| match e {
                EngineError::InvalidArgument { field, reason } => {
                    EngineError::invalid(sampling_field(&field), reason)
                }
                other => other,
            })?;
        prepared.scope = input.scope.clone();
        Ok(UnderstandTicket { prepared })
    }
}
