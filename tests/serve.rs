//! `popivr serve` end to end: the real binary as a daemon, simulated
//! Asterisk channels connecting over `ivr://` (the simulator's TCP mode),
//! and a real prosody with real agents for the XMPP side.
//!
//! Bounds are generous (the machines are shared); speed is for benches.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use popivr_testkit::sim::{EndReason, Next, Sim, SimConfig};
use popivr_testkit::testbed::{Ejabberd, Server};
use support::{Prosody, Start, TestAgent, TestMessage, account_section, body};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xmpp_parsers::message::Message;

/// Bound for anything that should be quick.
const WAIT: Duration = Duration::from_secs(10);

/// A running `popivr serve`, killed on drop.
struct Daemon {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(config: &Path, extra: &[&str]) -> Daemon {
        Daemon::start_with(config, extra, &[])
    }

    fn start_with(config: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_popivr"))
            .envs(env.iter().copied())
            .arg("--config")
            .arg(config)
            .args(["-v", "serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start popivr serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = addr_tx.send(addr.trim().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = addr_rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("popivr serve did not listen: {:?}", log.lock().unwrap()));
        Daemon { child, addr, log }
    }

    /// The simulator's view of `ExternalIVR(ivr://ADDR(args),opts)`.
    fn call(&self, args: &str) -> SimConfig {
        SimConfig::new(format!("ivr://{}({args})", self.addr))
            .sound("moh/a", Duration::from_secs(1))
            .sound("moh/b", Duration::from_secs(1))
            .sound("vm-intro", Duration::from_millis(200))
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Wait for a log line containing every one of `parts`.
    async fn wait_log(&self, parts: &[&str]) {
        let t0 = Instant::now();
        while t0.elapsed() < WAIT {
            if self
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| parts.iter().all(|p| l.contains(p)))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no log line with {parts:?}:\n{}", self.log());
    }

    /// How many log lines hold `part`, once at least `want` do (the log
    /// reaches the test through a pipe and a thread: a moment after the
    /// daemon acted) or [`WAIT`] has passed.
    async fn count_log_at_least(&self, part: &str, want: usize) -> usize {
        let t0 = Instant::now();
        while self.count_log(part) < want && t0.elapsed() < WAIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.count_log(part)
    }

    fn count_log(&self, part: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(part))
            .count()
    }

    fn signal(&self, sig: libc::c_int) {
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0);
    }

    async fn wait_exit(&mut self, bound: Duration) -> ExitStatus {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                t0.elapsed() < bound,
                "popivr serve still running after {bound:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("popivr.conf");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    path
}

const KEYS: &str = "\
[wait]
type = profile
hold = moh/a
key = 1 -> continue desk
key = 2 -> continue sales
timeout = 600
default = continue voicemail
";

/// The next command, failing with the transcript after [`WAIT`].
async fn next(sim: &mut Sim) -> String {
    match sim.next_command(WAIT).await {
        Next::Command(c) => c.line,
        other => panic!("no command: {other:?}\n{}", sim.transcript()),
    }
}

/// The next command that is not the hold loop or a variable read.
async fn next_real(sim: &mut Sim) -> String {
    loop {
        let line = next(sim).await;
        if !line.starts_with("A,moh/") && !line.starts_with("G,") {
            return line;
        }
    }
}

/// Expect the call to set `POPIVR_ACTION=action` and leave with `E`.
async fn expect_action(sim: &mut Sim, action: &str) {
    let v = next_real(sim).await;
    assert!(
        v.starts_with(&format!("V,POPIVR_ACTION={action},")),
        "{v}\n{}",
        sim.transcript()
    );
    let e = next_real(sim).await;
    assert!(e.starts_with("E,"), "{e}\n{}", sim.transcript());
    assert_eq!(
        sim.wait_end(WAIT).await.map(|e| e.reason),
        Some(EndReason::Exit),
        "{}",
        sim.transcript()
    );
}

/// The variables every profile here reads (the defaults), read in the
/// same write as `P`, before the call's profile is known.
const PREFETCH: [&str; 5] = [
    "G,POPIVR_CALLER_NUM",
    "G,POPIVR_CALLER_NAME",
    "G,POPIVR_EXTEN",
    "G,POPIVR_DNID",
    "G,POPIVR_UNIQUEID",
];

async fn expect_prefetch(sim: &mut Sim) {
    for read in PREFETCH {
        assert_eq!(next(sim).await, read, "{}", sim.transcript());
    }
}

/// The call starts like a per-call one: `P` first, then the hold audio
/// (after the socket writer's own read, which starts each batch of
/// several lines: src/eivr/pace.rs).
async fn expect_start(sim: &mut Sim) {
    assert_eq!(next(sim).await, "P,x", "{}", sim.transcript());
    expect_prefetch(sim).await;
    assert_eq!(next(sim).await, "G,POPIVR_SYNC", "{}", sim.transcript());
    assert_eq!(next(sim).await, "S,moh/a", "{}", sim.transcript());
}

#[tokio::test]
async fn a_call_over_ivr_runs_like_a_per_call_one() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), KEYS), &[]);
    let mut sim = Sim::start(daemon.call("wait,x=1")).unwrap();
    expect_start(&mut sim).await;
    sim.key('2');
    expect_action(&mut sim, "sales").await;
    assert_eq!(sim.var("POPIVR_REPLY").as_deref(), Some("2"));
    daemon.wait_log(&["popivr[1]", "call over"]).await;
}

/// No command but the hold loop for `span`: the call is still waiting.
async fn still_waiting(sim: &mut Sim, span: Duration) {
    let deadline = Instant::now() + span;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match sim.next_command(left).await {
            Next::Command(c) if c.line.starts_with("A,moh/") || c.line.starts_with("G,") => {}
            Next::Command(c) => panic!("unexpected `{}`\n{}", c.line, sim.transcript()),
            Next::Ended => panic!("the call ended\n{}", sim.transcript()),
            Next::TimedOut => return,
        }
    }
}

#[tokio::test]
async fn garbage_slow_and_vanishing_connections_leave_other_calls_alone() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), KEYS), &[]);
    let mut good = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut good).await;

    // Not Asterisk at all: binary garbage, a line far over the limit and
    // no newline at the end. It never answers P and is closed.
    let mut garbage = tokio::net::TcpStream::connect(&daemon.addr).await.unwrap();
    let mut junk: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    junk.extend(std::iter::repeat_n(b'x', 200_000));
    junk.extend(b"\nP,notatime\n\xff\xfe,,,\n");
    garbage.write_all(&junk).await.unwrap();
    // Connects and then says nothing, reads nothing.
    let silent = tokio::net::TcpStream::connect(&daemon.addr).await.unwrap();
    // A call that begins properly and then turns to garbage.
    let mut noisy = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut noisy).await;
    for _ in 0..50 {
        noisy.send_raw("\u{0}\u{1b}[31m not an event");
    }
    noisy.send_raw("y".repeat(100_000));
    // A call whose Asterisk vanishes without a word.
    let mut vanishing = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut vanishing).await;
    vanishing.close();

    // The good call goes on untouched, and so does the noisy one.
    still_waiting(&mut good, Duration::from_millis(500)).await;
    // The vanished call was ended and cleaned up (the only one over yet).
    daemon.wait_log(&["call over"]).await;
    good.key('1');
    expect_action(&mut good, "desk").await;
    noisy.key('2');
    expect_action(&mut noisy, "sales").await;

    // Garbage and silence are dropped once they fail to answer P in time.
    for mut conn in [garbage, silent] {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(WAIT, async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "connection left open\n{}", daemon.log());
    }
    assert!(
        daemon.count_log_at_least("no answer to P", 2).await >= 2,
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn the_call_cap_turns_calls_away_and_a_closed_call_frees_its_place() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), KEYS), &["--max-calls", "2"]);
    let mut a = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut a).await;
    let mut b = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut b).await;
    // One too many: sent on with the dialplan, not left in silence.
    let mut c = Sim::start(daemon.call("wait")).unwrap();
    assert_eq!(next(&mut c).await, "E,popivr: busy");
    assert_eq!(
        c.wait_end(WAIT).await.map(|e| e.reason),
        Some(EndReason::Exit)
    );
    // Asterisk drops a: its place is free again.
    a.close();
    daemon.wait_log(&["popivr[1]", "call over"]).await;
    let mut d = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut d).await;
    b.key('1');
    expect_action(&mut b, "desk").await;
    d.key('2');
    expect_action(&mut d, "sales").await;
}

/// Without `--listen`, the daemon takes calls from this host only
/// (127.0.0.1:2949, and [::1]:2949 where IPv6 is on): the protocol has no
/// authentication, so a unit started with the defaults must not be
/// reachable from the network. Checked from the addresses it says it
/// listens on, and by connecting to this host's own network address.
#[test]
fn by_default_the_daemon_listens_on_this_host_only() {
    let dir = tempfile::tempdir().unwrap();
    let conf = write_config(dir.path(), "[p]\ntype = profile\nkey = 1 -> continue vm\n");
    /// Killed when the test ends, passed or failed: a daemon left on the
    /// default port would take the next run's.
    struct Killed(Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_popivr"))
            .arg("--config")
            .arg(&conf)
            .args(["-v", "serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start popivr serve"),
    );
    let stderr = child.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addrs = Vec::new();
    let mut log = Vec::new();
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(1500)) {
        if let Some(addr) = line.split("listening on ").nth(1) {
            addrs.push(addr.trim().parse::<std::net::SocketAddr>().unwrap());
        }
        log.push(line);
        if addrs.len() == 2 {
            break;
        }
    }
    assert!(!addrs.is_empty(), "not listening: {log:?}");
    for addr in &addrs {
        assert!(
            addr.ip().is_loopback() && addr.port() == 2949,
            "{addr}: {log:?}"
        );
    }
    assert!(std::net::TcpStream::connect("127.0.0.1:2949").is_ok());
    // This host's address on its network (the one a route out would use;
    // a UDP connect sends nothing), where one exists.
    let out = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").and_then(|()| s.local_addr()));
    let local = out.ok().map(|a| a.ip());
    if let Some(local) = local.filter(|ip| !ip.is_loopback() && !ip.is_unspecified()) {
        let reach = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::new(local, 2949),
            Duration::from_secs(2),
        );
        assert!(reach.is_err(), "reachable on {local}:2949");
    }
}

#[tokio::test]
async fn unknown_profiles_send_the_call_on_with_the_dialplan() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(&write_config(dir.path(), KEYS), &[]);
    let mut sim = Sim::start(daemon.call("nope")).unwrap();
    assert_eq!(next(&mut sim).await, "P,x");
    expect_prefetch(&mut sim).await;
    assert_eq!(next(&mut sim).await, "E,popivr: unknown profile");
    assert_eq!(
        sim.wait_end(WAIT).await.map(|e| e.reason),
        Some(EndReason::Exit)
    );
    daemon.wait_log(&["popivr[1]", "no profile [nope]"]).await;
}

/// A call of the profile `[other]` the reload test adds.
async fn call_other(daemon: &Daemon) {
    let mut sim = Sim::start(daemon.call("other")).unwrap();
    assert_eq!(next(&mut sim).await, "P,x");
    expect_prefetch(&mut sim).await;
    assert_eq!(next(&mut sim).await, "G,POPIVR_SYNC");
    assert_eq!(next(&mut sim).await, "S,moh/b");
    sim.key('1');
    expect_action(&mut sim, "other").await;
}

#[tokio::test]
async fn sighup_reloads_for_new_calls_and_keeps_the_old_config_if_the_new_one_is_broken() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), KEYS);
    let daemon = Daemon::start(&path, &[]);
    let mut old = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut old).await;

    let other = "[other]\ntype = profile\nhold = moh/b\nkey = 1 -> continue other\ntimeout = 600\n";
    write_config(dir.path(), &format!("{KEYS}\n{other}"));
    daemon.signal(libc::SIGHUP);
    daemon.wait_log(&["configuration reloaded"]).await;
    call_other(&daemon).await;

    write_config(dir.path(), "[broken\n");
    daemon.signal(libc::SIGHUP);
    daemon.wait_log(&["configuration not reloaded"]).await;
    call_other(&daemon).await;

    // The call from before the reloads kept its profile.
    old.key('2');
    expect_action(&mut old, "sales").await;
}

#[tokio::test]
async fn sigterm_drains_stops_taking_calls_and_exits_after_the_last() {
    let dir = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(&write_config(dir.path(), KEYS), &["--drain-timeout", "2"]);
    let mut a = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut a).await;
    let mut b = Sim::start(daemon.call("wait")).unwrap();
    expect_start(&mut b).await;
    daemon.signal(libc::SIGTERM);
    daemon.wait_log(&["SIGTERM", "not taking calls"]).await;
    // The listener is closed: Asterisk's next connection fails over.
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(&daemon.addr).await.is_ok() {
        assert!(t0.elapsed() < WAIT, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Running calls go on as usual...
    a.key('1');
    expect_action(&mut a, "desk").await;
    // ... and at the drain bound the rest take their default action.
    expect_action(&mut b, "voicemail").await;
    assert_eq!(b.var("POPIVR_REPLY").as_deref(), Some("timeout"));
    let status = daemon.wait_exit(WAIT).await;
    assert!(status.success(), "{status}\n{}", daemon.log());
}

// ---- XMPP: one session for all calls, replies routed to their call ----

const PBX_PW: &str = "pbx-secret-1";
const AGENT_PW: &str = "agent-secret-1";

/// The account, then the profiles.
fn xmpp_config(server: &dyn Server, profiles: &str) -> String {
    account_section(server, "pbx", PBX_PW) + profiles
}

/// A profile popping `target` with the call's `n` argument in the text,
/// whatever the target's presence (the routing tests do not wait for it;
/// see `late_calls_know_the_agents_presence_at_once`).
fn pop_profile(name: &str, target: &str, timeout_secs: u32) -> String {
    format!(
        "[{name}]\ntype = profile\naccount = pbx\ntargets = {target}\nhold = moh/a\n\
         presence = any\ntemplate = Call n=${{n}}\nconfirm = Call n=${{n}}: $outcome$\n\
         reply = 1 -> continue desk\nreply = 2 -> continue sales\n\
         timeout = {timeout_secs}\ndefault = continue voicemail\n\n"
    )
}

fn server_with<S: Start>(agents: &[&str]) -> S {
    let users: Vec<(&str, &str)> = std::iter::once(("pbx", PBX_PW))
        .chain(agents.iter().map(|a| (*a, AGENT_PW)))
        .collect();
    S::start_with(&users)
}

/// `name` at their desk. Pops go to available agents only, so they
/// accept popivr's presence subscription (asked once, kept by the server).
async fn agent(server: &dyn Server, name: &str) -> TestAgent {
    let mut agent = TestAgent::login(server, name, AGENT_PW).await;
    let pbx = server.jid("pbx");
    assert!(
        agent.approve_subscription(&pbx, WAIT).await,
        "{name}: no subscription request from {pbx}"
    );
    agent
}

/// The next pop (`Call n=K`) an agent gets: (K, the call's thread).
async fn next_pop(agent: &mut TestAgent) -> (u32, String) {
    let (n, thread, _) = next_pop_from(agent).await;
    (n, thread)
}

/// The next pop, with the full JID that sent it.
async fn next_pop_from(agent: &mut TestAgent) -> (u32, String, String) {
    let m = agent
        .expect_message(|m| body(m).is_some_and(|b| b.starts_with("Call n=") && !b.contains(':')))
        .await;
    let n = body(&m).unwrap()["Call n=".len()..].parse().unwrap();
    let thread = m
        .thread
        .as_ref()
        .expect("a pop carries its call's thread")
        .id
        .clone();
    let from = m.from.as_ref().expect("a sender").to_string();
    (n, thread, from)
}

async fn expect_text(agent: &mut TestAgent, pred: impl Fn(&str) -> bool) -> String {
    let m: Message = agent.expect_message(|m| body(m).is_some_and(&pred)).await;
    body(&m).unwrap().to_string()
}

/// Which throw-away server a test of agents' replies runs against.
#[derive(Clone, Copy)]
enum On {
    Prosody,
    Ejabberd,
}

/// A throw-away server of kind `on` with popivr's account and `agents`.
fn server_on(on: On, agents: &[&str]) -> Box<dyn Server> {
    match on {
        On::Prosody => Box::new(server_with::<Prosody>(agents)),
        On::Ejabberd => Box::new(server_with::<Ejabberd>(agents)),
    }
}

async fn one_agent_on(
    on: On,
) -> (
    Box<dyn Server>,
    tempfile::TempDir,
    Daemon,
    TestAgent,
    String,
) {
    let server = server_on(on, &["alice"]);
    let dir = tempfile::tempdir().unwrap();
    let conf = xmpp_config(&*server, &pop_profile("pop", &server.jid("alice"), 600));
    let daemon = Daemon::start(&write_config(dir.path(), &conf), &[]);
    daemon.wait_log(&["online as"]).await;
    let alice = agent(&*server, "alice").await;
    let pbx = server.jid("pbx");
    (server, dir, daemon, alice, pbx)
}

#[tokio::test]
async fn two_calls_for_one_agent_are_answered_separately_by_tag_and_by_thread() {
    two_calls_for_one_agent_are_answered_separately_by_tag_and_by_thread_on(On::Prosody).await;
}

#[tokio::test]
async fn two_calls_for_one_agent_are_answered_separately_by_tag_and_by_thread_on_ejabberd() {
    two_calls_for_one_agent_are_answered_separately_by_tag_and_by_thread_on(On::Ejabberd).await;
}

async fn two_calls_for_one_agent_are_answered_separately_by_tag_and_by_thread_on(on: On) {
    let (_server, _dir, daemon, mut alice, pbx) = one_agent_on(on).await;

    let mut one = Sim::start(daemon.call("pop,n=1")).unwrap();
    expect_start(&mut one).await;
    let (n, thread_one) = next_pop(&mut alice).await;
    assert_eq!(n, 1);
    let mut two = Sim::start(daemon.call("pop,n=2")).unwrap();
    expect_start(&mut two).await;
    let (n, thread_two) = next_pop(&mut alice).await;
    assert_eq!(n, 2);
    assert_ne!(thread_one, thread_two);

    // The tag the agent typed picks the second call; the call never sees it.
    alice.send_chat(&pbx, &format!("#{thread_two} 2")).await;
    expect_action(&mut two, "sales").await;
    assert_eq!(two.var("POPIVR_REPLY").as_deref(), Some("2"));
    assert_eq!(two.var("POPIVR_AGENT"), Some(alice.bare()));
    // A reply in the first call's thread goes to the first call.
    alice
        .send(TestMessage::chat(&pbx, "1").thread(&thread_one))
        .await;
    expect_action(&mut one, "desk").await;
    assert_eq!(one.var("POPIVR_REPLY").as_deref(), Some("1"));
    expect_text(&mut alice, |b| b == "Call n=2: sent to sales").await;
    expect_text(&mut alice, |b| b == "Call n=1: sent to desk").await;

    // Late replies for calls that are over get a notice.
    alice.send_chat(&pbx, &format!("#{thread_two} 1")).await;
    let text = expect_text(&mut alice, |b| b.contains("already handled")).await;
    assert_eq!(
        text,
        format!("Call #{thread_two} was already handled: sent to sales.")
    );
}

/// Three calls wait for alice in serve mode. Once they overlapped, a
/// reply without tag or thread moves none of them, even when only one is
/// still waiting (she may be answering a pop that was decided meanwhile),
/// whether sent to the bare JID or to the daemon's full JID; she is asked
/// each time. A call that pops her after the others were decided takes
/// her tagged reply; a plain one only once `late_reply` has passed.
#[tokio::test]
async fn overlapping_calls_need_a_tag_or_thread_until_they_are_over() {
    overlapping_calls_need_a_tag_or_thread_until_they_are_over_on(On::Prosody).await;
}

#[tokio::test]
async fn overlapping_calls_need_a_tag_or_thread_until_they_are_over_on_ejabberd() {
    overlapping_calls_need_a_tag_or_thread_until_they_are_over_on(On::Ejabberd).await;
}

async fn overlapping_calls_need_a_tag_or_thread_until_they_are_over_on(on: On) {
    let (_server, _dir, daemon, mut alice, pbx) = one_agent_on(on).await;
    let mut calls = Vec::new();
    let mut threads = Vec::new();
    let mut daemon_jid = String::new();
    for n in 1..=3 {
        let mut sim = Sim::start(daemon.call(&format!("pop,n={n}"))).unwrap();
        expect_start(&mut sim).await;
        let (_, thread, from) = next_pop_from(&mut alice).await;
        threads.push(thread);
        daemon_jid = from;
        calls.push(sim);
    }
    alice.send_chat(&pbx, &format!("#{} 1", threads[0])).await;
    expect_action(&mut calls[0], "desk").await;
    alice
        .send(TestMessage::chat(&pbx, "2").thread(&threads[1]))
        .await;
    expect_action(&mut calls[1], "sales").await;
    expect_text(&mut alice, |b| b == "Call n=1: sent to desk").await;
    expect_text(&mut alice, |b| b == "Call n=2: sent to sales").await;
    // Only call 3 waits now, but alice saw three pops at once.
    for to in [pbx.as_str(), daemon_jid.as_str()] {
        alice.send_chat(to, "2").await;
        let text = expect_text(&mut alice, |b| b.starts_with("Other calls popped you")).await;
        assert!(text.contains(&format!("\"#{} 1\"", threads[2])), "{text}");
        still_waiting(&mut calls[2], Duration::from_millis(300)).await;
    }
    alice.send_chat(&pbx, &format!("#{} 2", threads[2])).await;
    expect_action(&mut calls[2], "sales").await;
    // A fresh call, no rival since its pop; but calls that popped her
    // ended moments ago, so a plain reply may still be a late one to them
    // (`late_reply`): it moves nothing until then, the tag at once.
    let mut four = Sim::start(daemon.call("pop,n=4")).unwrap();
    expect_start(&mut four).await;
    let (_, thread) = next_pop(&mut alice).await;
    alice.send_chat(&pbx, "1").await;
    let text = expect_text(&mut alice, |b| b.contains("also popped you")).await;
    assert!(text.contains(&format!("\"#{thread} 1\"")), "{text}");
    still_waiting(&mut four, Duration::from_millis(300)).await;
    alice.send_chat(&pbx, &format!("#{thread} 1")).await;
    expect_action(&mut four, "desk").await;
}

/// Call 1 pops alice and times out without her answer; call 2 pops her
/// at once. Her plain `1`, to the bare JID or to the daemon's full JID,
/// may be a late answer to call 1 (sent before she saw it end): it moves
/// nothing, she is told to use call 2's tag, and the tag works.
#[tokio::test]
async fn a_late_answer_to_a_call_that_timed_out_moves_not_the_next() {
    a_late_answer_to_a_call_that_timed_out_moves_not_the_next_on(On::Prosody).await;
}

#[tokio::test]
async fn a_late_answer_to_a_call_that_timed_out_moves_not_the_next_on_ejabberd() {
    a_late_answer_to_a_call_that_timed_out_moves_not_the_next_on(On::Ejabberd).await;
}

async fn a_late_answer_to_a_call_that_timed_out_moves_not_the_next_on(on: On) {
    let server = server_on(on, &["alice"]);
    let dir = tempfile::tempdir().unwrap();
    let alice_jid = server.jid("alice");
    let profiles = pop_profile("quick", &alice_jid, 1) + &pop_profile("pop", &alice_jid, 600);
    let conf = xmpp_config(&*server, &profiles);
    let daemon = Daemon::start(&write_config(dir.path(), &conf), &[]);
    daemon.wait_log(&["online as"]).await;
    let mut alice = agent(&*server, "alice").await;
    let pbx = server.jid("pbx");

    let mut one = Sim::start(daemon.call("quick,n=1")).unwrap();
    expect_start(&mut one).await;
    let (_, thread_one, daemon_jid) = next_pop_from(&mut alice).await;
    expect_action(&mut one, "voicemail").await;
    expect_text(&mut alice, |b| b.starts_with("Call n=1: ")).await;
    let mut two = Sim::start(daemon.call("pop,n=2")).unwrap();
    expect_start(&mut two).await;
    let (_, thread_two) = next_pop(&mut alice).await;
    for to in [pbx.as_str(), daemon_jid.as_str()] {
        alice.send_chat(to, "1").await;
        let text = expect_text(&mut alice, |b| b.contains("also popped you")).await;
        assert!(
            text.starts_with(&format!("Call #{thread_one} also popped you and ended ")),
            "{text}"
        );
        assert!(
            text.ends_with(&format!("e.g. \"#{thread_two} 1\".")),
            "{text}"
        );
        still_waiting(&mut two, Duration::from_millis(300)).await;
    }
    alice.send_chat(&pbx, &format!("#{thread_two} 1")).await;
    expect_action(&mut two, "desk").await;
}

/// alice on two devices, carbons on at her desk: the pop reaches both,
/// her phone answers the daemon's full JID in the pop's thread, the call
/// moves, and the desk gets the carbon of the answer (which is never a
/// reply of its own).
#[tokio::test]
async fn a_second_device_answers_in_serve_mode() {
    a_second_device_answers_in_serve_mode_on(On::Prosody).await;
}

#[tokio::test]
async fn a_second_device_answers_in_serve_mode_on_ejabberd() {
    a_second_device_answers_in_serve_mode_on(On::Ejabberd).await;
}

async fn a_second_device_answers_in_serve_mode_on(on: On) {
    let (server, _dir, daemon, mut alice, _pbx) = one_agent_on(on).await;
    alice.enable_carbons().await;
    let phone_jid = format!("{}/phone", server.jid("alice"));
    let mut phone = TestAgent::login_as(&*server, &phone_jid, AGENT_PW).await;
    let mut one = Sim::start(daemon.call("pop,n=1")).unwrap();
    expect_start(&mut one).await;
    let (_, thread, from) = next_pop_from(&mut phone).await;
    next_pop(&mut alice).await;
    phone
        .send(TestMessage::chat(&from, "2").thread(&thread))
        .await;
    expect_action(&mut one, "sales").await;
    assert_eq!(one.var("POPIVR_REPLY").as_deref(), Some("2"));
    alice
        .expect_message(|m| {
            m.payloads
                .iter()
                .any(|p| p.is("sent", "urn:xmpp:carbons:2"))
        })
        .await;
    expect_text(&mut phone, |b| b == "Call n=1: sent to sales").await;
}

#[tokio::test]
async fn an_ambiguous_reply_gets_a_question_and_no_call_moves() {
    an_ambiguous_reply_gets_a_question_and_no_call_moves_on(On::Prosody).await;
}

#[tokio::test]
async fn an_ambiguous_reply_gets_a_question_and_no_call_moves_on_ejabberd() {
    an_ambiguous_reply_gets_a_question_and_no_call_moves_on(On::Ejabberd).await;
}

async fn an_ambiguous_reply_gets_a_question_and_no_call_moves_on(on: On) {
    let (_server, _dir, daemon, mut alice, pbx) = one_agent_on(on).await;

    let mut calls = Vec::new();
    let mut threads = Vec::new();
    for n in 1..=2 {
        let mut sim = Sim::start(daemon.call(&format!("pop,n={n}"))).unwrap();
        expect_start(&mut sim).await;
        threads.push(next_pop(&mut alice).await.1);
        calls.push(sim);
    }
    alice.send_chat(&pbx, "1").await;
    let question = expect_text(&mut alice, |b| b.starts_with("Several calls")).await;
    for t in &threads {
        assert!(question.contains(&format!("#{t} Call n=")), "{question}");
    }
    for sim in &mut calls {
        still_waiting(sim, Duration::from_millis(500)).await;
    }
    // With the tags the agent was asked for, each call gets its answer.
    alice.send_chat(&pbx, &format!("#{} 2", threads[1])).await;
    alice.send_chat(&pbx, &format!("#{}: 1", threads[0])).await;
    expect_action(&mut calls[1], "sales").await;
    expect_action(&mut calls[0], "desk").await;
}

/// Two calls pop both alice and bob, and each answers a different call at
/// the same moment. Plain answers without tag or thread could be for
/// either call: neither moves and each agent is asked. Answers in the
/// pops' threads, sent at once, move exactly the call each was written
/// for, each with its own agent.
#[tokio::test]
async fn two_agents_answer_two_calls_at_once() {
    two_agents_answer_two_calls_at_once_on(On::Prosody).await;
}

#[tokio::test]
async fn two_agents_answer_two_calls_at_once_on_ejabberd() {
    two_agents_answer_two_calls_at_once_on(On::Ejabberd).await;
}

async fn two_agents_answer_two_calls_at_once_on(on: On) {
    let server = server_on(on, &["alice", "bob"]);
    let dir = tempfile::tempdir().unwrap();
    let targets = format!("{}, {}", server.jid("alice"), server.jid("bob"));
    let conf = xmpp_config(&*server, &pop_profile("pop", &targets, 600));
    let daemon = Daemon::start(&write_config(dir.path(), &conf), &[]);
    daemon.wait_log(&["online as"]).await;
    let mut alice = agent(&*server, "alice").await;
    let mut bob = agent(&*server, "bob").await;
    let pbx = server.jid("pbx");

    let mut calls = Vec::new();
    // Each agent's threads, by call.
    let (mut a_threads, mut b_threads) = (Vec::new(), Vec::new());
    for n in 1..=2 {
        let mut sim = Sim::start(daemon.call(&format!("pop,n={n}"))).unwrap();
        expect_start(&mut sim).await;
        let (got, thread) = next_pop(&mut alice).await;
        assert_eq!(got, n);
        a_threads.push(thread);
        let (got, thread) = next_pop(&mut bob).await;
        assert_eq!(got, n);
        b_threads.push(thread);
        calls.push(sim);
    }
    tokio::join!(alice.send_chat(&pbx, "1"), bob.send_chat(&pbx, "2"));
    expect_text(&mut alice, |b| b.starts_with("Several calls")).await;
    expect_text(&mut bob, |b| b.starts_with("Several calls")).await;
    for sim in &mut calls {
        still_waiting(sim, Duration::from_millis(500)).await;
    }
    tokio::join!(
        alice.send(TestMessage::chat(&pbx, "1").thread(&a_threads[0])),
        bob.send(TestMessage::chat(&pbx, "2").thread(&b_threads[1])),
    );
    expect_action(&mut calls[0], "desk").await;
    assert_eq!(calls[0].var("POPIVR_AGENT"), Some(alice.bare()));
    expect_action(&mut calls[1], "sales").await;
    assert_eq!(calls[1].var("POPIVR_AGENT"), Some(bob.bare()));
}

#[tokio::test(flavor = "current_thread")]
async fn fifty_concurrent_calls_get_their_own_replies() {
    const AGENTS: usize = 5;
    const CALLS: u32 = 50;
    let names: Vec<String> = (0..AGENTS).map(|i| format!("agent{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let server = server_with::<Prosody>(&refs);
    let dir = tempfile::tempdir().unwrap();
    let profiles: String = names
        .iter()
        .enumerate()
        .map(|(i, a)| pop_profile(&format!("p{i}"), &server.jid(a), 600))
        .collect();
    let daemon = Daemon::start(
        &write_config(dir.path(), &xmpp_config(&server, &profiles)),
        &[],
    );
    daemon.wait_log(&["online as"]).await;
    let pbx = server.jid("pbx");
    // What call n is answered with: the action must match, per call.
    let word = |n: u32| if n.is_multiple_of(3) { "2" } else { "1" };

    let mut agents = Vec::new();
    for name in &names {
        agents.push(agent(&server, name).await);
    }
    let per_agent = CALLS as usize / AGENTS;
    let answering: Vec<_> = agents
        .into_iter()
        .map(|mut agent| {
            let pbx = pbx.clone();
            tokio::spawn(async move {
                // Several calls wait for each agent at once: tags it is.
                for _ in 0..per_agent {
                    let (n, thread) = next_pop(&mut agent).await;
                    agent
                        .send_chat(&pbx, &format!("#{thread} {}", word(n)))
                        .await;
                }
                agent
            })
        })
        .collect();
    let daemon = Arc::new(daemon);
    let calls: Vec<_> = (0..CALLS)
        .map(|n| {
            let daemon = daemon.clone();
            tokio::spawn(async move {
                let profile = format!("p{}", n as usize % AGENTS);
                let mut sim = Sim::start(daemon.call(&format!("{profile},n={n}"))).unwrap();
                expect_start(&mut sim).await;
                let want = if word(n) == "2" { "sales" } else { "desk" };
                expect_action(&mut sim, want).await;
                (n, sim.var("POPIVR_REPLY"), sim.var("POPIVR_AGENT"))
            })
        })
        .collect();
    for call in calls {
        let (n, reply, agent) = call.await.expect("call task");
        assert_eq!(reply.as_deref(), Some(word(n)), "call {n}");
        let owner = &names[n as usize % AGENTS];
        assert_eq!(agent, Some(server.jid(owner)), "call {n}");
    }
    for agent in answering {
        agent.await.expect("agent task").close().await;
    }
    // The daemon logs a call's end once Asterisk has answered its `E`,
    // which may be a moment after the simulator handed the `E` out.
    assert_eq!(
        daemon
            .count_log_at_least("call over: done", CALLS as usize)
            .await,
        CALLS as usize,
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn calls_ride_out_an_xmpp_server_restart() {
    let mut server = server_with::<Prosody>(&["alice"]);
    let dir = tempfile::tempdir().unwrap();
    let profiles = format!(
        "{}{}",
        pop_profile("pop", &server.jid("alice"), 600),
        pop_profile("short", &server.jid("alice"), 2)
    );
    let daemon = Daemon::start(
        &write_config(dir.path(), &xmpp_config(&server, &profiles)),
        &[],
    );
    daemon.wait_log(&["online as"]).await;
    let mut alice = agent(&server, "alice").await;
    let pbx = server.jid("pbx");

    // Popped before the outage, answered after it.
    let mut across = Sim::start(daemon.call("pop,n=1")).unwrap();
    expect_start(&mut across).await;
    let (_, thread) = next_pop(&mut alice).await;

    server.stop();
    daemon.wait_log(&["XMPP link down"]).await;
    // During the outage: audio at once, the default action at the timeout.
    let mut during = Sim::start(daemon.call("short,n=2")).unwrap();
    expect_start(&mut during).await;
    expect_action(&mut during, "voicemail").await;
    assert_eq!(during.var("POPIVR_REPLY").as_deref(), Some("timeout"));

    server.restart();
    let t0 = Instant::now();
    while daemon.count_log("online as") < 2 {
        // The backoff may have grown while the server was away.
        assert!(
            t0.elapsed() < 3 * WAIT,
            "not back online:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut alice = TestAgent::login(&server, "alice", AGENT_PW).await;
    alice.send_chat(&pbx, &format!("#{thread} 2")).await;
    expect_action(&mut across, "sales").await;

    // Pops work again. (The first pop may come twice: it reached the
    // server, but when the server stopped before answering the ping after
    // it, the daemon sent it again on the new link.)
    let mut after = Sim::start(daemon.call("pop,n=3")).unwrap();
    expect_start(&mut after).await;
    let (n, thread) = loop {
        match next_pop(&mut alice).await {
            (1, _) => continue,
            pop => break pop,
        }
    };
    assert_eq!(n, 3);
    // With the tag: call 1 ended moments ago, so a plain answer could
    // still be a late one to it (`late_reply`).
    alice.send_chat(&pbx, &format!("#{thread} 1")).await;
    expect_action(&mut after, "desk").await;
}

/// A pop written just before the server died never reached it (the ping
/// after it went unanswered): the daemon sends it again once back online,
/// the agent gets it, and their answer still steers the call.
#[tokio::test]
async fn a_pop_the_server_never_read_is_sent_again_after_a_reconnect() {
    let mut server = server_with::<Prosody>(&["alice"]);
    let dir = tempfile::tempdir().unwrap();
    let profiles = pop_profile("pop", &server.jid("alice"), 600);
    let daemon = Daemon::start(
        &write_config(dir.path(), &xmpp_config(&server, &profiles)),
        &[],
    );
    daemon.wait_log(&["online as"]).await;
    let pbx = server.jid("pbx");

    // The pop goes into the socket of a server that reads nothing, and
    // the server dies with it unread.
    server.freeze();
    let mut call = Sim::start(daemon.call("pop,n=1")).unwrap();
    expect_start(&mut call).await;
    daemon.wait_log(&["popivr[1]", "pop sent to"]).await;
    server.kill();
    daemon.wait_log(&["XMPP link down"]).await;
    server.restart();
    daemon
        .wait_log(&["1 message(s) the XMPP server may not have had sent again"])
        .await;

    let mut alice = TestAgent::login(&server, "alice", AGENT_PW).await;
    let (n, _) = next_pop(&mut alice).await;
    assert_eq!(n, 1);
    alice.send_chat(&pbx, "1").await;
    expect_action(&mut call, "desk").await;
}

/// The shared session saw the agents' presence long before a call starts:
/// each new call hears it from the hub at once (a per-call session would
/// have asked for it at its own login). A call that missed it would wait
/// its presence window and then find nobody available.
#[tokio::test]
async fn late_calls_know_the_agents_presence_at_once() {
    let server = server_with::<Prosody>(&["alice"]);
    let dir = tempfile::tempdir().unwrap();
    let profile = format!(
        "[avail]\ntype = profile\naccount = pbx\ntargets = {}\nhold = moh/a\n\
         presence = available\nnobody = default\npresence_wait = 1\n\
         template = Call n=${{n}}\nreply = 1 -> continue desk\n\
         timeout = 600\ndefault = continue voicemail\n",
        server.jid("alice")
    );
    let conf = xmpp_config(&server, &profile);
    let daemon = Daemon::start(&write_config(dir.path(), &conf), &[]);
    daemon.wait_log(&["online as"]).await;
    let mut alice = agent(&server, "alice").await;
    let pbx = server.jid("pbx");

    // Her acceptance and presence reach the daemon a moment after she
    // sends them: until then calls find nobody and take the default.
    let t0 = Instant::now();
    let mut n = 0;
    loop {
        n += 1;
        let mut sim = Sim::start(daemon.call(&format!("avail,n={n}"))).unwrap();
        expect_start(&mut sim).await;
        // Either alice gets the pop or the call takes its default action.
        let popped = tokio::select! {
            pop = next_pop(&mut alice) => Ok(pop),
            line = next_real(&mut sim) => Err(line),
        };
        match popped {
            Ok((got, thread)) => {
                assert_eq!(got, n);
                alice.send_chat(&pbx, &format!("#{thread} 1")).await;
                expect_action(&mut sim, "desk").await;
                break;
            }
            Err(line) => {
                assert!(line.starts_with("V,POPIVR_ACTION=voicemail,"), "{line}");
                assert!(
                    t0.elapsed() < WAIT,
                    "alice never available\n{}",
                    daemon.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    // From now on every call pops at once, with nothing new from XMPP.
    for _ in 0..3 {
        n += 1;
        let mut sim = Sim::start(daemon.call(&format!("avail,n={n}"))).unwrap();
        expect_start(&mut sim).await;
        let (got, thread) = next_pop(&mut alice).await;
        assert_eq!(got, n);
        alice.send_chat(&pbx, &format!("#{thread} 1")).await;
        expect_action(&mut sim, "desk").await;
    }
}

/// `Type=notify`: systemd hears when the daemon is ready, reloading and
/// stopping, on the datagram socket it names in `NOTIFY_SOCKET`.
#[tokio::test]
async fn systemd_hears_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut daemon = Daemon::start_with(
        &write_config(dir.path(), KEYS),
        &[],
        &[("NOTIFY_SOCKET", &socket_path)],
    );
    let next_state = || async {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(WAIT, socket.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next_state().await, "READY=1");
    daemon.signal(libc::SIGHUP);
    assert_eq!(next_state().await, "RELOADING=1");
    assert_eq!(next_state().await, "READY=1");
    daemon.signal(libc::SIGTERM);
    assert_eq!(next_state().await, "STOPPING=1");
    assert!(daemon.wait_exit(WAIT).await.success());
}

/// The Asterisk-only replay scripts (`protocol-tests/*.eivr`), each against
/// a daemon of its own over `ivr://`: the same commands for the same
/// events as the per-call process gives them. Steps about the process (its
/// stderr, its exit) are left out, there being none per call here; instead
/// the daemon must have ended and cleaned up the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_tests_run_the_same_over_ivr() {
    use popivr_testkit::sim::glob::Glob;
    use popivr_testkit::sim::replay::Runner;
    use popivr_testkit::sim::script::{Script, Step, StepKind};

    let mut files: Vec<PathBuf> = std::fs::read_dir("protocol-tests")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "eivr"))
        .collect();
    files.sort();
    let mut runs = Vec::new();
    for file in files {
        let mut script = Script::from_file(&file).unwrap();
        let config = script.config.take().unwrap_or_default();
        let xmpp = config.contains("{{")
            || script
                .steps
                .iter()
                .any(|s| matches!(s.kind, StepKind::Ext(_)));
        if xmpp {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon::start(&write_config(dir.path(), &config), &[]);
        script.call = script
            .call
            .replacen("popivr", &format!("ivr://{}", daemon.addr), 1);
        // Over ivr:// the variable reads go out with `P`, before the hold
        // audio (the prefetch tests above check them), so the scripts'
        // `expect: G,...` steps, written for the per-call order, go.
        script.steps.retain(|s| match s.kind {
            StepKind::StderrHas(_) | StepKind::StderrLacks(_) | StepKind::ExitsWithin(_) => false,
            StepKind::Expect(_) => !s.text.starts_with("expect: G,"),
            _ => true,
        });
        for pattern in ["P,x", "G,*"] {
            script.steps.insert(
                0,
                Step {
                    line: 0,
                    text: format!("ignore: {pattern}"),
                    kind: StepKind::Ignore(Glob::new(pattern).unwrap()),
                },
            );
        }
        runs.push(tokio::spawn(async move {
            let result = Runner::new("popivr").run(&script).await;
            if result.is_ok() {
                daemon.wait_log(&["popivr[1]", "call over"]).await;
            }
            (script.name, result.map(drop), dir)
        }));
    }
    assert!(
        runs.len() >= 10,
        "only {} Asterisk-only scripts",
        runs.len()
    );
    let mut failures = Vec::new();
    for run in runs {
        let (name, result, _dir) = run.await.unwrap();
        match result {
            Ok(()) => println!("{name}: ok over ivr://"),
            Err(e) => failures.push(e.to_string()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
