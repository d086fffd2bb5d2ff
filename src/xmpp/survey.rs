//! `popivr check`'s look at the roster: who is subscribed, who is online.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use super::{SessionOptions, XmppEvent, spawn};
use crate::call::{RosterItem, Show, XmppStatus};
use crate::config::Account;

/// How one contact stands with our account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactState {
    /// Normalised bare JID.
    pub jid: String,
    /// The contact is in our roster at all.
    pub in_roster: bool,
    /// We receive their presence (subscription `to` or `both`).
    pub subscribed: bool,
    /// Our subscription request waits for their answer (it was sent now
    /// if it was missing).
    pub asked: bool,
    /// Each available or unavailable resource seen, with its show.
    pub resources: Vec<(String, Show)>,
}

/// Log in as `account`, read the roster, ask the `contacts` that have not
/// accepted a subscription yet, accept theirs, and listen for presence for
/// at most `wait` (less once every subscribed contact has been heard and
/// nothing is pending). The error is the login failure, in words.
pub async fn survey(
    account: &Account,
    contacts: &[String],
    wait: Duration,
) -> Result<Vec<ContactState>, String> {
    let options = SessionOptions {
        contacts: contacts.to_vec(),
        rooms: Vec::new(),
        keepalive: None,
    };
    let mut session = spawn(account.clone(), options);
    let mut roster: Option<BTreeMap<String, RosterItem>> = None;
    let mut seen: BTreeMap<String, BTreeMap<String, Show>> = BTreeMap::new();
    let mut deadline = None;
    loop {
        let next = match deadline {
            None => session.recv().await,
            Some(at) => match timeout_at(at, session.recv()).await {
                Ok(ev) => ev,
                Err(_) => break,
            },
        };
        match next {
            None => break,
            Some(XmppEvent::Status(XmppStatus::Failed(cause))) if deadline.is_none() => {
                session.close().await;
                return Err(cause);
            }
            Some(XmppEvent::Status(XmppStatus::Online)) => {
                deadline = Some(Instant::now() + wait);
            }
            Some(XmppEvent::Status(XmppStatus::Failed(_))) => break,
            Some(XmppEvent::Roster(items)) => {
                roster = Some(items.into_iter().map(|i| (i.jid.clone(), i)).collect());
            }
            Some(XmppEvent::RosterUpdate(item)) => {
                // Presence heard before the contact accepted is the
                // server's answer to our probe ("unavailable" for the bare
                // JID), not theirs: their real presence follows the accept.
                let was = roster.as_ref().and_then(|r| r.get(&item.jid));
                if item.subscribed && !was.is_some_and(|i| i.subscribed) {
                    seen.remove(&item.jid);
                }
                roster
                    .get_or_insert_with(BTreeMap::new)
                    .insert(item.jid.clone(), item);
            }
            Some(XmppEvent::Presence(p)) if p.muc.is_none() => {
                seen.entry(p.from_bare)
                    .or_default()
                    .insert(p.from_full, p.show);
            }
            Some(_) => {}
        }
        if let Some(r) = &roster
            && contacts.iter().all(|c| {
                r.get(c)
                    .is_some_and(|i| i.subscribed && seen.contains_key(c))
            })
        {
            break;
        }
    }
    session.close().await;
    let roster = roster.unwrap_or_default();
    Ok(contacts
        .iter()
        .map(|c| {
            let item = roster.get(c);
            ContactState {
                jid: c.clone(),
                in_roster: item.is_some(),
                subscribed: item.is_some_and(|i| i.subscribed),
                asked: item.is_none_or(|i| !i.subscribed),
                resources: seen
                    .get(c)
                    .map(|r| r.iter().map(|(k, v)| (k.clone(), *v)).collect())
                    .unwrap_or_default(),
            }
        })
        .collect())
}
