//! `TestAgent`: a real XMPP client for test code, playing the agent at a
//! desk. It is tokio-xmpp's own `StanzaStream` (its own SASL, binding and
//! stream handling), not popivr's login code, so tests of popivr's session
//! talk to an independent implementation. Only the transport is ours: a
//! STARTTLS connector that trusts the test CA.
//!
//! Not tokio-xmpp 6's `Client`: it splits the stream into halves sharing a
//! mutex, and its receive half answers `Pending` without a wake-up when
//! the send half holds that mutex (`StanzaReceiver::poll_next` uses
//! `try_lock`). A send that yields while holding it (a full queue, or the
//! task's cooperative budget spent on a loaded machine), or one on another
//! worker thread, leaves the client's reader asleep for good: the socket
//! is never read again, and pops and subscription requests seem never to
//! arrive. The unsplit `StanzaStream` has no such lock.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sasl::common::ChannelBinding;
use tokio::io::BufStream;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject},
};
use tokio_xmpp::connect::ServerConnector;
use tokio_xmpp::stanzastream::{Event, StanzaStage, StanzaState, StanzaStream, StreamEvent};
use tokio_xmpp::xmlstream::{
    PendingFeaturesRecv, ReadError, StreamHeader, Timeouts, XmppStreamElement, initiate_stream,
};
use tokio_xmpp::{IqRequest, IqResponse, Stanza};
use xmpp_parsers::{
    iq::Iq,
    jid::{BareJid, FullJid, Jid},
    message::{Lang, Message, MessageType, Thread},
    minidom::Element,
    presence::{Presence, Show, Type as PresenceType},
    starttls,
};

use super::prosody::Server;

/// How long helpers wait before failing the test. Generous: a loaded CI
/// machine must not make a correct test fail.
pub const WAIT: Duration = Duration::from_secs(10);

/// How long a login may take before the test fails: milliseconds when
/// the machine is idle, seconds when the CI runs a build beside a starting
/// ejabberd.
const LOGIN_WAIT: Duration = Duration::from_secs(30);

/// A logged-in test client.
pub struct TestAgent {
    client: StanzaStream,
    jid: FullJid,
    /// Messages that came while we waited for something else.
    backlog: VecDeque<Message>,
    /// Subscription requests that came while we waited for something else
    /// (ejabberd sends a stored request before it reflects our presence).
    requests: VecDeque<Presence>,
    next_id: u64,
}

impl TestAgent {
    /// Log in as `user` and announce presence (so messages to the bare JID
    /// reach us). Panics if not online within [`WAIT`].
    pub async fn login(server: &(impl Server + ?Sized), user: &str, password: &str) -> TestAgent {
        Self::login_as(server, &server.jid(user), password).await
    }

    /// Like [`login`](Self::login) for any JID of the server: a user of
    /// another of its hosts, or a full JID to bind that resource.
    pub async fn login_as(server: &(impl Server + ?Sized), jid: &str, password: &str) -> TestAgent {
        let mut agent = Self::connect(server, jid, password).await;
        agent.set_presence(None, None).await;
        if let Err(events) = agent.reflected().await {
            panic!(
                "agent {jid}: the server never reflected our presence within {WAIT:?} \
                 (other client events: {events:?})\n{}",
                server.log()
            );
        }
        agent
    }

    async fn connect(server: &(impl Server + ?Sized), user: &str, password: &str) -> TestAgent {
        let jid = Jid::new(user).expect("agent JID");
        let connector = TestConnector {
            addr: server.addr(),
            tls: tls_config(&server.ca_pem()),
        };
        let mut client =
            StanzaStream::new_c2s(connector, jid, password.to_owned(), Timeouts::tight(), 64);
        let bound = tokio::time::timeout(LOGIN_WAIT, async {
            loop {
                match client.next().await {
                    Some(Event::Stream(StreamEvent::Reset { bound_jid, .. })) => break bound_jid,
                    // tokio-xmpp retries on its own; the timeout ends it.
                    Some(_) => continue,
                    None => panic!("agent {user}: client ended before online"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("agent {user}: not online within {LOGIN_WAIT:?}"));
        let jid = bound.try_into_full().expect("server binds a full JID");
        TestAgent {
            client,
            jid,
            backlog: VecDeque::new(),
            requests: VecDeque::new(),
            next_id: 0,
        }
    }

    /// Keep a stanza that is not the one being waited for.
    fn keep(&mut self, stanza: Stanza) {
        match stanza {
            Stanza::Message(m) => self.backlog.push_back(m),
            Stanza::Presence(p) if p.type_ == PresenceType::Subscribe => self.requests.push_back(p),
            _ => {}
        }
    }

    /// Wait for the server to reflect our initial presence back to us:
    /// only then does it count us as available (messages to the bare JID
    /// and subscription requests reach us). Stanzas that come first are
    /// kept; other client events are returned if none comes in [`WAIT`].
    async fn reflected(&mut self) -> Result<(), Vec<String>> {
        let me: Jid = self.jid.clone().into();
        let mut other = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.client.next()).await {
                Ok(Some(Event::Stanza(Stanza::Presence(p)))) if p.from.as_ref() == Some(&me) => {
                    return Ok(());
                }
                Ok(Some(Event::Stanza(stanza))) => self.keep(stanza),
                Ok(Some(event)) => other.push(format!("{event:?}")),
                Ok(None) | Err(_) => return Err(other),
            }
        }
    }

    /// Give popivr's account `pbx` a subscription to this agent's
    /// presence, as `popivr check` does it (it asks, the agent accepts):
    /// pops only go to agents it sees.
    pub async fn subscribe_popivr(&mut self, server: &(impl Server + ?Sized), pbx_password: &str) {
        subscribe(server, ("pbx", pbx_password), &mut [self]).await;
    }

    pub fn jid(&self) -> &FullJid {
        &self.jid
    }

    /// The bare JID as a string (what popivr compares targets with).
    pub fn bare(&self) -> String {
        self.jid.to_bare().to_string()
    }

    /// Send a plain chat message.
    pub async fn send_chat(&mut self, to: &str, body: &str) {
        self.send(TestMessage::chat(to, body)).await;
    }

    /// Send a message built with [`TestMessage`].
    pub async fn send(&mut self, msg: TestMessage) {
        let stanza = msg.build(&self.jid);
        self.send_stanza(stanza.into()).await;
    }

    /// Send any stanza given as XML (for shapes `TestMessage` cannot make).
    pub async fn send_raw(&mut self, xml: &str) {
        let el: Element = xml.parse().expect("well-formed stanza");
        let stanza = Stanza::try_from(el).expect("a stanza");
        self.send_stanza(stanza).await;
    }

    /// Send a stanza and wait until it is written to the server.
    async fn send_stanza(&mut self, stanza: Stanza) {
        let sent = tokio::time::timeout(WAIT, async {
            let mut token = self.client.send(Box::new(stanza)).await;
            token.wait_for(StanzaStage::Sent).await
        })
        .await
        .expect("send timed out");
        match sent {
            Some(StanzaState::Sent { .. } | StanzaState::Acked { .. }) => {}
            other => panic!("{}: send failed: {other:?}", self.jid),
        }
    }

    /// Send an IQ and wait for its answer (panics after [`WAIT`]).
    /// Other stanzas that come meanwhile are kept.
    pub async fn iq(&mut self, to: &str, request: IqRequest) -> IqResponse {
        let to = Jid::new(to).expect("IQ recipient");
        self.next_id += 1;
        let id = format!("agent-iq-{}", self.next_id);
        let iq = match request {
            IqRequest::Get(payload) => Iq::Get {
                from: None,
                to: Some(to.clone()),
                id: id.clone(),
                payload,
            },
            IqRequest::Set(payload) => Iq::Set {
                from: None,
                to: Some(to.clone()),
                id: id.clone(),
                payload,
            },
        };
        self.send_stanza(iq.into()).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let event = tokio::time::timeout_at(deadline, self.client.next())
                .await
                .unwrap_or_else(|_| panic!("{}: no answer to IQ {id} in time", self.jid));
            match event {
                Some(Event::Stanza(Stanza::Iq(iq))) if iq.id() == id => {
                    return match iq {
                        Iq::Result { payload, .. } => IqResponse::Result(payload),
                        Iq::Error { error, .. } => IqResponse::Error(error),
                        other => panic!("{}: a request in answer to IQ {id}: {other:?}", self.jid),
                    };
                }
                Some(Event::Stanza(stanza)) => self.keep(stanza),
                Some(Event::Stream(_)) => {}
                None => panic!("{}: stream ended waiting for IQ {id}", self.jid),
            }
        }
    }

    /// Available presence with optional `<show/>` and status.
    pub async fn set_presence(&mut self, show: Option<Show>, status: Option<&str>) {
        let mut p = Presence::available();
        p.show = show;
        if let Some(s) = status {
            p.set_status(Lang::new(), s.to_owned());
        }
        self.send_stanza(p.into()).await;
    }

    /// Go offline without leaving: an unavailable presence, so the server
    /// stores messages for us and tells our contacts we are gone.
    pub async fn set_unavailable(&mut self) {
        self.send_stanza(Presence::new(xmpp_parsers::presence::Type::Unavailable).into())
            .await;
    }

    /// Wait for a subscription request from `from` (a bare JID) and
    /// accept it. Messages that arrive meanwhile are kept. `false` if none
    /// came within `timeout`.
    pub async fn approve_subscription(&mut self, from: &str, timeout: Duration) -> bool {
        let asks = |p: &Presence| {
            p.type_ == PresenceType::Subscribe
                && p.from.as_ref().map(|f| f.to_bare().to_string()).as_deref() == Some(from)
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let mut asked = match self.requests.iter().position(asks) {
            Some(i) => {
                self.requests.remove(i);
                true
            }
            None => false,
        };
        while !asked {
            let event = match tokio::time::timeout_at(deadline, self.client.next()).await {
                Ok(Some(event)) => event,
                _ => return false,
            };
            match event {
                Event::Stanza(Stanza::Presence(p)) if asks(&p) => asked = true,
                Event::Stanza(stanza) => self.keep(stanza),
                Event::Stream(_) => {}
            }
        }
        let mut ok = Presence::new(PresenceType::Subscribed);
        ok.to = Some(Jid::new(from).expect("a bare JID"));
        self.send_stanza(ok.into()).await;
        true
    }

    /// The next message that `pred` accepts, waiting up to `timeout`;
    /// others are kept for later calls. `None` on timeout.
    pub async fn next_message_within(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Message) -> bool,
    ) -> Option<Message> {
        if let Some(i) = self.backlog.iter().position(&pred) {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let event = tokio::time::timeout_at(deadline, self.client.next())
                .await
                .ok()?;
            match event {
                Some(Event::Stanza(Stanza::Message(m))) => {
                    if pred(&m) {
                        return Some(m);
                    }
                    self.backlog.push_back(m);
                }
                Some(Event::Stanza(stanza)) => self.keep(stanza),
                Some(Event::Stream(_)) => {}
                None => return None,
            }
        }
    }

    /// The next message that `pred` accepts; panics after
    /// [`WAIT`].
    pub async fn expect_message(&mut self, pred: impl Fn(&Message) -> bool) -> Message {
        self.next_message_within(WAIT, pred)
            .await
            .unwrap_or_else(|| panic!("{}: no matching message within {WAIT:?}", self.jid))
    }

    /// Join `room` (a bare room JID) as `nick`, which creates it with us
    /// as its owner, and configure who sees real JIDs (`whois`:
    /// `anyone` or `moderators`); the room is kept when we leave. Only the
    /// owner may configure a room, so success proves both.
    pub async fn own_room(&mut self, room: &str, nick: &str, whois: &str) -> Result<(), String> {
        self.send_raw(&format!(
            "<presence xmlns='jabber:client' to='{room}/{nick}'>\
               <x xmlns='http://jabber.org/protocol/muc'/></presence>"
        ))
        .await;
        let form: Element = format!(
            "<query xmlns='http://jabber.org/protocol/muc#owner'>\
               <x xmlns='jabber:x:data' type='submit'>\
                 <field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#roomconfig</value></field>\
                 <field var='muc#roomconfig_whois'><value>{whois}</value></field>\
                 <field var='muc#roomconfig_persistentroom'><value>1</value></field>\
               </x></query>"
        )
        .parse()
        .expect("room configuration form");
        match self.iq(room, IqRequest::Set(form)).await {
            IqResponse::Result(_) => Ok(()),
            IqResponse::Error(e) => Err(format!("room configuration refused: {e:?}")),
        }
    }

    /// Ask the server for XEP-0280 carbons: copies of what our other
    /// devices send and receive.
    pub async fn enable_carbons(&mut self) {
        self.send_raw(
            "<iq xmlns='jabber:client' type='set' id='carbons-on'>\
             <enable xmlns='urn:xmpp:carbons:2'/></iq>",
        )
        .await;
    }

    /// Log out cleanly.
    pub async fn close(self) {
        let _ = tokio::time::timeout(WAIT, self.client.close()).await;
    }
}

/// popivr's account (`user` with `password` on `server`) subscribed to
/// every agent's presence, as `popivr check` does it (it asks, the agents
/// accept): pops only go to agents it sees. Call it before a daemon holds
/// the account.
pub async fn subscribe(
    server: &(impl Server + ?Sized),
    (user, password): (&str, &str),
    agents: &mut [&mut TestAgent],
) {
    let account = server.account(user, password);
    let contacts: Vec<String> = agents.iter().map(|a| a.bare()).collect();
    let popivr = server.jid(user);
    // The request comes once popivr's account has logged in, which on a
    // loaded machine (many servers starting at once) can itself take
    // seconds.
    let approvals = agents
        .iter_mut()
        .map(|agent| agent.approve_subscription(&popivr, 3 * WAIT));
    let (states, approved) = futures::join!(
        popivr::xmpp::survey(&account, &contacts, WAIT),
        futures::future::join_all(approvals)
    );
    let states = states.expect("popivr's account logs in");
    // The roster states say whether popivr asked.
    assert!(
        approved.iter().all(|ok| *ok),
        "an agent got no subscription request from popivr: {approved:?}; popivr saw {states:?}"
    );
    assert!(states.iter().all(|s| s.subscribed), "{states:?}");
}

/// The body of a message in the default language, if any.
pub fn body(m: &Message) -> Option<&str> {
    m.get_best_body(vec![]).map(|(_, b)| b.as_str())
}

/// Where a hostile message hides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrapper {
    /// XEP-0280 `<received/>` carbon.
    CarbonReceived,
    /// XEP-0280 `<sent/>` carbon.
    CarbonSent,
    /// A bare XEP-0297 `<forwarded/>`.
    Forwarded,
}

/// A message for an agent to send.
#[derive(Debug, Clone)]
pub struct TestMessage {
    pub to: String,
    pub kind: MessageType,
    pub body: Option<String>,
    pub thread: Option<String>,
    /// Add a XEP-0203 `<delay/>` (as offline storage would).
    pub delay: bool,
    /// Also wrap a copy of the message as a carbon or forward.
    pub wrapper: Option<Wrapper>,
}

impl TestMessage {
    pub fn chat(to: &str, body: &str) -> TestMessage {
        TestMessage {
            to: to.to_owned(),
            kind: MessageType::Chat,
            body: Some(body.to_owned()),
            thread: None,
            delay: false,
            wrapper: None,
        }
    }

    pub fn kind(mut self, kind: MessageType) -> Self {
        self.kind = kind;
        self
    }

    pub fn thread(mut self, id: &str) -> Self {
        self.thread = Some(id.to_owned());
        self
    }

    pub fn delayed(mut self) -> Self {
        self.delay = true;
        self
    }

    pub fn wrapped(mut self, wrapper: Wrapper) -> Self {
        self.wrapper = Some(wrapper);
        self
    }

    fn build(&self, from: &FullJid) -> Message {
        let to = Jid::new(&self.to).expect("recipient JID");
        let mut msg = Message::new_with_type(self.kind.clone(), Some(to.clone()));
        if let Some(body) = &self.body {
            msg = msg.with_body(Lang::new(), body.clone());
        }
        msg.thread = self.thread.as_ref().map(|id| Thread {
            parent: None,
            id: id.clone(),
        });
        if self.delay {
            let delay = format!(
                "<delay xmlns='urn:xmpp:delay' from='{}' stamp='2002-09-10T23:08:25Z'/>",
                from.domain()
            );
            msg.payloads.push(delay.parse().expect("delay element"));
        }
        if let Some(wrapper) = self.wrapper {
            // The inner copy claims to come from us, like a real carbon.
            let mut inner = Message::new_with_type(self.kind.clone(), Some(to));
            inner.from = Some(from.clone().into());
            if let Some(body) = &self.body {
                inner = inner.with_body(Lang::new(), body.clone());
            }
            let forwarded = Element::builder("forwarded", "urn:xmpp:forward:0")
                .append(Element::from(inner))
                .build();
            let payload = match wrapper {
                Wrapper::Forwarded => forwarded,
                Wrapper::CarbonReceived | Wrapper::CarbonSent => {
                    let name = if wrapper == Wrapper::CarbonSent {
                        "sent"
                    } else {
                        "received"
                    };
                    Element::builder(name, "urn:xmpp:carbons:2")
                        .append(forwarded)
                        .build()
                }
            };
            msg.payloads.push(payload);
        }
        msg
    }
}

fn tls_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA PEM")).expect("add CA");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// TCP to a fixed address, then STARTTLS trusting the test CA.
#[derive(Clone)]
struct TestConnector {
    addr: SocketAddr,
    tls: Arc<ClientConfig>,
}

impl std::fmt::Debug for TestConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TestConnector({})", self.addr)
    }
}

impl ServerConnector for TestConnector {
    type Stream = BufStream<TlsStream<TcpStream>>;

    async fn connect(
        &self,
        jid: &Jid,
        ns: &'static str,
        timeouts: Timeouts,
    ) -> Result<(PendingFeaturesRecv<Self::Stream>, ChannelBinding), tokio_xmpp::Error> {
        let domain = jid.domain().as_str();
        let header = || StreamHeader {
            to: Some(domain.to_owned().into()),
            from: None,
            id: None,
        };
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        let pending = initiate_stream(BufStream::new(tcp), ns, header(), timeouts).await?;
        let (_features, mut stream) = pending
            .recv_features::<tokio_xmpp::xmlstream::FallibleStreamElement>()
            .await?;
        stream
            .send(&XmppStreamElement::Starttls(starttls::Nonza::Request(
                starttls::Request,
            )))
            .await?;
        loop {
            match stream.next().await {
                Some(Ok(el)) => match el.into_read_error() {
                    Ok(XmppStreamElement::Starttls(starttls::Nonza::Proceed(_))) => break,
                    Ok(_) => continue,
                    Err(e) => return Err(std::io::Error::other(e.to_string()).into()),
                },
                Some(Err(ReadError::SoftTimeout)) => continue,
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string()).into()),
                None => return Err(tokio_xmpp::Error::Disconnected),
            }
        }
        let tcp = stream.into_inner().into_inner();
        let name = ServerName::try_from(domain.to_owned()).expect("domain is a DNS name");
        let tls = TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await?;
        let pending = initiate_stream(BufStream::new(tls), ns, header(), timeouts).await?;
        // No channel binding: prosody 0.12 offers no -PLUS mechanism on
        // TLS 1.3, so tokio-xmpp would otherwise skip SCRAM for PLAIN.
        Ok((pending, ChannelBinding::None))
    }
}
