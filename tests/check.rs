//! `popivr check` against a real prosody: the built binary, a config file
//! on disk, its output and exit status. No secret may appear in either
//! output stream, whatever happens.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use popivr::testbed::{self, Prosody};

const PBX_PW: &str = "check-Secret-a81f";
const WRONG_PW: &str = "wrong-Secret-5c0d";

fn server() -> Prosody {
    Prosody::builder()
        .user("pbx", PBX_PW)
        .user("alice", "alice-Secret-77b2")
        .start()
}

/// A config for `server` with `account` lines added to the account.
fn write_config(server: &Prosody, secret: &str, account: &str) -> PathBuf {
    let path = server.scratch_dir().join("popivr.conf");
    let text = format!(
        "[pbx]\n\
         type = client\n\
         username = {pbx}\n\
         secret = {secret}\n\
         serverhost = 127.0.0.1\n\
         port = {port}\n\
         {account}\n\
         \n\
         [sales]\n\
         type = profile\n\
         account = pbx\n\
         targets = {alice}\n\
         reply = 1 -> continue desk\n",
        pbx = server.jid("pbx"),
        alice = server.jid("alice"),
        port = server.port(),
    );
    let _ = std::fs::remove_file(&path);
    testbed::write_private(&path, text.as_bytes()).expect("write config");
    path
}

fn check(config: &Path, extra: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_popivr"))
        .arg("--config")
        .arg(config)
        .arg("check")
        .args(extra)
        .output()
        .expect("run popivr check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for secret in [PBX_PW, WRONG_PW] {
        assert!(!text.contains(secret), "a secret was printed:\n{text}");
    }
    (out, text)
}

#[test]
fn a_good_account_passes() {
    let server = server();
    let ca = format!("ca_file = {}", server.ca_pem().display());
    let config = write_config(&server, PBX_PW, &ca);
    let (out, text) = check(&config, &[]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("account [pbx]: logged in as pbx@popivr.test/"),
        "{text}"
    );
    assert!(text.contains("STARTTLS, certificate verified"), "{text}");
    assert!(text.contains("check passed"), "{text}");
    assert!(!text.contains("risk:"), "{text}");
}

#[test]
fn a_wrong_secret_fails() {
    let server = server();
    let ca = format!("ca_file = {}", server.ca_pem().display());
    let config = write_config(&server, WRONG_PW, &ca);
    let (out, text) = check(&config, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("account [pbx]: login FAILED"), "{text}");
    assert!(text.contains("check FAILED"), "{text}");
}

#[test]
fn an_untrusted_certificate_fails() {
    let server = server();
    // No ca_file: the test CA is not in the system store.
    let config = write_config(&server, PBX_PW, "");
    let (out, text) = check(&config, &[]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("login FAILED"), "{text}");
    assert!(text.to_lowercase().contains("certificate"), "{text}");
}

#[test]
fn plaintext_works_but_is_named_a_risk() {
    let server = Prosody::builder()
        .plaintext_allowed()
        .user("pbx", PBX_PW)
        .start();
    let config = write_config(&server, PBX_PW, "usetls = no\nallow_plaintext = yes");
    let (out, text) = check(&config, &[]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("(PLAINTEXT, "), "{text}");
    assert!(text.contains("risk: account [pbx]"), "{text}");
    assert!(text.contains("unencrypted"), "{text}");

    let (out, text) = check(&config, &["--strict"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("(--strict)"), "{text}");
}

#[test]
fn an_invalid_file_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popivr.conf");
    std::fs::write(&path, "[sales]\ntype = profile\ntimeout = soon\n").unwrap();
    let (out, text) = check(&path, &["--offline"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains(&format!("{}:3", path.display())), "{text}");
}
