//! The session task: logs in once, then relays stanzas between the server
//! and the shell until told to close or the link breaks.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tokio_xmpp::xmlstream::{FallibleStreamElement, ReadError, XmppStreamElement};
use xmpp_parsers::{
    iq::Iq,
    jid::{BareJid, FullJid},
    ping::Ping,
    stanza_error::{DefinedCondition, ErrorType, StanzaError},
};

use super::error::{Phase, XmppError, io_reason};
use super::login::{Connection, Stream, login, send};
use super::stanza::{incoming_message, incoming_presence, outgoing_message, own_presence};
use super::{XmppEvent, XmppStatus};
use crate::call::OutgoingMessage;
use crate::config::Account;

/// Upper bound for an orderly close: the footer is one small write, and a
/// per-call popivr must be gone within 100 ms of its end.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_millis(50);

const PING_ID: &str = "popivr-ping";

#[derive(Debug)]
pub(crate) enum Cmd {
    Send(OutgoingMessage),
    Presence(Option<String>),
    Close,
}

/// Why the relay loop ended.
enum End {
    /// The shell asked (or went away): close the stream politely.
    Close,
    /// The link is gone: report it; nothing left to close.
    Failed(XmppError),
}

pub(crate) async fn run(
    account: Account,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::Sender<XmppEvent>,
) {
    // Commands that arrive while logging in wait for the stream; a close
    // abandons the login at once.
    let mut pending = Vec::new();
    let attempt = login(&account);
    tokio::pin!(attempt);
    let result = loop {
        tokio::select! {
            result = &mut attempt => break result,
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Close) | None => return,
                Some(cmd) => pending.push(cmd),
            },
        }
    };
    let conn = match result {
        Ok(conn) => conn,
        Err(e) => {
            log::debug!("xmpp: login as {} failed: {e}", account.username);
            let _ = events
                .send(XmppEvent::Status(XmppStatus::Failed(e.to_string())))
                .await;
            return;
        }
    };
    log::debug!(
        "xmpp: online as {} via {} in {}",
        conn.jid,
        conn.mechanism,
        conn.timings
    );
    let Connection {
        mut stream, jid, ..
    } = conn;

    // Initial presence before "online": the server then routes messages for
    // the bare JID to us and releases stored offline messages. It is
    // pipelined ahead of whatever the shell sends next, so it costs no round
    // trip.
    let presence = own_presence(account.statusmessage.as_deref());
    let mut end = send(
        &mut stream,
        &XmppStreamElement::Stanza(presence.into()),
        Phase::Bind,
    )
    .await
    .err()
    .map(lost);
    if end.is_none()
        && events
            .send(XmppEvent::Status(XmppStatus::Online))
            .await
            .is_err()
    {
        end = Some(End::Close);
    }
    for cmd in pending {
        if end.is_some() {
            break;
        }
        end = handle_cmd(&mut stream, cmd).await;
    }
    let end = match end {
        Some(end) => end,
        None => relay(&mut stream, &mut cmds, &events, &jid).await,
    };
    match end {
        End::Close => close(stream).await,
        End::Failed(e) => {
            log::debug!("xmpp: session as {jid} ended: {e}");
            let _ = events
                .send(XmppEvent::Status(XmppStatus::Failed(e.to_string())))
                .await;
        }
    }
}

async fn relay(
    stream: &mut Stream,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    events: &mpsc::Sender<XmppEvent>,
    me: &FullJid,
) -> End {
    let own = me.to_bare();
    loop {
        tokio::select! {
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return End::Close };
                if let Some(end) = handle_cmd(stream, cmd).await {
                    return end;
                }
            }
            // Cancel-safe: a half-read element stays in the stream's state.
            item = stream.next() => {
                let event = match item {
                    Some(Ok(FallibleStreamElement::Ok(el))) => match on_element(stream, el, me, &own).await {
                        Ok(event) => event,
                        Err(end) => return end,
                    },
                    Some(Ok(FallibleStreamElement::Err(e))) => {
                        // One malformed stanza from a peer must not end the call.
                        log::debug!("xmpp: ignoring {e}");
                        None
                    }
                    Some(Err(ReadError::SoftTimeout)) => {
                        // Quiet for a while: prove the link is alive.
                        let ping = Iq::from_get(PING_ID, Ping);
                        if let Err(e) = send(stream, &XmppStreamElement::Stanza(ping.into()), Phase::Bind).await {
                            return lost(e);
                        }
                        None
                    }
                    Some(Err(ReadError::HardError(e))) => {
                        return End::Failed(XmppError::Lost(io_reason(&e)));
                    }
                    Some(Err(ReadError::ParseError(e))) => {
                        return End::Failed(XmppError::Protocol(e.to_string()));
                    }
                    Some(Err(ReadError::StreamFooterReceived)) | None => {
                        return End::Failed(XmppError::Lost("connection closed by server".into()));
                    }
                };
                if let Some(event) = event
                    && events.send(event).await.is_err()
                {
                    return End::Close;
                }
            }
        }
    }
}

/// React to one element from the server; maybe produce an event.
async fn on_element(
    stream: &mut Stream,
    el: XmppStreamElement,
    me: &FullJid,
    own: &BareJid,
) -> Result<Option<XmppEvent>, End> {
    match el {
        XmppStreamElement::Stanza(Stanza::Message(m)) => {
            Ok(Some(XmppEvent::Message(incoming_message(&m, own))))
        }
        // The server reflects our own presence back; that says nothing.
        XmppStreamElement::Stanza(Stanza::Presence(p))
            if p.from.as_ref().and_then(|f| f.try_as_full().ok()) == Some(me) =>
        {
            Ok(None)
        }
        XmppStreamElement::Stanza(Stanza::Presence(p)) => {
            Ok(incoming_presence(&p, own).map(XmppEvent::Presence))
        }
        XmppStreamElement::Stanza(Stanza::Iq(iq)) => {
            answer_iq(stream, iq).await.map_err(lost)?;
            Ok(None)
        }
        XmppStreamElement::StreamError(e) => Err(End::Failed(XmppError::Stream(e.0.to_string()))),
        other => {
            log::debug!("xmpp: ignoring unexpected stream element {other:?}");
            Ok(None)
        }
    }
}

/// RFC 6120 §8.2.3: every get/set gets an answer. We serve only ping
/// (servers use it to check on idle clients) and refuse the rest.
async fn answer_iq(stream: &mut Stream, iq: Iq) -> Result<(), XmppError> {
    let reply = match iq {
        Iq::Get {
            from, id, payload, ..
        } if payload.is("ping", xmpp_parsers::ns::PING) => Iq::Result {
            from: None,
            to: from,
            id,
            payload: None,
        },
        Iq::Get { from, id, .. } | Iq::Set { from, id, .. } => Iq::Error {
            from: None,
            to: from,
            id,
            error: StanzaError::new(
                ErrorType::Cancel,
                DefinedCondition::ServiceUnavailable,
                "en",
                "",
            ),
            payload: None,
        },
        // Results (our pings) and errors need no answer.
        Iq::Result { .. } | Iq::Error { .. } => return Ok(()),
    };
    send(
        stream,
        &XmppStreamElement::Stanza(reply.into()),
        Phase::Bind,
    )
    .await
}

async fn handle_cmd(stream: &mut Stream, cmd: Cmd) -> Option<End> {
    let stanza: Stanza = match cmd {
        Cmd::Close => return Some(End::Close),
        Cmd::Send(m) => match outgoing_message(&m) {
            Ok(msg) => msg.into(),
            Err(e) => {
                // The recipient comes from config; a bad one is a config
                // problem for that message, not a reason to drop the link.
                log::warn!("xmpp: not sent: {e}");
                return None;
            }
        },
        Cmd::Presence(status) => own_presence(status.as_deref()).into(),
    };
    send(stream, &XmppStreamElement::Stanza(stanza), Phase::Bind)
        .await
        .err()
        .map(lost)
}

/// A write failed after login: the link is lost, whatever phase the
/// shared `send` helper names.
fn lost(e: XmppError) -> End {
    match e {
        XmppError::Io { reason, .. } => End::Failed(XmppError::Lost(reason)),
        other => End::Failed(other),
    }
}

/// Send the stream footer and shut the transport down, within a bound; the
/// server treats the footer as the session's end (unavailable presence).
async fn close(mut stream: Stream) {
    let done = tokio::time::timeout(CLOSE_TIMEOUT, async {
        futures::SinkExt::<&XmppStreamElement>::close(&mut stream).await
    })
    .await;
    match done {
        Ok(Ok(())) => log::debug!("xmpp: stream closed"),
        Ok(Err(e)) => log::debug!("xmpp: close: {e}"),
        Err(_) => log::debug!("xmpp: close timed out"),
    }
}
