//! popivr on a real Asterisk 23.4.1 (`popivr_testkit::testbed::asterisk`), with a
//! real prosody and, in the tests ending `_on_ejabberd`, a stock ejabberd,
//! in both modes: per call (`ExternalIVR(/path/popivr(...))`) and
//! `ivr://` to `popivr serve`. Each test loads the **shipped**
//! dialplan snippet of its mode (dialplan/, with the popivr-calldata line
//! in it) as an admin would, substituting only the program path and the
//! daemon's address. Callers are Local channels; what the dialplan
//! did after ExternalIVR is read from AMI events (`VarSet`, `Newexten`),
//! and every test checks that no channel is left inside ExternalIVR.
//!
//! Without an Asterisk (`POPIVR_ASTERISK`, `asterisk` on PATH, or the one
//! `.ci/test` builds into the cache) these tests fail, saying so.

mod support;

use std::time::{Duration, Instant};

use popivr_testkit::testbed::asterisk::{Asterisk, Call, Originate};
use popivr_testkit::testbed::{Ejabberd, Server, free_port};
use support::pbx::{self, BIN, Daemon, shipped, tests_on};
use support::{Prosody, Start, TestAgent, WAIT, account_section, body, subscribe};

const PBX_PW: &str = "pbx-Real-7c1e90";
const ALICE_PW: &str = "alice-Real-3b8d21";
const MALLORY_PW: &str = "mallory-Real-99e0a1";
/// A caller name with everything that could split an argument, a variable
/// or a line, and non-ASCII.
const HOSTILE_NAME: &str = "O'Brien, \"Jo\" (Sales) Müller;x=1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    PerCall,
    Serve,
}

/// One lab: an XMPP server of kind `S` with popivr's account and the
/// agents, popivr's config, a real Asterisk running the shipped snippet
/// for `mode`, and for serve mode the daemon.
struct Lab<S: Start> {
    xmpp: S,
    /// Online and subscribed to by popivr's account before popivr runs.
    alice: Option<TestAgent>,
    pbx: Asterisk,
    _daemon: Option<Daemon>,
    /// popivr's config and, in serve mode, its log.
    dir: tempfile::TempDir,
}

/// `popivr serve`'s log (at -v) in the lab's directory.
const SERVE_LOG: &str = "serve.log";

impl<S: Start> Drop for Lab<S> {
    fn drop(&mut self) {
        // On a failure, what Asterisk, popivr (per call: its stderr lines
        // in Asterisk's log; serve: its own log) and the XMPP server said.
        if std::thread::panicking() {
            pbx::print_tail("Asterisk", &self.pbx.log(), 80);
            pbx::print_tail("popivr serve", &self.serve_log(), 40);
            pbx::print_tail(self.xmpp.name(), &self.xmpp.log(), 40);
        }
    }
}

/// The pop's text unless a test says otherwise.
const TEMPLATE: &str = "Call from $caller_name$ <$caller$> to $number$ (${queue}). Reply 1 desk";

/// popivr's configuration: the account and the profile `sales` with
/// `template`, `extra` lines added to it.
fn config_with(xmpp: &impl Server, timeout: &str, template: &str, extra: &str) -> String {
    format!(
        "{account}[sales]\ntype = profile\naccount = pbx\ntargets = {alice}\nhold = custom/hold\n\
         template = {template}\n\
         missed = Missed call from $caller_name$ <$caller$>\n\
         reply = 1, desk -> continue desk\nreply = 2 -> continue voicemail\n\
         reply = h -> hangup\n\
         key = 0 -> continue operator\n\
         timeout = {timeout}\ndefault = continue voicemail\n{extra}",
        account = account_section(xmpp, "pbx", PBX_PW),
        alice = xmpp.jid("alice"),
    )
}

/// The caller side: listens, presses 0 after a second, or hangs up after
/// two seconds.
const CALLERS: &str = "\n[caller]\n\
    exten => listen,1,Wait(60)\n\
    exten => key0,1,Wait(1)\n same => n,SendDTMF(0)\n same => n,Wait(60)\n\
    exten => quit,1,Wait(2)\n same => n,Hangup()\n";

impl<S: Start> Lab<S> {
    async fn start(mode: Mode, timeout: &str) -> Self {
        Self::start_with(mode, timeout, TEMPLATE, "", "").await
    }

    /// [`Lab::start`] with another template, `extra` profile lines, and
    /// `line` (dialplan) inserted in the snippet right before its
    /// ExternalIVR, where the README says to put the copy of a SIP header.
    async fn start_with(
        mode: Mode,
        timeout: &str,
        template: &str,
        extra: &str,
        line: &str,
    ) -> Self {
        let xmpp = S::start_with(&[
            ("pbx", PBX_PW),
            ("alice", ALICE_PW),
            ("mallory", MALLORY_PW),
        ]);
        let dir = tempfile::Builder::new()
            .prefix("popivr-real-")
            .tempdir()
            .unwrap();
        let mut alice = TestAgent::login(&xmpp, "alice", ALICE_PW).await;
        subscribe(&xmpp, ("pbx", PBX_PW), &mut [&mut alice]).await;
        let alice = Some(alice);
        let conf = dir.path().join("popivr.conf");
        std::fs::write(&conf, config_with(&xmpp, timeout, template, extra)).unwrap();
        let (snippet, daemon) = match mode {
            Mode::PerCall => (
                shipped("interactive-pop.conf").replace("/usr/bin/popivr", BIN),
                None,
            ),
            Mode::Serve => {
                let port = free_port();
                let daemon = Daemon::start_logged(&conf, port, &dir.path().join(SERVE_LOG));
                let text = shipped("ivr-daemon.conf")
                    .replace("popivr.example.org", &format!("127.0.0.1:{port}"));
                (text, Some(daemon))
            }
        };
        let snippet = match line {
            "" => snippet,
            line => {
                let at = snippet
                    .find(" same => n,ExternalIVR(")
                    .or_else(|| snippet.find(" same => n,TryExec(ExternalIVR("))
                    .expect("the snippet runs ExternalIVR");
                format!("{}{line}\n{}", &snippet[..at], &snippet[at..])
            }
        };
        let pbx = Asterisk::builder()
            .dialplan(&format!("{snippet}{CALLERS}"))
            // The snippets' desk branch dials: app_dial shows it in a Newexten
            // event (there is no PJSIP here, so the Dial itself fails).
            .module("app_dial")
            .env("POPIVR_CONFIG", &conf.display().to_string())
            .sound("custom/hold", Duration::from_millis(800))
            .start()
            .await;
        Lab {
            xmpp,
            alice,
            pbx,
            _daemon: daemon,
            dir,
        }
    }

    /// What popivr wrote to stderr so far: per call, Asterisk logs each
    /// line of it; `popivr serve` writes its own log.
    fn popivr_log(&self) -> String {
        self.pbx.log() + &self.serve_log()
    }

    /// `popivr serve`'s log; empty per call.
    fn serve_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join(SERVE_LOG)).unwrap_or_default()
    }

    fn alice(&mut self) -> TestAgent {
        self.alice.take().expect("alice is taken once")
    }

    async fn call(&self, caller_exten: &str, num: &str, name: &str) -> Call {
        self.pbx
            .originate(
                Originate::new("Local/100@from-trunk")
                    .caller_id(num, name)
                    .exten("caller", caller_exten),
            )
            .await
            .expect("originate")
    }
}

/// A SIP header copied into a variable as the README says (here from a
/// channel variable the caller side sets: this Asterisk has no PJSIP, so
/// `PJSIP_HEADER(read,…)` itself is not run) reaches the pop intact,
/// hostile characters and all.
async fn sip_header_in_the_pop<S: Start>(mode: Mode) {
    let readme = "Set(POPIVR_SIP_X-Customer-Id=${URIENCODE(${PJSIP_HEADER(read,X-Customer-Id)})})";
    let line = format!(
        " same => n,{}",
        readme.replace("PJSIP_HEADER(read,X-Customer-Id)", "CUSTOMER")
    );
    let template = "Customer [sip.X-Customer-Id] calls. Reply 1 desk";
    let extra = "sip_headers = X-Customer-Id\n";
    let mut lab = Lab::<S>::start_with(mode, "30", template, extra, &line).await;
    let mut alice = lab.alice();
    let id = "C-42, \"VIP\" (gold);x=1 ü";
    let call = lab
        .pbx
        .originate(
            Originate::new("Local/100@from-trunk")
                .caller_id("5550020", "Customer")
                .var("__CUSTOMER", id)
                .exten("caller", "listen"),
        )
        .await
        .expect("originate");
    let pop = alice.expect_message(|m| body(m).is_some()).await;
    assert_eq!(
        body(&pop).unwrap(),
        format!("Customer {id} calls. Reply 1 desk"),
        "{mode:?}"
    );
    alice.send_chat(&lab.xmpp.jid("pbx"), "1").await;
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "desk", "{mode:?}");
    pbx::none_left_in_externalivr(&lab.pbx).await;
}

tests_on! {
    per_call_sip_header_in_the_pop: Prosody => sip_header_in_the_pop(Mode::PerCall);
    serve_sip_header_in_the_pop: Prosody => sip_header_in_the_pop(Mode::Serve);
    per_call_sip_header_in_the_pop_on_ejabberd: Ejabberd => sip_header_in_the_pop(Mode::PerCall);
    serve_sip_header_in_the_pop_on_ejabberd: Ejabberd => sip_header_in_the_pop(Mode::Serve);
}

async fn pop_reply_and_branch<S: Start>(mode: Mode) {
    let mut lab = Lab::<S>::start(mode, "30").await;
    let mut alice = lab.alice();
    let call = lab.call("listen", "+4930555123", HOSTILE_NAME).await;
    let pop = alice.expect_message(|m| body(m).is_some()).await;
    assert_eq!(
        body(&pop).unwrap(),
        format!("Call from {HOSTILE_NAME} <+4930555123> to 100 (sales). Reply 1 desk"),
        "{mode:?}: the pop shows the caller's number, name and the called number"
    );
    alice.send_chat(&lab.xmpp.jid("pbx"), "1").await;
    assert_eq!(pbx::action(&lab.pbx, &call, WAIT).await, "desk");
    let (app, data) = pbx::branch(&lab.pbx, &call, &["Dial", "VoiceMail"]).await;
    assert_eq!(
        (app.as_str(), data.as_str()),
        ("Dial", "PJSIP/desk,30"),
        "{mode:?}"
    );
    pbx::none_left_in_externalivr(&lab.pbx).await;
}

tests_on! {
    per_call_pop_shows_the_caller_and_a_reply_steers_the_dialplan: Prosody =>
        pop_reply_and_branch(Mode::PerCall);
    serve_pop_shows_the_caller_and_a_reply_steers_the_dialplan: Prosody =>
        pop_reply_and_branch(Mode::Serve);
    per_call_pop_shows_the_caller_and_a_reply_steers_the_dialplan_on_ejabberd: Ejabberd =>
        pop_reply_and_branch(Mode::PerCall);
    serve_pop_shows_the_caller_and_a_reply_steers_the_dialplan_on_ejabberd: Ejabberd =>
        pop_reply_and_branch(Mode::Serve);
}

/// The agent's `hangup` ends the call: after ExternalIVR the dialplan
/// runs nothing meant for a call that goes on (per call, ExternalIVR's -1
/// ends it; under serve's `TryExec` only the snippet's hangup test and
/// `Hangup()` run).
async fn agent_hangs_up<S: Start>(mode: Mode) {
    let mut lab = Lab::<S>::start(mode, "30").await;
    let mut alice = lab.alice();
    let call = lab.call("listen", "5550010", "Hung Up").await;
    alice.expect_message(|m| body(m).is_some()).await;
    alice.send_chat(&lab.xmpp.jid("pbx"), "h").await;
    assert_eq!(
        pbx::action(&lab.pbx, &call, WAIT).await,
        "hangup",
        "{mode:?}"
    );
    assert!(
        lab.pbx.wait_no_channels(WAIT).await,
        "{mode:?}: channels left"
    );
    let after: Vec<(String, String)> = lab
        .pbx
        .events()
        .iter()
        .filter(|e| call.owns(e) && pbx::is(e, "Event", "Newexten"))
        .filter_map(|e| Some((e.get("Application")?.clone(), e.get("AppData")?.clone())))
        .skip_while(|(app, _)| app != "ExternalIVR" && app != "TryExec")
        .skip(1)
        .collect();
    let only_hangup = match after.as_slice() {
        [] => true,
        [(test, data), (end, _)] => test == "GotoIf" && data.starts_with("1?") && end == "Hangup",
        _ => false,
    };
    assert!(
        only_hangup,
        "{mode:?}: the dialplan went on after the hangup: {after:?}"
    );
    pbx::none_left_in_externalivr(&lab.pbx).await;
}

tests_on! {
    per_call_agent_hangup_ends_the_call: Prosody => agent_hangs_up(Mode::PerCall);
    serve_agent_hangup_ends_the_call: Prosody => agent_hangs_up(Mode::Serve);
    per_call_agent_hangup_ends_the_call_on_ejabberd: Ejabberd => agent_hangs_up(Mode::PerCall);
    serve_agent_hangup_ends_the_call_on_ejabberd: Ejabberd => agent_hangs_up(Mode::Serve);
}

async fn key_timeout_and_hangup<S: Start>(mode: Mode) {
    let mut lab = Lab::<S>::start(mode, "3").await;
    let mut alice = lab.alice();

    // A caller key decides.
    let keyed = lab.call("key0", "5550001", "Key Presser").await;
    assert_eq!(
        pbx::action(&lab.pbx, &keyed, WAIT).await,
        "operator",
        "{mode:?}"
    );

    // The timeout's default action, at the configured time.
    let started = Instant::now();
    let waited = lab.call("listen", "5550002", "Patient").await;
    assert_eq!(
        pbx::action(&lab.pbx, &waited, WAIT).await,
        "voicemail",
        "{mode:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_millis(4500),
        "{mode:?}: timeout 3 s took {took:?}"
    );

    // The caller hangs up while waiting: the agent learns of the missed call.
    let _quit = lab.call("quit", "5550003", "Impatient").await;
    alice
        .expect_message(|m| body(m).is_some_and(|b| b == "Missed call from Impatient <5550003>"))
        .await;
    pbx::none_left_in_externalivr(&lab.pbx).await;
    assert!(lab.pbx.wait_no_channels(WAIT).await, "channels left");
    pbx::no_popivr_left(&lab.pbx).await;
}

tests_on! {
    per_call_key_timeout_and_hangup: Prosody => key_timeout_and_hangup(Mode::PerCall);
    serve_key_timeout_and_hangup: Prosody => key_timeout_and_hangup(Mode::Serve);
    per_call_key_timeout_and_hangup_on_ejabberd: Ejabberd => key_timeout_and_hangup(Mode::PerCall);
    serve_key_timeout_and_hangup_on_ejabberd: Ejabberd => key_timeout_and_hangup(Mode::Serve);
}

/// A stranger's reply does nothing; a hostile reply from the agent sets no
/// variable but popivr's own and writes no dialplan function.
async fn strangers_and_hostile_replies<S: Start>(mode: Mode) {
    let mut lab = Lab::<S>::start(mode, "30").await;
    let mut alice = lab.alice();
    let mut mallory = TestAgent::login(&lab.xmpp, "mallory", MALLORY_PW).await;
    let pwned = lab.pbx.dir().join("pwned");
    let call = lab.call("listen", "5550004", "Target").await;
    alice.expect_message(|m| body(m).is_some()).await;
    mallory.send_chat(&lab.xmpp.jid("pbx"), "1").await;
    let hostile = format!("1,POPIVR_ACTION=evil,FILE({})=y\nE,bye", pwned.display());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !pbx::variables_set(&lab.pbx, &call).contains(&"POPIVR_ACTION".to_string()),
        "{mode:?}: a stranger steered the call"
    );
    alice.send_chat(&lab.xmpp.jid("pbx"), &hostile).await;
    alice.send_chat(&lab.xmpp.jid("pbx"), "2").await;
    let action = pbx::action(&lab.pbx, &call, WAIT).await;
    assert!(action == "voicemail" || action == "desk", "{action}");
    pbx::none_left_in_externalivr(&lab.pbx).await;
    let set = pbx::variables_set(&lab.pbx, &call);
    const OURS: &[&str] = &[
        "POPIVR_CALLER_NUM",
        "POPIVR_CALLER_NAME",
        "POPIVR_EXTEN",
        "POPIVR_DNID",
        "POPIVR_UNIQUEID",
        "POPIVR_ACTION",
        "POPIVR_REPLY",
        "POPIVR_AGENT",
        "POPIVR_TARGET",
    ];
    for name in set
        .iter()
        .filter(|n| n.starts_with("POPIVR_") || n.contains('('))
    {
        assert!(
            OURS.contains(&name.as_str()),
            "{mode:?}: {name:?} was set; all: {set:?}"
        );
    }
    assert!(!pwned.exists(), "{mode:?}: a reply wrote a file");
    let actions = set.iter().filter(|n| *n == "POPIVR_ACTION").count();
    assert_eq!(actions, 1, "{mode:?}: one action, set once: {set:?}");
}

tests_on! {
    per_call_strangers_and_hostile_replies_do_nothing: Prosody =>
        strangers_and_hostile_replies(Mode::PerCall);
    serve_strangers_and_hostile_replies_do_nothing: Prosody =>
        strangers_and_hostile_replies(Mode::Serve);
    per_call_strangers_and_hostile_replies_do_nothing_on_ejabberd: Ejabberd =>
        strangers_and_hostile_replies(Mode::PerCall);
    serve_strangers_and_hostile_replies_do_nothing_on_ejabberd: Ejabberd =>
        strangers_and_hostile_replies(Mode::Serve);
}

/// Many calls at once, each steered by its caller's key: every one reaches
/// its action, none is left inside ExternalIVR, and no call's XMPP session
/// was lost.
async fn many_at_once<S: Start>(mode: Mode, n: usize) {
    let mut lab = Lab::<S>::start(mode, "20").await;
    let _alice = lab.alice();
    let mut calls = Vec::new();
    for i in 0..n {
        calls.push(
            lab.call("key0", &format!("55510{i:02}"), &format!("Caller {i}"))
                .await,
        );
    }
    for call in &calls {
        assert_eq!(
            pbx::action(&lab.pbx, call, Duration::from_secs(20)).await,
            "operator",
            "{mode:?}"
        );
    }
    pbx::none_left_in_externalivr(&lab.pbx).await;
    assert!(lab.pbx.wait_no_channels(Duration::from_secs(20)).await);
    // The keys decide whether popivr is online or not: that every call's
    // session stayed up (none replaced by a later call's login, which is
    // what a server's session limit does) shows only in popivr's log.
    let log = lab.popivr_log();
    let lost: Vec<&str> = log.lines().filter(|l| l.contains("stream error")).collect();
    assert!(lost.is_empty(), "{mode:?}: sessions lost: {lost:#?}");
}

tests_on! {
    per_call_twenty_calls_at_once: Prosody => many_at_once(Mode::PerCall, 20);
    serve_twenty_calls_at_once: Prosody => many_at_once(Mode::Serve, 20);
    // Per call, every waiting call holds one login of popivr's account,
    // and a stock ejabberd allows an account 10 (`max_user_sessions`): an
    // 11th overlapping call replaces the oldest call's session, which then
    // misses its agent's answer. The README sends such sites to `popivr
    // serve`; per call runs here at the most the stock limit allows.
    per_call_ten_calls_at_once_on_ejabberd: Ejabberd => many_at_once(Mode::PerCall, 10);
    serve_twenty_calls_at_once_on_ejabberd: Ejabberd => many_at_once(Mode::Serve, 20);
}
