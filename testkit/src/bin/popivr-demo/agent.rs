//! The scripted agent: popivr's own XMPP session, logged in as the agent's
//! account. It waits for the pop, "thinks", replies, and reads the
//! confirmation, logging each step with its time.

use std::time::Duration;

use anyhow::{Result, bail};
use popivr::call::{IncomingMessage, OutgoingMessage};
use popivr::config::Account;
use popivr::xmpp::{self, Session, XmppEvent, XmppStatus};
use tokio::time::timeout;

use super::show::{AgentLog, Side};

/// How long the agent waits for the pop and for the confirmation.
const PATIENCE: Duration = Duration::from_secs(20);

/// What the agent does.
#[derive(Debug, Clone)]
pub struct Script {
    /// The reply text (`1`, `2`, `fwd 2001`, `h` …).
    pub reply: String,
    /// Time between reading the pop and replying.
    pub think: Duration,
}

/// Log in and come online (presence sent), as an agent at their desk who
/// accepts popivr's (`pbx`) request to see their presence.
pub async fn login(account: Account, pbx: &str) -> Result<Session> {
    let options = xmpp::SessionOptions {
        contacts: vec![pbx.to_string()],
        rooms: Vec::new(),
        keepalive: None,
    };
    let mut session = xmpp::spawn(account, options);
    match timeout(PATIENCE, session.recv()).await {
        Ok(Some(XmppEvent::Status(XmppStatus::Online))) => Ok(session),
        Ok(Some(XmppEvent::Status(XmppStatus::Failed(why)))) => {
            bail!("the agent could not log in: {why}")
        }
        Ok(other) => bail!("the agent's session ended early: {other:?}"),
        Err(_) => bail!("the agent was not online within {PATIENCE:?}"),
    }
}

/// Play the script against the popivr account `pbx` (a bare JID).
pub async fn play(mut session: Session, pbx: String, script: Script, log: AgentLog) -> Result<()> {
    let pop = next_from(&mut session, &pbx).await?;
    log.push(
        Side::Received,
        format!("pop from {pbx}: {}", pop.body.as_deref().unwrap_or("")),
    );
    tokio::time::sleep(script.think).await;
    session.send(OutgoingMessage::chat(
        pbx.clone(),
        script.reply.clone(),
        pop.thread.clone(),
    ));
    log.push(Side::Sent, format!("reply to {pbx}: {}", script.reply));
    match next_from(&mut session, &pbx).await {
        Ok(m) => log.push(
            Side::Received,
            format!("from {pbx}: {}", m.body.as_deref().unwrap_or("")),
        ),
        Err(e) => log.push(Side::Note, format!("no confirmation: {e}")),
    }
    session.close().await;
    Ok(())
}

/// The next message with a body from `from`.
async fn next_from(session: &mut Session, from: &str) -> Result<IncomingMessage> {
    let wait = async {
        loop {
            match session.recv().await {
                Some(XmppEvent::Message(m)) if m.from_bare == from && m.body.is_some() => {
                    return Ok(m);
                }
                Some(XmppEvent::Status(XmppStatus::Failed(why))) => {
                    bail!("the agent's connection failed: {why}")
                }
                None => bail!("the agent's session ended"),
                Some(_) => {}
            }
        }
    };
    match timeout(PATIENCE, wait).await {
        Ok(result) => result,
        Err(_) => bail!("nothing from {from} within {PATIENCE:?}"),
    }
}
