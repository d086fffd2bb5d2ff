//! The XMPP side: log in, receive messages and presence, send IMs, close.
//!
//! A shell starts a session with [`spawn`] the moment the call core says
//! `Output::Connect`; the login runs in its own task beside the call. The
//! shell then polls [`Session::recv`] in its select loop and feeds the
//! events to the core ([`XmppEvent::into_input`]), hands `Output::Send` to
//! [`Session::send`], and on `Output::Done` awaits [`Session::close`].
//!
//! One session is one login attempt: a failure (or, later, a broken link)
//! is reported once as `XmppStatus::Failed(cause)` and the session ends.
//! There are no background reconnects.
//!
//! Logging: this module logs at `debug` and never the secret. Do not enable
//! `trace` for the `tokio_xmpp` target: at that level it logs the raw
//! stream, SASL exchange included.

mod ended;
mod error;
mod login;
mod session;
mod software;
mod stanza;
mod survey;
mod tls;
mod transport;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::call::{IncomingMessage, Input, OutgoingMessage};
pub use crate::call::{IncomingPresence, RosterItem, Show, XmppStatus};
use crate::config::{Account, Profile};
pub use error::{Phase, XmppError};
pub use login::{Connection, LoginTimings, login};
pub use software::Software;
pub use survey::{ContactState, survey};

/// What a session reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmppEvent {
    /// `Online` once logged in, or `Failed(cause)` once; after a failure
    /// nothing more comes.
    Status(XmppStatus),
    Message(IncomingMessage),
    Presence(IncomingPresence),
    /// The roster, once after login (only when there are contacts).
    Roster(Vec<RosterItem>),
    /// One roster entry changed (a contact accepted our request …).
    RosterUpdate(RosterItem),
    /// We are in this room, seeing real JIDs or not.
    Joined(String, crate::call::RealJids),
    /// Joining this room failed, for this reason.
    RoomFailed(String, String),
    /// (Only with contacts or rooms.) The server has handled our initial
    /// presence and room joins, this
    /// long after they went out: the contacts' presence it sends at once
    /// (prosody, for its own users) has come; a server that asks each
    /// contact in turn (ejabberd) may still be answering. How long it took
    /// is how busy the server is.
    Settled(std::time::Duration),
    /// The link broke before the server was known to have these messages
    /// (sent with [`Session::send_tagged`], with their tags, oldest
    /// first); comes just before `Status(Failed)`. Only with a keepalive.
    Unconfirmed(Vec<(u64, OutgoingMessage)>),
    /// The storage's answer to [`Session::recall`] for this agent: the
    /// last call that popped them and ended, or why it could not say.
    Recalled(String, Result<Option<crate::claim::Ended>, String>),
}

impl XmppEvent {
    /// The call core's view of this event.
    pub fn into_input(self) -> Option<Input> {
        match self {
            XmppEvent::Status(s) => Some(Input::Xmpp(s)),
            XmppEvent::Message(m) => Some(Input::Message(m)),
            XmppEvent::Presence(p) => Some(Input::Presence(p)),
            XmppEvent::Roster(items) => Some(Input::Roster(items)),
            XmppEvent::Settled(took) => Some(Input::Settled(took)),
            XmppEvent::RosterUpdate(_) | XmppEvent::Unconfirmed(_) | XmppEvent::Recalled(..) => {
                None
            }
            XmppEvent::Joined(room, jids) => Some(Input::Joined(room, jids)),
            XmppEvent::RoomFailed(room, cause) => Some(Input::RoomFailed(room, cause)),
        }
    }
}

/// What a session does besides logging in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Bare JIDs whose presence we want: the session fetches the roster,
    /// asks these contacts for a subscription when it has none, and
    /// accepts their own requests.
    pub contacts: Vec<String>,
    /// Group chat rooms to join: (room bare JID, our nick).
    pub rooms: Vec<(String, String)>,
    /// Send a XEP-0199 ping this often and take the link as dead when
    /// nothing at all came back within one more interval, plus the time
    /// the server needs to read what was queued ahead of the ping at the
    /// slowest rate a stock server shapes a client to; or when a write
    /// waits that long without the server reading a byte. Messages are
    /// followed by a ping too, whose answer shows the server has them
    /// ([`XmppEvent::Unconfirmed`]). `None`: only the stream's own idle
    /// check (a ping after 60 s of silence, dead 20 s later), enough for a
    /// per-call session.
    pub keepalive: Option<std::time::Duration>,
}

impl SessionOptions {
    /// What a call of `profile` needs.
    pub fn for_profile(profile: &Profile) -> Self {
        SessionOptions {
            contacts: profile.targets.clone(),
            rooms: profile
                .room
                .iter()
                .map(|r| (r.jid.clone(), r.nick.clone()))
                .collect(),
            keepalive: None,
        }
    }
}

/// Events are few per call; the bound only matters if a shell stops
/// reading, and then the session waits instead of buffering without end.
const EVENT_QUEUE: usize = 64;

/// A running session. Dropping it also ends the session, but in the
/// background; [`Session::close`] waits until it is over.
#[derive(Debug)]
pub struct Session {
    cmds: mpsc::UnboundedSender<session::Cmd>,
    events: mpsc::Receiver<XmppEvent>,
    task: JoinHandle<()>,
}

/// Start logging in as `account` in a background task. Must be called
/// inside a tokio runtime.
pub fn spawn(account: Account, options: SessionOptions) -> Session {
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let task = tokio::spawn(session::run(account, options, cmd_rx, event_tx));
    Session {
        cmds: cmd_tx,
        events: event_rx,
        task,
    }
}

impl Session {
    /// Queue an IM. Never blocks. Sent once online (queued during login);
    /// silently dropped if the session has ended (the shell has seen the
    /// `Failed` status by then).
    pub fn send(&self, msg: OutgoingMessage) {
        let _ = self.send_tagged(msg, 0);
    }

    /// [`Session::send`], with a tag that [`XmppEvent::Unconfirmed`] gives
    /// back if the link breaks before the server is known to have it.
    /// Gives the message back if the session has ended.
    pub fn send_tagged(&self, msg: OutgoingMessage, tag: u64) -> Result<(), OutgoingMessage> {
        match self.cmds.send(session::Cmd::Send(msg, tag)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(session::Cmd::Send(msg, _))) => Err(msg),
            Err(_) => unreachable!("a message was sent"),
        }
    }

    /// Change our presence: available, with this status text.
    pub fn set_presence(&self, status: Option<String>) {
        let _ = self.cmds.send(session::Cmd::Presence(status));
    }

    /// Tell the account's other sessions about this call, in our
    /// presence (available, with this status text). Sent in order with
    /// the messages: an announcement queued before a pop reaches every
    /// other session before the pop can be answered.
    pub fn announce(&self, status: Option<String>, a: crate::call::Announcement) {
        let _ = self.cmds.send(session::Cmd::Announce(status, a));
    }

    /// Leave `ended` in the account's private storage as the last call
    /// that popped `agent` and ended, for the account's next sessions. Sent in order
    /// with the messages and presence.
    pub fn remember(&self, agent: &str, ended: crate::claim::Ended) {
        let _ = self
            .cmds
            .send(session::Cmd::Remember(agent.to_string(), ended));
    }

    /// Ask the account's private storage for the last call that popped
    /// `agent` and ended; the answer comes as [`XmppEvent::Recalled`].
    pub fn recall(&self, agent: &str) {
        let _ = self.cmds.send(session::Cmd::Recall(agent.to_string()));
    }

    /// The next event; `None` once the session has ended. Cancel-safe, so
    /// it can sit in a `select!`.
    pub async fn recv(&mut self) -> Option<XmppEvent> {
        self.events.recv().await
    }

    /// End the session: abandons a login in progress, or sends what is
    /// queued and closes the stream, waiting for the server to close it too
    /// (bounded by a few tens of milliseconds). Returns when the task is
    /// gone.
    pub async fn close(self) {
        let Session {
            cmds,
            events,
            mut task,
        } = self;
        let _ = cmds.send(session::Cmd::Close);
        // The task may be waiting to hand us an event; let it go.
        drop(events);
        // The task bounds its close itself; the margin is for what it
        // still had to send before it.
        let bound = session::CLOSE_TIMEOUT + std::time::Duration::from_millis(10);
        if tokio::time::timeout(bound, &mut task).await.is_err() {
            task.abort();
        }
    }
}
