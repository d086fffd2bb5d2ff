//! One login attempt: TCP, STARTTLS, SASL, resource binding.
//!
//! tokio-xmpp's `Client` retries failed logins forever in the background
//! (a wrong CA gave a reconnect every 30 s and no error). A call needs the
//! opposite: one attempt, bounded by the account's `timeout`, and the cause
//! of a failure. So this module drives tokio-xmpp's XML stream layer itself
//! and owns every step, which also lets it keep the steps fast:
//!
//! - TCP_NODELAY and quick ACKs (see `transport`): without them a TLS login
//!   to prosody stalled ~40 ms on a delayed ACK.
//! - no DNS for an IP literal `serverhost`, and no SRV lookup at all: like
//!   Asterisk's res_xmpp we connect to `serverhost` (or the JID's domain).
//! - the system trust store is read only when it can matter (see `tls`).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use ::sasl::client::Mechanism;
use ::sasl::client::mechanisms::{Plain, Scram};
use ::sasl::common::scram::{Sha1, Sha256};
use ::sasl::common::{ChannelBinding, Credentials};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncBufRead, AsyncWrite, BufStream};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{ClientConfig, ProtocolVersion, pki_types::ServerName};
use tokio_xmpp::Stanza;
use tokio_xmpp::connect::AsyncReadAndWrite;
use tokio_xmpp::xmlstream::{
    FallibleStreamElement, ReadError, RecvFeaturesError, StreamHeader, Timeouts, XmlStream,
    XmppStreamElement, initiate_stream,
};
use xmpp_parsers::{
    bind::{BindQuery, BindResponse},
    iq::Iq,
    jid::{BareJid, FullJid, Jid},
    ns,
    sasl::{self as xsasl, Nonza as SaslNonza},
    sasl_cb, starttls,
    stream_features::StreamFeatures,
};

use super::error::{Phase, XmppError, io_reason};
use super::tls;
use super::transport::QuickAckStream;
use crate::config::Account;

/// The transport under the XML stream once login is done (TLS or, when
/// explicitly allowed, plain TCP).
pub(crate) type Io = Box<dyn AsyncReadAndWrite + Send + 'static>;
/// The logged-in stream.
pub(crate) type Stream = XmlStream<Io, FallibleStreamElement>;

const BIND_ID: &str = "popivr-bind";

/// Idle times of the XML stream once online: after `read_timeout` of
/// silence the session pings the server, and if nothing arrives within
/// `response_timeout` after that the link is taken as dead.
pub(crate) const STREAM_TIMEOUTS: Timeouts = Timeouts {
    read_timeout: Duration::from_secs(60),
    response_timeout: Duration::from_secs(20),
};

/// How long each step of a login took.
#[derive(Debug, Clone, Default)]
pub struct LoginTimings {
    pub phases: Vec<(Phase, Duration)>,
    pub total: Duration,
}

impl fmt::Display for LoginTimings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.2} ms (", ms(self.total))?;
        for (i, (phase, d)) in self.phases.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{phase} {:.2}", ms(*d))?;
        }
        f.write_str(")")
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What a login's steps end with: the stream, the bound JID, the SASL
/// mechanism (and why it ran unbound) and the socket's written-bytes count.
type Bound = (
    Stream,
    FullJid,
    (&'static str, Option<&'static str>),
    Arc<AtomicU64>,
);

/// A logged-in, bound stream.
pub struct Connection {
    pub(crate) stream: Stream,
    /// Bytes the kernel has taken from the stream's socket so far.
    pub(crate) written: Arc<AtomicU64>,
    /// The full JID the server bound us to.
    pub jid: FullJid,
    /// SASL mechanism used (for logs and tests).
    pub mechanism: &'static str,
    /// Why SCRAM ran without channel binding (`None`: it was bound with
    /// tls-exporter, or the mechanism is not SCRAM).
    pub unbound: Option<&'static str>,
    pub timings: LoginTimings,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("jid", &self.jid)
            .field("mechanism", &self.mechanism)
            .field("unbound", &self.unbound)
            .field("timings", &self.timings)
            .finish_non_exhaustive()
    }
}

/// Log in once. Fails with the cause, never retries, and never takes
/// longer than the account's `timeout`.
pub async fn login(account: &Account) -> Result<Connection, XmppError> {
    let plan = Plan::new(account)?;
    let mut progress = Progress::new();
    match tokio::time::timeout(account.timeout, plan.run(&mut progress)).await {
        Ok(Ok((stream, jid, (mechanism, unbound), written))) => Ok(Connection {
            stream,
            written,
            jid,
            mechanism,
            unbound,
            timings: progress.finish(),
        }),
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => Err(XmppError::Timeout {
            after: account.timeout,
            phase: progress.phase,
        }),
    }
}

/// What a login needs, checked before any I/O.
struct Plan<'a> {
    jid: BareJid,
    /// The resource we ask for (made unique per login).
    resource: String,
    host: String,
    port: u16,
    /// `None`: plain TCP (only with `allow_plaintext`).
    tls: Option<Arc<ClientConfig>>,
    secret: &'a str,
}

impl<'a> Plan<'a> {
    fn new(account: &'a Account) -> Result<Self, XmppError> {
        if !account.usesasl {
            return Err(XmppError::Config(
                "usesasl=no is not supported: popivr always authenticates with SASL".into(),
            ));
        }
        if !account.usetls && !account.allow_plaintext {
            return Err(XmppError::Config(
                "usetls=no is refused unless allow_plaintext=yes".into(),
            ));
        }
        let jid = Jid::new(&account.username).map_err(|e| {
            XmppError::Config(format!("username {:?} is not a JID: {e}", account.username))
        })?;
        if jid.node().is_none() {
            return Err(XmppError::Config(format!(
                "username {:?} has no local part (user@domain)",
                account.username
            )));
        }
        let host = account
            .serverhost
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| jid.domain().to_string());
        let tls = if account.usetls {
            let config = tls::client_config(account.ca_file.as_deref())?;
            if account.ca_file.is_none() {
                tls::preload_system_roots();
            }
            Some(config)
        } else {
            None
        };
        Ok(Plan {
            resource: unique_resource(jid.resource().map(|r| r.as_str())),
            jid: jid.to_bare(),
            host,
            port: account.port,
            tls,
            secret: &account.secret,
        })
    }

    async fn run(&self, progress: &mut Progress) -> Result<Bound, XmppError> {
        let domain = self.jid.domain().as_str();
        let header = || StreamHeader {
            to: Some(Cow::Borrowed(domain)),
            from: None,
            id: None,
        };

        let tcp = self.connect(progress).await?;
        let written = tcp.written();

        progress.enter(Phase::Stream);
        let stream = initiate_stream(
            BufStream::new(tcp),
            ns::JABBER_CLIENT,
            header(),
            STREAM_TIMEOUTS,
        )
        .await
        .map_err(|e| io_error(Phase::Stream, &e))?;
        let (features, mut stream) = recv_features(stream, Phase::Stream).await?;

        let (features, mut stream, binding): (_, Stream, _) = match &self.tls {
            None => (features, stream.box_stream(), None),
            Some(config) => {
                progress.enter(Phase::StartTls);
                if !features.can_starttls() {
                    return Err(XmppError::NoStartTls);
                }
                starttls(&mut stream).await?;

                progress.enter(Phase::TlsHandshake);
                let tcp = stream.into_inner().into_inner();
                let name = ServerName::try_from(domain.to_owned())
                    .map_err(|e| XmppError::Tls(format!("{domain:?} is not a valid name: {e}")))?;
                let tls = TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| XmppError::Tls(tls::describe_handshake_error(&e, domain)))?;
                let binding = tls_exporter(&tls);

                progress.enter(Phase::TlsStream);
                let io: Io = Box::new(BufStream::new(tls));
                let stream = initiate_stream(io, ns::JABBER_CLIENT, header(), STREAM_TIMEOUTS)
                    .await
                    .map_err(|e| io_error(Phase::TlsStream, &e))?;
                let (features, stream) = recv_features(stream, Phase::TlsStream).await?;
                (features, stream, binding)
            }
        };

        progress.enter(Phase::Auth);
        let mechanism = self.authenticate(&mut stream, &features, binding).await?;

        progress.enter(Phase::AuthStream);
        let stream = stream
            .initiate_reset()
            .send_header(header())
            .await
            .map_err(|e| io_error(Phase::AuthStream, &e))?;
        let (features, mut stream) = recv_features(stream, Phase::AuthStream).await?;

        progress.enter(Phase::Bind);
        if !features.can_bind() {
            return Err(XmppError::Bind("server offers no resource binding".into()));
        }
        let jid = bind(&mut stream, &self.resource).await?;
        Ok((stream, jid, mechanism, written))
    }

    async fn connect(&self, progress: &mut Progress) -> Result<QuickAckStream, XmppError> {
        // `[::1]` in a config file means the IPv6 literal.
        let bare_host = self.host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare_host.parse::<IpAddr>() {
            Ok(ip) => {
                progress.relabel(Phase::Connect);
                vec![SocketAddr::new(ip, self.port)]
            }
            Err(_) => {
                let resolved = tokio::net::lookup_host((bare_host, self.port))
                    .await
                    .map_err(|e| XmppError::Resolve {
                        host: self.host.clone(),
                        reason: io_reason(&e),
                    })?;
                progress.enter(Phase::Connect);
                resolved.collect()
            }
        };
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    return QuickAckStream::new(tcp).map_err(|e| io_error(Phase::Connect, &e));
                }
                Err(e) => last = Some((addr, e)),
            }
        }
        Err(match last {
            Some((addr, e)) => XmppError::Connect {
                addr: addr.to_string(),
                reason: io_reason(&e),
            },
            None => XmppError::Resolve {
                host: self.host.clone(),
                reason: "no addresses".into(),
            },
        })
    }

    /// SASL. Preference: SCRAM with channel binding, SCRAM, then PLAIN (only
    /// inside TLS). The server's signature in a SCRAM success is checked, so
    /// a server that does not know the password cannot pretend it does.
    async fn authenticate<S: AsyncBufRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut XmlStream<S, FallibleStreamElement>,
        features: &StreamFeatures,
        binding: Option<Vec<u8>>,
    ) -> Result<(&'static str, Option<&'static str>), XmppError> {
        let cb = decide_binding(
            binding.is_some(),
            &features.sasl_mechanisms,
            features.sasl_cb.as_ref().map(|cb| cb.types.as_slice()),
        );
        let (name, mut mech) = choose_mechanism(
            &features.sasl_mechanisms,
            self.tls.is_some(),
            binding,
            cb,
            self.jid.node().map(|n| n.as_str()).unwrap_or_default(),
            self.secret,
        )?;
        let unbound = match cb {
            CbDecision::Bind => None,
            CbDecision::Unbound { why, .. } => Some(why),
        };
        let mechanism = xsasl::Mechanism::from_str(name)
            .map_err(|e| XmppError::Auth(format!("{name}: {e}")))?;
        let auth = xsasl::Auth {
            mechanism,
            data: mech.initial(),
        };
        send(
            stream,
            &XmppStreamElement::Sasl(SaslNonza::Auth(auth)),
            Phase::Auth,
        )
        .await?;
        loop {
            match next_element(stream, Phase::Auth).await? {
                XmppStreamElement::Sasl(SaslNonza::Challenge(c)) => {
                    let data = mech
                        .response(&c.data)
                        .map_err(|e| XmppError::Auth(format!("{name}: {e}")))?;
                    let response = SaslNonza::Response(xsasl::Response { data });
                    send(stream, &XmppStreamElement::Sasl(response), Phase::Auth).await?;
                }
                XmppStreamElement::Sasl(SaslNonza::Success(s)) => {
                    mech.success(&s.data).map_err(|e| {
                        XmppError::Auth(format!("{name}: server proof rejected: {e}"))
                    })?;
                    return Ok((name, unbound.filter(|_| name.starts_with("SCRAM"))));
                }
                XmppStreamElement::Sasl(SaslNonza::Failure(f)) => {
                    return Err(failure_error(name, &f));
                }
                other => {
                    return Err(XmppError::Protocol(format!(
                        "unexpected element during SASL: {}",
                        element_name(&other)
                    )));
                }
            }
        }
    }
}

/// How SCRAM is to treat channel binding on this login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CbDecision {
    /// SCRAM-*-PLUS with tls-exporter (RFC 9266).
    Bind,
    /// Plain SCRAM. `flag_y`: the gs2 flag "y" (we could bind, the server
    /// offered no -PLUS: a server that did offer one detects the
    /// stripping); otherwise "n". `why` is for the log.
    Unbound { flag_y: bool, why: &'static str },
}

/// Decide channel binding from what the server announced.
///
/// popivr binds only with tls-exporter, which exists only on TLS 1.3
/// (`exporter`: we have its value). SCRAM itself cannot tell the client
/// which binding type the server expects, and a mismatch is a failed login
/// that looks like a wrong password and counts towards ejabberd's
/// `mod_fail2ban`. So -PLUS is used only when the server names
/// tls-exporter in its XEP-0440 list: servers that implement tls-exporter
/// announce it (ejabberd since 24.02 added both together), while servers
/// that predate RFC 9266 offer -PLUS for tls-unique alone, which TLS 1.3
/// does not define (ejabberd 23.01: "Invalid channel binding"). A login
/// is never retried with other settings: one attempt, one result.
fn decide_binding(
    exporter: bool,
    offered: &BTreeSet<String>,
    announced: Option<&[sasl_cb::Type]>,
) -> CbDecision {
    let plus_offered = offered.iter().any(|m| m.ends_with("-PLUS"));
    if !exporter {
        return CbDecision::Unbound {
            flag_y: false,
            why: "no TLS 1.3, so no tls-exporter channel binding",
        };
    }
    if !plus_offered {
        return CbDecision::Unbound {
            flag_y: true,
            why: "the server offers no channel binding (no SCRAM-*-PLUS)",
        };
    }
    match announced {
        Some(types) if types.contains(&sasl_cb::Type::TlsExporter) => CbDecision::Bind,
        Some(_) => CbDecision::Unbound {
            flag_y: false,
            why: "the server's channel-binding types (XEP-0440) do not include tls-exporter",
        },
        None => CbDecision::Unbound {
            flag_y: false,
            why: "the server offers SCRAM-*-PLUS without naming its channel-binding types \
                  (XEP-0440); such servers bind with tls-unique only, which TLS 1.3 lacks \
                  (ejabberd before 24.02)",
        },
    }
}

/// Pick a SASL mechanism the server offers: SCRAM-*-PLUS when `cb` says
/// bind (and the exporter value is there), SCRAM-SHA-256, SCRAM-SHA-1,
/// then PLAIN (only inside TLS).
fn choose_mechanism(
    offered: &BTreeSet<String>,
    secure: bool,
    binding: Option<Vec<u8>>,
    cb: CbDecision,
    user: &str,
    secret: &str,
) -> Result<(&'static str, Box<dyn Mechanism + Send>), XmppError> {
    let creds = |cb: ChannelBinding| {
        Credentials::default()
            .with_username(user)
            .with_password(secret)
            .with_channel_binding(cb)
    };
    let scram = |name: &'static str, cb| -> Result<_, XmppError> {
        let mech: Box<dyn Mechanism + Send> = if name.starts_with("SCRAM-SHA-256") {
            Box::new(Scram::<Sha256>::from_credentials(creds(cb)).map_err(sasl_setup)?)
        } else {
            Box::new(Scram::<Sha1>::from_credentials(creds(cb)).map_err(sasl_setup)?)
        };
        Ok((name, mech))
    };

    if let (CbDecision::Bind, Some(data)) = (cb, binding.as_ref()) {
        for name in ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS"] {
            if offered.contains(name) {
                return scram(name, ChannelBinding::TlsExporter(data.clone()));
            }
        }
    }
    let flag = match cb {
        CbDecision::Unbound { flag_y: true, .. } => ChannelBinding::Unsupported,
        _ => ChannelBinding::None,
    };
    for name in ["SCRAM-SHA-256", "SCRAM-SHA-1"] {
        if offered.contains(name) {
            return scram(name, flag);
        }
    }
    // PLAIN hands the password to the peer: only over verified TLS.
    if secure && offered.contains("PLAIN") {
        let plain = Plain::from_credentials(creds(ChannelBinding::None)).map_err(sasl_setup)?;
        return Ok(("PLAIN", Box::new(plain)));
    }
    let list = if offered.is_empty() {
        "none".to_owned()
    } else {
        offered.iter().cloned().collect::<Vec<_>>().join(" ")
    };
    Err(XmppError::Auth(if secure {
        format!("no supported SASL mechanism (server offers: {list})")
    } else {
        format!("no SASL mechanism usable without TLS (server offers: {list})")
    }))
}

/// A SASL `<failure/>` as an error. With -PLUS the server checks the
/// channel binding too: a failure the server blames on it is a
/// [`XmppError::ChannelBinding`] (a TLS-intercepting box between popivr and
/// the server, or a server bug), never read as a wrong password; any other
/// failure of a bound login says that both are possible.
fn failure_error(mechanism: &str, f: &xsasl::Failure) -> XmppError {
    let condition = condition_name(&f.defined_condition);
    if !mechanism.ends_with("-PLUS") {
        return XmppError::Auth(condition);
    }
    let text = f.texts.values().next().map(String::as_str).unwrap_or("");
    if text.to_ascii_lowercase().contains("channel binding") {
        XmppError::ChannelBinding(format!(
            "{condition} ({text:?}): the server's end of the TLS connection is not the one \
             popivr negotiated with (a TLS-inspecting proxy?) or its tls-exporter is broken"
        ))
    } else {
        XmppError::Auth(format!(
            "{condition} (with tls-exporter channel binding: a wrong username/secret, \
             or a channel-binding mismatch)"
        ))
    }
}

fn sasl_setup(e: ::sasl::client::MechanismError) -> XmppError {
    XmppError::Auth(format!("SASL set-up: {e}"))
}

/// RFC 9266 channel-binding data; only defined for TLS 1.3.
fn tls_exporter<S>(tls: &tokio_rustls::client::TlsStream<S>) -> Option<Vec<u8>> {
    let (_, conn) = tls.get_ref();
    if conn.protocol_version() != Some(ProtocolVersion::TLSv1_3) {
        return None;
    }
    conn.export_keying_material(vec![0u8; 32], b"EXPORTER-Channel-Binding", None)
        .ok()
}

async fn starttls<S: AsyncBufRead + AsyncWrite + Unpin>(
    stream: &mut XmlStream<S, FallibleStreamElement>,
) -> Result<(), XmppError> {
    let request = XmppStreamElement::Starttls(starttls::Nonza::Request(starttls::Request));
    send(stream, &request, Phase::StartTls).await?;
    match next_element(stream, Phase::StartTls).await? {
        XmppStreamElement::Starttls(starttls::Nonza::Proceed(_)) => Ok(()),
        XmppStreamElement::Starttls(_) => Err(XmppError::Tls("server refused STARTTLS".into())),
        other => Err(XmppError::Protocol(format!(
            "expected <proceed/>, got {}",
            element_name(&other)
        ))),
    }
}

async fn bind<S: AsyncBufRead + AsyncWrite + Unpin>(
    stream: &mut XmlStream<S, FallibleStreamElement>,
    resource: &str,
) -> Result<FullJid, XmppError> {
    let iq = Iq::from_set(BIND_ID, BindQuery::new(Some(resource.to_owned())));
    send(stream, &XmppStreamElement::Stanza(iq.into()), Phase::Bind).await?;
    loop {
        let Stanza::Iq(iq) = (match next_element(stream, Phase::Bind).await? {
            XmppStreamElement::Stanza(stanza) => stanza,
            other => {
                return Err(XmppError::Protocol(format!(
                    "unexpected element during bind: {}",
                    element_name(&other)
                )));
            }
        }) else {
            continue; // nothing else should come before the bind result
        };
        if iq.id() != BIND_ID {
            continue;
        }
        return match iq {
            Iq::Result {
                payload: Some(payload),
                ..
            } => BindResponse::try_from(payload)
                .map(FullJid::from)
                .map_err(|e| XmppError::Bind(format!("bad bind result: {e}"))),
            Iq::Error { error, .. } => {
                Err(XmppError::Bind(condition_name(&error.defined_condition)))
            }
            _ => Err(XmppError::Bind("bind result without a JID".into())),
        };
    }
}

async fn recv_features<S: AsyncBufRead + AsyncWrite + Unpin>(
    pending: tokio_xmpp::xmlstream::PendingFeaturesRecv<S>,
    phase: Phase,
) -> Result<(StreamFeatures, XmlStream<S, FallibleStreamElement>), XmppError> {
    pending.recv_features().await.map_err(|e| match e {
        RecvFeaturesError::Io(e) => io_error(phase, &e),
        RecvFeaturesError::StreamError(e) => super::error::stream_error(&e.0),
    })
}

pub(crate) async fn send<S: AsyncWrite + Unpin>(
    stream: &mut XmlStream<S, FallibleStreamElement>,
    el: &XmppStreamElement,
    phase: Phase,
) -> Result<(), XmppError> {
    stream.send(el).await.map_err(|e| io_error(phase, &e))
}

/// The next element during login (or a lone request after it); stream
/// errors, EOF and garbage end it.
pub(crate) async fn next_element<S: AsyncBufRead + AsyncWrite + Unpin>(
    stream: &mut XmlStream<S, FallibleStreamElement>,
    phase: Phase,
) -> Result<XmppStreamElement, XmppError> {
    loop {
        match stream.next().await {
            Some(Ok(FallibleStreamElement::Ok(XmppStreamElement::StreamError(e)))) => {
                return Err(super::error::stream_error(&e.0));
            }
            Some(Ok(FallibleStreamElement::Ok(el))) => return Ok(el),
            Some(Ok(FallibleStreamElement::Err(e))) => {
                return Err(XmppError::Protocol(e.to_string()));
            }
            Some(Err(ReadError::SoftTimeout)) => continue,
            Some(Err(ReadError::HardError(e))) => return Err(io_error(phase, &e)),
            Some(Err(ReadError::ParseError(e))) => {
                return Err(XmppError::Protocol(e.to_string()));
            }
            Some(Err(ReadError::StreamFooterReceived)) | None => {
                return Err(XmppError::Io {
                    phase,
                    reason: "connection closed by server".into(),
                });
            }
        }
    }
}

fn io_error(phase: Phase, e: &std::io::Error) -> XmppError {
    XmppError::Io {
        phase,
        reason: io_reason(e),
    }
}

/// `NotAuthorized` → `not-authorized`: the wire name of a defined condition.
pub(crate) fn condition_name(c: &impl fmt::Debug) -> String {
    let debug = format!("{c:?}");
    let word = debug
        .split(|ch: char| !ch.is_ascii_alphanumeric())
        .next()
        .unwrap_or_default();
    let mut out = String::with_capacity(word.len() + 4);
    for (i, ch) in word.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// A short name for an element in an error message (never its content,
/// which during SASL is derived from the secret).
fn element_name(el: &XmppStreamElement) -> &'static str {
    match el {
        XmppStreamElement::Stanza(Stanza::Iq(_)) => "<iq/>",
        XmppStreamElement::Stanza(Stanza::Message(_)) => "<message/>",
        XmppStreamElement::Stanza(Stanza::Presence(_)) => "<presence/>",
        XmppStreamElement::Sasl(_) => "a SASL element",
        XmppStreamElement::Starttls(_) => "a STARTTLS element",
        XmppStreamElement::ComponentHandshake(_) => "<handshake/>",
        XmppStreamElement::StreamError(_) => "<stream:error/>",
        XmppStreamElement::SM(_) => "a stream-management element",
    }
}

/// Several calls may log in with the same account at once; a server binds
/// one session per full JID and kicks the older one on a clash. So each
/// login asks for `<resource>-<random>` (resource default `popivr`).
fn unique_resource(configured: Option<&str>) -> String {
    use std::hash::BuildHasher;
    let nonce = std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), std::time::SystemTime::now()));
    format!("{}-{:08x}", configured.unwrap_or("popivr"), nonce as u32)
}

/// Which phase a login is in and how long the finished ones took.
struct Progress {
    phase: Phase,
    started: Instant,
    mark: Instant,
    phases: Vec<(Phase, Duration)>,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Progress {
            phase: Phase::Resolve,
            started: now,
            mark: now,
            phases: Vec::with_capacity(9),
        }
    }

    /// The current phase turned out to be another one (no lookup needed
    /// for an IP literal): rename it without closing it.
    fn relabel(&mut self, phase: Phase) {
        self.phase = phase;
    }

    /// Close the current phase and start `next`.
    fn enter(&mut self, next: Phase) {
        let now = Instant::now();
        self.phases.push((self.phase, now - self.mark));
        self.phase = next;
        self.mark = now;
    }

    fn finish(mut self) -> LoginTimings {
        let now = Instant::now();
        self.phases.push((self.phase, now - self.mark));
        LoginTimings {
            phases: self.phases,
            total: now - self.started,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offered(list: &[&str]) -> BTreeSet<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    const EXPORTER: &[sasl_cb::Type] = &[sasl_cb::Type::TlsExporter];

    /// The mechanism chosen, deciding channel binding as a login does;
    /// `announced` is the server's XEP-0440 list.
    fn pick_with(
        list: &[&str],
        secure: bool,
        binding: Option<Vec<u8>>,
        announced: Option<&[sasl_cb::Type]>,
    ) -> Result<&'static str, String> {
        let cb = decide_binding(binding.is_some(), &offered(list), announced);
        choose_mechanism(&offered(list), secure, binding, cb, "pbx", "pw")
            .map(|(n, _)| n)
            .map_err(|e| e.to_string())
    }

    fn pick(list: &[&str], secure: bool, binding: Option<Vec<u8>>) -> Result<&'static str, String> {
        pick_with(list, secure, binding, Some(EXPORTER))
    }

    /// The gs2 header SCRAM sends first: "p=tls-exporter", "y" or "n".
    fn gs2(list: &[&str], binding: Option<Vec<u8>>, announced: Option<&[sasl_cb::Type]>) -> String {
        let cb = decide_binding(binding.is_some(), &offered(list), announced);
        let (_, mut m) = choose_mechanism(&offered(list), true, binding, cb, "pbx", "pw").unwrap();
        let first = String::from_utf8(m.initial()).unwrap();
        first.split(',').next().unwrap().to_owned()
    }

    #[test]
    fn scram_is_preferred_and_plus_needs_binding_data() {
        let all = ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256"];
        assert_eq!(pick(&all, true, Some(vec![1; 32])), Ok("SCRAM-SHA-1-PLUS"));
        assert_eq!(pick(&all, true, None), Ok("SCRAM-SHA-256"));
        assert_eq!(
            pick(&["PLAIN", "SCRAM-SHA-1"], true, None),
            Ok("SCRAM-SHA-1")
        );
        assert_eq!(pick(&["PLAIN"], true, None), Ok("PLAIN"));
    }

    const EJABBERD_23: [&str; 3] = ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-1-PLUS"];

    /// ejabberd 23.01 over TLS 1.3 offers -PLUS without a XEP-0440 list
    /// and checks it with tls-unique only: popivr's tls-exporter would be a
    /// failed login (and a fail2ban strike) on every call. Plain SCRAM,
    /// saying "n": we cannot bind the way this server does.
    #[test]
    fn plus_without_an_announced_type_is_not_guessed() {
        let cb = decide_binding(true, &offered(&EJABBERD_23), None);
        assert!(
            matches!(cb, CbDecision::Unbound { flag_y: false, why } if why.contains("ejabberd before 24.02"))
        );
        assert_eq!(
            pick_with(&EJABBERD_23, true, Some(vec![1; 32]), None),
            Ok("SCRAM-SHA-1")
        );
        assert_eq!(gs2(&EJABBERD_23, Some(vec![1; 32]), None), "n");
    }

    /// A server that implements tls-exporter announces it (ejabberd 24.02
    /// and later, prosody 13): then popivr binds.
    #[test]
    fn announced_tls_exporter_is_used() {
        let types = [sasl_cb::Type::TlsUnique, sasl_cb::Type::TlsExporter];
        assert_eq!(
            decide_binding(true, &offered(&EJABBERD_23), Some(&types)),
            CbDecision::Bind
        );
        assert_eq!(
            pick_with(&EJABBERD_23, true, Some(vec![1; 32]), Some(&types)),
            Ok("SCRAM-SHA-1-PLUS")
        );
        assert_eq!(
            gs2(&EJABBERD_23, Some(vec![1; 32]), Some(&types)),
            "p=tls-exporter"
        );
        // Announced, but only types popivr cannot compute: "n".
        let other = [sasl_cb::Type::TlsServerEndPoint];
        assert_eq!(gs2(&EJABBERD_23, Some(vec![1; 32]), Some(&other)), "n");
        // No TLS 1.3 (no exporter value): never -PLUS, whatever is said.
        assert_eq!(
            pick_with(&EJABBERD_23, true, None, Some(&types)),
            Ok("SCRAM-SHA-1")
        );
        assert_eq!(gs2(&EJABBERD_23, None, Some(&types)), "n");
    }

    /// prosody 0.12 over TLS 1.3 offers no -PLUS: "y", so a server that
    /// did offer one can tell that it was stripped on the way.
    #[test]
    fn scram_says_y_only_when_no_plus_was_offered() {
        assert_eq!(gs2(&["SCRAM-SHA-1"], Some(vec![0; 32]), None), "y");
        assert_eq!(gs2(&["SCRAM-SHA-1"], None, None), "n");
        assert!(matches!(
            decide_binding(true, &offered(&["PLAIN", "SCRAM-SHA-1"]), None),
            CbDecision::Unbound { flag_y: true, .. }
        ));
    }

    fn failure(text: Option<&str>) -> xsasl::Failure {
        xsasl::Failure {
            defined_condition: xsasl::DefinedCondition::NotAuthorized,
            texts: text
                .map(|t| (String::from("en"), t.to_owned()))
                .into_iter()
                .collect(),
        }
    }

    /// A failed bound login that the server blames on the binding is
    /// reported as such, not as a wrong password; unbound failures read as
    /// before.
    #[test]
    fn a_channel_binding_failure_is_named() {
        let e = failure_error(
            "SCRAM-SHA-1-PLUS",
            &failure(Some("Invalid channel binding")),
        );
        assert!(matches!(e, XmppError::ChannelBinding(_)), "{e:?}");
        assert!(
            e.to_string()
                .starts_with("auth failed: channel binding refused: not-authorized"),
            "{e}"
        );
        let e = failure_error("SCRAM-SHA-1-PLUS", &failure(None));
        assert!(
            e.to_string().contains("or a channel-binding mismatch"),
            "{e}"
        );
        let e = failure_error(
            "SCRAM-SHA-1",
            &failure(Some("Invalid username or password")),
        );
        assert_eq!(e, XmppError::Auth("not-authorized".into()));
    }

    #[test]
    fn plain_is_never_used_in_the_clear() {
        assert_eq!(
            pick(&["PLAIN"], false, None),
            Err("auth failed: no SASL mechanism usable without TLS (server offers: PLAIN)".into())
        );
        assert_eq!(
            pick(&["PLAIN", "SCRAM-SHA-1"], false, None),
            Ok("SCRAM-SHA-1")
        );
    }

    #[test]
    fn anonymous_is_never_chosen() {
        assert!(pick(&["ANONYMOUS"], true, None).is_err());
    }

    #[test]
    fn condition_names_are_wire_names() {
        assert_eq!(
            condition_name(&xsasl::DefinedCondition::NotAuthorized),
            "not-authorized"
        );
        assert_eq!(
            condition_name(&xsasl::DefinedCondition::TemporaryAuthFailure),
            "temporary-auth-failure"
        );
    }

    #[test]
    fn resource_is_unique_per_login() {
        let a = unique_resource(Some("desk"));
        let b = unique_resource(Some("desk"));
        assert!(a.starts_with("desk-") && b.starts_with("desk-"));
        assert_ne!(a, b);
        assert!(unique_resource(None).starts_with("popivr-"));
    }

    fn account() -> Account {
        Account {
            name: "pbx".into(),
            username: "pbx@example.org".into(),
            secret: "s3cret-value".into(),
            serverhost: None,
            port: 5222,
            usetls: true,
            usesasl: true,
            allow_plaintext: false,
            ca_file: None,
            statusmessage: None,
            timeout: Duration::from_secs(5),
            origin: "test".into(),
        }
    }

    #[test]
    fn config_is_checked_before_io() {
        let mut a = account();
        a.usetls = false;
        let err = Plan::new(&a).err().unwrap();
        assert_eq!(
            err.to_string(),
            "config: usetls=no is refused unless allow_plaintext=yes"
        );
        a.allow_plaintext = true;
        assert!(Plan::new(&a).is_ok());
        let mut a = account();
        a.usesasl = false;
        assert!(Plan::new(&a).is_err());
        let mut a = account();
        a.username = "example.org".into();
        assert!(
            Plan::new(&a)
                .err()
                .unwrap()
                .to_string()
                .contains("no local part")
        );
    }

    #[test]
    fn serverhost_overrides_the_domain() {
        let mut a = account();
        a.usetls = false;
        a.allow_plaintext = true;
        assert_eq!(Plan::new(&a).unwrap().host, "example.org");
        a.serverhost = Some("10.0.0.5".into());
        assert_eq!(Plan::new(&a).unwrap().host, "10.0.0.5");
    }
}
