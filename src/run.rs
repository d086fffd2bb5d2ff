//! The call driver every shell shares: one [`Call`], Asterisk's line
//! protocol on any reader/writer pair (stdin/stdout for a per-call process,
//! a TCP socket under `popivr serve`) and an XMPP [`Link`]. It decides
//! nothing; it carries inputs to the call and its outputs to the world.
//!
//! [`run_call`] is the per-call shell: stdin/stdout, its own XMPP session,
//! signals end it. `serve` drives each connection with [`drive`] and a
//! link into its shared session.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncBufRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};

use crate::call::{
    Call, IncomingMessage, Input, OutgoingMessage, Output, Show, TimerId, XmppStatus,
};
use crate::claim::{Claim, Claims, Ended};
use crate::config::{Account, Agent, Config, Profile};
use crate::eivr::{self, Answers, CommandWriter, EventLine, LineReader};
use crate::logging::Logger;
use crate::xmpp;

/// Events read ahead of the call. The reader waits when the call is this
/// far behind, which never lasts: the call itself never waits for a write.
const EVENT_QUEUE: usize = 32;

/// Once Asterisk's side is closed, how long the events it sent before
/// closing may take to come through the reader.
const LAST_WORDS: Duration = Duration::from_millis(200);

/// A command write that takes longer means Asterisk stopped reading: the
/// call is over. Asterisk reads between audio frames, so a healthy channel
/// never comes near this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Malformed event lines logged per call; the rest are only counted.
const MALFORMED_LOGGED: usize = 5;

/// How long a reply waits for the private storage's answer about its
/// sender ([`Claim::Wait`]). The read goes out right after the pop and
/// both stock servers answer it within milliseconds, long before a person
/// replies; a server that lets a reply wait this long is treated like one
/// without the storage, so the reply is not left to the call's timeout.
const RECALL_PATIENCE: Duration = Duration::from_secs(2);

/// Run one call on stdin/stdout until it is over. Returns once the call is
/// done; the caller exits the process.
pub async fn run_call(setup: CallSetup, log: Logger) -> Result<()> {
    let id = call_id();
    let log = log.with_prefix(format!("popivr[{id}]"));
    let CallSetup {
        profile,
        account,
        agents,
        args,
    } = setup;
    let options = xmpp::SessionOptions::for_profile(&profile);
    let call = Call::new(profile, id.clone(), args).with_agents(agents);
    let (stop, control) = watch::channel(Control::Run);
    // Spawned tasks run once the driver first waits, so the hold audio is
    // written before the signal handlers are even installed.
    spawn_signal_watch(stop);
    let events = LineReader::new(BufReader::new(tokio::io::stdin()));
    let link = OwnSession {
        status: account.as_ref().and_then(|a| a.statusmessage.clone()),
        account,
        options,
        session: None,
        claims: Claims::new(&id),
        held: VecDeque::new(),
        storage_failed: false,
        log: log.clone(),
    };
    let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
    let out = eivr::CommandWriter::pipe(stdout);
    let end = drive(call, Vec::new(), events, out, link, control, &log).await;
    log.debug(&format!("call over: {end}"));
    Ok(())
}

/// Everything a call needs from the configuration and its arguments.
pub struct CallSetup {
    pub profile: Arc<Profile>,
    /// The profile's account; `None` for a keys-only profile.
    pub account: Option<Account>,
    /// The `type = agent` sections, by bare JID.
    pub agents: Arc<BTreeMap<String, Agent>>,
    /// `key=value` program arguments.
    pub args: Vec<(String, String)>,
}

impl CallSetup {
    /// The setup for `profile` of `config`, with the program arguments
    /// (`key=value`; anything else is ignored).
    pub fn new(config: &Config, profile: &Profile, args: &[String]) -> Self {
        let agents = profile
            .targets
            .iter()
            .filter_map(|t| config.agents.get(t).map(|a| (t.clone(), a.clone())))
            .collect();
        CallSetup {
            profile: Arc::new(profile.clone()),
            account: match profile.uses_xmpp() {
                false => None,
                true => config.account_for(profile).cloned(),
            },
            agents: Arc::new(agents),
            args: parse_args(args),
        }
    }
}

/// The `key=value` program arguments; anything else is ignored.
pub fn parse_args(args: &[String]) -> Vec<(String, String)> {
    args.iter()
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect()
}

/// What a shell tells a running call from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Run,
    /// Take the default action now (or leave a playing prompt now): the
    /// shell is shutting down and the call's own timers are too far off.
    Expire,
    /// Stop at once without another word to Asterisk.
    Stop(&'static str),
}

/// Why [`drive`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The call core said so (`E`/`H` answered, hangup, input closed).
    Done,
    /// Asterisk can no longer be written to.
    Unwritable,
    /// [`Control::Stop`].
    Stopped(&'static str),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::Done => f.write_str("done"),
            End::Unwritable => f.write_str("Asterisk's side is closed"),
            End::Stopped(why) => write!(f, "stopped ({why})"),
        }
    }
}

/// The XMPP side of one call, as the driver uses it.
pub trait Link: Send {
    /// `Output::Connect`: start, or join, the XMPP session.
    fn connect(&mut self, log: &Logger);
    /// `Output::Send`.
    fn send(&mut self, msg: OutgoingMessage, log: &Logger);
    /// The call has taken its action (described by `outcome`).
    fn decided(&mut self, _outcome: &str) {}
    /// The call is over for these agents (`Call::asked`, never empty): it
    /// took its action or, if it never did, ended. Answers they wrote for
    /// it may still come within `window` (never zero). Called at most
    /// once.
    fn answers_may_follow(&mut self, _agents: Vec<String>, _window: Duration) {}
    /// The next XMPP input for the call; pends for ever when none can come.
    /// Must be cancel-safe: it sits in a `select!`.
    fn recv(&mut self) -> impl Future<Output = Input> + Send;
    /// The call is over.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Run `call` to its end: its first outputs (the hold audio) go out before
/// anything else starts, then events from `events`, XMPP inputs from
/// `link`, timers and `control` are fed to it in turn. `early` are events
/// read before the call existed; they are handed to it right after its
/// start.
pub async fn drive<R, L>(
    mut call: Call,
    early: Vec<EventLine>,
    events: LineReader<R>,
    mut out: CommandWriter,
    link: L,
    mut control: watch::Receiver<Control>,
    log: &Logger,
) -> End
where
    R: AsyncBufRead + Unpin + Send + 'static,
    L: Link,
{
    let mut shell = Shell {
        log,
        timers: HashMap::new(),
        link,
        decided: false,
    };
    // Audio first: the hold commands go out before anything else is started.
    let first = call.start();
    if let Err(end) = shell.apply(&call, first, &out) {
        shell.link.close().await;
        return end;
    }
    let (tx, mut rx) = mpsc::channel(EVENT_QUEUE);
    let reader = tokio::spawn(read_events(events, tx, out.answers(), log.clone()));
    let mut pending: Vec<Input> = early.into_iter().map(Input::Event).collect();
    let mut control_open = true;
    let end = 'call: loop {
        for input in pending.drain(..) {
            let outputs = call.handle(input);
            if let Err(end) = shell.apply(&call, outputs, &out) {
                break 'call end;
            }
            if call.is_done() {
                break 'call End::Done;
            }
        }
        let next_timer = shell
            .timers
            .iter()
            .min_by_key(|(_, at)| **at)
            .map(|(id, at)| (*id, *at));
        tokio::select! {
            biased;
            why = out.stopped() => {
                // Asterisk may have answered the call's last command and
                // closed before a wake-up line of the writer's met the
                // closed socket: what it said before closing still counts.
                let deadline = Instant::now() + LAST_WORDS;
                while let Ok(Some(event)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                    let outputs = call.handle(event);
                    let _ = shell.apply(&call, outputs, &out);
                    if call.is_done() {
                        break 'call End::Done;
                    }
                }
                shell.log.info(&format!("Asterisk's side is closed ({why}); ending the call"));
                break 'call End::Unwritable;
            }
            input = shell.link.recv() => pending.push(input),
            event = rx.recv() => pending.push(event.unwrap_or(Input::Closed)),
            _ = sleep(next_timer.map(|(_, at)| at)) => {
                let id = next_timer.expect("a timer fired").0;
                shell.timers.remove(&id);
                pending.push(Input::Timer(id));
            }
            changed = control.changed(), if control_open => {
                if changed.is_err() {
                    control_open = false;
                    continue;
                }
                let now = *control.borrow_and_update();
                match now {
                    Control::Run => {}
                    Control::Stop(why) => break 'call End::Stopped(why),
                    Control::Expire => {
                        shell.log.info("shutting down: taking the default action now");
                        for id in [TimerId::Reply, TimerId::Prompt] {
                            shell.timers.remove(&id);
                            pending.push(Input::Timer(id));
                        }
                    }
                }
            }
        }
    };
    // The reader may sit in a read that never ends; it holds the input.
    reader.abort();
    if !shell.decided {
        // Over without an action of its own (the caller hung up, a stop).
        shell.over(&call);
    }
    shell.link.close().await;
    end
}

struct Shell<'a, L> {
    log: &'a Logger,
    timers: HashMap<TimerId, Instant>,
    link: L,
    /// The link has been told the call took its action.
    decided: bool,
}

impl<L: Link> Shell<'_, L> {
    /// The call is over for the agents it asked: answers they wrote for it
    /// may still come within its `late_reply` (nothing to say when that
    /// is off, or nobody was asked).
    fn over(&mut self, call: &Call) {
        let (agents, window) = (call.asked(), call.late_reply());
        if !agents.is_empty() && !window.is_zero() {
            self.link.answers_may_follow(agents, window);
        }
    }

    /// Carry out the outputs in order; the commands go to the writer as
    /// one batch at the end (it sees to it that Asterisk handles each
    /// one). `Err` once the call is over.
    fn apply(&mut self, call: &Call, outputs: Vec<Output>, out: &CommandWriter) -> Result<(), End> {
        let mut done = false;
        let mut batch = Vec::new();
        for output in outputs {
            match output {
                Output::Command(cmd) => match eivr::render(&cmd) {
                    Ok(line) => {
                        self.log.debug(&format!("> {}", line.trim_end()));
                        batch.push(line);
                    }
                    Err(e) => self.log.error(&format!("command not sent: {e}")),
                },
                Output::Connect => self.link.connect(self.log),
                Output::Send(msg) => self.link.send(msg, self.log),
                Output::SetTimer(id, after) => {
                    self.timers.insert(id, Instant::now() + after);
                }
                Output::CancelTimer(id) => {
                    self.timers.remove(&id);
                }
                Output::Log(level, text) => self.log.at(level, &text),
                Output::Done => done = true,
            }
        }
        if !self.decided
            && let Some(outcome) = call.outcome()
        {
            self.decided = true;
            // That answers may follow is stored before the account's
            // other sessions hear that it decided.
            self.over(call);
            self.link.decided(outcome);
        }
        out.send(batch);
        match done {
            true => Err(End::Done),
            false => Ok(()),
        }
    }
}

/// Drain the events on their own task, whatever the call is doing:
/// Asterisk writes events from the channel's thread, and a full pipe or
/// socket would freeze the caller's audio.
async fn read_events<R: AsyncBufRead + Unpin>(
    mut reader: LineReader<R>,
    tx: mpsc::Sender<Input>,
    answers: Answers,
    log: Logger,
) {
    let mut malformed = Malformed::default();
    loop {
        match reader.next_event().await {
            Ok(Some(Ok(event))) => {
                log.debug(&format!("< {}", event.to_wire().trim_end()));
                if answers.heard(&event.event) {
                    continue;
                }
                if tx.send(Input::Event(event)).await.is_err() {
                    return;
                }
            }
            Ok(Some(Err(e))) => malformed.skipped(&e, &log),
            Ok(None) | Err(_) => {
                let _ = tx.send(Input::Closed).await;
                return;
            }
        }
    }
}

/// Counts the malformed event lines of one call and logs the first few:
/// a peer sending garbage must not flood the log.
#[derive(Debug, Default)]
pub(crate) struct Malformed(usize);

impl Malformed {
    pub(crate) fn skipped(&mut self, e: &eivr::ParseError, log: &Logger) {
        self.0 += 1;
        if self.0 <= MALFORMED_LOGGED {
            log.warn(&format!("event line skipped: {e}"));
        }
        if self.0 == MALFORMED_LOGGED {
            log.warn("further malformed event lines are skipped silently");
        }
    }
}

async fn sleep(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The per-call link: a session of the call's own, started when the core
/// says `Connect`. It hands the call only the replies that are the
/// call's ([`Claims`]).
struct OwnSession {
    account: Option<Account>,
    /// The account's status text, for the presence that announces the call.
    status: Option<String>,
    options: xmpp::SessionOptions,
    session: Option<xmpp::Session>,
    claims: Claims,
    /// Replies that wait for the storage's answer about their sender
    /// ([`Claim::Wait`]), in the order they came, with when they came.
    held: VecDeque<(Instant, IncomingMessage)>,
    /// The storage failed once: said in the log already.
    storage_failed: bool,
    log: Logger,
}

impl OwnSession {
    fn announce(&self, a: Option<crate::call::Announcement>) {
        if let (Some(a), Some(session)) = (a, &self.session) {
            session.announce(self.status.clone(), a);
        }
    }

    /// What the claims make of `m`: the call's input, or nothing here.
    fn take(&mut self, m: IncomingMessage) -> Option<Input> {
        let from = m.from_full.clone();
        match self.claims.claim(m, wall_ms()) {
            Claim::Mine(m) => return Some(Input::Message(m)),
            Claim::Wait(m) => self.held.push_back((Instant::now(), m)),
            Claim::Answer(notice) => {
                self.log.info(&format!(
                    "reply from {from} taken by no call: told them how to answer"
                ));
                self.send(notice, &self.log.clone());
            }
            Claim::Ignore(why) => {
                self.log
                    .debug(&format!("message from {from} ignored: {why}"));
            }
        }
        None
    }

    /// The first held reply whose sender the storage has answered for.
    fn release(&mut self) -> Option<Input> {
        while let Some(at) = self
            .held
            .iter()
            .position(|(_, m)| !self.claims.recalling(&m.from_bare))
        {
            let (_, m) = self.held.remove(at).expect("a position in the queue");
            if let Some(input) = self.take(m) {
                return Some(input);
            }
        }
        None
    }

    /// When the oldest held reply has waited long enough.
    fn patience_ends(&self) -> Option<Instant> {
        self.held.front().map(|(at, _)| *at + RECALL_PATIENCE)
    }

    /// The storage kept the senders of replies that waited
    /// [`RECALL_PATIENCE`] without an answer: treat it as failed for them.
    fn give_up_recalls(&mut self) {
        let now = Instant::now();
        let late: Vec<String> = self
            .held
            .iter()
            .filter(|(at, m)| *at + RECALL_PATIENCE <= now && self.claims.recalling(&m.from_bare))
            .map(|(_, m)| m.from_bare.clone())
            .collect();
        for agent in late {
            self.warn_no_storage(&format!("no answer within {RECALL_PATIENCE:?}"));
            self.claims.recalled(&agent, None);
        }
    }

    /// Said once per call: what a missing storage answer costs.
    fn warn_no_storage(&mut self, why: &str) {
        if !std::mem::replace(&mut self.storage_failed, true) {
            self.log.warn(&format!(
                "the server keeps no private storage (XEP-0049: {why}): a late answer to a call \
                 that ended can move the next one"
            ));
        }
    }
}

impl Link for OwnSession {
    fn connect(&mut self, log: &Logger) {
        match self.account.take() {
            Some(account) => {
                let options = std::mem::take(&mut self.options);
                self.session = Some(xmpp::spawn(account, options));
            }
            None => log.error("the profile has targets but no account"),
        }
    }

    fn send(&mut self, msg: OutgoingMessage, log: &Logger) {
        // The announcement goes first: every other session of the account
        // knows of this pop before the agent can answer it. The storage is
        // read after the pop (`claim` says why).
        let first = self.claims.sending(&msg);
        let recall = first.is_some().then(|| msg.to.clone());
        self.announce(first);
        match &self.session {
            Some(session) => {
                session.send(msg);
                if let Some(agent) = recall {
                    session.recall(&agent);
                }
            }
            None => log.warn(&format!("IM to {} not sent: no XMPP session", msg.to)),
        }
    }

    fn decided(&mut self, _outcome: &str) {
        // After the call's last words to its agents, never before.
        let now = self.claims.decided();
        self.announce(now);
    }

    fn answers_may_follow(&mut self, agents: Vec<String>, window: Duration) {
        // Before the session closes: the server handles it before it
        // handles the close, and so before any later call's read.
        let Some(session) = &self.session else { return };
        let at = wall_ms();
        for agent in agents {
            let call = self.claims.call().to_string();
            session.remember(&agent, Ended { call, at, window });
        }
    }

    async fn recv(&mut self) -> Input {
        loop {
            if let Some(input) = self.release() {
                return input;
            }
            let patience = self.patience_ends();
            let Some(session) = &mut self.session else {
                return std::future::pending().await;
            };
            let event = tokio::select! {
                event = session.recv() => event,
                () = sleep(patience) => {
                    self.give_up_recalls();
                    continue;
                }
            };
            let Some(event) = event else {
                // The session task is gone: stop polling it, and let the
                // replies that waited for it through.
                self.session = None;
                self.claims.forget_recalls();
                continue;
            };
            if let xmpp::XmppEvent::Recalled(agent, ended) = event {
                let ended = ended.unwrap_or_else(|why| {
                    self.warn_no_storage(&why);
                    None
                });
                self.claims.recalled(&agent, ended);
                continue;
            }
            if let xmpp::XmppEvent::Status(XmppStatus::Failed(_)) = &event {
                self.claims.forget_recalls();
            }
            match event.into_input() {
                Some(Input::Presence(p)) if p.sibling.is_some() => {
                    let online = p.show != Show::Unavailable;
                    let said = p.sibling.flatten();
                    let again = self.claims.sibling(&p.from_full, online, said.as_ref());
                    self.announce(again);
                }
                Some(Input::Message(m)) => {
                    if let Some(input) = self.take(m) {
                        return input;
                    }
                }
                Some(input) => return input,
                None => {}
            }
        }
    }

    async fn close(self) {
        if let Some(session) = self.session {
            session.close().await;
        }
    }
}

/// Milliseconds since the Unix epoch: when a call ended, as the account's
/// other processes (maybe on other hosts) compare it.
pub(crate) fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn spawn_signal_watch(control: watch::Sender<Control>) {
    use tokio::signal::unix::{SignalKind, signal};
    tokio::spawn(async move {
        let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        let why = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
            _ = int.recv() => "SIGINT",
        };
        let _ = control.send(Control::Stop(why));
    });
}

/// A short, unique-enough id: names the call in logs and threads its pop.
fn call_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:05x}", std::process::id(), nanos & 0xfffff)
}
