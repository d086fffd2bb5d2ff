//! `popivr serve`: one daemon for many calls over `ivr://`.
//!
//! Asterisk runs `ExternalIVR(ivr://host:2949(PROFILE,args),opts)` by
//! connecting here and speaking the same line protocol as with a child
//! process, on the one socket. Each connection is one call driven by the
//! same [`crate::run::drive`] loop and call core as the per-call shell;
//! the calls of one XMPP account share one logged-in session ([`hub`]),
//! and replies are routed to the call they answer ([`router`]).
//!
//! - **Parameters first.** The profile and arguments come only from
//!   Asterisk's answer to `P`, so `P,x` is the first line we write; the
//!   call (and its hold audio) starts the moment the answer is in. Until
//!   then Asterisk's generator plays silence; the round trip is one line
//!   each way on an open socket (tens of microseconds on loopback, see
//!   `examples/serve_load.rs`). A hold file cannot go out before the
//!   answer: which one depends on the profile.
//! - **Isolation.** Each connection has its own tasks, a bounded line
//!   reader (4 KiB a line, longer ones skipped), bounded queues, and a
//!   write timeout; garbage is skipped and counted, a stalled or vanished
//!   Asterisk ends only its own call. At most `--max-calls` calls run; one
//!   more gets `E` (the dialplan goes on, `POPIVR_ACTION` unset).
//! - **Signals.** SIGTERM or SIGINT drains: the listeners close (Asterisk's
//!   next connection fails over to another address), running calls go on
//!   until they end or `--drain-timeout` passes, then they take their
//!   default action at once. A second SIGTERM cuts the wait. SIGHUP
//!   reloads the configuration for new calls; a file that does not load
//!   is reported and the running configuration kept.
//! - **systemd.** With `NOTIFY_SOCKET` set, `READY=1` is sent once the
//!   listeners are bound, `RELOADING=1`/`READY=1` around a reload and
//!   `STOPPING=1` when the drain starts (`Type=notify`).

pub mod hub;
pub mod router;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};
use tokio::time::{Instant, timeout};

use crate::call::{Call, Input, OutgoingMessage};
use crate::config::{self, Agent, Config, Mode, Profile};
use crate::eivr::{self, Command, Event, EventLine, LineReader};
use crate::logging::Logger;
use crate::run::{self, CallSetup, Control, Link};
use crate::xmpp::SessionOptions;

/// How often the daemon pings its XMPP server (XEP-0199); a link that
/// answers nothing for one more interval is taken as dead and reconnected.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);
pub use hub::{Hub, HubLink};

/// Asterisk's default port for `ivr://` (`EXTERNALIVR_PORT`).
pub const DEFAULT_PORT: u16 = 2949;
/// How long Asterisk may take to answer our `P`.
pub const PARAMS_WAIT: Duration = Duration::from_secs(5);
/// Events that arrive before the `P` answer (a key pressed during the
/// first instant) are kept for the call, up to this many.
const EARLY_EVENTS: usize = 16;
/// Read buffer per connection: events are short, and a longer line is
/// read in pieces by the line reader anyway.
const READ_BUFFER: usize = 2048;
/// After the drain's default actions: how long Asterisk gets to answer
/// the `E`/`H`s before the connections are closed.
const EXPIRE_GRACE: Duration = Duration::from_secs(5);
/// How long a refused connection gets to read our `E` and close.
const LEAVE_GRACE: Duration = Duration::from_secs(1);
/// Asterisk builds the `P` answer in a 100-byte buffer: 99 characters
/// mean it may have cut the arguments.
const P_BUFFER_FULL: usize = 99;

/// What `popivr serve` was told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Addresses to listen on; empty: `127.0.0.1:2949`, and `[::1]:2949`
    /// where IPv6 is on (this host only).
    pub listen: Vec<String>,
    pub max_calls: usize,
    pub drain_timeout: Duration,
    /// Call ids (and tags) are this prefix and a number: give each daemon
    /// sharing an account its own.
    pub id_prefix: String,
}

/// Run the daemon until SIGTERM/SIGINT and the drain are over.
pub async fn serve(opts: Options, log: Logger) -> Result<()> {
    if opts.id_prefix.len() > router::MAX_PREFIX
        || !opts.id_prefix.bytes().all(|b| b.is_ascii_lowercase())
    {
        bail!(
            "--id-prefix must be at most {} lower-case letters a-z",
            router::MAX_PREFIX
        );
    }
    let config = config::load_file(&opts.config)?;
    for w in &config.warnings {
        log.warn(w);
    }
    let listeners = bind(&opts.listen).await?;
    let daemon = Daemon::new(&opts, log.clone());
    daemon.install(&config);
    let daemon = Arc::new(daemon);

    let (control, control_rx) = watch::channel(Control::Run);
    let calls = Arc::new(Calls {
        daemon: daemon.clone(),
        control: control_rx,
        max: opts.max_calls,
        live: AtomicUsize::new(0),
        idle: Notify::new(),
        next: AtomicU64::new(1),
    });
    let mut acceptors = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr()?;
        log.info(&format!("listening on {addr}"));
        acceptors.push(tokio::spawn(calls.clone().accept(listener)));
    }
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    notify("READY=1");

    let why = loop {
        tokio::select! {
            _ = hup.recv() => {
                notify("RELOADING=1");
                daemon.reload();
                notify("READY=1");
            }
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
        }
    };

    notify("STOPPING=1");
    for acceptor in &acceptors {
        acceptor.abort();
    }
    log.info(&format!(
        "{why}: not taking calls; {} running, default action in {:?} at the latest",
        calls.running(),
        opts.drain_timeout
    ));
    let signals = async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    drain(&calls, &control, opts.drain_timeout, signals, &log).await;
    daemon.shutdown().await;
    log.info("stopped");
    Ok(())
}

/// The drain: no new calls (Asterisk tries its next address); the running
/// ones end on their own, or take their default action once `bound` has
/// passed or `again` (a second SIGTERM or SIGINT) comes, and are closed
/// if they still do not end.
async fn drain(
    calls: &Calls,
    control: &watch::Sender<Control>,
    bound: Duration,
    again: impl std::future::Future<Output = ()>,
    log: &Logger,
) {
    let expired = tokio::select! {
        _ = calls.all_done() => false,
        _ = tokio::time::sleep_until(Instant::now() + bound) => true,
        _ = again => true,
    };
    if !expired || calls.running() == 0 {
        return;
    }
    log.info(&format!(
        "{} call(s) still running: default action now",
        calls.running()
    ));
    let _ = control.send(Control::Expire);
    if timeout(EXPIRE_GRACE, calls.all_done()).await.is_err() {
        log.warn("calls still open after their default action: closing them");
        let _ = control.send(Control::Stop("shutting down"));
        // Whatever is left ends with the process.
        let _ = timeout(Duration::from_secs(1), calls.all_done()).await;
    }
}

/// The calls: started by the acceptors, counted for `--max-calls` and
/// the drain.
struct Calls {
    daemon: Arc<Daemon>,
    control: watch::Receiver<Control>,
    max: usize,
    live: AtomicUsize,
    /// Woken when the last running call ends.
    idle: Notify,
    next: AtomicU64,
}

impl Calls {
    /// Take connections on `listener`, each a call on a task of its own,
    /// spawned right here: the `P,x` goes out without another hop.
    async fn accept(self: Arc<Self>, listener: TcpListener) {
        let log = &self.daemon.log;
        loop {
            let (stream, peer) = match listener.accept().await {
                // `[::]` shows IPv4 peers v4-mapped; logs say 192.0.2.5.
                Ok((stream, peer)) => (
                    stream,
                    SocketAddr::new(peer.ip().to_canonical(), peer.port()),
                ),
                Err(e) => {
                    // Out of descriptors and the like: wait rather than spin.
                    log.warn(&format!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if self.live.fetch_add(1, Ordering::AcqRel) >= self.max {
                self.ended();
                log.warn(&format!(
                    "call from {peer} refused: {} calls running (--max-calls)",
                    self.max
                ));
                tokio::spawn(leave(stream, "popivr: busy"));
                continue;
            }
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let live = Live(self.clone());
            let control = self.control.clone();
            let daemon = self.daemon.clone();
            tokio::spawn(async move {
                daemon.connection(stream, peer, n, control, live).await;
            });
        }
    }

    fn running(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    fn ended(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }

    async fn all_done(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            // Registered before the check, so the last call cannot slip by.
            idle.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// A running call, counted while it lives.
struct Live(Arc<Calls>);

impl Drop for Live {
    fn drop(&mut self) {
        self.0.ended();
    }
}

async fn bind(addrs: &[String]) -> Result<Vec<TcpListener>> {
    if addrs.is_empty() {
        // Loopback only: the protocol has no authentication, so anything
        // further is the admin's choice (`--listen`). ::1 too where IPv6 is
        // on, for an Asterisk whose `localhost` is ::1 first.
        let v4 = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, DEFAULT_PORT))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{DEFAULT_PORT}"))?;
        let v6 = TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, DEFAULT_PORT)).await;
        return Ok(std::iter::once(v4).chain(v6.ok()).collect());
    }
    let mut out = Vec::new();
    for addr in addrs {
        let listener = TcpListener::bind(addr.as_str())
            .await
            .with_context(|| format!("cannot listen on {addr} (HOST:PORT, [V6]:PORT)"))?;
        out.push(listener);
    }
    Ok(out)
}

/// What new calls use; replaced as a whole on reload.
struct Current {
    profiles: BTreeMap<String, Arc<Prepared>>,
    hubs: BTreeMap<String, Hub>,
    /// The variables the profiles read, asked in the same write as `P`.
    prefetch: Vec<String>,
}

/// At most this many variables are read before the profile is known; a
/// profile's other reads wait for `P`'s answer.
const MAX_PREFETCH: usize = 16;

/// The variables to read with `P`, before the call's profile is known:
/// those of every profile (most read the same ones), up to
/// [`MAX_PREFETCH`]. A read another profile needed costs one `G` line.
fn prefetch<'a>(profiles: impl Iterator<Item = &'a Profile>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for name in profiles.flat_map(crate::call::reads) {
        if !names.contains(&name) && names.len() < MAX_PREFETCH {
            names.push(name);
        }
    }
    names
}

/// A profile with what every call of it shares.
struct Prepared {
    profile: Arc<Profile>,
    agents: Arc<BTreeMap<String, Agent>>,
}

struct Daemon {
    config_path: PathBuf,
    prefix: String,
    log: Logger,
    current: RwLock<Arc<Current>>,
    /// Every hub started, for the shutdown (kept across reloads).
    tasks: std::sync::Mutex<Vec<(Hub, hub::HubTask)>>,
}

impl Daemon {
    fn new(opts: &Options, log: Logger) -> Self {
        Daemon {
            config_path: opts.config.clone(),
            prefix: opts.id_prefix.clone(),
            log,
            current: RwLock::new(Arc::new(Current {
                profiles: BTreeMap::new(),
                hubs: BTreeMap::new(),
                prefetch: Vec::new(),
            })),
            tasks: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Make `config` the one new calls use: hubs for accounts new to us,
    /// new settings for the others.
    fn install(&self, config: &Config) {
        let old = self.current();
        // One session per account, with what all its profiles need.
        let mut needs: BTreeMap<&str, SessionOptions> = BTreeMap::new();
        for profile in config.profiles.values().filter(|p| p.uses_xmpp()) {
            let options = needs
                .entry(profile.account.as_str())
                .or_insert_with(|| SessionOptions {
                    // A daemon's link lives for days: notice a dead one in
                    // seconds, not the stream's 80.
                    keepalive: Some(KEEPALIVE),
                    ..SessionOptions::default()
                });
            let more = SessionOptions::for_profile(profile);
            for contact in more.contacts {
                if !options.contacts.contains(&contact) {
                    options.contacts.push(contact);
                }
            }
            for room in more.rooms {
                if !options.rooms.contains(&room) {
                    options.rooms.push(room);
                }
            }
        }
        let mut hubs = BTreeMap::new();
        for (name, options) in needs {
            let Some(account) = config.accounts.get(name) else {
                continue;
            };
            let hub = match old.hubs.get(name) {
                Some(hub) => {
                    hub.reconfigure(account.clone(), options);
                    hub.clone()
                }
                None => {
                    let (hub, task) =
                        Hub::spawn(account.clone(), options, &self.prefix, self.log.clone());
                    self.tasks
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((hub.clone(), task));
                    hub
                }
            };
            hubs.insert(account.name.clone(), hub);
        }
        let profiles = config
            .profiles
            .iter()
            .map(|(name, profile)| {
                let setup = CallSetup::new(config, profile, &[]);
                let prepared = Prepared {
                    profile: setup.profile,
                    agents: setup.agents,
                };
                (name.clone(), Arc::new(prepared))
            })
            .collect();
        let prefetch = prefetch(config.profiles.values());
        let current = Arc::new(Current {
            profiles,
            hubs,
            prefetch,
        });
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = current;
    }

    fn reload(&self) {
        match config::load_file(&self.config_path) {
            Ok(config) => {
                for w in &config.warnings {
                    self.log.warn(w);
                }
                self.install(&config);
                self.log.info(&format!(
                    "configuration reloaded: {} profile(s) for new calls",
                    config.profiles.len()
                ));
            }
            Err(e) => self.log.error(&format!(
                "configuration not reloaded, the previous one stays in use: {e}"
            )),
        }
    }

    async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for (hub, task) in tasks {
            hub.shutdown(task).await;
        }
    }

    /// One call, from the accepted connection to its end.
    async fn connection(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        n: u64,
        control: watch::Receiver<Control>,
        live: Live,
    ) {
        let id = format!("{}{n}", self.prefix);
        let log = self.log.with_prefix(format!("popivr[{id}]"));
        // Each command is one small write Asterisk acts on at once.
        let _ = stream.set_nodelay(true);
        let (rd, mut wr) = stream.into_split();
        let rd = QuickAck(rd);
        let mut events = LineReader::new(BufReader::with_capacity(READ_BUFFER, rd));
        let prefetch = self.current().prefetch.clone();
        let Some((params, early)) = greet(&mut wr, &mut events, &prefetch, peer, &log).await else {
            return;
        };
        // `ivr://host:port`, then the arguments inside the parentheses.
        let name = params.get(1).map(String::as_str).unwrap_or("");
        let current = self.current();
        let Some(prepared) = current.profiles.get(name) else {
            log.error(&format!(
                "call from {peer}: no profile [{name}]; the dialplan goes on"
            ));
            leave_halves(wr, events, "popivr: unknown profile").await;
            return;
        };
        log.info(&format!("call from {peer}, profile [{name}]"));
        let args = run::parse_args(params.get(2..).unwrap_or_default());
        let call = Call::new(prepared.profile.clone(), id, args)
            .with_agents(prepared.agents.clone())
            .with_asked(prefetch);
        let link = current
            .hubs
            .get(&prepared.profile.account)
            .map(|hub| hub.link(n, prepared.profile.mode != Mode::Interactive));
        let out = eivr::CommandWriter::socket(wr);
        let end = run::drive(call, early, events, out, link, control, &log).await;
        // Its place is free before anyone reads that it is over.
        drop(live);
        log.info(&format!("call over: {end}"));
    }
}

/// The call's first exchange: `P` and the prefetched variables asked at
/// once (their answers come right after `P`'s, one round trip sooner than
/// if they waited for the profile), then `P`'s answer read, with the
/// events before it. `None` (logged) if Asterisk hangs up or closes
/// first, or never answers.
async fn greet(
    wr: &mut OwnedWriteHalf,
    events: &mut LineReader<BufReader<QuickAck>>,
    prefetch: &[String],
    peer: SocketAddr,
    log: &Logger,
) -> Option<(Vec<String>, Vec<EventLine>)> {
    let asked = Instant::now();
    let first: Vec<Command> = std::iter::once(Command::GetParams)
        .chain(prefetch.iter().map(|n| Command::GetVars(vec![n.clone()])))
        .collect();
    if write_commands(wr, &first).await.is_err() {
        log.info(&format!("connection from {peer} closed at once"));
        return None;
    }
    let (params, early) = match timeout(PARAMS_WAIT, read_params(events, log)).await {
        Ok(Some(answer)) => answer,
        Ok(None) => {
            log.info(&format!("{peer} hung up before the call began"));
            return None;
        }
        Err(_) => {
            log.warn(&format!(
                "no answer to P from {peer} within {PARAMS_WAIT:?}: not Asterisk? closing"
            ));
            return None;
        }
    };
    if !prefetch.is_empty() && eivr::drain_after_answer(wr).await.is_err() {
        log.info(&format!("{peer} closed the connection"));
        return None;
    }
    log.debug(&format!(
        "parameters in {}us: {}",
        asked.elapsed().as_micros(),
        params.join(",")
    ));
    if params.join(",").len() == P_BUFFER_FULL {
        log.warn("the P answer fills Asterisk's 99-byte buffer: arguments may be cut");
    }
    Some((params, early))
}

/// Events up to the answer to `P`: its data, and the events before it.
/// `None` if the call ended first.
async fn read_params(
    events: &mut LineReader<BufReader<QuickAck>>,
    log: &Logger,
) -> Option<(Vec<String>, Vec<EventLine>)> {
    let mut early = Vec::new();
    let mut malformed = run::Malformed::default();
    loop {
        match events.next_event().await {
            Ok(Some(Ok(line))) => match line.event {
                Event::Params(params) => return Some((params, early)),
                Event::Hangup | Event::Exit => return None,
                _ if early.len() < EARLY_EVENTS => early.push(line),
                _ => log.debug("event before the parameters dropped"),
            },
            Ok(Some(Err(e))) => malformed.skipped(&e, log),
            Ok(None) | Err(_) => return None,
        }
    }
}

async fn write_command(out: &mut OwnedWriteHalf, cmd: &Command) -> std::io::Result<()> {
    write_commands(out, std::slice::from_ref(cmd)).await
}

/// Several commands in one write.
async fn write_commands(out: &mut OwnedWriteHalf, cmds: &[Command]) -> std::io::Result<()> {
    let mut lines = String::new();
    for cmd in cmds {
        lines.push_str(&eivr::render(cmd).map_err(std::io::Error::other)?);
    }
    timeout(run::WRITE_TIMEOUT, out.write_all(lines.as_bytes()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

/// Send Asterisk on with the dialplan (`E`) and close once it has read it.
async fn leave(stream: TcpStream, why: &str) {
    let (rd, wr) = stream.into_split();
    leave_halves(wr, LineReader::new(BufReader::new(QuickAck(rd))), why).await;
}

async fn leave_halves(mut wr: OwnedWriteHalf, events: LineReader<BufReader<QuickAck>>, why: &str) {
    if write_command(&mut wr, &Command::Exit(why.to_string()))
        .await
        .is_err()
    {
        return;
    }
    // Asterisk answers `E` and closes; closing first, with its answer
    // unread, would reset the connection under our own line.
    let mut rd = events.into_inner();
    let mut sink = [0u8; 256];
    let _ = timeout(LEAVE_GRACE, async {
        while let Ok(1..) = rd.read(&mut sink).await {}
    })
    .await;
}

/// The read side of a call's socket, ACKing what it reads at once.
///
/// Asterisk writes each event as its own small write and (as far as its
/// TCP client code shows) leaves Nagle on: the answers to several `G`s
/// come back to back, and all but the first wait for our ACK of the
/// previous one. Linux delays that ACK up to 40 ms when it has no data to
/// carry it on, and the pop waits for the last answer; measured, every pop
/// took 40 ms longer. `TCP_QUICKACK` after each read sends the ACK now
/// (Linux clears the flag by itself, hence after each read).
struct QuickAck(OwnedReadHalf);

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if matches!(result, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Best effort: failing to tune a socket is not an error.
            let _ = self.0.as_ref().set_quickack(true);
        }
        result
    }
}

/// `sd_notify`: tell systemd how we are (`Type=notify`). Without
/// `NOTIFY_SOCKET` this does nothing.
fn notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => UnixAddr::from_abstract_name(name),
        None => UnixAddr::from_pathname(&path),
    };
    if let (Ok(addr), Ok(sock)) = (addr, UnixDatagram::unbound()) {
        let _ = sock.send_to_addr(state.as_bytes(), &addr);
    }
}

/// A call whose profile has targets but whose account has no hub has no
/// XMPP: it logs that once, and its default action comes at the timeout.
impl Link for Option<HubLink> {
    fn connect(&mut self, log: &Logger) {
        match self {
            Some(link) => link.connect(log),
            None => log.error("the profile has targets but no account"),
        }
    }

    fn send(&mut self, msg: OutgoingMessage, log: &Logger) {
        if let Some(link) = self {
            link.send(msg, log);
        }
    }

    fn decided(&mut self, outcome: &str) {
        if let Some(link) = self {
            link.decided(outcome);
        }
    }

    fn answers_may_follow(&mut self, agents: Vec<String>, window: std::time::Duration) {
        if let Some(link) = self {
            link.answers_may_follow(agents, window);
        }
    }

    async fn recv(&mut self) -> Input {
        match self {
            Some(link) => link.recv().await,
            None => std::future::pending().await,
        }
    }

    async fn close(self) {
        if let Some(link) = self {
            link.close().await;
        }
    }
}
