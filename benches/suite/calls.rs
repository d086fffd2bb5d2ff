//! One call, or many at once, with the test agent `alice` at the other end:
//! per-call popivr processes, the comparison peer's processes, and calls
//! over `ivr://` to `popivr serve`.

use std::path::Path;
use std::time::{Duration, Instant};

use popivr::call::OutgoingMessage;
use xmpp_parsers::message::Message;

use crate::asterisk::{Asterisk, Memory, Program, VARS, WAIT, memory};
use crate::stats::Samples;
use crate::support::{TestAgent, TestMessage, body};

/// Where a call runs.
#[derive(Clone, Copy)]
pub enum Start<'a> {
    /// A child process per call.
    Process(&'a Program),
    /// A connection to `popivr serve` at this address, on this profile.
    Serve(&'a str, &'a str),
}

impl Start<'_> {
    fn open(self, n: usize) -> Asterisk {
        match self {
            Start::Process(p) => Asterisk::spawn(p, n),
            Start::Serve(addr, profile) => Asterisk::connect(addr, profile, n),
        }
    }
}

/// Does this message carry the pop of call `n`?
pub fn is_pop(m: &Message, n: usize) -> bool {
    body(m).is_some_and(|b| b.starts_with("Call from") && b.contains(&format!("#{n}. Reply")))
}

fn is_confirmation(m: &Message, n: usize) -> bool {
    body(m).is_some_and(|b| b.contains(&format!("#{n}: sent to desk")))
}

pub struct KeysCall {
    pub exec_to_s: Duration,
    pub action: Duration,
    pub mem: Memory,
    pub exit: Duration,
}

/// A keys-only call: audio, the reads, the caller presses 0 → V, E; the
/// peak RSS is read then, and stdin is closed.
pub async fn keys_call(program: &Program, n: usize) -> KeysCall {
    let mut call = Asterisk::spawn(program, n);
    let (audio, _) = call.expect_start(VARS.len()).await;
    let exec_to_s = audio - call.t0;
    let pressed = Instant::now();
    call.event("0");
    let (_, v) = call.expect("V,").await;
    if !v.contains("POPIVR_ACTION=operator") {
        call.fail(&format!("unexpected {v}"));
    }
    let (e_at, _) = call.expect("E,").await;
    let pid = call.pid.expect("a child");
    let mem = memory(pid, "keys").unwrap_or_else(|| call.fail("no /proc status"));
    let (exit, _) = call.close_and_wait().await;
    KeysCall {
        exec_to_s,
        action: e_at - pressed,
        mem,
        exit,
    }
}

/// The figures of one call with a target.
pub struct PopCall {
    pub exec_to_s: Duration,
    /// Start → the last `G` read (the program has asked for everything
    /// it needs from Asterisk).
    pub last_g: Duration,
    pub pop: Duration,
    pub reply_to_e: Duration,
    /// Process mode only.
    pub mem: Option<Memory>,
    pub exit: Duration,
    pub cpu: Duration,
    pub confirmed: bool,
}

/// A series of calls with a target.
#[derive(Default)]
pub struct PopSeries {
    pub exec: Samples,
    pub last_g: Samples,
    /// Pop at the agent − last `G` read, per call.
    pub g_to_pop: Samples,
    pub pop: Samples,
    pub reply: Samples,
    pub hwm: Samples,
    pub anon: Samples,
    pub file: Samples,
    pub exit: Samples,
    pub cpu: Samples,
    pub missing: usize,
    pub unconfirmed: usize,
}

impl PopSeries {
    pub fn add(&mut self, c: &PopCall) {
        self.exec.push(c.exec_to_s);
        self.last_g.push(c.last_g);
        self.g_to_pop.push(c.pop.saturating_sub(c.last_g));
        self.pop.push(c.pop);
        self.reply.push(c.reply_to_e);
        if let Some(mem) = c.mem {
            self.hwm.push_kib_as_mib(mem.hwm);
            self.anon.push_kib_as_mib(mem.anon);
            self.file.push_kib_as_mib(mem.file);
            self.exit.push(c.exit);
            self.cpu.push(c.cpu);
        }
        self.unconfirmed += usize::from(!c.confirmed);
    }

    /// Record call `n`'s result (`None`: no pop) unless it is a warm-up.
    pub fn take(&mut self, call: Option<PopCall>, counted: bool) {
        match call {
            Some(c) if counted => self.add(&c),
            Some(_) => {}
            None => self.missing += 1,
        }
    }
}

/// A call with a target: hold audio, the agent gets the pop, answers "1"
/// to the JID (and thread) it came from, the program sends V and E; then
/// the input is closed. `None` if no pop came (its stderr is shown).
pub async fn pop_call(start: Start<'_>, agent: &mut TestAgent, n: usize) -> Option<PopCall> {
    let mut call = start.open(n);
    let (audio, read) = call.expect_start(VARS.len()).await;
    let exec_to_s = audio - call.t0;
    let last_g = read - call.t0;
    let Some(pop) = agent.next_message_within(WAIT, |m| is_pop(m, n)).await else {
        eprintln!(
            "call #{n}: no pop within {WAIT:?}; stderr: {}",
            call.stderr()
        );
        call.close_and_wait().await;
        return None;
    };
    let popped = call.t0.elapsed();
    let sent = reply(agent, &pop).await;
    let (_, v) = call.expect("V,").await;
    if !v.contains("POPIVR_ACTION=desk") {
        call.fail(&format!("unexpected {v}"));
    }
    let (e_at, _) = call.expect("E,").await;
    let mem = call
        .pid
        .map(|pid| memory(pid, "pop").unwrap_or_else(|| call.fail("no /proc status")));
    let (exit, cpu) = call.close_and_wait().await;
    let confirmed = agent
        .next_message_within(Duration::from_secs(2), |m| is_confirmation(m, n))
        .await
        .is_some();
    Some(PopCall {
        exec_to_s,
        last_g,
        pop: popped,
        reply_to_e: e_at.saturating_duration_since(sent),
        mem,
        exit,
        cpu,
        confirmed,
    })
}

/// Answer "1" to a pop, in its thread; the instant just before the send.
async fn reply(agent: &mut TestAgent, pop: &Message) -> Instant {
    let from = pop.from.as_ref().map(|j| j.to_string()).unwrap_or_default();
    let mut answer = TestMessage::chat(&from, "1");
    if let Some(thread) = &pop.thread {
        answer = answer.thread(&thread.id);
    }
    let sent = Instant::now();
    agent.send(answer).await;
    sent
}

/// `m` calls started at once; each pop answered as it arrives.
#[derive(Default)]
pub struct Burst {
    pub pop: Samples,
    pub reply: Samples,
    /// CPU time (user + system) per call's process.
    pub cpu: Samples,
    pub missing: usize,
    /// Answered, but no `E` came.
    pub no_e: usize,
    /// Killed after not leaving on EOF, or a failed exit status.
    pub bad_exits: usize,
    pub wall: Duration,
    /// Why the calls without a pop had none: what they logged, by kind.
    pub why_missing: std::collections::BTreeMap<String, usize>,
}

/// What a call that never popped said about it: its first error or
/// "nobody available" line, without ids and numbers.
fn why_no_pop(stderr: &str) -> String {
    let line = stderr
        .split(" | ")
        .find(|l| l.contains("ERROR") || l.contains("nobody available"))
        .unwrap_or("nothing logged");
    let text = line.split_once("]: ").map_or(line, |(_, t)| t);
    let text: String = text
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(90)
        .collect();
    text.split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Start `m` calls together (numbered from `first`), answer every pop as
/// it comes, collect pop and reply latency and each process's CPU time.
pub async fn burst(start: Start<'_>, agent: &mut TestAgent, first: usize, m: usize) -> Burst {
    let mut out = Burst::default();
    let t_start = Instant::now();
    let mut calls: Vec<Asterisk> = (0..m).map(|i| start.open(first + i)).collect();
    for call in &mut calls {
        call.lenient = true;
    }
    let mut sent: Vec<Option<Instant>> = vec![None; m];
    // Generous: the peer's processes need about half a second of CPU
    // each before they log in.
    let deadline = Instant::now() + WAIT * 6;
    let mut left = m;
    while left > 0 {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Some(pop) = agent
            .next_message_within(wait, |m| {
                body(m).is_some_and(|b| b.starts_with("Call from"))
            })
            .await
        else {
            break;
        };
        let Some(i) = (0..m).find(|i| sent[*i].is_none() && is_pop(&pop, first + i)) else {
            continue;
        };
        out.pop.push(calls[i].t0.elapsed());
        sent[i] = Some(reply(agent, &pop).await);
        left -= 1;
    }
    out.missing = left;
    for (call, sent) in calls.iter().zip(&sent) {
        if sent.is_none() {
            *out.why_missing
                .entry(why_no_pop(&call.stderr()))
                .or_default() += 1;
        }
    }
    // A call without a pop took its default action or still waits; the
    // close below ends it either way.
    for (call, sent) in calls.iter_mut().zip(&sent) {
        let Some(sent) = sent else { continue };
        let Some((e_at, _)) = call.try_expect("E,").await else {
            out.no_e += 1;
            continue;
        };
        out.reply.push(e_at.saturating_duration_since(*sent));
    }
    out.wall = t_start.elapsed();
    for call in &mut calls {
        let (_, cpu) = call.close_and_wait().await;
        out.cpu.push(cpu);
        out.bad_exits += usize::from(!call.exited_ok);
    }
    // Confirmations and the like: not measured here.
    while agent
        .next_message_within(Duration::from_millis(300), |_| true)
        .await
        .is_some()
    {}
    out
}

/// popivr's XMPP session (login, presence, one message) in this process:
/// the per-call floor without a process start or call logic.
pub async fn floor_message(
    account: &popivr::config::Account,
    agent: &mut TestAgent,
    n: usize,
) -> Duration {
    let text = format!("floor #{n}");
    let t0 = Instant::now();
    let session = popivr::xmpp::spawn(account.clone(), Default::default());
    session.send(OutgoingMessage::chat(agent.bare(), text.clone(), None));
    received(agent, &text, &format!("floor message {n} not received")).await;
    let d = t0.elapsed();
    session.close().await;
    d
}

/// tokio-xmpp's stock `Client` (its own connector, SASL and bind, as the
/// test agent uses it) logging in and sending one message, in this
/// process.
pub async fn client_message(
    server: &dyn popivr_testkit::testbed::Server,
    user: &str,
    password: &str,
    agent: &mut TestAgent,
    n: usize,
) -> Duration {
    let text = format!("client floor #{n}");
    let t0 = Instant::now();
    let mut me = TestAgent::login(server, user, password).await;
    me.send_chat(&agent.bare(), &text).await;
    received(
        agent,
        &text,
        &format!("client floor message {n} not received"),
    )
    .await;
    let d = t0.elapsed();
    me.close().await;
    d
}

/// One message on a session that is already up: what any pop costs at
/// least once the login is out of the way (serve mode's floor).
pub async fn open_session_message(
    session: &popivr::xmpp::Session,
    agent: &mut TestAgent,
    n: usize,
) -> Duration {
    let text = format!("open floor #{n}");
    let t0 = Instant::now();
    session.send(OutgoingMessage::chat(agent.bare(), text.clone(), None));
    received(
        agent,
        &text,
        &format!("open-session message {n} not received"),
    )
    .await;
    t0.elapsed()
}

/// Wait for the message `text` at the agent; panics without it.
async fn received(agent: &mut TestAgent, text: &str, what: &str) {
    if agent
        .next_message_within(WAIT, |m| body(m) == Some(text))
        .await
        .is_none()
    {
        panic!("{what}");
    }
}

/// The bench itself as a fresh process that logs in and sends one message
/// (see `child_main`).
pub async fn cold_floor_message(conf: &Path, agent: &mut TestAgent, n: usize) -> Duration {
    let text = format!("cold floor #{n}");
    let mut cmd = crate::child_command(conf, "pop");
    cmd.env("BENCH_TO", agent.bare()).env("BENCH_BODY", &text);
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn the bench as a child");
    let got = agent
        .next_message_within(WAIT, |m| body(m) == Some(text.as_str()))
        .await;
    let d = t0.elapsed();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("wait task")
        .expect("wait");
    assert!(got.is_some(), "cold floor message {n} not received");
    assert!(status.success(), "cold floor child failed: {status}");
    d
}
