//! The per-call mode, end to end: the release `popivr` binary started once
//! per call as Asterisk starts it, against a throw-away prosody on
//! 127.0.0.1 and a logged-in test agent. Results: BENCHMARKS.md.
//!
//!     cargo bench --bench percall        # the full run, 1-2 minutes
//!
//! One run measures, each over many calls (medians and p90, never single
//! times: the machines are shared and noisy):
//!
//! 1. exec → first audio command: from just before `spawn` to the moment
//!    the `S,` line is read from the child's stdout (keys-only profile and
//!    a profile with targets, which logs in to XMPP beside the audio);
//! 2. pop latency: from just before `spawn` to the agent holding the pop,
//!    with the `G` reads answered at once; and its floor, popivr's XMPP
//!    session sending one message without any call logic (warm, in this
//!    process; and cold, in a fresh process), interleaved with the calls;
//! 3. reply → action: the agent's "1" leaves → the `E` line is read;
//! 4. peak RSS of one call's process (`VmHWM`, see [`Memory`]);
//! 5. exit after stdin EOF: close the child's stdin → `wait4` returns.
//!
//! Goals are printed as met or missed; nothing here fails on a time.
//!
//! Knobs (environment): `PERCALL_N` calls per series; `PERCALL_GAP_MS`
//! pause before each call that involves the agent (250, see
//! [`Plan::gap`]); `PERCALL_POPIVR` another popivr build to measure;
//! `PERCALL_STRACE=<file>` one extra call under strace; `PERCALL_SMAPS=<prefix>`
//! the smaps of the first call of each profile.
//!
//! The bench plays Asterisk itself rather than through `popivr::sim`: it
//! needs the child's pid and pipes for `wait4` and `/proc`, and a reader
//! thread that is already blocked in `read` when the child starts, so the
//! `S,` line is timed when it arrives, not when a task gets to it.
//!
//! Without `--bench` (`cargo test --all-targets` runs this binary too) it
//! makes one call of each kind as a smoke test and prints no verdicts.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use popivr::call::{OutgoingMessage, XmppStatus};
use popivr::xmpp::XmppEvent;
use support::{Prosody, TestAgent, TestMessage, body};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use xmpp_parsers::message::Message;

/// The popivr binary under test (release under `cargo bench`), unless
/// `PERCALL_POPIVR` names another build to compare.
fn popivr_bin() -> PathBuf {
    std::env::var_os("PERCALL_POPIVR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_popivr")))
}
/// Set in the environment of this bench re-run as a fresh process
/// ([`child_main`]): `login` or `pop`.
const CHILD_MODE: &str = "PERCALL_CHILD";
/// How long any single wait may take before the run is declared broken.
const WAIT: Duration = Duration::from_secs(10);

const DOMAIN_USER_PBX: &str = "pbx";
const DOMAIN_USER_AGENT: &str = "alice";
const PBX_PASSWORD: &str = "percall-pbx-pw";
const AGENT_PASSWORD: &str = "percall-alice-pw";

/// What `G` reads answer (the default `variables` of a profile).
const VARS: &[(&str, &str)] = &[
    ("CALLERID(num)", "5551234"),
    ("CALLERID(name)", "Doe John"),
    ("EXTEN", "100"),
    ("DNID", "100"),
    ("UNIQUEID", "1700000000.42"),
];

fn main() {
    if let Ok(mode) = std::env::var(CHILD_MODE) {
        child_main(&mode);
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let plan = Plan::new(full);

    let server = Prosody::builder()
        .user(DOMAIN_USER_PBX, PBX_PASSWORD)
        .user(DOMAIN_USER_AGENT, AGENT_PASSWORD)
        .start();
    let conf = write_config(&server);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let report = rt.block_on(run(&server, &conf, &plan));
    report.print(full, &plan);
    if full {
        report.write_files();
    }
}

/// How many calls each series makes.
struct Plan {
    keys: usize,
    pops: usize,
    /// Back-to-back calls with a target.
    packed: usize,
    hangups: usize,
    logins: usize,
    cold: usize,
    /// Calls made first and not counted (page cache, prosody's own warm-up).
    warmup: usize,
    /// Pause before each call that involves the agent. prosody leaves
    /// Nagle on (`network_settings.nagle`), and the agent's kernel delays
    /// its ACKs (40 ms and up) once the agent has replied: a pop that
    /// follows the previous call's confirmation closer than that waits for
    /// the ACK. Agents between calls are idle, so the main series are
    /// spaced; a back-to-back series shows the other case.
    gap: Duration,
}

impl Plan {
    fn new(full: bool) -> Plan {
        if !full {
            return Plan {
                keys: 1,
                pops: 1,
                packed: 1,
                hangups: 1,
                logins: 1,
                cold: 1,
                warmup: 0,
                gap: Duration::ZERO,
            };
        }
        let n = std::env::var("PERCALL_N").ok().and_then(|v| v.parse().ok());
        let n = |default: usize| n.unwrap_or(default).max(1);
        let gap = std::env::var("PERCALL_GAP_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(250);
        Plan {
            keys: n(100),
            pops: n(60),
            packed: n(30),
            hangups: n(30),
            logins: n(60),
            cold: n(30),
            warmup: 3,
            gap: Duration::from_millis(gap),
        }
    }
}

async fn run(server: &Prosody, conf: &Path, plan: &Plan) -> Report {
    let mut report = Report::default();
    report.note(format!("popivr binary: {}", popivr_bin().display()));
    report.note(format!(
        "prosody start-up {:.0} ms",
        ms(server.startup_time())
    ));

    // Keys-only calls: no XMPP at all.
    let mut exec = Samples::default();
    let mut key_to_e = Samples::default();
    let mut hwm = Samples::default();
    let mut anon = Samples::default();
    let mut file = Samples::default();
    let mut exit = Samples::default();
    let mut maxrss = Samples::default();
    for i in 0..plan.warmup + plan.keys {
        let c = keys_call(conf, i).await;
        if i >= plan.warmup {
            exec.push(c.exec_to_s);
            key_to_e.push(c.action);
            hwm.push_kib(c.mem.hwm);
            anon.push_kib(c.mem.anon);
            file.push_kib(c.mem.file);
            exit.push(c.exit);
            maxrss.push_kib(c.ru_maxrss_kib);
        }
    }
    report.row("exec → S, keys-only", exec, Goal::MedianMs(5.0));
    report.row("caller key → E, keys-only", key_to_e, Goal::None);
    report.row("peak RSS (VmHWM), keys-only", hwm, Goal::MaxMib(6.0));
    report.row("  of which now anonymous (RssAnon)", anon, Goal::None);
    report.row("  of which now file-backed (RssFile)", file, Goal::None);
    report.row("stdin EOF → exit, keys-only", exit, Goal::MaxMs(100.0));
    report.row(
        "wait4 ru_maxrss, keys-only (includes the spawner's, see notes)",
        maxrss,
        Goal::None,
    );

    let mut agent = TestAgent::login(server, DOMAIN_USER_AGENT, AGENT_PASSWORD).await;
    let account = popivr::config::load_file(conf)
        .expect("bench config")
        .accounts
        .get(DOMAIN_USER_PBX)
        .cloned()
        .expect("pbx account");

    // Calls with a target (audio, login, pop, reply, action, EOF),
    // interleaved with the floor: popivr's own XMPP session sending one
    // message without any call logic, in this warm process and in a fresh
    // one. Interleaving gives all three the same share of whatever else
    // the machine is doing. Each step waits `plan.gap` first (see there).
    let mut spaced = PopSeries::default();
    let mut floor = Samples::default();
    let mut cold_floor = Samples::default();
    let mut ratio = Samples::default();
    let mut cold_ratio = Samples::default();
    for i in 0..plan.warmup + plan.pops {
        tokio::time::sleep(plan.gap).await;
        let call = pop_call(conf, &mut agent, i, None).await;
        tokio::time::sleep(plan.gap).await;
        let warm = floor_message(&account, &mut agent, i).await;
        tokio::time::sleep(plan.gap).await;
        let cold = cold_floor_message(conf, &mut agent, 20_000 + i).await;
        let Some(call) = call else {
            spaced.pops_missing += 1;
            if spaced.pops_missing == 3 && i == 2 {
                report.note("the first 3 pops never came: series stopped".into());
                break;
            }
            continue;
        };
        if i >= plan.warmup {
            ratio.push_ratio(call.pop.as_secs_f64() / warm.as_secs_f64());
            cold_ratio.push_ratio(call.pop.as_secs_f64() / cold.as_secs_f64());
            spaced.add(&call);
            floor.push(warm);
            cold_floor.push(cold);
        }
    }
    report.row("exec → S, with targets", spaced.exec, Goal::MedianMs(5.0));
    report.row("exec → pop at the agent", spaced.pop, Goal::MedianMs(15.0));
    report.row("agent reply → E", spaced.reply, Goal::MedianMs(1.5));
    report.row(
        "peak RSS (VmHWM), with targets",
        spaced.hwm,
        Goal::MaxMib(6.0),
    );
    report.row(
        "  of which now anonymous (RssAnon)",
        spaced.anon,
        Goal::None,
    );
    report.row(
        "  of which now file-backed (RssFile)",
        spaced.file,
        Goal::None,
    );
    report.row(
        "stdin EOF → exit, with targets (after E)",
        spaced.exit,
        Goal::MaxMs(100.0),
    );
    report.row("floor: login + 1 message, in-process", floor, Goal::None);
    report.row(
        "floor: exec + login + 1 message, fresh process",
        cold_floor,
        Goal::None,
    );
    report.row("pop / in-process floor, same round", ratio, Goal::None);
    report.row(
        "pop / fresh-process floor, same round",
        cold_ratio,
        Goal::None,
    );
    report.note(format!(
        "calls with a target: pops missing {} of {}, confirmations missing {}",
        spaced.pops_missing,
        plan.warmup + plan.pops,
        spaced.confirms_missing
    ));

    // Back to back: the next pop follows the agent's reply and its
    // confirmation within a few milliseconds.
    let mut packed = PopSeries::default();
    for i in 0..plan.warmup + plan.packed {
        match pop_call(conf, &mut agent, 40_000 + i, None).await {
            Some(call) if i >= plan.warmup => packed.add(&call),
            Some(_) => {}
            None => packed.pops_missing += 1,
        }
    }
    report.row(
        "exec → pop at the agent, back-to-back calls",
        packed.pop,
        Goal::None,
    );

    // The caller leaves while the pop is out: a missed-call notice is
    // queued right before the close.
    let mut exit = Samples::default();
    let mut notices_missing = 0;
    let any_pop = spaced.pops_missing < plan.warmup + plan.pops;
    for i in 0..if any_pop { plan.hangups } else { 0 } {
        tokio::time::sleep(plan.gap).await;
        let Some((d, noticed)) = hangup_call(conf, &mut agent, 10_000 + i).await else {
            continue;
        };
        exit.push(d);
        notices_missing += usize::from(!noticed);
    }
    report.row(
        "stdin EOF → exit, with targets (popped, no reply)",
        exit,
        Goal::MaxMs(100.0),
    );
    report.note(format!(
        "missed-call notices not received: {notices_missing} of {}",
        plan.hangups
    ));

    let mut hello = Samples::default();
    for _ in 0..plan.cold {
        hello.push(child_hello(conf));
    }
    report.row(
        "exec → first line, bench binary (floor's start-up)",
        hello,
        Goal::None,
    );

    // Where a login's time goes: warm (in-process) and cold (fresh process).
    let mut warm = Phases::default();
    for _ in 0..plan.logins {
        let t = Instant::now();
        let conn = popivr::xmpp::login(&account).await.expect("login");
        warm.add(t.elapsed(), &conn.timings);
    }
    report.phases("login phases, warm (in-process)", warm);
    let mut cold = Phases::default();
    for _ in 0..plan.cold {
        cold.merge(cold_login(conf));
    }
    report.phases("login phases, cold (fresh process)", cold);

    // One more call under strace, on request: where a pop's time goes.
    if let Some(file) = std::env::var_os("PERCALL_STRACE") {
        let file = PathBuf::from(file);
        match pop_call(conf, &mut agent, 30_000, Some(&file)).await {
            Some(c) => report.note(format!(
                "traced call (strace, not in the figures): pop {:.1} ms; trace in {}",
                ms(c.pop),
                file.display()
            )),
            None => report.note("traced call: no pop".into()),
        }
    }

    agent.close().await;
    report
}

// ---------------------------------------------------------------------------
// One call, with the bench as Asterisk.

/// Asterisk's side of one running call: the child's pipes, a reader thread
/// that answers `G` at once, and the lines it read, each with the instant
/// it was read.
struct Asterisk {
    pid: libc::pid_t,
    /// Just before the spawn.
    t0: Instant,
    stdin: Arc<Mutex<Option<std::io::PipeWriter>>>,
    lines: UnboundedReceiver<(Instant, String)>,
    stderr: Arc<Mutex<Vec<String>>>,
    seen: Vec<String>,
}

impl Asterisk {
    /// Start call `n` on `profile`; with `trace`, under `strace -f -tt`
    /// writing to that file (for finding where the time goes, not timed).
    fn start(conf: &Path, profile: &str, n: usize, trace: Option<&Path>) -> Asterisk {
        let (out_r, out_w) = std::io::pipe().expect("pipe");
        let (in_r, in_w) = std::io::pipe().expect("pipe");
        let (err_r, err_w) = std::io::pipe().expect("pipe");
        let stdin = Arc::new(Mutex::new(Some(in_w)));
        let (tx, lines) = unbounded_channel();
        // The readers wait in `read` before the child exists.
        spawn_stdout_reader(out_r, stdin.clone(), tx);
        let stderr = Arc::new(Mutex::new(Vec::new()));
        spawn_stderr_reader(err_r, stderr.clone());

        // As ExternalIVR runs it: no shell, an environment of PATH and
        // what the dialplan adds.
        let mut cmd = match trace {
            None => Command::new(popivr_bin()),
            Some(file) => {
                let mut strace = Command::new("strace");
                strace
                    .args(["-f", "--seccomp-bpf", "-tt", "-T", "-o"])
                    .arg(file)
                    .arg("-e")
                    .arg("trace=network,read,write,writev,execve")
                    .arg(popivr_bin());
                strace
            }
        };
        cmd.arg0("popivr")
            .arg(profile)
            .arg(format!("n={n}"))
            .env_clear()
            .env("POPIVR_CONFIG", conf)
            .stdin(in_r)
            .stdout(out_w)
            .stderr(err_w);
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let t0 = Instant::now();
        #[expect(
            clippy::zombie_processes,
            reason = "reaped by wait4 in close_and_wait, which also reads its rusage"
        )]
        let child = cmd.spawn().expect("spawn popivr");
        // Our copies of the child's ends must go, or EOF never comes.
        drop(cmd);
        Asterisk {
            pid: child.id() as libc::pid_t,
            t0,
            stdin,
            lines,
            stderr,
            seen: Vec::new(),
        }
    }

    /// The next command line starting with `prefix`, and when it was read.
    async fn expect(&mut self, prefix: &str) -> (Instant, String) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return (at, line);
                    }
                }
                Ok(None) => self.fail(&format!("stdout closed before {prefix:?}")),
                Err(_) => self.fail(&format!("no {prefix:?} within {WAIT:?}")),
            }
        }
    }

    /// Write an event line (a timestamp is added).
    fn event(&self, tag: &str) {
        write_event(&self.stdin, &format!("{tag},{}", unix_time()));
    }

    /// Close stdin (no event first) and wait for the exit: the time from
    /// the close to `wait4` returning, and the child's `ru_maxrss`.
    async fn close_and_wait(&mut self) -> (Duration, u64) {
        let stdin = self.stdin.clone();
        let pid = self.pid;
        let (after, status, maxrss) = tokio::task::spawn_blocking(move || {
            let writer = stdin.lock().expect("stdin lock").take();
            // Timed from just before the close: taken after it, a
            // preemption between the two would hide the exit entirely.
            let closed = Instant::now();
            drop(writer);
            let mut status = 0;
            // SAFETY: a zeroed rusage is a valid out-parameter.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: pid is our own child, not yet reaped.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            let after = closed.elapsed();
            assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
            (after, status, usage.ru_maxrss as u64)
        })
        .await
        .expect("wait4 task");
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            self.fail(&format!("popivr ended with wait status {status:#x}"));
        }
        (after, maxrss)
    }

    fn fail(&self, why: &str) -> ! {
        let stderr = self.stderr.lock().expect("stderr lock").join("\n  ");
        panic!(
            "call (pid {}): {why}\n commands read: {:?}\n stderr:\n  {stderr}",
            self.pid, self.seen
        );
    }
}

fn spawn_stdout_reader(
    out: std::io::PipeReader,
    stdin: Arc<Mutex<Option<std::io::PipeWriter>>>,
    tx: UnboundedSender<(Instant, String)>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let at = Instant::now();
            let line = line.trim().to_string();
            // Asterisk answers a read at once, from the channel's thread.
            if let Some(name) = line.strip_prefix("G,") {
                let value = VARS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("", |(_, v)| *v);
                write_event(&stdin, &format!("G,{},{name}={value}", unix_time()));
            }
            // Nobody listening any more is fine: keep draining.
            let _ = tx.send((at, line));
        }
    });
}

fn spawn_stderr_reader(err: std::io::PipeReader, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { return };
            lines.lock().expect("stderr lock").push(line);
        }
    });
}

fn write_event(stdin: &Mutex<Option<std::io::PipeWriter>>, line: &str) {
    if let Some(w) = stdin.lock().expect("stdin lock").as_mut() {
        // A child that has gone shows up as a missing command later.
        let _ = w.write_all(format!("{line}\n").as_bytes());
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Memory of a live process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    /// Peak resident set (`VmHWM`).
    ///
    /// Not `wait4`'s `ru_maxrss`: Linux folds the high-water mark of the
    /// memory a process had *before* `execve` into it (`exec_mmap` →
    /// `setmax_mm_hiwater_rss`), and a child spawned with `vfork` had its
    /// parent's, so `ru_maxrss` reports at least the spawner's own peak.
    /// Asterisk is a large process, so that figure says nothing about
    /// popivr.
    hwm: u64,
    /// Resident now: anonymous (heap, stacks) and file-backed (the
    /// binary's and libraries' pages).
    anon: u64,
    file: u64,
}

/// Read just before the process is told to go (after its last command);
/// with `PERCALL_SMAPS=<prefix>` the first one of each `profile` also
/// copies its smaps to `<prefix>.<profile>`.
fn memory(pid: libc::pid_t, profile: &str) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    if let Some(prefix) = std::env::var_os("PERCALL_SMAPS") {
        let mut file = prefix;
        file.push(format!(".{profile}"));
        let file = PathBuf::from(file);
        if !file.exists() {
            let _ = std::fs::copy(format!("/proc/{pid}/smaps"), &file);
        }
    }
    Some(Memory {
        hwm: field("VmHWM:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
    })
}

struct KeysCall {
    exec_to_s: Duration,
    action: Duration,
    mem: Memory,
    exit: Duration,
    ru_maxrss_kib: u64,
}

/// A keys-only call: audio, the reads, the caller presses 0 → V, E; the
/// peak RSS is read then, and stdin is closed.
async fn keys_call(conf: &Path, n: usize) -> KeysCall {
    let mut call = Asterisk::start(conf, "keys", n, None);
    let (at, _) = call.expect("S,").await;
    let exec_to_s = at - call.t0;
    for _ in VARS {
        call.expect("G,").await;
    }
    let pressed = Instant::now();
    call.event("0");
    let (_, v) = call.expect("V,").await;
    if !v.contains("POPIVR_ACTION=operator") {
        call.fail(&format!("unexpected {v}"));
    }
    let (e_at, _) = call.expect("E,").await;
    let mem = memory(call.pid, "keys").unwrap_or_else(|| call.fail("no /proc status"));
    let (exit, ru_maxrss_kib) = call.close_and_wait().await;
    KeysCall {
        exec_to_s,
        action: e_at - pressed,
        mem,
        exit,
        ru_maxrss_kib,
    }
}

/// The figures of a series of calls with a target.
#[derive(Default)]
struct PopSeries {
    exec: Samples,
    pop: Samples,
    reply: Samples,
    hwm: Samples,
    anon: Samples,
    file: Samples,
    exit: Samples,
    pops_missing: usize,
    confirms_missing: usize,
}

impl PopSeries {
    fn add(&mut self, c: &PopCall) {
        self.exec.push(c.exec_to_s);
        self.pop.push(c.pop);
        self.reply.push(c.reply_to_e);
        self.hwm.push_kib(c.mem.hwm);
        self.anon.push_kib(c.mem.anon);
        self.file.push_kib(c.mem.file);
        self.exit.push(c.exit);
        self.confirms_missing += usize::from(!c.confirmed);
    }
}

struct PopCall {
    exec_to_s: Duration,
    pop: Duration,
    reply_to_e: Duration,
    mem: Memory,
    exit: Duration,
    confirmed: bool,
}

fn pop_text(n: usize) -> String {
    format!("Call from Doe John <5551234> to 100 #{n}. Reply 1 desk, h hang up")
}

/// A call with a target: the agent gets the pop, answers "1" to the JID
/// it came from, popivr sends V and E; then stdin is closed.
async fn pop_call(
    conf: &Path,
    agent: &mut TestAgent,
    n: usize,
    trace: Option<&Path>,
) -> Option<PopCall> {
    let mut call = Asterisk::start(conf, "pop", n, trace);
    let (at, _) = call.expect("S,").await;
    let exec_to_s = at - call.t0;
    let pop = wait_pop(&mut call, agent, n).await?;
    let popped = call.t0.elapsed();
    let from = pop.from.as_ref().map(|j| j.to_string()).unwrap_or_default();
    let mut answer = TestMessage::chat(&from, "1");
    if let Some(thread) = &pop.thread {
        answer = answer.thread(&thread.id);
    }
    let sent = Instant::now();
    agent.send(answer).await;
    let (_, v) = call.expect("V,").await;
    if !v.contains("POPIVR_ACTION=desk") {
        call.fail(&format!("unexpected {v}"));
    }
    let (e_at, _) = call.expect("E,").await;
    let mem = memory(call.pid, "pop").unwrap_or_else(|| call.fail("no /proc status"));
    let (exit, _) = call.close_and_wait().await;
    let confirm = format!("#{n}: sent to desk");
    let confirmed = agent
        .next_message_within(Duration::from_secs(2), |m| {
            body(m) == Some(confirm.as_str())
        })
        .await
        .is_some();
    Some(PopCall {
        exec_to_s,
        pop: popped,
        reply_to_e: e_at.saturating_duration_since(sent),
        mem,
        exit,
        confirmed,
    })
}

/// The pop of call `n` at the agent. Without one, the call is ended (its
/// stderr shown) and `None` returned, so the other series still run; a
/// smoke run fails instead.
async fn wait_pop(call: &mut Asterisk, agent: &mut TestAgent, n: usize) -> Option<Message> {
    let want = pop_text(n);
    let pop = agent
        .next_message_within(WAIT, |m| body(m) == Some(want.as_str()))
        .await;
    if pop.is_none() {
        if !std::env::args().any(|a| a == "--bench") {
            call.fail("the agent got no pop");
        }
        let stderr = call.stderr.lock().expect("stderr lock").join(" | ");
        eprintln!("call #{n}: no pop within {WAIT:?}; popivr's stderr: {stderr}");
        call.close_and_wait().await;
    }
    pop
}

/// A call whose caller leaves after the pop: stdin closes mid-call. The
/// exit time, and whether the missed-call notice arrived.
async fn hangup_call(conf: &Path, agent: &mut TestAgent, n: usize) -> Option<(Duration, bool)> {
    let mut call = Asterisk::start(conf, "pop", n, None);
    call.expect("S,").await;
    wait_pop(&mut call, agent, n).await?;
    let (exit, _) = call.close_and_wait().await;
    let noticed = agent
        .next_message_within(Duration::from_secs(2), |m| {
            body(m).is_some_and(|b| b.starts_with("Missed call from 5551234"))
        })
        .await
        .is_some();
    Some((exit, noticed))
}

// ---------------------------------------------------------------------------
// The floor.

/// popivr's XMPP session (login, presence, one message) in this process.
async fn floor_message(
    account: &popivr::config::Account,
    agent: &mut TestAgent,
    n: usize,
) -> Duration {
    let text = format!("floor #{n}");
    let t0 = Instant::now();
    let session = popivr::xmpp::spawn(account.clone(), Default::default());
    session.send(OutgoingMessage::chat(agent.bare(), text.clone(), None));
    if agent
        .next_message_within(WAIT, |m| body(m) == Some(text.as_str()))
        .await
        .is_none()
    {
        panic!("floor message {n} not received");
    }
    let d = t0.elapsed();
    session.close().await;
    d
}

/// The same from a fresh process: this bench run again in `pop` mode.
async fn cold_floor_message(conf: &Path, agent: &mut TestAgent, n: usize) -> Duration {
    let text = format!("cold floor #{n}");
    let mut cmd = child_command(conf, "pop");
    cmd.env("PERCALL_TO", agent.bare())
        .env("PERCALL_BODY", &text);
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

/// One login in a fresh process; its phases as the child reports them.
fn cold_login(conf: &Path) -> Phases {
    let out = child_command(conf, "login")
        .stdout(Stdio::piped())
        .output()
        .expect("run the bench as a child");
    assert!(out.status.success(), "cold login child failed");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut phases = Phases::default();
    for line in text.lines() {
        let Some((name, ms)) = line.split_once('\t') else {
            continue;
        };
        let d = Duration::from_secs_f64(ms.parse::<f64>().expect("ms") / 1000.0);
        phases.push(name, d);
    }
    phases
}

/// From just before the spawn to the first line of this bench re-run in
/// `hello` mode: the process start-up part of the fresh-process floor.
fn child_hello(conf: &Path) -> Duration {
    let mut cmd = child_command(conf, "hello");
    cmd.stdout(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn the bench as a child");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the child's line");
    let d = t0.elapsed();
    assert!(child.wait().expect("wait").success(), "hello child failed");
    d
}

fn child_command(conf: &Path, mode: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.env_clear()
        .env(CHILD_MODE, mode)
        .env("POPIVR_CONFIG", conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd
}

/// This bench as a fresh process: `login` logs in once and prints each
/// phase (`name<TAB>ms`); `pop` logs in and sends one message, as a
/// per-call process without popivr's call logic would; `hello` prints a
/// line at once.
fn child_main(mode: &str) {
    if mode == "hello" {
        println!("S,hello");
        return;
    }
    let conf = std::env::var("POPIVR_CONFIG").expect("POPIVR_CONFIG");
    let started = Instant::now();
    let config = popivr::config::load_file(&conf).expect("config");
    let account = config
        .accounts
        .get(DOMAIN_USER_PBX)
        .cloned()
        .expect("pbx account");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match mode {
            "login" => {
                let before = started.elapsed();
                let t = Instant::now();
                let conn = popivr::xmpp::login(&account).await.expect("login");
                let wall = t.elapsed();
                let mut out = String::new();
                let _ = writeln!(out, "process start → login call\t{}", ms(before));
                for (phase, d) in &conn.timings.phases {
                    let _ = writeln!(out, "{phase}\t{}", ms(*d));
                }
                let _ = writeln!(
                    out,
                    "set-up before connect (CA file, TLS config)\t{}",
                    ms(wall.saturating_sub(conn.timings.total))
                );
                let _ = writeln!(out, "login() wall\t{}", ms(wall));
                print!("{out}");
            }
            "pop" => {
                let to = std::env::var("PERCALL_TO").expect("PERCALL_TO");
                let body = std::env::var("PERCALL_BODY").expect("PERCALL_BODY");
                let mut session = popivr::xmpp::spawn(account, Default::default());
                session.send(OutgoingMessage::chat(to, body, None));
                // The message goes out right after Online; the close
                // queued behind it waits for it.
                while let Some(ev) = session.recv().await {
                    match ev {
                        XmppEvent::Status(XmppStatus::Online) => break,
                        XmppEvent::Status(XmppStatus::Failed(e)) => panic!("login: {e}"),
                        _ => {}
                    }
                }
                session.close().await;
            }
            other => panic!("unknown {CHILD_MODE} {other:?}"),
        }
    });
}

// ---------------------------------------------------------------------------
// Set-up.

/// popivr.conf for the test server: a keys-only profile and one with the
/// agent as its target. `${n}` (a program argument) tells calls apart.
fn write_config(server: &Prosody) -> PathBuf {
    let path = server.scratch_dir().join("popivr.conf");
    let conf = format!(
        "[{pbx}]
type = client
username = {pbx_jid}
secret = {PBX_PASSWORD}
serverhost = 127.0.0.1
port = {port}
usetls = yes
ca_file = {ca}
timeout = 5

[keys]
type = profile
hold = moh/a, moh/b
key = 0 -> continue operator
timeout = 30

[pop]
type = profile
account = {pbx}
targets = {agent}
; This bench's agent never accepts a presence subscription: pop it whatever
; its presence (the presence-aware path is measured by the bench suite).
presence = any
hold = moh/a, moh/b
template = Call from $caller_name$ <$caller$> to $number$ #${{n}}. Reply 1 desk, h hang up
confirm = #${{n}}: $outcome$
reply = 1, desk -> continue desk
reply = h -> hangup
key = 0 -> continue operator
timeout = 30
",
        pbx = DOMAIN_USER_PBX,
        pbx_jid = server.jid(DOMAIN_USER_PBX),
        port = server.port(),
        ca = server.ca_pem().display(),
        agent = server.jid(DOMAIN_USER_AGENT),
    );
    std::fs::write(&path, conf).expect("write popivr.conf");
    path
}

// ---------------------------------------------------------------------------
// Figures.

#[derive(Default, Clone)]
struct Samples {
    /// Milliseconds, or MiB for memory.
    values: Vec<f64>,
    unit: &'static str,
}

impl Samples {
    fn push(&mut self, d: Duration) {
        self.unit = "ms";
        self.values.push(ms(d));
    }

    fn push_ratio(&mut self, r: f64) {
        self.unit = "×";
        self.values.push(r);
    }

    fn push_kib(&mut self, kib: u64) {
        self.unit = "MiB";
        self.values.push(kib as f64 / 1024.0);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    fn median(&self) -> Option<f64> {
        let v = self.sorted();
        let n = v.len();
        match n {
            0 => None,
            _ if n % 2 == 1 => Some(v[n / 2]),
            _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        }
    }

    /// Nearest-rank percentile.
    fn percentile(&self, q: f64) -> Option<f64> {
        let v = self.sorted();
        let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
        v.get(rank - 1).copied()
    }
}

#[derive(Clone, Copy)]
enum Goal {
    None,
    MedianMs(f64),
    MaxMs(f64),
    MaxMib(f64),
}

impl Goal {
    fn text(self) -> String {
        match self {
            Goal::None => "—".into(),
            Goal::MedianMs(g) => format!("median ≤ {g} ms"),
            Goal::MaxMs(g) => format!("every call ≤ {g} ms"),
            Goal::MaxMib(g) => format!("every call ≤ {g} MiB"),
        }
    }

    fn verdict(self, s: &Samples) -> &'static str {
        let v = s.sorted();
        let (Some(max), Some(median)) = (v.last().copied(), s.median()) else {
            return "—";
        };
        let met = match self {
            Goal::None => return "—",
            Goal::MedianMs(g) => median <= g,
            Goal::MaxMs(g) | Goal::MaxMib(g) => max <= g,
        };
        if met { "met" } else { "MISSED" }
    }
}

/// Per-phase durations over many logins.
#[derive(Default)]
struct Phases {
    order: Vec<String>,
    by_name: BTreeMap<String, Samples>,
}

impl Phases {
    fn push(&mut self, name: &str, d: Duration) {
        if !self.order.iter().any(|o| o == name) {
            self.order.push(name.to_string());
        }
        self.by_name.entry(name.to_string()).or_default().push(d);
    }

    fn add(&mut self, wall: Duration, timings: &popivr::xmpp::LoginTimings) {
        for (phase, d) in &timings.phases {
            self.push(&phase.to_string(), *d);
        }
        self.push(
            "set-up before connect (CA file, TLS config)",
            wall.saturating_sub(timings.total),
        );
        self.push("login() wall", wall);
    }

    fn merge(&mut self, other: Phases) {
        for name in other.order {
            for v in &other.by_name[&name].values {
                self.push(&name, Duration::from_secs_f64(v / 1000.0));
            }
        }
    }
}

struct Row {
    name: String,
    samples: Samples,
    goal: Goal,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    phases: Vec<(String, Phases)>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, name: &str, samples: Samples, goal: Goal) {
        self.rows.push(Row {
            name: name.to_string(),
            samples,
            goal,
        });
    }

    fn phases(&mut self, name: &str, phases: Phases) {
        self.phases.push((name.to_string(), phases));
    }

    fn note(&mut self, text: String) {
        self.notes.push(text);
    }

    fn print(&self, full: bool, plan: &Plan) {
        let f = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.2}"));
        println!();
        if !full {
            println!("smoke run (one call of each kind); figures mean nothing, no verdicts");
        } else {
            println!(
                "popivr per-call bench: {} warm-up call(s) per series not counted",
                plan.warmup
            );
        }
        println!("| measure | N | median | p90 | min | max | unit | goal | verdict |");
        println!("|---|--:|--:|--:|--:|--:|---|---|---|");
        for r in &self.rows {
            let s = &r.samples;
            let v = s.sorted();
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                v.len(),
                f(s.median()),
                f(s.percentile(0.9)),
                f(v.first().copied()),
                f(v.last().copied()),
                s.unit,
                r.goal.text(),
                if full { r.goal.verdict(s) } else { "—" },
            );
        }
        for (title, phases) in &self.phases {
            println!();
            println!("{title} (ms):");
            println!("| phase | N | median | p90 |");
            println!("|---|--:|--:|--:|");
            for name in &phases.order {
                let s = &phases.by_name[name];
                println!(
                    "| {name} | {} | {} | {} |",
                    s.values.len(),
                    f(s.median()),
                    f(s.percentile(0.9))
                );
            }
        }
        println!();
        for n in &self.notes {
            println!("- {n}");
        }
    }

    /// Raw samples (one line per sample) and a strip plot, beside the
    /// build's other temporary files.
    fn write_files(&self) {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("percall");
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        let mut csv = String::from("measure,unit,value\n");
        for r in &self.rows {
            for v in &r.samples.values {
                let _ = writeln!(csv, "\"{}\",{},{v:.4}", r.name, r.samples.unit);
            }
        }
        let _ = std::fs::write(dir.join("samples.csv"), csv);
        let _ = std::fs::write(dir.join("percall.svg"), self.svg());
        println!("raw samples and plot: {}", dir.display());
    }

    /// One strip per timed measure on a log scale, with the goal marked.
    fn svg(&self) -> String {
        let rows: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.samples.unit == "ms")
            .collect();
        let (left, width, height) = (330.0, 520.0, 26.0);
        let (lo, hi) = (0.1f64.log10(), 1000f64.log10());
        let x = |v: f64| left + (v.max(0.1).log10() - lo) / (hi - lo) * width;
        let total_h = 40.0 + height * rows.len() as f64 + 30.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{total_h}" font-family="sans-serif" font-size="11">"#,
            left + width + 20.0
        );
        let _ = writeln!(
            s,
            r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="18" font-size="13">popivr per-call: each dot one call (ms, log scale); red bar = goal, black bar = median</text>"#
        );
        for tick in [0.1, 1.0, 10.0, 100.0, 1000.0] {
            let _ = writeln!(
                s,
                r##"<line x1="{0}" x2="{0}" y1="28" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" text-anchor="middle">{tick}</text>"##,
                x(tick),
                total_h - 25.0,
                total_h - 12.0
            );
        }
        for (i, r) in rows.iter().enumerate() {
            let y = 40.0 + height * i as f64 + height / 2.0;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
                left - 8.0,
                y + 4.0,
                r.name
            );
            for (j, v) in r.samples.values.iter().enumerate() {
                let jitter = (j % 7) as f64 - 3.0;
                let _ = writeln!(
                    s,
                    r##"<circle cx="{:.1}" cy="{:.1}" r="1.8" fill="#36c" fill-opacity="0.5"/>"##,
                    x(*v),
                    y + jitter * 1.6
                );
            }
            if let Some(m) = r.samples.median() {
                let _ = writeln!(
                    s,
                    r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="black" stroke-width="2"/>"#,
                    x(m),
                    y - 9.0,
                    y + 9.0
                );
            }
            let goal = match r.goal {
                Goal::MedianMs(g) | Goal::MaxMs(g) => Some(g),
                _ => None,
            };
            if let Some(g) = goal {
                let _ = writeln!(
                    s,
                    r#"<line x1="{0:.1}" x2="{0:.1}" y1="{1}" y2="{2}" stroke="red" stroke-width="2"/>"#,
                    x(g),
                    y - 11.0,
                    y + 11.0
                );
            }
        }
        s.push_str("</svg>\n");
        s
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
