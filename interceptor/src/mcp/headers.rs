//! Header rules: ambiguous framing, hop-by-hop headers, and the 2026-07-28 `Mcp-*` headers
//! that must agree with the body.

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, header};
use serde_json::Value;

use super::jsonrpc::{Body, RpcError, code};

/// The first protocol revision whose requests must carry `Mcp-Method` / `Mcp-Name`.
pub const STATELESS_VERSION: &str = "2026-07-28";

/// Refuses ambiguous HTTP framing before the body is read: duplicate `Content-Length`,
/// `Content-Length` with `Transfer-Encoding`, or any `Transfer-Encoding` other than a plain
/// `chunked`. (The upstream request is re-framed anyway; this keeps a desync attempt from
/// being served at all.)
pub fn check_framing(headers: &HeaderMap) -> Result<(), String> {
    let cl = headers.get_all(header::CONTENT_LENGTH).iter().count();
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if cl > 1 {
        return Err("more than one Content-Length header".into());
    }
    if cl == 1 && !te.is_empty() {
        return Err("both Content-Length and Transfer-Encoding".into());
    }
    if te.len() > 1 || te.first().is_some_and(|v| v.as_bytes() != b"chunked") {
        return Err("Transfer-Encoding other than a single \"chunked\"".into());
    }
    Ok(())
}

/// Query parameters frameworks read as the request's method instead of its own (Laravel and
/// Symfony `_method`, Express's and Hono's `methodOverride`), compared as [`override_form`]
/// gives them: the audit log would record a POST the server routes as a DELETE or a PUT.
const METHOD_OVERRIDES: [&str; 6] = [
    "method",
    "httpmethod",
    "methodoverride",
    "xhttpmethod",
    "xhttpmethodoverride",
    "xmethodoverride",
];

/// A query parameter's name as [`METHOD_OVERRIDES`] lists them: percent-decoded, lower case,
/// letters and digits only (`_method`, `X-HTTP-Method-Override`, `_method[]`).
fn override_form(name: &str) -> String {
    name.chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Refuses a request target an upstream could read as another request than the one judged and
/// recorded: a path that does not start with `/` (joined to the upstream's authority, it would
/// be read as part of it), and a query naming another method (`?_method=DELETE`).
pub fn check_target(uri: &http::Uri) -> Result<(), String> {
    let path = uri.path();
    if !path.starts_with('/') {
        return Err(format!(
            "request target {:?} does not start with /",
            &path[..path.floor_char_boundary(64)]
        ));
    }
    for (name, _) in form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
        if METHOD_OVERRIDES.contains(&override_form(&name).as_str()) {
            return Err(format!(
                "query parameter {:?} would override the request's method; MCP requests use \
                 POST, GET and DELETE as sent",
                &name[..name.floor_char_boundary(64)]
            ));
        }
    }
    Ok(())
}

/// Longest `Mcp-Session-Id` accepted (bytes): it is copied into every audit event of the
/// request and held by its pending answers.
pub const MAX_SESSION_ID_BYTES: usize = 1024;

/// Refuses `Mcp-*` header values that cannot be what they claim, before anything is read or
/// recorded: a protocol version that is not a revision date (`YYYY-MM-DD`; it is copied into
/// every event of the request), a session id over [`MAX_SESSION_ID_BYTES`].
pub fn check_value_shapes(headers: &HeaderMap) -> Result<(), String> {
    for v in headers.get_all("mcp-protocol-version") {
        let b = v.as_bytes();
        let date = b.len() == 10
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                _ => c.is_ascii_digit(),
            });
        if !date {
            return Err(format!(
                "Mcp-Protocol-Version {:?} is not a protocol revision (YYYY-MM-DD)",
                String::from_utf8_lossy(&b[..b.len().min(32)])
            ));
        }
    }
    for v in headers.get_all("mcp-session-id") {
        if v.len() > MAX_SESSION_ID_BYTES {
            return Err(format!(
                "Mcp-Session-Id of {} bytes; at most {MAX_SESSION_ID_BYTES} are accepted",
                v.len()
            ));
        }
    }
    Ok(())
}

/// Hop-by-hop headers, those the proxy sets itself (`accept-encoding`: the proxy must be
/// able to read what comes back, so it asks for identity encoding; `expect`: the body was
/// read whole before anything is forwarded), and the headers proxies use to tell a server
/// who the client is (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, `X-Client-IP`,
/// `True-Client-IP`, and the like of CDNs and Envoy) or its certificate (`Client-Cert`,
/// `X-SSL-*`, `X-Client-Verify`, …) or the user an authenticating proxy vouches for
/// (`X-Remote-User`, `X-Auth-Request-*`, `Impersonate-*`, …): an agent's own copies would be
/// believed by a server that trusts its proxy — which an upstream requiring the node's client
/// certificates does. And the overrides some frameworks honour instead of the request's own
/// method or target (`X-HTTP-Method-Override`, `X-Original-URI`, …): the audit log would
/// record one request and the server act on another.
pub fn skip_header(name: &header::HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-forwarded")
        // The user (and groups) an authenticating front proxy vouches for: Kubernetes'
        // request-header authentication (trusted exactly when the client presents a
        // front-proxy certificate, as this proxy does), oauth2-proxy, Kong, Google IAP, Azure
        // App Service, AWS ALB, Cloudflare Access, Pomerium; Kubernetes impersonation; Envoy's
        // internal headers.
        || name.starts_with("x-remote-")
        || name.starts_with("x-auth-request-")
        || name.starts_with("x-webauth-")
        || name.starts_with("x-authenticated-")
        || name.starts_with("x-consumer-")
        || name.starts_with("x-goog-authenticated-user-")
        || name.starts_with("x-ms-client-principal")
        || name.starts_with("x-amzn-oidc-")
        || name.starts_with("x-pomerium-")
        // Vouch Proxy's, Azure App Service's tokens, Linkerd's (`l5d-client-id` names the
        // mesh identity; `l5d-dst-override` reroutes).
        || name.starts_with("x-vouch-")
        || name.starts_with("x-ms-token-aad-")
        || name.starts_with("l5d-")
        // Authelia's `Remote-User`/`-Groups`/`-Email`/`-Name`, authentik's, Tailscale
        // Serve's `Tailscale-User-*`.
        || name.starts_with("remote-")
        || name.starts_with("x-authentik-")
        || name.starts_with("tailscale-")
        || name.starts_with("impersonate-")
        || name.starts_with("x-envoy-")
        // What a TLS-terminating front proxy says of the client's certificate (RFC 9440,
        // nginx's, IIS ARR's, AWS's and others' conventions): the agent's copies would speak
        // for the node.
        || name.starts_with("x-ssl-")
        || name.starts_with("ssl-client")
        || name.starts_with("x-client-cert")
        || name.starts_with("client-cert")
        || name.starts_with("x-amzn-mtls-")
        || matches!(
            name,
            "accept-encoding"
                | "connection"
                | "expect"
                | "keep-alive"
                | "proxy-connection"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "host"
                | "content-length"
                | "forwarded"
                | "x-real-ip"
                | "x-client-ip"
                | "x-cluster-client-ip"
                | "x-original-forwarded-for"
                // Client-address headers that libraries read after the above (npm's
                // `request-ip`, WebLogic's and Oracle's proxies, App Engine).
                | "forwarded-for"
                | "x-0-client-ip"
                | "x-appengine-user-ip"
                | "proxy-client-ip"
                | "wl-proxy-client-ip"
                | "x-originating-ip"
                | "true-client-ip"
                | "cf-connecting-ip"
                | "fastly-client-ip"
                | "x-client-verify"
                | "x-client-dn"
                | "x-arr-clientcert"
                // Cloudflare Access's word on the user (not its service-token headers,
                // `Cf-Access-Client-Id`/`-Secret`, which clients send).
                | "cf-access-authenticated-user-email"
                | "cf-access-jwt-assertion"
                | "x-userinfo"
                | "x-jwt-payload"
                // The user names nginx `auth_request` setups, Oathkeeper and oauth2_proxy's
                // older `GAP-Auth` pass on.
                | "x-user"
                | "x-user-id"
                | "x-user-name"
                | "x-user-email"
                | "x-user-groups"
                | "x-user-roles"
                | "x-email"
                | "x-auth-user"
                | "x-auth-email"
                | "x-auth-userid"
                | "gap-auth"
                | "x-endpoint-api-userinfo"
                // Route, host and method overrides some frameworks honour instead of the
                // request's own (ASP.NET, Express, gorilla, Symfony, IIS, nginx setups).
                | "x-original-url"
                | "x-original-uri"
                | "x-original-host"
                | "x-rewrite-url"
                | "x-host"
                | "x-http-method-override"
                | "x-http-method"
                | "x-method-override"
                | "x-original-method"
                // Werkzeug's and WSGI `ReverseProxied` shims' mount prefix.
                | "x-script-name"
        )
}

/// MCP bodies are UTF-8 JSON, and the proxy judges them as such; a request declaring another
/// charset (`application/json; charset=utf-7`) could be read differently by the server (the
/// TypeScript SDK decodes by the declared charset). Refused; the forwarded request declares
/// `application/json` itself.
pub fn check_charset(headers: &HeaderMap) -> Result<(), String> {
    for value in headers.get_all(header::CONTENT_TYPE) {
        let text = value
            .to_str()
            .map_err(|_| "Content-Type is not ASCII".to_owned())?;
        for param in text.split(';').skip(1) {
            let Some((key, charset)) = param.split_once('=') else {
                continue;
            };
            let charset = charset.trim().trim_matches('"');
            if key.trim().eq_ignore_ascii_case("charset")
                && !charset.eq_ignore_ascii_case("utf-8")
                && !charset.eq_ignore_ascii_case("utf8")
            {
                return Err(format!(
                    "Content-Type {text:?}: MCP bodies are UTF-8 JSON; send charset=utf-8 or none"
                ));
            }
        }
    }
    Ok(())
}

/// A header value as text, decoding the `=?base64?…?=` form MCP uses for non-ASCII values.
pub(super) fn header_text(v: &HeaderValue) -> Option<String> {
    let s = v.to_str().ok()?;
    if let Some(inner) = s
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(inner)
            .ok()?;
        return String::from_utf8(bytes).ok();
    }
    Some(s.to_owned())
}

/// Where a 2026-07-28 message names its protocol revision, in `params._meta`.
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";

/// The protocol revision `msg` names in `params._meta`, if any; refused when it is no string, or
/// when a key differing only in case stands beside it or for it (a server reading keys
/// without case would take that one).
fn meta_version(msg: &super::jsonrpc::Message) -> Result<Option<&str>, String> {
    let Some(meta) = msg
        .params()
        .and_then(|p| p.get("_meta"))
        .and_then(Value::as_object)
    else {
        return Ok(None);
    };
    if meta
        .keys()
        .any(|k| k != META_VERSION && k.eq_ignore_ascii_case(META_VERSION))
    {
        return Err(format!("_meta holds a variant of {META_VERSION:?}"));
    }
    match meta.get(META_VERSION) {
        None => Ok(None),
        Some(Value::String(v)) => Ok(Some(v)),
        Some(_) => Err(format!("_meta's {META_VERSION:?} is not a string")),
    }
}

/// Whether the request's `MCP-Protocol-Version` is 2026-07-28 or later: its `Mcp-*` headers are
/// then required. (A body naming such a revision without the header, or another one, is
/// refused by [`check_mcp_headers`] first.)
pub(super) fn is_stateless(headers: &HeaderMap) -> bool {
    headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v >= STATELESS_VERSION)
}

/// 2026-07-28: `Mcp-Method` / `Mcp-Name` must agree with the body (and are required from that
/// revision on). Never authorise on them; only check them.
pub fn check_mcp_headers(headers: &HeaderMap, body: &Body) -> Result<(), RpcError> {
    let mismatch = |msg: String, id: Option<&Value>| RpcError {
        code: code::HEADER_MISMATCH,
        message: msg,
        id: id.cloned(),
    };
    for name in ["mcp-method", "mcp-name", "mcp-protocol-version"] {
        if headers.get_all(name).iter().count() > 1 {
            // One copy checked, another read by someone downstream: refuse the ambiguity.
            return Err(mismatch(format!("repeated {name} header"), None));
        }
    }
    // The header must name the revision the body's `_meta` names, and is required when that
    // is 2026-07-28 or later: a server acts on the body's.
    let header_version = headers
        .get("mcp-protocol-version")
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let mut body_stateless = false;
    for msg in &body.messages {
        let version = meta_version(msg).map_err(|why| mismatch(why, msg.id()))?;
        match (header_version, version) {
            (Some(h), Some(b)) if h != b => {
                return Err(mismatch(
                    format!(
                        "MCP-Protocol-Version header {h:?} does not match the body's _meta \
                         protocol version {b:?}"
                    ),
                    msg.id(),
                ));
            }
            (None, Some(b)) if b >= STATELESS_VERSION => {
                return Err(mismatch(
                    format!(
                        "MCP-Protocol-Version header is required: the body's _meta names {b:?}"
                    ),
                    msg.id(),
                ));
            }
            _ => {}
        }
        body_stateless |= version.is_some_and(|b| b >= STATELESS_VERSION);
    }
    let stateless = is_stateless(headers) || body_stateless;
    let method_h = headers.get("mcp-method");
    let name_h = headers.get("mcp-name");
    if body.batch {
        if method_h.is_some() || name_h.is_some() {
            return Err(mismatch(
                "Mcp-Method/Mcp-Name headers on a batch".into(),
                None,
            ));
        }
        return Ok(());
    }
    let Some(msg) = body.messages.first() else {
        return Ok(());
    };
    let id = msg.id();
    match (method_h.map(header_text), msg.method()) {
        (Some(Some(h)), Some(m)) if h != m => {
            return Err(mismatch(
                format!("Mcp-Method header {h:?} does not match the body's method {m:?}"),
                id,
            ));
        }
        (Some(None), _) => return Err(mismatch("Mcp-Method header is not valid text".into(), id)),
        (Some(_), None) => {
            return Err(mismatch("Mcp-Method header on a response".into(), id));
        }
        (None, Some(m)) if stateless => {
            return Err(mismatch(
                format!(
                    "Mcp-Method header is required (protocol {STATELESS_VERSION}); body has {m:?}"
                ),
                id,
            ));
        }
        _ => {}
    }
    match (name_h.map(header_text), msg.target()) {
        (Some(Some(h)), Some(t)) if h != t => Err(mismatch(
            format!("Mcp-Name header {h:?} does not match the body's {t:?}"),
            id,
        )),
        (Some(None), _) => Err(mismatch("Mcp-Name header is not valid text".into(), id)),
        (Some(_), None) => Err(mismatch(
            "Mcp-Name header on a request that names nothing".into(),
            id,
        )),
        (None, Some(t)) if stateless => Err(mismatch(
            format!("Mcp-Name header is required (protocol {STATELESS_VERSION}); body names {t:?}"),
            id,
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mcp_header_values_must_have_their_shape() {
        assert!(check_value_shapes(&headers(&[("mcp-protocol-version", "2025-06-18")])).is_ok());
        for bad in [
            "2025-6-18",
            "2025-06-18x",
            "latest",
            "2025/06/18",
            "２025-06-18",
        ] {
            let e = check_value_shapes(&headers(&[("mcp-protocol-version", bad)])).expect_err(bad);
            assert!(e.contains("not a protocol revision"), "{e}");
        }
        let long = "a".repeat(60_000);
        let e = check_value_shapes(&headers(&[("mcp-protocol-version", &long)])).expect_err("long");
        assert!(e.len() < 120, "the value is not echoed whole: {e}");
        let id = "s".repeat(MAX_SESSION_ID_BYTES);
        assert!(check_value_shapes(&headers(&[("mcp-session-id", &id)])).is_ok());
        let id = "s".repeat(MAX_SESSION_ID_BYTES + 1);
        let e = check_value_shapes(&headers(&[("mcp-session-id", &id)])).expect_err("long id");
        assert!(e.contains("Mcp-Session-Id of 1025 bytes"), "{e}");
    }

    #[test]
    fn claims_a_trusted_proxy_would_make_are_not_forwarded() {
        for name in [
            "x-forwarded-for",
            "forwarded",
            "x-real-ip",
            "x-ssl-client-verify",
            "client-cert",
            "x-remote-user",
            "x-remote-group",
            "x-remote-extra-scopes",
            "remote-user",
            "remote-groups",
            "remote-email",
            "x-authentik-groups",
            "tailscale-user-login",
            "x-forwarded",
            "forwarded-for",
            "x-0-client-ip",
            "x-appengine-user-ip",
            "proxy-client-ip",
            "wl-proxy-client-ip",
            "x-auth-request-email",
            "x-webauth-user",
            "x-authenticated-userid",
            "x-consumer-username",
            "x-userinfo",
            "x-jwt-payload",
            "x-endpoint-api-userinfo",
            "x-goog-authenticated-user-email",
            "x-ms-client-principal-name",
            "x-amzn-oidc-identity",
            "cf-access-authenticated-user-email",
            "x-pomerium-claim-email",
            "impersonate-user",
            "impersonate-group",
            "x-envoy-original-dst-host",
            "x-envoy-internal",
            "x-original-uri",
            "x-original-url",
            "x-original-host",
            "x-host",
            "x-http-method-override",
            "x-http-method",
            "x-method-override",
            "transfer-encoding",
            "host",
        ] {
            let name = header::HeaderName::from_static(name);
            assert!(skip_header(&name), "{name} is forwarded");
        }
        for name in [
            "mcp-session-id",
            "mcp-protocol-version",
            "mcp-method",
            "mcp-name",
            "mcp-param-region",
            "last-event-id",
            "accept",
            "user-agent",
            "traceparent",
            "x-request-id",
            "content-type",
            "cf-access-client-id",
        ] {
            let name = header::HeaderName::from_static(name);
            assert!(!skip_header(&name), "{name} is dropped");
        }
    }

    #[test]
    fn only_utf8_bodies_are_taken() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/json; charset=utf8; x=y",
            "text/plain",
        ] {
            assert!(
                check_charset(&headers(&[("content-type", ok)])).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "application/json; charset=utf-7",
            "application/json; CHARSET=\"utf-16\"",
            "application/json; x=y; charset=latin1",
        ] {
            assert!(
                check_charset(&headers(&[("content-type", bad)])).is_err(),
                "{bad}"
            );
        }
        let two = headers(&[
            ("content-type", "application/json"),
            ("content-type", "application/json; charset=utf-7"),
        ]);
        assert!(check_charset(&two).is_err());
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(check_framing(&headers(&[("content-length", "5")])).is_ok());
        assert!(check_framing(&headers(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(
            check_framing(&headers(&[
                ("content-length", "5"),
                ("content-length", "5")
            ]))
            .is_err()
        );
        assert!(
            check_framing(&headers(&[
                ("content-length", "5"),
                ("transfer-encoding", "chunked")
            ]))
            .is_err()
        );
        assert!(check_framing(&headers(&[("transfer-encoding", "xchunked")])).is_err());
        assert!(check_framing(&headers(&[("transfer-encoding", "chunked, identity")])).is_err());
    }

    fn body(text: &str) -> Body {
        crate::mcp::jsonrpc::parse(text.as_bytes(), &Default::default()).unwrap()
    }

    #[test]
    fn mcp_headers_must_match_the_body() {
        let call =
            body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read"}}"#);
        let v = ("mcp-protocol-version", "2026-07-28");
        assert!(
            check_mcp_headers(
                &headers(&[v, ("mcp-method", "tools/call"), ("mcp-name", "read")]),
                &call
            )
            .is_ok()
        );
        let e = check_mcp_headers(
            &headers(&[v, ("mcp-method", "tools/call"), ("mcp-name", "delete")]),
            &call,
        )
        .unwrap_err();
        assert_eq!(e.code, code::HEADER_MISMATCH);
        let e = check_mcp_headers(
            &headers(&[v, ("mcp-method", "tools/list"), ("mcp-name", "read")]),
            &call,
        )
        .unwrap_err();
        assert_eq!(e.code, code::HEADER_MISMATCH);
        // Required from 2026-07-28 on, optional before.
        assert!(check_mcp_headers(&headers(&[v]), &call).is_err());
        assert!(
            check_mcp_headers(&headers(&[("mcp-protocol-version", "2025-06-18")]), &call).is_ok()
        );
        // Repeated headers are ambiguous.
        assert!(
            check_mcp_headers(
                &headers(&[
                    v,
                    ("mcp-method", "tools/call"),
                    ("mcp-name", "read"),
                    ("mcp-name", "delete")
                ]),
                &call
            )
            .is_err()
        );
        // Non-ASCII names travel base64-encoded.
        let uni =
            body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"lire_é"}}"#);
        let enc = format!(
            "=?base64?{}?=",
            base64::engine::general_purpose::STANDARD.encode("lire_é")
        );
        assert!(
            check_mcp_headers(
                &headers(&[v, ("mcp-method", "tools/call"), ("mcp-name", &enc)]),
                &uni
            )
            .is_ok()
        );
    }

    #[test]
    fn the_protocol_version_header_must_name_the_bodys() {
        let meta = |version: &str| {
            body(&format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"read","_meta":{{"io.modelcontextprotocol/protocolVersion":{version}}}}}}}"#
            ))
        };
        let modern = [("mcp-method", "tools/call"), ("mcp-name", "read")];
        let with = |version: &str| {
            let mut h = vec![("mcp-protocol-version", version)];
            h.extend(modern);
            headers(&h)
        };
        assert!(check_mcp_headers(&with("2026-07-28"), &meta("\"2026-07-28\"")).is_ok());
        let refused = |h: &HeaderMap, b: &Body, want: &str| {
            let e = check_mcp_headers(h, b).expect_err(want);
            assert_eq!(e.code, code::HEADER_MISMATCH);
            assert!(e.message.contains(want), "{} / {want}", e.message);
        };
        refused(
            &with("2025-11-25"),
            &meta("\"2026-07-28\""),
            "does not match",
        );
        // The body names 2026-07-28: the header, and the Mcp-* headers, are required.
        refused(
            &headers(&modern),
            &meta("\"2026-07-28\""),
            "header is required",
        );
        refused(&headers(&[]), &meta("\"2026-07-28\""), "header is required");
        // No string, or a variant a case-insensitive reader takes.
        refused(&with("2026-07-28"), &meta("20260728"), "not a string");
        let variant = body(
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read","_meta":{"io.modelcontextprotocol/ProtocolVersion":"2025-06-18"}}}"#,
        );
        refused(&with("2026-07-28"), &variant, "variant");
        // An earlier revision in the body needs no header.
        assert!(check_mcp_headers(&headers(&[]), &meta("\"2025-11-25\"")).is_ok());
    }

    #[test]
    fn targets_a_server_could_read_as_another_request_are_refused() {
        for ok in [
            "/mcp",
            "/mcp?session_id=abc",
            "/messages/?method_name=x",
            "http://h/mcp",
        ] {
            let uri: http::Uri = ok.parse().unwrap();
            assert!(check_target(&uri).is_ok(), "{ok}");
        }
        for bad in [
            "/mcp?_method=DELETE",
            "/mcp?x=1&_METHOD=put",
            "/mcp?X-HTTP-Method-Override=DELETE",
            "/mcp?%5Fmethod=PATCH",
            "/mcp?_method%5B%5D=DELETE",
        ] {
            let uri: http::Uri = bad.parse().unwrap();
            let e = check_target(&uri).expect_err(bad);
            assert!(e.contains("override the request's method"), "{e}");
        }
        // A target that is no path (`OPTIONS *` form; `http` refuses others without a `/`).
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("*"));
        let uri = http::Uri::from_parts(parts).expect("a path-only URI");
        let e = check_target(&uri).expect_err("no leading slash");
        assert!(e.contains("does not start with /"), "{e}");
    }
}
