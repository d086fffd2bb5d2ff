//! The session task: logs in once, then relays stanzas between the server
//! and the shell until told to close or the link breaks.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_xmpp::Stanza;
use tokio_xmpp::xmlstream::{FallibleStreamElement, ReadError, XmppStreamElement};
use xmpp_parsers::{
    iq::Iq,
    jid::{BareJid, FullJid, Jid},
    minidom::Element,
    ping::Ping,
    presence::{Presence, Type as PresenceType},
    roster::Roster,
    stanza_error::{DefinedCondition, ErrorType, StanzaError},
};

use super::error::{Phase, XmppError, io_reason};
use super::login::{Connection, Stream, login, send};
use super::stanza::{
    announcing_presence, created_room, incoming_message, incoming_presence, join_room,
    outgoing_message, own_presence, room_real_jids, roster_item,
};
use super::{SessionOptions, XmppEvent, XmppStatus};
use crate::call::{Announcement, OutgoingMessage};
use crate::config::Account;

/// Upper bound for an orderly close: our footer out and the server's
/// answer in. That is one round trip (a millisecond on a LAN), but a busy
/// server gets to it late (median 12 ms, p99 45 ms with 50 per-call
/// sessions coming and going on one prosody), and a per-call popivr must
/// be gone within 100 ms of its end.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_millis(80);

const PING_ID: &str = "popivr-ping";
const ROSTER_ID: &str = "popivr-roster";
const ROOM_CONFIG_ID: &str = "popivr-room-config";
/// XEP-0045 §10.1.2: accept the default configuration ("instant room").
const INSTANT_ROOM: &str = "<query xmlns='http://jabber.org/protocol/muc#owner'>\
                            <x xmlns='jabber:x:data' type='submit'/></query>";

/// What the relay knows besides the stream.
struct Ctx<'a> {
    me: &'a FullJid,
    own: BareJid,
    options: &'a SessionOptions,
}

impl Ctx<'_> {
    fn is_contact(&self, jid: &str) -> bool {
        self.options.contacts.iter().any(|c| c == jid)
    }

    fn room_nick(&self, room: &str) -> Option<&str> {
        self.options
            .rooms
            .iter()
            .find(|(r, _)| r == room)
            .map(|(_, n)| n.as_str())
    }
}

#[derive(Debug)]
pub(crate) enum Cmd {
    Send(OutgoingMessage),
    Presence(Option<String>),
    /// Our presence, with this call's announcement.
    Announce(Option<String>, Announcement),
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
    options: SessionOptions,
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
    if let Some(why) = conn.unbound {
        log::debug!("xmpp: no channel binding: {why}");
    }
    let Connection {
        mut stream, jid, ..
    } = conn;

    // The roster first, then the initial presence: the server answers
    // the roster before it sends the contacts' presence, so the call knows
    // whose presence to wait for. Initial presence also makes the server
    // route messages for the bare JID to us and release stored offline
    // messages. Room joins follow. All of it is pipelined ahead of whatever
    // the shell sends next, so it costs no round trip.
    let mut first: Vec<Stanza> = Vec::new();
    if !options.contacts.is_empty() {
        first.push(
            Iq::from_get(
                ROSTER_ID,
                Roster {
                    ver: None,
                    items: vec![],
                },
            )
            .into(),
        );
    }
    first.push(own_presence(account.statusmessage.as_deref()).into());
    for (room, nick) in &options.rooms {
        match join_room(room, nick) {
            Ok(p) => first.push(p.into()),
            Err(e) => log::warn!("xmpp: cannot join: {e}"),
        }
    }
    let mut end = None;
    for stanza in first {
        if let Err(e) = send(&mut stream, &XmppStreamElement::Stanza(stanza), Phase::Bind).await {
            end = Some(lost(e));
            break;
        }
    }
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
        None => {
            let ctx = Ctx {
                me: &jid,
                own: jid.to_bare(),
                options: &options,
            };
            relay(&mut stream, &mut cmds, &events, &ctx).await
        }
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
    ctx: &Ctx<'_>,
) -> End {
    // With a keepalive: a ping every interval, and the link is dead when a
    // whole interval after a ping passed without a single element from
    // the server (a frozen server or a silently dropped route never
    // answers; the stream's own check would take 80 s).
    let keepalive = ctx.options.keepalive;
    let mut last_heard = tokio::time::Instant::now();
    let mut pinged_at: Option<tokio::time::Instant> = None;
    let next_tick = |pinged_at: Option<tokio::time::Instant>| match (keepalive, pinged_at) {
        (None, _) => None,
        (Some(k), None) => Some(tokio::time::Instant::now() + k),
        (Some(k), Some(at)) => Some(at + k),
    };
    let mut tick_at = next_tick(None);
    loop {
        let tick = async {
            match tick_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tick => {
                match pinged_at {
                    Some(at) if last_heard < at => {
                        return End::Failed(XmppError::Lost(format!(
                            "no answer to a ping within {:?}",
                            keepalive.unwrap_or_default()
                        )));
                    }
                    _ => {}
                }
                let ping = Iq::from_get(PING_ID, Ping);
                if let Err(e) = send(stream, &XmppStreamElement::Stanza(ping.into()), Phase::Bind).await {
                    return lost(e);
                }
                let now = tokio::time::Instant::now();
                pinged_at = Some(now);
                tick_at = next_tick(Some(now));
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return End::Close };
                if let Some(end) = handle_cmd(stream, cmd).await {
                    return end;
                }
            }
            // Cancel-safe: a half-read element stays in the stream's state.
            item = stream.next() => {
                last_heard = tokio::time::Instant::now();
                let event = match item {
                    Some(Ok(FallibleStreamElement::Ok(el))) => match on_element(stream, el, ctx).await {
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
    ctx: &Ctx<'_>,
) -> Result<Option<XmppEvent>, End> {
    match el {
        XmppStreamElement::Stanza(Stanza::Message(m)) => {
            Ok(Some(XmppEvent::Message(incoming_message(&m, ctx.me))))
        }
        // The server reflects our own presence back; that says nothing.
        XmppStreamElement::Stanza(Stanza::Presence(p))
            if p.from.as_ref().and_then(|f| f.try_as_full().ok()) == Some(ctx.me) =>
        {
            Ok(None)
        }
        XmppStreamElement::Stanza(Stanza::Presence(p)) => on_presence(stream, p, ctx).await,
        XmppStreamElement::Stanza(Stanza::Iq(Iq::Result {
            id,
            payload: Some(payload),
            ..
        })) if id == ROSTER_ID => {
            let roster = Roster::try_from(payload)
                .map_err(|e| End::Failed(XmppError::Protocol(format!("roster: {e}"))))?;
            let items: Vec<_> = roster.items.iter().map(roster_item).collect();
            // Ask the contacts we cannot see yet; the server remembers the
            // request until they answer.
            for contact in &ctx.options.contacts {
                let known = items.iter().find(|i| &i.jid == contact);
                if known.is_some_and(|i| i.subscribed || i.asked) {
                    continue;
                }
                let Ok(to) = Jid::new(contact) else { continue };
                let ask = Presence::subscribe().with_to(to);
                send_stanza(stream, ask.into()).await?;
            }
            Ok(Some(XmppEvent::Roster(items)))
        }
        XmppStreamElement::Stanza(Stanza::Iq(Iq::Set {
            from, id, payload, ..
        })) if payload.is("query", xmpp_parsers::ns::ROSTER)
            && from.as_ref().is_none_or(|f| f.to_bare() == ctx.own) =>
        {
            // A roster push (RFC 6121 §2.1.6): acknowledge it.
            let ack = Iq::Result {
                from: None,
                to: None,
                id,
                payload: None,
            };
            send_stanza(stream, ack.into()).await?;
            let item = Roster::try_from(payload)
                .ok()
                .and_then(|r| r.items.first().map(roster_item));
            Ok(item.map(XmppEvent::RosterUpdate))
        }
        XmppStreamElement::Stanza(Stanza::Iq(iq)) => {
            answer_iq(stream, iq).await.map_err(lost)?;
            Ok(None)
        }
        XmppStreamElement::StreamError(e) => Err(End::Failed(super::error::stream_error(&e.0))),
        other => {
            log::debug!("xmpp: ignoring unexpected stream element {other:?}");
            Ok(None)
        }
    }
}

async fn on_presence(
    stream: &mut Stream,
    p: Presence,
    ctx: &Ctx<'_>,
) -> Result<Option<XmppEvent>, End> {
    let from_bare = p.from.as_ref().map(|f| f.to_bare().to_string());
    let room = from_bare
        .as_deref()
        .filter(|b| ctx.room_nick(b).is_some())
        .map(str::to_string);
    match (&p.type_, room) {
        (PresenceType::Subscribe, None) => {
            // Agents of ours may see our presence; others are not answered.
            let from = from_bare.unwrap_or_default();
            if ctx.is_contact(&from) {
                let to = p.from.clone().map(|f| Jid::from(f.to_bare()));
                let mut ok = Presence::new(PresenceType::Subscribed);
                ok.to = to;
                send_stanza(stream, ok.into()).await?;
            } else {
                log::debug!("xmpp: subscription request from {from} left unanswered");
            }
            Ok(None)
        }
        (PresenceType::Error, Some(room)) => {
            let cause = p
                .payloads
                .iter()
                .find_map(|e| StanzaError::try_from(e.clone()).ok())
                .map(|e| format!("{:?}", e.defined_condition))
                .unwrap_or_else(|| "error".into());
            Ok(Some(XmppEvent::RoomFailed(room, cause)))
        }
        (_, room) => {
            let Some(presence) = incoming_presence(&p, &ctx.own) else {
                return Ok(None);
            };
            if let (Some(room), Some(muc)) = (room, &presence.muc)
                && muc.is_self
                && presence.show != crate::call::Show::Unavailable
            {
                if created_room(&p) {
                    // We made the room: accept the server's default
                    // configuration so it opens for others.
                    let Ok(to) = Jid::new(&room) else {
                        return Ok(None);
                    };
                    let query: Element = INSTANT_ROOM.parse().expect("a constant, valid element");
                    let iq = Iq::Set {
                        from: None,
                        to: Some(to),
                        id: ROOM_CONFIG_ID.into(),
                        payload: query,
                    };
                    send_stanza(stream, iq.into()).await?;
                }
                return Ok(Some(XmppEvent::Joined(room, room_real_jids(&p))));
            }
            Ok(Some(XmppEvent::Presence(presence)))
        }
    }
}

async fn send_stanza(stream: &mut Stream, stanza: Stanza) -> Result<(), End> {
    send(stream, &XmppStreamElement::Stanza(stanza), Phase::Bind)
        .await
        .map_err(lost)
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
        Cmd::Announce(status, a) => announcing_presence(status.as_deref(), &a).into(),
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

/// Close the stream within [`CLOSE_TIMEOUT`]: send the footer, shut our
/// sending side down, then keep reading (and dropping whatever comes) until
/// the server has closed its side too (RFC 6120 §4.4). The server closes
/// only once it has handled what came before our footer, so a message sent
/// just before the close (a call's confirmation) is in the server's hands
/// when this returns. Letting the socket go any earlier loses that message
/// when the server is busy: a socket closed while the server still writes
/// to it is reset by the kernel, and a server whose write fails drops the
/// connection with the stanzas it had not read yet (prosody logs "Broken
/// pipe"; 1 or 2 of 200 per-call processes under load lost their
/// confirmation so).
async fn close(mut stream: Stream) {
    let done = tokio::time::timeout(CLOSE_TIMEOUT, async {
        stream.shutdown().await?;
        // What the server sent before it saw our footer is dropped. It
        // ends with its own footer, or with the end of the connection
        // without one (prosody, once it has read our end too): to the
        // parser an error.
        while let Some(Ok(_) | Err(ReadError::SoftTimeout)) = stream.next().await {}
        Ok::<_, std::io::Error>(())
    })
    .await;
    match done {
        Ok(Ok(())) => log::debug!("xmpp: stream closed"),
        Ok(Err(e)) => log::debug!("xmpp: close: {e}"),
        Err(_) => log::debug!("xmpp: close timed out"),
    }
}
