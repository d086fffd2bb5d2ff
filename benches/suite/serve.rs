//! `popivr serve` as a daemon, and many calls at once over `ivr://`.
//!
//! The scale runs use light connections (tokio tasks, not reader threads)
//! and agents that are popivr's own XMPP sessions (one login each, their
//! pops read and answered by tasks), so that 2,000 calls cost the bench
//! itself as little as possible; the CPU each process used is reported.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use popivr::call::OutgoingMessage;
use popivr::config::Account;
use popivr::xmpp::{SessionOptions, XmppEvent, XmppStatus};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::asterisk::{VARS, WAIT, memory, process_cpu, unix_time};
use crate::stats::Samples;

/// A running `popivr serve`, killed on drop.
pub struct Daemon {
    child: Child,
    pub addr: String,
    /// The last lines of its log (it logs a line or two per call).
    log: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    /// Whether this popivr build has the `serve` subcommand.
    pub fn available(popivr: &Path) -> bool {
        Command::new(popivr)
            .args(["serve", "--help"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Start on a free port (at the default log level, as deployed) and
    /// wait until it accepts connections.
    pub fn start(popivr: &Path, config: &Path) -> Daemon {
        let addr = format!("127.0.0.1:{}", crate::support::free_port());
        let mut child = Command::new(popivr)
            .arg("--config")
            .arg(config)
            .args(["serve", "--listen", &addr, "--max-calls", "10000"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start popivr serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let lines = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let Ok(mut log) = lines.lock() else { break };
                if log.len() >= 400 {
                    log.drain(..200);
                }
                log.push(line);
            }
        });
        let t0 = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if t0.elapsed() > WAIT || child.try_wait().ok().flatten().is_some() {
                panic!(
                    "popivr serve did not listen on {addr}: {:?}",
                    log.lock().map(|l| l.join("\n")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn rss_kib(&self) -> u64 {
        memory(self.pid() as libc::pid_t, "serve").map_or(0, |m| m.rss)
    }

    pub fn log_tail(&self) -> String {
        let log = self.log.lock().expect("log lock");
        log[log.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What an agent saw: a pop, with when it arrived.
struct Seen {
    n: usize,
    at: Instant,
    agent: usize,
    from: String,
    thread: Option<String>,
}

/// When each answer left, by call number.
type SentTimes = Arc<Mutex<HashMap<usize, Instant>>>;
/// An answer to send: the message, where to note when it left, the call.
type AnswerCmd = (OutgoingMessage, SentTimes, usize);

/// Logged-in agents that report every pop and answer when told.
pub struct Agents {
    seen: mpsc::UnboundedReceiver<Seen>,
    answer: Vec<mpsc::UnboundedSender<AnswerCmd>>,
    sent: SentTimes,
    stop: watch::Sender<bool>,
}

/// The call number in a pop ("… #123. Reply …").
fn pop_number(body: &str) -> Option<usize> {
    if !body.starts_with("Call from") {
        return None;
    }
    body.match_indices('#').find_map(|(i, _)| {
        let rest = &body[i + 1..];
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        rest[digits.len()..]
            .starts_with(". Reply")
            .then(|| digits.parse().ok())
            .flatten()
    })
}

impl Agents {
    /// Log in every account (they accept `popivr`'s subscription request,
    /// being its contacts).
    pub async fn login(accounts: Vec<Account>, popivr: &str) -> Agents {
        let (seen_tx, seen) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let mut answer = Vec::new();
        let mut online = Vec::new();
        for (k, account) in accounts.into_iter().enumerate() {
            let (tx, mut rx) = mpsc::unbounded_channel::<AnswerCmd>();
            answer.push(tx);
            let seen_tx = seen_tx.clone();
            let mut stop_rx = stop_rx.clone();
            let (up_tx, up_rx) = tokio::sync::oneshot::channel();
            online.push(up_rx);
            let options = SessionOptions {
                contacts: vec![popivr.to_string()],
                ..SessionOptions::default()
            };
            tokio::spawn(async move {
                let mut session = popivr::xmpp::spawn(account, options);
                let mut up = Some(up_tx);
                loop {
                    tokio::select! {
                        ev = session.recv() => match ev {
                            Some(XmppEvent::Status(XmppStatus::Online)) => {
                                if let Some(up) = up.take() {
                                    let _ = up.send(());
                                }
                            }
                            Some(XmppEvent::Message(m)) => {
                                let at = Instant::now();
                                let Some(n) = m.body.as_deref().and_then(pop_number) else {
                                    continue;
                                };
                                let _ = seen_tx.send(Seen {
                                    n,
                                    at,
                                    agent: k,
                                    from: m.from_full,
                                    thread: m.thread,
                                });
                            }
                            Some(_) => {}
                            None => break,
                        },
                        cmd = rx.recv() => match cmd {
                            Some((msg, sent, n)) => {
                                sent.lock().expect("sent lock").insert(n, Instant::now());
                                session.send(msg);
                            }
                            None => break,
                        },
                        _ = stop_rx.changed() => break,
                    }
                }
                session.close().await;
            });
        }
        for up in online {
            tokio::time::timeout(WAIT, up)
                .await
                .expect("scale agent online in time")
                .expect("scale agent online");
        }
        Agents {
            seen,
            answer,
            sent: Arc::new(Mutex::new(HashMap::new())),
            stop,
        }
    }

    pub fn len(&self) -> usize {
        self.answer.len()
    }

    pub fn close(self) {
        let _ = self.stop.send(true);
    }
}

/// One scale round's results.
#[derive(Default)]
pub struct Round {
    pub pop: Samples,
    pub reply: Samples,
    pub missing_pops: usize,
    pub missing_e: usize,
    /// Daemon RSS with all calls waiting, minus before the round, per call.
    pub kib_per_call: Option<f64>,
    pub cpu_daemon: Duration,
    pub cpu_prosody: Duration,
    pub cpu_bench: Duration,
    pub wall: Duration,
}

struct CallTimes {
    t0: Instant,
    e_at: Option<Instant>,
}

/// `n_calls` calls on `popivr serve`, arriving `rate` a second; the pops
/// are answered (at the same rate) once all calls are waiting, then every
/// call is closed. `first`: the first call number. Profiles `s0`, `s1`, …
/// target agent 0, 1, … in turn.
pub async fn round(
    daemon: &Daemon,
    prosody_pid: Option<u32>,
    agents: &mut Agents,
    first: usize,
    n_calls: usize,
    rate: f64,
    rss_idle_kib: u64,
) -> Round {
    let mut out = Round::default();
    let times: Arc<Mutex<HashMap<usize, CallTimes>>> = Arc::new(Mutex::new(HashMap::new()));
    let (close_tx, close_rx) = watch::channel(false);
    let cpu = |pid: Option<u32>| pid.and_then(process_cpu).unwrap_or_default();
    let own = std::process::id();
    let (d0, p0, b0) = (cpu(Some(daemon.pid())), cpu(prosody_pid), cpu(Some(own)));
    let t_start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut tasks = Vec::with_capacity(n_calls);
    for i in 0..n_calls {
        let n = first + i;
        tokio::time::sleep_until((t_start + interval * i as u32).into()).await;
        let addr = daemon.addr.clone();
        let profile = format!("s{}", i % agents.len());
        let times = times.clone();
        let close = close_rx.clone();
        tasks.push(tokio::spawn(async move {
            light_call(&addr, &profile, n, times, close).await;
        }));
    }
    // Every pop, as the agents report them.
    let mut seen: HashMap<usize, Seen> = HashMap::new();
    let deadline = tokio::time::Instant::now() + WAIT * 2;
    while seen.len() < n_calls {
        match tokio::time::timeout_at(deadline, agents.seen.recv()).await {
            Ok(Some(s)) if s.n >= first && s.n < first + n_calls => {
                seen.insert(s.n, s);
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    out.missing_pops = n_calls - seen.len();
    let rss_peak = daemon.rss_kib();
    if rss_peak > 0 && rss_idle_kib > 0 {
        out.kib_per_call = Some((rss_peak as f64 - rss_idle_kib as f64) / n_calls as f64);
    }
    {
        let times = times.lock().expect("times lock");
        for s in seen.values() {
            if let Some(t) = times.get(&s.n) {
                out.pop.push(s.at.saturating_duration_since(t.t0));
            }
        }
    }
    // The answers, paced like the arrivals.
    let t_reply = Instant::now();
    let mut order: Vec<&Seen> = seen.values().collect();
    order.sort_by_key(|s| s.n);
    for (j, s) in order.iter().enumerate() {
        tokio::time::sleep_until((t_reply + interval * j as u32).into()).await;
        let msg = OutgoingMessage::chat(s.from.clone(), "1", s.thread.clone());
        let _ = agents.answer[s.agent].send((msg, agents.sent.clone(), s.n));
    }
    // Every E.
    let deadline = Instant::now() + WAIT * 2;
    loop {
        let done = {
            let times = times.lock().expect("times lock");
            seen.keys()
                .filter(|n| times.get(n).is_some_and(|t| t.e_at.is_some()))
                .count()
        };
        if done == seen.len() || Instant::now() > deadline {
            out.missing_e = seen.len() - done;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.wall = t_start.elapsed();
    out.cpu_daemon = cpu(Some(daemon.pid())).saturating_sub(d0);
    out.cpu_prosody = cpu(prosody_pid).saturating_sub(p0);
    out.cpu_bench = cpu(Some(own)).saturating_sub(b0);
    {
        let times = times.lock().expect("times lock");
        let sent = agents.sent.lock().expect("sent lock");
        for n in seen.keys() {
            if let (Some(t), Some(s)) = (times.get(n), sent.get(n))
                && let Some(e) = t.e_at
            {
                out.reply.push(e.saturating_duration_since(*s));
            }
        }
    }
    let _ = close_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    // Confirmations and the daemon's clean-up of the closed calls.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while agents.seen.try_recv().is_ok() {}
    out
}

/// Asterisk's side of one call on a socket, as lightly as possible: answer
/// `P` and `G` at once, note when the `E` comes, close when told.
async fn light_call(
    addr: &str,
    profile: &str,
    n: usize,
    times: Arc<Mutex<HashMap<usize, CallTimes>>>,
    mut close: watch::Receiver<bool>,
) {
    let t0 = Instant::now();
    times
        .lock()
        .expect("times lock")
        .insert(n, CallTimes { t0, e_at: None });
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        eprintln!("call #{n}: connect failed");
        return;
    };
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    let params = format!("ivr://{addr},{profile},n={n}");
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = close.changed() => return,
        };
        let Ok(Some(line)) = line else { return };
        let answer = if let Some(name) = line.strip_prefix("G,") {
            let value = VARS
                .iter()
                .find(|(k, _)| *k == name)
                .map_or("", |(_, v)| *v);
            Some(format!("G,{},{name}={value}\n", unix_time()))
        } else if line.starts_with("P,") {
            Some(format!("P,{},{params}\n", unix_time()))
        } else {
            None
        };
        if let Some(a) = answer
            && write.write_all(a.as_bytes()).await.is_err()
        {
            return;
        }
        if line.starts_with("E,") || line.starts_with("H,") {
            let at = Instant::now();
            if let Some(t) = times.lock().expect("times lock").get_mut(&n) {
                t.e_at = Some(at);
            }
            // Asterisk closes its end at once after E.
            return;
        }
    }
}
