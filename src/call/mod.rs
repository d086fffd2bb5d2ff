//! The call: a pure state machine. Inputs in, outputs out; no I/O, no clock
//! reads, no tokio. Every shell (per-call stdio, `serve`) drives the same core.

use std::time::Duration;

use crate::eivr::{Command, EventLine};

mod machine;
pub use machine::{Call, CallData};

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
}

/// An IM to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Bare JID of the recipient.
    pub to: String,
    pub body: String,
    /// XEP-0201 thread id, so a client keeps the conversation together.
    pub thread: Option<String>,
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// An event line from Asterisk.
    Event(EventLine),
    Xmpp(XmppStatus),
    Message(IncomingMessage),
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
