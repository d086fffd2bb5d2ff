//! The session task: logs in once, then relays stanzas between the server
//! and the shell until told to close or the link breaks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Sink, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
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

use super::ended;
use super::error::{Phase, XmppError, io_reason};
use super::login::{Connection, Stream, condition_name, login, send};
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

/// Our pings' ids: this, then a number.
const PING_ID: &str = "popivr-ping-";

/// The slowest a stock server reads a client: ejabberd's `normal` shaper
/// (`c2s_shaper`) is 3,000 B/s in 23.01 and was 1,000 B/s before. A ping
/// queued behind `n` bytes the server has not read may take `n / this`
/// seconds more to be answered, and that is not a dead link.
const SLOWEST_READ: f64 = 1000.0;
const ROSTER_ID: &str = "popivr-roster";
/// The ping after our initial presence (and room joins): the server
/// answers it once it has handled them (XmppEvent::Settled).
const SETTLE_ID: &str = "popivr-settle";
const ROOM_CONFIG_ID: &str = "popivr-room-config";
/// XEP-0045 §10.1.2: accept the default configuration ("instant room").
const INSTANT_ROOM: &str = "<query xmlns='http://jabber.org/protocol/muc#owner'>\
                            <x xmlns='jabber:x:data' type='submit'/></query>";

/// What the relay knows besides the stream.
struct Ctx<'a> {
    me: &'a FullJid,
    own: BareJid,
    options: &'a SessionOptions,
    /// When the first stanzas (roster, presence, joins) went out.
    online_at: Instant,
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
    /// A message, with the shell's tag for it.
    Send(OutgoingMessage, u64),
    Presence(Option<String>),
    /// Our presence, with this call's announcement.
    Announce(Option<String>, Announcement),
    /// Store the last call that popped an agent and ended (`ended`).
    Remember(String, crate::claim::Ended),
    /// Read it back: answered with `XmppEvent::Recalled`.
    Recall(String),
    Close,
}

/// Why the relay loop ended.
enum End {
    /// The shell asked (or went away): close the stream politely.
    Close,
    /// The link is gone: report it; nothing left to close.
    Failed(XmppError),
}

/// What the server has read of what we sent, learnt from our pings: the
/// server answers a ping only after everything sent before it. With a
/// keepalive the session keeps each message until a ping sent after it is
/// answered, and keeps a ping out whenever a message waits for that.
struct Outbox {
    /// Bytes the kernel took from our socket so far.
    written: Arc<AtomicU64>,
    /// Keep messages until confirmed (and ping for it); with a keepalive.
    track: bool,
    /// Messages the server may not have: (number, tag, message).
    unconfirmed: VecDeque<(u64, u64, OutgoingMessage)>,
    next_msg: u64,
    /// Pings not answered yet, oldest first.
    pings: VecDeque<PingOut>,
    next_ping: u64,
    /// Socket offset the server has read up to (its last ping answer).
    read_to: u64,
    last_ping: Instant,
    /// Storage requests out: (number, agent) of each `Cmd::Recall`.
    recalls: Vec<(u64, String)>,
    next_iq: u64,
}

struct PingOut {
    n: u64,
    /// Messages numbered below this went before the ping.
    msgs_before: u64,
    /// Socket offset once the ping was written.
    offset: u64,
    at: Instant,
}

impl Outbox {
    fn new(written: Arc<AtomicU64>, track: bool) -> Self {
        Outbox {
            read_to: written.load(Ordering::Relaxed),
            written,
            track,
            unconfirmed: VecDeque::new(),
            next_msg: 0,
            pings: VecDeque::new(),
            next_ping: 0,
            last_ping: Instant::now(),
            recalls: Vec::new(),
            next_iq: 0,
        }
    }

    fn sent(&mut self, tag: u64, msg: OutgoingMessage) {
        if self.track {
            self.unconfirmed.push_back((self.next_msg, tag, msg));
        }
        self.next_msg += 1;
    }

    /// A ping is due to confirm messages: some wait and no ping is out.
    fn wants_ping(&self) -> bool {
        self.pings.is_empty() && !self.unconfirmed.is_empty()
    }

    async fn ping(&mut self, stream: &mut Stream, watch: Option<Duration>) -> Result<(), End> {
        let n = self.next_ping;
        self.next_ping += 1;
        let ping = Iq::from_get(format!("{PING_ID}{n}"), Ping);
        write(
            stream,
            &XmppStreamElement::Stanza(ping.into()),
            watch,
            &self.written,
        )
        .await
        .map_err(lost)?;
        let now = Instant::now();
        self.pings.push_back(PingOut {
            n,
            msgs_before: self.next_msg,
            offset: self.written.load(Ordering::Relaxed),
            at: now,
        });
        self.last_ping = now;
        Ok(())
    }

    /// The answer (result or error) to our ping `id`, if it is one.
    fn answered(&mut self, id: &str) -> bool {
        let Some(n) = id.strip_prefix(PING_ID).and_then(|n| n.parse::<u64>().ok()) else {
            return false;
        };
        while let Some(p) = self.pings.front() {
            if p.n > n {
                break;
            }
            if p.n == n {
                self.read_to = p.offset;
                let before = p.msgs_before;
                while self.unconfirmed.front().is_some_and(|(m, ..)| *m < before) {
                    self.unconfirmed.pop_front();
                }
            }
            self.pings.pop_front();
        }
        true
    }

    /// When to act next: check the oldest ping's answer, or send one.
    fn deadline(&self, keepalive: Duration, last_heard: Instant) -> Instant {
        match self.pings.front() {
            Some(p) => {
                let ahead = p.offset.saturating_sub(self.read_to) as f64;
                last_heard.max(p.at) + keepalive + Duration::from_secs_f64(ahead / SLOWEST_READ)
            }
            None => self.last_ping + keepalive,
        }
    }

    /// The event for `iq` when it answers one of our recalls. A store's
    /// answer needs none: a server that refuses stores refuses reads too,
    /// and the next call's read says so.
    fn recalled(&mut self, iq: &Iq) -> Option<XmppEvent> {
        let (id, result) = match iq {
            Iq::Result { id, payload, .. } => (id, Ok(payload.as_ref())),
            Iq::Error { id, error, .. } => (id, Err(condition_name(&error.defined_condition))),
            _ => return None,
        };
        let n = id.strip_prefix(ended::RECALL_ID)?.parse::<u64>().ok()?;
        let at = self.recalls.iter().position(|(m, _)| *m == n)?;
        let (_, agent) = self.recalls.remove(at);
        let ended = result.map(|payload| ended::recalled(payload, &agent));
        Some(XmppEvent::Recalled(agent, ended))
    }

    fn take(&mut self) -> Vec<(u64, OutgoingMessage)> {
        self.unconfirmed
            .drain(..)
            .map(|(_, tag, m)| (tag, m))
            .collect()
    }
}

pub(crate) async fn run(
    account: Account,
    options: SessionOptions,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: mpsc::Sender<XmppEvent>,
) {
    let Some((result, pending)) = log_in(&account, &mut cmds).await else {
        return;
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
        mut stream,
        jid,
        written,
        ..
    } = conn;
    let mut outbox = Outbox::new(written, options.keepalive.is_some());

    let online_at = Instant::now();
    let mut end = None;
    for stanza in first_stanzas(&account, &options) {
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
        end = handle_cmd(&mut stream, cmd, &mut outbox, options.keepalive).await;
    }
    let end = match end {
        Some(end) => end,
        None => {
            let ctx = Ctx {
                me: &jid,
                own: jid.to_bare(),
                options: &options,
                online_at,
            };
            relay(&mut stream, &mut cmds, &events, &ctx, &mut outbox).await
        }
    };
    match end {
        End::Close => close(stream).await,
        End::Failed(e) => {
            log::debug!("xmpp: session as {jid} ended: {e}");
            report_failure(e, outbox, cmds, &events).await;
        }
    }
}

/// Log in. Commands that arrive meanwhile wait for the stream (returned
/// with the result); a close, or the shell gone, abandons the login at
/// once (None).
async fn log_in(
    account: &Account,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
) -> Option<(Result<Connection, XmppError>, Vec<Cmd>)> {
    let mut pending = Vec::new();
    let attempt = login(account);
    tokio::pin!(attempt);
    loop {
        tokio::select! {
            result = &mut attempt => return Some((result, pending)),
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Close) | None => return None,
                Some(cmd) => pending.push(cmd),
            },
        }
    }
}

/// What goes out right after the login: the roster first, then the
/// initial presence (the server answers the roster before it sends the
/// contacts' presence, so the call knows whose presence to wait for;
/// initial presence also makes the server route messages for the bare JID
/// to us and release stored offline messages), the room joins, and a ping
/// whose answer says the server has handled them all. Pipelined ahead of
/// whatever the shell sends next, so it costs no round trip.
fn first_stanzas(account: &Account, options: &SessionOptions) -> Vec<Stanza> {
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
    if !options.contacts.is_empty() || !options.rooms.is_empty() {
        first.push(Iq::from_get(SETTLE_ID, Ping).into());
    }
    first
}

/// The link broke: hand the shell every message it may have lost (those
/// the server did not confirm, and those still queued, which never went
/// out), then the failure.
async fn report_failure(
    e: XmppError,
    mut outbox: Outbox,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    events: &mpsc::Sender<XmppEvent>,
) {
    let mut unconfirmed = outbox.take();
    // One sent from now on is refused (Session::send_tagged).
    cmds.close();
    while let Ok(cmd) = cmds.try_recv() {
        if let (Cmd::Send(m, tag), true) = (cmd, outbox.track) {
            unconfirmed.push((tag, m));
        }
    }
    if !unconfirmed.is_empty() {
        let _ = events.send(XmppEvent::Unconfirmed(unconfirmed)).await;
    }
    let _ = events
        .send(XmppEvent::Status(XmppStatus::Failed(e.to_string())))
        .await;
}

async fn relay(
    stream: &mut Stream,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    events: &mpsc::Sender<XmppEvent>,
    ctx: &Ctx<'_>,
    outbox: &mut Outbox,
) -> End {
    // With a keepalive: a ping every interval, and the link is dead when
    // nothing at all came from the server for an interval after a ping
    // (a frozen server or a silently dropped route never answers; the
    // stream's own check would take 80 s), plus the time a shaped server
    // needs to read what we queued ahead of that ping (Outbox::deadline).
    let keepalive = ctx.options.keepalive;
    let mut last_heard = Instant::now();
    loop {
        let tick_at = keepalive.map(|k| outbox.deadline(k, last_heard));
        let tick = async {
            match tick_at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tick => {
                if !outbox.pings.is_empty() {
                    return End::Failed(XmppError::Lost(format!(
                        "no answer to a ping within {:?}",
                        Instant::now() - outbox.pings.front().map_or(last_heard, |p| p.at)
                    )));
                }
                if let Err(end) = outbox.ping(stream, keepalive).await {
                    return end;
                }
            }
            cmd = cmds.recv() => {
                let Some(cmd) = cmd else { return End::Close };
                if let Some(end) = handle_cmd(stream, cmd, outbox, keepalive).await {
                    return end;
                }
                if outbox.wants_ping()
                    && let Err(end) = outbox.ping(stream, keepalive).await
                {
                    return end;
                }
            }
            // Cancel-safe: a half-read element stays in the stream's state.
            item = stream.next() => {
                last_heard = Instant::now();
                match on_item(stream, item, ctx, outbox).await {
                    Ok(Some(event)) => {
                        if events.send(event).await.is_err() {
                            return End::Close;
                        }
                    }
                    Ok(None) => {}
                    Err(end) => return end,
                }
            }
        }
    }
}

type Item = Option<Result<FallibleStreamElement, ReadError>>;

/// One read from the stream: an answer to our own ping or recall, an
/// element for `on_element`, something to skip, or the end of the link.
async fn on_item(
    stream: &mut Stream,
    item: Item,
    ctx: &Ctx<'_>,
    outbox: &mut Outbox,
) -> Result<Option<XmppEvent>, End> {
    let keepalive = ctx.options.keepalive;
    match item {
        Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(Stanza::Iq(
            Iq::Result { id, .. } | Iq::Error { id, .. },
        )))))
            if outbox.answered(&id) =>
        {
            if outbox.wants_ping() {
                outbox.ping(stream, keepalive).await?;
            }
            Ok(None)
        }
        Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::Stanza(Stanza::Iq(
            iq @ (Iq::Result { .. } | Iq::Error { .. }),
        )))))
            if ended::ours(iq.id()) =>
        {
            Ok(outbox.recalled(&iq))
        }
        Some(Ok(FallibleStreamElement::Ok(el))) => on_element(stream, el, ctx).await,
        Some(Ok(FallibleStreamElement::Err(e))) => {
            // One malformed stanza from a peer must not end the call.
            log::debug!("xmpp: ignoring {e}");
            Ok(None)
        }
        Some(Err(ReadError::SoftTimeout)) => {
            // Quiet for a while: prove the link is alive.
            outbox.ping(stream, keepalive).await?;
            Ok(None)
        }
        Some(Err(ReadError::HardError(e))) => Err(End::Failed(XmppError::Lost(io_reason(&e)))),
        Some(Err(ReadError::ParseError(e))) => Err(End::Failed(XmppError::Protocol(e.to_string()))),
        Some(Err(ReadError::StreamFooterReceived)) | None => Err(End::Failed(XmppError::Lost(
            "connection closed by server".into(),
        ))),
    }
}

/// Write one element. With `watch` (the keepalive), a write that waits
/// for room in the socket fails once the server has read nothing of our
/// stream for that long: a shaped server reads slowly, a frozen one not
/// at all.
async fn write(
    stream: &mut Stream,
    el: &XmppStreamElement,
    watch: Option<Duration>,
    written: &AtomicU64,
) -> Result<(), XmppError> {
    let Some(patience) = watch else {
        return send(stream, el, Phase::Bind).await;
    };
    let io = |e: std::io::Error| XmppError::Lost(io_reason(&e));
    let stalled = || XmppError::Lost(format!("the server read nothing for {patience:?}"));
    let mut seen = written.load(Ordering::Relaxed);
    // The element goes into the stream's buffer once there is room…
    loop {
        let ready = std::future::poll_fn(|cx| {
            <Stream as Sink<&XmppStreamElement>>::poll_ready(std::pin::Pin::new(stream), cx)
        });
        match tokio::time::timeout(patience, ready).await {
            Ok(result) => break result.map_err(io)?,
            Err(_) => seen = progress(written, seen).ok_or_else(stalled)?,
        }
    }
    std::pin::Pin::new(&mut *stream)
        .start_send(el)
        .map_err(io)?;
    // …and from there to the socket. A timed-out flush leaves the rest in
    // the buffer for the next one.
    loop {
        let flush = std::future::poll_fn(|cx| {
            <Stream as Sink<&XmppStreamElement>>::poll_flush(std::pin::Pin::new(stream), cx)
        });
        match tokio::time::timeout(patience, flush).await {
            Ok(result) => return result.map_err(io),
            Err(_) => seen = progress(written, seen).ok_or_else(stalled)?,
        }
    }
}

/// The new count of written bytes if it moved since `seen`.
fn progress(written: &AtomicU64, seen: u64) -> Option<u64> {
    let now = written.load(Ordering::Relaxed);
    (now != seen).then_some(now)
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
        // Answered (or refused: a server without XEP-0199) only after
        // our initial presence was handled.
        XmppStreamElement::Stanza(Stanza::Iq(Iq::Result { id, .. } | Iq::Error { id, .. }))
            if id == SETTLE_ID =>
        {
            Ok(Some(XmppEvent::Settled(ctx.online_at.elapsed())))
        }
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
pub(super) async fn answer_iq(stream: &mut Stream, iq: Iq) -> Result<(), XmppError> {
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

async fn handle_cmd(
    stream: &mut Stream,
    cmd: Cmd,
    outbox: &mut Outbox,
    watch: Option<Duration>,
) -> Option<End> {
    let stanza: Stanza = match cmd {
        Cmd::Close => return Some(End::Close),
        Cmd::Send(m, tag) => match outgoing_message(&m) {
            Ok(msg) => {
                outbox.sent(tag, m);
                msg.into()
            }
            Err(e) => {
                // The recipient comes from config; a bad one is a config
                // problem for that message, not a reason to drop the link.
                log::warn!("xmpp: not sent: {e}");
                return None;
            }
        },
        Cmd::Presence(status) => own_presence(status.as_deref()).into(),
        Cmd::Announce(status, a) => announcing_presence(status.as_deref(), &a).into(),
        Cmd::Remember(agent, e) => {
            outbox.next_iq += 1;
            let id = format!("{}{}", ended::REMEMBER_ID, outbox.next_iq);
            ended::remember(id, &agent, &e).into()
        }
        Cmd::Recall(agent) => {
            outbox.next_iq += 1;
            let id = format!("{}{}", ended::RECALL_ID, outbox.next_iq);
            outbox.recalls.push((outbox.next_iq, agent.clone()));
            ended::recall(id, &agent).into()
        }
    };
    write(
        stream,
        &XmppStreamElement::Stanza(stanza),
        watch,
        &outbox.written,
    )
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
pub(super) async fn close(mut stream: Stream) {
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
