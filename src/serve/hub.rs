//! One XMPP account shared by all the calls that use it: a task that keeps
//! one session logged in (reconnecting with backoff when it drops), routes
//! each incoming message to the call it answers ([`Router`]) and tells the
//! calls how the link stands.
//!
//! The calls see the same inputs as with a session of their own: `Online`
//! once the link is up (at once if it already is, followed by the
//! presence seen so far), `Failed(cause)` while it is down, `Online` again
//! after a reconnect. A call that arrives during an outage still gets its
//! hold audio and, at its timeout, its default action; if the link comes
//! back in time it still pops.
//!
//! `xmpp::spawn` is one login attempt with no reconnects of its own; this
//! loop around it is the daemon's reconnect logic.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use super::router::{Route, Router};
use crate::call::{IncomingPresence, Input, OutgoingMessage, RosterItem, XmppStatus};
use crate::config::Account;
use crate::logging::Logger;
use crate::run::Link;
use crate::xmpp::{self, SessionOptions, Show, XmppEvent};

/// First wait before a reconnect; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_millis(500);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// XMPP inputs queued for one call. A call that falls this far behind
/// loses the surplus (logged), never the hub's time.
const CALL_QUEUE: usize = 64;

enum Cmd {
    /// A call, whether its messages stand alone (not interactive), and
    /// its queue.
    Open(u64, bool, mpsc::Sender<ToCall>),
    Send(u64, OutgoingMessage),
    Decided(u64, String),
    /// The call is over for these agents (`Link::answers_may_follow`).
    Over(u64, Vec<String>, Duration),
    Close(u64),
    /// New settings (after a reload); a change logs in again.
    Account(Box<Account>, SessionOptions),
    Shutdown,
}

/// What the hub hands a call.
enum ToCall {
    One(Input),
    /// A new call's catching up (online, roster, presence, rooms): as one
    /// item, however many contacts there are.
    Batch(Vec<Input>),
}

/// A handle on a hub task. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    name: String,
    cmds: mpsc::UnboundedSender<Cmd>,
}

/// The task itself, for the shutdown.
pub struct HubTask(JoinHandle<()>);

impl Hub {
    /// Start the hub of `account`: it logs in at once. `options` are what
    /// all the profiles using the account need (their targets, rooms).
    pub fn spawn(
        account: Account,
        options: SessionOptions,
        prefix: &str,
        log: Logger,
    ) -> (Hub, HubTask) {
        let (tx, rx) = mpsc::unbounded_channel();
        let name = account.name.clone();
        let state = State {
            log: log.with_prefix(format!("popivr[xmpp {}]", account.name)),
            fingerprint: fingerprint(&account, &options),
            account,
            options,
            router: Router::new(prefix),
            calls: HashMap::new(),
            standalone: HashSet::new(),
            unsent: Vec::new(),
            link: LinkState::Connecting,
            session: None,
            seen: Seen::default(),
            backoff: BACKOFF_MIN,
            retry_at: None,
        };
        let task = tokio::spawn(state.run(rx));
        (Hub { name, cmds: tx }, HubTask(task))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Use these settings from now on (a reload). A changed account or
    /// new contacts and rooms log in again; the calls see the link drop
    /// and come back.
    pub fn reconfigure(&self, account: Account, options: SessionOptions) {
        let _ = self.cmds.send(Cmd::Account(Box::new(account), options));
    }

    /// The link for call number `n`. `standalone`: the call's messages
    /// need no answer (`notify`, `route`, `missed`), so one the link lost
    /// is still worth sending once the call is over.
    pub fn link(&self, n: u64, standalone: bool) -> HubLink {
        let (tx, rx) = mpsc::channel(CALL_QUEUE);
        HubLink {
            hub: self.clone(),
            n,
            standalone,
            tx: Some(tx),
            rx,
            batch: VecDeque::new(),
            opened: false,
        }
    }

    /// Log out (stream end) and stop; waits for the task.
    pub async fn shutdown(&self, task: HubTask) {
        let _ = self.cmds.send(Cmd::Shutdown);
        let mut handle = task.0;
        if tokio::time::timeout(Duration::from_secs(2), &mut handle)
            .await
            .is_err()
        {
            handle.abort();
        }
    }

    fn cmd(&self, cmd: Cmd) {
        // The hub outlives its calls; after a shutdown nothing matters.
        let _ = self.cmds.send(cmd);
    }
}

/// One call's side of a hub.
pub struct HubLink {
    hub: Hub,
    n: u64,
    standalone: bool,
    /// Handed to the hub on `connect`.
    tx: Option<mpsc::Sender<ToCall>>,
    rx: mpsc::Receiver<ToCall>,
    /// The rest of a batch.
    batch: VecDeque<Input>,
    opened: bool,
}

impl Link for HubLink {
    fn connect(&mut self, _log: &Logger) {
        if let Some(tx) = self.tx.take() {
            self.opened = true;
            self.hub.cmd(Cmd::Open(self.n, self.standalone, tx));
        }
    }

    fn send(&mut self, msg: OutgoingMessage, _log: &Logger) {
        self.hub.cmd(Cmd::Send(self.n, msg));
    }

    fn decided(&mut self, outcome: &str) {
        self.hub.cmd(Cmd::Decided(self.n, outcome.to_string()));
    }

    fn answers_may_follow(&mut self, agents: Vec<String>, window: Duration) {
        if self.opened {
            self.hub.cmd(Cmd::Over(self.n, agents, window));
        }
    }

    async fn recv(&mut self) -> Input {
        loop {
            if let Some(input) = self.batch.pop_front() {
                return input;
            }
            match self.rx.recv().await {
                Some(ToCall::One(input)) => return input,
                Some(ToCall::Batch(inputs)) => self.batch.extend(inputs),
                // The hub is gone (shutdown): nothing more will come.
                None => return std::future::pending().await,
            }
        }
    }

    async fn close(self) {
        if self.opened {
            self.hub.cmd(Cmd::Close(self.n));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum LinkState {
    /// The first login is under way: calls wait for its outcome.
    Connecting,
    Up,
    /// Down for this reason; a new attempt is due at `retry_at` or running.
    Down(String),
}

struct State {
    log: Logger,
    account: Account,
    options: SessionOptions,
    fingerprint: String,
    router: Router,
    calls: HashMap<u64, mpsc::Sender<ToCall>>,
    /// Open calls whose messages stand alone.
    standalone: HashSet<u64>,
    /// Messages a broken link may have lost, to send again once back.
    unsent: Vec<(u64, OutgoingMessage)>,
    link: LinkState,
    session: Option<xmpp::Session>,
    seen: Seen,
    backoff: Duration,
    retry_at: Option<Instant>,
}

/// What the session told since it came online, for calls that start
/// later: a per-call session hears the roster, the presence of every
/// contact (unavailable ones included) and the room joins right after its
/// login, and the call core waits for them before it pops.
#[derive(Debug, Default)]
struct Seen {
    roster: Option<Vec<RosterItem>>,
    /// By bare JID, then full JID: the available resources, or one
    /// unavailable presence once none is left.
    presence: BTreeMap<String, BTreeMap<String, IncomingPresence>>,
    /// Rooms joined (`None`) or not (`Some(cause)`).
    rooms: BTreeMap<String, Result<crate::call::RealJids, String>>,
    /// The server had handled the login's presence, this long after.
    settled: Option<Duration>,
}

impl Seen {
    fn presence(&mut self, p: &IncomingPresence) {
        let resources = self.presence.entry(p.from_bare.clone()).or_default();
        if p.show == Show::Unavailable {
            resources.remove(&p.from_full);
            if resources.values().all(|r| r.show == Show::Unavailable) {
                resources.clear();
                resources.insert(p.from_full.clone(), p.clone());
            }
        } else {
            resources.retain(|_, r| r.show != Show::Unavailable);
            resources.insert(p.from_full.clone(), p.clone());
        }
    }

    fn roster_update(&mut self, item: RosterItem) {
        let roster = self.roster.get_or_insert_with(Vec::new);
        match roster.iter_mut().find(|i| i.jid == item.jid) {
            Some(old) => *old = item,
            None => roster.push(item),
        }
    }

    /// The inputs that bring a new call up to date, in the order a fresh
    /// session reports them.
    fn replay(&self) -> Vec<Input> {
        let mut out = Vec::new();
        if let Some(roster) = &self.roster {
            out.push(Input::Roster(roster.clone()));
        }
        for resources in self.presence.values() {
            out.extend(resources.values().cloned().map(Input::Presence));
        }
        for (room, joined) in &self.rooms {
            out.push(match joined {
                Ok(jids) => Input::Joined(room.clone(), *jids),
                Err(cause) => Input::RoomFailed(room.clone(), cause.clone()),
            });
        }
        out.extend(self.settled.map(Input::Settled));
        out
    }
}

impl State {
    async fn run(mut self, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
        self.session = Some(self.login());
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Shutdown) | None => break,
                    Some(cmd) => self.on_cmd(cmd).await,
                },
                event = recv(&mut self.session) => match event {
                    Some(event) => self.on_event(event),
                    None => self.lost("the session ended".into()),
                },
                _ = sleep(self.retry_at), if self.session.is_none() => {
                    self.retry_at = None;
                    self.log.info("logging in again");
                    self.session = Some(self.login());
                }
            }
        }
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }

    async fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open(n, standalone, tx) => {
                self.router.open(n);
                if standalone {
                    self.standalone.insert(n);
                }
                match &self.link {
                    LinkState::Connecting => {}
                    LinkState::Up => {
                        let mut batch = vec![Input::Xmpp(XmppStatus::Online)];
                        batch.extend(self.seen.replay());
                        let _ = tx.try_send(ToCall::Batch(batch));
                    }
                    LinkState::Down(cause) => {
                        let failed = Input::Xmpp(XmppStatus::Failed(cause.clone()));
                        let _ = tx.try_send(ToCall::One(failed));
                    }
                }
                self.calls.insert(n, tx);
            }
            Cmd::Send(n, msg) => {
                let first = !self.router.wrote_to(n, &msg.to);
                self.router.sent(n, &msg);
                let tag = Tag::new(n, first, self.standalone.contains(&n));
                match (&self.session, &self.link) {
                    (Some(session), LinkState::Up) => {
                        // The session just ended: its failure is on its way.
                        if let Err(msg) = session.send_tagged(msg, tag.0) {
                            self.unsent.push((tag.0, msg));
                        }
                    }
                    _ => self.log.warn(&format!(
                        "popivr[{}]: IM to {} not sent: the XMPP link is down",
                        self.router.id(n),
                        msg.to
                    )),
                }
            }
            Cmd::Decided(n, outcome) => self.router.decided(n, &outcome),
            Cmd::Over(n, agents, window) => {
                let now = crate::run::wall_ms();
                self.router.answers_may_follow(n, agents, now, window)
            }
            Cmd::Close(n) => {
                self.router.close(n);
                self.calls.remove(&n);
                self.standalone.remove(&n);
            }
            Cmd::Account(account, options) => {
                let print = fingerprint(&account, &options);
                if print == self.fingerprint {
                    return;
                }
                self.log
                    .info("account settings changed: logging in again with them");
                self.account = *account;
                self.options = options;
                self.fingerprint = print;
                self.seen = Seen::default();
                if let Some(session) = self.session.take() {
                    session.close().await;
                }
                self.broadcast_status(XmppStatus::Failed(
                    "logging in again with new settings".into(),
                ));
                self.link = LinkState::Down("logging in again with new settings".into());
                self.backoff = BACKOFF_MIN;
                self.retry_at = Some(Instant::now());
            }
            Cmd::Shutdown => {}
        }
    }

    fn on_event(&mut self, event: XmppEvent) {
        match event {
            XmppEvent::Status(XmppStatus::Online) => {
                self.log.info(&format!(
                    "online as {}; {} call(s) told",
                    self.account.username,
                    self.calls.len()
                ));
                self.link = LinkState::Up;
                self.backoff = BACKOFF_MIN;
                self.broadcast_status(XmppStatus::Online);
                self.send_again();
            }
            // Older than any message the ended session refused since.
            XmppEvent::Unconfirmed(messages) => drop(self.unsent.splice(0..0, messages)),
            // The router remembers the calls that are over itself.
            XmppEvent::Recalled(..) => {}
            XmppEvent::Settled(took) => {
                self.seen.settled = Some(took);
                self.broadcast(XmppEvent::Settled(took));
            }
            XmppEvent::Status(XmppStatus::Failed(cause)) => self.lost(cause),
            XmppEvent::Message(msg) => match self.router.route(msg, crate::run::wall_ms()) {
                Route::Deliver(n, msg) => match self.calls.get(&n) {
                    Some(tx) => {
                        if tx.try_send(ToCall::One(Input::Message(msg))).is_err() {
                            self.log.warn(&format!(
                                "popivr[{}]: reply dropped: the call is not keeping up",
                                self.router.id(n)
                            ));
                        }
                    }
                    None => self.log.debug(&format!(
                        "reply for call {} dropped: the call is gone",
                        self.router.id(n)
                    )),
                },
                Route::Answer(msg) => {
                    if let Some(session) = &self.session {
                        session.send(msg);
                    }
                }
                Route::Ignore(why) => self.log.debug(&format!("message ignored: {why}")),
            },
            XmppEvent::Presence(p) => {
                self.seen.presence(&p);
                self.broadcast(XmppEvent::Presence(p));
            }
            XmppEvent::Roster(items) => {
                self.seen.roster = Some(items.clone());
                self.broadcast(XmppEvent::Roster(items));
            }
            XmppEvent::RosterUpdate(item) => self.seen.roster_update(item),
            XmppEvent::Joined(room, jids) => {
                self.seen.rooms.insert(room.clone(), Ok(jids));
                self.broadcast(XmppEvent::Joined(room, jids));
            }
            XmppEvent::RoomFailed(room, cause) => {
                self.seen.rooms.insert(room.clone(), Err(cause.clone()));
                self.broadcast(XmppEvent::RoomFailed(room, cause));
            }
        }
    }

    /// The session failed or ended: tell the calls, try again later.
    fn lost(&mut self, cause: String) {
        self.session = None;
        self.seen = Seen::default();
        let wait = jitter(self.backoff);
        self.log.warn(&format!(
            "XMPP link down: {cause}; logging in again in {:.1}s",
            wait.as_secs_f64()
        ));
        self.retry_at = Some(Instant::now() + wait);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        if self.link != LinkState::Down(cause.clone()) {
            self.broadcast_status(XmppStatus::Failed(cause.clone()));
        }
        self.link = LinkState::Down(cause);
    }

    /// Back online: send what the broken link may have lost, as
    /// [`resend`] decides.
    fn send_again(&mut self) {
        if self.unsent.is_empty() {
            return;
        }
        let unsent = std::mem::take(&mut self.unsent);
        let (again, dropped) = resend(unsent, |n| self.calls.contains_key(&n));
        self.log.info(&format!(
            "{} message(s) the XMPP server may not have had sent again; {} dropped \
             (pops of calls now over, and notices about them)",
            again.len(),
            dropped
        ));
        if let Some(session) = &self.session {
            for (tag, msg) in again {
                if let Err(msg) = session.send_tagged(msg, tag) {
                    self.unsent.push((tag, msg));
                }
            }
        }
    }

    fn broadcast_status(&mut self, status: XmppStatus) {
        self.broadcast(XmppEvent::Status(status));
    }

    fn broadcast(&mut self, event: XmppEvent) {
        let Some(input) = event.into_input() else {
            return;
        };
        for (n, tx) in &self.calls {
            if tx.try_send(ToCall::One(input.clone())).is_err() {
                self.log.warn(&format!(
                    "popivr[{}]: XMPP input dropped: the call is not keeping up",
                    self.router.id(*n)
                ));
            }
        }
    }
}

/// A message's tag for the session: its call, whether it was the call's
/// first message to that recipient (a pop, or a standalone notice), and
/// whether the call's messages stand alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tag(u64);

impl Tag {
    fn new(n: u64, first: bool, standalone: bool) -> Tag {
        Tag(n << 2 | u64::from(first) << 1 | u64::from(standalone))
    }
    fn call(self) -> u64 {
        self.0 >> 2
    }
    fn first(self) -> bool {
        self.0 & 2 != 0
    }
    fn standalone(self) -> bool {
        self.0 & 1 != 0
    }
}

/// Which of the messages a broken link may have lost go out again, in
/// order, and how many do not: all of a call still open (it waits for an
/// answer, and it was told the link broke); all that stand alone
/// (`notify`, `route`, `missed`); of a call that is over, only what
/// follows a pop the server had — a pop for a call that is over asks for
/// an answer nobody can give, and a notice about a pop never received
/// ("taken by …", "sent to voicemail") tells of a call the agent never saw.
fn resend(
    unsent: Vec<(u64, OutgoingMessage)>,
    open: impl Fn(u64) -> bool,
) -> (Vec<(u64, OutgoingMessage)>, usize) {
    let mut lost_pops: HashSet<(u64, String)> = HashSet::new();
    let mut again = Vec::new();
    let mut dropped = 0;
    for (raw, msg) in unsent {
        let tag = Tag(raw);
        let n = tag.call();
        if open(n) || tag.standalone() {
            again.push((raw, msg));
        } else if tag.first() || lost_pops.contains(&(n, msg.to.clone())) {
            lost_pops.insert((n, msg.to.clone()));
            dropped += 1;
        } else {
            again.push((raw, msg));
        }
    }
    (again, dropped)
}

impl State {
    fn login(&self) -> xmpp::Session {
        xmpp::spawn(self.account.clone(), self.options.clone())
    }
}

async fn recv(session: &mut Option<xmpp::Session>) -> Option<XmppEvent> {
    match session {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `wait` ± 25 %, so daemons that lost the same server do not all come
/// back in the same instant.
fn jitter(wait: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.75 + f64::from(nanos % 1000) / 2000.0;
    wait.mul_f64(factor)
}

/// Everything a login depends on, secret included (never shown: it only
/// tells whether a reload changed anything).
fn fingerprint(a: &Account, options: &SessionOptions) -> String {
    format!("{a:?}\u{0}{}\u{0}{options:?}", a.secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(full: &str, show: Show) -> IncomingPresence {
        IncomingPresence {
            from_bare: full.split('/').next().unwrap().to_string(),
            from_full: full.to_string(),
            show,
            status: None,
            muc: None,
            sibling: None,
        }
    }

    fn shows(seen: &Seen) -> Vec<(String, Show)> {
        seen.replay()
            .into_iter()
            .filter_map(|i| match i {
                Input::Presence(p) => Some((p.from_full, p.show)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_lost_pop_of_a_call_now_over_is_dropped_with_its_notice() {
        let m = |to: &str, body: &str| OutgoingMessage::chat(to, body, None);
        let unsent = vec![
            // Call 1, open: its pop goes again.
            (Tag::new(1, true, false).0, m("a@x", "pop 1")),
            // Call 2, over: its pop to a@x was lost, so is the notice; b@x
            // had its pop, so its notice goes.
            (Tag::new(2, true, false).0, m("a@x", "pop 2")),
            (Tag::new(2, false, false).0, m("a@x", "2: taken by b@x")),
            (Tag::new(2, false, false).0, m("b@x", "2: sent to desk")),
            // Call 3, over, a missed-call notice: it stands alone.
            (Tag::new(3, true, true).0, m("a@x", "missed 3")),
        ];
        let (again, dropped) = resend(unsent, |n| n == 1);
        let bodies: Vec<&str> = again.iter().map(|(_, m)| m.body.as_str()).collect();
        assert_eq!(bodies, ["pop 1", "2: sent to desk", "missed 3"]);
        assert_eq!(dropped, 2);
        // The tags go again unchanged, for the next break.
        assert_eq!(again[0].0, Tag::new(1, true, false).0);
    }

    #[test]
    fn late_calls_hear_every_contact_once_offline_ones_included() {
        let mut seen = Seen::default();
        seen.presence(&presence("a@x/desk", Show::Online));
        seen.presence(&presence("a@x/phone", Show::Away));
        seen.presence(&presence("b@x", Show::Unavailable));
        seen.presence(&presence("a@x/desk", Show::Unavailable));
        assert_eq!(
            shows(&seen),
            [
                ("a@x/phone".to_string(), Show::Away),
                ("b@x".to_string(), Show::Unavailable)
            ]
        );
        // The last resource leaving leaves one unavailable presence, and a
        // new one replaces it: resources that come and go pile up nowhere.
        seen.presence(&presence("a@x/phone", Show::Unavailable));
        seen.presence(&presence("b@x/r1", Show::Online));
        seen.presence(&presence("b@x/r1", Show::Unavailable));
        seen.presence(&presence("b@x/r2", Show::Dnd));
        assert_eq!(
            shows(&seen),
            [
                ("a@x/phone".to_string(), Show::Unavailable),
                ("b@x/r2".to_string(), Show::Dnd)
            ]
        );
    }

    #[test]
    fn the_roster_is_replayed_first_with_its_updates() {
        let item = |jid: &str, subscribed| RosterItem {
            jid: jid.to_string(),
            subscribed,
            asked: !subscribed,
        };
        let mut seen = Seen {
            roster: Some(vec![item("a@x", false)]),
            ..Seen::default()
        };
        seen.roster_update(item("a@x", true));
        seen.roster_update(item("b@x", false));
        seen.rooms
            .insert("room@muc.x".into(), Ok(crate::call::RealJids::Shown));
        seen.presence(&presence("a@x/desk", Show::Online));
        let replay = seen.replay();
        assert_eq!(
            replay[0],
            Input::Roster(vec![item("a@x", true), item("b@x", false)])
        );
        assert!(matches!(replay[1], Input::Presence(_)));
        assert_eq!(
            replay[2],
            Input::Joined("room@muc.x".into(), crate::call::RealJids::Shown)
        );
    }

    #[test]
    fn jitter_stays_within_a_quarter() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(4));
            assert!(
                d >= Duration::from_secs(3) && d <= Duration::from_secs(5),
                "{d:?}"
            );
        }
    }
}
