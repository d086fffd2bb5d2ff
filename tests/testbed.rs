//! The library's throw-away prosody (`popivr_testkit::testbed`): the parts tests
//! of other features rely on beyond plain logins — the multi-user chat
//! service and extra virtual hosts.

mod support;

use popivr::xmpp;
use popivr_testkit::testbed::Prosody;
use support::TestAgent;

const PW: &str = "testbed-Secret-4e1d";

/// A local user may create a room on `conference.<domain>`, become its
/// owner and make it expose real JIDs.
#[tokio::test]
async fn a_user_creates_a_non_anonymous_room() {
    let server = Prosody::builder().user("alice", PW).start();
    assert_eq!(server.muc_domain(), "conference.popivr.test");
    let mut alice = TestAgent::login(&server, "alice", PW).await;

    let room = format!("desk@{}", server.muc_domain());
    // Only the room's owner may configure it, so a result proves that the
    // join created the room and made alice its owner.
    if let Err(e) = alice.own_room(&room, "alice", "anyone").await {
        panic!("{e}\n{}", server.log());
    }
    alice.close().await;
}

/// A second virtual host serves its own users, and its name is in the
/// server certificate (popivr's login verifies it against the test CA).
#[tokio::test]
async fn a_second_host_serves_its_own_users() {
    let server = Prosody::builder()
        .host("popivr.testing")
        .user("alice", PW)
        .user_on("popivr.testing", "alice", PW)
        .start();
    assert_eq!(server.hosts(), ["popivr.testing".to_string()]);
    let look_alike = server.account_on("popivr.testing", "alice", PW);
    let conn = xmpp::login(&look_alike)
        .await
        .unwrap_or_else(|e| panic!("login on the second host: {e}\n{}", server.log()));
    assert_eq!(conn.jid.domain().as_str(), "popivr.testing");

    let main = xmpp::login(&server.account("alice", PW))
        .await
        .expect("main host");
    assert_eq!(main.jid.domain().as_str(), "popivr.test");

    // Users are per host: added later, on the second host only.
    server.add_user_on("popivr.testing", "bob", PW);
    xmpp::login(&server.account_on("popivr.testing", "bob", PW))
        .await
        .expect("bob on the second host");
    assert!(xmpp::login(&server.account("bob", PW)).await.is_err());
}

/// The throw-away ejabberd: starts from Debian's stock config without
/// Erlang distribution (no epmd, no node name to collide on), registers
/// users through its stdin, serves an independent client, and leaves
/// neither processes nor files behind.
#[tokio::test]
async fn ejabberd_runs_without_distribution_and_leaves_nothing() {
    use popivr_testkit::testbed::Ejabberd;
    let server = Ejabberd::builder().user("alice", PW).start();
    let pid = server.pid().expect("running") as libc::pid_t;
    let dir = server.scratch_dir().to_path_buf();
    assert_eq!(server.eval("node().").unwrap(), "nonode@nohost");
    // The stock defaults are the shipped ones.
    assert_eq!(
        server
            .eval("ejabberd_shaper:match(<<\"popivr.test\">>, max_user_sessions, jid:make(<<\"a\">>, <<\"popivr.test\">>)).")
            .unwrap(),
        "10"
    );
    assert_eq!(
        server
            .eval("gen_mod:is_loaded(<<\"popivr.test\">>, mod_fail2ban).")
            .unwrap(),
        "true"
    );
    let alice = TestAgent::login(&server, "alice", PW).await;
    assert_eq!(server.session_count("alice").unwrap(), 1);
    server.add_user("bob", PW);
    assert!(server.try_add_user_on("popivr.test", "bob", PW).is_err());
    let bob = TestAgent::login(&server, "bob", PW).await;
    alice.close().await;
    bob.close().await;
    // No password in anything the server wrote.
    for file in ["ejabberd.log", "console.log", "ejabberd.yml"] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        assert!(!text.contains(PW), "{file} holds the password");
    }
    drop(server);
    // The whole process group is gone, and so is the directory.
    assert_eq!(unsafe { libc::kill(-pid, 0) }, -1, "process group left");
    assert!(!dir.exists(), "{} left", dir.display());
}

/// The README's ejabberd settings for popivr's account (a higher session
/// limit, no shaper) are valid ejabberd config and apply to that account
/// only.
#[tokio::test]
async fn ejabberd_readme_settings_exempt_popivr_only() {
    use popivr_testkit::testbed::Ejabberd;
    let server = Ejabberd::builder()
        .config_line(
            "acl:\n  admin:\n     user:\n       - \"\"\n  local:\n    user_regexp: \"\"\n  \
             loopback:\n    ip:\n      - 127.0.0.0/8\n      - ::1/128\n  \
             pbx_acl: {user: {pbx: popivr.test}}",
        )
        .config_line(
            "shaper_rules:\n  max_user_sessions: {100: pbx_acl, 10: all}\n  \
             max_user_offline_messages:\n    5000: admin\n    100: all\n  \
             c2s_shaper: [{none: admin}, {none: pbx_acl}, {normal: all}]\n  s2s_shaper: fast",
        )
        .start();
    let rule = |rule: &str, user: &str| {
        server
            .eval(&format!(
                "ejabberd_shaper:match(<<\"popivr.test\">>, {rule}, \
                 jid:make(<<\"{user}\">>, <<\"popivr.test\">>))."
            ))
            .unwrap()
    };
    assert_eq!(rule("max_user_sessions", "pbx"), "100");
    assert_eq!(rule("max_user_sessions", "alice"), "10");
    assert_eq!(rule("c2s_shaper", "pbx"), "none");
    // `normal`, resolved to its rate and burst size.
    assert_eq!(rule("c2s_shaper", "alice"), "{3000,20000}");
}

/// The test agent keeps reading while it sends: 2,000 messages to
/// itself, sent in runs of 100 on a multi-threaded runtime while the
/// server delivers the earlier ones, all arrive. (tokio-xmpp 6's `Client`
/// fails this in most runs: its reader goes to sleep for good
/// when it meets the lock its sender holds; see `support/agent.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_agent_keeps_reading_while_it_sends() {
    let server = Prosody::builder().user("alice", PW).start();
    let mut alice = TestAgent::login(&server, "alice", PW).await;
    let me = alice.jid().to_string();
    for run in 0..20 {
        for i in 0..100 {
            alice.send_chat(&me, &format!("m{run}.{i}")).await;
        }
        for i in 0..100 {
            let want = format!("m{run}.{i}");
            alice
                .expect_message(|m| support::body(m) == Some(want.as_str()))
                .await;
        }
    }
    alice.close().await;
}
