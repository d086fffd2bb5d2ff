//! What a per-call process leaves for the next one in the account's
//! private XML storage (XEP-0049, `jabber:iq:private`: stock on prosody
//! and ejabberd): per agent, the last call that popped them and ended
//! ([`crate::claim`] says why). Only the account itself can read
//! it. One element per agent, its namespace naming the agent, so calls
//! ending at once for different agents never overwrite each other.

use xmpp_parsers::{
    iq::Iq,
    minidom::{Element, rxml::NcName},
};

use std::time::Duration;

use crate::claim::Ended;

const PRIVATE: &str = "jabber:iq:private";
const NAME: &str = "ended";
/// The namespace of an agent's element is this and the agent's bare JID,
/// percent-encoded.
const NS_PREFIX: &str = "urn:x-popivr:ended:";

/// Our storage requests' ids: this, then a number.
pub(super) const RECALL_ID: &str = "popivr-recall-";
pub(super) const REMEMBER_ID: &str = "popivr-remember-";

fn namespace(agent: &str) -> String {
    let mut ns = String::from(NS_PREFIX);
    for b in agent.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => {
                ns.push(b as char)
            }
            _ => ns.push_str(&format!("%{b:02X}")),
        }
    }
    ns
}

fn attr(name: &str) -> NcName {
    NcName::try_from(name).expect("a constant, valid name")
}

fn query(child: Element) -> Element {
    Element::builder("query", PRIVATE).append(child).build()
}

/// Store `ended` as `agent`'s last ended call:
/// `<ended xmlns='urn:x-popivr:ended:AGENT' call='ID' window='MS'>MS</ended>`
/// (the window: its profile's `late_reply`; the text: when it ended).
pub(super) fn remember(id: String, agent: &str, ended: &Ended) -> Iq {
    // The time as text: prosody stores an element only if it has content
    // (an empty one deletes the entry).
    let el = Element::builder(NAME, namespace(agent))
        .attr(attr("call"), ended.call.as_str())
        .attr(attr("window"), ended.window.as_millis().to_string())
        .append(ended.at.to_string())
        .build();
    Iq::Set {
        from: None,
        to: None,
        id,
        payload: query(el),
    }
}

/// Whether `id` is one of our storage requests' (a store or a read).
pub(super) fn ours(id: &str) -> bool {
    id.starts_with(RECALL_ID) || id.starts_with(REMEMBER_ID)
}

/// Ask for `agent`'s last ended call.
pub(super) fn recall(id: String, agent: &str) -> Iq {
    Iq::Get {
        from: None,
        to: None,
        id,
        payload: query(Element::builder(NAME, namespace(agent)).build()),
    }
}

/// The call in a result to [`recall`] for `agent`; `None` when nothing
/// was stored (the server returns the empty element) or it is not ours.
pub(super) fn recalled(payload: Option<&Element>, agent: &str) -> Option<Ended> {
    let el = payload?.get_child(NAME, namespace(agent).as_str())?;
    let call = el.attr("call")?;
    let at = el.text().trim().parse().ok()?;
    let window = Duration::from_millis(el.attr("window")?.parse().ok()?);
    let id_like = (1..=32).contains(&call.len()) && call.bytes().all(|b| b.is_ascii_alphanumeric());
    id_like.then(|| Ended {
        call: call.to_string(),
        at,
        window,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_remembered_is_recalled_for_that_agent_only() {
        let ended = Ended {
            call: "1f3a2b4c5".into(),
            at: 1_765_000_000_123,
            window: Duration::from_millis(10_500),
        };
        let Iq::Set { payload, .. } = remember("r".into(), "alice@example.org", &ended) else {
            panic!("a set");
        };
        assert_eq!(recalled(Some(&payload), "alice@example.org"), Some(ended));
        assert_eq!(recalled(Some(&payload), "bob@example.org"), None);
    }

    #[test]
    fn an_agent_jid_makes_a_plain_namespace() {
        assert_eq!(
            namespace("o'neil@example.org"),
            "urn:x-popivr:ended:o%27neil@example.org"
        );
        assert_eq!(
            namespace("ünï@example.org"),
            "urn:x-popivr:ended:%C3%BCn%C3%AF@example.org"
        );
    }

    #[test]
    fn an_empty_or_odd_answer_is_nothing() {
        let empty = query(Element::builder(NAME, namespace("a@b")).build());
        assert_eq!(recalled(Some(&empty), "a@b"), None);
        let odd = query(
            Element::builder(NAME, namespace("a@b"))
                .attr(attr("call"), "x y")
                .attr(attr("window"), "10")
                .append("12")
                .build(),
        );
        assert_eq!(recalled(Some(&odd), "a@b"), None);
        assert_eq!(recalled(None, "a@b"), None);
    }
}
