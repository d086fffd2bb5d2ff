//! `popivr check`'s questions to the server: which software it runs
//! (XEP-0092, `jabber:iq:version`), and whether it keeps the account's
//! private storage (XEP-0049) that per-call processes use. XMPP has no standard way to read a
//! server's limits, such as sessions per account; its software is the one
//! hint a client can get without disturbing anyone. Asked over the login's
//! own stream, before initial presence: no second session, and nobody
//! else's session is touched.

use std::time::Duration;

use tokio_xmpp::Stanza;
use tokio_xmpp::xmlstream::XmppStreamElement;
use xmpp_parsers::{
    iq::Iq,
    jid::{BareJid, Jid},
    version::{VersionQuery, VersionResult},
};

use super::error::{Phase, XmppError};
use super::login::{Connection, condition_name, next_element, send};
use super::session::{answer_iq, close};

const VERSION_ID: &str = "popivr-version";

/// The most characters of a name or version shown: the server chooses
/// them, and they go to a terminal.
const SHOWN: usize = 64;

/// What a server says it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Software {
    /// `ejabberd`, `Prosody` …, as the server spells it.
    pub name: String,
    pub version: String,
}

impl std::fmt::Display for Software {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

impl Connection {
    /// Ask the server which software it runs, waiting at most `within`.
    /// The error says in words why there is no answer: refused (with the
    /// condition), none in time, or the link failed.
    pub async fn server_software(&mut self, within: Duration) -> Result<Software, String> {
        let server = Jid::from(BareJid::from(self.jid.domain()));
        let ask = Iq::from_get(VERSION_ID, VersionQuery).with_to(server.clone());
        let payload = self.ask(ask, Some(server), within).await?;
        payload
            .and_then(|p| VersionResult::try_from(p).ok())
            .map(|v| Software {
                name: shown(&v.name),
                version: shown(&v.version),
            })
            .ok_or_else(|| "an answer without a name".to_string())
    }

    /// Whether the account's private XML storage (XEP-0049) answers, as
    /// per-call processes read it after each pop ([`super::ended`]); the
    /// error says why not, as [`Connection::server_software`]'s does.
    pub async fn private_storage(&mut self, within: Duration) -> Result<(), String> {
        let agent = self.jid.to_bare().to_string();
        let ask = super::ended::recall(format!("{}check", super::ended::RECALL_ID), &agent);
        self.ask(ask, None, within).await.map(drop)
    }

    /// Send `ask` and wait at most `within` for its answer from `from`
    /// (`None`: our own account): the result's payload, or why there is
    /// none.
    async fn ask(
        &mut self,
        ask: Iq,
        from: Option<Jid>,
        within: Duration,
    ) -> Result<Option<xmpp_parsers::minidom::Element>, String> {
        let id = ask.id().to_string();
        let own = Jid::from(self.jid.to_bare());
        let from = from.unwrap_or(own);
        let exchange = async {
            let ask = XmppStreamElement::Stanza(ask.into());
            send(&mut self.stream, &ask, Phase::Bind).await?;
            loop {
                let iq = match next_element(&mut self.stream, Phase::Bind).await? {
                    XmppStreamElement::Stanza(Stanza::Iq(iq)) => iq,
                    _ => continue,
                };
                // Only the answer of whom we asked counts: anyone may send
                // an iq to our full JID.
                let ours = iq.id() == id && iq.from().is_none_or(|f| *f == from);
                match iq {
                    Iq::Result { payload, .. } if ours => return Ok(Ok(payload)),
                    Iq::Error { error, .. } if ours => {
                        return Ok(Err(format!(
                            "refused: {}",
                            condition_name(&error.defined_condition)
                        )));
                    }
                    other => answer_iq(&mut self.stream, other).await?,
                }
            }
        };
        match tokio::time::timeout(within, exchange).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(XmppError::Io { reason, .. })) => Err(format!("connection lost: {reason}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} s", within.as_secs_f64())),
        }
    }

    /// Close the stream politely (bounded, as a session's close is).
    pub async fn close(self) {
        close(self.stream).await;
    }
}

/// `text` fit for one line of a terminal: no control characters, at most
/// [`SHOWN`] characters, trimmed.
fn shown(text: &str) -> String {
    let line: String = text
        .trim()
        .chars()
        .take(SHOWN)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    match line.is_empty() {
        true => "?".to_string(),
        false => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_shown_on_one_line() {
        assert_eq!(shown(" ejabberd "), "ejabberd");
        assert_eq!(shown("evil\x1b[2J\nname"), "evil?[2J?name");
        assert_eq!(shown(&"x".repeat(500)).len(), SHOWN);
        assert_eq!(shown(""), "?");
    }
}
