//! `Mcp-Param-{Name}` headers (2026-07-28, "Custom Headers from Tool Parameters"): a server
//! annotates a tool's input property with `x-mcp-header: Name`, and clients mirror the
//! argument's value into that header so that intermediaries can route on it without reading
//! the body. The two must agree: a load balancer routing on the header while the server acts
//! on the body is the attack the rule is there to stop. The proxy learns each tool's
//! annotations from the `tools/list` results it relays (before filtering: a server's schemas
//! are the same for every agent), by upstream (two `[[server]]` entries for one server share
//! them) and by tool name without case (servers may look names up so), and refuses a
//! `tools/call` whose headers disagree with its arguments, with `400` and `HeaderMismatch`
//! (-32020), before anything is forwarded; from 2026-07-28 on (`MCP-Protocol-Version`), also
//! one that lacks the header of an argument its tool's latest listing mirrors (earlier
//! clients know nothing of the annotation). An annotation a later listing drops is no longer
//! required, but a header sent for it must still agree (an agent cannot clear the check by
//! having the server list the tool without it). Headers of a tool not listed through this
//! daemon, or names no annotation declares, are forwarded unchecked, as the specification
//! requires of intermediaries; their values must still be well-formed.

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
/// Bytes the learned annotations may take (names and paths, roughly); beyond, all are
/// forgotten and learned again from the next lists.
const MAX_BYTES: usize = 4 << 20;
/// Longest tool name, chain of property keys or annotation kept (a longer one is not learned).
const MAX_NAME: usize = 1024;
/// Annotations kept per tool, and how deep the `properties` chain to one may go.
const MAX_MIRRORS: usize = 64;
const MAX_DEPTH: usize = 16;
/// JavaScript's safe integers: a whole number in the body beyond them is compared as a
/// fraction would be.
const SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// One annotated property: its header's name (lower case) and the chain of `properties` keys
/// from the arguments' root to it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mirror {
    header: String,
    path: Vec<String>,
}

impl Mirror {
    fn bytes(&self) -> usize {
        self.header.len() + self.path.iter().map(|k| k.len() + 24).sum::<usize>() + 48
    }
}

/// What is known of one tool: the annotations of its latest listing (their headers are
/// required) and every one seen (a header sent for one must agree).
#[derive(Debug, Default)]
struct Tool {
    current: Vec<Mirror>,
    known: Vec<Mirror>,
}

impl Tool {
    fn bytes(&self) -> usize {
        self.current
            .iter()
            .chain(&self.known)
            .map(Mirror::bytes)
            .sum::<usize>()
            + 64
    }
}

#[derive(Default)]
struct Learned {
    /// By upstream (a server's `session_scope`) and tool name in lower case.
    tools: HashMap<(usize, String), Arc<Tool>>,
    bytes: usize,
}

/// The annotations learned.
#[derive(Default)]
pub struct Mirrors(Mutex<Learned>);

impl Mirrors {
    /// Learns the annotations of every tool listed in `message` (a JSON-RPC message or batch,
    /// as relayed from the upstream `scope`). Only tools with annotations, or that had some,
    /// are kept.
    pub fn learn(&self, scope: usize, message: &Value) {
        // Read before the lock is taken: checks of calls to every server wait on it.
        let mut listed: HashMap<String, Vec<Mirror>> = HashMap::new();
        listing(message, &mut listed);
        if listed.is_empty() {
            return;
        }
        let mut learned = lock(&self.0);
        for (name, mirrors) in listed {
            let key = (scope, name);
            let old = learned.tools.get(&key).cloned();
            if mirrors.is_empty() && old.as_ref().is_none_or(|t| t.known.is_empty()) {
                continue;
            }
            let mut known = old.as_ref().map(|t| t.known.clone()).unwrap_or_default();
            for m in &mirrors {
                if !known.contains(m) && known.len() < MAX_MIRRORS * 2 {
                    known.push(m.clone());
                }
            }
            let tool = Tool {
                current: mirrors,
                known,
            };
            // The name counts too: what a tool costs is its key and its annotations.
            let name = key.1.len();
            let (added, removed) = (tool.bytes() + name, old.map_or(0, |t| t.bytes() + name));
            learned.bytes = learned.bytes.saturating_sub(removed) + added;
            if learned.bytes > MAX_BYTES {
                learned.tools.clear();
                learned.bytes = added;
            }
            learned.tools.insert(key, Arc::new(tool));
        }
    }

    /// Refuses `body` (from an agent to the upstream `scope`) when its `Mcp-Param-*` headers
    /// are malformed or disagree with the arguments of its `tools/call` (see the module's
    /// comment).
    pub fn check(&self, scope: usize, headers: &HeaderMap, body: &Body) -> Result<(), RpcError> {
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
            // Plain values with spaces at either end must come base64-encoded: HTTP/1 hops
            // trim them, h2 keeps them.
            let padded = value
                .as_bytes()
                .first()
                .is_some_and(|b| matches!(b, b' ' | b'\t'))
                || value
                    .as_bytes()
                    .last()
                    .is_some_and(|b| matches!(b, b' ' | b'\t'));
            let Some(text) = header_text(value).filter(|_| !padded) else {
                return Err(mismatch(format!(
                    "Mcp-Param-{param} header is neither visible ASCII nor a valid =?base64?…?= \
                     value (values with spaces at either end must be base64-encoded)"
                )));
            };
            sent.insert(name.as_str(), text);
        }
        if body.batch {
            return match sent.is_empty() {
                true => Ok(()),
                false => Err(mismatch("Mcp-Param-* headers on a batch".into())),
            };
        }
        let Some((call, tool)) = body
            .messages
            .first()
            .filter(|m| m.method() == Some("tools/call"))
            .and_then(|m| Some((m, m.target()?)))
        else {
            return Ok(());
        };
        let Some(learned) = lock(&self.0)
            .tools
            .get(&(scope, tool.to_lowercase()))
            .cloned()
        else {
            return Ok(());
        };
        let stateless = is_stateless(headers);
        let arguments = call.arguments();
        let value_of = |mirror: &Mirror| {
            arguments
                .and_then(|a| mirror.path.iter().try_fold(a, |v, key| v.get(key)))
                .filter(|v| !v.is_null())
        };
        let display = |mirror: &Mirror| format!("Mcp-Param-{}", &mirror.header[PREFIX.len()..]);
        let disagrees = |mirror: &Mirror| {
            mismatch(format!(
                "{} header does not match the body's argument {:?}",
                display(mirror),
                mirror.path.join(".")
            ))
        };
        for (&header, text) in &sent {
            // The latest listing's annotations of this header: the body must carry the value
            // (one of them, should two share the header) and agree.
            let current: Vec<&Mirror> = learned
                .current
                .iter()
                .filter(|m| m.header == header)
                .collect();
            if let Some(first) = current.first() {
                let mut carried = false;
                for mirror in &current {
                    if let Some(v) = value_of(mirror) {
                        carried = true;
                        if !agrees(v, text) {
                            return Err(disagrees(mirror));
                        }
                    }
                }
                if !carried {
                    return Err(mismatch(format!(
                        "{} header names a value the body does not have (argument {:?})",
                        display(first),
                        first.path.join(".")
                    )));
                }
                continue;
            }
            // An annotation a listing since dropped: a value the body carries must agree.
            for mirror in learned.known.iter().filter(|m| m.header == header) {
                if let Some(v) = value_of(mirror)
                    && !agrees(v, text)
                {
                    return Err(disagrees(mirror));
                }
            }
        }
        if stateless {
            for mirror in &learned.current {
                if value_of(mirror).is_some() && !sent.contains_key(mirror.header.as_str()) {
                    return Err(mismatch(format!(
                        "{} header is required: tool {tool:?} mirrors its argument {:?} there",
                        display(mirror),
                        mirror.path.join(".")
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The tools `message` lists (a result's `tools` array; a batch's every message), by name in
/// lower case, with their annotations (those of tools whose names differ only in case, put
/// together).
fn listing(message: &Value, listed: &mut HashMap<String, Vec<Mirror>>) {
    match message {
        Value::Array(items) => items.iter().for_each(|m| listing(m, listed)),
        Value::Object(obj) => {
            let Some(tools) = obj
                .get("result")
                .and_then(|r| r.get("tools"))
                .and_then(Value::as_array)
            else {
                return;
            };
            for tool in tools {
                let Some(name) = tool
                    .get("name")
                    .and_then(Value::as_str)
                    .filter(|n| n.len() <= MAX_NAME)
                else {
                    continue;
                };
                let mirrors = listed.entry(name.to_lowercase()).or_default();
                if let Some(schema) = tool.get("inputSchema") {
                    collect(schema, &mut Vec::new(), mirrors);
                }
            }
        }
        _ => {}
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
        // The whole chain within the bound on names: a longer one is not learned.
        if path.iter().map(String::len).sum::<usize>() + key.len() > MAX_NAME {
            continue;
        }
        path.push(key.clone());
        if let Some(name) = property.get("x-mcp-header").and_then(Value::as_str)
            && name.len() <= MAX_NAME
            // RFC 9110's `token`, as `http` checks header names.
            && !name.is_empty()
            && http::HeaderName::from_bytes(name.as_bytes()).is_ok()
        {
            let mirror = Mirror {
                header: format!("{PREFIX}{}", name.to_ascii_lowercase()),
                path: path.clone(),
            };
            if !found.contains(&mirror) {
                found.push(mirror);
            }
        }
        collect(property, path, found);
        path.pop();
    }
}

/// Whether header text `h` carries the argument `v` (the specification's conversions: a
/// string as is, an integer in decimal — `42`, or `42.0`, which it says compares equal —, a
/// boolean as `true` or `false`). What else intermediaries might read as another number
/// (`4.2e1`, `+42`, `042`, spaces) does not agree. A fraction (a `number` property, which
/// the specification does not allow to be mirrored but SDKs mirror) must be a JSON number
/// of the same value.
fn agrees(v: &Value, h: &str) -> bool {
    match v {
        Value::String(s) => s == h,
        Value::Bool(b) => h == if *b { "true" } else { "false" },
        Value::Number(n) => {
            // `42.0` in the body is the integer 42 to the SDKs' servers (pydantic, zod).
            let integer = n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .or_else(|| {
                    n.as_f64()
                        .filter(|x| x.fract() == 0.0 && x.abs() <= SAFE_INTEGER)
                        .map(|x| x as i128)
                });
            match integer {
                Some(i) => integer_text(h) == Some(i),
                None => json_number(h).is_some_and(|x| Some(x) == n.as_f64()),
            }
        }
        _ => false,
    }
}

/// `h` as an integer written `-?(0|[1-9][0-9]*)`, optionally followed by `.0…`.
fn integer_text(h: &str) -> Option<i128> {
    let (whole, fraction) = h.split_once('.').unwrap_or((h, ""));
    if h.contains('.') && (fraction.is_empty() || fraction.bytes().any(|b| b != b'0')) {
        return None;
    }
    let digits = whole.strip_prefix('-').unwrap_or(whole);
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    canonical.then(|| whole.parse().ok()).flatten()
}

/// `h` as a JSON number (RFC 8259's grammar, as serde_json reads it: no `+`, no leading
/// zeros), with nothing around it.
fn json_number(h: &str) -> Option<f64> {
    if h.trim() != h {
        return None;
    }
    serde_json::from_str::<serde_json::Number>(h).ok()?.as_f64()
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

    fn learned() -> (Mirrors, usize) {
        let m = Mirrors::default();
        m.learn(3, &listed());
        (m, 3)
    }

    fn tool(m: &Mirrors, scope: usize, name: &str) -> Option<Arc<Tool>> {
        lock(&m.0).tools.get(&(scope, name.to_owned())).cloned()
    }

    #[test]
    fn annotations_are_learned_through_properties_only() {
        let (m, s) = learned();
        let t = tool(&m, s, "execute_sql").expect("learned");
        let mut got: Vec<(&str, String)> = t
            .current
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
        assert_eq!(t.known, t.current);
        // A tool without annotations takes no room.
        assert!(tool(&m, s, "plain").is_none());
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
        assert!(m.check(s, &h, &call("execute_sql", args.clone())).is_ok());
        // The tool named in another case: the same tool (servers may look names up so).
        assert!(m.check(s, &h, &call("EXECUTE_SQL", args)).is_ok());
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
        let refuse_as = |name: &str, extra: &[(&str, &str)], args: Value, want: &str| {
            let mut pairs = full.to_vec();
            pairs.extend_from_slice(extra);
            let e = m
                .check(s, &headers(&pairs), &call(name, args))
                .expect_err(want);
            assert_eq!(e.code, code::HEADER_MISMATCH);
            assert_eq!(e.id, Some(Value::from(7)));
            assert!(e.message.contains(want), "{} / {want}", e.message);
        };
        let refuse = |extra: &[(&str, &str)], args: Value, want: &str| {
            refuse_as("execute_sql", extra, args, want)
        };
        refuse(
            &[("mcp-param-region", "eu-west1")],
            args(),
            "does not match",
        );
        // Named in another case, the tool is still checked.
        refuse_as(
            "Execute_SQL",
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
        // Integers only as written in decimal: what other readers take for another number.
        for other in ["4.2e1", "+42", "042", "42.", "42.5", " 42", "0x2a"] {
            let mut pairs = full.to_vec();
            pairs.retain(|(k, _)| *k != "mcp-param-limit");
            pairs.extend([("mcp-param-region", "us-west1"), ("mcp-param-limit", other)]);
            let r = m.check(s, &headers(&pairs), &call("execute_sql", args()));
            assert!(r.is_err(), "{other:?} taken for 42");
        }
        // Malformed, padded, repeated.
        refuse(
            &[("mcp-param-region", "=?base64?not base64?=")],
            args(),
            "neither",
        );
        refuse(&[("mcp-param-region", "us-west1 ")], args(), "neither");
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
    fn numbers_compare_as_numbers_written_plainly() {
        assert!(agrees(&Value::from(42), "42"));
        assert!(agrees(&Value::from(42), "42.00"));
        assert!(agrees(&Value::from(-7), "-7"));
        assert!(agrees(&Value::from(0), "0"));
        assert!(!agrees(&Value::from(0), "-"));
        assert!(!agrees(
            &Value::from(9_007_199_254_740_991_i64),
            "9007199254740990.9"
        ));
        // A fraction (SDKs mirror `number` properties) as a JSON number of its value.
        assert!(agrees(&serde_json::json!(0.7), "0.7"));
        assert!(agrees(&serde_json::json!(0.7), "7e-1"));
        // A whole number written as a fraction in the body is an integer all the same.
        assert!(agrees(&serde_json::json!(42.0), "42"));
        assert!(!agrees(&serde_json::json!(42.0), "4.2e1"));
        assert!(!agrees(&serde_json::json!(42.0), "420e-1"));
        assert!(!agrees(&serde_json::json!(0.7), ".7"));
        assert!(!agrees(&serde_json::json!(0.7), "0.70001"));
        assert!(!agrees(&Value::from(true), "True"));
    }

    #[test]
    fn a_dropped_annotation_is_no_longer_required_but_still_checked() {
        let (m, s) = learned();
        let relisted = serde_json::json!({"jsonrpc": "2.0", "id": 2, "result": {"tools": [
            {"name": "execute_sql", "inputSchema": {"type": "object", "properties": {
                "region": {"type": "string"}}}}]}});
        m.learn(s, &relisted);
        let modern = ("mcp-protocol-version", "2026-07-28");
        let args = || serde_json::json!({"region": "us", "limit": 1});
        assert!(
            m.check(s, &headers(&[modern]), &call("execute_sql", args()))
                .is_ok()
        );
        let h = headers(&[modern, ("mcp-param-region", "eu")]);
        assert!(m.check(s, &h, &call("execute_sql", args())).is_err());
        // A renamed property keeping its header: the current one is judged (the old one is
        // then no argument the server reads).
        let renamed = serde_json::json!({"jsonrpc": "2.0", "id": 3, "result": {"tools": [
            {"name": "execute_sql", "inputSchema": {"type": "object", "properties": {
                "location": {"type": "string", "x-mcp-header": "Region"}}}}]}});
        m.learn(s, &renamed);
        let h = headers(&[modern, ("mcp-param-region", "eu")]);
        let moved = serde_json::json!({"location": "eu"});
        assert!(m.check(s, &h, &call("execute_sql", moved)).is_ok());
        let both = serde_json::json!({"location": "eu", "region": "us"});
        assert!(m.check(s, &h, &call("execute_sql", both)).is_ok());
        let other = serde_json::json!({"location": "us", "region": "eu"});
        assert!(m.check(s, &h, &call("execute_sql", other)).is_err());
        // Another upstream's tool of the same name knows nothing of these.
        assert!(m.check(s + 1, &h, &call("execute_sql", args())).is_ok());
    }

    #[test]
    fn unlisted_tools_and_earlier_revisions_are_not_judged_on_missing_headers() {
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
        // A tool this daemon never saw listed.
        let h = headers(&[("mcp-param-region", "eu")]);
        let unknown = call("unknown", serde_json::json!({"region": "us"}));
        assert!(m.check(s, &h, &unknown).is_ok());
        // Malformed values are refused whatever the request.
        let bad = headers(&[("mcp-param-x", "=?base64?***?=")]);
        let e = m.check(s, &bad, &unknown).expect_err("bad");
        assert_eq!(e.code, code::HEADER_MISMATCH);
    }

    #[test]
    fn what_is_learned_stays_within_its_bytes() {
        let m = Mirrors::default();
        let property = "p".repeat(MAX_NAME);
        for round in 0..200 {
            let tools: Vec<Value> = (0..100)
                .map(|i| {
                    serde_json::json!({"name": format!("t{round}-{i}"), "inputSchema": {
                        "properties": {property.clone(): {"x-mcp-header": "P"}}}})
                })
                .collect();
            m.learn(1, &serde_json::json!({"result": {"tools": tools}}));
            assert!(lock(&m.0).bytes <= MAX_BYTES);
        }
        let learned = lock(&m.0);
        assert!(!learned.tools.is_empty());
        let counted: usize = learned
            .tools
            .iter()
            .map(|((_, name), t)| t.bytes() + name.len())
            .sum();
        assert_eq!(counted, learned.bytes);
    }
}
