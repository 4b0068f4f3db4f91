//! The operator commands that talk to the coordinator, as far as they can be checked without
//! one: arguments refused before any request, a missing or unusable token, an unreachable
//! coordinator, and `publish --coordinator` refusing to start without a token. What they do
//! against a running coordinator is tested end to end in `tests/deploy.rs`.

mod common;

use std::net::TcpListener;
use std::process::{Command, Output};

use common::{assert_fails_with, stderr, stdout};

/// Runs `fleetwave` with none of the coordinator settings of the caller's environment.
fn fleetwave(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetwave"));
    cmd.args(args);
    for var in [
        "FLEETWAVE_COORDINATOR_API",
        "FLEETWAVE_TOKEN",
        "FLEETWAVE_TOKEN_FILE",
        "SOURCE_DATE_EPOCH",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("runs fleetwave")
}

/// A coordinator URL nothing listens on (a port just bound and released).
fn nobody() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn help_lists_the_operator_commands() {
    let out = fleetwave(&["--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    for command in [
        "deploy", "status", "promote", "pause", "resume", "rollback", "abort", "hosts", "audit",
        "versions", "services",
    ] {
        assert!(help.lines().any(|l| l.trim_start().starts_with(command)), "{command}: {help}");
    }
}

#[test]
fn without_a_token_nothing_is_sent() {
    let url = nobody();
    let out = fleetwave(&["status", "--coordinator", &url], &[]);
    assert_fails_with(&out, &["no API token", "--token-file", "FLEETWAVE_TOKEN"]);
    let out = fleetwave(&["services", "--coordinator", &url], &[("FLEETWAVE_TOKEN", " \n")]);
    assert_fails_with(&out, &["FLEETWAVE_TOKEN", "no usable token"]);
}

#[test]
fn an_unreachable_coordinator_is_named_and_the_token_is_not() {
    let url = nobody();
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "very-secret-token-1234\n").expect("write token");
    let token = token.to_str().expect("utf8");
    for args in [
        &["status", "7"][..],
        &["status"],
        &["pause", "7", "--comment", "looks wrong"],
        &["hosts", "--env", "prod"],
        &["audit", "--since", "1h"],
        &["promote", "web", "2.0", "--to", "prod"],
        &["deploy", "web", "2.0", "--env", "prod"],
    ] {
        let mut all = args.to_vec();
        all.extend(["--coordinator", &url, "--token-file", token]);
        let out = fleetwave(&all, &[]);
        assert_fails_with(&out, &["cannot reach the coordinator at", &url]);
        assert!(!stderr(&out).contains("very-secret"), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
    }
}

#[test]
fn bad_deploy_flags_are_refused_before_any_request() {
    let url = nobody();
    let token = [("FLEETWAVE_TOKEN", "t0ken")];
    let cases: [(&[&str], &str); 3] = [
        (&["--steps", "5,1,100"], "--steps"),
        (&["--strategy", "rolling", "--steps", "50,100"], "--steps"),
        (&["--max-failed", "many"], "--max-failed"),
    ];
    for (extra, flag) in cases {
        let mut args = vec!["deploy", "web", "2.0", "--env", "prod", "--coordinator", &url];
        args.extend_from_slice(extra);
        let out = fleetwave(&args, &token);
        assert_fails_with(&out, &[flag]);
        assert!(!stderr(&out).contains("cannot reach"), "{extra:?}: {}", stderr(&out));
    }
    let out = fleetwave(&["deploy", "web", "2.0", "--env", "prod", "--bake", "soon"], &token);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--bake"), "{}", stderr(&out));
    let bad_url = fleetwave(&["services", "--coordinator", "coordinator:7600"], &token);
    assert_fails_with(&bad_url, &["invalid coordinator URL", "coordinator:7600"]);
}

#[test]
fn publish_with_a_coordinator_needs_a_token_before_it_publishes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = |rel: &str| dir.path().join(rel).to_str().expect("utf8").to_owned();
    let out = fleetwave(&["keygen", "--out", &path("release.key")], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::create_dir(dir.path().join("app")).expect("mkdir");
    std::fs::write(dir.path().join("app/run.sh"), "#!/bin/sh\necho hi\n").expect("write");
    let publish = |version: &str, url: &str, env: &[(&str, &str)]| {
        fleetwave(
            &[
                "publish",
                &path("app"),
                "--service",
                "web",
                "--version",
                version,
                "--key",
                &path("release.key"),
                "--origin",
                &path("origin"),
                "--coordinator",
                url,
                "--quiet",
            ],
            env,
        )
    };
    let url = nobody();
    let out = publish("1.0", &url, &[]);
    assert_fails_with(&out, &["no API token"]);
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));

    // With a token, the publish goes through (so the first did not: versions are immutable)
    // and the registration's failure is the error.
    let out = publish("1.0", &url, &[("FLEETWAVE_TOKEN", "t0ken")]);
    assert!(stdout(&out).starts_with("published web@1.0\n"), "{}", stdout(&out));
    assert_fails_with(&out, &["published web@1.0, but it is not registered", "cannot reach"]);
}
