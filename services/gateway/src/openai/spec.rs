//! The OpenAPI document of the HTTP port (`GET /openapi.json`): `assets/openapi.json` with
//! what this server accepts filled in, so that the document describes this server exactly: the
//! served models' limits from their `Info` (`max_tokens` and the other token counts up to
//! `--max-new-tokens-limit`, stop strings per request, images per request, the image size) and
//! whether `image_url` may be an http(s) URL (`--image-fetch-hosts`). A half whose `Info` is
//! unavailable keeps the asset's values (the protocol's bounds).

use super::images::size_name;
use janus_proto::v1 as pb;
use serde_json::{json, Value};

/// Where the filled-in values live in the asset.
const CHAT: &str = "/components/schemas/ChatCompletionRequest/properties";
const IMAGES: &str = "/components/schemas/ImageRequest/properties";
const IMAGE_URL: &str = "/components/schemas/ImageUrlString";
/// `stop`'s array alternative.
const STOP_ARRAY: &str = "/components/schemas/ChatCompletionRequest/properties/stop/anyOf/1";

/// An inline image URL: a base64 PNG or JPEG data URI.
pub(crate) const DATA_URI_PATTERN: &str = "^data:image/(png|jpeg|jpg);base64,";
/// An inline image URL or an http(s) URL (fetched when its host is allowed).
pub(crate) const DATA_OR_HTTP_PATTERN: &str = "^(data:image/(png|jpeg|jpg);base64,|https?://)";

fn set(doc: &mut Value, pointer: &str, key: &str, v: Value) {
    if let Some(Value::Object(o)) = doc.pointer_mut(pointer) {
        o.insert(key.to_string(), v);
    }
}

/// The document for a server whose understanding and generation limits are `und` and `gen`
/// (`None`: unknown) and which fetches remote images when `fetch`.
pub(crate) fn document(
    base: &Value,
    und: Option<&pb::Limits>,
    gen: Option<&pb::Limits>,
    fetch: bool,
) -> Value {
    let mut d = base.clone();
    if let Some(l) = und {
        if l.max_new_tokens > 0 {
            for p in ["max_tokens", "max_completion_tokens", "min_tokens"] {
                set(
                    &mut d,
                    &format!("{CHAT}/{p}"),
                    "maximum",
                    json!(l.max_new_tokens),
                );
            }
        }
        if l.max_stop_strings > 0 {
            set(&mut d, STOP_ARRAY, "maxItems", json!(l.max_stop_strings));
        }
    }
    if let Some(l) = gen {
        if l.max_images > 0 {
            set(
                &mut d,
                &format!("{IMAGES}/n"),
                "maximum",
                json!(l.max_images),
            );
        }
        if l.image_size > 0 {
            set(
                &mut d,
                &format!("{IMAGES}/size"),
                "enum",
                json!([size_name(l.image_size), "auto", null]),
            );
        }
    }
    let pattern = if fetch {
        DATA_OR_HTTP_PATTERN
    } else {
        DATA_URI_PATTERN
    };
    set(&mut d, IMAGE_URL, "pattern", json!(pattern));
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_filled_in() {
        let base: Value = serde_json::from_str(include_str!("../../assets/openapi.json")).unwrap();
        for p in [
            format!("{CHAT}/max_tokens/maximum"),
            format!("{CHAT}/max_completion_tokens/maximum"),
            format!("{CHAT}/min_tokens/maximum"),
            format!("{STOP_ARRAY}/maxItems"),
            format!("{IMAGES}/n/maximum"),
            format!("{IMAGES}/size/enum"),
            format!("{IMAGE_URL}/pattern"),
        ] {
            assert!(base.pointer(&p).is_some(), "{p} missing from openapi.json");
        }
        assert_eq!(
            base.pointer(&format!("{IMAGE_URL}/pattern")),
            Some(&json!(DATA_URI_PATTERN)),
            "the asset describes the default: no remote images"
        );
        let und = pb::Limits {
            max_new_tokens: 32,
            max_stop_strings: 4,
            ..Default::default()
        };
        let gen = pb::Limits {
            max_images: 8,
            image_size: 256,
            ..Default::default()
        };
        let d = document(&base, Some(&und), Some(&gen), true);
        assert_eq!(
            d.pointer(&format!("{CHAT}/max_tokens/maximum")),
            Some(&json!(32))
        );
        assert_eq!(
            d.pointer(&format!("{CHAT}/min_tokens/maximum")),
            Some(&json!(32))
        );
        assert_eq!(
            d.pointer(&format!("{STOP_ARRAY}/maxItems")),
            Some(&json!(4))
        );
        assert_eq!(d.pointer(&format!("{IMAGES}/n/maximum")), Some(&json!(8)));
        assert_eq!(
            d.pointer(&format!("{IMAGES}/size/enum")),
            Some(&json!(["256x256", "auto", null]))
        );
        assert_eq!(
            d.pointer(&format!("{IMAGE_URL}/pattern")),
            Some(&json!(DATA_OR_HTTP_PATTERN))
        );
        // Unknown limits keep the asset's values.
        assert_eq!(document(&base, None, None, false), base);
    }
}
