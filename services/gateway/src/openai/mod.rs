//! The OpenAI wire protocol of the gateway's HTTP port, private to the gateway: request bodies
//! parsed and checked into types that convert to `janus.v1` requests (`TryFrom`/`From`), and
//! `janus.v1` responses converted back into OpenAI's JSON shapes. Nothing here touches a
//! transport or a model: `crate::http` moves the bytes and calls the gateway.

pub(crate) mod chat;
pub(crate) mod error;
pub(crate) mod images;
pub(crate) mod models;

pub(crate) use error::ApiError;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Seconds since the Unix epoch (`created` fields).
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A JSON request body taken apart field by field, so that every error names its parameter.
pub(crate) struct Fields {
    obj: Map<String, Value>,
}

/// The JSON type name of a value, for messages.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Fields {
    /// Parses a body that must be a JSON object.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::bad_body(format!(
                "We could not parse the JSON body of your request: {e}"
            ))
        })?;
        match v {
            Value::Object(obj) => Ok(Self { obj }),
            other => Err(ApiError::bad_body(format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ))),
        }
    }

    /// Removes `key`; `null` counts as absent.
    pub fn raw(&mut self, key: &str) -> Option<Value> {
        self.obj.remove(key).filter(|v| !v.is_null())
    }

    /// Removes `key` and reads it as `T` (`what` describes the expected type).
    pub fn take<T: DeserializeOwned>(
        &mut self,
        key: &str,
        what: &str,
    ) -> Result<Option<T>, ApiError> {
        self.raw(key).map(|v| typed(v, key, what)).transpose()
    }

    /// Removes `key`, which must be absent or equal to one of `allowed` (defaults this server
    /// implements); anything else is a 400 naming it.
    pub fn only(&mut self, key: &str, allowed: &[Value], why: &str) -> Result<(), ApiError> {
        match self.raw(key) {
            Some(v) if !allowed.contains(&v) => Err(ApiError::unsupported(key, why)),
            _ => Ok(()),
        }
    }

    /// Ends parsing: `ignored` keys are dropped, any other key left is unrecognized.
    pub fn finish(mut self, ignored: &[&str]) -> Result<(), ApiError> {
        for k in ignored {
            self.obj.remove(*k);
        }
        match self.obj.keys().next() {
            Some(k) => Err(ApiError::unrecognized(k)),
            None => Ok(()),
        }
    }
}

/// Reads a JSON value as `T`; the error names `param` and the expected type.
pub(crate) fn typed<T: DeserializeOwned>(v: Value, param: &str, what: &str) -> Result<T, ApiError> {
    let got = type_name(&v);
    let shown = match &v {
        Value::Number(n) => format!(" ({n})"),
        _ => String::new(),
    };
    serde_json::from_value(v).map_err(|_| {
        ApiError::invalid(param, format!("'{param}' must be {what}, got {got}{shown}"))
    })
}

/// A non-negative seed as the protocol's u64.
pub(crate) fn seed(f: &mut Fields) -> Result<Option<u64>, ApiError> {
    let Some(v) = f.take::<i128>("seed", "an integer")? else {
        return Ok(None);
    };
    u64::try_from(v)
        .map(Some)
        .map_err(|_| ApiError::invalid("seed", format!("'seed' must be in 0..=2^64-1, got {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_their_parameter() {
        let mut f = Fields::parse(br#"{"a": 1, "b": "x", "c": null, "d": 2, "seed": -1}"#).unwrap();
        assert_eq!(f.take::<u32>("a", "an integer").unwrap(), Some(1));
        let e = f.take::<u32>("b", "an integer").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("b"));
        assert!(
            e.message.contains("must be an integer, got a string"),
            "{}",
            e.message
        );
        assert_eq!(f.take::<u32>("c", "an integer").unwrap(), None);
        assert_eq!(seed(&mut f).unwrap_err().param.as_deref(), Some("seed"));
        let e = f.finish(&[]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("d"));
        assert!(Fields::parse(b"[1]").is_err());
        assert!(Fields::parse(b"{").is_err());
        let mut f = Fields::parse(br#"{"n": 2}"#).unwrap();
        let e = f.only("n", &[Value::from(1)], "one choice").unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
    }
}
