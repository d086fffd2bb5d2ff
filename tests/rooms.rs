//! Group chat rooms an admin made, on prosody and on a stock ejabberd.
//! Both servers' defaults make such a room semi-anonymous: only
//! moderators see occupants' real JIDs, so popivr (a participant) cannot
//! tell who answered. popivr must notice at the join (the session reports
//! it, `popivr check` fails); a room set to show real JIDs passes.

mod support;

use std::path::PathBuf;

use popivr::call::RealJids;
use popivr::xmpp::{self, SessionOptions, XmppEvent, XmppStatus};
use popivr_testkit::testbed::{self, Ejabberd, Server};
use support::{Prosody, TestAgent, WAIT};
use tokio::time::timeout;

const PBX_PW: &str = "pbx-Secret-6e0b";
const OWNER_PW: &str = "owner-Secret-19fa";

/// The team room hides real JIDs; the open one shows them.
const HIDDEN: &str = "team";
const SHOWN: &str = "team-open";

/// ejabberd: rooms made as an admin does (`create_room_with_opts`), with
/// the stock default options and, for one, `anonymous: false`.
fn ejabberd() -> Ejabberd {
    let server = Ejabberd::builder().user("pbx", PBX_PW).start();
    server.create_room(HIDDEN, &[]).expect("create room");
    server
        .create_room(SHOWN, &[("anonymous", "false")])
        .expect("create room");
    server
}

/// prosody: a room owner creates each room, configures it persistent
/// with the given `whois` and leaves (one client per room keeps its
/// unread stanzas few). `whois` = moderators is prosody's stock default;
/// the testbed's own default shows JIDs, so it is set explicitly here.
async fn prosody() -> Prosody {
    let server = Prosody::builder()
        .user("pbx", PBX_PW)
        .user("owner", OWNER_PW)
        .start();
    for (room, whois) in [(HIDDEN, "moderators"), (SHOWN, "anyone")] {
        let mut owner = TestAgent::login(&server, "owner", OWNER_PW).await;
        let room = format!("{room}@{}", server.muc_domain());
        if let Err(e) = owner.own_room(&room, "owner", whois).await {
            panic!("{e}");
        }
        owner.close().await;
    }
    server
}

/// What popivr's session reports when it joins `room`.
async fn join(server: &impl Server, room: &str) -> RealJids {
    let room = format!("{room}@{}", server.muc_domain());
    let options = SessionOptions {
        rooms: vec![(room.clone(), "popivr".into())],
        ..Default::default()
    };
    let mut session = xmpp::spawn(server.account("pbx", PBX_PW), options);
    let jids = timeout(WAIT, async {
        loop {
            match session.recv().await {
                Some(XmppEvent::Joined(r, jids)) if r == room => return jids,
                Some(XmppEvent::RoomFailed(r, cause)) => panic!("join {r}: {cause}"),
                Some(XmppEvent::Status(XmppStatus::Failed(cause))) => panic!("{cause}"),
                Some(_) => continue,
                None => panic!("session ended"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{}: no join of {room}\n{}", server.name(), server.log()));
    session.close().await;
    jids
}

fn config(server: &impl Server, dir: &std::path::Path, room: &str) -> PathBuf {
    let path = dir.join(format!("popivr-{room}.conf"));
    let text = format!(
        "{}[sales]\ntype = profile\naccount = pbx\n\
         room = {room}@{}\nroom_allow = alice@{}\nreply = 1 -> continue desk\n",
        support::server::account_section(server, "pbx", PBX_PW),
        server.muc_domain(),
        server.domain(),
    );
    testbed::write_private(&path, text.as_bytes()).expect("write config");
    path
}

/// `popivr check` on a profile posting to `room`: (passed, output).
fn check(config: &std::path::Path) -> (bool, String) {
    let (out, text) = support::pbx::popivr_check(config, &[], &[PBX_PW]);
    (out.status.success(), text)
}

async fn rooms_are_told_apart(server: &impl Server, dir: &std::path::Path) {
    let name = server.name();
    assert_eq!(join(server, HIDDEN).await, RealJids::Hidden, "{name}");
    assert_eq!(join(server, SHOWN).await, RealJids::Shown, "{name}");

    let (passed, text) = check(&config(server, dir, HIDDEN));
    assert!(
        !passed,
        "{name}: check passed a room that hides JIDs:\n{text}"
    );
    assert!(
        text.contains(&format!("room {HIDDEN}@{}: FAILED: ", server.muc_domain()))
            && text.contains("anonymous: false"),
        "{name}:\n{text}"
    );
    let (passed, text) = check(&config(server, dir, SHOWN));
    assert!(passed, "{name}:\n{text}");
    assert!(text.contains("joined; real JIDs shown"), "{name}:\n{text}");
    // Neither server offers a tls-exporter binding over TLS 1.3 (prosody
    // 0.12 offers none, ejabberd 23.01 only tls-unique): check says so.
    assert!(
        text.contains("account [pbx]: note: no channel binding: "),
        "{name}:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_admins_room_that_hides_real_jids_is_detected_on_ejabberd() {
    let server = ejabberd();
    rooms_are_told_apart(&server, server.scratch_dir()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn an_admins_room_that_hides_real_jids_is_detected_on_prosody() {
    let server = prosody().await;
    rooms_are_told_apart(&server, server.scratch_dir()).await;
}
