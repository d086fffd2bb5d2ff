//! The call: a pure state machine. Inputs in, outputs out; no I/O, no clock
//! reads, no tokio. Every shell (per-call stdio, `serve`) drives the same core.

use std::time::Duration;

use crate::eivr::{Command, EventLine};

mod machine;
pub use machine::{
    CALLER_NAME, CALLER_NUM, Call, CallData, DNID, ENCODED_PREFIX, EXTEN, UNIQUEID, reads,
    room_hides_jids,
};

/// Kind of an incoming XMPP message (`type` attribute; absent = `Normal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgKind {
    Chat,
    Normal,
    Groupchat,
    Headline,
    Error,
}

/// An XMPP message as the call core sees it: plain data, already taken
/// apart by the XMPP layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingMessage {
    /// The sender's bare JID, normalised (lower-case local part and domain).
    pub from_bare: String,
    /// The sender's full JID as received.
    pub from_full: String,
    pub kind: MsgKind,
    /// The body text (`None` for a message with no body, e.g. a chat state).
    pub body: Option<String>,
    /// Carries a XEP-0203 `<delay/>` (offline storage, MUC history …).
    pub delayed: bool,
    /// Carries a forwarded payload (XEP-0280 carbon, XEP-0297 forward);
    /// such a message is never taken as the sender's own reply.
    pub forwarded: bool,
    /// XEP-0201 `<thread/>` if any.
    pub thread: Option<String>,
    /// Which of our account's sessions the sender addressed.
    pub to: Addressed,
}

/// The `to` of a message, as the session that received it sees it. A
/// server hands a message for a session that is gone (a finished call's)
/// to the account's other sessions with its `to` unchanged (RFC 6121
/// §8.5.3.2.1), so this tells a reply to this session from one written
/// for another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addressed {
    /// This session's own full JID.
    Me,
    /// The account's bare JID (or no `to` at all): every session may get it.
    Bare,
    /// Another full JID (of the account): written for another session.
    Other(String),
}

/// What a per-call session tells the account's other sessions about its
/// call, in its presence: so that each of them knows which agents the
/// others popped, and a reply that could be for several calls is taken by
/// none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The call's id (the thread of its pops, its tag).
    pub call: String,
    /// No action taken yet.
    pub waiting: bool,
    /// Bare JIDs the call popped.
    pub agents: Vec<String>,
    /// Those of them another call was waiting for too: this call takes
    /// their replies only with its thread or tag.
    pub contested: Vec<String>,
}

/// How a message is sent: to one person, or into a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutKind {
    Chat,
    Groupchat,
}

/// An IM to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Bare JID of the recipient (a room's JID for `Groupchat`).
    pub to: String,
    pub body: String,
    /// XEP-0201 thread id, so a client keeps the conversation together.
    pub thread: Option<String>,
    pub kind: OutKind,
    /// A link attached as XEP-0066 out-of-band data.
    pub url: Option<String>,
}

impl OutgoingMessage {
    pub fn chat(to: impl Into<String>, body: impl Into<String>, thread: Option<String>) -> Self {
        OutgoingMessage {
            to: to.into(),
            body: body.into(),
            thread,
            kind: OutKind::Chat,
            url: None,
        }
    }

    pub fn groupchat(room: impl Into<String>, body: impl Into<String>) -> Self {
        OutgoingMessage {
            kind: OutKind::Groupchat,
            ..OutgoingMessage::chat(room, body, None)
        }
    }
}

/// How available a contact says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// Available with no `<show/>`.
    Online,
    Chat,
    Away,
    Xa,
    Dnd,
    /// `type='unavailable'`.
    Unavailable,
}

/// What a presence from a group chat room adds (XEP-0045 `muc#user`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MucPresence {
    /// The occupant's real bare JID, when the room shows it to us.
    pub real_jid: Option<String>,
    /// Status 110: this presence is about us.
    pub is_self: bool,
}

/// Whether a room shows popivr its occupants' real JIDs: a non-anonymous
/// room (status 100 on our join) does, a semi-anonymous one only to its
/// moderators. Stock ejabberd and prosody make rooms semi-anonymous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealJids {
    Shown,
    Hidden,
}

/// A presence as the call core (or the `serve` shell) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingPresence {
    /// Sender's bare JID, normalised like [`IncomingMessage::from_bare`].
    pub from_bare: String,
    pub from_full: String,
    pub show: Show,
    /// `<status/>` text (default language, else the first).
    pub status: Option<String>,
    /// Set for a presence from a group chat occupant.
    pub muc: Option<MucPresence>,
    /// From another session of our own account: what it says of its call
    /// (`None` for a session that announces none).
    pub sibling: Option<Option<Announcement>>,
}

/// One contact of our roster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterItem {
    /// Normalised bare JID.
    pub jid: String,
    /// We are subscribed to their presence (`to` or `both`).
    pub subscribed: bool,
    /// Our subscription request is waiting for their answer.
    pub asked: bool,
}

/// State of the XMPP session as the call sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmppStatus {
    /// Logged in; messages can be sent.
    Online,
    /// Login failed or the link dropped; the string names the cause.
    Failed(String),
}

/// Timers the core asks the shell to run. Setting a timer again replaces it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TimerId {
    /// The profile's reply timeout.
    Reply,
    /// Waiting for Asterisk's answers to `G` at call start.
    Setup,
    /// Guard while a prompt plays before leaving, in case its `F` never comes.
    Prompt,
    /// Bounds the wait for the agents' presence (and a room join) after login.
    Presence,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An event line from Asterisk.
    Event(EventLine),
    Xmpp(XmppStatus),
    Message(IncomingMessage),
    Presence(IncomingPresence),
    /// Our roster, once after login.
    Roster(Vec<RosterItem>),
    /// We are in this group chat room, seeing occupants' real JIDs or not.
    Joined(String, RealJids),
    /// Joining this room failed, for this reason.
    RoomFailed(String, String),
    /// The server has handled our login's presence and joins, this long
    /// after they were sent (`XmppEvent::Settled`).
    Settled(std::time::Duration),
    Timer(TimerId),
    /// Asterisk closed our input (EOF) or output: nothing more can be said.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// A command line for Asterisk.
    Command(Command),
    /// Log in to XMPP now (the core says when, after the audio has started).
    Connect,
    /// Send an IM.
    Send(OutgoingMessage),
    SetTimer(TimerId, Duration),
    CancelTimer(TimerId),
    /// A line for popivr's own log (stderr).
    Log(Level, String),
    /// The call is over: the shell closes XMPP and exits.
    Done,
}

#[cfg(test)]
mod tests;
