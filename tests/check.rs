//! `popivr check` against a real prosody (and, where the server matters,
//! a stock ejabberd): the built binary, a config file on disk, its output
//! and exit status. No secret may appear in either output stream,
//! whatever happens.

mod support;

use std::path::{Path, PathBuf};
use std::process::Output;

use popivr::xmpp::{self, Session, SessionOptions, XmppEvent, XmppStatus};
use popivr_testkit::testbed::{self, Ejabberd, Prosody, Server};
use support::{Start, account_section};

const PBX_PW: &str = "check-Secret-a81f";
const WRONG_PW: &str = "wrong-Secret-5c0d";
const ALICE_PW: &str = "alice-Secret-77b2";

fn server() -> Prosody {
    Prosody::builder()
        .user("pbx", PBX_PW)
        .user("alice", ALICE_PW)
        .user("bob", "bob-Secret-0e4a")
        .start()
}

/// Alice at her desk: online, and her client accepts popivr's request to
/// see her presence.
async fn alice_online(server: &Prosody) -> Session {
    let options = SessionOptions {
        contacts: vec![server.jid("pbx")],
        rooms: Vec::new(),
        keepalive: None,
    };
    let mut session = xmpp::spawn(server.account("alice", ALICE_PW), options);
    match session.recv().await {
        Some(XmppEvent::Status(XmppStatus::Online)) => session,
        other => panic!("alice is not online: {other:?}\n{}", server.log()),
    }
}

/// A config for `server` with `account` lines added to the account and
/// `profile` lines to the profile, which pops alice.
fn write_config(server: &Prosody, secret: &str, account: &str) -> PathBuf {
    write_config_with(server, secret, account, "")
}

fn write_config_with(server: &Prosody, secret: &str, account: &str, profile: &str) -> PathBuf {
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
         reply = 1 -> continue desk\n\
         {profile}\n",
        pbx = server.jid("pbx"),
        alice = server.jid("alice"),
        port = server.port(),
    );
    let _ = std::fs::remove_file(&path);
    testbed::write_private(&path, text.as_bytes()).expect("write config");
    path
}

fn check(config: &Path, extra: &[&str]) -> (Output, String) {
    support::pbx::popivr_check(config, extra, &[PBX_PW, WRONG_PW])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_good_account_passes_and_sees_its_target() {
    let server = server();
    let alice = alice_online(&server).await;
    let ca = format!("ca_file = {}", server.ca_pem().display());
    let config = write_config(&server, PBX_PW, &ca);
    let (out, text) = check(&config, &[]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("account [pbx]: logged in as pbx@popivr.test/"),
        "{text}"
    );
    assert!(text.contains("STARTTLS, certificate verified"), "{text}");
    assert!(
        text.contains("alice@popivr.test: subscribed, online (") && text.contains(": available)"),
        "{text}"
    );
    assert!(text.contains("check passed"), "{text}");
    assert!(!text.contains("risk:"), "{text}");

    // Once accepted, the subscription stays: offline now, still a pass.
    alice.close().await;
    let (out, text) = check(&config, &["--presence-wait", "1"]);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("alice@popivr.test: subscribed, offline"),
        "{text}"
    );
}

#[test]
fn a_target_who_never_accepted_fails() {
    let server = server();
    let ca = format!("ca_file = {}", server.ca_pem().display());
    let config = write_config(&server, PBX_PW, &ca);
    let (out, text) = check(&config, &["--presence-wait", "0.5"]);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("alice@popivr.test: NOT subscribed") && text.contains("no pops"),
        "{text}"
    );
    assert!(text.contains("check FAILED"), "{text}");

    // A profile that ignores presence pops her anyway: no failure.
    let config = write_config_with(&server, PBX_PW, &ca, "presence = any");
    let (out, text) = check(&config, &["--presence-wait", "0.5"]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("presence = any"), "{text}");
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
    let config = write_config_with(
        &server,
        PBX_PW,
        "usetls = no\nallow_plaintext = yes",
        "presence = any",
    );
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

/// `popivr check` of a profile of `server`'s pbx that pops alice whatever
/// her presence: it passes, whatever the server says of itself. Returns
/// check's line about the server's software and session limit.
fn server_line(server: &impl Server) -> String {
    one_line(&passing_check(server), "account [pbx]: server ")
}

/// Its output, which says the check passed.
fn passing_check(server: &impl Server) -> String {
    let path = server.scratch_dir().join("popivr.conf");
    let text = format!(
        "{}[sales]\ntype = profile\naccount = pbx\ntargets = {}\npresence = any\n",
        account_section(server, "pbx", PBX_PW),
        server.jid("alice"),
    );
    testbed::write_private(&path, text.as_bytes()).expect("write config");
    let (out, text) = check(&path, &["--presence-wait", "0.5"]);
    assert!(out.status.success(), "{}: {text}", server.name());
    assert!(text.contains("check passed"), "{text}");
    text
}

/// The one line of `text` that starts with `prefix`.
fn one_line(text: &str, prefix: &str) -> String {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let line = lines
        .next()
        .unwrap_or_else(|| panic!("no `{prefix}` line:\n{text}"));
    assert_eq!(
        lines.next(),
        None,
        "one `{prefix}` line per account:\n{text}"
    );
    line.to_string()
}

/// Stock prosody and ejabberd keep the account's private storage, which
/// per-call processes use to tell late answers (`late_reply`); check
/// says so.
#[test]
fn check_finds_the_private_storage_on_both_servers() {
    let users = [("pbx", PBX_PW), ("alice", ALICE_PW)];
    let prosody = Prosody::start_with(&users);
    let ejabberd = Ejabberd::start_with(&users);
    for text in [passing_check(&prosody), passing_check(&ejabberd)] {
        assert_eq!(
            one_line(&text, "account [pbx]: private storage"),
            "account [pbx]: private storage (XEP-0049): yes: per-call processes tell a late \
             answer to a call that ended from an answer to the next one (`late_reply`)"
        );
    }
}

/// A server without it: check names what per-call mode loses and the two
/// ways out, as advice (it still passes).
#[test]
fn a_server_without_private_storage_is_named() {
    let server = Prosody::builder()
        .without_private()
        .user("pbx", PBX_PW)
        .user("alice", ALICE_PW)
        .start();
    let line = one_line(
        &passing_check(&server),
        "account [pbx]: note: no private storage",
    );
    assert_eq!(
        line,
        "account [pbx]: note: no private storage (XEP-0049: refused: service-unavailable): in \
         per-call mode a late answer to a call that ended can move the next one; enable it on \
         the server (prosody: mod_private, ejabberd: mod_private) or use `popivr serve`"
    );
}

/// [`server_line`] on a fresh server of kind `S`, which must name itself
/// as `named` (then a version).
fn server_line_on<S: Start>(named: &str) -> String {
    let server = S::start_with(&[("pbx", PBX_PW), ("alice", ALICE_PW)]);
    let line = server_line(&server);
    let prefix = format!("account [pbx]: server {named} ");
    let version = line
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{line}"));
    assert!(version.starts_with(|c: char| c.is_ascii_digit()), "{line}");
    line
}

/// A stock ejabberd names itself; check says that it limits sessions per
/// account and what that means for per-call mode, as advice: the check
/// still passes.
#[test]
fn check_names_ejabberd_and_its_session_limit() {
    let line = server_line_on::<Ejabberd>("ejabberd");
    for words in [
        "limits sessions per account (max_user_sessions, 10 in its stock config",
        "cannot read the configured value",
        "each waiting call is one session",
        "replace each other's sessions",
        "`popivr serve`",
        "raise the limit for this account",
    ] {
        assert!(line.contains(words), "{words}: {line}");
    }
}

/// Prosody names itself too; it has no such limit, and check says so
/// without advice to change anything.
#[test]
fn check_names_prosody_and_no_session_limit() {
    let line = server_line_on::<Prosody>("Prosody");
    assert!(line.contains("no limit on sessions per account"), "{line}");
    assert!(!line.contains("popivr serve"), "{line}");
}

/// A server that will not name its software leaves the limit unknown,
/// and the check passes all the same.
#[test]
fn a_server_that_hides_its_software_leaves_the_limit_unknown() {
    let server = Prosody::builder()
        .without_version()
        .user("pbx", PBX_PW)
        .user("alice", ALICE_PW)
        .start();
    let line = server_line(&server);
    assert_eq!(
        line,
        "account [pbx]: server software unknown (refused: service-unavailable): its limit \
         on sessions per account is unknown"
    );
}

/// The shipped sample, untouched, is no configuration yet: `check
/// --offline` names each placeholder left in place (the secret, without
/// showing any real one, and every name under an RFC 2606 example
/// domain) and fails; with them replaced it passes.
#[test]
fn the_untouched_sample_names_its_placeholders_and_fails() {
    let sample = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("dialplan/popivr.conf.sample"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popivr.conf");
    testbed::write_private(&path, sample.as_bytes()).unwrap();
    let (out, text) = check(&path, &["--offline"]);
    assert!(!out.status.success(), "{text}");
    for line in [
        "placeholder: [pbx] secret: still the sample's `CHANGE-ME`",
        "placeholder: [pbx] username: `pbx@example.org/popivr` is an example name (RFC 2606)",
        "placeholder: [pbx] serverhost: `xmpp.example.org` is an example name (RFC 2606)",
        "placeholder: [sales] targets: `alice@example.org` is an example name (RFC 2606)",
        "placeholder: [support] room: `support@conference.example.org` is an example name",
        "placeholder: [sales] url: `crm.example.org` is an example name (RFC 2606)",
    ] {
        assert!(text.contains(line), "{line}:\n{text}");
    }
    assert!(
        text.contains("placeholder(s) of the sample left in place"),
        "{text}"
    );

    let mine = sample
        .replace("example.org", "pbx.corp.internal")
        .replace("Example.org", "pbx.corp.internal")
        .replace("CHANGE-ME", "a-real-secret");
    testbed::write_private(&path, mine.as_bytes()).unwrap();
    let (out, text) = check(&path, &["--offline"]);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("placeholder"), "{text}");
}
