//! `POST /v1/chat/completions`: an OpenAI chat request as a `janus.v1.UnderstandRequest`, and
//! the Understand stream as a `chat.completion` or `chat.completion.chunk`s.
//!
//! Content parts become one message content: text parts as they are, each `image_url` part as
//! an `<image_placeholder>` tag with its image attached, parts joined by newlines. `system` and
//! `developer` messages are the proto's system prompt. `temperature` absent means the server's
//! default (greedy), not OpenAI's 1.

use super::{seed, typed, ApiError, Fields, FloatRange};
use base64::Engine as _;
use janus_proto::v1 as pb;
use serde_json::{json, Value};

/// The tag that marks an image's place in a message's content.
const IMAGE_TAG: &str = "<image_placeholder>";

/// Where an `image_url` part's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ImageSource {
    /// A `data:` URI, decoded.
    Inline { data: Vec<u8>, mime: String },
    /// An `http(s)` URL, fetched by the gateway when the operator allows its host.
    Remote(String),
}

/// One `image_url` part.
#[derive(Debug, Clone)]
pub(crate) struct ImagePart {
    /// Where the part stands: `messages[message].content[part]`.
    pub message: usize,
    pub part: usize,
    pub source: ImageSource,
}

impl ImagePart {
    /// The OpenAI parameter of this part's URL.
    pub fn param(&self) -> String {
        format!(
            "messages[{}].content[{}].image_url",
            self.message, self.part
        )
    }
}

#[derive(Debug, Clone)]
enum Part {
    Text(String),
    /// Index into [`ChatRequest::images`].
    Image(usize),
}

#[derive(Debug, Clone)]
struct Message {
    role: String,
    parts: Vec<Part>,
}

/// A checked chat request.
#[derive(Debug, Clone)]
pub(crate) struct ChatRequest {
    pub model: Option<String>,
    messages: Vec<Message>,
    /// Every image part; remote ones are resolved to [`ImageSource::Inline`] before the
    /// request is converted.
    pub images: Vec<ImagePart>,
    sampling: pb::SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub params: ChatParams,
}

/// Translates the proto field names in `janus-field` back to this request's parameters.
#[derive(Debug, Clone, Default)]
pub(crate) struct ChatParams {
    /// `max_tokens` or `max_completion_tokens`, whichever the request used.
    max_tokens: &'static str,
    /// (message, image index within the message, content part) of each image.
    images: Vec<(usize, usize, usize)>,
}

/// `messages[i]` and the rest of a field path.
fn message_index(field: &str) -> Option<(usize, &str)> {
    let rest = field.strip_prefix("messages[")?;
    let (i, rest) = rest.split_once(']')?;
    Some((i.parse().ok()?, rest))
}

impl ChatParams {
    /// The OpenAI parameter of a proto field path (`sampling.top_p` → `top_p`,
    /// `messages[1].images[0]` → `messages[1].content[2].image_url`).
    pub fn param(&self, field: &str) -> Option<String> {
        if let Some(s) = field.strip_prefix("sampling.") {
            let name = s.split(['[', '.']).next().unwrap_or(s);
            return Some(
                match name {
                    "max_new_tokens" => self.max_tokens,
                    "min_new_tokens" => "min_tokens",
                    other => other,
                }
                .to_string(),
            );
        }
        if let Some((i, rest)) = message_index(field) {
            if let Some(img) = rest.strip_prefix(".images[") {
                let j: Option<usize> = img.split(']').next().and_then(|j| j.parse().ok());
                if let Some(&(_, _, k)) = self
                    .images
                    .iter()
                    .find(|(m, n, _)| *m == i && Some(*n) == j)
                {
                    return Some(format!("messages[{i}].content[{k}].image_url"));
                }
            }
            if rest.starts_with(".images") {
                return Some(format!("messages[{i}].content"));
            }
            return Some(field.to_string());
        }
        if field.starts_with("messages") || field == "prompt" {
            return Some("messages".into());
        }
        Some(field.to_string())
    }
}

/// Decodes a `data:image/png;base64,...` URI.
fn data_uri(url: &str, param: &str) -> Result<ImageSource, ApiError> {
    let rest = &url["data:".len()..];
    let (meta, payload) = rest.split_once(',').ok_or_else(|| {
        ApiError::invalid(
            param,
            "malformed data URI: expected data:image/png;base64,...",
        )
    })?;
    let mut it = meta.split(';');
    let mime = it.next().unwrap_or("").trim().to_ascii_lowercase();
    if !it.any(|p| p.trim().eq_ignore_ascii_case("base64")) {
        return Err(ApiError::invalid(
            param,
            "data URIs must be base64-encoded (data:image/png;base64,...)",
        ));
    }
    let mime = match mime.as_str() {
        "image/png" => "image/png",
        "image/jpeg" | "image/jpg" => "image/jpeg",
        other => {
            return Err(ApiError::invalid(
                param,
                format!("image type '{other}' is not supported: image/png or image/jpeg"),
            ))
        }
    };
    let compact: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let data = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| ApiError::invalid(param, format!("invalid base64 in the data URI: {e}")))?;
    if data.is_empty() {
        return Err(ApiError::invalid(param, "the data URI holds no bytes"));
    }
    Ok(ImageSource::Inline {
        data,
        mime: mime.to_string(),
    })
}

/// An `image_url` part's URL as an image source.
fn image_source(url: &str, param: &str) -> Result<ImageSource, ApiError> {
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("data:") {
        data_uri(url, param)
    } else if lower.starts_with("http://") || lower.starts_with("https://") {
        Ok(ImageSource::Remote(url.to_string()))
    } else {
        Err(ApiError::invalid(
            param,
            "image_url.url must be a data: URI (data:image/png;base64,...) or an http(s) URL",
        ))
    }
}

fn parse_parts(
    i: usize,
    parts: Vec<Value>,
    images: &mut Vec<ImagePart>,
) -> Result<Vec<Part>, ApiError> {
    let mut out = Vec::with_capacity(parts.len());
    for (k, p) in parts.into_iter().enumerate() {
        let param = format!("messages[{i}].content[{k}]");
        let Value::Object(mut p) = p else {
            return Err(ApiError::invalid(param, "a content part must be an object"));
        };
        let kind = p
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        match kind.as_str() {
            "text" => {
                let text = p.remove("text").unwrap_or(Value::Null);
                let text: String = typed(text, &format!("{param}.text"), "a string")?;
                no_image_tag(&text, &format!("{param}.text"))?;
                out.push(Part::Text(text));
            }
            "image_url" => {
                let v = p.remove("image_url").unwrap_or(Value::Null);
                let url = match v {
                    Value::String(s) => s,
                    Value::Object(mut o) => {
                        match o.get("detail") {
                            None | Some(Value::Null) => {}
                            Some(Value::String(d))
                                if matches!(d.as_str(), "auto" | "low" | "high") => {}
                            Some(_) => {
                                return Err(ApiError::invalid(
                                    format!("{param}.image_url.detail"),
                                    "detail must be auto, low or high",
                                ))
                            }
                        }
                        typed(
                            o.remove("url").unwrap_or(Value::Null),
                            &format!("{param}.image_url.url"),
                            "a string",
                        )?
                    }
                    other => {
                        return Err(ApiError::invalid(
                            format!("{param}.image_url"),
                            format!(
                                "image_url must be an object with a url, got {}",
                                super::type_name(&other)
                            ),
                        ))
                    }
                };
                let source = image_source(&url, &format!("{param}.image_url"))?;
                out.push(Part::Image(images.len()));
                images.push(ImagePart {
                    message: i,
                    part: k,
                    source,
                });
            }
            "" => {
                return Err(ApiError::invalid(
                    format!("{param}.type"),
                    "a content part needs a type",
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{param}.type"),
                    format!("content part type '{other}' is not supported (text, image_url)"),
                ))
            }
        }
    }
    Ok(out)
}

fn parse_messages(v: Value, images: &mut Vec<ImagePart>) -> Result<Vec<Message>, ApiError> {
    let Value::Array(list) = v else {
        return Err(ApiError::invalid("messages", "'messages' must be an array"));
    };
    if list.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "'messages' must not be empty",
        ));
    }
    let mut out = Vec::with_capacity(list.len());
    let mut system: Option<usize> = None;
    for (i, m) in list.into_iter().enumerate() {
        let Value::Object(mut m) = m else {
            return Err(ApiError::invalid(
                format!("messages[{i}]"),
                "a message must be an object",
            ));
        };
        let role: String = typed(
            m.remove("role").unwrap_or(Value::Null),
            &format!("messages[{i}].role"),
            "a string",
        )?;
        let role = match role.as_str() {
            "developer" | "system" => {
                if let Some(first) = system {
                    return Err(ApiError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "a second system or developer message (messages[{first}] is one; at most one)"
                        ),
                    ));
                }
                system = Some(i);
                "system".to_string()
            }
            "user" | "assistant" => role,
            "tool" | "function" => {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].role"),
                    "tool and function messages need tools, which this model does not have",
                ))
            }
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].role"),
                    format!("unknown role '{other}' (system, developer, user or assistant)"),
                ))
            }
        };
        for key in ["tool_calls", "function_call", "audio"] {
            if m.get(key).is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(
                    &format!("messages[{i}].{key}"),
                    "this model answers with text only",
                ));
            }
        }
        let parts = match m.remove("content").unwrap_or(Value::Null) {
            Value::Null => Vec::new(),
            Value::String(s) => {
                no_image_tag(&s, &format!("messages[{i}].content"))?;
                vec![Part::Text(s)]
            }
            Value::Array(parts) => parse_parts(i, parts, images)?,
            other => {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content"),
                    format!(
                        "content must be a string or an array of parts, got {}",
                        super::type_name(&other)
                    ),
                ))
            }
        };
        out.push(Message { role, parts });
    }
    if !out.iter().any(|m| m.role == "user") {
        return Err(ApiError::invalid(
            "messages",
            "the conversation has no user message",
        ));
    }
    Ok(out)
}

/// Text may not hold the tag that marks an image's place: images are `image_url` parts.
fn no_image_tag(text: &str, param: &str) -> Result<(), ApiError> {
    if text.contains(IMAGE_TAG) {
        return Err(ApiError::invalid(
            param,
            format!("text must not contain {IMAGE_TAG}: send images as image_url parts"),
        ));
    }
    Ok(())
}

impl TryFrom<&[u8]> for ChatRequest {
    type Error = ApiError;

    /// Parses and checks a request body (images are decoded, remote ones not fetched yet).
    fn try_from(body: &[u8]) -> Result<Self, ApiError> {
        let mut f = Fields::parse(body)?;
        let model = f.take::<String>("model", "a string")?;
        let mut images = Vec::new();
        let messages = match f.raw("messages") {
            Some(v) => parse_messages(v, &mut images)?,
            None => return Err(ApiError::invalid("messages", "'messages' is required")),
        };
        let u32_max = u64::from(u32::MAX);
        let max_completion = f.int("max_completion_tokens", 1, u32_max)?;
        let max_tokens = f.int("max_tokens", 1, u32_max)?;
        let (max_new_tokens, max_param) = match (max_completion, max_tokens) {
            (Some(n), _) => (Some(n as u32), "max_completion_tokens"),
            (None, Some(n)) => (Some(n as u32), "max_tokens"),
            (None, None) => (None, "max_tokens"),
        };
        let stop = match f.raw("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s],
            Some(v) => typed::<Vec<String>>(v, "stop", "a string or an array of strings")?,
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "stop strings must not be empty"));
        }
        let min_new_tokens = f.int("min_tokens", 0, u32_max)?.map(|n| n as u32);
        if let (Some(min), Some(max)) = (min_new_tokens, max_new_tokens) {
            if min > max {
                return Err(ApiError::invalid(
                    "min_tokens",
                    format!("'min_tokens' ({min}) is larger than '{max_param}' ({max})"),
                ));
            }
        }
        let sampling = pb::SamplingParams {
            max_new_tokens,
            min_new_tokens,
            temperature: f.float("temperature", FloatRange::NON_NEGATIVE)?,
            top_p: f.float("top_p", FloatRange::MASS)?,
            top_k: f.int("top_k", 0, u32_max)?.map(|k| k as u32),
            repetition_penalty: f.float("repetition_penalty", FloatRange::POSITIVE)?,
            seed: seed(&mut f)?,
            stop,
        };
        let stream = f.take::<bool>("stream", "a boolean")?.unwrap_or(false);
        let include_usage = match f.raw("stream_options") {
            None => false,
            Some(Value::Object(mut o)) => {
                let v = o.remove("include_usage").unwrap_or(Value::Null);
                let v: Option<bool> = typed(v, "stream_options.include_usage", "a boolean")?;
                v.unwrap_or(false)
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    "stream_options",
                    "'stream_options' must be an object",
                ))
            }
        };
        f.only("n", &[Value::from(1)], "one choice per request (n = 1)")?;
        for key in ["frequency_penalty", "presence_penalty"] {
            f.only(
                key,
                &[Value::from(0), Value::from(0.0)],
                "use repetition_penalty",
            )?;
        }
        f.only(
            "logprobs",
            &[Value::Bool(false)],
            "log probabilities are not returned",
        )?;
        f.only(
            "top_logprobs",
            &[Value::from(0)],
            "log probabilities are not returned",
        )?;
        f.only("logit_bias", &[json!({})], "logit bias is not supported")?;
        f.only(
            "response_format",
            &[json!({"type": "text"})],
            "answers are plain text",
        )?;
        f.only("modalities", &[json!(["text"])], "answers are text")?;
        f.only("tool_choice", &[json!("none")], "this model has no tools")?;
        for key in [
            "tools",
            "functions",
            "function_call",
            "audio",
            "prediction",
            "web_search_options",
            "reasoning_effort",
        ] {
            if f.raw(key).is_some() {
                return Err(ApiError::unsupported(key, "not available with this model"));
            }
        }
        f.finish(&[
            "user",
            "metadata",
            "store",
            "service_tier",
            "parallel_tool_calls",
            "safety_identifier",
            "prompt_cache_key",
        ])?;
        let mut per_message = std::collections::HashMap::<usize, usize>::new();
        let params = ChatParams {
            max_tokens: max_param,
            images: images
                .iter()
                .map(|p| {
                    let n = per_message.entry(p.message).or_insert(0);
                    *n += 1;
                    (p.message, *n - 1, p.part)
                })
                .collect(),
        };
        Ok(Self {
            model,
            messages,
            images,
            sampling,
            stream,
            include_usage,
            params,
        })
    }
}

impl ChatRequest {
    /// Checks the request against the served model's limits (`Info`), the checks the
    /// understanding service makes before it tokenizes, so that they come before any deadline.
    pub fn check_limits(&self, l: &pb::Limits) -> Result<(), ApiError> {
        let s = &self.sampling;
        let max_param = self.params.max_tokens;
        if l.max_new_tokens > 0 {
            if let Some(n) = s.max_new_tokens.filter(|&n| n > l.max_new_tokens) {
                return Err(ApiError::out_of_range(
                    max_param,
                    format!(
                        "'{max_param}' is out of range: it must be an integer from 1 to {} (the server's limit), got {n}",
                        l.max_new_tokens
                    ),
                ));
            }
        }
        let max = s.max_new_tokens.unwrap_or(if l.max_new_tokens > 0 {
            l.default_max_new_tokens.min(l.max_new_tokens)
        } else {
            l.default_max_new_tokens
        });
        if let Some(min) = s.min_new_tokens.filter(|&m| m > max && max > 0) {
            return Err(ApiError::invalid(
                "min_tokens",
                format!("'min_tokens' ({min}) is larger than the {max} new tokens the answer may have ('{max_param}')"),
            ));
        }
        if l.max_stop_strings > 0 && s.stop.len() > l.max_stop_strings as usize {
            return Err(ApiError::invalid(
                "stop",
                format!(
                    "{} stop strings, at most {} allowed",
                    s.stop.len(),
                    l.max_stop_strings
                ),
            ));
        }
        let text: usize = self.messages.iter().map(Message::content_len).sum();
        if l.max_prompt_bytes > 0 && text > l.max_prompt_bytes as usize {
            return Err(ApiError::invalid(
                "messages",
                format!(
                    "{text} bytes of message text, at most {} allowed",
                    l.max_prompt_bytes
                ),
            ));
        }
        if l.context_window > 0 && l.tokens_per_input_image > 0 {
            let per_image = l.tokens_per_input_image as usize + 2;
            let need = self.images.len() * per_image + max as usize;
            if need > l.context_window as usize {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "{} image(s) of {per_image} tokens plus {max} new tokens exceed the context window of {} tokens",
                        self.images.len(),
                        l.context_window
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Message {
    /// Bytes of the message's content as the protocol carries it (parts joined by newlines,
    /// each image as its tag).
    fn content_len(&self) -> usize {
        let parts: usize = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => t.len(),
                Part::Image(_) => IMAGE_TAG.len(),
            })
            .sum();
        parts + self.parts.len().saturating_sub(1)
    }
}

impl From<ChatRequest> for pb::UnderstandRequest {
    /// Images still [`ImageSource::Remote`] are sent empty (the service refuses them): the
    /// handler fetches them first.
    fn from(r: ChatRequest) -> Self {
        let mut images: Vec<Option<pb::Image>> = r
            .images
            .into_iter()
            .map(|p| match p.source {
                ImageSource::Inline { data, mime } => Some(pb::Image {
                    data: data.into(),
                    mime_type: mime,
                }),
                ImageSource::Remote(_) => Some(pb::Image::default()),
            })
            .collect();
        let messages = r
            .messages
            .into_iter()
            .map(|m| {
                let mut content = Vec::with_capacity(m.parts.len());
                let mut attached = Vec::new();
                for p in m.parts {
                    match p {
                        Part::Text(t) => content.push(t),
                        Part::Image(i) => {
                            content.push(IMAGE_TAG.to_string());
                            attached.extend(images.get_mut(i).and_then(Option::take));
                        }
                    }
                }
                pb::ChatMessage {
                    role: m.role,
                    content: content.join("\n"),
                    images: attached,
                }
            })
            .collect();
        pb::UnderstandRequest {
            messages,
            sampling: Some(r.sampling),
            request_id: String::new(),
        }
    }
}

/// OpenAI's `finish_reason` of a final message; `None` when the server cancelled the request
/// (shutdown), which OpenAI has no reason for.
pub(crate) fn finish_reason(f: &pb::UnderstandFinal) -> Option<&'static str> {
    match pb::FinishReason::try_from(f.finish_reason) {
        Ok(pb::FinishReason::Length) => Some("length"),
        Ok(pb::FinishReason::Cancelled) => None,
        _ => Some("stop"),
    }
}

/// `usage` of a final message.
pub(crate) fn usage(u: Option<&pb::Usage>) -> Value {
    let u = u.cloned().unwrap_or_default();
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

/// What every object of one completion shares.
#[derive(Debug, Clone)]
pub(crate) struct Completion {
    pub id: String,
    pub created: u64,
    pub model: String,
}

impl Completion {
    /// `chat.completion`.
    pub fn full(&self, text: &str, finish: &str, usage_v: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish,
            }],
            "usage": usage_v,
        })
    }

    /// `chat.completion.chunk` with one choice; with `include_usage`, `"usage": null`.
    pub fn chunk(&self, delta: Value, finish: Option<&str>, include_usage: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The last chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage_v: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": [],
            "usage": usage_v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<ChatRequest, ApiError> {
        ChatRequest::try_from(v.to_string().as_bytes())
    }

    const PNG_1PX: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";

    #[test]
    fn parts_become_tagged_content() {
        let r = parse(json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG_1PX}")}},
                    {"type": "text", "text": "what?"}
                ]}
            ],
            "max_completion_tokens": 7, "stop": "x", "seed": 3, "temperature": 0.5,
            "stream": true, "stream_options": {"include_usage": true}, "user": "u1"
        }))
        .unwrap();
        assert!(r.stream && r.include_usage);
        assert_eq!(
            r.params.param("sampling.max_new_tokens").unwrap(),
            "max_completion_tokens"
        );
        assert_eq!(
            r.params.param("messages[1].images[0]").unwrap(),
            "messages[1].content[1].image_url"
        );
        assert_eq!(
            r.params.param("messages[1].images").unwrap(),
            "messages[1].content"
        );
        assert_eq!(r.params.param("sampling.stop[0]").unwrap(), "stop");
        let p: pb::UnderstandRequest = r.into();
        assert_eq!(p.messages[0].role, "system");
        assert_eq!(p.messages[1].content, "look\n<image_placeholder>\nwhat?");
        assert_eq!(p.messages[1].images.len(), 1);
        assert_eq!(p.messages[1].images[0].mime_type, "image/png");
        let s = p.sampling.unwrap();
        assert_eq!(
            (s.max_new_tokens, s.seed, s.stop),
            (Some(7), Some(3), vec!["x".to_string()])
        );
    }

    #[test]
    fn bad_requests_name_the_parameter() {
        let cases = [
            (json!({"messages": []}), "messages"),
            (json!({}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "n": 2}),
                "n",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "tools": []}),
                "tools",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true}),
                "logprobs",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "seed": -4}),
                "seed",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}),
                "bogus",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "hi"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}),
                "messages[0].content[0].image_url",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/gif;base64,AAAA"}}]}]}),
                "messages[0].content[0].image_url",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]}),
                "messages[0].content[0].image_url",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": 5}]}),
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "User", "content": "hi"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": "hi"}]}),
                "messages",
            ),
            (
                json!({"messages": [{"role": "system", "content": "a"}, {"role": "system", "content": "b"},
                                    {"role": "user", "content": "hi"}]}),
                "messages[1].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [
                    {"type": "text", "text": "<image_placeholder>"}]}]}),
                "messages[0].content[0].text",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url",
                    "image_url": {"url": format!("data:image/png;base64,{PNG_1PX}"), "detail": 5}}]}]}),
                "messages[0].content[0].image_url.detail",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}),
                "stop",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
                "max_tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0}),
                "repetition_penalty",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 3,
                       "max_completion_tokens": 2, "max_tokens": 9}),
                "min_tokens",
            ),
        ];
        for (body, param) in cases {
            let e = parse(body.clone()).unwrap_err();
            assert_eq!(e.status, 400, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
        let r = parse(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]}))
        .unwrap();
        assert_eq!(
            r.images[0].source,
            ImageSource::Remote("https://example.com/a.png".into())
        );
    }

    #[test]
    fn limits_of_the_served_model() {
        let limits = pb::Limits {
            max_new_tokens: 32,
            default_max_new_tokens: 512,
            max_stop_strings: 2,
            max_prompt_bytes: 20,
            context_window: 600,
            tokens_per_input_image: 576,
            ..Default::default()
        };
        let img = json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PNG_1PX}")}});
        for (body, param, words) in [
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 33}),
                "max_tokens",
                "from 1 to 32 (the server's limit), got 33",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "min_tokens": 33}),
                "min_tokens",
                "larger than the 32 new tokens",
            ),
            (
                json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c"]}),
                "stop",
                "at most 2",
            ),
            (
                json!({"messages": [{"role": "user", "content": "a".repeat(21)}]}),
                "messages",
                "21 bytes of message text, at most 20",
            ),
            (
                json!({"messages": [{"role": "user", "content": [img]}], "max_tokens": 30}),
                "messages",
                "exceed the context window of 600",
            ),
        ] {
            let e = parse(body.clone())
                .unwrap()
                .check_limits(&limits)
                .unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert!(e.message.contains(words), "{body}: {}", e.message);
        }
        let ok = json!({"messages": [{"role": "user", "content": [img]}], "max_tokens": 20});
        parse(ok).unwrap().check_limits(&limits).unwrap();
    }

    #[test]
    fn chunks_have_openai_shapes() {
        let c = Completion {
            id: "chatcmpl-1".into(),
            created: 5,
            model: "m".into(),
        };
        let full = c.full(
            "hi",
            "stop",
            usage(Some(&pb::Usage {
                prompt_tokens: 3,
                completion_tokens: 2,
                cached_tokens: 1,
            })),
        );
        assert_eq!(full["choices"][0]["message"]["content"], "hi");
        assert_eq!(full["usage"]["total_tokens"], 5);
        assert_eq!(full["usage"]["prompt_tokens_details"]["cached_tokens"], 1);
        let ch = c.chunk(json!({"content": "a"}), None, true);
        assert_eq!(ch["object"], "chat.completion.chunk");
        assert!(ch["usage"].is_null() && ch.get("usage").is_some());
        assert_eq!(c.usage_chunk(json!({})).get("choices").unwrap(), &json!([]));
    }
}
