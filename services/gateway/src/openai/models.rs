//! `GET /v1/models` and `GET /v1/models/{id}`: the model ids the backends report in `Info`
//! (their `--model` value), in OpenAI's list shape.

use serde_json::{json, Value};

/// Who a model id belongs to: the organisation of a hub id (`deepseek-ai/Janus-Pro-7B`),
/// `janus` for a local directory.
fn owner(id: &str) -> &str {
    match id.split_once('/') {
        Some((org, name))
            if !org.is_empty()
                && !name.contains('/')
                && !matches!(org, "." | "..")
                && !id.starts_with('/') =>
        {
            org
        }
        _ => "janus",
    }
}

/// One `model` object.
pub(crate) fn model(id: &str, created: u64) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": owner(id)})
}

/// The `list` of models.
pub(crate) fn list(ids: &[String], created: u64) -> Value {
    let data: Vec<Value> = ids.iter().map(|id| model(id, created)).collect();
    json!({"object": "list", "data": data})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_owners() {
        let l = list(&["deepseek-ai/Janus-Pro-7B".into(), "/models/x".into()], 7);
        assert_eq!(l["object"], "list");
        assert_eq!(l["data"][0]["owned_by"], "deepseek-ai");
        assert_eq!(l["data"][1]["owned_by"], "janus");
        assert_eq!(
            model("tests/fixtures/janus-tiny/model", 1)["owned_by"],
            "janus"
        );
        assert_eq!(l["data"][0]["object"], "model");
    }
}
