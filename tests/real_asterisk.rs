//! popivr on a real Asterisk 23.4.1 (`popivr::testbed::asterisk`), with a
//! real prosody, in both modes: per call (`ExternalIVR(/path/popivr(...))`)
//! and `ivr://` to `popivr serve`. Each test loads the **shipped**
//! dialplan snippet of its mode (dialplan/, with the popivr-calldata line
//! in it) as an admin would, substituting only the program path and the
//! daemon's address. Callers are Local channels; what the dialplan
//! did after ExternalIVR is read from AMI events (`VarSet`, `Newexten`),
//! and every test checks that no channel is left inside ExternalIVR.
//!
//! Without an Asterisk (`POPIVR_ASTERISK`, `asterisk` on PATH, or the one
//! `.ci/test` builds into the cache) these tests fail, saying so.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use popivr::testbed::asterisk::{Asterisk, Call, Originate};
use popivr::testbed::{Event, free_port};
use support::{Prosody, TestAgent, WAIT, body};

const BIN: &str = env!("CARGO_BIN_EXE_popivr");
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

/// One lab: prosody with popivr's account and the agents, popivr's config,
/// a real Asterisk running the shipped snippet for `mode`, and for serve
/// mode the daemon.
struct Lab {
    xmpp: Prosody,
    /// Online and subscribed to by popivr's account before popivr runs.
    alice: Option<TestAgent>,
    pbx: Asterisk,
    _daemon: Option<Daemon>,
    _dir: tempfile::TempDir,
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn shipped(name: &str) -> String {
    std::fs::read_to_string(repo("dialplan").join(name)).expect("shipped snippet")
}

fn config(xmpp: &Prosody, timeout: &str) -> String {
    format!(
        "[pbx]\ntype = client\nserverhost = 127.0.0.1\nport = {port}\nusername = {pbx}\n\
         secret = {PBX_PW}\nca_file = {ca}\n\n\
         [sales]\ntype = profile\naccount = pbx\ntargets = {alice}\nhold = custom/hold\n\
         template = Call from $caller_name$ <$caller$> to $number$ (${{queue}}). Reply 1 desk\n\
         missed = Missed call from $caller_name$ <$caller$>\n\
         reply = 1, desk -> continue desk\nreply = 2 -> continue voicemail\n\
         key = 0 -> continue operator\n\
         timeout = {timeout}\ndefault = continue voicemail\n",
        port = xmpp.port(),
        pbx = xmpp.jid("pbx"),
        ca = xmpp.ca_pem().display(),
        alice = xmpp.jid("alice"),
    )
}

/// The caller side: listens, presses 0 after a second, or hangs up after
/// two seconds.
const CALLERS: &str = "\n[caller]\n\
    exten => listen,1,Wait(60)\n\
    exten => key0,1,Wait(1)\n same => n,SendDTMF(0)\n same => n,Wait(60)\n\
    exten => quit,1,Wait(2)\n same => n,Hangup()\n";

impl Lab {
    async fn start(mode: Mode, timeout: &str) -> Lab {
        let xmpp = Prosody::builder()
            .user("pbx", PBX_PW)
            .user("alice", ALICE_PW)
            .user("mallory", MALLORY_PW)
            .start();
        let dir = tempfile::Builder::new()
            .prefix("popivr-real-")
            .tempdir()
            .unwrap();
        let alice = Some(subscribed_alice(&xmpp).await);
        let conf = dir.path().join("popivr.conf");
        std::fs::write(&conf, config(&xmpp, timeout)).unwrap();
        let (snippet, daemon) = match mode {
            Mode::PerCall => (
                shipped("interactive-pop.conf").replace("/usr/bin/popivr", BIN),
                None,
            ),
            Mode::Serve => {
                let port = free_port();
                let daemon = Daemon::start(&conf, port);
                let text = shipped("ivr-daemon.conf")
                    .replace("popivr.example.org", &format!("127.0.0.1:{port}"));
                (text, Some(daemon))
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
            _dir: dir,
        }
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

    /// The value the dialplan gave POPIVR_ACTION on `call`.
    async fn action(&self, call: &Call, within: Duration) -> String {
        let set = self
            .pbx
            .wait_event(
                |e| call.owns(e) && is(e, "Event", "VarSet") && is(e, "Variable", "POPIVR_ACTION"),
                within,
            )
            .await;
        set.get("Value").cloned().unwrap_or_default()
    }

    /// The next application the dialplan runs on `call` after ExternalIVR
    /// that is one of `apps`, with its data.
    async fn branch(&self, call: &Call, apps: &[&str]) -> (String, String) {
        let e = self
            .pbx
            .wait_event(
                |e| {
                    call.owns(e)
                        && is(e, "Event", "Newexten")
                        && e.get("Application")
                            .is_some_and(|a| apps.contains(&a.as_str()))
                },
                WAIT,
            )
            .await;
        (e["Application"].clone(), e["AppData"].clone())
    }

    /// No channel is inside ExternalIVR (waits a little for the last to
    /// leave).
    async fn none_left_in_externalivr(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let n = self.pbx.channels_in_app("ExternalIVR").await;
            if n == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} channels left in ExternalIVR"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every variable set on `call`'s PBX half by anyone.
    fn variables_set(&self, call: &Call) -> Vec<String> {
        self.pbx
            .events()
            .iter()
            .filter(|e| call.owns(e) && is(e, "Event", "VarSet"))
            .filter_map(|e| e.get("Variable").cloned())
            .collect()
    }
}

/// alice, online and subscribed to by popivr's account, as `popivr check`
/// sets it up (before a daemon holds the account).
async fn subscribed_alice(xmpp: &Prosody) -> TestAgent {
    let mut alice = TestAgent::login(xmpp, "alice", ALICE_PW).await;
    let account = xmpp.account("pbx", PBX_PW);
    let contacts = [alice.bare()];
    let popivr = xmpp.jid("pbx");
    let (states, approved) = tokio::join!(
        popivr::xmpp::survey(&account, &contacts, WAIT),
        alice.approve_subscription(&popivr, WAIT)
    );
    assert!(approved, "no subscription request from popivr");
    assert!(states.expect("popivr logs in").iter().all(|s| s.subscribed));
    alice
}

fn is(e: &Event, key: &str, value: &str) -> bool {
    e.get(key).is_some_and(|v| v == value)
}

/// `popivr serve` on 127.0.0.1:`port`, killed on drop.
struct Daemon(Child);

impl Daemon {
    fn start(conf: &Path, port: u16) -> Daemon {
        let child = Command::new(BIN)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .env("POPIVR_CONFIG", conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("popivr serve starts");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "popivr serve does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon(child)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn pop_reply_and_branch(mode: Mode) {
    let mut lab = Lab::start(mode, "30").await;
    let mut alice = lab.alice();
    let call = lab.call("listen", "+4930555123", HOSTILE_NAME).await;
    let pop = alice.expect_message(|m| body(m).is_some()).await;
    assert_eq!(
        body(&pop).unwrap(),
        format!("Call from {HOSTILE_NAME} <+4930555123> to 100 (sales). Reply 1 desk"),
        "{mode:?}: the pop shows the caller's number, name and the called number"
    );
    alice.send_chat(&lab.xmpp.jid("pbx"), "1").await;
    assert_eq!(lab.action(&call, WAIT).await, "desk");
    let (app, data) = lab.branch(&call, &["Dial", "VoiceMail"]).await;
    assert_eq!(
        (app.as_str(), data.as_str()),
        ("Dial", "PJSIP/desk,30"),
        "{mode:?}"
    );
    lab.none_left_in_externalivr().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_pop_shows_the_caller_and_a_reply_steers_the_dialplan() {
    pop_reply_and_branch(Mode::PerCall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_pop_shows_the_caller_and_a_reply_steers_the_dialplan() {
    pop_reply_and_branch(Mode::Serve).await;
}

async fn key_timeout_and_hangup(mode: Mode) {
    let mut lab = Lab::start(mode, "3").await;
    let mut alice = lab.alice();

    // A caller key decides.
    let keyed = lab.call("key0", "5550001", "Key Presser").await;
    assert_eq!(lab.action(&keyed, WAIT).await, "operator", "{mode:?}");

    // The timeout's default action, at the configured time.
    let started = Instant::now();
    let waited = lab.call("listen", "5550002", "Patient").await;
    assert_eq!(lab.action(&waited, WAIT).await, "voicemail", "{mode:?}");
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
    lab.none_left_in_externalivr().await;
    assert!(lab.pbx.wait_no_channels(WAIT).await, "channels left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_key_timeout_and_hangup() {
    key_timeout_and_hangup(Mode::PerCall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_key_timeout_and_hangup() {
    key_timeout_and_hangup(Mode::Serve).await;
}

/// A stranger's reply does nothing; a hostile reply from the agent sets no
/// variable but popivr's own and writes no dialplan function.
async fn strangers_and_hostile_replies(mode: Mode) {
    let mut lab = Lab::start(mode, "30").await;
    let mut alice = lab.alice();
    let mut mallory = TestAgent::login(&lab.xmpp, "mallory", MALLORY_PW).await;
    let pwned = lab.pbx.dir().join("pwned");
    let call = lab.call("listen", "5550004", "Target").await;
    alice.expect_message(|m| body(m).is_some()).await;
    mallory.send_chat(&lab.xmpp.jid("pbx"), "1").await;
    let hostile = format!("1,POPIVR_ACTION=evil,FILE({})=y\nE,bye", pwned.display());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !lab.variables_set(&call)
            .contains(&"POPIVR_ACTION".to_string()),
        "{mode:?}: a stranger steered the call"
    );
    alice.send_chat(&lab.xmpp.jid("pbx"), &hostile).await;
    alice.send_chat(&lab.xmpp.jid("pbx"), "2").await;
    let action = lab.action(&call, WAIT).await;
    assert!(action == "voicemail" || action == "desk", "{action}");
    lab.none_left_in_externalivr().await;
    let set = lab.variables_set(&call);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_strangers_and_hostile_replies_do_nothing() {
    strangers_and_hostile_replies(Mode::PerCall).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_strangers_and_hostile_replies_do_nothing() {
    strangers_and_hostile_replies(Mode::Serve).await;
}

/// Many calls at once, each steered by its caller's key: every one reaches
/// its action and none is left inside ExternalIVR.
async fn many_at_once(mode: Mode, n: usize) {
    let mut lab = Lab::start(mode, "20").await;
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
            lab.action(call, Duration::from_secs(20)).await,
            "operator",
            "{mode:?}"
        );
    }
    lab.none_left_in_externalivr().await;
    assert!(lab.pbx.wait_no_channels(Duration::from_secs(20)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_call_twenty_calls_at_once() {
    many_at_once(Mode::PerCall, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_twenty_calls_at_once() {
    many_at_once(Mode::Serve, 20).await;
}
