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
fn a_valid_file_is_summarised() {
    let (ok, err) = check(
        "[[server]]\nname = \"notes\"\nintercept = [\"127.0.0.2:8080\", \"[::1]:8080\"]\nupstream = \"127.0.0.3:9000\"\n",
    );
    assert!(ok, "{err}");
}
