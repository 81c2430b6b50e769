//! `Mcp-Param-{Name}` headers (2026-07-28, "Custom Headers from Tool Parameters"): a server
//! annotates a tool's input property with `x-mcp-header: Name`, and clients mirror the
//! argument's value into that header so that intermediaries can route on it without reading
//! the body. The two must agree: a load balancer routing on the header while the server acts
//! on the body is the attack the rule is there to stop. The proxy learns each tool's
//! annotations from the `tools/list` results it relays (before filtering: a server's schemas
//! are the same for every agent), and refuses a `tools/call` whose headers disagree with its
//! arguments, with `400` and `HeaderMismatch` (-32020), before anything is forwarded; from
//! 2026-07-28 on (`MCP-Protocol-Version`), also one that lacks the header of an argument it
//! carries (earlier clients know nothing of the annotation). Headers of a tool not listed
//! through this daemon, or names no annotation declares, are forwarded unchecked, as the
//! specification requires of intermediaries; their values must still be well-formed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use http::HeaderMap;
use serde_json::Value;

use super::{
    headers::{header_text, is_stateless},
    jsonrpc::{Body, RpcError, code},
};
use crate::bpf::lock;

/// Header name prefix (lower case, as `http` keeps names).
const PREFIX: &str = "mcp-param-";
/// Tools remembered per server; when full, all of the server's are forgotten (and learned
/// again from the next lists).
const CAPACITY: usize = 16_384;
/// Annotations kept per tool, and how deep the `properties` chain to one may go.
const MAX_MIRRORS: usize = 64;
const MAX_DEPTH: usize = 16;
/// JavaScript's safe integers: the range an annotated integer must keep to.
const SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// One annotated property: its header's name (lower case) and the chain of `properties` keys
/// from the arguments' root to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mirror {
    header: String,
    path: Vec<String>,
}

/// A server's tools' annotations, by tool name.
type Tools = HashMap<String, Arc<[Mirror]>>;

/// The annotations learned, by server name.
#[derive(Default)]
pub struct Mirrors(Mutex<HashMap<String, Tools>>);

impl Mirrors {
    /// Learns the annotations of every tool listed in `message` (a JSON-RPC message or batch,
    /// as relayed from `server`): each listed tool's entry is replaced, so a schema that
    /// dropped an annotation stops being checked for it.
    pub fn learn(&self, server: &str, message: &Value) {
        match message {
            Value::Array(items) => items.iter().for_each(|m| self.learn(server, m)),
            Value::Object(obj) => {
                let Some(tools) = obj
                    .get("result")
                    .and_then(|r| r.get("tools"))
                    .and_then(Value::as_array)
                else {
                    return;
                };
                let mut map = lock(&self.0);
                let map = map.entry(server.to_owned()).or_default();
                for tool in tools {
                    let Some(name) = tool.get("name").and_then(Value::as_str) else {
                        continue;
                    };
                    let mut found = Vec::new();
                    if let Some(schema) = tool.get("inputSchema") {
                        collect(schema, &mut Vec::new(), &mut found);
                    }
                    if map.len() >= CAPACITY {
                        map.clear();
                    }
                    map.insert(name.to_owned(), found.into());
                }
            }
            _ => {}
        }
    }

    /// Refuses `body` (from an agent to `server`) when its `Mcp-Param-*` headers are malformed
    /// or disagree with the arguments of its `tools/call` (see the module's comment).
    pub fn check(&self, server: &str, headers: &HeaderMap, body: &Body) -> Result<(), RpcError> {
        let id = body.messages.first().and_then(|m| m.id()).cloned();
        let mismatch = |message: String| RpcError {
            code: code::HEADER_MISMATCH,
            message,
            id: id.clone(),
        };
        // Every mirrored header, well-formed and once, decoded.
        let mut sent: HashMap<&str, String> = HashMap::new();
        for (name, value) in headers {
            let Some(param) = name.as_str().strip_prefix(PREFIX) else {
                continue;
            };
            if headers.get_all(name).iter().count() > 1 {
                return Err(mismatch(format!("repeated Mcp-Param-{param} header")));
            }
            let Some(text) = header_text(value) else {
                return Err(mismatch(format!(
                    "Mcp-Param-{param} header is neither visible ASCII nor a valid =?base64?…?= value"
                )));
            };
            sent.insert(name.as_str(), text);
        }
        let call = body
            .messages
            .first()
            .filter(|m| m.method() == Some("tools/call"));
        if body.batch {
            return match sent.is_empty() {
                true => Ok(()),
                false => Err(mismatch("Mcp-Param-* headers on a batch".into())),
            };
        }
        let Some((call, tool)) = call.and_then(|m| Some((m, m.target()?))) else {
            return Ok(());
        };
        let Some(mirrors) = lock(&self.0)
            .get(server)
            .and_then(|tools| tools.get(tool))
            .cloned()
        else {
            return Ok(());
        };
        let stateless = is_stateless(headers);
        let arguments = call.arguments();
        for mirror in mirrors.iter() {
            let value = arguments
                .and_then(|a| mirror.path.iter().try_fold(a, |v, key| v.get(key)))
                .filter(|v| !v.is_null());
            let header = sent.get(mirror.header.as_str());
            let display = || format!("Mcp-Param-{}", &mirror.header[PREFIX.len()..]);
            let argument = || mirror.path.join(".");
            match (value, header) {
                (None, None) => {}
                (Some(_), None) if !stateless => {}
                (Some(_), None) => {
                    return Err(mismatch(format!(
                        "{} header is required: tool {tool:?} mirrors its argument {:?} there",
                        display(),
                        argument()
                    )));
                }
                (None, Some(_)) => {
                    return Err(mismatch(format!(
                        "{} header names a value the body does not have (argument {:?})",
                        display(),
                        argument()
                    )));
                }
                (Some(v), Some(h)) if !agrees(v, h) => {
                    return Err(mismatch(format!(
                        "{} header does not match the body's argument {:?}",
                        display(),
                        argument()
                    )));
                }
                (Some(_), Some(_)) => {}
            }
        }
        Ok(())
    }
}

/// Annotations reachable from `schema` through `properties` keys only (the specification's
/// "statically reachable"; one anywhere else names no header).
fn collect(schema: &Value, path: &mut Vec<String>, found: &mut Vec<Mirror>) {
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    if path.len() >= MAX_DEPTH {
        return;
    }
    for (key, property) in properties {
        if found.len() >= MAX_MIRRORS {
            return;
        }
        path.push(key.clone());
        if let Some(name) = property.get("x-mcp-header").and_then(Value::as_str)
            && is_token(name)
        {
            found.push(Mirror {
                header: format!("{PREFIX}{}", name.to_ascii_lowercase()),
                path: path.clone(),
            });
        }
        collect(property, path, found);
        path.pop();
    }
}

/// RFC 9110's `token` (`1*tchar`).
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether header text `h` carries the argument `v` (the specification's conversions: a
/// string as is, an integer in decimal and compared as a number, a boolean as `true` or
/// `false`; nothing else can be mirrored).
fn agrees(v: &Value, h: &str) -> bool {
    match v {
        Value::String(s) => s == h,
        Value::Bool(b) => h == if *b { "true" } else { "false" },
        Value::Number(n) => {
            let (Some(body), Ok(header)) = (n.as_f64(), h.trim().parse::<f64>()) else {
                return false;
            };
            body.fract() == 0.0 && body.abs() <= SAFE_INTEGER && body == header
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mcp::jsonrpc::{Limits, parse};

    fn listed() -> Value {
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
            {"name": "execute_sql", "inputSchema": {"type": "object", "properties": {
                "region": {"type": "string", "x-mcp-header": "Region"},
                "query": {"type": "string"},
                "limit": {"type": "integer", "x-mcp-header": "Limit"},
                "dry": {"type": "boolean", "x-mcp-header": "Dry"},
                "target": {"type": "object", "properties": {
                    "db": {"type": "string", "x-mcp-header": "Db"}
                }},
                "rows": {"type": "array", "items": {"type": "object", "properties": {
                    "id": {"type": "string", "x-mcp-header": "RowId"}
                }}},
                "bad": {"type": "string", "x-mcp-header": "Not a token"}
            }}},
            {"name": "plain", "inputSchema": {"type": "object"}}
        ]}})
    }

    fn call(tool: &str, arguments: Value) -> Body {
        let text = serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
            "params": {"name": tool, "arguments": arguments}})
        .to_string();
        parse(text.as_bytes(), &Limits::default()).expect("a call")
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                http::HeaderValue::from_bytes(v.as_bytes()).expect("value"),
            );
        }
        h
    }

    fn learned() -> (Mirrors, &'static str) {
        let m = Mirrors::default();
        m.learn("db", &listed());
        (m, "db")
    }

    #[test]
    fn annotations_are_learned_through_properties_only() {
        let (m, server) = learned();
        let map = lock(&m.0);
        let mirrors = &map[server]["execute_sql"];
        let mut got: Vec<(&str, String)> = mirrors
            .iter()
            .map(|x| (x.header.as_str(), x.path.join(".")))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("mcp-param-db", "target.db".to_owned()),
                ("mcp-param-dry", "dry".to_owned()),
                ("mcp-param-limit", "limit".to_owned()),
                ("mcp-param-region", "region".to_owned()),
            ]
        );
        assert!(map[server]["plain"].is_empty());
    }

    #[test]
    fn headers_that_agree_with_the_arguments_pass() {
        let (m, s) = learned();
        let args = serde_json::json!({"region": "us-west1", "query": "SELECT 1", "limit": 42,
            "dry": false, "target": {"db": "Prod 東京"}});
        let h = headers(&[
            ("Mcp-Param-Region", "us-west1"),
            ("mcp-param-limit", "42.0"),
            ("Mcp-Param-Dry", "false"),
            // "Prod 東京" in the base64 form non-ASCII values take.
            ("Mcp-Param-Db", "=?base64?UHJvZCDmnbHkuqw=?="),
            // Not declared: forwarded unchecked.
            ("Mcp-Param-Other", "anything"),
        ]);
        assert!(m.check(s, &h, &call("execute_sql", args)).is_ok());
        // Null and absent arguments want no header.
        let args = serde_json::json!({"region": null, "query": "x"});
        assert!(
            m.check(s, &headers(&[]), &call("execute_sql", args))
                .is_ok()
        );
    }

    #[test]
    fn headers_that_disagree_or_are_missing_are_refused() {
        let (m, s) = learned();
        let args = || serde_json::json!({"region": "us-west1", "limit": 42, "dry": true});
        let full = [
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-param-limit", "42"),
            ("mcp-param-dry", "true"),
        ];
        let refuse = |extra: &[(&str, &str)], args: Value, want: &str| {
            let mut pairs = full.to_vec();
            pairs.extend_from_slice(extra);
            let e = m
                .check(s, &headers(&pairs), &call("execute_sql", args))
                .expect_err(want);
            assert_eq!(e.code, code::HEADER_MISMATCH);
            assert_eq!(e.id, Some(Value::from(7)));
            assert!(e.message.contains(want), "{} / {want}", e.message);
        };
        refuse(
            &[("mcp-param-region", "eu-west1")],
            args(),
            "does not match",
        );
        refuse(&[], args(), "Mcp-Param-region header is required");
        // The header's value, base64-encoded, still compared.
        refuse(
            &[("mcp-param-region", "=?base64?ZXUtd2VzdDE=?=")],
            args(),
            "does not match",
        );
        // A header for a value the body does not carry.
        refuse(
            &[("mcp-param-region", "us-west1"), ("mcp-param-db", "prod")],
            args(),
            "the body does not have",
        );
        // Cased differently: values are case-sensitive.
        refuse(
            &[("mcp-param-region", "US-WEST1")],
            args(),
            "does not match",
        );
        let mut a = args();
        a["limit"] = Value::from(42.5);
        refuse(&[("mcp-param-region", "us-west1")], a, "does not match");
        // Malformed, repeated.
        refuse(
            &[("mcp-param-region", "=?base64?not base64?=")],
            args(),
            "neither",
        );
        refuse(
            &[
                ("mcp-param-region", "us-west1"),
                ("mcp-param-region", "us-west1"),
            ],
            args(),
            "repeated",
        );
    }

    #[test]
    fn unlisted_tools_and_other_methods_are_not_judged_on_values() {
        let (m, s) = learned();
        // Before 2026-07-28 a client knows nothing of the annotation: no header is required
        // (one sent must still agree).
        let h = headers(&[("mcp-protocol-version", "2025-11-25")]);
        let args = serde_json::json!({"region": "us", "limit": 1});
        assert!(m.check(s, &h, &call("execute_sql", args.clone())).is_ok());
        let h = headers(&[
            ("mcp-protocol-version", "2025-11-25"),
            ("mcp-param-limit", "2"),
        ]);
        assert!(m.check(s, &h, &call("execute_sql", args)).is_err());
        let h = headers(&[("mcp-param-region", "eu")]);
        // A tool this daemon never saw listed, another server's tool of the same name.
        assert!(
            m.check(s, &h, &call("unknown", serde_json::json!({"region": "us"})))
                .is_ok()
        );
        assert!(
            m.check("other", &h, &call("execute_sql", serde_json::json!({})))
                .is_ok()
        );
        // A later listing without the annotation stops the check.
        let relisted = serde_json::json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": [
            {"name": "execute_sql", "inputSchema": {"type": "object", "properties": {
                "region": {"type": "string"}}}}]}});
        m.learn(s, &relisted);
        assert!(
            m.check(
                s,
                &h,
                &call("execute_sql", serde_json::json!({"region": "us"}))
            )
            .is_ok()
        );
        // Malformed values are refused whatever the request.
        let bad = headers(&[("mcp-param-x", "=?base64?***?=")]);
        let e = m
            .check(s, &bad, &call("unknown", serde_json::json!({})))
            .expect_err("bad");
        assert_eq!(e.code, code::HEADER_MISMATCH);
    }
}
