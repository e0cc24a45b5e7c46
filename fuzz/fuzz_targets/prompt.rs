//! Prompt rendering and tokenization with the tiny checkpoint's tokenizer: the `deepseek`
//! template (`prompt::render`), `encode_conversation` with image placeholder expansion and
//! `encode_generation` (CFG rows), in both tokenizer modes (message text as plain text, the
//! default, and the reference's special-tokens-in-text).
//!
//! Invariants beyond "no panic":
//! * the images the ids hold equal the `<image_placeholder>` tags in the rendered text (what
//!   the engine counted per message), and each expands to BOI + `image_tokens` + EOI;
//! * with plain text (the default), message text cannot forge special tokens: the special
//!   ids of a conversation are exactly those of the same conversation with its text replaced
//!   by harmless text (same roles, same image tags, same empty/non-empty turns);
//! * generation: conditional and unconditional rows have equal length, start with BOS, end
//!   with `<begin_of_image>`, and with plain text hold no other special tokens than the template's.
#![no_main]

use std::collections::HashSet;

use arbitrary::{Arbitrary, Unstructured};
use janus_fuzz::tokenizers;
use janus_pipeline::prompt::{render, render_generation, TextTokenizer, DEFAULT_SYSTEM_PROMPT, IMAGE_TAG};
use janus_pipeline::{Message, Role};
use libfuzzer_sys::fuzz_target;

const SPECIALS: &[&str] = &[
    IMAGE_TAG,
    "<|User|>",
    "<|Assistant|>",
    "<｜end▁of▁sentence｜>",
    "<｜begin▁of▁sentence｜>",
    "<｜▁pad▁｜>",
    "<begin_of_image>",
    "<end_of_image>",
    "<patch_placeholder>",
    "<|ref|>",
    "<|grounding|>",
    "\n\n",
    ": ",
    " ",
    "<image_",
    "placeholder>",
    "<|",
    "|>",
    "｜",
    "▁",
];

#[derive(Debug, Arbitrary)]
enum Piece {
    Text(String),
    Special(u8),
}

#[derive(Debug, Arbitrary)]
struct Turn {
    /// A role name as a client sends it (parsed with `Role::parse`), or one of the three.
    role: Result<u8, String>,
    text: Vec<Piece>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    special_in_text: bool,
    image_tokens: u8,
    turns: Vec<Turn>,
    generation: Vec<Piece>,
}

fn text(pieces: &[Piece]) -> String {
    let mut s = String::new();
    for p in pieces {
        match p {
            Piece::Text(t) => s.push_str(t),
            Piece::Special(i) => s.push_str(SPECIALS[*i as usize % SPECIALS.len()]),
        }
    }
    s
}

/// The same message with its text replaced by harmless text: image tags and whether it is
/// empty once trimmed (which the template depends on) are kept.
fn harmless(m: &Message) -> Message {
    let content = if m.content.trim().is_empty() {
        String::new()
    } else {
        m.content
            .split(IMAGE_TAG)
            .map(|_| "x")
            .collect::<Vec<_>>()
            .join(IMAGE_TAG)
    };
    Message {
        role: m.role,
        content,
    }
}

/// Ids of the tokenizer's added (special) tokens.
fn special_ids(tok: &TextTokenizer) -> HashSet<u32> {
    tok.inner().get_added_tokens_decoder().keys().copied().collect()
}

fn specials_of(ids: &[u32], set: &HashSet<u32>) -> Vec<u32> {
    ids.iter().copied().filter(|i| set.contains(i)).collect()
}

fn check_conversation(tok: &TextTokenizer, messages: &[Message], image_tokens: usize) {
    let rendered = render(messages, DEFAULT_SYSTEM_PROMPT);
    let tags = rendered.matches(IMAGE_TAG).count();
    let (ids, images) = tok
        .encode_conversation(messages, DEFAULT_SYSTEM_PROMPT, image_tokens)
        .expect("encode_conversation");
    assert_eq!(
        images, tags,
        "the ids hold {images} image(s) but the rendered prompt has {tags} tag(s): {rendered:?}"
    );
    // Every image is BOI, image_tokens placeholders, EOI, in that order.
    let mut i = 0;
    let mut seen = 0;
    while i < ids.len() {
        if ids[i] == tok.ids.image && (image_tokens > 0) {
            assert!(i > 0 && ids[i - 1] == tok.ids.boi, "placeholder run without BOI");
            let run = ids[i..].iter().take_while(|&&t| t == tok.ids.image).count();
            assert_eq!(run % image_tokens, 0, "placeholder run of {run}");
            seen += run / image_tokens;
            i += run;
            continue;
        }
        i += 1;
    }
    if image_tokens > 0 {
        assert_eq!(seen, images);
    }
    if !tok.special_tokens_in_text() {
        let plain: Vec<Message> = messages.iter().map(harmless).collect();
        let (plain_ids, plain_images) = tok
            .encode_conversation(&plain, DEFAULT_SYSTEM_PROMPT, image_tokens)
            .expect("encode_conversation");
        assert_eq!(plain_images, images);
        let set = special_ids(tok);
        assert_eq!(
            specials_of(&ids, &set),
            specials_of(&plain_ids, &set),
            "message text changed the special tokens: {rendered:?}"
        );
    }
}

fn check_generation(tok: &TextTokenizer, prompt: &str) {
    let (cond, uncond) = tok.encode_generation(prompt).expect("encode_generation");
    assert_eq!(cond.len(), uncond.len());
    assert!(cond.len() >= 2);
    assert_eq!(cond[0], tok.ids.bos);
    assert_eq!(uncond[0], tok.ids.bos);
    assert_eq!(*cond.last().unwrap(), tok.ids.boi);
    assert_eq!(*uncond.last().unwrap(), tok.ids.boi);
    assert!(uncond[1..uncond.len() - 1].iter().all(|&t| t == tok.ids.pad));
    let rendered = render_generation(prompt);
    assert!(rendered.ends_with("<begin_of_image>"));
    if !tok.special_tokens_in_text() {
        let set = special_ids(tok);
        let user = tok.inner().token_to_id("<|User|>").unwrap();
        let assistant = tok.inner().token_to_id("<|Assistant|>").unwrap();
        assert_eq!(
            specials_of(&cond, &set),
            vec![tok.ids.bos, user, assistant, tok.ids.boi],
            "prompt text became special tokens: {prompt:?}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let tok = &tokenizers()[input.special_in_text as usize];
    let messages: Vec<Message> = input
        .turns
        .iter()
        .filter_map(|t| {
            let role = match &t.role {
                Ok(i) => [Role::System, Role::User, Role::Assistant][*i as usize % 3],
                Err(s) => Role::parse(s)?,
            };
            Some(Message {
                role,
                content: text(&t.text),
            })
        })
        .collect();
    // Production sizes are the vision tower's patches (576); small counts keep runs fast.
    let image_tokens = input.image_tokens as usize % 40;
    check_conversation(tok, &messages, image_tokens);
    check_generation(tok, &text(&input.generation));
});
