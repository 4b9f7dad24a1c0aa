//! The binaries' own error paths: bad flags, missing certificates, an occupied port, an
//! agent that is not running. Each must end with a non-zero exit and one clear line.

use std::{net::TcpListener, process::Command};

use clink_testbed::bin_path;

fn run(bin: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin_path(bin).unwrap())
        .args(args)
        .env_remove("CLINK_ADMIN")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

#[test]
fn agent_without_certificates_says_which_file() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("nowhere");
    let (ok, err) = run(
        "clink-agent",
        &[
            "--name",
            "peer-a",
            "--certs",
            certs.to_str().unwrap(),
            "--state",
            dir.path().join("state").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            dir.path().join("admin.sock").to_str().unwrap(),
        ],
    );
    assert!(!ok);
    let line = last_line(&err);
    assert!(line.starts_with("error: loading certificates: "), "{err}");
    assert!(line.contains("nowhere/cert.pem"), "{err}");
}

#[test]
fn agent_on_an_occupied_gateway_port_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    for args in [
        vec!["fabric", "create", "--name", "f", "--path", path],
        vec![
            "peer-cert",
            "create",
            "--name",
            "peer-a",
            "--fabric",
            "f",
            "--path",
            path,
        ],
    ] {
        assert!(run("clink", &args).0);
    }
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (ok, err) = run(
        "clink-agent",
        &[
            "--name",
            "peer-a",
            "--certs",
            dir.path().join("peer-a").to_str().unwrap(),
            "--state",
            dir.path().join("state").to_str().unwrap(),
            "--listen",
            &addr,
            "--admin",
            dir.path().join("admin.sock").to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(
        last_line(&err).starts_with(&format!("error: cannot listen on gateway address {addr}: ")),
        "{err}"
    );
    // A certificate for another name is refused before anything listens.
    let (ok, err) = run(
        "clink-agent",
        &[
            "--name",
            "peer-z",
            "--certs",
            dir.path().join("peer-a").to_str().unwrap(),
            "--state",
            dir.path().join("state").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            dir.path().join("admin.sock").to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(last_line(&err).contains("not for peer \"peer-z\""), "{err}");
}

#[test]
fn cli_without_agent_explains_how_to_reach_it() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let (ok, err) = run("clink", &["--admin", sock.to_str().unwrap(), "status"]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the agent at"), "{err}");
    assert!(err.contains("CLINK_ADMIN"), "{err}");
}

#[test]
fn cli_rejects_bad_files_before_contacting_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(
        &file,
        "apiVersion: clusterlink.net/v1alpha1\nkind: Export\nmetadata: {name: db}\nspec: {port: 0, host: x}\n",
    )
    .unwrap();
    let sock = dir.path().join("none.sock");
    let (ok, err) = run(
        "clink",
        &[
            "--admin",
            sock.to_str().unwrap(),
            "apply",
            "-f",
            file.to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert_eq!(err, "error: Export default/db: spec.port: must be 1-65535");
    let (ok, err) = run(
        "clink",
        &["--admin", sock.to_str().unwrap(), "get", "gadgets"],
    );
    assert!(!ok);
    assert!(err.contains("unknown kind \"gadgets\""), "{err}");
    let (ok, err) = run(
        "clink",
        &[
            "peer-cert",
            "create",
            "--name",
            "p",
            "--fabric",
            "missing",
            "--path",
            dir.path().to_str().unwrap(),
        ],
    );
    assert!(!ok);
    assert!(err.contains("missing/ca.pem"), "{err}");
}
