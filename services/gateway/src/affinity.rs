//! The affinity key of an understanding request: what every turn of one conversation shares.
//! A chat resends the whole conversation each turn, so its beginning — the system message if
//! any, the first other message and its images — is the same in every turn, and the replica
//! that answered turn 1 holds the prefix cache entries of the turns after it
//! ([`crate::pool::Balance::PrefixAffinity`]).

use crate::pool::AffinityKey;
use janus_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// SHA-256 over the conversation's beginning: each message up to and including the first one
/// that is not a system message (role, text, images), every field length-prefixed.
pub(crate) fn conversation_key(req: &pb::UnderstandRequest) -> AffinityKey {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for m in &req.messages {
        let role = m.role.trim().to_ascii_lowercase();
        field(role.as_bytes());
        field(m.content.as_bytes());
        for img in &m.images {
            field(&img.data);
        }
        if role != "system" {
            break;
        }
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str, image: &[u8]) -> pb::ChatMessage {
        pb::ChatMessage {
            role: role.into(),
            content: content.into(),
            images: if image.is_empty() {
                vec![]
            } else {
                vec![pb::Image {
                    data: image.to_vec().into(),
                    mime_type: String::new(),
                }]
            },
        }
    }

    fn req(messages: Vec<pb::ChatMessage>) -> pb::UnderstandRequest {
        pb::UnderstandRequest {
            messages,
            ..Default::default()
        }
    }

    #[test]
    fn the_turns_of_a_conversation_share_a_key_and_others_do_not() {
        let sys = msg("system", "Be brief.", b"");
        let q1 = msg("user", "<image_placeholder> What is it?", b"png-1");
        let turn1 = req(vec![sys.clone(), q1.clone()]);
        let turn3 = req(vec![
            sys.clone(),
            q1.clone(),
            msg("assistant", "A cat.", b""),
            msg("User", "And its colour?", b""),
        ]);
        let k = conversation_key(&turn1);
        assert_eq!(conversation_key(&turn3), k, "later turns");
        // Same text, another image; another question; another system prompt; no system prompt.
        let others = [
            req(vec![sys.clone(), msg("user", &q1.content, b"png-2")]),
            req(vec![sys.clone(), msg("user", "Describe it.", b"png-1")]),
            req(vec![msg("system", "Be long.", b""), q1.clone()]),
            req(vec![q1.clone()]),
        ];
        for (i, o) in others.iter().enumerate() {
            assert_ne!(conversation_key(o), k, "case {i}");
        }
        // Length prefixes: moving bytes between fields changes the key.
        assert_ne!(
            conversation_key(&req(vec![msg("user", "ab", b"c")])),
            conversation_key(&req(vec![msg("user", "a", b"bc")]))
        );
    }
}
