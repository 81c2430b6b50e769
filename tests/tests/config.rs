//! Config errors, as an operator meets them: through the binary, naming the file, the key and
//! the fix. (`run` validates before touching the kernel, so these need no privileges.)

use std::process::Command;

use interceptor_tests::interceptor_bin;

/// Runs `interceptor check` on `text`; returns (success, stderr). For an invalid config it also
/// runs `interceptor run`, which must fail on the config before touching the kernel, with the
/// same message.
fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let run = |sub: &str| {
        let out = Command::new(interceptor_bin())
            .args([sub, "--config"])
            .arg(&path)
            .output()
            .expect("run interceptor");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = run("check");
    if !ok {
        assert!(stderr.contains(&*path.to_string_lossy()), "{stderr}");
        let (run_ok, run_stderr) = run("run");
        assert!(!run_ok, "run accepted a config that check rejected");
        assert_eq!(run_stderr, stderr);
    }
    (ok, stderr)
}

#[test]
fn unknown_key_is_named() {
    let (ok, err) = check("[daemon]\nlisten_port = 15001\nlisten_addr = \"0.0.0.0\"\n");
    assert!(!ok);
    assert!(err.contains("unknown field `listen_addr`"), "{err}");
}

#[test]
fn bad_address_names_the_key_and_the_fix() {
    let (ok, err) = check(
        "[[server]]\nname = \"notes\"\nintercept = [\"127.0.0.2:8080\", \"127.0.0.2\"]\nupstream = \"127.0.0.3:9000\"\n",
    );
    assert!(!ok);
    assert!(err.contains("server[0].intercept[1]"), "{err}");
    assert!(err.contains("e.g. \"127.0.0.2:8080\""), "{err}");
}

#[test]
fn unknown_server_name_is_reported() {
    let (ok, err) = check(
        "[[server]]\nname = \"notes\"\nintercept = [\"notes.does-not-exist.invalid:8080\"]\nupstream = \"127.0.0.3:9000\"\n",
    );
    assert!(!ok);
    assert!(
        err.contains("cannot resolve host name \"notes.does-not-exist.invalid\""),
        "{err}"
    );
}

#[test]
fn missing_file_says_which() {
    let out = Command::new(interceptor_bin())
        .args(["check", "--config", "/nonexistent/interceptor.toml"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read config /nonexistent/interceptor.toml"),
        "{err}"
    );
}

#[test]
fn all_egress_without_a_cgroup_is_a_usage_error() {
    // Refused before the config is read or the daemon asked.
    let out = Command::new(interceptor_bin())
        .args(["revoke", "--uid", "2", "--all-egress"])
        .args(["--config", "/nonexistent/interceptor.toml"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--all-egress applies to a cgroup"), "{err}");
}

#[test]
fn without_a_file_at_the_default_path_the_cli_uses_the_built_in_defaults() {
    if std::path::Path::new("/etc/interceptor/interceptor.toml").exists() {
        return; // this machine has one: the case cannot be shown here
    }
    // No daemon is asked to listen on the default socket in the tests: the CLI gets as far as
    // trying it, instead of stopping at the missing file.
    let out = Command::new(interceptor_bin())
        .arg("status")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("cannot read config"), "{err}");
    assert!(
        err.contains("/run/interceptor/admin.sock") || out.status.success(),
        "{err}"
    );
    // audit tail reads the default log.
    let out = Command::new(interceptor_bin())
        .args(["audit", "tail"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("cannot read config"), "{err}");
    assert!(
        err.contains("/var/log/interceptor/audit.jsonl") || out.status.success(),
        "{err}"
    );
    // A file named explicitly must exist, the default path too when named.
    for named in [
        "/nonexistent/interceptor.toml",
        "/etc/interceptor/interceptor.toml",
    ] {
        let out = Command::new(interceptor_bin())
            .args(["status", "--config", named])
            .output()
            .expect("run");
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("cannot read config"),
            "{named}"
        );
    }
    // Nor does uninstall go on with the defaults when the file named is missing.
    let out = Command::new(interceptor_bin())
        .args(["uninstall", "--config", "/nonexistent/interceptor.toml"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read config"));
}

#[test]
fn a_valid_file_is_summarised() {
    let text = "[[server]]\nname = \"notes\"\nintercept = [\"127.0.0.2:8080\", \"[::1]:8080\"]\nupstream = \"127.0.0.3:9000\"\n";
    let (ok, err) = check(text);
    assert!(ok, "{err}");
    let summary = |text: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("interceptor.toml");
        std::fs::write(&path, text).expect("write");
        let out = Command::new(interceptor_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run interceptor");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // A plain upstream's own address is intercepted too, and the summary says so.
    let out = summary(text);
    assert!(
        out.contains(
            "server notes: intercept 127.0.0.2:8080, [::1]:8080 -> upstream 127.0.0.3:9000 \
             (its addresses intercepted too: intercept_upstream)"
        ),
        "{out}"
    );
    let out = summary(&format!("{text}intercept_upstream = false\n"));
    assert!(out.contains("-> upstream 127.0.0.3:9000\n"), "{out}");
}

const POLICY: &str = r#"
[[server]]
name = "notes"
intercept = ["127.0.0.2:8080"]
upstream = "127.0.0.3:9000"

[[role]]
name = "notes-reader"
servers = ["notes"]
allow_tools = ["read_*", "search"]
deny_tools = ["delete_*"]

[[binding]]
role = "notes-reader"
cgroup = "/agents/**"
uid = [1000]
"#;

fn policy_cmd(text: &str, args: &[&str]) -> (bool, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(interceptor_bin())
        .arg("policy")
        .args(args)
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run interceptor");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_check_lists_roles_and_refuses_bad_ones() {
    let (ok, out, _) = policy_cmd(POLICY, &["check"]);
    assert!(ok);
    assert!(
        out.contains("1 role(s) (notes-reader), 1 binding(s)"),
        "{out}"
    );
    let bad = POLICY.replace("servers = [\"notes\"]", "servers = [\"nots\"]");
    let (ok, _, err) = policy_cmd(&bad, &["check"]);
    assert!(!ok);
    assert!(
        err.contains("role[0].servers[0]") && err.contains("unknown server name \"nots\""),
        "{err}"
    );
    let bad = POLICY.replace("role = \"notes-reader\"", "role = \"nobody\"");
    let (ok, _, err) = policy_cmd(&bad, &["check"]);
    assert!(!ok);
    assert!(
        err.contains("binding[0].role") && err.contains("unknown role \"nobody\""),
        "{err}"
    );
}

#[test]
fn policy_explain_prints_decision_and_rule() {
    let who = [
        "--cgroup",
        "/agents/a",
        "--uid",
        "1000",
        "--server",
        "notes",
    ];
    let (ok, out, err) = policy_cmd(
        POLICY,
        &[&["explain", "--tool", "read_file"][..], &who].concat(),
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("bound roles: notes-reader (binding[0])"),
        "{out}"
    );
    assert!(
        out.contains("decision: allow")
            && out.contains("rule: role notes-reader: allow_tools \"read_*\""),
        "{out}"
    );
    // Arguments as the proxy parses them: a duplicated key is refused before any policy
    // (judged on its last value, this one would be allowed).
    let dup = r#"{"path":"/etc/shadow","path":"/srv/notes/a"}"#;
    let (ok, out, err) = policy_cmd(
        POLICY,
        &[
            &["explain", "--tool", "read_file", "--arguments", dup][..],
            &who,
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("decision: deny")
            && out.contains("refused before policy")
            && out.contains("duplicate key \"path\""),
        "{out}"
    );
    let (ok, _, err) = policy_cmd(
        POLICY,
        &[
            &["explain", "--tool", "read_file", "--arguments", "[1]"][..],
            &who,
        ]
        .concat(),
    );
    assert!(!ok && err.contains("must be a JSON object"), "{err}");
    let (_, out, _) = policy_cmd(
        POLICY,
        &[&["explain", "--tool", "delete_x"][..], &who].concat(),
    );
    assert!(
        out.contains("decision: deny") && out.contains("deny_tools \"delete_*\""),
        "{out}"
    );
    let (_, out, _) = policy_cmd(
        POLICY,
        &[
            "explain",
            "--tool",
            "read_file",
            "--server",
            "notes",
            "--uid",
            "0",
        ],
    );
    assert!(
        out.contains("bound roles: none") && out.contains("no binding matches"),
        "{out}"
    );
    // A binding without a selector grants its role to every process: said, not refused.
    let (ok, out, _) = policy_cmd(
        &POLICY.replace("cgroup = \"/agents/**\"\nuid = [1000]\n", ""),
        &["check"],
    );
    assert!(
        ok && out.contains("binding[0] has no selector: it grants role notes-reader to every"),
        "{out}"
    );
    // A selector not given is unknown: a binding on uid 0 does not match a uid left out, nor
    // a binding on any comm a comm left out.
    let explain = |policy: &str, extra: &[&str]| {
        let who = [
            "explain",
            "--tool",
            "read_file",
            "--server",
            "notes",
            "--cgroup",
            "/agents/a",
        ];
        policy_cmd(policy, &[&who[..], extra].concat()).1
    };
    let out = explain(&POLICY.replace("uid = [1000]", "uid = 0"), &[]);
    assert!(out.contains("bound roles: none"), "{out}");
    let by_comm = POLICY.replace("uid = [1000]", "comm = \"*\"");
    let out = explain(&by_comm, &[]);
    assert!(out.contains("bound roles: none"), "{out}");
    let out = explain(&by_comm, &["--comm", "python3"]);
    assert!(out.contains("bound roles: notes-reader"), "{out}");
    let (ok, _, err) = policy_cmd(POLICY, &["explain", "--tool", "x", "--server", "wiki"]);
    assert!(!ok && err.contains("unknown server \"wiki\""), "{err}");
}

#[test]
fn policy_explain_judges_prompts_resources_and_completions() {
    let bounded = POLICY.replace(
        "deny_tools = [\"delete_*\"]",
        "deny_tools = [\"delete_*\"]\nallow_methods = [\"prompts/get\", \"resources/read\", \
         \"completion/complete\"]\nallow_prompts = [\"summary\"]\n\
         allow_resources = [\"notes://public/*\"]",
    );
    let explain = |extra: &[&str]| {
        let who = [
            "explain",
            "--server",
            "notes",
            "--cgroup",
            "/agents/a",
            "--uid",
            "1000",
        ];
        let (ok, out, err) = policy_cmd(&bounded, &[&who[..], extra].concat());
        assert!(ok, "{extra:?}: {err}");
        out
    };
    for (extra, allow, rule) in [
        (
            &["--prompt", "summary"][..],
            true,
            "allow_prompts \"summary\"",
        ),
        (&["--prompt", "export"], false, "this prompt"),
        (&["--resource", "notes://public/a"], true, "allow_resources"),
        (
            &["--resource", "notes://private/a"],
            false,
            "this resource URI",
        ),
        (
            &["--method", "completion/complete", "--prompt", "summary"],
            true,
            "allow_prompts",
        ),
        (
            &[
                "--method",
                "completion/complete",
                "--resource",
                "notes://private/{x}",
            ],
            false,
            "this resource template",
        ),
        (
            &["--method", "completion/complete"],
            false,
            "completion reference",
        ),
    ] {
        let out = explain(extra);
        let decision = if allow {
            "decision: allow"
        } else {
            "decision: deny"
        };
        assert!(
            out.contains(decision) && out.contains(rule),
            "{extra:?}: {out}"
        );
    }
    let (ok, _, err) = policy_cmd(
        &bounded,
        &[
            "explain", "--server", "notes", "--tool", "x", "--prompt", "summary",
        ],
    );
    assert!(!ok && err.contains("cannot be used with"), "{err}");
}

#[test]
fn check_loads_the_node_ca_as_the_daemon_would() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    interceptor_tests::node_ca(&ca);
    let path = dir.path().join("t.toml");
    std::fs::write(
        &path,
        format!(
            "[ca]\ncert = \"{0}/ca.pem\"\nkey = \"{0}/ca-key.pem\"\n",
            ca.display()
        ),
    )
    .expect("write");
    let check = || {
        Command::new(interceptor_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("check")
    };
    assert!(check().status.success());
    // `ca jwks` needs only [ca]: a mistake elsewhere does not keep the public keys from
    // whoever verifies with them; a missing key file says which and what to do.
    let jwks = |text: &str| {
        std::fs::write(&path, text).expect("write");
        Command::new(interceptor_bin())
            .args(["ca", "jwks", "--config"])
            .arg(&path)
            .output()
            .expect("ca jwks")
    };
    let ca_section = std::fs::read_to_string(&path).expect("read");
    let out = jwks(&format!("{ca_section}[proxy]\nmax_body_bytes = 0\n"));
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"keys\""),
        "{out:?}"
    );
    let out = jwks(&ca_section.replace("ca-key.pem", "missing-key.pem"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("[ca] cannot be loaded")
            && err.contains("missing-key.pem")
            && err.contains("ca init"),
        "{err}"
    );
    std::fs::write(&path, &ca_section).expect("write");
    // A key others can read stops the daemon at start; `check` says so first.
    let key = ca.join("ca-key.pem");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod");
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("[ca]") && err.contains("chmod 600"), "{err}");
}

#[test]
fn addresses_the_kernel_sends_to_one_place_belong_to_one_server() {
    // 0.0.0.0:P reaches 127.0.0.1:P: two servers cannot each claim one of them.
    let (ok, err) = check(
        "[[server]]\nname = \"a\"\nintercept = [\"127.0.0.1:8080\"]\nupstream = \"127.0.0.3:9000\"\n\
         [[server]]\nname = \"b\"\nintercept = [\"0.0.0.0:8080\"]\nupstream = \"127.0.0.3:9001\"\n",
    );
    assert!(!ok);
    assert!(
        err.contains("server[1].intercept[0]")
            && err.contains("127.0.0.1:8080 (where the kernel sends 0.0.0.0:8080) is already intercepted for server \"a\""),
        "{err}"
    );
    // Nor is the proxy's own listener an address to intercept or an upstream, however written.
    for (key, text) in [
        (
            "server[0].intercept[0]",
            "intercept = [\"0.0.0.0:15001\"]\nupstream = \"127.0.0.3:9000\"\n",
        ),
        (
            "server[0].upstream",
            "intercept = [\"127.0.0.2:8080\"]\nupstream = \"[::]:15001\"\n",
        ),
        (
            "server[0].upstream",
            "intercept = [\"127.0.0.2:8080\"]\nupstream = \"127.0.0.1:15001\"\n",
        ),
    ] {
        let (ok, err) = check(&format!(
            "[daemon]\nlisten_port = 15001\n[[server]]\nname = \"a\"\n{text}"
        ));
        assert!(!ok, "{text}");
        assert!(
            err.contains(key) && err.contains("the proxy's own listener"),
            "{text}: {err}"
        );
    }
}

#[test]
fn a_reader_that_goes_away_ends_a_command_quietly() {
    // `audit tail | head -1`: the writes after the reader left must not panic.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let line = r#"{"seq":0,"time":"2026-11-28T00:00:00Z","event":"mcp.request","server":"s","method":"tools/call","tool":"x","decision":"allow"}"#;
    std::fs::write(&log, format!("{line}\n").repeat(20_000)).expect("write log");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[audit]\npath = {:?}\n", log)).expect("write config");
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{}' audit tail --config '{}' | head -1",
            interceptor_bin().display(),
            config.display()
        ))
        .output()
        .expect("run sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("mcp.request"),
        "{out:?}"
    );
}

#[test]
fn check_json_carries_the_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[[server]]\nname = \"a\"\nintercept = [\"127.0.0.2:8080\"]\nupstream = \"127.0.0.3:9000\"\n\
         [[role]]\nname = \"r\"\nservers = [\"a\"]\n[[binding]]\nrole = \"r\"\n",
    )
    .expect("write");
    let out = Command::new(interceptor_bin())
        .args(["check", "--json", "--config"])
        .arg(&path)
        .output()
        .expect("run interceptor");
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let warnings = v["warnings"].as_array().expect("warnings");
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("has no selector"))),
        "{v}"
    );
}

#[test]
fn a_mistake_elsewhere_in_daemon_does_not_keep_commands_from_the_daemon() {
    // `revoke` (the kill switch) and `status` need only the admin socket: a bad metrics
    // address beside it is for `check` and the next start to report.
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("admin.sock");
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[daemon]\nmetrics_addr = \"x\"\nadmin_socket = {:?}\n",
            socket.display().to_string()
        ),
    )
    .expect("write");
    for args in [&["status"][..], &["revoke", "--uid", "4242"][..]] {
        let out = Command::new(interceptor_bin())
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run interceptor");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains("cannot reach the interceptor daemon") && !err.contains("metrics_addr"),
            "{args:?}: {err}"
        );
    }
    let (ok, err) = check(&std::fs::read_to_string(&path).expect("read"));
    assert!(!ok && err.contains("daemon.metrics_addr"), "{err}");
}

#[test]
fn audit_tail_shows_agent_text_as_text() {
    // A method (agent text) with a C1 control some terminals act on, and a look-alike `=`.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let line = serde_json::json!({
        "seq": 1, "time": "2026-11-28T00:00:00Z", "event": "mcp.request", "server": "s",
        "method": "x\u{9b}31m decision\u{a78a}allow", "decision": "deny",
    });
    std::fs::write(&log, format!("{line}\n")).expect("write log");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[audit]\npath = {:?}\n", log)).expect("write config");
    let tail = |json: bool| {
        let mut cmd = Command::new(interceptor_bin());
        cmd.args(["audit", "tail", "--config"]).arg(&config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("audit tail");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let text = tail(false);
    assert!(!text.contains('\u{9b}'), "{text:?}");
    assert!(
        text.contains(r#"method="x\u{9b}31m decision꞊allow""#),
        "{text}"
    );
    // Not to a terminal, --json gives the lines byte for byte: a copy still verifies.
    let json = tail(true);
    assert_eq!(json, format!("{line}\n"));
}

#[test]
fn audit_tail_names_what_it_cannot_show() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("audit.jsonl");
    let record = |seq: u64| {
        serde_json::json!({"seq": seq, "ts": "2026-11-28T00:00:00Z", "event": "mcp.request"})
            .to_string()
    };
    let text = format!(
        "{}\n{{\"seq\":2,\"ts\":\"2026-11-2\n{}\n{}\n",
        record(1),
        record(2),
        record(5)
    );
    std::fs::write(&log, text).expect("write log");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[audit]\npath = {:?}\n", log)).expect("write config");
    let out = Command::new(interceptor_bin())
        .args(["audit", "tail", "--json", "--config"])
        .arg(&config)
        .output()
        .expect("audit tail");
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        shown,
        format!("{}\n{}\n{}\n", record(1), record(2), record(5))
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a line after seq 1 is not a JSON record") && err.contains("audit verify"),
        "{err}"
    );
    assert!(err.contains("seq 5 follows seq 2"), "{err}");
}
