#![expect(
    clippy::unwrap_used,
    reason = "test fixtures: any failure is a test failure"
)]

//! Identity leaves the node: real mutual TLS 1.3 towards an MCP server (official Rust SDK behind
//! a rustls acceptor that requires client certificates from the node CA), through the kernel
//! redirect, with per-workload certificates, signed assertions and injected credentials.

use std::{collections::HashSet, path::Path, process::Command};

use base64::Engine as _;
use interceptor_tests::{
    McpServer, ServerSpec, TestEnv, free_port, interceptor_bin, json_lines, json_post, mcp_client,
    privileged, rmcp_client, scrape_metrics, send_raw, send_raw_env, write_server_pki,
};
use p256::ecdsa::{Signature, VerifyingKey, signature::Verifier};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use serde_json::{Value, json};
use sha2::Digest as _;

const PROBE: &str = env!("CARGO_BIN_EXE_probe-client");
const RMCP_PEER: &str = env!("CARGO_BIN_EXE_rmcp-peer");

/// A CA and a server certificate for the upstream: DNS notes.test, IP 127.0.0.1, URI
/// spiffe://upstream.test/notes.
fn upstream_pki(dir: &Path) {
    write_server_pki(
        dir,
        "notes.test",
        &["127.0.0.1"],
        Some("spiffe://upstream.test/notes"),
    );
    // Another CA that never issued anything the upstream holds.
    let other_key = KeyPair::generate().unwrap();
    let mut other = CertificateParams::new(Vec::<String>::new()).unwrap();
    other.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(
        dir.join("other-ca.pem"),
        other.self_signed(&other_key).unwrap().pem(),
    )
    .unwrap();
}

fn verify_jws(token: &str, jwks: &Value) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "{token}");
    let b64 = |s: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s)
            .expect("base64url")
    };
    let header: Value = serde_json::from_slice(&b64(parts[0])).expect("header");
    assert_eq!(header["alg"], "ES256");
    let key = jwks["keys"]
        .as_array()
        .and_then(|ks| ks.iter().find(|k| k["kid"] == header["kid"]))
        .expect("kid in JWKS");
    let jwk =
        json!({"kty": key["kty"], "crv": key["crv"], "x": key["x"], "y": key["y"]}).to_string();
    let vk = VerifyingKey::from(p256::PublicKey::from_jwk_str(&jwk).expect("JWK"));
    let sig = Signature::from_slice(&b64(parts[2])).expect("signature");
    vk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("the assertion verifies with the JWKS");
    serde_json::from_slice(&b64(parts[1])).expect("claims")
}

#[test]
fn upstream_sees_each_workloads_certificate_and_a_verifiable_assertion() {
    if !privileged() {
        return;
    }
    let mut env = TestEnv::new("mtls");
    let dir = env.tmp.path().to_owned();
    interceptor_tests::node_ca(&dir.join("ca"));
    upstream_pki(&dir);
    let token = dir.join("token");
    std::fs::write(&token, "upstream-secret\n").unwrap();

    let port = free_port();
    let seen_file = dir.join("seen.jsonl");
    let server = McpServer::spawn_cmd(
        {
            let mut c = Command::new(RMCP_PEER);
            c.args(["server-tls", &format!("127.0.0.1:{port}")])
                .arg(dir.join("calls"))
                .arg(dir.join("server.pem"))
                .arg(dir.join("server-key.pem"))
                .arg(dir.join("ca/ca.pem"))
                .arg(&seen_file);
            c
        },
        port,
    );
    let readers = env.cgroup("readers");
    let writers = env.cgroup("writers");
    let intercept = |p: u16| format!("127.0.0.2:{p}");
    let (p_ok, p_name, p_id, p_ca) = (free_port(), free_port(), free_port(), free_port());
    let p_ungranted = free_port();
    let upstream = format!("https://127.0.0.1:{port}");
    let tls = |ca: &str, name: &str, id: &str| {
        format!(
            "tls = {{ ca = \"{}\", server_name = \"{name}\", server_id = \"{id}\" }}",
            dir.join(ca).display()
        )
    };
    let servers = format!(
        r#"
[[server]]
name = "notes"
intercept = ["{ok}"]
upstream = "{upstream}"
{tls_ok}
inject_headers = {{ X-Api-Key = {{ file = "{token}" }} }}

[[server]]
name = "wrong-name"
intercept = ["{name}"]
upstream = "{upstream}"
{tls_name}

[[server]]
name = "wrong-id"
intercept = ["{id}"]
upstream = "{upstream}"
{tls_id}

[[server]]
name = "untrusted"
intercept = ["{ca}"]
upstream = "{upstream}"
{tls_ca}

[[server]]
name = "ungranted"
intercept = ["{ungranted}"]
upstream = "{upstream}"
{tls_ok}

[ca]
cert = "{cacert}"
key = "{cakey}"
leaf_ttl = "2s"

[[role]]
name = "all"
servers = ["notes", "wrong-*", "untrusted"]
allow_tools = ["*"]

[[binding]]
role = "all"
cgroup = "{root}/**"
"#,
        ok = intercept(p_ok),
        name = intercept(p_name),
        id = intercept(p_id),
        ca = intercept(p_ca),
        ungranted = intercept(p_ungranted),
        tls_ok = tls(
            "upstream-ca.pem",
            "notes.test",
            "spiffe://upstream.test/notes"
        ),
        tls_name = tls(
            "upstream-ca.pem",
            "other.test",
            "spiffe://upstream.test/notes"
        ),
        tls_id = tls(
            "upstream-ca.pem",
            "notes.test",
            "spiffe://upstream.test/other"
        ),
        tls_ca = tls("other-ca.pem", "notes.test", "spiffe://upstream.test/notes"),
        token = token.display(),
        cacert = dir.join("ca/ca.pem").display(),
        cakey = dir.join("ca/ca-key.pem").display(),
        root = env.root,
    );
    let metrics_port = free_port();
    env.daemon_extra = format!("metrics_addr = \"127.0.0.1:{metrics_port}\"\n");
    env.write_config_with(&[] as &[ServerSpec], &[&readers, &writers], &servers);
    env.start_daemon();

    // Two agents in two cgroups, two SDKs.
    let url = format!("http://{}/mcp", intercept(p_ok));
    let a = rmcp_client(
        RMCP_PEER,
        &env.dir(&readers),
        &url,
        &[r#"search={"q":"a"}"#],
    );
    assert_eq!(a["calls"]["search"]["ok"], true, "{a}\n{}", env.log_text());
    let b = mcp_client(
        &env.dir(&writers),
        &url,
        "streamable-http",
        "legacy",
        &[r#"read_note={"name":"b"}"#],
    );
    assert_eq!(
        b["calls"]["read_note"]["ok"],
        true,
        "{b}\n{}",
        server.log_text()
    );

    // Agents that connect per call: several processes of one workload, one request each, in
    // quick succession. From the second on, their assertions are signed ahead for the
    // workload; each must still be its own (checked with all the others below).
    let before_one_shot = json_lines(&seen_file).len();
    for _ in 0..4 {
        // A sessionless ping: the SDK server answers 400, which is fine here; what matters is
        // that it was forwarded (counted below from what the upstream saw).
        let r = interceptor_tests::run_client(PROBE, &env.dir(&readers), &intercept(p_ok));
        assert!(r.status.is_some(), "{r:?}");
    }
    let lines = json_lines(&seen_file);
    assert_eq!(lines.len(), before_one_shot + 4);
    assert!(!lines.is_empty());
    let sans: HashSet<String> = lines
        .iter()
        .flat_map(|l| l["client_uri_sans"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    assert_eq!(sans.len(), 2, "{sans:?}");
    assert!(
        sans.iter()
            .any(|s| s.contains(&format!("/cgroup{readers}/"))),
        "{sans:?}"
    );
    assert!(
        sans.iter()
            .any(|s| s.contains(&format!("/cgroup{writers}/"))),
        "{sans:?}"
    );

    let out = Command::new(interceptor_bin())
        .args(["ca", "jwks", "--config"])
        .arg(&env.config_path)
        .output()
        .expect("ca jwks");
    let jwks: Value = serde_json::from_slice(&out.stdout).expect("JWKS JSON");
    let mut jtis = HashSet::new();
    for l in &lines {
        // The upstream is configured as https://host:port: the request target is the agent's.
        assert_eq!(l["target"], "/mcp", "{l}");
        let token = l["identity"].as_str().expect("assertion on every request");
        let claims = verify_jws(token, &jwks);
        assert_eq!(claims["aud"], "notes");
        let sub = claims["sub"].as_str().unwrap_or_default().to_owned();
        // The assertion names the same workload as the certificate of the connection.
        assert!(
            l["client_uri_sans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|x| x == &json!(sub))),
            "{l}"
        );
        assert!(claims["exp"].as_u64() > claims["iat"].as_u64());
        // Signed for this request (or, on a keep-alive connection, just before it): fresh,
        // and naming the roles that granted it.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let iat = claims["iat"].as_u64().unwrap_or_default();
        assert!(iat <= now && iat + 120 >= now, "iat {iat}, now {now}");
        assert_eq!(claims["roles"], json!(["all"]), "{claims}");
        assert!(
            jtis.insert(claims["jti"].as_str().unwrap_or_default().to_owned()),
            "jti reused"
        );
        assert_eq!(l["x_api_key"], "upstream-secret");
        assert!(l["authorization"].is_null());
    }

    // The agent's own identity header, Authorization and claims about the client
    // (X-Forwarded-For, Forwarded) are not forwarded; the body is declared as the proxy wrote
    // it (UTF-8 JSON), whatever the agent declared.
    let before = json_lines(&seen_file).len();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let forged = format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nAccept: application/json, text/event-stream\r\nInterceptor-Identity: forged\r\nAuthorization: Bearer agent-token\r\nX-Api-Key: agent-key\r\nX-Forwarded-For: 127.9.9.9\r\nForwarded: for=127.9.9.9\r\nInterceptor_Identity: forged\r\nX_Api_Key: agent-key\r\nMcp_Session_Id: someone-elses\r\nClient-Cert: :Zm9yZ2Vk:\r\nX-SSL-Client-Verify: SUCCESS\r\nX-Remote-User: admin\r\nImpersonate-User: admin\r\nX-Auth-Request-Email: admin@example.org\r\nX-HTTP-Method-Override: DELETE\r\nX-Envoy-Original-Dst-Host: 127.0.0.9:80\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    send_raw(
        PROBE,
        &env.dir(&readers),
        &intercept(p_ok),
        forged.as_bytes(),
    );
    let after = json_lines(&seen_file);
    assert!(after.len() > before);
    let last = &after[after.len() - 1];
    assert_ne!(last["identity"], "forged");
    assert!(last["authorization"].is_null(), "{last}");
    assert_eq!(last["x_api_key"], "upstream-secret");
    assert_eq!(last["content_type"], "application/json", "{last}");
    assert!(
        last["x_forwarded_for"].is_null() && last["forwarded"].is_null(),
        "{last}"
    );
    // Nor names with `_`, which a CGI-style gateway reads as the names with `-` (a session
    // id the proxy never judged, a forged identity), nor claims about the client's
    // certificate a TLS-terminating proxy would make, nor the user an authenticating proxy
    // would vouch for (the upstream trusts this one's certificate), nor an override of the
    // method the audit log records.
    for key in [
        "identity_underscored",
        "x_api_key_underscored",
        "session_underscored",
        "client_cert",
        "x_ssl_client_verify",
        "x_remote_user",
        "impersonate_user",
        "x_auth_request_email",
        "x_http_method_override",
        "x_envoy_original_dst_host",
    ] {
        assert!(last[key].is_null(), "{key}: {last}");
    }
    // A server that quotes the injected credential back (an error page naming the key it
    // refused) does not hand it to the agent: neither in a header nor in the body.
    let echo = format!(
        "POST /echo-key HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let echoed = send_raw(PROBE, &env.dir(&readers), &intercept(p_ok), echo.as_bytes());
    // The identity assertion too: a bearer token for its lifetime.
    assert_eq!(
        echoed.reply.as_deref(),
        Some("invalid key [REDACTED] for [REDACTED]"),
        "{echoed:?}"
    );
    assert_eq!(
        echoed.header("x-rejected-key"),
        Some("[REDACTED]"),
        "{echoed:?}"
    );
    assert_eq!(
        echoed.header("x-rejected-identity"),
        Some("[REDACTED]"),
        "{echoed:?}"
    );
    assert!(
        !echoed
            .head
            .as_deref()
            .unwrap_or("")
            .contains("upstream-secret"),
        "{echoed:?}"
    );
    // A body declared in another charset (the TypeScript SDK would decode UTF-7, and so read
    // other JSON than the proxy judged) is refused, and nothing reaches the server.
    let before = json_lines(&seen_file).len();
    let utf7 = format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json; charset=\"UTF-7\"\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let refused = send_raw(PROBE, &env.dir(&readers), &intercept(p_ok), utf7.as_bytes());
    assert_eq!(refused.status, Some(415), "{refused:?}");
    assert_eq!(
        json_lines(&seen_file).len(),
        before,
        "a UTF-7 body was forwarded"
    );

    // A 2-second certificate is renewed without failing calls.
    std::thread::sleep(std::time::Duration::from_millis(2200));
    let a = rmcp_client(
        RMCP_PEER,
        &env.dir(&readers),
        &url,
        &[r#"search={"q":"again"}"#],
    );
    assert_eq!(a["calls"]["search"]["ok"], true, "{a}");
    let mints = env.status()["ca"]["mints"].as_u64().expect("ca.mints");
    assert!(mints >= 3, "{mints}");
    let metrics = scrape_metrics(metrics_port);
    assert!(
        metrics.contains(&format!("interceptor_certificate_mints_total {mints}\n")),
        "{metrics}"
    );
    // New workloads' first requests took an upstream connection opened as their agent
    // connected (its handshakes overlapped reading and judging the request).
    let ahead = |server: &str| {
        let status = env.status();
        let entry = status["servers"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == server).cloned())
            .expect("server in status");
        // An https:// upstream's own address is not intercepted (it refuses callers without
        // a node-issued certificate).
        assert_eq!(entry["upstream_intercepted"], false, "{entry}");
        entry["connections_ahead"].clone()
    };
    let notes = ahead("notes");
    assert!(
        notes["opened"].as_u64() >= Some(1) && notes["used"].as_u64() >= Some(1),
        "{notes}"
    );
    // A server no role of the identity grants: refused at the first request, and no
    // connection was opened to it with the workload's certificate before that.
    let r = send_raw(
        PROBE,
        &env.dir(&readers),
        &intercept(p_ungranted),
        forged.as_bytes(),
    );
    assert!(
        r.reply
            .as_deref()
            .is_some_and(|t| t.contains("refused by policy")),
        "{r:?}"
    );
    assert_eq!(ahead("ungranted")["opened"], 0, "{}", ahead("ungranted"));

    // Wrong name, wrong server_id, untrusted CA: a clear error, and nothing reaches the server.
    let before = json_lines(&seen_file).len();
    for (p, needle) in [
        (p_name, "certificate"),
        (p_id, "server_id"),
        (p_ca, "certificate"),
    ] {
        let r = send_raw(PROBE, &env.dir(&readers), &intercept(p), forged.as_bytes());
        assert_eq!(r.status, Some(502), "{r:?}");
        let reply = r.reply.unwrap_or_default();
        assert!(
            reply.contains("-32603") && reply.contains(needle),
            "{reply}"
        );
        // Answered by the request's id: a client matches answers by it.
        let answer: Value = serde_json::from_str(&reply).expect("JSON-RPC error");
        assert_eq!(answer["id"], 1, "{reply}");
    }
    // A batch is answered by an array, whatever number of its requests await an answer.
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","method":"notifications/initialized"}]"#;
    let request = json_post(batch);
    let r = send_raw(
        PROBE,
        &env.dir(&readers),
        &intercept(p_name),
        request.as_bytes(),
    );
    assert_eq!(r.status, Some(502), "{r:?}");
    let answer: Value = serde_json::from_str(r.reply.as_deref().unwrap_or("")).expect("JSON");
    assert_eq!(answer.as_array().map(Vec::len), Some(1), "{answer}");
    assert_eq!(answer[0]["id"], 1, "{answer}");
    assert_eq!(
        json_lines(&seen_file).len(),
        before,
        "a failed handshake must send nothing"
    );

    // The audit chain is signed with the node CA key: within the interval of the last record
    // while the daemon runs, and at its stop; a copy verifies against `ca jwks`.
    let signed = interceptor_tests::eventually(
        std::time::Duration::from_secs(5),
        || env.status()["audit"]["signed_through"].as_u64(),
        || format!("no checkpoint in status: {}", env.status()["audit"]),
    );
    assert!(signed > 1, "{}", env.status()["audit"]);
    env.stop_daemon(nix::sys::signal::Signal::SIGTERM);
    let audit = env.audit_path();
    let events = json_lines(&audit);
    let last = events.last().unwrap();
    assert_eq!(last["event"], "audit.checkpoint", "{last}");
    assert_eq!(events[events.len() - 2]["event"], "daemon.stop");
    let jwks_file = dir.join("jwks.json");
    let out = env.cli(&["ca", "jwks"]);
    assert!(out.status.success());
    std::fs::write(&jwks_file, &out.stdout).unwrap();
    let verify = |args: &[&Path]| {
        let out = Command::new(interceptor_bin())
            .args(["audit", "verify", "--strict", "--jwks"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = verify(&[&jwks_file, &audit]);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("through seq {}", last["through_seq"])),
        "{text}"
    );
    // The checkpoints name this node (the config's [identity] node).
    let node = last["node"].as_str().unwrap_or_default();
    assert!(!node.is_empty(), "{last}");
    assert!(text.contains(&format!("by node {node:?}")), "{text}");
    // The node of the workload ids (spiffe://<trust domain>/node/<node>/…).
    assert!(
        events.iter().any(|e| e["identity"]["workload_id"]
            .as_str()
            .is_some_and(|w| w.contains(&format!("/node/{node}/")))),
        "no workload id names node {node}"
    );
    // An edit whose hashes were all recomputed (the bare chain passes) fails the signature.
    let lines: Vec<String> = std::fs::read_to_string(&audit)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let forged = events
        .iter()
        .rposition(|e| e["event"] == "mcp.request")
        .unwrap();
    let out = rechain(&lines, forged, |members| {
        Some(members.replacen(
            "\"event\":\"mcp.request\"",
            "\"event\":\"mcp.request\",\"edited\":true",
            1,
        ))
    });
    std::fs::write(&audit, out).unwrap();
    let bare = Command::new(interceptor_bin())
        .args(["audit", "verify"])
        .arg(&audit)
        .output()
        .unwrap();
    assert!(bare.status.success(), "{bare:?}");
    assert!(
        std::fs::read_to_string(&audit)
            .unwrap()
            .contains("\"edited\":true")
    );
    let (ok, text) = verify(&[&jwks_file, &audit]);
    assert!(!ok && text.contains("checkpoint"), "{text}");
    // Stripped of every checkpoint (hashes recomputed): a log that stopped is not a live
    // file in its first moments, so it fails without --strict too.
    let out = rechain(&lines, 1, |members| {
        (!members.contains("\"event\":\"audit.checkpoint\"")).then(|| members.to_owned())
    });
    std::fs::write(&audit, out).unwrap();
    let out = Command::new(interceptor_bin())
        .args(["audit", "verify", "--jwks"])
        .args([&jwks_file, &audit])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("no audit.checkpoint"),
        "{out:?}"
    );
}

/// The audit lines `lines` with the chain recomputed from line `from` on, as one who may
/// write the file can: `edit` applied to each record's members (`None` drops it), `seq`
/// renumbered, every hash after recomputed.
fn rechain(lines: &[String], from: usize, edit: impl Fn(&str) -> Option<String>) -> String {
    let stated = |line: &str, key: &str| -> String {
        let v: Value = serde_json::from_str(line).unwrap();
        v[key].to_string().trim_matches('"').to_owned()
    };
    let mut prev = stated(&lines[from - 1], "hash");
    let mut seq: u64 = stated(&lines[from - 1], "seq").parse().unwrap();
    let mut out = lines[..from].join("\n") + "\n";
    for line in &lines[from..] {
        let (body, _) = line.rsplit_once(",\"hash\":").unwrap();
        let (_, members) = body.split_once("\",").unwrap();
        let Some(members) = edit(members) else {
            continue;
        };
        seq += 1;
        let text = format!("{{\"seq\":{seq},\"prev_hash\":\"{prev}\",{members}}}");
        prev = sha2::Sha256::digest(text.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out += &format!("{},\"hash\":\"{prev}\"}}\n", &text[..text.len() - 1]);
    }
    out
}

/// Answers one HTTP/1.1 JSON-RPC POST on `stream` with a result for its id, then closes.
fn answer_once(stream: &mut std::net::TcpStream) {
    use std::io::{BufRead, BufReader, Read, Write};
    let mut reader = BufReader::new(stream.try_clone().expect("clone"));
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let id = serde_json::from_slice::<Value>(&body).map_or(Value::Null, |v| v["id"].clone());
    let answer = json!({"jsonrpc": "2.0", "id": id, "result": {"content": []}}).to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    );
}

#[test]
fn an_upstream_connection_closed_before_its_request_gives_way_to_a_new_one() {
    if !privileged() {
        return;
    }
    let mut env = TestEnv::new("ahead");
    // The upstream closes the first connection it accepts unread (the one the proxy opens
    // as the agent connects) and answers on the later ones.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut stream) = stream else { continue };
            if i > 0 {
                std::thread::spawn(move || answer_once(&mut stream));
            }
        }
    });
    let agents = env.cgroup("agents");
    let intercept = format!("127.0.0.2:{}", free_port());
    let servers = format!(
        r#"
[[server]]
name = "closing"
intercept = ["{intercept}"]
upstream = "http://127.0.0.1:{port}"

[[role]]
name = "all"
servers = ["closing"]
allow_tools = ["*"]

[[binding]]
role = "all"
cgroup = "{root}/**"
"#,
        root = env.root,
    );
    env.write_config_with(&[] as &[ServerSpec], &[&agents], &servers);
    env.start_daemon();
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
        "params": {"name": "search", "arguments": {}}})
    .to_string();
    let request = json_post(&body);
    // The agent waits after connecting: the upstream has closed the connection opened for
    // it by the time its request comes.
    let r = send_raw_env(
        PROBE,
        &env.dir(&agents),
        &intercept,
        request.as_bytes(),
        &["PROBE_DELAY_MS=1000"],
    );
    assert_eq!(r.status, Some(200), "{r:?}\n{}", env.log_text());
    assert!(
        r.reply.as_deref().is_some_and(|t| t.contains("\"result\"")),
        "{r:?}"
    );
    let status = env.status();
    let ahead = &status["servers"][0]["connections_ahead"];
    assert_eq!(
        (&ahead["opened"], &ahead["used"]),
        (&json!(1), &json!(0)),
        "{ahead}"
    );
}

#[test]
fn with_a_ca_a_caller_without_a_workload_id_reaches_no_upstream() {
    if !privileged() {
        return;
    }
    // A plain upstream: without a workload id there is no identity assertion to send it, and
    // an upstream that takes a missing one for an anonymous caller must not be reached.
    let upstream = interceptor_tests::LabelServer::start("127.0.0.3", "upstream");
    let mut env = TestEnv::new("no-workload-id");
    let dir = env.tmp.path().to_owned();
    interceptor_tests::node_ca(&dir.join("ca"));
    let agents = env.cgroup("agents");
    // {pod}: no value for a process outside Kubernetes, so no workload id.
    let extra = format!(
        "\n[ca]\ncert = \"{0}/ca/ca.pem\"\nkey = \"{0}/ca/ca-key.pem\"\n\
         [identity]\nworkload_id = \"spiffe://{{trust_domain}}/pod/{{pod}}\"\n\
         [[role]]\nname = \"all\"\nservers = [\"notes\"]\nallow_tools = [\"*\"]\n\
         [[binding]]\nrole = \"all\"\ncgroup = \"{1}/**\"\n",
        dir.display(),
        env.root
    );
    env.write_config_with(
        &[ServerSpec::direct("notes", upstream.addr)],
        &[&agents],
        &extra,
    );
    env.start_daemon();
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#;
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = send_raw(
        PROBE,
        &env.dir(&agents),
        &upstream.addr.to_string(),
        request.as_bytes(),
    );
    let reply = r.reply.clone().unwrap_or_default();
    assert!(
        reply.contains("no workload id") && reply.contains("\"jsonrpc\""),
        "{r:?}"
    );
    assert_eq!(upstream.count(), 0, "forwarded without an assertion");
}
