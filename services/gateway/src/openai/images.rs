//! `POST /v1/images/generations`: an OpenAI image request as a `janus.v1.GenerateRequest`,
//! and the Generate stream as `{created, data, usage}` or as image-streaming events
//! (`image_generation.partial_image`, `image_generation.completed`).
//!
//! Janus extensions: `cfg_weight`, `top_k`, `top_p`, `temperature`, `seed` (as in the proto);
//! `janus_progress: true` adds `event: janus.progress` events (`{type, step, total_steps}`) to a
//! stream, and partial images carry `janus_image_index`, `janus_step` and `janus_total_steps`
//! (extra fields OpenAI clients ignore).

use super::{seed, ApiError, Fields, FloatRange};
use base64::Engine as _;
use janus_proto::v1 as pb;
use serde_json::{json, Value};

/// Most partial images per image a stream may ask for (as OpenAI).
pub(crate) const MAX_PARTIAL_IMAGES: u32 = 3;

/// Most images per request the protocol allows (`n`; a server's `Info` may say fewer).
pub(crate) const MAX_IMAGES: u32 = 16;

/// Largest classifier-free guidance weight the generation service accepts.
pub(crate) const MAX_CFG_WEIGHT: f64 = 100.0;

/// A checked image request.
#[derive(Debug, Clone)]
pub(crate) struct ImagesRequest {
    pub model: Option<String>,
    size: Option<String>,
    pub stream: bool,
    pub partial_images: u32,
    pub janus_progress: bool,
    /// `png` or `jpeg`.
    pub output_format: &'static str,
    proto: pb::GenerateRequest,
}

impl TryFrom<&[u8]> for ImagesRequest {
    type Error = ApiError;

    fn try_from(body: &[u8]) -> Result<Self, ApiError> {
        let mut f = Fields::parse(body)?;
        let model = f.take::<String>("model", "a string")?;
        let prompt = f
            .take::<String>("prompt", "a string")?
            .ok_or_else(|| ApiError::invalid("prompt", "'prompt' is required"))?;
        if prompt.chars().all(char::is_whitespace) {
            return Err(ApiError::invalid(
                "prompt",
                "'prompt' is empty: describe the image to draw",
            ));
        }
        let n = f.int("n", 1, MAX_IMAGES.into())?.map(|n| n as u32);
        let size = f.take::<String>("size", "a string such as 384x384")?;
        match f.take::<String>("response_format", "a string")?.as_deref() {
            None | Some("b64_json") => {}
            Some("url") => {
                return Err(ApiError::unsupported(
                    "response_format",
                    "this server returns images only as b64_json (it stores no files to link to)",
                ))
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format",
                    format!("'{other}' is not a response format (b64_json)"),
                ))
            }
        }
        let (output_format, format) =
            match f.take::<String>("output_format", "a string")?.as_deref() {
                None | Some("png") => ("png", pb::OutputFormat::Png),
                Some("jpeg") | Some("jpg") => ("jpeg", pb::OutputFormat::Jpeg),
                Some(other) => {
                    return Err(ApiError::invalid(
                        "output_format",
                        format!("output format '{other}' is not supported (png, jpeg)"),
                    ))
                }
            };
        let stream = f.take::<bool>("stream", "a boolean")?.unwrap_or(false);
        let partial_images = f
            .int("partial_images", 0, MAX_PARTIAL_IMAGES.into())?
            .unwrap_or(0) as u32;
        let janus_progress = f
            .take::<bool>("janus_progress", "a boolean")?
            .unwrap_or(false);
        let proto = pb::GenerateRequest {
            prompt,
            n,
            cfg_weight: f.float(
                "cfg_weight",
                FloatRange {
                    min: 0.0,
                    min_exclusive: false,
                    max: MAX_CFG_WEIGHT,
                },
            )?,
            temperature: f.float("temperature", FloatRange::NON_NEGATIVE)?,
            top_k: f.int("top_k", 0, u32::MAX.into())?.map(|k| k as u32),
            top_p: f.float("top_p", FloatRange::MASS)?,
            seed: seed(&mut f)?,
            output_format: format as i32,
            preview_interval: 0,
            request_id: String::new(),
        };
        f.only(
            "quality",
            &[json!("auto"), json!("standard")],
            "one quality (auto)",
        )?;
        f.only(
            "background",
            &[json!("auto"), json!("opaque")],
            "images are opaque",
        )?;
        f.only("style", &[], "no styles")?;
        f.only(
            "output_compression",
            &[json!(100)],
            "fixed encoder settings",
        )?;
        f.finish(&["user", "moderation"])?;
        Ok(Self {
            model,
            size,
            stream,
            partial_images,
            janus_progress,
            output_format,
            proto,
        })
    }
}

/// The `size` of a square image.
pub(crate) fn size_name(side: u32) -> String {
    format!("{side}x{side}")
}

impl ImagesRequest {
    /// The size the images have: the requested one, which must be the model's.
    pub fn size(&self, side: u32) -> Result<String, ApiError> {
        let want = size_name(side);
        match self.size.as_deref() {
            None | Some("auto") => Ok(want),
            Some(s) if s == want => Ok(want),
            Some(s) => Err(ApiError::invalid(
                "size",
                format!("size '{s}' is not supported: this model draws {want} images only"),
            )),
        }
    }

    /// Checks the request against the served model's limits (`Info`), before any deadline.
    pub fn check_limits(&self, l: &pb::Limits) -> Result<(), ApiError> {
        let n = self.proto.n.unwrap_or(1);
        if l.max_images > 0 && n > l.max_images {
            return Err(ApiError::out_of_range(
                "n",
                format!(
                    "'n' is out of range: it must be an integer from 1 to {} (the server's limit), got {n}",
                    l.max_images
                ),
            ));
        }
        let bytes = self.proto.prompt.len();
        if l.max_prompt_bytes > 0 && bytes > l.max_prompt_bytes as usize {
            return Err(ApiError::invalid(
                "prompt",
                format!(
                    "'prompt' is {bytes} bytes, at most {} allowed",
                    l.max_prompt_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The protocol request; previews are asked for when the stream wants partial images:
    /// every `rows / (partial_images + 1)` token rows (rounded up), so at most
    /// `partial_images` previews per image (`image_tokens` from `Info`).
    pub fn to_proto(&self, image_tokens: u32) -> pb::GenerateRequest {
        let mut p = self.proto.clone();
        if self.stream && self.partial_images > 0 {
            let rows = (f64::from(image_tokens)).sqrt().round().max(1.0) as u32;
            p.preview_interval = rows.div_ceil(self.partial_images + 1).max(1);
        }
        p
    }
}

/// The OpenAI parameter of a generation field: the proto's names are OpenAI's.
pub(crate) fn param(field: &str) -> Option<String> {
    Some(field.split(['[', '.']).next().unwrap_or(field).to_string())
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// OpenAI's image `usage` (input: the prompt's text tokens; output: image tokens).
pub(crate) fn usage(u: Option<&pb::Usage>) -> Value {
    let u = u.cloned().unwrap_or_default();
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"text_tokens": u.prompt_tokens, "image_tokens": 0},
        "output_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// What the objects of one image response share.
#[derive(Debug, Clone)]
pub(crate) struct ImagesResponse {
    pub created: u64,
    pub size: String,
    pub output_format: &'static str,
}

impl ImagesResponse {
    /// The non-streaming response.
    pub fn full(&self, images: &[pb::GeneratedImage], usage_v: Value) -> Value {
        let data: Vec<Value> = images
            .iter()
            .map(
                |i| json!({"b64_json": b64(&i.data), "revised_prompt": null, "janus_seed": i.seed}),
            )
            .collect();
        json!({
            "created": self.created,
            "data": data,
            "background": "opaque",
            "output_format": self.output_format,
            "quality": "auto",
            "size": self.size,
            "usage": usage_v,
        })
    }

    /// `image_generation.partial_image`; `index` counts the partial images of one image.
    pub fn partial(&self, p: &pb::Preview, index: u32, total_steps: u32) -> Value {
        json!({
            "type": "image_generation.partial_image",
            "b64_json": b64(&p.png),
            "created_at": super::unix_now(),
            "size": self.size,
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
            "partial_image_index": index,
            "janus_image_index": p.index,
            "janus_step": p.step,
            "janus_total_steps": total_steps,
        })
    }

    /// `image_generation.completed` of one image.
    pub fn completed(&self, i: &pb::GeneratedImage, usage_v: Value) -> Value {
        json!({
            "type": "image_generation.completed",
            "b64_json": b64(&i.data),
            "created_at": super::unix_now(),
            "size": self.size,
            "quality": "auto",
            "background": "opaque",
            "output_format": self.output_format,
            "usage": usage_v,
            "janus_image_index": i.index,
            "janus_seed": i.seed,
        })
    }
}

/// `janus.progress` (only with `janus_progress: true`).
pub(crate) fn progress(p: &pb::Progress) -> Value {
    json!({"type": "janus.progress", "step": p.step, "total_steps": p.total_steps})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ImagesRequest, ApiError> {
        ImagesRequest::try_from(v.to_string().as_bytes())
    }

    #[test]
    fn requests_convert() {
        let r = parse(
            json!({"prompt": "a cat", "n": 2, "seed": 9, "cfg_weight": 3.5,
            "stream": true, "partial_images": 3, "size": "384x384", "response_format": "b64_json"}),
        )
        .unwrap();
        assert_eq!(r.size(384).unwrap(), "384x384");
        let p = r.to_proto(576);
        assert_eq!((p.n, p.seed, p.cfg_weight), (Some(2), Some(9), Some(3.5)));
        // 24 rows, 3 partial images: a preview every 6 rows (at 6, 12, 18).
        assert_eq!(p.preview_interval, 6);
        let plain = parse(json!({"prompt": "a cat"})).unwrap();
        assert_eq!(plain.to_proto(576).preview_interval, 0);
        assert_eq!(plain.output_format, "png");
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        for (body, p) in [
            (json!({}), "prompt"),
            (
                json!({"prompt": "x", "response_format": "url"}),
                "response_format",
            ),
            (
                json!({"prompt": "x", "partial_images": 4}),
                "partial_images",
            ),
            (
                json!({"prompt": "x", "output_format": "webp"}),
                "output_format",
            ),
            (json!({"prompt": "x", "style": "vivid"}), "style"),
            (json!({"prompt": "x", "n": "two"}), "n"),
            (json!({"prompt": "x", "n": 17}), "n"),
            (json!({"prompt": "x", "what": 1}), "what"),
            (json!({"prompt": ""}), "prompt"),
            (json!({"prompt": " \u{3000}\n"}), "prompt"),
            (json!({"prompt": "x", "cfg_weight": 101}), "cfg_weight"),
            (
                json!({"prompt": "x", "output_compression": 90}),
                "output_compression",
            ),
        ] {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(p), "{body}");
        }
        let e = parse(json!({"prompt": "x", "size": "1024x1024"}))
            .unwrap()
            .size(384)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("size"));
        assert!(e.message.contains("384x384"), "{}", e.message);
        parse(json!({"prompt": "x", "output_compression": 100.0})).unwrap();
        let limits = pb::Limits {
            max_images: 4,
            max_prompt_bytes: 8,
            ..Default::default()
        };
        let e = parse(json!({"prompt": "x", "n": 5}))
            .unwrap()
            .check_limits(&limits)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        assert!(e.message.contains("from 1 to 4"), "{}", e.message);
        let e = parse(json!({"prompt": "123456789"}))
            .unwrap()
            .check_limits(&limits)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        parse(json!({"prompt": "x", "n": 4}))
            .unwrap()
            .check_limits(&limits)
            .unwrap();
    }
}
