//! Why a login or a session failed, in words an operator can act on.
//!
//! Every variant carries plain strings built by this module's callers from
//! things that are safe to show: host names, JIDs, protocol conditions. The
//! account secret is never passed in, so neither `Display` nor `Debug` can
//! leak it.

use std::fmt;
use std::io;
use std::time::Duration;

/// The step a login was in; used in timeout messages and timing reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Looking up the server host name.
    Resolve,
    /// TCP connect.
    Connect,
    /// Opening the XML stream and reading the first stream features.
    Stream,
    /// `<starttls/>` … `<proceed/>`.
    StartTls,
    /// The TLS handshake, including certificate verification.
    TlsHandshake,
    /// Re-opening the stream over TLS.
    TlsStream,
    /// SASL authentication.
    Auth,
    /// Re-opening the stream after authentication.
    AuthStream,
    /// Resource binding.
    Bind,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Resolve => "resolve",
            Phase::Connect => "connect",
            Phase::Stream => "stream",
            Phase::StartTls => "starttls",
            Phase::TlsHandshake => "tls handshake",
            Phase::TlsStream => "stream over tls",
            Phase::Auth => "auth",
            Phase::AuthStream => "stream after auth",
            Phase::Bind => "bind",
        })
    }
}

/// A failed login or a broken session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XmppError {
    /// The account cannot be used as configured (checked before any I/O).
    Config(String),
    /// `ca_file` could not be read or holds no usable certificate.
    CaFile(String),
    /// The server host name did not resolve.
    Resolve { host: String, reason: String },
    /// No TCP connection to the server.
    Connect { addr: String, reason: String },
    /// The server does not offer STARTTLS (and plaintext is not allowed).
    NoStartTls,
    /// TLS failed; the string says why (certificate not trusted, wrong name …).
    Tls(String),
    /// The server rejected our credentials; the string is the SASL condition
    /// (`not-authorized`) or what kept us from trying.
    Auth(String),
    /// SCRAM channel binding failed: the server saw another TLS channel
    /// than ours, or cannot check tls-exporter (not a password problem).
    ChannelBinding(String),
    /// Resource binding failed.
    Bind(String),
    /// The server sent a stream error (`host-unknown`, `system-shutdown` …).
    Stream(String),
    /// The server ended the session because another login of the same
    /// account replaced it (stream error `conflict`); the server's text.
    Replaced(String),
    /// The connection broke or the server closed it.
    Io { phase: Phase, reason: String },
    /// The server sent something we cannot follow.
    Protocol(String),
    /// Login did not finish within the account's `timeout`.
    Timeout { after: Duration, phase: Phase },
    /// An established session broke.
    Lost(String),
}

impl fmt::Display for XmppError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XmppError::Config(s) => write!(f, "config: {s}"),
            XmppError::CaFile(s) => write!(f, "ca_file: {s}"),
            XmppError::Resolve { host, reason } => write!(f, "resolve {host}: {reason}"),
            XmppError::Connect { addr, reason } => write!(f, "connect {addr}: {reason}"),
            XmppError::NoStartTls => f.write_str("TLS: server does not offer STARTTLS"),
            XmppError::Tls(s) => write!(f, "TLS: {s}"),
            XmppError::Auth(s) => write!(f, "auth failed: {s}"),
            XmppError::ChannelBinding(s) => write!(f, "auth failed: channel binding refused: {s}"),
            XmppError::Bind(s) => write!(f, "bind failed: {s}"),
            XmppError::Stream(s) => write!(f, "stream error: {s}"),
            XmppError::Replaced(text) => write!(
                f,
                "stream error: conflict{text}: the server ended this session for a newer login \
                 of the same account. Each call in per-call mode is one session; servers cap \
                 sessions per account (ejabberd: max_user_sessions, 10 by default), and more \
                 overlapping calls replace the oldest. Use `popivr serve` (one session for \
                 all calls) or raise the limit for popivr's account"
            ),
            XmppError::Io { phase, reason } => write!(f, "{reason} (during {phase})"),
            XmppError::Protocol(s) => write!(f, "protocol error: {s}"),
            XmppError::Timeout { after, phase } => {
                write!(f, "timed out after {} (during {phase})", secs(*after))
            }
            XmppError::Lost(s) => write!(f, "connection lost: {s}"),
        }
    }
}

impl std::error::Error for XmppError {}

/// A `<stream:error/>` as an error: `conflict` gets its cause and fix.
pub(crate) fn stream_error(e: &xmpp_parsers::stream_error::StreamError) -> XmppError {
    use xmpp_parsers::stream_error::DefinedCondition;
    if e.condition == DefinedCondition::Conflict {
        let text = e
            .texts
            .values()
            .next()
            .map(|t| format!(" ({t:?})"))
            .unwrap_or_default();
        return XmppError::Replaced(text);
    }
    XmppError::Stream(e.to_string())
}

/// `5 s`, `2.5 s`: the way the config file writes it.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s} s")
    }
}

/// A short, lower-case reason for an I/O error: `connection refused`
/// rather than `Connection refused (os error 111)`.
pub(crate) fn io_reason(e: &io::Error) -> String {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused
        | K::ConnectionReset
        | K::ConnectionAborted
        | K::NotConnected
        | K::AddrNotAvailable
        | K::BrokenPipe
        | K::TimedOut
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::NetworkDown => e.kind().to_string(),
        K::UnexpectedEof => "connection closed by server".to_owned(),
        _ => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_cause() {
        let e = XmppError::Connect {
            addr: "127.0.0.1:5222".into(),
            reason: io_reason(&io::Error::from(io::ErrorKind::ConnectionRefused)),
        };
        assert_eq!(e.to_string(), "connect 127.0.0.1:5222: connection refused");
        let e = XmppError::Timeout {
            after: Duration::from_secs(5),
            phase: Phase::TlsHandshake,
        };
        assert_eq!(e.to_string(), "timed out after 5 s (during tls handshake)");
        let e = XmppError::Timeout {
            after: Duration::from_millis(2500),
            phase: Phase::Auth,
        };
        assert_eq!(e.to_string(), "timed out after 2.5 s (during auth)");
        assert_eq!(
            XmppError::Auth("not-authorized".into()).to_string(),
            "auth failed: not-authorized"
        );
    }

    /// A replaced session names the cause (the server's per-account session
    /// limit) and the fix, not just "conflict".
    #[test]
    fn a_replaced_session_says_why_and_what_to_do() {
        let el: xmpp_parsers::minidom::Element = "<stream:error xmlns:stream='http://etherx.jabber.org/streams'>\
              <conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
              <text xmlns='urn:ietf:params:xml:ns:xmpp-streams' xml:lang='en'>Replaced by new connection</text>\
            </stream:error>"
            .parse()
            .unwrap();
        let e = xmpp_parsers::stream_error::StreamError::try_from(el).unwrap();
        let text = stream_error(&e).to_string();
        assert!(
            text.starts_with("stream error: conflict (\"Replaced by new connection\"): "),
            "{text}"
        );
        assert!(text.contains("max_user_sessions"), "{text}");
        assert!(text.contains("popivr serve"), "{text}");
    }

    #[test]
    fn eof_reads_as_closed_by_server() {
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, "eof before stream footer");
        assert_eq!(io_reason(&e), "connection closed by server");
    }
}
