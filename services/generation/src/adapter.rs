//! Protocol ⇄ domain conversions of the generation service (private to this crate).

use janus_engine::{GenerateEvent, GenerateInput, OutputFormat};
use janus_proto::v1 as pb;
use janus_proto::v1::generate_response::Event;
use janus_service::ms;

/// A request as engine input (validation happens in the engine).
pub fn input(req: pb::GenerateRequest) -> GenerateInput {
    let format = match pb::OutputFormat::try_from(req.output_format) {
        Ok(pb::OutputFormat::Jpeg) => OutputFormat::Jpeg,
        Ok(pb::OutputFormat::TokensOnly) => OutputFormat::TokensOnly,
        _ => OutputFormat::Png,
    };
    GenerateInput {
        prompt: req.prompt,
        n: req.n,
        cfg_weight: req.cfg_weight,
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
        seed: req.seed,
        format,
        preview_interval: req.preview_interval,
        scope: Default::default(),
    }
}

/// True when `output_format` holds a value this protocol version defines.
pub fn known_format(v: i32) -> bool {
    pb::OutputFormat::try_from(v).is_ok()
}

/// An engine event as a stream message.
pub(crate) fn event(e: GenerateEvent, request_id: &str) -> pb::GenerateResponse {
    let event = match e {
        GenerateEvent::Progress { step, total } => Event::Progress(pb::Progress {
            step,
            total_steps: total,
        }),
        GenerateEvent::Preview {
            index,
            step,
            png,
            width,
            height,
        } => Event::Preview(pb::Preview {
            index,
            step,
            png: png.into(),
            width,
            height,
        }),
        GenerateEvent::Image {
            index,
            data,
            mime_type,
            seed,
            tokens,
            width,
            height,
        } => Event::Image(pb::GeneratedImage {
            index,
            data: data.into(),
            mime_type: mime_type.to_string(),
            seed,
            tokens,
            width,
            height,
        }),
        GenerateEvent::Finished {
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            timings,
        } => Event::Final(pb::GenerateFinal {
            usage: Some(pb::Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: completion_tokens as u32,
                cached_tokens: cached_tokens as u32,
            }),
            timings: Some(pb::GenerateTimings {
                queue_ms: ms(timings.queue),
                prefill_ms: ms(timings.prefill),
                decode_ms: ms(timings.decode),
                vq_decode_ms: ms(timings.vq_decode),
                encode_ms: ms(timings.encode),
                preview_ms: ms(timings.preview),
                total_ms: ms(timings.total),
            }),
            request_id: request_id.to_string(),
        }),
    };
    pb::GenerateResponse { event: Some(event) }
}
