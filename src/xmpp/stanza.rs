//! Taking XMPP stanzas apart into the plain structs the call core uses, and
//! building the ones we send.

use xmpp_parsers::{
    jid::{BareJid, FullJid, Jid},
    message::{Lang, Message, MessageType, Thread},
    minidom::{Element, rxml::NcName},
    presence::{self, Presence},
};

use xmpp_parsers::{
    muc::{
        Muc,
        muc::History,
        user::{MucUser, Status as MucStatus},
    },
    oob::Oob,
    roster::{Ask, Item as RosterEntry, Subscription},
};

use crate::call::{
    Addressed, Announcement, IncomingMessage, IncomingPresence, MsgKind, MucPresence, OutKind,
    OutgoingMessage, RosterItem, Show,
};

const NS_DELAY: &str = "urn:xmpp:delay";
/// XEP-0091, obsolete but still sent by some servers for offline messages.
const NS_LEGACY_DELAY: &str = "jabber:x:delay";
const NS_CARBONS: &str = "urn:xmpp:carbons:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
/// popivr's own payload: a per-call session's [`Announcement`].
const NS_CALL: &str = "urn:popivr:call:0";

/// What a message from the server becomes. `me` is our session's full JID;
/// its bare JID is the implied sender of a stanza without `from` (RFC 6120
/// §8.1.2.1).
pub(crate) fn incoming_message(msg: &Message, me: &FullJid) -> IncomingMessage {
    let own = me.to_bare();
    let (from_bare, from_full) = sender(msg.from.as_ref(), &own);
    let to = match &msg.to {
        Some(to) => match to.try_as_full() {
            Ok(full) if full == me => Addressed::Me,
            Ok(full) => Addressed::Other(full.to_string()),
            Err(_) => Addressed::Bare,
        },
        None => Addressed::Bare,
    };
    IncomingMessage {
        from_bare,
        from_full,
        kind: match msg.type_ {
            MessageType::Chat => MsgKind::Chat,
            MessageType::Normal => MsgKind::Normal,
            MessageType::Groupchat => MsgKind::Groupchat,
            MessageType::Headline => MsgKind::Headline,
            MessageType::Error => MsgKind::Error,
        },
        body: msg.get_best_body(vec![]).map(|(_lang, body)| body.clone()),
        delayed: msg.payloads.iter().any(is_delay),
        forwarded: msg.payloads.iter().any(is_forward),
        thread: msg.thread.as_ref().map(|t| t.id.clone()),
        to,
    }
}

/// A presence to report, or `None` for the kinds nobody here acts on
/// (subscription requests, probes, errors).
pub(crate) fn incoming_presence(p: &Presence, own: &BareJid) -> Option<IncomingPresence> {
    let show = match p.type_ {
        presence::Type::None => match p.show {
            None => Show::Online,
            Some(presence::Show::Chat) => Show::Chat,
            Some(presence::Show::Away) => Show::Away,
            Some(presence::Show::Xa) => Show::Xa,
            Some(presence::Show::Dnd) => Show::Dnd,
        },
        presence::Type::Unavailable => Show::Unavailable,
        _ => return None,
    };
    let (from_bare, from_full) = sender(p.from.as_ref(), own);
    let status = best_text(&p.statuses);
    let muc = p
        .payloads
        .iter()
        .find(|e| e.is("x", xmpp_parsers::ns::MUC_USER))
        .and_then(|e| MucUser::try_from(e.clone()).ok())
        .map(|user| MucPresence {
            real_jid: user
                .items
                .iter()
                .find_map(|i| i.jid.as_ref())
                .map(|j| j.to_bare().to_string()),
            is_self: user.status.contains(&MucStatus::SelfPresence),
        });
    let sibling = (from_bare == own.as_str()).then(|| {
        p.payloads
            .iter()
            .find(|e| e.is("call", NS_CALL))
            .and_then(parse_announcement)
    });
    Some(IncomingPresence {
        from_bare,
        from_full,
        show,
        status,
        muc,
        sibling,
    })
}

/// `<call xmlns='urn:popivr:call:0' id='…' waiting='true'><agent
/// jid='…'/></call>`. Only sessions of our own account are read this way;
/// a malformed one counts as none.
fn parse_announcement(e: &Element) -> Option<Announcement> {
    let call = e.attr("id").filter(|id| !id.is_empty())?.to_string();
    let waiting = e.attr("waiting") == Some("true");
    let mut agents = Vec::new();
    let mut contested = Vec::new();
    for c in e.children().filter(|c| c.is("agent", NS_CALL)) {
        let Some(jid) = c.attr("jid").and_then(|j| BareJid::new(j).ok()) else {
            continue;
        };
        if c.attr("contested") == Some("true") {
            contested.push(jid.to_string());
        }
        agents.push(jid.to_string());
    }
    Some(Announcement {
        call,
        waiting,
        agents,
        contested,
    })
}

/// Our presence carrying `a`.
pub(crate) fn announcing_presence(status: Option<&str>, a: &Announcement) -> Presence {
    let name = |n: &str| NcName::try_from(n).expect("a constant, valid name");
    let mut el = Element::builder("call", NS_CALL)
        .attr(name("id"), a.call.as_str())
        .attr(name("waiting"), if a.waiting { "true" } else { "false" });
    for agent in &a.agents {
        let mut item = Element::builder("agent", NS_CALL).attr(name("jid"), agent.as_str());
        if a.contested.contains(agent) {
            item = item.attr(name("contested"), "true");
        }
        el = el.append(item);
    }
    let mut p = own_presence(status);
    p.payloads.push(el.build());
    p
}

/// Status 201 on our own room presence: we created the room, which stays
/// locked until it is configured.
pub(crate) fn created_room(p: &Presence) -> bool {
    p.payloads
        .iter()
        .filter(|e| e.is("x", xmpp_parsers::ns::MUC_USER))
        .filter_map(|e| MucUser::try_from(e.clone()).ok())
        .any(|u| u.status.contains(&MucStatus::RoomHasBeenCreated))
}

/// Whether our own room presence `p` says we see occupants' real JIDs:
/// status 100 (a non-anonymous room), or we are a moderator (who sees them
/// in a semi-anonymous room too).
pub(crate) fn room_real_jids(p: &Presence) -> crate::call::RealJids {
    let shown = p
        .payloads
        .iter()
        .filter(|e| e.is("x", xmpp_parsers::ns::MUC_USER))
        .filter_map(|e| MucUser::try_from(e.clone()).ok())
        .any(|u| {
            u.status.contains(&MucStatus::NonAnonymousRoom)
                || u.items
                    .iter()
                    .any(|i| i.role == xmpp_parsers::muc::user::Role::Moderator)
        });
    if shown {
        crate::call::RealJids::Shown
    } else {
        crate::call::RealJids::Hidden
    }
}

/// A roster entry as the call core sees it.
pub(crate) fn roster_item(item: &RosterEntry) -> RosterItem {
    RosterItem {
        jid: item.jid.to_string(),
        subscribed: matches!(item.subscription, Subscription::To | Subscription::Both),
        asked: item.ask == Ask::Subscribe,
    }
}

/// Enter `room` as `nick`, without its history: an old message in the
/// room must never look like a reply.
pub(crate) fn join_room(room: &str, nick: &str) -> Result<Presence, String> {
    let to = Jid::new(&format!("{room}/{nick}")).map_err(|e| format!("room {room:?}: {e}"))?;
    let mut p = Presence::available().with_to(to);
    p.add_payload(Muc::new().with_history(History::new().with_maxstanzas(0)));
    Ok(p)
}

fn best_text(texts: &std::collections::BTreeMap<Lang, String>) -> Option<String> {
    texts.get("").or_else(|| texts.values().next()).cloned()
}

/// The parser has already applied the JID stringprep profiles (nodeprep,
/// nameprep), which lower-case the local part and the domain; the bare
/// JID printed from it is the normal form targets are compared with.
fn sender(from: Option<&Jid>, own: &BareJid) -> (String, String) {
    match from {
        Some(jid) => (jid.to_bare().to_string(), jid.to_string()),
        None => (own.to_string(), own.to_string()),
    }
}

fn is_delay(e: &Element) -> bool {
    e.is("delay", NS_DELAY) || e.is("x", NS_LEGACY_DELAY)
}

/// A carbon copy (`<sent/>`, `<received/>`) or a bare XEP-0297 forward:
/// the payload is someone else's message, whoever relayed it.
fn is_forward(e: &Element) -> bool {
    e.is("sent", NS_CARBONS) || e.is("received", NS_CARBONS) || e.is("forwarded", NS_FORWARD)
}

/// Build the stanza for an outgoing IM. A recipient that is not a valid
/// JID is refused here rather than sent for the server to bounce.
pub(crate) fn outgoing_message(m: &OutgoingMessage) -> Result<Message, String> {
    let to = Jid::new(&m.to).map_err(|e| format!("recipient {:?}: {e}", m.to))?;
    let msg = match m.kind {
        OutKind::Chat => Message::chat(Some(to)),
        OutKind::Groupchat => Message::groupchat(Some(to)),
    };
    let mut msg = msg.with_body(Lang::new(), m.body.clone());
    msg.thread = m.thread.as_ref().map(|id| Thread {
        parent: None,
        id: id.clone(),
    });
    if let Some(url) = &m.url {
        msg.payloads.push(
            Oob {
                url: url.clone(),
                desc: None,
            }
            .into(),
        );
    }
    Ok(msg)
}

/// Our own presence: available, with the account's status message.
pub(crate) fn own_presence(status: Option<&str>) -> Presence {
    let mut p = Presence::available();
    if let Some(s) = status.filter(|s| !s.is_empty()) {
        p.set_status(Lang::new(), s.to_owned());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(xml: &str) -> Message {
        let el: Element = xml.parse().expect("well-formed");
        Message::try_from(el).expect("a message")
    }

    fn own() -> BareJid {
        BareJid::new("pbx@example.org").unwrap()
    }

    fn me() -> FullJid {
        FullJid::new("pbx@example.org/call-1").unwrap()
    }

    #[test]
    fn chat_message_with_thread() {
        let m = parse(
            "<message xmlns='jabber:client' from='Alice@Example.ORG/Phone' type='chat'>\
             <body>1 desk</body><thread>t-42</thread></message>",
        );
        let got = incoming_message(&m, &me());
        assert_eq!(got.from_bare, "alice@example.org");
        assert_eq!(got.from_full, "alice@example.org/Phone");
        assert_eq!(got.kind, MsgKind::Chat);
        assert_eq!(got.body.as_deref(), Some("1 desk"));
        assert_eq!(got.thread.as_deref(), Some("t-42"));
        assert!(!got.delayed && !got.forwarded);
    }

    #[test]
    fn missing_type_is_normal_and_default_language_wins() {
        let m = parse(
            "<message xmlns='jabber:client' from='bob@example.org'>\
             <body xml:lang='de'>hallo</body><body>hello</body></message>",
        );
        let got = incoming_message(&m, &me());
        assert_eq!(got.kind, MsgKind::Normal);
        assert_eq!(got.body.as_deref(), Some("hello"));
    }

    #[test]
    fn only_language_tagged_bodies_take_the_first() {
        let m = parse(
            "<message xmlns='jabber:client' from='bob@example.org' type='chat'>\
             <body xml:lang='fr'>salut</body><body xml:lang='de'>hallo</body></message>",
        );
        assert_eq!(incoming_message(&m, &me()).body.as_deref(), Some("hallo"));
    }

    #[test]
    fn kinds() {
        for (ty, kind) in [
            ("chat", MsgKind::Chat),
            ("normal", MsgKind::Normal),
            ("groupchat", MsgKind::Groupchat),
            ("headline", MsgKind::Headline),
            ("error", MsgKind::Error),
        ] {
            let m = parse(&format!(
                "<message xmlns='jabber:client' from='a@b' type='{ty}'/>"
            ));
            assert_eq!(incoming_message(&m, &me()).kind, kind, "{ty}");
        }
    }

    #[test]
    fn delay_and_legacy_delay_are_seen() {
        let m = parse(
            "<message xmlns='jabber:client' from='a@b' type='chat'><body>x</body>\
             <delay xmlns='urn:xmpp:delay' stamp='2024-01-01T00:00:00Z'/></message>",
        );
        assert!(incoming_message(&m, &me()).delayed);
        let m = parse(
            "<message xmlns='jabber:client' from='a@b' type='chat'><body>x</body>\
             <x xmlns='jabber:x:delay' stamp='20240101T00:00:00'/></message>",
        );
        assert!(incoming_message(&m, &me()).delayed);
    }

    #[test]
    fn carbons_and_forwards_are_seen() {
        for wrapper in [
            "<received xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>\
             <message xmlns='jabber:client' from='x@y' type='chat'><body>1</body></message>\
             </forwarded></received>",
            "<sent xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'/></sent>",
            "<forwarded xmlns='urn:xmpp:forward:0'/>",
        ] {
            let m = parse(&format!(
                "<message xmlns='jabber:client' from='a@b' type='chat'><body>1</body>{wrapper}</message>"
            ));
            let got = incoming_message(&m, &me());
            assert!(got.forwarded, "{wrapper}");
            assert!(!got.delayed, "{wrapper}");
        }
    }

    /// A message for a session that is gone keeps its `to`: it was
    /// written for that session, not for this one.
    #[test]
    fn the_to_address_says_which_session_was_meant() {
        let to = |to: &str| {
            let attr = match to {
                "" => String::new(),
                to => format!(" to='{to}'"),
            };
            let m = parse(&format!(
                "<message xmlns='jabber:client' from='a@b/c'{attr} type='chat'><body>1</body></message>"
            ));
            incoming_message(&m, &me()).to
        };
        assert_eq!(to("PBX@example.org/call-1"), Addressed::Me);
        assert_eq!(to("pbx@example.org"), Addressed::Bare);
        assert_eq!(to(""), Addressed::Bare);
        assert_eq!(
            to("pbx@example.org/call-0"),
            Addressed::Other("pbx@example.org/call-0".into())
        );
    }

    #[test]
    fn announcements_of_our_own_sessions_round_trip() {
        let a = Announcement {
            call: "1f2e3d".into(),
            waiting: true,
            agents: vec!["alice@example.org".into(), "bob@example.org".into()],
            contested: vec!["bob@example.org".into()],
        };
        let mut p = announcing_presence(Some("popivr"), &a);
        p.from = Some(Jid::new("pbx@example.org/other").unwrap());
        let got = incoming_presence(&p, &own()).unwrap();
        assert_eq!(got.sibling, Some(Some(a.clone())));
        // The same payload from anyone else is not read at all.
        p.from = Some(Jid::new("mallory@example.org/x").unwrap());
        assert_eq!(incoming_presence(&p, &own()).unwrap().sibling, None);
        // A session of ours without one is a sibling with no call.
        let mut plain = own_presence(None);
        plain.from = Some(Jid::new("pbx@example.org/gajim").unwrap());
        assert_eq!(
            incoming_presence(&plain, &own()).unwrap().sibling,
            Some(None)
        );
    }

    #[test]
    fn no_from_means_our_own_account() {
        let m = parse("<message xmlns='jabber:client' type='chat'><body>x</body></message>");
        assert_eq!(incoming_message(&m, &me()).from_bare, "pbx@example.org");
    }

    #[test]
    fn outgoing_is_chat_with_thread() {
        let m = outgoing_message(&OutgoingMessage::chat(
            "alice@example.org",
            "Call from 2001",
            Some("call-1".into()),
        ))
        .unwrap();
        let el = Element::from(m);
        assert_eq!(el.attr("type"), Some("chat"));
        assert_eq!(el.attr("to"), Some("alice@example.org"));
        let child = |name| el.get_child(name, "jabber:client").map(|c| c.text());
        assert_eq!(child("body").as_deref(), Some("Call from 2001"));
        assert_eq!(child("thread").as_deref(), Some("call-1"));
    }

    #[test]
    fn outgoing_groupchat_with_a_link() {
        let m = outgoing_message(&OutgoingMessage {
            url: Some("https://crm.example.org/?n=1".into()),
            ..OutgoingMessage::groupchat("sales@conference.example.org", "pop")
        })
        .unwrap();
        let el = Element::from(m);
        assert_eq!(el.attr("type"), Some("groupchat"));
        let oob = el.get_child("x", "jabber:x:oob").expect("oob payload");
        assert_eq!(
            oob.get_child("url", "jabber:x:oob")
                .map(|u| u.text())
                .as_deref(),
            Some("https://crm.example.org/?n=1")
        );
    }

    #[test]
    fn room_presence_carries_the_real_jid_and_self_status() {
        let el: Element = "<presence xmlns='jabber:client' from='room@conf.example.org/al'>\
             <x xmlns='http://jabber.org/protocol/muc#user'>\
             <item affiliation='member' role='participant' jid='Alice@example.org/phone'/>\
             <status code='110'/><status code='201'/></x></presence>"
            .parse()
            .unwrap();
        let p = Presence::try_from(el).unwrap();
        let got = incoming_presence(&p, &own()).unwrap();
        let muc = got.muc.unwrap();
        assert_eq!(muc.real_jid.as_deref(), Some("alice@example.org"));
        assert!(muc.is_self);
        assert!(created_room(&p));
    }

    #[test]
    fn joining_asks_for_no_history() {
        let el = Element::from(join_room("room@conf.example.org", "popivr").unwrap());
        assert_eq!(el.attr("to"), Some("room@conf.example.org/popivr"));
        let x = el.get_child("x", "http://jabber.org/protocol/muc").unwrap();
        let h = x
            .get_child("history", "http://jabber.org/protocol/muc")
            .unwrap();
        assert_eq!(h.attr("maxstanzas"), Some("0"));
    }

    #[test]
    fn outgoing_to_invalid_jid_is_refused() {
        let err = outgoing_message(&OutgoingMessage::chat("a@b@c", "x", None)).unwrap_err();
        assert!(err.starts_with("recipient \"a@b@c\""), "{err}");
    }

    #[test]
    fn presence_kinds() {
        let p = |xml: &str| {
            let el: Element = xml.parse().unwrap();
            incoming_presence(&Presence::try_from(el).unwrap(), &own())
        };
        let got = p(
            "<presence xmlns='jabber:client' from='Alice@example.org/x'>\
                     <show>dnd</show><status>busy</status></presence>",
        )
        .unwrap();
        assert_eq!(got.from_bare, "alice@example.org");
        assert_eq!(got.show, Show::Dnd);
        assert_eq!(got.status.as_deref(), Some("busy"));
        let got = p("<presence xmlns='jabber:client' from='a@b/x'/>").unwrap();
        assert_eq!(got.show, Show::Online);
        let got = p("<presence xmlns='jabber:client' from='a@b/x' type='unavailable'/>").unwrap();
        assert_eq!(got.show, Show::Unavailable);
        assert!(p("<presence xmlns='jabber:client' from='a@b' type='subscribe'/>").is_none());
    }

    #[test]
    fn own_presence_carries_status() {
        let status = |p: Presence| {
            Element::from(p)
                .get_child("status", "jabber:client")
                .map(|c| c.text())
        };
        assert_eq!(
            status(own_presence(Some("popivr"))).as_deref(),
            Some("popivr")
        );
        assert_eq!(status(own_presence(None)), None);
    }
}
