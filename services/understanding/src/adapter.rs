//! Protocol ⇄ domain conversions of the understanding service (private to this crate).

use janus_engine::{
    Finish, InputImage, InputMessage, SamplingInput, UnderstandEvent, UnderstandInput,
};
use janus_proto::v1 as pb;
use janus_proto::v1::understand_response::Event;
use janus_service::ms;

/// A request as engine input (validation happens in the engine).
pub fn input(req: pb::UnderstandRequest) -> UnderstandInput {
    let s = req.sampling.unwrap_or_default();
    UnderstandInput {
        messages: req
            .messages
            .into_iter()
            .map(|m| InputMessage {
                role: m.role,
                content: m.content,
                images: m
                    .images
                    .into_iter()
                    .map(|i| InputImage {
                        data: i.data,
                        mime_type: i.mime_type,
                    })
                    .collect(),
            })
            .collect(),
        sampling: SamplingInput {
            max_new_tokens: s.max_new_tokens,
            min_new_tokens: s.min_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            top_k: s.top_k,
            repetition_penalty: s.repetition_penalty,
            seed: s.seed,
            stop: s.stop,
        },
        scope: Default::default(),
    }
}

fn finish_reason(f: Finish) -> pb::FinishReason {
    match f {
        Finish::Eos => pb::FinishReason::Eos,
        Finish::Length => pb::FinishReason::Length,
        Finish::Stop => pb::FinishReason::Stop,
        Finish::Cancelled => pb::FinishReason::Cancelled,
    }
}

/// An engine event as a stream message.
pub(crate) fn event(e: UnderstandEvent, request_id: &str) -> pb::UnderstandResponse {
    let event = match e {
        UnderstandEvent::Token { id, text, index } => Event::Token(pb::TokenDelta {
            token_id: id,
            text,
            index,
        }),
        UnderstandEvent::Finished {
            reason,
            prompt_tokens,
            cached_tokens,
            completion_tokens,
            timings,
        } => Event::Final(pb::UnderstandFinal {
            finish_reason: finish_reason(reason) as i32,
            usage: Some(pb::Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: completion_tokens as u32,
                cached_tokens: cached_tokens as u32,
            }),
            timings: Some(pb::UnderstandTimings {
                queue_ms: ms(timings.queue),
                vision_ms: ms(timings.vision),
                prefill_ms: ms(timings.prefill),
                decode_ms: ms(timings.decode),
                total_ms: ms(timings.total),
            }),
            request_id: request_id.to_string(),
        }),
    };
    pb::UnderstandResponse { event: Some(event) }
}
