//! Taking XMPP stanzas apart into the plain structs the call core uses, and
//! building the ones we send.

use xmpp_parsers::{
    jid::{BareJid, Jid},
    message::{Lang, Message, MessageType, Thread},
    minidom::Element,
    presence::{self, Presence},
};

use crate::call::{IncomingMessage, MsgKind, OutgoingMessage};

const NS_DELAY: &str = "urn:xmpp:delay";
/// XEP-0091, obsolete but still sent by some servers for offline messages.
const NS_LEGACY_DELAY: &str = "jabber:x:delay";
const NS_CARBONS: &str = "urn:xmpp:carbons:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";

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

/// A presence as the call core (or the `serve` shell) sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingPresence {
    /// Sender's bare JID, normalised like [`IncomingMessage::from_bare`].
    pub from_bare: String,
    pub from_full: String,
    pub show: Show,
    /// `<status/>` text (default language, else the first).
    pub status: Option<String>,
}

/// What a message from the server becomes. `own` is our own bare JID, the
/// implied sender of a stanza without `from` (RFC 6120 §8.1.2.1).
pub(crate) fn incoming_message(msg: &Message, own: &BareJid) -> IncomingMessage {
    let (from_bare, from_full) = sender(msg.from.as_ref(), own);
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
    Some(IncomingPresence {
        from_bare,
        from_full,
        show,
        status,
    })
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
    let mut msg = Message::chat(Some(to)).with_body(Lang::new(), m.body.clone());
    msg.thread = m.thread.as_ref().map(|id| Thread {
        parent: None,
        id: id.clone(),
    });
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

    #[test]
    fn chat_message_with_thread() {
        let m = parse(
            "<message xmlns='jabber:client' from='Alice@Example.ORG/Phone' type='chat'>\
             <body>1 desk</body><thread>t-42</thread></message>",
        );
        let got = incoming_message(&m, &own());
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
        let got = incoming_message(&m, &own());
        assert_eq!(got.kind, MsgKind::Normal);
        assert_eq!(got.body.as_deref(), Some("hello"));
    }

    #[test]
    fn only_language_tagged_bodies_take_the_first() {
        let m = parse(
            "<message xmlns='jabber:client' from='bob@example.org' type='chat'>\
             <body xml:lang='fr'>salut</body><body xml:lang='de'>hallo</body></message>",
        );
        assert_eq!(incoming_message(&m, &own()).body.as_deref(), Some("hallo"));
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
            assert_eq!(incoming_message(&m, &own()).kind, kind, "{ty}");
        }
    }

    #[test]
    fn delay_and_legacy_delay_are_seen() {
        let m = parse(
            "<message xmlns='jabber:client' from='a@b' type='chat'><body>x</body>\
             <delay xmlns='urn:xmpp:delay' stamp='2024-01-01T00:00:00Z'/></message>",
        );
        assert!(incoming_message(&m, &own()).delayed);
        let m = parse(
            "<message xmlns='jabber:client' from='a@b' type='chat'><body>x</body>\
             <x xmlns='jabber:x:delay' stamp='20240101T00:00:00'/></message>",
        );
        assert!(incoming_message(&m, &own()).delayed);
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
            let got = incoming_message(&m, &own());
            assert!(got.forwarded, "{wrapper}");
            assert!(!got.delayed, "{wrapper}");
        }
    }

    #[test]
    fn no_from_means_our_own_account() {
        let m = parse("<message xmlns='jabber:client' type='chat'><body>x</body></message>");
        assert_eq!(incoming_message(&m, &own()).from_bare, "pbx@example.org");
    }

    #[test]
    fn outgoing_is_chat_with_thread() {
        let m = outgoing_message(&OutgoingMessage {
            to: "alice@example.org".into(),
            body: "Call from 2001".into(),
            thread: Some("call-1".into()),
        })
        .unwrap();
        let el = Element::from(m);
        assert_eq!(el.attr("type"), Some("chat"));
        assert_eq!(el.attr("to"), Some("alice@example.org"));
        let child = |name| el.get_child(name, "jabber:client").map(|c| c.text());
        assert_eq!(child("body").as_deref(), Some("Call from 2001"));
        assert_eq!(child("thread").as_deref(), Some("call-1"));
    }

    #[test]
    fn outgoing_to_invalid_jid_is_refused() {
        let err = outgoing_message(&OutgoingMessage {
            to: "a@b@c".into(),
            body: "x".into(),
            thread: None,
        })
        .unwrap_err();
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
