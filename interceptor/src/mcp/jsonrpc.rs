//! Strict JSON-RPC parsing for MCP messages from agents.
//!
//! Parse strictly, reject what is ambiguous, and forward a re-serialised copy of exactly what
//! was authorised: every trick that makes a policy proxy and an upstream see different messages
//! (duplicate keys, escaped duplicates like `"n\u0061me"`, case variants like `"Name"` beside
//! `"name"`, non-object params, batches hiding calls, deep nesting, invalid UTF-8) is an error
//! here, before any decision is made.

use std::{cell::Cell, fmt};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::policy::Reference;

/// JSON-RPC error codes used by the proxy.
pub mod code {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    /// MCP 2026-07-28: an `Mcp-*` header disagrees with the body.
    pub const HEADER_MISMATCH: i64 = -32020;
}

/// Top-level members of a JSON-RPC message.
const MEMBERS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];
/// MCP members inside `params` whose variants (see [`variant_of`]) are refused: upstreams
/// that decode case-insensitively, or by the snake_case field name as well as the camelCase
/// one (the Python SDK's models), would read the variant.
const PARAM_MEMBERS: [&str; 10] = [
    "name",
    "arguments",
    "uri",
    "cursor",
    "_meta",
    "protocolVersion",
    "capabilities",
    "clientInfo",
    "level",
    "notifications",
];

/// Members of `subscriptions/listen`'s `params.notifications` whose variants are refused
/// (the policy judges the URIs of `resourceSubscriptions`).
const NOTIFICATION_MEMBERS: [&str; 2] = ["resourceSubscriptions", "taskIds"];

/// An id as every reader tells it apart: integers beyond ±2^53 as the double they round to.
pub fn id_as_read(id: &Value) -> String {
    match id.as_f64() {
        Some(n) if id.is_number() => format!("{n:e}"),
        _ => id.to_string(),
    }
}

/// For `id` (JSON text) an integer of ±2^53 or more (one id with a neighbour to a reader
/// holding numbers as doubles: 2^53 + 1 reads as 2^53), how such a reader reads it. Cheap
/// for any other id (no JSON parse: a string id starts with a quote, a smaller one is short).
pub fn rounded_by_some_readers(id: &str) -> Option<f64> {
    const EXACT: u128 = 1 << 53;
    // 2^53 has 16 digits.
    if id.len() < 16 {
        return None;
    }
    let n: i128 = id.parse().ok()?;
    (n.unsigned_abs() >= EXACT).then_some(n as f64)
}

/// Case folding for key comparison: `to_uppercase().to_lowercase()` maps the Unicode
/// look-alikes that case-insensitive decoders fold (`ſ` → `s`, Kelvin `K` → `k`) onto their
/// ASCII letters, so `"argumentſ"` is caught as a variant of `"arguments"`.
pub fn fold(key: &str) -> String {
    key.to_uppercase().to_lowercase()
}

/// The member of `members` that `key` is a variant of, if any: not the member itself, but the
/// same once case is folded and the underscores and hyphens after its first character are
/// dropped (`"Uri"`, `"protocol_version"`, `"resource_subscriptions"`, `"_Meta"`; not
/// `"meta"`, which no decoder reads as `"_meta"`).
fn variant_of<'m>(key: &str, members: &[&'m str]) -> Option<&'m str> {
    if members.contains(&key) {
        return None;
    }
    // An ASCII key (members are ASCII) is compared as it goes, without allocating: every
    // `tools/call` runs this for each of its params members.
    if key.is_ascii() {
        fn letters(k: &str) -> impl Iterator<Item = u8> + '_ {
            k.bytes()
                .enumerate()
                .filter(|(i, b)| *i == 0 || !matches!(b, b'_' | b'-'))
                .map(|(_, b)| b.to_ascii_lowercase())
        }
        return members
            .iter()
            .copied()
            .find(|m| letters(key).eq(letters(m)));
    }
    let canonical = |k: &str| -> String {
        let mut chars = k.chars();
        let first = chars.next().map(String::from).unwrap_or_default();
        fold(
            &(first
                + &chars
                    .filter(|c| !matches!(c, '_' | '-'))
                    .collect::<String>()),
        )
    };
    let key = canonical(key);
    members.iter().copied().find(|m| canonical(m) == key)
}

/// Refuses the members of `obj` that are variants of `members` (`within` names `obj` in the
/// message).
fn refuse_variants(obj: &Map<String, Value>, members: &[&str], within: &str) -> Result<(), String> {
    for key in obj.keys() {
        if let Some(canon) = variant_of(key, members) {
            return Err(format!(
                "{within} member {} is a case or snake_case variant of {canon:?}; \
                 refused as ambiguous",
                quoted(key)
            ));
        }
    }
    Ok(())
}

/// `key` quoted for a message (an error answered to the agent, a log line), cut to its first
/// 128 bytes: a key of megabytes must not become a log line of megabytes.
fn quoted(key: &str) -> String {
    const MAX: usize = 128;
    if key.len() <= MAX {
        return format!("{key:?}");
    }
    let mut end = MAX;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…[{} bytes]", &key[..end], key.len())
}

/// Why a body was refused, with the JSON-RPC code to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    /// The id of the offending message, when it could be read.
    pub id: Option<Value>,
}

impl RpcError {
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            id: None,
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_REQUEST, message)
    }

    /// The JSON-RPC error object, as a response.
    pub fn to_response(&self) -> Value {
        error_response(self.id.clone(), self.code, &self.message)
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// A JSON-RPC error response.
pub fn error_response(id: Option<Value>, code: i64, message: &str) -> Value {
    serde_json::json!({
        "jsonrpc": "2.0",
        "id": id.unwrap_or(Value::Null),
        "error": {"code": code, "message": message},
    })
}

/// One message from the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Has an id; expects a response.
    Request {
        id: Value,
        method: String,
        params: Option<Map<String, Value>>,
    },
    /// No id; no response.
    Notification {
        method: String,
        params: Option<Map<String, Value>>,
    },
    /// The agent answering a server-to-client request (sampling, elicitation, roots).
    Response { id: Value, body: Map<String, Value> },
}

impl Message {
    pub fn method(&self) -> Option<&str> {
        match self {
            Message::Request { method, .. } | Message::Notification { method, .. } => Some(method),
            Message::Response { .. } => None,
        }
    }

    pub fn id(&self) -> Option<&Value> {
        match self {
            Message::Request { id, .. } | Message::Response { id, .. } => Some(id),
            Message::Notification { .. } => None,
        }
    }

    pub fn params(&self) -> Option<&Map<String, Value>> {
        match self {
            Message::Request { params, .. } | Message::Notification { params, .. } => {
                params.as_ref()
            }
            Message::Response { .. } => None,
        }
    }

    /// The call's target: `params.name` (tools/call, prompts/get) or `params.uri`
    /// (resources/read, resources/subscribe): what `Mcp-Name` names.
    pub fn target(&self) -> Option<&str> {
        let key = match self.method()? {
            "tools/call" | "prompts/get" => "name",
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => "uri",
            _ => return None,
        };
        self.params()?.get(key)?.as_str()
    }

    /// What a `completion/complete` completes an argument of (`params.ref`, an object the
    /// parser checked): its kind and the prompt's name or the resource template's URI.
    pub fn completion_ref(&self) -> Option<(Reference, Option<&str>)> {
        if self.method()? != "completion/complete" {
            return None;
        }
        let reference = self.params()?.get("ref")?;
        let text = |key: &str| reference.get(key).and_then(Value::as_str);
        Some(match text("type") {
            Some("ref/prompt") => (Reference::Prompt, text("name")),
            Some("ref/resource") => (Reference::Resource, text("uri")),
            _ => (Reference::Other, None),
        })
    }

    /// What a request names for the record and the denial: its [`Message::target`], or the
    /// prompt or resource template a `completion/complete` completes for.
    pub fn named(&self) -> Option<&str> {
        self.target()
            .or_else(|| self.completion_ref().and_then(|(_, name)| name))
    }

    /// The task a `tasks/…` request names (`params.taskId`; see [`super::tasks::names_task`]).
    pub fn task_id(&self) -> Option<&str> {
        let method = self.method()?;
        if !super::tasks::names_task(method) {
            return None;
        }
        self.params()?.get("taskId")?.as_str()
    }

    /// `params.arguments` of a tools/call.
    pub fn arguments(&self) -> Option<&Value> {
        self.params()?.get("arguments")
    }

    /// The canonical serialisation forwarded upstream: only the members JSON-RPC defines.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert("jsonrpc".into(), Value::from("2.0"));
        match self {
            Message::Request { id, method, params } => {
                m.insert("id".into(), id.clone());
                m.insert("method".into(), Value::from(method.as_str()));
                if let Some(p) = params {
                    m.insert("params".into(), Value::Object(p.clone()));
                }
            }
            Message::Notification { method, params } => {
                m.insert("method".into(), Value::from(method.as_str()));
                if let Some(p) = params {
                    m.insert("params".into(), Value::Object(p.clone()));
                }
            }
            Message::Response { id, body } => {
                m.insert("id".into(), id.clone());
                for (k, v) in body {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        Value::Object(m)
    }
}

/// A parsed body: one message, or a batch (2025-03-26 allowed them).
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    pub messages: Vec<Message>,
    pub batch: bool,
}

impl Body {
    /// The bytes to forward: the canonical form of every message ([`Message::to_value`],
    /// serialised without copying the message).
    pub fn to_bytes(&self) -> Vec<u8> {
        let result = if self.batch {
            serde_json::to_vec(&self.messages.iter().map(Canonical).collect::<Vec<_>>())
        } else {
            match self.messages.first() {
                Some(m) => serde_json::to_vec(&Canonical(m)),
                None => serde_json::to_vec(&Value::Null),
            }
        };
        result.unwrap_or_default()
    }
}

/// A message in its canonical form, serialised in place: members in the order of
/// [`Message::to_value`]'s map (sorted), parameters as they were read.
struct Canonical<'a>(&'a Message);

impl serde::Serialize for Canonical<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (id, method, params) = match self.0 {
            Message::Request { id, method, params } => (Some(id), method, params),
            Message::Notification { method, params } => (None, method, params),
            // Rare (an agent answering the server): merged members, sorted by the map.
            Message::Response { .. } => return self.0.to_value().serialize(s),
        };
        let mut m = s.serialize_map(None)?;
        if let Some(id) = id {
            m.serialize_entry("id", id)?;
        }
        m.serialize_entry("jsonrpc", "2.0")?;
        m.serialize_entry("method", method)?;
        if let Some(p) = params {
            m.serialize_entry("params", p)?;
        }
        m.end()
    }
}

/// Bounds on one request body (`[proxy]` in the config): what an agent sends is parsed into
/// memory, recorded and held until its answer, so its size in memory is bounded, not only
/// its size on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting (`proxy.max_json_depth`).
    pub max_depth: usize,
    /// Most JSON values, object keys included (`proxy.max_json_values`): a small object
    /// costs ~100 times its bytes once parsed (a 4 MiB body of `{"":0}` would be ~400 MB).
    pub max_values: usize,
    /// Most messages in a batch (`proxy.max_batch`): each is judged and recorded on its own.
    pub max_batch: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_depth: crate::config::DEFAULT_MAX_JSON_DEPTH,
            max_values: crate::config::DEFAULT_MAX_JSON_VALUES,
            max_batch: crate::config::DEFAULT_MAX_BATCH,
        }
    }
}

/// Longest string `id` accepted (bytes): ids are copied into every event and held by
/// pending answers (a legacy SSE session keeps thousands).
pub const MAX_ID_BYTES: usize = 256;

/// A JSON value read as strictly as a request, with at most `max_values` values (object keys
/// included) and the default depth: for JSON text inside what agents send (the audit log
/// redacts it as JSON). `None` when it is not such JSON.
pub fn parse_value(text: &str, max_values: usize) -> Option<Value> {
    let mut de = serde_json::Deserializer::from_str(text);
    let shape = (crate::config::DEFAULT_MAX_JSON_DEPTH, max_values, true, 1);
    let (value, _) = read_strict(&mut de, shape).ok()?;
    de.end().ok()?;
    Some(value)
}

/// One value of `de`, read by [`Strict`] with (max depth, max values, check keys, object
/// cost); and whether a key was duplicated.
fn read_strict<'de, R: serde_json::de::Read<'de>>(
    de: &mut serde_json::Deserializer<R>,
    (max_depth, max_values, check_keys, object_cost): (usize, usize, bool, usize),
) -> Result<(Value, bool), serde_json::Error> {
    let left = Cell::new(max_values);
    let duplicate = Cell::new(false);
    let value = Strict {
        depth: 0,
        max_depth,
        left: &left,
        duplicate: &duplicate,
        max_values,
        check_keys,
        object_cost,
    }
    .deserialize(de)?;
    Ok((value, duplicate.get()))
}

/// What a small object counts in an upstream answer's budget (a one-entry map takes ~640
/// bytes, a value in an array 32).
pub const ANSWER_OBJECT_COST: usize = 16;

/// How deep an upstream answer may nest (serde_json's own limit).
const ANSWER_MAX_DEPTH: usize = 128;

/// An upstream's answer (a JSON body, an SSE event's data) read within `max_values` values,
/// objects counting [`ANSWER_OBJECT_COST`] (`proxy.max_response_values`): 16 MiB of `{"":0}`
/// would be ~1.7 GB as a tree. Keys are not checked (see `Strict::check_keys`); the flag says
/// a key was duplicated (the last is kept, as most clients keep it: the answer must then be
/// passed on re-serialised, for readers that keep the first).
pub fn parse_answer(text: &[u8], max_values: usize) -> Result<(Value, bool), String> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let shape = (ANSWER_MAX_DEPTH, max_values, false, ANSWER_OBJECT_COST);
    let read = read_strict(&mut de, shape).map_err(|e| e.to_string())?;
    de.end().map_err(|e| format!("trailing data: {e}"))?;
    Ok(read)
}

/// Parses an agent's request body strictly.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Body, RpcError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| RpcError::new(code::PARSE_ERROR, format!("body is not valid UTF-8: {e}")))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let shape = (limits.max_depth, limits.max_values, true, 1);
    let (value, _) = read_strict(&mut de, shape).map_err(|e| {
        let msg = e.to_string();
        // Our own semantic refusals are invalid requests; the rest is malformed JSON.
        if msg.contains("duplicate key")
            || msg.contains("differ only in case")
            || msg.contains("nesting deeper")
            || msg.contains("JSON values (proxy.")
        {
            RpcError::invalid(msg)
        } else {
            RpcError::new(code::PARSE_ERROR, format!("invalid JSON: {msg}"))
        }
    })?;
    de.end()
        .map_err(|e| RpcError::new(code::PARSE_ERROR, format!("trailing data after JSON: {e}")))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(RpcError::invalid("empty batch"));
            }
            if items.len() > limits.max_batch {
                return Err(RpcError::invalid(format!(
                    "a batch of {} messages; at most {} are accepted (proxy.max_batch): send \
                     them in several requests",
                    items.len(),
                    limits.max_batch
                )));
            }
            let messages = items
                .into_iter()
                .map(classify)
                .collect::<Result<Vec<_>, _>>()?;
            // Two messages with one id would make their answers indistinguishable; so would
            // two integers beyond 2^53 that a reader holding numbers as doubles (JavaScript)
            // takes for one (2^53 and 2^53 + 1): compared as such a reader sees them.
            let mut ids = std::collections::HashSet::new();
            for m in &messages {
                if let Some(id) = m.id()
                    && !ids.insert(id_as_read(id))
                {
                    return Err(RpcError {
                        code: code::INVALID_REQUEST,
                        message: format!("id {id} appears more than once in the batch"),
                        id: Some(id.clone()),
                    });
                }
            }
            Ok(Body {
                messages,
                batch: true,
            })
        }
        other => Ok(Body {
            messages: vec![classify(other)?],
            batch: false,
        }),
    }
}

fn classify(value: Value) -> Result<Message, RpcError> {
    let Value::Object(mut obj) = value else {
        return Err(RpcError::invalid(
            "a JSON-RPC message must be a JSON object",
        ));
    };
    let id = obj.get("id").cloned();
    let reply_id = id.clone().filter(|v| v.is_string() || v.is_number());
    let fail = |message: String| RpcError {
        code: code::INVALID_REQUEST,
        message,
        id: reply_id.clone(),
    };
    for key in obj.keys() {
        if MEMBERS.contains(&key.as_str()) {
            continue;
        }
        let folded = fold(key);
        if let Some(canon) = MEMBERS.iter().find(|m| **m == folded) {
            return Err(fail(format!(
                "member {} is a case variant of {canon:?}; refused as ambiguous",
                quoted(key)
            )));
        }
        return Err(fail(format!(
            "unexpected member {} in a JSON-RPC message",
            quoted(key)
        )));
    }
    if obj.get("jsonrpc") != Some(&Value::from("2.0")) {
        return Err(fail("\"jsonrpc\" must be \"2.0\"".into()));
    }
    if let Some(id) = &id {
        let valid = id.is_string() || id.as_i64().is_some() || id.as_u64().is_some();
        if !valid {
            // Its type only: the value is the agent's (and is logged with the refusal).
            return Err(fail(format!(
                "id must be a string or an integer, not {}",
                type_name(id)
            )));
        }
        if let Some(text) = id.as_str()
            && text.len() > MAX_ID_BYTES
        {
            return Err(RpcError::invalid(format!(
                "id of {} bytes; at most {MAX_ID_BYTES} are accepted",
                text.len()
            )));
        }
    }
    match obj.remove("method") {
        Some(Value::String(method)) => {
            if obj.contains_key("result") || obj.contains_key("error") {
                return Err(fail(
                    "a message cannot have both a method and a result/error".into(),
                ));
            }
            let params = match obj.remove("params") {
                None => None,
                Some(Value::Object(p)) => {
                    check_params(&p).map_err(fail)?;
                    Some(p)
                }
                Some(other) => {
                    return Err(fail(format!(
                        "params must be an object, not {}",
                        type_name(&other)
                    )));
                }
            };
            if method.is_empty() {
                return Err(fail("empty method".into()));
            }
            if id.is_some() && method.starts_with("notifications/") {
                // The policy lets every notification through: a request (which a server
                // answers, and may act on) must not pass under a notification's name.
                return Err(fail(
                    "a request (with an id) cannot have a notifications/ method: notifications \
                     carry no id"
                        .into(),
                ));
            }
            let message = match id {
                Some(id) => Message::Request { id, method, params },
                None => Message::Notification { method, params },
            };
            check_call(&message).map_err(fail)?;
            Ok(message)
        }
        Some(other) => Err(fail(format!(
            "method must be a string, not {}",
            type_name(&other)
        ))),
        None => {
            let Some(id) = id.clone() else {
                return Err(fail("a message needs a method or an id".into()));
            };
            if obj.contains_key("params") {
                return Err(fail("a response cannot have params".into()));
            }
            let has_result = obj.contains_key("result");
            let has_error = obj.contains_key("error");
            if has_result == has_error {
                return Err(fail(
                    "a response needs exactly one of result and error".into(),
                ));
            }
            obj.remove("jsonrpc");
            obj.remove("id");
            Ok(Message::Response { id, body: obj })
        }
    }
}

fn check_params(params: &Map<String, Value>) -> Result<(), String> {
    refuse_variants(params, &PARAM_MEMBERS, "params")
}

/// Shape checks for the methods the policy looks into.
fn check_call(message: &Message) -> Result<(), String> {
    let Some(method) = message.method() else {
        return Ok(());
    };
    let params = message.params();
    let string_member = |key: &str| -> Result<(), String> {
        match params.and_then(|p| p.get(key)) {
            Some(Value::String(_)) => Ok(()),
            Some(other) => Err(format!(
                "{method}: params.{key} must be a string, not {}",
                type_name(other)
            )),
            None => Err(format!("{method}: params.{key} is required")),
        }
    };
    match method {
        "tools/call" => {
            string_member("name")?;
            // The task it asks for (the answer then names the task).
            refuse_variants(params.unwrap_or(&Map::new()), &["task"], "params")?;
            match params.and_then(|p| p.get("arguments")) {
                None | Some(Value::Object(_)) => Ok(()),
                Some(other) => Err(format!(
                    "tools/call: params.arguments must be an object, not {}",
                    type_name(other)
                )),
            }
        }
        "prompts/get" => string_member("name"),
        // Judged by what it completes for (allow_prompts, allow_resources).
        "completion/complete" => {
            let Some(Value::Object(reference)) = params.and_then(|p| p.get("ref")) else {
                return Err("completion/complete: params.ref must be an object".into());
            };
            refuse_variants(params.unwrap_or(&Map::new()), &["ref"], "params")?;
            refuse_variants(reference, &["type", "name", "uri"], "params.ref")?;
            let member = |key: &str| match reference.get(key) {
                Some(Value::String(_)) => Ok(()),
                _ => Err(format!(
                    "completion/complete: params.ref.{key} must be a string"
                )),
            };
            member("type")?;
            // The member of the other kind is refused beside it: a server that picks by which
            // member is present would complete for what the policy did not judge.
            let (named, other) = match reference.get("type").and_then(Value::as_str) {
                Some("ref/prompt") => ("name", "uri"),
                Some("ref/resource") => ("uri", "name"),
                _ => return Ok(()),
            };
            member(named)?;
            if reference.contains_key(other) {
                return Err(format!(
                    "completion/complete: params.ref of type {:?} names its target by {named}; \
                     a {other} beside it is refused as ambiguous",
                    reference
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                ));
            }
            Ok(())
        }
        // Judged by whose task it is.
        m if super::tasks::names_task(m) => {
            refuse_variants(params.unwrap_or(&Map::new()), &["taskId"], "params")?;
            string_member("taskId")
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => string_member("uri"),
        // Its resource subscriptions are judged (`resourceSubscriptions`): one the policy
        // cannot find must not be one the upstream reads.
        "subscriptions/listen" => match params.and_then(|p| p.get("notifications")) {
            None => Ok(()),
            Some(Value::Object(n)) => {
                refuse_variants(n, &NOTIFICATION_MEMBERS, "params.notifications")
            }
            Some(other) => Err(format!(
                "subscriptions/listen: params.notifications must be an object, not {}",
                type_name(other)
            )),
        },
        _ => Ok(()),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A `serde_json::Value` deserializer that refuses duplicate keys (after unescaping, so
/// `"n\u0061me"` duplicates `"name"`), nesting deeper than `max_depth` and more than
/// `max_values` values (`left` counts down, shared by the whole document).
#[derive(Clone, Copy)]
struct Strict<'a> {
    depth: usize,
    max_depth: usize,
    left: &'a Cell<usize>,
    /// Set when a duplicate key was read (with `check_keys` off).
    duplicate: &'a Cell<bool>,
    max_values: usize,
    /// Refuse duplicate and case-variant keys (what agents send; not upstream answers, whose
    /// tool output may hold `ID` beside `id`: there the last of a duplicate wins, as in
    /// clients).
    check_keys: bool,
    /// What an object counts beyond its keys (its map's first node is most of its memory).
    object_cost: usize,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl Strict<'_> {
    fn nested<E: de::Error>(&self) -> Result<Self, E> {
        if self.depth + 1 > self.max_depth {
            return Err(E::custom(format!(
                "nesting deeper than {} levels",
                self.max_depth
            )));
        }
        self.count()?;
        Ok(Self {
            depth: self.depth + 1,
            ..*self
        })
    }

    /// One more value (or object key).
    fn count<E: de::Error>(&self) -> Result<(), E> {
        self.charge(1)
    }

    /// `n` values' worth.
    fn charge<E: de::Error>(&self, n: usize) -> Result<(), E> {
        match self.left.get().checked_sub(n) {
            Some(left) => {
                self.left.set(left);
                Ok(())
            }
            None => Err(E::custom(format!(
                "more than {} JSON values ({})",
                self.max_values,
                if self.check_keys {
                    "proxy.max_json_values"
                } else {
                    "proxy.max_response_values; an object counts 16"
                }
            ))),
        }
    }

    /// A scalar, counted.
    fn scalar<E: de::Error>(&self, v: Value) -> Result<Value, E> {
        self.count()?;
        Ok(v)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.scalar(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.scalar(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.scalar(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.scalar(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.count()?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.scalar(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.scalar(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.scalar(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(inner)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let inner = self.nested()?;
        // Its own count was taken by `nested`.
        inner.charge(self.object_cost.saturating_sub(1))?;
        let mut out = Map::new();
        // Folded keys, once the object is too large to compare each new key with every other,
        // or has a non-ASCII key (Unicode folding allocates: each key is folded once then).
        let mut folded: Option<std::collections::HashSet<String>> = None;
        while let Some(key) = map.next_key::<String>()? {
            // A key costs more than most values (its map entry): counted too.
            inner.count()?;
            let value = map.next_value_seed(inner)?;
            if !self.check_keys {
                if out.insert(key, value).is_some() {
                    self.duplicate.set(true);
                }
                continue;
            }
            if out.contains_key(&key) {
                return Err(de::Error::custom(format!("duplicate key {}", quoted(&key))));
            }
            // Case-insensitive decoders downstream would see one key where we see two.
            let variant = match &mut folded {
                // Every key so far is ASCII too (else the set exists): no folding needed.
                None if out.len() < FOLD_SCAN_MAX && key.is_ascii() => {
                    out.keys().find(|k| k.eq_ignore_ascii_case(&key)).cloned()
                }
                _ => {
                    let set =
                        folded.get_or_insert_with(|| out.keys().map(|k| fold_fast(k)).collect());
                    if set.insert(fold_fast(&key)) {
                        None
                    } else {
                        out.keys().find(|k| same_fold(k, &key)).cloned()
                    }
                }
            };
            if let Some(first) = variant {
                return Err(de::Error::custom(format!(
                    "keys {} and {} differ only in case; refused as ambiguous",
                    quoted(&first),
                    quoted(&key)
                )));
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

/// Up to this many ASCII keys, a new key is compared with each one already read (no
/// allocation); beyond, or from the first non-ASCII key, folded keys go into a set.
const FOLD_SCAN_MAX: usize = 16;

/// [`fold`], without the Unicode tables for ASCII keys (where it is ASCII lower-casing).
fn fold_fast(key: &str) -> String {
    if key.is_ascii() {
        key.to_ascii_lowercase()
    } else {
        fold(key)
    }
}

/// Whether two keys fold to the same text.
fn same_fold(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        a.eq_ignore_ascii_case(b)
    } else {
        fold(a) == fold(b)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ok(text: &str) -> Body {
        parse(text.as_bytes(), &Limits::default()).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    fn err(text: &[u8]) -> RpcError {
        parse(text, &Limits::default()).expect_err("must be refused")
    }

    #[test]
    fn parses_requests_notifications_and_responses() {
        let b = ok(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read","arguments":{"path":"/a"}}}"#,
        );
        assert!(!b.batch);
        assert_eq!(b.messages[0].method(), Some("tools/call"));
        assert_eq!(b.messages[0].target(), Some("read"));
        assert_eq!(b.messages[0].arguments(), Some(&json!({"path": "/a"})));
        let n = ok(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
        assert!(matches!(n.messages[0], Message::Notification { .. }));
        let r = ok(r#"{"jsonrpc":"2.0","id":"s-1","result":{}}"#);
        assert!(matches!(r.messages[0], Message::Response { .. }));
    }

    #[test]
    fn forwards_only_the_canonical_form() {
        let b = ok(
            r#"{ "params" : {"name":"read"}, "method":"tools/call", "id": 7, "jsonrpc":"2.0" }"#,
        );
        let v: Value = serde_json::from_slice(&b.to_bytes()).unwrap();
        assert_eq!(
            v,
            json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"read"}})
        );
    }

    #[test]
    fn a_request_cannot_pass_for_a_notification() {
        let e = err(br#"{"jsonrpc":"2.0","id":1,"method":"notifications/initialized"}"#);
        assert_eq!(e.code, code::INVALID_REQUEST);
        assert!(e.message.contains("notifications carry no id"), "{e}");
        ok(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#);
    }

    #[test]
    fn refuses_duplicate_and_escaped_duplicate_keys() {
        let e = err(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","name":"evil"}}"#);
        assert_eq!(e.code, code::INVALID_REQUEST);
        assert!(e.message.contains("duplicate key \"name\""), "{e}");
        let long = "k".repeat(1 << 20);
        let e = err(format!(r#"{{"{long}":1,"{long}":2}}"#).as_bytes());
        assert!(
            e.message.len() < 400 && e.message.contains("[1048576 bytes]"),
            "{}",
            e.message.len()
        );
        let e = err(br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"ok","n\u0061me":"evil"}}"#);
        assert!(e.message.contains("duplicate key"), "{e}");
        let e = err(br#"{"jsonrpc":"2.0","id":1,"method":"ping","method":"tools/call"}"#);
        assert!(e.message.contains("duplicate key \"method\""), "{e}");
    }

    #[test]
    fn refuses_unicode_case_variants_anywhere() {
        // ſ (U+017F) folds to s: a Go-style decoder would read this as "arguments".
        let e = err("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"r\",\"arguments\":{\"path\":\"/a\"},\"argument\u{17f}\":{\"path\":\"/etc\"}}}".as_bytes());
        assert!(e.message.contains("differ only in case"), "{e}");
        // Inside arguments too: Kelvin sign K (U+212A) folds to k.
        let e = err("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"r\",\"arguments\":{\"key\":1,\"\u{212a}ey\":2}}}".as_bytes());
        assert!(e.message.contains("differ only in case"), "{e}");
        // A lone variant of a member name is refused as well.
        let e = err("{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"nam\u{212a}\":\"x\"}}".as_bytes());
        assert!(
            e.message.contains("case variant") || e.message.contains("required"),
            "{e}"
        );
    }

    #[test]
    fn case_variants_are_found_in_large_objects_too() {
        // Past FOLD_SCAN_MAX keys the check switches to a set of folded keys: a variant is
        // caught whether it is ASCII or Unicode, early or late, and distinct keys pass.
        let many: Vec<String> = (0..40).map(|i| format!("\"key{i}\":{i}")).collect();
        let body = |extra: &str| {
            format!(
                "{{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{{\"name\":\"r\",\"arguments\":{{{},{extra}}}}}}}",
                many.join(",")
            )
        };
        for extra in ["\"KEY3\":0", "\"Key39\":0", "\"\u{212a}ey20\":0"] {
            let e = err(body(extra).as_bytes());
            assert!(e.message.contains("differ only in case"), "{extra}: {e}");
        }
        let b = ok(&body("\"key40\":40"));
        assert_eq!(
            b.messages[0]
                .arguments()
                .and_then(Value::as_object)
                .map(Map::len),
            Some(41)
        );
    }

    #[test]
    fn canonical_bytes_are_the_canonical_value_serialised() {
        for text in [
            r#"{"method":"tools/call","params":{"name":"r","arguments":{"b":[1,{"z":null}],"a":"\u00e9\n"}},"id":"x","jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","id":7,"method":"ping"}"#,
            r#"{"jsonrpc":"2.0","id":3,"result":{"roots":[]}}"#,
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"requestId":1}}]"#,
        ] {
            let b = ok(text);
            let expected = if b.batch {
                Value::Array(b.messages.iter().map(Message::to_value).collect())
            } else {
                b.messages[0].to_value()
            };
            assert_eq!(
                String::from_utf8(b.to_bytes()).unwrap_or_default(),
                serde_json::to_string(&expected).unwrap_or_default(),
                "{text}"
            );
        }
    }

    #[test]
    fn integers_from_2_pow_53_on_are_read_rounded_by_some() {
        let read = |id: &str| rounded_by_some_readers(id);
        assert_eq!(read("9007199254740993"), read("9007199254740992"));
        assert!(read("9007199254740992").is_some());
        assert_eq!(read("-9007199254740993"), read("-9007199254740992"));
        assert_ne!(read("9007199254740994"), read("9007199254740992"));
        for exact in ["9007199254740991", "1", "\"9007199254740993\"", "null"] {
            assert_eq!(read(exact), None, "{exact}");
        }
    }

    #[test]
    fn refuses_duplicate_ids_in_a_batch() {
        let e = err(br#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":1,"method":"tools/list"}]"#);
        assert!(e.message.contains("more than once"), "{e}");
        // One id to a reader holding numbers as doubles (2^53 + 1 rounds to 2^53).
        let e = err(br#"[{"jsonrpc":"2.0","id":9007199254740993,"method":"ping"},{"jsonrpc":"2.0","id":9007199254740992,"method":"tools/list"}]"#);
        assert!(e.message.contains("more than once"), "{e}");
        // Distinct to every reader: below 2^53, or a string beside the number.
        ok(
            r#"[{"jsonrpc":"2.0","id":9007199254740991,"method":"ping"},{"jsonrpc":"2.0","id":9007199254740990,"method":"ping"}]"#,
        );
        ok(
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":"1","method":"ping"}]"#,
        );
        ok(r#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"ping"}"#);
    }

    #[test]
    fn refuses_case_variants() {
        for body in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"Name":"evil","name":"ok"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","Params":{"name":"evil"},"params":{"name":"ok"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"ping","Method":"tools/call"}"#,
            r#"{"jsonrpc":"2.0","ID":1,"method":"tools/call","params":{"name":"x"}}"#,
        ] {
            let e = err(body.as_bytes());
            assert_eq!(e.code, code::INVALID_REQUEST, "{body}");
            assert!(
                e.message.contains("case variant") || e.message.contains("differ only in case"),
                "{body}: {e}"
            );
        }
    }

    #[test]
    fn refuses_snake_case_variants_of_what_the_policy_reads() {
        for (body, member) in [
            (&br#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":{"resource_subscriptions":["notes://secret"]}}}"#[..], "resourceSubscriptions"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":{"Resource-Subscriptions":["x"]}}}"#, "resourceSubscriptions"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"NOTIFICATIONS":{}}}"#, "notifications"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocol_version":"2025-06-18"}}"#, "protocolVersion"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r","_Meta":{}}}"#, "_meta"),
        ] {
            let e = err(body);
            assert_eq!(e.code, code::INVALID_REQUEST);
            assert!(
                e.message.contains("case variant") && e.message.contains(member),
                "{}: {e}",
                String::from_utf8_lossy(body)
            );
        }
        let e = err(br#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":["notes://secret"]}}"#);
        assert!(e.message.contains("must be an object"), "{e}");
        // The members themselves pass, and so does a name no decoder reads as one of them.
        ok(
            r#"{"jsonrpc":"2.0","id":1,"method":"subscriptions/listen","params":{"notifications":{"resourceSubscriptions":["a"],"toolsListChanged":true}}}"#,
        );
        ok(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"r","meta":{}}}"#);
    }

    #[test]
    fn a_completion_names_what_it_completes_for() {
        let m = |body: &str| ok(body).messages.remove(0);
        let prompt = m(
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"summarize"},"argument":{"name":"a","value":"b"}}}"#,
        );
        assert_eq!(
            prompt.completion_ref(),
            Some((Reference::Prompt, Some("summarize")))
        );
        assert_eq!((prompt.target(), prompt.named()), (None, Some("summarize")));
        let template = m(
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"file:///{path}"}}}"#,
        );
        assert_eq!(
            template.completion_ref(),
            Some((Reference::Resource, Some("file:///{path}")))
        );
        let other = m(
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/tool","name":"x"}}}"#,
        );
        assert_eq!(other.completion_ref(), Some((Reference::Other, None)));
        let call = m(r#"{"jsonrpc":"2.0","id":1,"method":"prompts/get","params":{"name":"p"}}"#);
        assert_eq!((call.completion_ref(), call.named()), (None, Some("p")));
    }

    #[test]
    fn refuses_malformed_shapes() {
        for (body, needle) in [
            (&br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":["read"]}"#[..], "params must be an object"),
            (br#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#, "id must be"),
            (br#"{"jsonrpc":"2.0","id":1.5,"method":"ping"}"#, "id must be"),
            (br#"{"jsonrpc":"1.0","id":1,"method":"ping"}"#, "\"2.0\""),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":7}}"#, "must be a string"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"a","arguments":[1]}}"#, "arguments must be an object"),
            (br#"["jsonrpc","2.0"]"#, "must be a JSON object"),
            (br#"[]"#, "empty batch"),
            (br#"{"jsonrpc":"2.0","id":1,"result":{},"error":{}}"#, "exactly one"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"x","extra":1}"#, "unexpected member"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{}}"#, "params.ref must be an object"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt"}}}"#, "params.ref.name must be a string"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":7}}}"#, "params.ref.uri must be a string"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"a","na_me":"b"}}}"#, "variant of \"name\""),
            (br#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"a","uri":"file:///{x}"}}}"#, "a uri beside it is refused"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/resource","uri":"file:///{x}","name":"a"}}}"#, "a name beside it is refused"),
            (br#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"a"},"r_ef":{}}}"#, "variant of \"ref\""),
        ] {
            let e = err(body);
            assert!(e.message.contains(needle), "{}: {e}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn refuses_invalid_utf8_trailing_data_and_deep_nesting() {
        assert_eq!(
            err(b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"p\xffing\"}").code,
            code::PARSE_ERROR
        );
        assert_eq!(
            err(br#"{"jsonrpc":"2.0","id":1,"method":"ping"} {}"#).code,
            code::PARSE_ERROR
        );
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a","arguments":{{"x":{}1{}}}}}}}"#,
            "[".repeat(70),
            "]".repeat(70)
        );
        let e = err(deep.as_bytes());
        assert!(e.message.contains("nesting deeper than 64"), "{e}");
    }

    #[test]
    fn bounds_values_batches_and_ids() {
        let limits = Limits {
            max_depth: 64,
            max_values: 40,
            max_batch: 3,
        };
        let call = |args: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"a","arguments":{args}}}}}"#
            )
        };
        // 9 values for the envelope (object, 4 keys, 3 scalars, params object) + name (2) +
        // arguments key and object (2) = 13; each {"":0} element adds 3, the array 2 (key, array).
        let elements = |n: usize| call(&format!(r#"{{"x":[{}]}}"#, vec![r#"{"":0}"#; n].join(",")));
        assert!(parse(elements(8).as_bytes(), &limits).is_ok());
        let e = parse(elements(9).as_bytes(), &limits).expect_err("over max_values");
        assert_eq!(e.code, code::INVALID_REQUEST);
        assert!(
            e.message
                .contains("more than 40 JSON values (proxy.max_json_values)"),
            "{e}"
        );
        // Keys count: an object of many keys is bounded like an array of many values.
        let keys: Vec<String> = (0..30).map(|i| format!(r#""k{i}":1"#)).collect();
        let e = parse(call(&format!("{{{}}}", keys.join(","))).as_bytes(), &limits)
            .expect_err("over max_values");
        assert!(e.message.contains("max_json_values"), "{e}");

        let batch = |n: usize| {
            let items: Vec<String> = (0..n)
                .map(|i| format!(r#"{{"jsonrpc":"2.0","id":{i},"method":"ping"}}"#))
                .collect();
            format!("[{}]", items.join(","))
        };
        assert_eq!(
            parse(batch(3).as_bytes(), &limits).map(|b| b.messages.len()),
            Ok(3)
        );
        let e = parse(batch(4).as_bytes(), &limits).expect_err("over max_batch");
        assert_eq!(e.code, code::INVALID_REQUEST);
        assert!(
            e.message.contains("a batch of 4 messages; at most 3"),
            "{e}"
        );

        let id = |n: usize| {
            format!(
                r#"{{"jsonrpc":"2.0","id":"{}","method":"ping"}}"#,
                "i".repeat(n)
            )
        };
        assert!(parse(id(MAX_ID_BYTES).as_bytes(), &limits).is_ok());
        let e = parse(id(MAX_ID_BYTES + 1).as_bytes(), &limits).expect_err("long id");
        assert!(e.message.contains("id of 257 bytes; at most 256"), "{e}");
        assert_eq!(e.id, None, "a refused id is not echoed");
        // An id of the wrong type is named by its type, not echoed into logs and answers.
        let e = err(br#"{"jsonrpc":"2.0","id":{"api_key":"sk-secret"},"method":"ping"}"#);
        assert!(!e.message.contains("sk-secret"), "{e}");
        assert!(e.message.contains("not an object"), "{e}");
    }

    #[test]
    fn upstream_answers_are_read_within_a_budget_objects_counting_more() {
        // Tool output may hold keys only case tells apart, and duplicates (the last wins).
        assert_eq!(
            parse_answer(br#"{"ID":1,"id":2,"id":3}"#, 100),
            Ok((json!({"ID": 1, "id": 3}), true))
        );
        // 1 (object) + 15 (its cost) + 2 keys + 2 values = 20.
        assert!(parse_answer(br#"{"a":1,"b":2}"#, 20).is_ok());
        let e = parse_answer(br#"{"a":1,"b":2}"#, 19).expect_err("over");
        assert!(
            e.contains("more than 19 JSON values (proxy.max_response_values"),
            "{e}"
        );
        let tiny = format!("[{}]", vec![r#"{"":0}"#; 1000].join(","));
        assert!(
            parse_answer(tiny.as_bytes(), 10_000).is_err(),
            "1,000 objects: 18,001"
        );
        assert!(parse_answer(tiny.as_bytes(), 20_000).is_ok());
        assert!(parse_answer(b"{} x", 100).is_err());
        assert!(parse_answer(b"NaN", 100).is_err());
        assert_eq!(
            parse_answer(br#"{"a":{"a":1}}"#, 100),
            Ok((json!({"a": {"a": 1}}), false))
        );
        let deep = format!("{}{}", "[".repeat(127), "]".repeat(127));
        assert!(
            parse_answer(deep.as_bytes(), 1000).is_ok(),
            "serde_json's depth"
        );
    }

    #[test]
    fn json_inside_a_string_is_read_within_its_own_bound() {
        assert_eq!(parse_value(r#"{"a":[1,2]}"#, 5), Some(json!({"a": [1, 2]})));
        assert_eq!(parse_value(r#"{"a":[1,2,3]}"#, 5), None, "6 values");
        assert_eq!(parse_value(r#"{"a":1,"a":2}"#, 100), None, "duplicate key");
        assert_eq!(parse_value("{} x", 100), None, "trailing text");
    }

    #[test]
    fn batches_are_parsed_element_by_element() {
        let b = ok(
            r#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"x"}}]"#,
        );
        assert!(b.batch);
        assert_eq!(b.messages.len(), 2);
        let e = err(br#"[{"jsonrpc":"2.0","id":1,"method":"tools/list"},{"jsonrpc":"2.0","id":2,"method":"tools/call","Params":{}}]"#);
        assert_eq!(e.id, Some(json!(2)));
    }
}
