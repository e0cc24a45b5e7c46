//! Requests as the two model services validate them, up to (not including) the model:
//!
//! * raw bytes decoded as `UnderstandRequest` / `GenerateRequest` protobuf (what tonic hands
//!   the service), and structured requests built with `arbitrary` (roles, image tags, images
//!   picked from small valid ones or raw bytes, sampling values including NaN and infinities);
//! * then what `understand` / `generate` do before submitting: the request id, the adapter's
//!   conversion, `known_format` (generation), the engine's `prepare` (validation, image
//!   decoding and preprocessing, prompt rendering and tokenization) and the status mapping.
//!
//! Never a panic; every refusal an `InvalidArgument` naming a request field (an `Internal`
//! error for client input is a bug); an accepted request fits the context window.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use janus_engine::EngineError;
use janus_fuzz::{generation, seed_images, understanding};
use janus_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

#[derive(Debug, Arbitrary)]
enum Input {
    RawUnderstand(Vec<u8>),
    RawGenerate(Vec<u8>),
    Understand(Understand),
    Generate(Generate),
}

#[derive(Debug, Arbitrary)]
enum Role {
    System,
    User,
    Assistant,
    UserTag,
    AssistantTag,
    Shouting,
    Other(String),
}

impl Role {
    fn text(self) -> String {
        match self {
            Role::System => "system".into(),
            Role::User => "user".into(),
            Role::Assistant => "assistant".into(),
            Role::UserTag => "<|User|>".into(),
            Role::AssistantTag => " <|Assistant|> ".into(),
            Role::Shouting => "USER".into(),
            Role::Other(s) => s,
        }
    }
}

/// Strings of the template and tokenizer that text may contain.
const SPECIALS: &[&str] = &[
    "<image_placeholder>",
    "<|User|>",
    "<|Assistant|>",
    "<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<begin_of_image>",
    "<end_of_image>",
    "\n\n",
    ": ",
    "<image_",
    "placeholder>",
];

#[derive(Debug, Arbitrary)]
enum Piece {
    Text(String),
    Special(u8),
}

fn text(pieces: Vec<Piece>) -> String {
    let mut s = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => s.push_str(&t),
            Piece::Special(i) => s.push_str(SPECIALS[i as usize % SPECIALS.len()]),
        }
    }
    s
}

#[derive(Debug, Arbitrary)]
enum ImageData {
    Seed(u8),
    /// A seed with one byte changed.
    Flipped { seed: u8, at: u16, byte: u8 },
    /// A seed cut short.
    Truncated { seed: u8, keep: u16 },
    Raw(Vec<u8>),
}

impl ImageData {
    fn bytes(self) -> Vec<u8> {
        let seeds = seed_images();
        let pick = |i: u8| seeds[i as usize % seeds.len()].clone();
        match self {
            ImageData::Seed(i) => pick(i),
            ImageData::Flipped { seed, at, byte } => {
                let mut b = pick(seed);
                let n = b.len();
                b[at as usize % n] = byte;
                b
            }
            ImageData::Truncated { seed, keep } => {
                let mut b = pick(seed);
                b.truncate(keep as usize % (b.len() + 1));
                b
            }
            ImageData::Raw(b) => b,
        }
    }
}

#[derive(Debug, Arbitrary)]
enum Mime {
    None,
    Png,
    Jpeg,
    Jpg,
    Upper,
    Other(String),
}

#[derive(Debug, Arbitrary)]
struct ChatMessage {
    role: Role,
    content: Vec<Piece>,
    images: Vec<(ImageData, Mime)>,
}

#[derive(Debug, Arbitrary)]
struct Sampling {
    max_new_tokens: Option<u32>,
    min_new_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<u32>,
    repetition_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Vec<String>,
}

#[derive(Debug, Arbitrary)]
struct Understand {
    messages: Vec<ChatMessage>,
    sampling: Option<Sampling>,
    request_id: String,
}

impl Understand {
    fn proto(self) -> pb::UnderstandRequest {
        pb::UnderstandRequest {
            messages: self
                .messages
                .into_iter()
                .map(|m| pb::ChatMessage {
                    role: m.role.text(),
                    content: text(m.content),
                    images: m
                        .images
                        .into_iter()
                        .map(|(data, mime)| pb::Image {
                            data: data.bytes().into(),
                            mime_type: match mime {
                                Mime::None => String::new(),
                                Mime::Png => "image/png".into(),
                                Mime::Jpeg => "image/jpeg".into(),
                                Mime::Jpg => "image/jpg".into(),
                                Mime::Upper => " IMAGE/PNG ".into(),
                                Mime::Other(s) => s,
                            },
                        })
                        .collect(),
                })
                .collect(),
            sampling: self.sampling.map(|s| pb::SamplingParams {
                max_new_tokens: s.max_new_tokens,
                min_new_tokens: s.min_new_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                repetition_penalty: s.repetition_penalty,
                seed: s.seed,
                stop: s.stop,
            }),
            request_id: self.request_id,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Generate {
    prompt: Vec<Piece>,
    n: Option<u32>,
    cfg_weight: Option<f32>,
    temperature: Option<f32>,
    top_k: Option<u32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    output_format: i32,
    preview_interval: u32,
    request_id: String,
}

impl Generate {
    fn proto(self) -> pb::GenerateRequest {
        pb::GenerateRequest {
            prompt: text(self.prompt),
            n: self.n,
            cfg_weight: self.cfg_weight,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
            output_format: self.output_format % 5,
            preview_interval: self.preview_interval,
            request_id: self.request_id,
        }
    }
}

/// What both services do with the request id: keep a valid one, replace anything else.
fn check_request_id(body: &str) {
    let id = janus_service::meta::request_id(body, &tonic::metadata::MetadataMap::new());
    assert!(janus_service::meta::valid_request_id(&id), "request id {id:?}");
}

/// A refusal must be a client error naming a request field, and map to INVALID_ARGUMENT.
fn check_refusal(e: &EngineError, fields: &[&str]) {
    match e {
        EngineError::InvalidArgument { field, reason } => {
            assert!(
                fields.iter().any(|f| field.starts_with(f)),
                "refusal names no request field: {field:?} ({reason})"
            );
            assert!(!reason.is_empty());
        }
        other => panic!("client input gave a non-client error: {other}"),
    }
    let status = janus_model_service::status::to_status(e);
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

fn understand(req: pb::UnderstandRequest) {
    check_request_id(&req.request_id);
    let engine = understanding();
    let input = janus_understanding::adapter::input(req);
    match engine.prepare(input) {
        Ok(ticket) => {
            assert!(ticket.prompt_tokens() <= engine.model().context());
        }
        Err(e) => check_refusal(&e, &["messages", "sampling."]),
    }
}

fn generate(req: pb::GenerateRequest) {
    check_request_id(&req.request_id);
    let engine = generation();
    if !janus_generation::adapter::known_format(req.output_format) {
        return; // The service refuses it with INVALID_ARGUMENT output_format.
    }
    let input = janus_generation::adapter::input(req);
    match engine.prepare(input) {
        Ok(ticket) => {
            let p = ticket.params();
            assert!((1..=janus_pipeline::generation::MAX_IMAGES).contains(&p.n));
        }
        Err(e) => check_refusal(
            &e,
            &["prompt", "n", "cfg_weight", "temperature", "top_k", "top_p"],
        ),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    match input {
        Input::RawUnderstand(b) => {
            if let Ok(req) = pb::UnderstandRequest::decode(b.as_slice()) {
                understand(req);
            }
        }
        Input::RawGenerate(b) => {
            if let Ok(req) = pb::GenerateRequest::decode(b.as_slice()) {
                generate(req);
            }
        }
        Input::Understand(u) => understand(u.proto()),
        Input::Generate(g) => generate(g.proto()),
    }
});
