//! popivr's other profiles on a real Asterisk 23.4.1, each driven by its
//! **shipped** dialplan snippet (dialplan/*.conf) and the profile printed
//! in that snippet's own comment, as an admin copies both. The tests
//! substitute only the program path, the accounts (the JIDs' domain, the
//! `[pbx]` client section) and, where the snippet dials phones this test
//! Asterisk does not have (no chan_pjsip), the phones. Each test that
//! talks XMPP runs against prosody and, named `…_on_ejabberd`, against a
//! stock ejabberd.
//!
//! What the dialplan did after ExternalIVR is read from AMI events
//! (`VarSet`, `Newexten`); every test checks that no channel is left in
//! ExternalIVR. Without an Asterisk these tests fail, saying so (see
//! tests/real_asterisk.rs).

mod support;

use std::time::Duration;

use popivr_testkit::testbed::asterisk::{Asterisk, Call, Originate};
use popivr_testkit::testbed::{DOMAIN, Ejabberd, free_port};
use support::pbx::{self, BIN, Daemon, shipped, tests_on};
use support::{Prosody, Start, TestAgent, TestMessage, WAIT, account_section, body, subscribe};
use xmpp_parsers::message::{Message, MessageType};
use xmpp_parsers::presence::Show;

const PBX_PW: &str = "pbx-Profiles-41d7c2";

fn password(user: &str) -> String {
    format!("{user}-Profiles-8a3f")
}

/// The popivr.conf a snippet's comment shows (the indented lines after
/// "popivr.conf:"), moved to the test server's domain.
fn documented_profile(snippet: &str, domain: &str) -> String {
    let mut lines = snippet.lines().skip_while(|l| !l.contains("popivr.conf:"));
    lines.next();
    // Indented lines, and lone `;` between them; prose ends the block.
    let text: Vec<&str> = lines
        .map_while(|l| match l.trim_end() {
            ";" => Some(""),
            l => l.strip_prefix(";   "),
        })
        .collect();
    assert!(!text.is_empty(), "no popivr.conf in the snippet's comment");
    text.join("\n")
        .replace("@example.org", &format!("@{domain}"))
        .replace("@conference.example.org", &format!("@conference.{domain}"))
        + "\n"
}

/// The caller side: listens, presses 1 or # after a second, or hangs up
/// after two seconds.
const CALLERS: &str = "\n[caller]\n\
    exten => listen,1,Wait(60)\n\
    exten => key1,1,Wait(1)\n same => n,SendDTMF(1)\n same => n,Wait(60)\n\
    exten => keyhash,1,Wait(1)\n same => n,SendDTMF(#)\n same => n,Wait(60)\n\
    exten => quit,1,Wait(2)\n same => n,Hangup()\n";

/// Phones for the snippets that dial: ring for a minute, never answer.
const DESKS: &str = "\n[desks]\nexten => _X.,1,Wait(60)\n";

/// An XMPP server of kind `S` with popivr's account and `users`,
/// popivr's config, the agents in `online` logged in and subscribed to,
/// and a real Asterisk running one shipped snippet (per call, or over
/// `ivr://` to the daemon).
struct Lab<S: Start> {
    xmpp: S,
    agents: Vec<(String, TestAgent)>,
    pbx: Asterisk,
    _daemon: Option<Daemon>,
    _dir: tempfile::TempDir,
}

struct Setup<'a> {
    snippet: &'a str,
    users: &'a [&'a str],
    online: &'a [&'a str],
    /// The snippet as the test runs it, from the shipped text.
    adapt: &'a dyn Fn(String) -> String,
    /// popivr.conf's profiles, instead of those in the snippet's comment.
    profile: Option<&'a str>,
    sounds: &'a [(&'a str, Duration)],
    serve: bool,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            snippet: "",
            users: &[],
            online: &[],
            adapt: &|s| s,
            profile: None,
            sounds: &[],
            serve: false,
        }
    }
}

impl<S: Start> Lab<S> {
    async fn start(setup: Setup<'_>) -> Self {
        let passwords: Vec<(&str, String)> =
            setup.users.iter().map(|u| (*u, password(u))).collect();
        let users: Vec<(&str, &str)> = std::iter::once(("pbx", PBX_PW))
            .chain(passwords.iter().map(|(u, pw)| (*u, pw.as_str())))
            .collect();
        let xmpp = S::start_with(&users);
        let mut agents = Vec::new();
        for user in setup.online {
            agents.push((
                user.to_string(),
                TestAgent::login(&xmpp, user, &password(user)).await,
            ));
        }
        let mut refs: Vec<&mut TestAgent> = agents.iter_mut().map(|(_, a)| a).collect();
        if !refs.is_empty() {
            subscribe(&xmpp, ("pbx", PBX_PW), &mut refs).await;
        }
        let dir = tempfile::Builder::new()
            .prefix("popivr-profiles-")
            .tempdir()
            .unwrap();
        let conf = dir.path().join("popivr.conf");
        let text = shipped(setup.snippet);
        let profile = match setup.profile {
            Some(profile) => profile.to_owned(),
            None => documented_profile(&text, xmpp.domain()),
        };
        std::fs::write(&conf, account_section(&xmpp, "pbx", PBX_PW) + &profile).unwrap();
        let daemon = setup.serve.then(|| {
            let port = free_port();
            (Daemon::start(&conf, port), port)
        });
        let mut dialplan = (setup.adapt)(text).replace("/usr/bin/popivr", BIN);
        if let Some((_, port)) = &daemon {
            dialplan = dialplan.replace("popivr.example.org", &format!("127.0.0.1:{port}"));
        }
        let mut pbx = Asterisk::builder()
            .dialplan(&format!("{dialplan}{CALLERS}{DESKS}"))
            // The snippets dial after ExternalIVR: app_dial shows where in
            // a Newexten event (there is no PJSIP here, so such a Dial
            // fails at once).
            .module("app_dial")
            .env("POPIVR_CONFIG", &conf.display().to_string())
            // popivr's default hold; a real install has it.
            .sound("silence/1", Duration::from_secs(1));
        for (name, length) in setup.sounds {
            pbx = pbx.sound(name, *length);
        }
        Lab {
            xmpp,
            agents,
            pbx: pbx.start().await,
            _daemon: daemon.map(|(d, _)| d),
            _dir: dir,
        }
    }

    fn agent(&mut self, user: &str) -> &mut TestAgent {
        &mut self
            .agents
            .iter_mut()
            .find(|(u, _)| u == user)
            .unwrap_or_else(|| panic!("{user} is not online"))
            .1
    }

    /// Two online agents at once.
    fn two_agents(&mut self, a: &str, b: &str) -> (&mut TestAgent, &mut TestAgent) {
        let mut both = self.agents.iter_mut().filter(|(u, _)| u == a || u == b);
        let (first, second) = (both.next().unwrap(), both.next().unwrap());
        if first.0 == a {
            (&mut first.1, &mut second.1)
        } else {
            (&mut second.1, &mut first.1)
        }
    }

    /// A call to `dest` (`EXTEN@CONTEXT` of the snippet) from a caller
    /// who runs `caller` of the [caller] context.
    async fn call(&self, dest: &str, caller: &str, num: &str, name: &str) -> Call {
        self.pbx
            .originate(
                Originate::new(&format!("Local/{dest}"))
                    .caller_id(num, name)
                    .exten("caller", caller),
            )
            .await
            .expect("originate")
    }

    /// Asserts that `user` gets no chat message for a moment.
    async fn gets_nothing(&mut self, user: &str, why: &str) {
        let got = self
            .agent(user)
            .next_message_within(Duration::from_millis(300), |m| chat_body(m).is_some())
            .await;
        assert!(
            got.is_none(),
            "{user} ({why}): {:?}",
            got.as_ref().map(chat_body)
        );
    }

    /// After the test: no channel in ExternalIVR, none at all, and no
    /// popivr process left.
    async fn all_done(&self) {
        pbx::none_left_in_externalivr(&self.pbx).await;
        assert!(self.pbx.wait_no_channels(WAIT).await, "channels left");
        pbx::no_popivr_left(&self.pbx).await;
    }
}

impl<S: Start> Drop for Lab<S> {
    fn drop(&mut self) {
        // On a failure, what Asterisk, popivr (its stderr lines) and the
        // XMPP server said.
        if std::thread::panicking() {
            pbx::print_tail("Asterisk", &self.pbx.log(), 80);
            pbx::print_tail(self.xmpp.name(), &self.xmpp.log(), 40);
        }
    }
}

fn chat_body(m: &Message) -> Option<&str> {
    (m.type_ != MessageType::Groupchat)
        .then(|| body(m))
        .flatten()
}

/// Team pop: the available members get the pop, two answer at once;
/// exactly one action reaches the dialplan, the call rings the winner's
/// desk, and the other is told who took it.
async fn team_race<S: Start>() {
    let mut lab = Lab::<S>::start(Setup {
        snippet: "team-pop.conf",
        users: &["alice", "bob", "carol"],
        online: &["alice", "bob", "carol"],
        ..Setup::default()
    })
    .await;
    lab.agent("carol")
        .set_presence(Some(Show::Away), None)
        .await;
    let call = lab
        .call("200@from-trunk", "listen", "5552001", "Team Caller")
        .await;
    let popivr = lab.xmpp.jid("pbx");
    for user in ["alice", "bob"] {
        let pop = lab
            .agent(user)
            .expect_message(|m| chat_body(m).is_some())
            .await;
        assert!(
            chat_body(&pop).unwrap().contains("5552001"),
            "{user}: {:?}",
            chat_body(&pop)
        );
    }
    assert!(
        !pbx::popivr_processes(&lab.pbx).is_empty(),
        "the call's popivr runs while it waits"
    );
    let (alice, bob) = lab.two_agents("alice", "bob");
    // Both answers leave together: whichever popivr reads first wins.
    tokio::join!(
        alice.send_chat(&popivr, "1"),
        bob.send_chat(&popivr, "take")
    );

    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "take");
    let winner = pbx::var_set(&lab.pbx, &call, "POPIVR_AGENT", WAIT).await;
    let (winner_user, winner_exten, loser_user) = if winner == lab.xmpp.jid("alice") {
        ("alice", "2001", "bob")
    } else {
        assert_eq!(winner, lab.xmpp.jid("bob"), "the winner is one of them");
        ("bob", "2002", "alice")
    };
    let (app, data) = pbx::branch(&lab.pbx, &call, &["Dial", "VoiceMail"]).await;
    assert_eq!(
        (app.as_str(), data.as_str()),
        ("Dial", format!("PJSIP/{winner_exten},30").as_str()),
        "the call rings the winner's desk"
    );
    let taken = format!("Call from 5552001 was taken by {winner}");
    let told = lab
        .agent(loser_user)
        .expect_message(|m| chat_body(m).is_some_and(|b| b.starts_with(&taken)))
        .await;
    assert!(chat_body(&told).is_some());
    lab.agent(winner_user)
        .expect_message(|m| chat_body(m).is_some_and(|b| b.starts_with("Call from 5552001: ")))
        .await;
    lab.gets_nothing("carol", "carol is away").await;
    lab.all_done().await;
    let set = pbx::variables_set(&lab.pbx, &call);
    let actions = set.iter().filter(|n| *n == "POPIVR_ACTION").count();
    assert_eq!(actions, 1, "exactly one action: {set:?}");
}

tests_on! {
    team_race_one_winner_the_other_is_told: Prosody => team_race();
    team_race_one_winner_the_other_is_told_on_ejabberd: Ejabberd => team_race();
}

/// Presence routing: the first available agent by priority gets the pop
/// and the call dials their exten at once; nobody available: the default.
async fn route<S: Start>() {
    let mut lab = Lab::<S>::start(Setup {
        snippet: "presence-route.conf",
        users: &["alice", "bob"],
        online: &["alice", "bob"],
        ..Setup::default()
    })
    .await;
    let popped = |m: &Message| {
        chat_body(m).is_some_and(|b| b == "Call from Route Caller <5553001> is ringing your phone")
    };

    // alice (priority 1) is busy: bob.
    lab.agent("alice").set_presence(Some(Show::Dnd), None).await;
    let call = lab
        .call("300@from-trunk", "listen", "5553001", "Route Caller")
        .await;
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "route");
    let (app, data) = pbx::branch(&lab.pbx, &call, &["Dial", "Queue"]).await;
    assert_eq!((app.as_str(), data.as_str()), ("Dial", "PJSIP/2002,20"));
    lab.agent("bob").expect_message(popped).await;

    // alice is back: she comes first.
    lab.agent("alice").set_presence(None, None).await;
    let call = lab
        .call("300@from-trunk", "listen", "5553001", "Route Caller")
        .await;
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "route");
    let (app, data) = pbx::branch(&lab.pbx, &call, &["Dial", "Queue"]).await;
    assert_eq!((app.as_str(), data.as_str()), ("Dial", "PJSIP/2001,20"));
    lab.agent("alice").expect_message(popped).await;

    // Both busy: the default action (queue) at once, no Dial.
    lab.agent("alice").set_presence(Some(Show::Dnd), None).await;
    lab.agent("bob").set_presence(Some(Show::Dnd), None).await;
    let call = lab
        .call("300@from-trunk", "listen", "5553001", "Route Caller")
        .await;
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "queue");
    lab.all_done().await;
    let dialed = lab
        .pbx
        .events()
        .iter()
        .any(|e| call.owns(e) && pbx::is(e, "Application", "Dial"));
    assert!(!dialed, "nobody available, yet the call dialed");
    for user in ["alice", "bob"] {
        lab.gets_nothing(user, "nobody available").await;
    }
}

tests_on! {
    route_dials_the_first_available_agent: Prosody => route();
    route_dials_the_first_available_agent_on_ejabberd: Ejabberd => route();
}

/// Notify only: the pop (with its CRM link) goes out and the dialplan
/// dials at once, nobody answering.
async fn notify<S: Start>() {
    let mut lab = Lab::<S>::start(Setup {
        snippet: "notify-only.conf",
        users: &["alice"],
        online: &["alice"],
        ..Setup::default()
    })
    .await;
    let call = lab
        .call("400@from-trunk", "listen", "5554001", "Doe, John")
        .await;
    // The profile's timeout (30 s by default) plays no part: the call is
    // in the Dial long before.
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "notify");
    let (app, data) = pbx::branch(&lab.pbx, &call, &["Dial"]).await;
    assert_eq!((app.as_str(), data.as_str()), ("Dial", "PJSIP/alice,30"));
    let pop = lab
        .agent("alice")
        .expect_message(|m| chat_body(m).is_some())
        .await;
    assert_eq!(
        chat_body(&pop).unwrap(),
        "Call from Doe, John <5554001> for 400\nhttps://crm.example.org/lookup?number=5554001"
    );
    let oob = pop
        .payloads
        .iter()
        .find(|p| p.is("x", "jabber:x:oob"))
        .expect("the link as XEP-0066 out-of-band data");
    assert_eq!(
        oob.get_child("url", "jabber:x:oob").map(|u| u.text()),
        Some("https://crm.example.org/lookup?number=5554001".to_owned())
    );
    lab.all_done().await;
}

tests_on! {
    notify_pops_and_the_call_goes_on_at_once: Prosody => notify();
    notify_pops_and_the_call_goes_on_at_once_on_ejabberd: Ejabberd => notify();
}

/// The h extension with option d: the caller hangs up while the desks
/// ring (the Dial ends with CANCEL); popivr, started on the dead channel, sends the missed-call
/// notice to the available targets, finishes with E and exits.
async fn missed_from_h<S: Start>() {
    let mut lab = Lab::<S>::start(Setup {
        snippet: "missed-call.conf",
        users: &["alice", "bob"],
        online: &["alice", "bob"],
        // The desks' phones, which ring without answering (no PJSIP here).
        adapt: &|s| s.replace("PJSIP/alice&PJSIP/bob", "Local/2001@desks&Local/2002@desks"),
        ..Setup::default()
    })
    .await;
    lab.agent("bob").set_presence(Some(Show::Away), None).await;
    // The snippet does not answer before the Dial: the caller hears it
    // ring, and gives up while the desks ring.
    let call = lab
        .pbx
        .originate(Originate::new("Local/500@from-trunk").caller_id("5555001", "Gone, Too Soon"))
        .await
        .expect("originate");
    let (app, _) = pbx::branch(&lab.pbx, &call, &["Dial"]).await;
    assert_eq!(app, "Dial");
    lab.pbx
        .hangup_call(&call)
        .await
        .expect("the caller hangs up");
    // Dial clears DIALSTATUS as it starts, then sets the outcome.
    let status = lab
        .pbx
        .wait_event(
            |e| {
                call.owns(e)
                    && pbx::is(e, "Variable", "DIALSTATUS")
                    && e.get("Value").is_some_and(|v| !v.is_empty())
            },
            WAIT,
        )
        .await;
    assert_eq!(
        status["Value"], "CANCEL",
        "the caller hung up during the Dial"
    );
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "missed");
    lab.agent("alice")
        .expect_message(|m| {
            chat_body(m).is_some_and(|b| b == "Missed call from Gone, Too Soon <5555001> to 500")
        })
        .await;
    lab.all_done().await;
    lab.gets_nothing("bob", "bob is away").await;
    assert!(
        lab.pbx
            .log()
            .contains("ExternalIVR(\"Local/500@from-trunk-"),
        "popivr ran from the h extension"
    );
}

tests_on! {
    missed_from_the_h_extension_on_a_dead_channel: Prosody => missed_from_h();
    missed_from_the_h_extension_on_a_dead_channel_on_ejabberd: Ejabberd => missed_from_h();
}

/// The group chat profile: popivr posts the pop in the room; a reply from
/// an occupant not allowed does nothing, one from an allowed occupant
/// steers the call; the outcome is announced in the room.
async fn group_chat<S: Start>(make_room: fn(&S)) {
    let mut lab = Lab::<S>::start(Setup {
        snippet: "group-chat.conf",
        users: &["alice", "mallory"],
        online: &["alice", "mallory"],
        ..Setup::default()
    })
    .await;
    make_room(&lab.xmpp);
    let room = format!("frontdesk@{}", lab.xmpp.muc_domain());
    for (user, nick) in [("alice", "al"), ("mallory", "mal")] {
        let agent = lab.agent(user);
        agent
            .send_raw(&format!(
                "<presence xmlns='jabber:client' to='{room}/{nick}'>\
                 <x xmlns='http://jabber.org/protocol/muc'/></presence>"
            ))
            .await;
        // The room's subject comes last when joining: we are in.
        agent
            .expect_message(|m| m.type_ == MessageType::Groupchat && !m.subjects.is_empty())
            .await;
    }
    let from_popivr = |m: &Message, text: &str| {
        m.type_ == MessageType::Groupchat
            && m.from
                .as_ref()
                .is_some_and(|f| f.resource().is_some_and(|r| r.as_str() == "Switchboard"))
            && body(m).is_some_and(|b| b.contains(text))
    };
    let call = lab
        .call("600@from-trunk", "listen", "5556001", "Room Caller")
        .await;
    for user in ["alice", "mallory"] {
        lab.agent(user)
            .expect_message(|m| from_popivr(m, "5556001"))
            .await;
    }
    let say = |text: &str| TestMessage::chat(&room, text).kind(MessageType::Groupchat);
    lab.agent("mallory").send(say("1")).await;
    // Everyone sees what is said in the room; popivr saw it too by then.
    lab.agent("alice")
        .expect_message(|m| m.type_ == MessageType::Groupchat && body(m) == Some("1"))
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pbx::variables_set(&lab.pbx, &call).contains(&"POPIVR_ACTION".to_owned()),
        "an occupant not allowed steered the call"
    );
    lab.agent("alice").send(say("1")).await;
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "desk");
    let agent = pbx::var_set(&lab.pbx, &call, "POPIVR_AGENT", WAIT).await;
    assert_eq!(agent, lab.xmpp.jid("alice"), "the occupant's real JID");
    let (app, data) = pbx::branch(&lab.pbx, &call, &["Dial", "VoiceMail"]).await;
    assert_eq!(
        (app.as_str(), data.as_str()),
        ("Dial", "PJSIP/frontdesk,30")
    );
    lab.agent("mallory")
        .expect_message(|m| from_popivr(m, "desk"))
        .await;
    lab.all_done().await;
}

/// On ejabberd the room is set up by an admin, as the README's *ejabberd*
/// says for a room popivr posts to: the stock room options but
/// `anonymous: false`. A stock room hides occupants' real JIDs from popivr
/// (a participant), so the answer from alice, whom the snippet's
/// `room_allow` names by real JID, would rightly be ignored (tests/rooms.rs
/// shows popivr telling). The one default this test changes, for itself.
fn room_showing_real_jids(server: &Ejabberd) {
    server
        .create_room("frontdesk", &[("anonymous", "false")])
        .unwrap_or_else(|e| panic!("{e}"));
}

tests_on! {
    // On prosody alice's join creates the room; the testbed's prosody makes
    // new rooms show real JIDs.
    group_chat_pop_and_a_reply_from_the_room: Prosody => group_chat(|_| {});
    group_chat_pop_and_a_reply_from_the_room_on_ejabberd: Ejabberd =>
        group_chat(room_showing_real_jids);
}

/// Keys only, no XMPP: a caller key continues the dialplan after its
/// prompt, another hangs up.
/// It talks to no XMPP server, so it runs once, not on each server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_only_continue_and_hang_up() {
    let lab = Lab::<Prosody>::start(Setup {
        snippet: "keys-only.conf",
        sounds: &[
            ("custom/closed", Duration::from_secs(5)),
            ("beep", Duration::from_millis(300)),
            ("goodbye", Duration::from_millis(300)),
        ],
        ..Setup::default()
    })
    .await;
    let vm = lab
        .call("100@from-trunk-night", "key1", "5557001", "Night Owl")
        .await;
    assert_eq!(pbx::action(&lab.pbx, &vm, WAIT).await, "voicemail");
    let bye = lab
        .call("100@from-trunk-night", "keyhash", "5557002", "Night Owl")
        .await;
    assert_eq!(pbx::action(&lab.pbx, &bye, WAIT).await, "hangup");
    lab.all_done().await;
    let log = lab.pbx.log();
    assert!(
        log.contains("got command 'S,beep'"),
        "the key's prompt played"
    );
    assert!(
        !lab.pbx
            .events()
            .iter()
            .any(|e| bye.owns(e) && pbx::is(e, "Event", "Newexten") && pbx::is(e, "Priority", "4")),
        "the dialplan went on after the hangup key"
    );
}

/// Asterisk handles one command line per wake-up of its command fd, and
/// nothing but popivr's own writes wakes it for lines already in its
/// buffer (externalivr-protocol.md). With a hold file longer than the
/// test, no `F` event makes popivr write again: the start-up reads and
/// the final `V` + `E` are handled only because popivr's writer wakes
/// Asterisk itself (src/eivr/pace.rs). Without that, the pop shows no
/// caller and the call stays in ExternalIVR until the hold file ends.
async fn long_hold_reply<S: Start>(serve: bool) {
    let profile = format!(
        "[sales]\ntype = profile\naccount = pbx\ntargets = alice@{DOMAIN}\n\
         hold = custom/long\n\
         template = Call from $caller_name$ <$caller$> to $number$. Reply 1 desk\n\
         reply = 1 -> continue desk\ntimeout = 120\ndefault = continue voicemail\n"
    );
    let (snippet, exten) = if serve {
        ("ivr-daemon.conf", "100@from-trunk")
    } else {
        ("interactive-pop.conf", "100@from-trunk")
    };
    let mut lab = Lab::<S>::start(Setup {
        snippet,
        users: &["alice"],
        online: &["alice"],
        profile: Some(&profile),
        sounds: &[("custom/long", LONG_HOLD)],
        serve,
        ..Setup::default()
    })
    .await;
    let started = std::time::Instant::now();
    let call = lab.call(exten, "listen", "5558001", "Quiet Line").await;
    let pop = lab
        .agent("alice")
        .expect_message(|m| chat_body(m).is_some())
        .await;
    let popivr = lab.xmpp.jid("pbx");
    lab.agent("alice").send_chat(&popivr, "1").await;
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "desk");
    let v_handled = std::time::Instant::now();
    // The dialplan goes on: the E after the V was handled, promptly. A
    // stranded E is not stranded for good: once popivr's writer has heard
    // no answer for 10 s it gives up and the socket closes, which wakes
    // Asterisk too. So "promptly" is well under that.
    let (app, data) = pbx::branch(&lab.pbx, &call, &["Dial"]).await;
    assert_eq!((app.as_str(), data.as_str()), ("Dial", "PJSIP/desk,30"));
    assert!(
        v_handled.elapsed() < E_AFTER_V,
        "serve {serve}: the E came {:?} after the V",
        v_handled.elapsed()
    );
    // Checked after the E, so that the E is what a broken writer fails on
    // first (the V before it is handled by the reply's own write).
    assert_eq!(
        chat_body(&pop).unwrap(),
        "Call from Quiet Line <5558001> to 100. Reply 1 desk",
        "serve {serve}: every start-up read was handled"
    );
    // The hold file has not ended yet: no F event can have helped.
    assert!(
        started.elapsed() < LONG_HOLD,
        "serve {serve}: took {:?}",
        started.elapsed()
    );
    let queued = lab.pbx.log().matches("got command 'A,custom/long'").count();
    assert!(
        queued <= 1,
        "serve {serve}: the hold file ended and was queued again ({queued}x): no test of pacing"
    );
    lab.all_done().await;
}

/// How long the E may follow the V of the same batch: milliseconds when
/// popivr wakes Asterisk; generous for a loaded machine, and half of the
/// writer's 10 s stall limit.
const E_AFTER_V: Duration = Duration::from_secs(5);

/// Longer than any wait in [`long_hold_reply`] (pop and reply take a few
/// seconds, the waits at most 10 s each).
const LONG_HOLD: Duration = Duration::from_secs(40);

tests_on! {
    serve_final_e_is_handled_without_any_event_to_wake_asterisk: Prosody =>
        long_hold_reply(true);
    per_call_final_e_is_handled_without_any_event_to_wake_asterisk: Prosody =>
        long_hold_reply(false);
    serve_final_e_is_handled_without_any_event_to_wake_asterisk_on_ejabberd: Ejabberd =>
        long_hold_reply(true);
    per_call_final_e_is_handled_without_any_event_to_wake_asterisk_on_ejabberd: Ejabberd =>
        long_hold_reply(false);
}
