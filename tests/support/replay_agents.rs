//! XMPP steps for replay scripts: test agents on a throw-away prosody.
//!
//! A script that uses `agent …` or `offline …` steps, or a `{{NAME}}`
//! placeholder, gets a [`Plan`]: its own popivr account and one account per
//! agent it names, all registered on one prosody shared by the test binary
//! ([`XmppWorld`]). Account names carry the script's unique prefix
//! (`<prefix>.alice@popivr.test`), so scripts running at the same time
//! never see each other's messages.
//!
//! The placeholders (see `protocol-tests/README.md`) are filled in the whole
//! script text before it is parsed, so steps can name JIDs and ports too;
//! only the secrets are left to the config block ([`Setup::placeholders`]),
//! which is written to a file and never shown in a transcript.
//!
//! Every agent logs in (and is available) before the child starts. `says`
//! steps end with a round trip through the server (the agent messages
//! itself and waits for it), so when the step is over the server has routed
//! the message: what an agent says reaches popivr before anything said in a
//! later step, whoever says it. The agents run on threads of their own
//! ([`AgentThread`] says why).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::BuildHasher;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use popivr_testkit::sim::Sim;
use popivr_testkit::sim::glob::{Glob, escape, unescape};
use popivr_testkit::sim::replay::{Extension, Setup};
use popivr_testkit::sim::script::{ExtStep, Script, StepKind, parse_duration};
use xmpp_parsers::message::{Message, MessageType};

use crate::support::agent::{TestAgent, TestMessage, WAIT, Wrapper, body};
use crate::support::prosody::{Prosody, TestCa};

/// How long `finish` listens for IMs nobody expected.
const LATE_GRACE: Duration = Duration::from_millis(300);

/// Body of the messages an agent sends itself to know the server has
/// routed what it sent before.
const BARRIER: &str = "popivr-replay-barrier-";

/// The verbs of `agent NAME VERB: ARG`.
const VERBS: &[&str] = &[
    "receives",
    "receives-nothing",
    "says",
    "says-now",
    "says-delayed",
    "says-as-type",
    "says-wrapped",
    "presence",
    "joins",
    "says-in-room",
    "receives-in-room",
    "receives-maybe",
];

/// `presence NAME: SHOW` values (before the call, or `agent NAME presence:`
/// during it). `unsubscribed` (before the call only) leaves the agent out
/// of popivr's roster: popivr cannot see its presence.
const SHOWS: &[&str] = &[
    "online",
    "chat",
    "away",
    "xa",
    "dnd",
    "offline",
    "unsubscribed",
];

/// Placeholders that hold a secret: filled in the config block only.
const SECRET_KEYS: &[&str] = &["POPIVR_SECRET"];

/// Placeholders besides `JID:NAME`.
const KEYS: &[&str] = &[
    "DOMAIN",
    "PORT",
    "CA",
    "OTHER_CA",
    "CLOSED_PORT",
    "SILENT_PORT",
    "POPIVR_JID",
    "POPIVR_SECRET",
];

/// An account on the test server.
#[derive(Debug, Clone)]
struct User {
    local: String,
    password: String,
}

impl User {
    fn new(local: String) -> User {
        User {
            local,
            password: secret(),
        }
    }
}

/// A script line that is wrong for the XMPP steps.
#[derive(Debug)]
pub struct PlanError {
    pub line: usize,
    pub message: String,
}

/// What one script needs from the XMPP side.
#[derive(Debug)]
pub struct Plan {
    popivr: User,
    /// By the name the script uses.
    agents: BTreeMap<String, User>,
    /// `offline NAME says: TEXT`, in order.
    offline: Vec<(String, String)>,
    /// `presence NAME: SHOW` before the call, in order.
    presence: Vec<(String, String)>,
}

impl Plan {
    /// The plan for the script `text`, or `None` if it uses no XMPP.
    /// `prefix` must be unique among the scripts of one server (e.g. the
    /// file's stem).
    pub fn for_script(name: &str, text: &str, prefix: &str) -> Result<Option<Plan>, PlanError> {
        let script = Script::parse(name, text).map_err(|e| PlanError {
            line: e.line,
            message: e.message,
        })?;
        let mut names = BTreeSet::new();
        let mut offline = Vec::new();
        let mut presence = Vec::new();
        let mut uses = false;
        let mut other_step_seen = false;
        for step in &script.steps {
            let err = |message: String| PlanError {
                line: step.line,
                message,
            };
            let StepKind::Ext(ext) = &step.kind else {
                other_step_seen = true;
                continue;
            };
            match ext.keyword.as_str() {
                "agent" => {
                    other_step_seen = true;
                    let (agent, verb) = agent_words(ext).map_err(&err)?;
                    check_arg(verb, &ext.arg).map_err(&err)?;
                    names.insert(agent.to_string());
                }
                "offline" => {
                    if other_step_seen {
                        return Err(err(
                            "`offline` lines come before every other step (they are sent before the call)"
                                .into(),
                        ));
                    }
                    let agent = match ext.words.as_slice() {
                        [agent, says] if says == "says" => agent,
                        _ => return Err(err("want `offline NAME says: TEXT`".into())),
                    };
                    check_name(agent).map_err(&err)?;
                    let text = unescape(&ext.arg).map_err(&err)?;
                    names.insert(agent.clone());
                    offline.push((agent.clone(), text));
                }
                "presence" => {
                    if other_step_seen {
                        return Err(err(
                            "`presence` lines come before every other step (they are set before \
                             the call; use `agent NAME presence:` during it)"
                                .into(),
                        ));
                    }
                    let [agent] = ext.words.as_slice() else {
                        return Err(err("want `presence NAME: SHOW`".into()));
                    };
                    check_name(agent).map_err(&err)?;
                    if !SHOWS.contains(&ext.arg.as_str()) {
                        return Err(err(format!("SHOW is one of {}", SHOWS.join(", "))));
                    }
                    names.insert(agent.clone());
                    presence.push((agent.clone(), ext.arg.clone()));
                }
                _ => {
                    other_step_seen = true;
                    continue;
                }
            }
            uses = true;
        }
        let mut in_config = false;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let trimmed = line.trim();
            if in_config && trimmed == "end" {
                in_config = false;
            } else if !in_config && trimmed.starts_with("config:") {
                in_config = true;
            }
            for key in placeholders_in(line) {
                uses = true;
                let err = |message: String| PlanError { line: n, message };
                if let Some(agent) = key.strip_prefix("JID:") {
                    check_name(agent).map_err(err)?;
                    names.insert(agent.to_string());
                } else if !KEYS.contains(&key) {
                    return Err(err(format!(
                        "unknown placeholder {{{{{key}}}}}; known: {}, JID:NAME",
                        KEYS.join(", ")
                    )));
                } else if SECRET_KEYS.contains(&key) && !in_config {
                    return Err(err(format!(
                        "{{{{{key}}}}} is a secret: only the config block may use it"
                    )));
                }
            }
        }
        if !uses {
            return Ok(None);
        }
        Ok(Some(Plan {
            popivr: User::new(prefix.to_string()),
            agents: names
                .into_iter()
                .map(|a| {
                    let user = User::new(format!("{prefix}.{a}"));
                    (a, user)
                })
                .collect(),
            offline,
            presence,
        }))
    }

    fn users(&self) -> impl Iterator<Item = &User> {
        std::iter::once(&self.popivr).chain(self.agents.values())
    }

    /// The script text with every placeholder but the secrets filled in.
    pub fn fill(&self, world: &XmppWorld, text: &str) -> String {
        let mut text = text.to_string();
        for (key, value) in self.public_values(world) {
            text = text.replace(&format!("{{{{{key}}}}}"), &value);
        }
        text
    }

    fn public_values(&self, world: &XmppWorld) -> Vec<(String, String)> {
        let server = &world.server;
        let mut values = vec![
            ("DOMAIN".to_string(), server.domain().to_string()),
            ("PORT".to_string(), server.port().to_string()),
            ("CA".to_string(), server.ca_pem().display().to_string()),
            ("OTHER_CA".to_string(), world.other_ca.display().to_string()),
            ("CLOSED_PORT".to_string(), world.closed_port.to_string()),
            ("SILENT_PORT".to_string(), world.silent_port.to_string()),
            ("POPIVR_JID".to_string(), server.jid(&self.popivr.local)),
        ];
        for (name, user) in &self.agents {
            values.push((format!("JID:{name}"), server.jid(&user.local)));
        }
        values
    }

    /// The extensions that run this plan's steps.
    pub fn extensions(&self, world: &XmppWorld) -> Vec<Box<dyn Extension>> {
        let agents = AgentSteps {
            server: world.server.clone(),
            popivr: self.popivr.clone(),
            popivr_bare: world.server.jid(&self.popivr.local),
            users: self.agents.clone(),
            offline: self.offline.clone(),
            presence: self.presence.clone(),
            online: BTreeMap::new(),
        };
        vec![
            Box::new(agents),
            Box::new(BeforeCall("offline")),
            Box::new(BeforeCall("presence")),
        ]
    }

    /// popivr's account as this plan has it (for tests of the steps
    /// themselves, which stand in for popivr).
    pub fn popivr_login(&self) -> (String, String) {
        (self.popivr.local.clone(), self.popivr.password.clone())
    }
}

/// `agent NAME VERB` → (NAME, VERB).
fn agent_words(ext: &ExtStep) -> Result<(&str, &str), String> {
    match ext.words.as_slice() {
        [agent, verb] if VERBS.contains(&verb.as_str()) => {
            check_name(agent)?;
            Ok((agent, verb))
        }
        [_, verb] => Err(format!(
            "unknown agent step `{verb}`; known: {}",
            VERBS.join(", ")
        )),
        _ => Err("want `agent NAME VERB: ARGUMENT`".into()),
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = name.len() <= 32
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent name `{name}`: want a-z first, then a-z, 0-9, - or _"
        ))
    }
}

/// Check a step's argument when the plan is made, so a typo fails before
/// any server is started.
fn check_arg(verb: &str, arg: &str) -> Result<(), String> {
    match verb {
        "receives" => Glob::new(arg).map(drop),
        "receives-nothing" => parse_duration(arg).map(drop),
        "says-as-type" => {
            let (kind, text) = split_first(arg)?;
            message_type(kind)?;
            unescape(text).map(drop)
        }
        "says-wrapped" => {
            let (wrapper, text) = split_first(arg)?;
            wrapper_kind(wrapper)?;
            unescape(text).map(drop)
        }
        "presence" if SHOWS.contains(&arg) && arg != "unsubscribed" => Ok(()),
        "presence" => Err(format!("SHOW is one of {}", SHOWS[..6].join(", "))),
        "joins" | "says-in-room" => split_first(arg).map(drop),
        "receives-in-room" | "receives-maybe" => Glob::new(arg).map(drop),
        _ => unescape(arg).map(drop),
    }
}

fn split_first(arg: &str) -> Result<(&str, &str), String> {
    arg.split_once(char::is_whitespace)
        .map(|(a, b)| (a, b.trim()))
        .ok_or_else(|| format!("want a word and a text, got `{arg}`"))
}

fn message_type(word: &str) -> Result<MessageType, String> {
    Ok(match word {
        "chat" => MessageType::Chat,
        "normal" => MessageType::Normal,
        "headline" => MessageType::Headline,
        "groupchat" => MessageType::Groupchat,
        "error" => MessageType::Error,
        other => {
            return Err(format!(
                "message type `{other}`: want chat, normal, headline, groupchat or error"
            ));
        }
    })
}

fn wrapper_kind(word: &str) -> Result<Wrapper, String> {
    Ok(match word {
        "carbon-received" => Wrapper::CarbonReceived,
        "carbon-sent" => Wrapper::CarbonSent,
        "forwarded" => Wrapper::Forwarded,
        other => {
            return Err(format!(
                "wrapper `{other}`: want carbon-received, carbon-sent or forwarded"
            ));
        }
    })
}

/// The `NAME` of every `{{NAME}}` in `line`.
fn placeholders_in(line: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = line;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        match after.find("}}") {
            Some(end) => {
                found.push(&after[..end]);
                rest = &after[end + 2..];
            }
            None => break,
        }
    }
    found
}

/// A fresh random password (hex, 32 digits).
fn secret() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let state = std::collections::hash_map::RandomState::new();
    let a = state.hash_one((n, std::process::id(), "a"));
    let b = state.hash_one((n, std::time::Instant::now(), "b"));
    format!("{a:016x}{b:016x}")
}

/// The test XMPP side shared by the scripts of one run: one prosody with
/// every plan's accounts, a second CA, a closed port and a silent one.
pub struct XmppWorld {
    server: Arc<Prosody>,
    other_ca: PathBuf,
    closed_port: u16,
    silent_port: u16,
}

impl XmppWorld {
    /// Start prosody with the accounts of `plans` registered. Blocks; call
    /// it on the test's own thread (prosody dies with the thread that
    /// started it).
    pub fn start<'a>(plans: impl IntoIterator<Item = &'a Plan>) -> XmppWorld {
        let mut builder = Prosody::builder();
        for plan in plans {
            for user in plan.users() {
                builder = builder.user(&user.local, &user.password);
            }
        }
        let server = builder.start();
        let other_ca = server.scratch_dir().join("other-ca.pem");
        std::fs::write(&other_ca, TestCa::new("not the server's CA").pem()).expect("other CA");
        XmppWorld {
            other_ca,
            closed_port: closed_port(),
            silent_port: silent_port(),
            server: Arc::new(server),
        }
    }

    /// How long prosody took to start with its accounts.
    pub fn startup_time(&self) -> Duration {
        self.server.startup_time()
    }

    pub fn server(&self) -> &Arc<Prosody> {
        &self.server
    }
}

/// A port on 127.0.0.1 that refuses connections: bound (so no server
/// started later can take it) but not listening. Held as long as the test
/// process lives.
fn closed_port() -> u16 {
    // SAFETY: plain socket calls on a descriptor we own and never close.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = libc::bind(fd, (&raw const addr).cast(), len);
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let mut len = len;
        let rc = libc::getsockname(fd, (&raw mut addr).cast(), &mut len);
        assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
        u16::from_be(addr.sin_port)
    }
}

/// A port on 127.0.0.1 that accepts connections and never says a word
/// (a hung server). Lives as long as the test process.
fn silent_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let port = listener.local_addr().expect("local addr").port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

/// Runs `agent NAME …` steps.
struct AgentSteps {
    server: Arc<Prosody>,
    popivr: User,
    popivr_bare: String,
    users: BTreeMap<String, User>,
    offline: Vec<(String, String)>,
    presence: Vec<(String, String)>,
    online: BTreeMap<String, Live>,
}

/// A logged-in agent.
struct Live {
    agent: TestAgent,
    bare: String,
    /// The thread it logged in on, and must be used on.
    thread: AgentThread,
    barriers: u64,
    /// popivr's full JID, from the last IM the agent got from it.
    popivr_full: Option<String>,
    /// Rooms joined, as `room/nick`: the room's echo of our own messages
    /// is not an IM to us.
    in_rooms: Vec<String>,
}

impl Live {
    /// Send `msg`, then wait until the server has routed it: a message to
    /// ourselves, sent after it on the same stream, has come back.
    async fn send(&mut self, msg: TestMessage) -> Result<(), String> {
        self.agent.send(msg).await;
        self.barrier().await
    }

    /// A message to ourselves and back: everything sent before it has
    /// been handled by the server.
    async fn barrier(&mut self) -> Result<(), String> {
        self.barriers += 1;
        let token = format!("{BARRIER}{}", self.barriers);
        let bare = self.bare.clone();
        // To our full JID: it reaches us even while we show as offline.
        let full = self.agent.jid().to_string();
        self.agent.send_chat(&full, &token).await;
        let back = self
            .agent
            .next_message_within(WAIT, |m| {
                body(m) == Some(token.as_str()) && sender(m).as_deref() == Some(bare.as_str())
            })
            .await;
        back.map(drop)
            .ok_or_else(|| format!("the server did not route our own message within {WAIT:?}"))
    }

    /// The next IM with a body, in arrival order (our own round trips
    /// aside).
    async fn next_im(&mut self, within: Duration) -> Option<Message> {
        let own = self.bare.clone();
        let echoes = self.in_rooms.clone();
        self.agent
            .next_message_within(within, |m| {
                let barrier = sender(m).as_deref() == Some(own.as_str())
                    && body(m).is_some_and(|b| b.starts_with(BARRIER));
                let from = m.from.as_ref().map(|f| f.to_string()).unwrap_or_default();
                let echo = echoes.iter().any(|e| e.eq_ignore_ascii_case(&from));
                body(m).is_some() && !barrier && !echo
            })
            .await
    }
}

/// One of the threads the test agents live on, each in a single-threaded
/// runtime of its own. An agent is used only on the thread it logged in on,
/// for two reasons:
/// - tokio-xmpp 6.0's `Client` loses a wake-up when its background task
///   polls for incoming stanzas on one thread while the test sends on
///   another (`StanzaReceiver::poll_next` answers `Pending` without a waker
///   when `try_lock` finds the sender holding the lock). The agent then
///   never sees another stanza. On one thread the two never overlap.
/// - A login spends a good part of a CPU on SCRAM's key stretching (more so
///   in a debug build). Here the logins keep to their own threads, and the
///   simulators, on the test's runtime, keep its workers for their frame
///   clocks and pipes.
#[derive(Debug, Clone, Copy)]
pub struct AgentThread(usize);

/// How many agent threads: two, so a busy machine still gives the logins
/// a fair share of its time.
const AGENT_THREADS: usize = 2;

impl AgentThread {
    /// The threads in turn.
    pub fn next() -> AgentThread {
        static N: AtomicU64 = AtomicU64::new(0);
        AgentThread(N.fetch_add(1, Ordering::Relaxed) as usize % AGENT_THREADS)
    }

    /// Run `work` on this thread and wait for it; a panic there becomes an
    /// error naming `what`.
    pub async fn run<T: Send + 'static>(
        self,
        what: &str,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Result<T, String> {
        self.handle()
            .spawn(work)
            .await
            .map_err(|e| format!("{what}: {}", panic_text(e)))
    }

    fn handle(self) -> &'static tokio::runtime::Handle {
        static HANDLES: OnceLock<Vec<tokio::runtime::Handle>> = OnceLock::new();
        let handles = HANDLES.get_or_init(|| (0..AGENT_THREADS).map(agent_runtime).collect());
        &handles[self.0]
    }
}

/// Start agent thread `n`; it lives as long as the test process.
fn agent_runtime(n: usize) -> tokio::runtime::Handle {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("replay-agents-{n}"))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("agent runtime");
            tx.send(runtime.handle().clone())
                .expect("agent runtime handle");
            runtime.block_on(std::future::pending::<()>());
        })
        .expect("agent thread");
    rx.recv().expect("agent runtime handle")
}

/// The sender's bare JID.
fn sender(m: &Message) -> Option<String> {
    m.from.as_ref().map(|j| j.to_bare().to_string())
}

impl AgentSteps {
    async fn login_all(&mut self) -> Result<(), String> {
        let logins = self.users.iter().map(|(name, user)| {
            let (server, user, thread) = (self.server.clone(), user.clone(), AgentThread::next());
            let what = format!("agent {name}: login");
            async move {
                let work =
                    async move { TestAgent::login(&server, &user.local, &user.password).await };
                let agent = thread.run(&what, work).await?;
                Ok::<_, String>((name.clone(), agent, thread))
            }
        });
        for login in futures::future::join_all(logins).await {
            let (name, agent, thread) = login?;
            let bare = agent.bare();
            self.online.insert(
                name,
                Live {
                    agent,
                    bare,
                    thread,
                    barriers: 0,
                    popivr_full: None,
                    in_rooms: Vec::new(),
                },
            );
        }
        Ok(())
    }

    /// Run `work` with agent `name` on its thread.
    async fn with_agent<T: Send + 'static, F>(
        &mut self,
        name: &str,
        work: impl FnOnce(Live) -> F,
    ) -> Result<T, String>
    where
        F: Future<Output = (Live, T)> + Send + 'static,
    {
        let live = self
            .online
            .remove(name)
            .ok_or_else(|| format!("agent {name} is not logged in"))?;
        let thread = live.thread;
        let (live, result) = thread.run(&format!("agent {name}"), work(live)).await?;
        self.online.insert(name.to_string(), live);
        Ok(result)
    }

    /// Where prosody keeps the offline messages of popivr's account.
    fn offline_store(&self) -> PathBuf {
        self.server
            .scratch_dir()
            .join("data")
            .join(datamanager_name(self.server.domain()))
            .join("offline")
            .join(format!("{}.list", datamanager_name(&self.popivr.local)))
    }

    /// `name` sends `msg` and waits until the server has routed it.
    async fn send_as(&mut self, name: &str, msg: TestMessage) -> Result<(), String> {
        self.with_agent(name, |mut live| async move {
            let result = live.send(msg).await;
            (live, result)
        })
        .await?
    }

    /// The next IM to `name`, waiting up to `within`.
    async fn next_im_of(
        &mut self,
        name: &str,
        within: Duration,
    ) -> Result<Option<Message>, String> {
        self.with_agent(name, move |mut live| async move {
            let m = live.next_im(within).await;
            (live, m)
        })
        .await
    }

    /// Make popivr's account subscribed to every agent's presence, the way
    /// `popivr check` does it: it asks, each agent accepts. Agents marked
    /// `unsubscribed` are left out.
    async fn subscribe_all(&mut self) -> Result<(), String> {
        let skip: BTreeSet<&str> = self
            .presence
            .iter()
            .filter(|(_, show)| show == "unsubscribed")
            .map(|(name, _)| name.as_str())
            .collect();
        let names: Vec<String> = self
            .online
            .keys()
            .filter(|n| !skip.contains(n.as_str()))
            .cloned()
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let contacts: Vec<String> = names.iter().map(|n| self.online[n].bare.clone()).collect();
        let account = self
            .server
            .account(&self.popivr.local, &self.popivr.password);
        let survey = async move { popivr::xmpp::survey(&account, &contacts, WAIT).await };
        let mut approvals = Vec::new();
        for name in &names {
            let live = self.online.remove(name).expect("logged in");
            let popivr = self.popivr_bare.clone();
            let thread = live.thread;
            let what = format!("agent {name}: accept the subscription");
            approvals.push(async move {
                let work = async move {
                    let mut live = live;
                    let ok = live.agent.approve_subscription(&popivr, WAIT).await;
                    (live, ok)
                };
                thread.run(&what, work).await
            });
        }
        let (states, approved) = tokio::join!(survey, futures::future::join_all(approvals));
        for (name, result) in names.iter().zip(approved) {
            let (live, ok) = result?;
            self.online.insert(name.clone(), live);
            if !ok {
                return Err(format!(
                    "agent {name} got no subscription request from popivr"
                ));
            }
        }
        let states = states.map_err(|e| format!("popivr's account could not log in: {e}"))?;
        if let Some(s) = states.iter().find(|s| !s.subscribed) {
            return Err(format!(
                "popivr is not subscribed to {} after the survey",
                s.jid
            ));
        }
        Ok(())
    }

    /// `presence NAME: SHOW` lines, before the call.
    async fn set_presences(&mut self) -> Result<(), String> {
        for (name, show) in self.presence.clone() {
            if show != "unsubscribed" {
                self.set_presence(&name, &show).await?;
            }
        }
        Ok(())
    }

    async fn set_presence(&mut self, name: &str, show: &str) -> Result<(), String> {
        let show = show.to_string();
        self.with_agent(name, move |mut live| async move {
            use xmpp_parsers::presence::Show;
            let show = match show.as_str() {
                "chat" => Some(Some(Show::Chat)),
                "away" => Some(Some(Show::Away)),
                "xa" => Some(Some(Show::Xa)),
                "dnd" => Some(Some(Show::Dnd)),
                "offline" => None,
                _ => Some(None),
            };
            match show {
                Some(show) => live.agent.set_presence(show, None).await,
                None => live.agent.set_unavailable().await,
            }
            // A round trip, so the server has handled it when we go on.
            let r = live.barrier().await;
            (live, r)
        })
        .await?
    }

    async fn send_offline(&mut self) -> Result<(), String> {
        // The subscription survey's session may still be closing on the
        // server: a message it takes is lost to the store, so send again
        // until one is stored.
        for _ in 0..20 {
            for (name, text) in self.offline.clone() {
                let msg = TestMessage::chat(&self.popivr_bare, &text);
                self.send_as(&name, msg)
                    .await
                    .map_err(|e| format!("offline {name}: {e}"))?;
            }
            if self.offline.is_empty() || self.offline_store().is_file() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !self.offline.is_empty() && !self.offline_store().is_file() {
            return Err(format!(
                "prosody did not store the offline message(s) for {} (no {})",
                self.popivr_bare,
                self.offline_store().display()
            ));
        }
        Ok(())
    }

    async fn step(&mut self, ext: &ExtStep, sim: &Sim, within: Duration) -> Result<(), String> {
        let (name, verb) = agent_words(ext)?;
        let popivr = self.popivr_bare.clone();
        if !self.online.contains_key(name) {
            return Err(format!("agent {name} is not logged in"));
        }
        match verb {
            "receives" => {
                let glob = Glob::new(&ext.arg)?;
                let Some(m) = self.next_im_of(name, within).await? else {
                    return Err(format!(
                        "agent {name} got no IM within {within:?} (wanted one matching `{glob}`)"
                    ));
                };
                let text = body(&m).unwrap_or_default();
                let from = sender(&m).unwrap_or_default();
                sim.note(format!("agent {name} got from {from}: {}", escape(text)));
                if from != popivr {
                    return Err(format!(
                        "agent {name} got an IM from {from}, not from popivr ({popivr}): `{}`",
                        escape(text)
                    ));
                }
                if let Some(live) = self.online.get_mut(name) {
                    live.popivr_full = m.from.as_ref().map(|j| j.to_string());
                }
                if !glob.matches(text) {
                    return Err(format!(
                        "agent {name}: expected an IM matching `{glob}`, got `{}`",
                        escape(text)
                    ));
                }
                Ok(())
            }
            "receives-maybe" => {
                // For races: at most one IM, which must match if it comes.
                let glob = Glob::new(&ext.arg)?;
                let wait = within.min(Duration::from_secs(1));
                let Some(m) = self.next_im_of(name, wait).await? else {
                    sim.note(format!("agent {name} got nothing (allowed)"));
                    return Ok(());
                };
                let text = body(&m).unwrap_or_default();
                sim.note(format!("agent {name} got: {}", escape(text)));
                if !glob.matches(text) {
                    return Err(format!(
                        "agent {name}: expected nothing or an IM matching `{glob}`, got `{}`",
                        escape(text)
                    ));
                }
                Ok(())
            }
            "receives-in-room" => {
                let glob = Glob::new(&ext.arg)?;
                let Some(m) = self.next_im_of(name, within).await? else {
                    return Err(format!(
                        "agent {name} got no IM within {within:?} (wanted a room message matching `{glob}`)"
                    ));
                };
                let text = body(&m).unwrap_or_default();
                let from = m.from.as_ref().map(|f| f.to_string()).unwrap_or_default();
                sim.note(format!(
                    "agent {name} got in a room from {from}: {}",
                    escape(text)
                ));
                if m.type_ != MessageType::Groupchat {
                    return Err(format!(
                        "agent {name}: `{}` is not a room message",
                        escape(text)
                    ));
                }
                if !glob.matches(text) {
                    return Err(format!(
                        "agent {name}: expected a room message matching `{glob}`, got `{}`",
                        escape(text)
                    ));
                }
                Ok(())
            }
            "receives-nothing" => {
                let span = parse_duration(&ext.arg)?;
                match self.next_im_of(name, span).await? {
                    None => Ok(()),
                    Some(m) => {
                        let text = escape(body(&m).unwrap_or_default());
                        let from = sender(&m).unwrap_or_default();
                        sim.note(format!("agent {name} got from {from}: {text}"));
                        Err(format!("agent {name} got an IM from {from}: `{text}`"))
                    }
                }
            }
            "says" => {
                let msg = TestMessage::chat(&popivr, &unescape(&ext.arg)?);
                self.send_as(name, msg).await
            }
            "says-delayed" => {
                let msg = TestMessage::chat(&popivr, &unescape(&ext.arg)?).delayed();
                self.send_as(name, msg).await
            }
            "says-now" => {
                // No round trip: the next step's message races this one.
                let msg = TestMessage::chat(&popivr, &unescape(&ext.arg)?);
                self.with_agent(name, |mut live| async move {
                    live.agent.send(msg).await;
                    (live, ())
                })
                .await
            }
            "says-as-type" => {
                // To the full JID: the server itself drops or bounces error
                // and groupchat messages to a bare JID.
                let full = self.online.get(name).and_then(|l| l.popivr_full.clone());
                let Some(full) = full else {
                    return Err(format!(
                        "agent {name} has no IM from popivr yet, so no full JID to send to"
                    ));
                };
                let (kind, text) = split_first(&ext.arg)?;
                let msg = TestMessage::chat(&full, &unescape(text)?).kind(message_type(kind)?);
                self.send_as(name, msg).await
            }
            "says-wrapped" => {
                let (wrapper, text) = split_first(&ext.arg)?;
                let msg =
                    TestMessage::chat(&popivr, &unescape(text)?).wrapped(wrapper_kind(wrapper)?);
                self.send_as(name, msg).await
            }
            "presence" => self.set_presence(name, &ext.arg).await,
            "joins" => {
                // `agent NAME joins: ROOM NICK`
                let (room, nick) = split_first(&ext.arg)?;
                // With the room's history: a pop posted before we came in
                // still reaches us.
                let xml = format!(
                    "<presence xmlns='jabber:client' to='{room}/{nick}'>\
                     <x xmlns='http://jabber.org/protocol/muc'/></presence>"
                );
                let joined = format!("{room}/{nick}");
                self.with_agent(name, move |mut live| async move {
                    live.agent.send_raw(&xml).await;
                    live.in_rooms.push(joined);
                    let r = live.barrier().await;
                    (live, r)
                })
                .await?
            }
            "says-in-room" => {
                // `agent NAME says-in-room: ROOM TEXT`
                let (room, text) = split_first(&ext.arg)?;
                let msg = TestMessage::chat(room, &unescape(text)?)
                    .kind(xmpp_parsers::message::MessageType::Groupchat);
                self.send_as(name, msg).await
            }
            other => Err(format!("unknown agent step `{other}`")),
        }
    }

    async fn check_end(&mut self, sim: &Sim) -> Result<(), String> {
        let mut problems = Vec::new();
        let names: Vec<String> = self.online.keys().cloned().collect();
        for name in names {
            let mut wait = LATE_GRACE;
            while let Some(m) = self.next_im_of(&name, wait).await? {
                let text = escape(body(&m).unwrap_or_default());
                let from = sender(&m).unwrap_or_default();
                sim.note(format!("agent {name} got from {from}: {text}"));
                problems.push(format!("agent {name} got an IM no step expected: `{text}`"));
                wait = Duration::ZERO;
            }
        }
        if !self.offline.is_empty() && self.offline_store().is_file() {
            problems.push(format!(
                "the offline message(s) for {} were never delivered (still in {})",
                self.popivr_bare,
                self.offline_store().display()
            ));
        }
        let transcript = sim.transcript().to_string();
        let secrets = std::iter::once(&self.popivr).chain(self.users.values());
        if secrets
            .into_iter()
            .any(|u| transcript.contains(&u.password))
        {
            problems.push("an account secret appears in the transcript".into());
        }
        let closes = std::mem::take(&mut self.online)
            .into_values()
            .map(|live| live.thread.run("closing an agent", live.agent.close()));
        for closed in futures::future::join_all(closes).await {
            closed?;
        }
        match problems.is_empty() {
            true => Ok(()),
            false => Err(problems.join("; ")),
        }
    }
}

/// prosody's log lines about the sessions of `prefix`'s accounts (to
/// explain a failed step: a dropped connection, a failed login).
fn server_log_for(server: &Prosody, prefix: &str) -> String {
    let log = server.log();
    let session = |line: &str| line.split_whitespace().nth(3).map(str::to_string);
    let ours = [
        format!("Authenticated as {prefix}@"),
        format!("Authenticated as {prefix}."),
    ];
    let ids: BTreeSet<String> = log
        .lines()
        .filter(|l| ours.iter().any(|o| l.contains(o.as_str())))
        .filter_map(session)
        .collect();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| session(l).is_some_and(|s| ids.contains(&s)))
        .collect();
    format!(
        "prosody's log for these accounts:\n    {}",
        lines.join("\n    ")
    )
}

/// How prosody's datamanager names a file: every byte that is not a
/// letter or digit as `%xx`.
fn datamanager_name(name: &str) -> String {
    name.bytes()
        .map(|b| match b.is_ascii_alphanumeric() {
            true => (b as char).to_string(),
            false => format!("%{b:02x}"),
        })
        .collect()
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "panicked".into()),
        Err(e) => e.to_string(),
    }
}

impl Extension for AgentSteps {
    fn keyword(&self) -> &str {
        "agent"
    }

    fn prepare<'a>(&'a mut self, setup: &'a mut Setup) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            setup
                .placeholders
                .insert("POPIVR_SECRET".into(), self.popivr.password.clone());
            self.login_all().await?;
            self.subscribe_all().await?;
            self.set_presences().await?;
            self.send_offline().await
        })
    }

    fn run<'a>(
        &'a mut self,
        step: &'a ExtStep,
        sim: &'a mut Sim,
        within: Duration,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let result = self.step(step, sim, within).await;
            result.map_err(|e| format!("{e}\n{}", server_log_for(&self.server, &self.popivr.local)))
        })
    }

    fn finish<'a>(&'a mut self, sim: &'a mut Sim) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            let result = self.check_end(sim).await;
            result.map_err(|e| format!("{e}\n{}", server_log_for(&self.server, &self.popivr.local)))
        })
    }
}

/// `offline NAME says: TEXT` and `presence NAME: SHOW`: carried out before
/// the child starts (by [`AgentSteps::prepare`]); at their place among the
/// steps they only note so.
struct BeforeCall(&'static str);

impl Extension for BeforeCall {
    fn keyword(&self) -> &str {
        self.0
    }

    fn run<'a>(
        &'a mut self,
        _step: &'a ExtStep,
        sim: &'a mut Sim,
        _within: Duration,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async move {
            sim.note("(sent and stored before the call started)");
            Ok(())
        })
    }
}
