//! The OpenAI wire protocol of the gateway's HTTP port, private to the gateway: request bodies
//! parsed and checked into types that convert to `janus.v1` requests (`TryFrom`/`From`), and
//! `janus.v1` responses converted back into OpenAI's JSON shapes. Nothing here touches a
//! transport or a model: `crate::http` moves the bytes and calls the gateway.

pub(crate) mod chat;
pub(crate) mod error;
pub(crate) mod images;
pub(crate) mod models;
pub(crate) mod spec;

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
            ApiError::invalid_json(format!(
                "We could not parse the JSON body of your request: {e}"
            ))
        })?;
        match v {
            Value::Object(obj) => Ok(Self { obj }),
            other => Err(ApiError::invalid_json(format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ))),
        }
    }

    /// Removes `key` and reads it as an integer in `lo..=hi` (see [`integer`]).
    pub fn int(&mut self, key: &str, lo: u64, hi: u64) -> Result<Option<u64>, ApiError> {
        self.raw(key).map(|v| integer(&v, key, lo, hi)).transpose()
    }

    /// Removes `key` and reads it as a number for the protocol's `f32` (see [`float`]).
    pub fn float(&mut self, key: &str, range: FloatRange) -> Result<Option<f32>, ApiError> {
        self.raw(key).map(|v| float(&v, key, range)).transpose()
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
            Some(v) if !allowed.iter().any(|a| same_value(a, &v)) => {
                Err(ApiError::unsupported(key, why))
            }
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

/// Equal JSON values, numbers compared by value (`1` equals `1.0`, as in JSON Schema).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Reads an integer in `lo..=hi`: a JSON number without a fraction (`1e3` is 1000, as JSON
/// Schema counts integers). Another type or a fraction is "must be an integer"; an integer
/// outside the range is [`ApiError::out_of_range`] naming the range.
pub(crate) fn integer(v: &Value, param: &str, lo: u64, hi: u64) -> Result<u64, ApiError> {
    let range = || format!("an integer from {lo} to {hi}");
    let Value::Number(n) = v else {
        return Err(ApiError::invalid(
            param,
            format!("'{param}' must be {}, got {}", range(), type_name(v)),
        ));
    };
    let exact: Option<i128> = if let Some(u) = n.as_u64() {
        Some(i128::from(u))
    } else if let Some(i) = n.as_i64() {
        Some(i128::from(i))
    } else {
        n.as_f64()
            .filter(|f| f.is_finite() && f.fract() == 0.0 && f.abs() < 1e38)
            .map(|f| f as i128)
    };
    let integral = exact.is_some() || n.as_f64().is_some_and(|f| f.fract() == 0.0);
    if !integral {
        return Err(ApiError::invalid(
            param,
            format!("'{param}' must be {}, got {n}", range()),
        ));
    }
    let shown = exact.map_or_else(|| n.to_string(), |i| i.to_string());
    match exact {
        Some(i) if i >= i128::from(lo) && i <= i128::from(hi) => Ok(i as u64),
        _ => Err(ApiError::out_of_range(
            param,
            format!(
                "'{param}' is out of range: it must be {}, got {shown}",
                range()
            ),
        )),
    }
}

/// The range of a number parameter: at least `min` (more than `min` when `min_exclusive`), at
/// most `max`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FloatRange {
    pub min: f64,
    pub min_exclusive: bool,
    pub max: f64,
}

impl FloatRange {
    /// `[0, f32::MAX]`: any non-negative number the protocol's `f32` holds.
    pub const NON_NEGATIVE: Self = Self {
        min: 0.0,
        min_exclusive: false,
        max: f32::MAX as f64,
    };
    /// `(0, f32::MAX]`.
    pub const POSITIVE: Self = Self {
        min: 0.0,
        min_exclusive: true,
        max: f32::MAX as f64,
    };
    /// `(0, 1]`: a probability mass.
    pub const MASS: Self = Self {
        min: 0.0,
        min_exclusive: true,
        max: 1.0,
    };

    fn contains(&self, v: f64) -> bool {
        let above = if self.min_exclusive {
            v > self.min
        } else {
            v >= self.min
        };
        above && v <= self.max
    }

    fn describe(&self) -> String {
        let open = if self.min_exclusive { "(" } else { "[" };
        format!("{open}{}, {}]", self.min, self.max)
    }
}

/// Reads a number in `range` as the protocol's `f32`. The range is checked on the JSON value;
/// a positive value too small for an `f32` becomes the smallest positive `f32` (never 0).
pub(crate) fn float(v: &Value, param: &str, range: FloatRange) -> Result<f32, ApiError> {
    let Some(x) = v.as_f64() else {
        return Err(ApiError::invalid(
            param,
            format!("'{param}' must be a number, got {}", type_name(v)),
        ));
    };
    if !range.contains(x) {
        return Err(ApiError::invalid(
            param,
            format!(
                "'{param}' must be a number in {}, got {x}",
                range.describe()
            ),
        ));
    }
    let f = x as f32;
    Ok(if f == 0.0 && x > 0.0 {
        f32::from_bits(1)
    } else {
        f
    })
}

/// A seed as the protocol's u64.
pub(crate) fn seed(f: &mut Fields) -> Result<Option<u64>, ApiError> {
    f.int("seed", 0, u64::MAX)
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
        let mut f = Fields::parse(br#"{"n": 1.0}"#).unwrap();
        f.only("n", &[Value::from(1)], "one choice").unwrap();
        assert_eq!(
            Fields::parse(b"{").err().unwrap().code,
            Some("invalid_json")
        );
        assert_eq!(
            Fields::parse(b"[]").err().unwrap().code,
            Some("invalid_json")
        );
    }

    #[test]
    fn integers_name_their_range() {
        let int = |json: &str, lo, hi| {
            integer(&serde_json::from_str(json).unwrap(), "max_tokens", lo, hi)
        };
        assert_eq!(int("1e3", 1, 4096).unwrap(), 1000);
        assert_eq!(int("7", 0, 7).unwrap(), 7);
        assert_eq!(int("18446744073709551615", 0, u64::MAX).unwrap(), u64::MAX);
        for (json, shown) in [
            ("1e12", "got 1000000000000"),
            ("0", "got 0"),
            ("-5", "got -5"),
            ("1e300", "got 1e+300"),
        ] {
            let e = int(json, 1, 4096).unwrap_err();
            assert_eq!(e.code, Some("integer_out_of_range"), "{json}");
            assert!(
                e.message.contains("an integer from 1 to 4096") && e.message.contains(shown),
                "{json}: {}",
                e.message
            );
        }
        for json in ["2.5", "\"3\"", "true"] {
            let e = int(json, 1, 4096).unwrap_err();
            assert_eq!(e.code, Some("invalid_value"), "{json}");
            assert!(
                e.message.contains("an integer from 1 to 4096"),
                "{}",
                e.message
            );
        }
    }

    #[test]
    fn floats_keep_to_their_range() {
        let num = |json: &str, r| float(&serde_json::from_str(json).unwrap(), "top_p", r);
        assert_eq!(num("0.5", FloatRange::MASS).unwrap(), 0.5);
        assert_eq!(num("1", FloatRange::MASS).unwrap(), 1.0);
        assert!(num("0", FloatRange::MASS).is_err());
        assert!(num("1.0000001", FloatRange::MASS).is_err());
        assert!(
            num("1e39", FloatRange::NON_NEGATIVE).is_err(),
            "no f32 holds it"
        );
        assert!(num("-0.1", FloatRange::NON_NEGATIVE).is_err());
        let tiny = num("1e-50", FloatRange::POSITIVE).unwrap();
        assert!(tiny > 0.0, "a positive value stays positive as an f32");
        assert_eq!(
            num("1e-50", FloatRange::NON_NEGATIVE).unwrap(),
            f32::from_bits(1)
        );
        let e = num("\"x\"", FloatRange::MASS).unwrap_err();
        assert!(e.message.contains("must be a number"), "{}", e.message);
    }
}
