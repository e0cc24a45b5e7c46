//! Tokenizer, special ids and the `deepseek` SFT template (`janus/utils/conversation.py`,
//! `VLChatProcessor`).

use crate::error::{Error, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// The system prompt `VLChatProcessor` uses for understanding.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";

/// The tag that stands for one image in message text.
pub const IMAGE_TAG: &str = "<image_placeholder>";

/// Who speaks a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Replaces the default system prompt.
    System,
    /// `<|User|>`.
    User,
    /// `<|Assistant|>`.
    Assistant,
}

impl Role {
    /// The role string the template writes.
    pub fn tag(self) -> &'static str {
        match self {
            Role::System => "",
            Role::User => "<|User|>",
            Role::Assistant => "<|Assistant|>",
        }
    }

    /// Parses `system`/`user`/`assistant` (and the template tags themselves).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "system" | "System" => Some(Role::System),
            "user" | "User" | "<|User|>" => Some(Role::User),
            "assistant" | "Assistant" | "<|Assistant|>" => Some(Role::Assistant),
            _ => None,
        }
    }
}

/// One turn of a conversation; its text may contain `<image_placeholder>` tags.
#[derive(Debug, Clone)]
pub struct Message {
    /// Speaker.
    pub role: Role,
    /// Text.
    pub content: String,
}

/// Renders the `deepseek` template: system prompt, then `role: text` turns separated by
/// `"\n\n"` after user turns and `<｜end▁of▁sentence｜>` after assistant turns, ending with an
/// open `<|Assistant|>:` turn. A conversation that ends with a user turn gets that open turn.
pub fn render(messages: &[Message], default_system: &str) -> String {
    let system = messages
        .iter()
        .find(|m| m.role == Role::System)
        .map(|m| m.content.trim().to_string())
        .unwrap_or_else(|| default_system.to_string());
    let mut turns: Vec<(Role, &str)> = messages
        .iter()
        .filter(|m| m.role != Role::System)
        .map(|m| (m.role, m.content.trim()))
        .collect();
    if turns.last().map(|t| t.0) != Some(Role::Assistant)
        || !turns.last().is_some_and(|t| t.1.is_empty())
    {
        turns.push((Role::Assistant, ""));
    }
    let seps = ["\n\n", "<｜end▁of▁sentence｜>"];
    let mut out = String::new();
    if !system.is_empty() {
        out.push_str(&system);
        out.push_str("\n\n");
    }
    for (i, (role, text)) in turns.iter().enumerate() {
        if text.is_empty() {
            out.push_str(role.tag());
            out.push(':');
        } else {
            out.push_str(role.tag());
            out.push_str(": ");
            out.push_str(text);
            out.push_str(seps[i % 2]);
        }
    }
    out.trim().to_string()
}

/// The text-to-image prompt: user turn, open assistant turn, `<begin_of_image>`; no system prompt.
pub fn render_generation(prompt: &str) -> String {
    let body = render(
        &[Message {
            role: Role::User,
            content: prompt.to_string(),
        }],
        "",
    );
    format!("{body}<begin_of_image>")
}

/// Special token ids, looked up by string (they differ between checkpoints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `<｜begin▁of▁sentence｜>`.
    pub bos: u32,
    /// `<｜end▁of▁sentence｜>`.
    pub eos: u32,
    /// `<｜▁pad▁｜>`: left padding and the CFG unconditional rows.
    pub pad: u32,
    /// `<image_placeholder>`.
    pub image: u32,
    /// `<begin_of_image>`.
    pub boi: u32,
    /// `<end_of_image>`.
    pub eoi: u32,
}

/// The tokenizer plus what `tokenizer_config.json` says about BOS.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    /// Special ids.
    pub ids: SpecialIds,
    add_bos: bool,
}

#[derive(serde::Deserialize, Default)]
struct TokenizerConfig {
    #[serde(default = "yes")]
    add_bos_token: bool,
    #[serde(default)]
    bos_token: Option<serde_json::Value>,
    #[serde(default)]
    eos_token: Option<serde_json::Value>,
}

fn yes() -> bool {
    true
}

fn token_str(v: &Option<serde_json::Value>, default: &str) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or(default)
            .to_string(),
        _ => default.to_string(),
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: "tokenizer",
            });
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let cfg: TokenizerConfig = match std::fs::read_to_string(dir.join("tokenizer_config.json"))
        {
            Ok(t) => serde_json::from_str(&t).map_err(|e| Error::Config {
                file: "tokenizer_config.json".into(),
                reason: e.to_string(),
            })?,
            Err(_) => TokenizerConfig {
                add_bos_token: true,
                ..Default::default()
            },
        };
        Self::new(
            tokenizer,
            cfg.add_bos_token,
            &token_str(&cfg.bos_token, "<｜begin▁of▁sentence｜>"),
            &token_str(&cfg.eos_token, "<｜end▁of▁sentence｜>"),
        )
    }

    fn new(tokenizer: Tokenizer, add_bos: bool, bos: &str, eos: &str) -> Result<Self> {
        let id = |s: &str| {
            tokenizer.token_to_id(s).ok_or_else(|| {
                Error::Tokenizer(format!("special token {s} is not in the vocabulary"))
            })
        };
        let ids = SpecialIds {
            bos: id(bos)?,
            eos: id(eos)?,
            pad: id("<｜▁pad▁｜>")?,
            image: id(IMAGE_TAG)?,
            boi: id("<begin_of_image>")?,
            eoi: id("<end_of_image>")?,
        };
        Ok(Self {
            tokenizer,
            ids,
            add_bos,
        })
    }

    /// Token ids of `text`, with BOS first when the tokenizer config asks for it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if self.add_bos {
            ids.push(self.ids.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids`, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Largest token id + 1 (including added tokens).
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Understanding input: each `<image_placeholder>` token becomes `<begin_of_image>`,
    /// `image_tokens` placeholders, `<end_of_image>`. Returns the ids and how many images they hold.
    pub fn encode_understanding(
        &self,
        prompt: &str,
        image_tokens: usize,
    ) -> Result<(Vec<u32>, usize)> {
        let ids = self.encode(prompt)?;
        let mut out = Vec::with_capacity(ids.len());
        let mut images = 0;
        for id in ids {
            if id == self.ids.image {
                images += 1;
                out.push(self.ids.boi);
                out.extend(std::iter::repeat_n(self.ids.image, image_tokens));
                out.push(self.ids.eoi);
            } else {
                out.push(id);
            }
        }
        Ok((out, images))
    }

    /// CFG rows for a generation prompt: conditional ids, and the unconditional copy with every
    /// token but the first (BOS) and the last (`<begin_of_image>`) replaced by the pad id.
    pub fn encode_generation(&self, prompt: &str) -> Result<(Vec<u32>, Vec<u32>)> {
        let cond = self.encode(&render_generation(prompt))?;
        let mut uncond = cond.clone();
        let n = uncond.len();
        if n >= 2 {
            for t in &mut uncond[1..n - 1] {
                *t = self.ids.pad;
            }
        }
        Ok((cond, uncond))
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(role: Role, c: &str) -> Message {
        Message {
            role,
            content: c.into(),
        }
    }

    #[test]
    fn single_turn_with_default_system() {
        let p = render(
            &[
                m(Role::User, "<image_placeholder>\nWhat?"),
                m(Role::Assistant, ""),
            ],
            DEFAULT_SYSTEM_PROMPT,
        );
        assert_eq!(
            p,
            format!(
                "{DEFAULT_SYSTEM_PROMPT}\n\n<|User|>: <image_placeholder>\nWhat?\n\n<|Assistant|>:"
            )
        );
        // A conversation ending with the user turn gets the same open assistant turn.
        let q = render(
            &[m(Role::User, "<image_placeholder>\nWhat?")],
            DEFAULT_SYSTEM_PROMPT,
        );
        assert_eq!(p, q);
    }

    #[test]
    fn multi_turn_and_system_override() {
        let p = render(
            &[
                m(Role::System, "Be brief."),
                m(Role::User, "Hi"),
                m(Role::Assistant, "Hello."),
                m(Role::User, "More?"),
            ],
            DEFAULT_SYSTEM_PROMPT,
        );
        assert_eq!(p, "Be brief.\n\n<|User|>: Hi\n\n<|Assistant|>: Hello.<｜end▁of▁sentence｜><|User|>: More?\n\n<|Assistant|>:");
    }

    #[test]
    fn generation_prompt() {
        assert_eq!(
            render_generation(" a cat "),
            "<|User|>: a cat\n\n<|Assistant|>:<begin_of_image>"
        );
    }
}
