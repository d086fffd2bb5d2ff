//! `popivr serve` under load: the release binary as a daemon, a throw-away
//! prosody on 127.0.0.1 with logged-in test agents, and calls that play
//! Asterisk's side of `ivr://` (connect, answer `P` and every `G` at once,
//! answer `E`, close).
//!
//!     cargo bench --bench serve            # the full run, about a minute
//!
//! 1. One call at a time (`SERVE_SEQ` calls, 250 ms apart like the
//!    per-call bench, so prosody's Nagle on the agent's connection does
//!    not add its 40 ms): connect → `P,x` read; our `P` answer → `S,` read
//!    (the daemon's part of the first audio); connect → `S,` (compare with
//!    the per-call exec → `S,`); connect → the agent holding the pop (the
//!    per-call pop latency, and res_xmpp's 1.15 ms); the agent's reply →
//!    `E,` read.
//! 2. Scale: `SERVE_N` calls opened at `SERVE_RATE` a second and held;
//!    each pop's latency (connect → agent holds it), p50/p99; the daemon's
//!    RSS idle and with every call open, and the difference per call;
//!    then the agents answer every call at once: reply → `E,` p50/p99.
//!
//! `SERVE_SERVER=ejabberd` runs it against a stock ejabberd instead of
//! prosody (its `c2s_shaper` reads popivr's one session at 3,000 B/s after
//! a 20 kB burst), `SERVE_SHAPER=off` with that shaper off for every
//! account. A burst of 500 calls on the stock ejabberd:
//!
//!     SERVE_SERVER=ejabberd SERVE_SEQ=3 SERVE_N=500 SERVE_RATE=1000 \
//!         cargo bench --bench serve
//!
//! Nothing fails on a time; medians and percentiles are printed. Without
//! `--bench` (`cargo test --all-targets`) it does nothing: benchmarks are
//! not tests (`cargo bench --bench suite` runs serve beside everything
//! else). `SERVE_POPIVR` measures another popivr build.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use popivr_testkit::testbed::{Ejabberd, Server};
use support::{Prosody, TestAgent, body};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const PBX_PW: &str = "serve-bench-pbx";
const AGENT_PW: &str = "serve-bench-agent";
const AGENTS: usize = 10;
const WAIT: Duration = Duration::from_secs(30);

/// The caller, as every `POPIVR_CALLER_NUM` read answers (other reads are empty).
const CALLER: &str = "5551234";

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // Benchmarks are not tests: `cargo test --all-targets` runs this binary
    // without `--bench`, and then it does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench serve`");
        return;
    }
    let full = std::env::args().any(|a| a == "--bench");
    let seq = if full { knob("SERVE_SEQ", 100) } else { 3 };
    let scale = if full { knob("SERVE_N", 1000) } else { 20 };
    let rate = knob("SERVE_RATE", 250).max(1);

    let server = start_server();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("popivr.conf");
    std::fs::write(&config, config_text(server.as_ref())).unwrap();
    let mut daemon = Daemon::start(&config, scale + 50);
    println!(
        "serve bench: {} on {}, {} on {}, {AGENTS} agents",
        daemon.bin.display(),
        daemon.addr,
        server.name(),
        server.addr()
    );

    let (pops_tx, pops_rx) = mpsc::unbounded_channel();
    let mut cmds = Vec::new();
    let mut cmd_rxs = Vec::new();
    for _ in 0..AGENTS {
        let (tx, rx) = mpsc::unbounded_channel();
        cmds.push(tx);
        cmd_rxs.push(rx);
    }
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let server = server.as_ref();
        scope.spawn(move || agents_main(server, cmd_rxs, pops_tx, ready_tx));
        ready_rx.recv_timeout(WAIT).expect("agents logged in");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut bench = Bench {
                addr: daemon.addr.clone(),
                agents: cmds,
                pops: pops_rx,
                popped: HashMap::new(),
            };
            bench.sequential(seq, full).await;
            bench.scale(scale, rate, &daemon).await;
        });
        daemon.stop();
    });
}

/// prosody, or with `SERVE_SERVER=ejabberd` a stock ejabberd (its shaper
/// off for everyone with `SERVE_SHAPER=off`), with pbx and the agents.
fn start_server() -> Box<dyn Server + Sync> {
    let agents = (0..AGENTS).map(|i| format!("agent{i}"));
    if std::env::var("SERVE_SERVER").as_deref() == Ok("ejabberd") {
        let mut builder = Ejabberd::builder().user("pbx", PBX_PW);
        for a in agents {
            builder = builder.user(&a, AGENT_PW);
        }
        if std::env::var("SERVE_SHAPER").as_deref() == Ok("off") {
            // Debian's shaper_rules with `c2s_shaper: none` for all.
            builder = builder.config_line(
                "shaper_rules:\n  max_user_sessions: 10\n  max_user_offline_messages:\n    \
                 5000: admin\n    100: all\n  c2s_shaper: none\n  s2s_shaper: fast",
            );
        }
        return Box::new(builder.start());
    }
    let mut builder = Prosody::builder().user("pbx", PBX_PW);
    for a in agents {
        builder = builder.user(&a, AGENT_PW);
    }
    Box::new(builder.start())
}

fn config_text(server: &dyn Server) -> String {
    let mut text = format!(
        "[pbx]\ntype = client\nserverhost = 127.0.0.1\nport = {}\nusername = {}\n\
         secret = {PBX_PW}\nca_file = {}\n\n",
        server.port(),
        server.jid("pbx"),
        server.ca_pem().display()
    );
    for i in 0..AGENTS {
        text += &format!(
            "[p{i}]\ntype = profile\naccount = pbx\ntargets = {}\npresence = any\n\
             hold = moh/a\ntemplate = #$tag$ n=${{n}} from $caller$\n\
             confirm = done ${{n}}: $outcome$\nreply = 1 -> continue desk\n\
             timeout = 600\ndefault = continue voicemail\n\n",
            server.jid(&format!("agent{i}"))
        );
    }
    text
}

/// `popivr serve` on 127.0.0.1, its log read on a thread.
struct Daemon {
    bin: PathBuf,
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(config: &std::path::Path, max_calls: usize) -> Daemon {
        let bin = std::env::var_os("SERVE_POPIVR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_popivr")));
        let mut child = Command::new(&bin)
            .arg("--config")
            .arg(config)
            .args(["-v", "serve", "--listen", "127.0.0.1:0", "--max-calls"])
            .arg(max_calls.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start popivr serve");
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(Some(addr.trim().to_string()));
                }
                if line.contains("online as") {
                    let _ = tx.send(None);
                }
                if line.contains("ERROR") || line.contains("WARNING") {
                    eprintln!("daemon: {line}");
                }
            }
        });
        let mut addr = None;
        let mut online = false;
        while addr.is_none() || !online {
            match rx.recv_timeout(WAIT).expect("popivr serve did not come up") {
                Some(a) => addr = Some(a),
                None => online = true,
            }
        }
        Daemon {
            bin,
            child,
            addr: addr.unwrap(),
        }
    }

    /// Resident memory now (`VmRSS`), in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    fn stop(&mut self) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A pop as an agent held it.
struct Pop {
    n: usize,
    tag: String,
    agent: usize,
    at: Instant,
}

/// Send this text to popivr; say when it left.
struct Reply(String, oneshot::Sender<Instant>);

/// The agents, each a task on one thread (tokio-xmpp's client wants to be
/// polled from the thread that sends on it): every pop is timed when the
/// client yields it, and replies are sent on demand.
fn agents_main(
    server: &(dyn Server + Sync),
    cmds: Vec<mpsc::UnboundedReceiver<Reply>>,
    pops: mpsc::UnboundedSender<Pop>,
    ready: std::sync::mpsc::Sender<()>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pbx = server.jid("pbx");
        let mut tasks = Vec::new();
        for (i, mut cmds) in cmds.into_iter().enumerate() {
            let mut agent = TestAgent::login(server, &format!("agent{i}"), AGENT_PW).await;
            let pops = pops.clone();
            let pbx = pbx.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        cmd = cmds.recv() => match cmd {
                            Some(Reply(text, sent)) => {
                                let at = Instant::now();
                                agent.send_chat(&pbx, &text).await;
                                let _ = sent.send(at);
                            }
                            None => break,
                        },
                        m = agent.next_message_within(WAIT * 100, |m| body(m).is_some_and(|b| b.starts_with('#'))) => {
                            let at = Instant::now();
                            let Some(m) = m else { continue };
                            let text = body(&m).unwrap_or_default();
                            let (tag, rest) = text[1..].split_once(' ').unwrap_or_default();
                            let n = rest.strip_prefix("n=").and_then(|r| r.split(' ').next());
                            if let Some(n) = n.and_then(|n| n.parse().ok()) {
                                let tag = tag.to_string();
                                let _ = pops.send(Pop { n, tag, agent: i, at });
                            }
                        }
                    }
                }
                agent.close().await;
            }));
        }
        let _ = ready.send(());
        for task in tasks {
            let _ = task.await;
        }
    });
}

/// When a call's first steps happened.
#[derive(Clone, Copy)]
struct Start {
    connect: Instant,
    p_asked: Instant,
    p_answered: Instant,
    audio: Instant,
}

/// Asterisk's side of one `ivr://` call: answer `P` and each `G` at
/// once, report the start, answer `E` and close; the instant `E` arrived.
async fn fake_asterisk(addr: String, n: usize, started: oneshot::Sender<Start>) -> Option<Instant> {
    let connect = Instant::now();
    let stream = TcpStream::connect(&addr).await.ok()?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(rd).lines();
    let mut started = Some(started);
    let (mut p_asked, mut p_answered) = (connect, connect);
    while let Ok(Some(line)) = lines.next_line().await {
        let now = Instant::now();
        let ts = unix_time();
        match line.as_bytes().first() {
            Some(b'P') => {
                p_asked = now;
                let answer = format!("P,{ts},ivr://{addr},p{},n={n}\n", n % AGENTS);
                wr.write_all(answer.as_bytes()).await.ok()?;
                p_answered = Instant::now();
            }
            Some(b'S') => {
                if let Some(tx) = started.take() {
                    let _ = tx.send(Start {
                        connect,
                        p_asked,
                        p_answered,
                        audio: now,
                    });
                }
            }
            Some(b'G') => {
                let name = line.get(2..).unwrap_or_default();
                let value = if name == "POPIVR_CALLER_NUM" {
                    CALLER
                } else {
                    ""
                };
                let answer = format!("G,{ts},{name}={value}\n");
                wr.write_all(answer.as_bytes()).await.ok()?;
            }
            Some(b'E') | Some(b'H') => {
                let tag = line.as_bytes()[0] as char;
                wr.write_all(format!("{tag},{ts}\n").as_bytes())
                    .await
                    .ok()?;
                return Some(now);
            }
            _ => {}
        }
    }
    None
}

struct Bench {
    addr: String,
    agents: Vec<mpsc::UnboundedSender<Reply>>,
    pops: mpsc::UnboundedReceiver<Pop>,
    /// Pops that came before they were asked for, by call number.
    popped: HashMap<usize, Pop>,
}

impl Bench {
    fn call(&self, n: usize) -> (oneshot::Receiver<Start>, JoinHandle<Option<Instant>>) {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(fake_asterisk(self.addr.clone(), n, tx));
        (rx, task)
    }

    async fn pop(&mut self, n: usize) -> Pop {
        loop {
            if let Some(pop) = self.popped.remove(&n) {
                return pop;
            }
            let pop = tokio::time::timeout(WAIT, self.pops.recv())
                .await
                .unwrap_or_else(|_| panic!("no pop for call {n}"))
                .expect("agents gone");
            self.popped.insert(pop.n, pop);
        }
    }

    /// The agent who got `pop` answers it with its tag; when that left.
    async fn reply(&self, pop: &Pop) -> Instant {
        let (tx, rx) = oneshot::channel();
        let text = format!("#{} 1", pop.tag);
        self.agents[pop.agent].send(Reply(text, tx)).unwrap();
        rx.await.expect("reply sent")
    }

    async fn sequential(&mut self, calls: usize, spaced: bool) {
        let mut accept = Vec::new();
        let mut daemon_part = Vec::new();
        let mut audio = Vec::new();
        let mut pop_latency = Vec::new();
        let mut reply_to_e = Vec::new();
        for n in 0..calls + 3 {
            let round = Instant::now();
            let (start, task) = self.call(n);
            let start = start.await.expect("call started");
            let pop = self.pop(n).await;
            let sent = self.reply(&pop).await;
            let e = task.await.unwrap().expect("E arrived");
            if n >= 3 {
                accept.push(start.p_asked - start.connect);
                daemon_part.push(start.audio - start.p_answered);
                audio.push(start.audio - start.connect);
                pop_latency.push(pop.at - start.connect);
                reply_to_e.push(e - sent);
            }
            if spaced {
                tokio::time::sleep_until((round + Duration::from_millis(250)).into()).await;
            }
        }
        println!("\n1. one call at a time ({calls} calls, 3 warm-up calls not counted)");
        println!("| measure | median | p90 | max |\n|---|--:|--:|--:|");
        row("connect → `P,x` read", &mut accept, 0.9);
        row(
            "our `P` answer → `S,` read (the daemon's part)",
            &mut daemon_part,
            0.9,
        );
        row("connect → `S,` read (first audio)", &mut audio, 0.9);
        row("connect → pop held by the agent", &mut pop_latency, 0.9);
        row("agent's reply sent → `E,` read", &mut reply_to_e, 0.9);
    }

    async fn scale(&mut self, calls: usize, rate: usize, daemon: &Daemon) {
        let idle = daemon.rss_kib();
        let gap = Duration::from_secs(1) / rate as u32;
        let base = 1_000_000;
        let t0 = Instant::now();
        let mut open = Vec::new();
        for i in 0..calls {
            tokio::time::sleep_until((t0 + gap * i as u32).into()).await;
            open.push(self.call(base + i));
        }
        let mut starts = Vec::new();
        let mut tasks = Vec::new();
        for (start, task) in open {
            starts.push(start.await.expect("call started"));
            tasks.push(task);
        }
        let mut pops = Vec::new();
        let mut pop_latency = Vec::new();
        for (i, start) in starts.iter().enumerate() {
            let pop = self.pop(base + i).await;
            pop_latency.push(pop.at - start.connect);
            pops.push(pop);
        }
        let opened = t0.elapsed();
        let loaded = daemon.rss_kib();
        let mut sent = Vec::new();
        for pop in &pops {
            sent.push(self.reply(pop).await);
        }
        let mut reply_to_e = Vec::new();
        for (task, sent) in tasks.into_iter().zip(sent) {
            let e = task.await.unwrap().expect("E arrived");
            reply_to_e.push(e - sent);
        }
        let per_call = (loaded.saturating_sub(idle)) as f64 / calls as f64;
        println!(
            "\n2. {calls} calls opened at {rate}/s ({:.1} s) and held, then all answered",
            opened.as_secs_f64()
        );
        println!("| measure | median | p99 | max |\n|---|--:|--:|--:|");
        row(
            "connect → pop held by the agent, under load",
            &mut pop_latency,
            0.99,
        );
        row(
            "agent's reply sent → `E,` read, all at once",
            &mut reply_to_e,
            0.99,
        );
        println!(
            "daemon RSS: idle {:.1} MiB, {calls} calls open {:.1} MiB: {per_call:.1} KiB a call",
            idle as f64 / 1024.0,
            loaded as f64 / 1024.0
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn pick(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A table row: median, the `q` quantile, max.
fn row(name: &str, v: &mut [Duration], q: f64) {
    if v.is_empty() {
        return;
    }
    v.sort();
    let max = *v.last().unwrap();
    println!(
        "| {name} | {} | {} | {} |",
        ms(pick(v, 0.5)),
        ms(pick(v, q)),
        ms(max)
    );
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
