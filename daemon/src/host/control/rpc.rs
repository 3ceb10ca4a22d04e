//! JSON-RPC 2.0 framing: one request per line in, one response per line out.
//!
//! A request is `{"jsonrpc":"2.0","method":M,"params":{...},"id":ID}`; `params` is an object or
//! absent; `id` a string, a number or null. A request without `id` is a notification: it is
//! carried out and not answered. Batches (arrays) are refused with one error.

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

/// Invalid JSON.
pub const PARSE_ERROR: i64 = -32700;
/// Not a valid request object (or a line too long to read).
pub const INVALID_REQUEST: i64 = -32600;
/// No such method.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Wrong, missing or unknown parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// A method failed: the message is the daemon's error; `data.class` names its kind.
pub const SERVER_ERROR: i64 = -32000;

/// Deserializes `params` into the method's parameter struct; unknown, missing or mistyped
/// fields are `INVALID_PARAMS` errors that say which.
pub(super) fn params<T: DeserializeOwned>(p: Map<String, Value>) -> Result<T, RpcError> {
    serde_json::from_value(Value::Object(p))
        .map_err(|e| RpcError::new(INVALID_PARAMS, format!("invalid params: {e}")))
}

/// The parameters of a method that takes none (any given is an `INVALID_PARAMS` error).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NoParams {}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// The code (see the constants).
    pub code: i64,
    /// What went wrong, for a person.
    pub message: String,
    /// Machine-readable detail (`{"class": ...}` for method failures).
    pub data: Option<Value>,
}

impl RpcError {
    /// An error with no data.
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// A method failure of class `class`.
    pub fn server(class: &str, message: impl Into<String>) -> RpcError {
        RpcError {
            code: SERVER_ERROR,
            message: message.into(),
            data: Some(json!({ "class": class })),
        }
    }

    fn to_value(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// `None` for a notification (no reply).
    pub id: Option<Value>,
    /// The method name.
    pub method: String,
    /// The parameters (empty when absent).
    pub params: Map<String, Value>,
}

/// Parses one line. On failure returns the error and the id to answer with (`null` when the
/// id could not be read; `None` when the request was a notification).
pub fn parse(line: &[u8]) -> Result<Call, (Option<Value>, RpcError)> {
    let v: Value = serde_json::from_slice(line).map_err(|e| {
        (
            Some(Value::Null),
            RpcError::new(PARSE_ERROR, format!("parse error: {e}")),
        )
    })?;
    let Value::Object(mut obj) = v else {
        let msg = if v.is_array() {
            "batch requests are not supported: send one request object per line"
        } else {
            "a request must be a JSON object"
        };
        return Err((Some(Value::Null), RpcError::new(INVALID_REQUEST, msg)));
    };
    let id = match obj.remove("id") {
        None => None,
        Some(id @ (Value::Null | Value::String(_) | Value::Number(_))) => Some(id),
        Some(_) => {
            return Err((
                Some(Value::Null),
                RpcError::new(INVALID_REQUEST, "\"id\" must be a string, a number or null"),
            ))
        }
    };
    let bad = |msg: &str| {
        (
            Some(id.clone().unwrap_or(Value::Null)),
            RpcError::new(INVALID_REQUEST, msg),
        )
    };
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return Err(bad("\"jsonrpc\" must be \"2.0\""));
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        _ => return Err(bad("\"method\" must be a string")),
    };
    let params = match obj.remove("params") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => {
            return Err((
                Some(id.clone().unwrap_or(Value::Null)),
                RpcError::new(INVALID_PARAMS, "\"params\" must be an object"),
            ))
        }
    };
    obj.remove("jsonrpc");
    if let Some(k) = obj.keys().next() {
        return Err(bad(&format!("unknown member {k:?} in the request")));
    }
    Ok(Call { id, method, params })
}

/// The response line (with newline) for `id`.
pub fn response(id: &Value, result: Result<Value, RpcError>) -> Vec<u8> {
    let v = match result {
        Ok(r) => json!({"jsonrpc": "2.0", "id": id, "result": r}),
        Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_value()}),
    };
    let mut line = v.to_string().into_bytes();
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_get_the_right_codes() {
        let c = parse(br#"{"jsonrpc":"2.0","method":"hello","id":7}"#).unwrap();
        assert_eq!(
            (c.id, c.method.as_str(), c.params.len()),
            (Some(json!(7)), "hello", 0)
        );
        let c = parse(br#"{"jsonrpc":"2.0","method":"x","params":{"a":1}}"#).unwrap();
        assert_eq!(c.id, None);
        assert_eq!(c.params["a"], 1);
        let code = |l: &[u8]| parse(l).unwrap_err().1.code;
        assert_eq!(code(b"not json"), PARSE_ERROR);
        assert_eq!(code(b"{\"jsonrpc\":\"2.0\",\"method\":"), PARSE_ERROR);
        assert_eq!(code(b"[1,2]"), INVALID_REQUEST);
        assert_eq!(code(b"42"), INVALID_REQUEST);
        assert_eq!(code(br#"{"method":"hello","id":1}"#), INVALID_REQUEST);
        assert_eq!(
            code(br#"{"jsonrpc":"2.0","method":5,"id":1}"#),
            INVALID_REQUEST
        );
        assert_eq!(
            code(br#"{"jsonrpc":"2.0","method":"a","id":{}}"#),
            INVALID_REQUEST
        );
        assert_eq!(
            code(br#"{"jsonrpc":"2.0","method":"a","id":1,"x":2}"#),
            INVALID_REQUEST
        );
        assert_eq!(
            code(br#"{"jsonrpc":"2.0","method":"a","params":[1],"id":1}"#),
            INVALID_PARAMS
        );
        // The id is echoed when it could be read.
        assert_eq!(
            parse(br#"{"jsonrpc":"1.0","method":"a","id":"k"}"#)
                .unwrap_err()
                .0,
            Some(json!("k"))
        );
        // Deep nesting is an error, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(code(deep.as_bytes()), PARSE_ERROR);
    }

    #[test]
    fn responses_are_one_line() {
        let r = response(&json!(1), Ok(json!({"a": "b\nc"})));
        assert_eq!(r.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["result"]["a"], "b\nc");
        let r = response(&Value::Null, Err(RpcError::server("busy", "x")));
        let v: Value = serde_json::from_slice(&r).unwrap();
        assert_eq!(v["error"]["code"], SERVER_ERROR);
        assert_eq!(v["error"]["data"]["class"], "busy");
        assert_eq!(v["id"], Value::Null);
    }
}
