//! A small Asterisk Manager Interface (AMI) client for the test Asterisk.
//!
//! The wire is plain text over TCP: after a one-line banner, every message
//! is a block of `Key: Value\r\n` lines ended by an empty line. Actions
//! carry an `ActionID` that Asterisk copies into its response, which is how
//! several tasks can share the one connection: each request waits on its
//! own ActionID while a reader task sorts incoming messages into responses
//! (handed to the waiting request) and events (kept for the whole life of
//! the connection, so a test can look for an event that arrived before it
//! started to wait).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, oneshot};

use super::Error;

/// An AMI event: its `Key: Value` lines. A key that appears more than once
/// keeps its last value (events popivr's tests use have unique keys).
pub type Event = HashMap<String, String>;

/// How long an action may take before [`Ami::action`] gives up. Actions
/// that wait for a call (Originate) are always sent asynchronously, so
/// only a stuck Asterisk takes this long.
const ACTION_TIMEOUT: Duration = Duration::from_secs(15);

/// When Asterisk raised `event`: its `Timestamp` field (manager.conf's
/// `timestampevents`, on in every testbed Asterisk), on the same clock as
/// [`std::time::SystemTime::now`].
pub fn event_time(event: &Event) -> Option<std::time::SystemTime> {
    let (secs, micros) = event.get("Timestamp")?.split_once('.')?;
    let micros = format!("{micros:0<6}");
    Some(
        std::time::UNIX_EPOCH
            + Duration::from_secs(secs.parse().ok()?)
            + Duration::from_micros(micros.get(..6)?.parse().ok()?),
    )
}

/// One AMI message (a response), its lines in order. Unlike [`Event`] it
/// keeps repeated keys, which a `Command` response uses for its output
/// (one `Output:` line per line of CLI output).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message(pub Vec<(String, String)>);

impl Message {
    /// The first value of `key` (keys compare case-insensitively, as
    /// Asterisk does).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, in order.
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// `Response: Success` (or `Follows`, the old Command answer).
    pub fn is_success(&self) -> bool {
        matches!(self.get("Response"), Some(r) if r.eq_ignore_ascii_case("Success") || r.eq_ignore_ascii_case("Follows"))
    }

    fn to_event(&self) -> Event {
        self.0.iter().cloned().collect()
    }
}

/// Events seen so far, and which of them a `wait_*` call already returned.
#[derive(Default)]
struct Events {
    all: Vec<Event>,
    taken: Vec<bool>,
}

/// State shared by the handles and the reader task.
struct Shared {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Mutex<HashMap<String, oneshot::Sender<Message>>>,
    events: Mutex<Events>,
    /// Woken on every new event and when the connection closes.
    changed: Notify,
    closed: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A logged-in AMI connection. Cheap to clone: clones share the connection
/// and the event log, so several tasks may send actions at once.
#[derive(Clone)]
pub struct Ami {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Ami {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ami")
            .field("events", &self.shared.events.lock().unwrap().all.len())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Ami {
    /// Connect, log in with all event classes on, and start the reader
    /// task on the current tokio runtime. The secret goes only to the
    /// socket.
    pub async fn connect(port: u16, username: &str, secret: &str) -> Result<Ami, Error> {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| Error::new(format!("AMI connect to 127.0.0.1:{port}: {e}")))?;
        stream.set_nodelay(true).ok();
        let (read, write) = stream.into_split();
        let mut read = BufReader::new(read);
        // The banner is a single line with no blank line after it.
        let mut banner = String::new();
        tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut banner))
            .await
            .map_err(|_| Error::new(format!("no AMI banner on port {port}")))?
            .map_err(|e| Error::new(format!("AMI banner: {e}")))?;
        if !banner.starts_with("Asterisk Call Manager/") {
            return Err(Error::new(format!(
                "port {port} is not an AMI: {:?}",
                banner.trim_end()
            )));
        }
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(write),
            pending: Mutex::new(HashMap::new()),
            events: Mutex::new(Events::default()),
            changed: Notify::new(),
            closed: false.into(),
            next_id: AtomicU64::new(1),
            reader: Mutex::new(None),
        });
        let task = tokio::spawn(read_loop(read, Arc::downgrade(&shared)));
        *shared.reader.lock().unwrap() = Some(task);
        let ami = Ami { shared };
        let login = ami
            .action(
                "Login",
                &[("Username", username), ("Secret", secret), ("Events", "on")],
            )
            .await?;
        if !login.is_success() {
            ami.close();
            // The response's Message is Asterisk's ("Authentication
            // failed"); it never echoes the secret.
            return Err(Error::new(format!(
                "AMI login on port {port} refused: {}",
                login.get("Message").unwrap_or("")
            )));
        }
        Ok(ami)
    }

    /// Whether the connection is gone (Asterisk stopped).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Stop the reader task; the socket closes with the last handle.
    pub fn close(&self) {
        if let Some(task) = self.shared.reader.lock().unwrap().take() {
            task.abort();
        }
        self.shared.closed.store(true, Ordering::SeqCst);
        self.shared.changed.notify_waiters();
    }

    /// Send one action and wait for its response. `headers` go in order
    /// after `Action:`; a header may repeat (e.g. `Variable`). A value with
    /// CR or LF is refused: it would end the header and start another.
    pub async fn action(&self, action: &str, headers: &[(&str, &str)]) -> Result<Message, Error> {
        let id = format!(
            "popivr-{}",
            self.shared.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let mut text = format!("Action: {action}\r\nActionID: {id}\r\n");
        for (key, value) in headers {
            if key.contains(['\r', '\n', ':']) || value.contains(['\r', '\n']) {
                return Err(Error::new(format!(
                    "AMI {action}: header {key:?} has a line break or colon"
                )));
            }
            text.push_str(&format!("{key}: {value}\r\n"));
        }
        text.push_str("\r\n");

        let (tx, rx) = oneshot::channel();
        self.shared.pending.lock().unwrap().insert(id.clone(), tx);
        if self.is_closed() {
            self.shared.pending.lock().unwrap().remove(&id);
            return Err(Error::new(format!("AMI {action}: connection closed")));
        }
        let sent = self
            .shared
            .writer
            .lock()
            .await
            .write_all(text.as_bytes())
            .await;
        if let Err(e) = sent {
            self.shared.pending.lock().unwrap().remove(&id);
            return Err(Error::new(format!("AMI {action}: {e}")));
        }
        match tokio::time::timeout(ACTION_TIMEOUT, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(Error::new(format!("AMI {action}: connection closed"))),
            Err(_) => {
                self.shared.pending.lock().unwrap().remove(&id);
                Err(Error::new(format!(
                    "AMI {action}: no response in {ACTION_TIMEOUT:?}"
                )))
            }
        }
    }

    /// Run a CLI command (`Action: Command`) and return its output, one
    /// line per line. Panics if Asterisk does not answer (tests want the
    /// failure where it happens).
    pub async fn command(&self, cli: &str) -> String {
        self.try_command(cli)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`command`](Self::command) that reports failures.
    pub async fn try_command(&self, cli: &str) -> Result<String, Error> {
        let response = self.action("Command", &[("Command", cli)]).await?;
        if !response.is_success() {
            return Err(Error::new(format!(
                "CLI {cli:?} failed: {}",
                response.get("Message").unwrap_or("")
            )));
        }
        let mut out = String::new();
        for line in response.get_all("Output") {
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }

    /// Every event received so far, oldest first (including ones already
    /// returned by a `wait_*` call).
    pub fn events(&self) -> Vec<Event> {
        self.shared.events.lock().unwrap().all.clone()
    }

    /// Every event from index `seen` on (what [`events`](Self::events)
    /// would hold past its first `seen`), waiting up to `timeout` for one
    /// when there is none yet; empty on timeout or once the connection is
    /// closed. For a test that follows many calls at once: one reader
    /// keeps its own cursor instead of many waiters each scanning every
    /// event, and nothing is taken from the `wait_*` calls.
    pub async fn events_after(&self, seen: usize, timeout: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let events = self.shared.events.lock().unwrap();
                if events.all.len() > seen {
                    return events.all[seen..].to_vec();
                }
            }
            if self.is_closed() || tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Vec::new();
            }
        }
    }

    /// Wait for the oldest event that `filter` accepts and that no earlier
    /// `wait_*` call returned, including events that arrived before this
    /// call. The event is then taken: waiting twice for the same kind of
    /// event returns two different events (e.g. from two calls). `None`
    /// after `timeout` or once the connection is closed.
    pub async fn try_wait_event(
        &self,
        filter: impl Fn(&Event) -> bool,
        timeout: Duration,
    ) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register for the wake-up before looking, so an event that
            // arrives between the look and the wait is not missed.
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut events = self.shared.events.lock().unwrap();
                let Events { all, taken } = &mut *events;
                if let Some(i) = (0..all.len()).find(|&i| !taken[i] && filter(&all[i])) {
                    taken[i] = true;
                    return Some(all[i].clone());
                }
            }
            if self.is_closed() {
                return None;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// [`try_wait_event`](Self::try_wait_event) that panics on timeout,
    /// listing the kinds of events that did arrive.
    pub async fn wait_event(&self, filter: impl Fn(&Event) -> bool, timeout: Duration) -> Event {
        match self.try_wait_event(filter, timeout).await {
            Some(event) => event,
            None => panic!(
                "no matching AMI event in {timeout:?}; seen: {}",
                self.summary()
            ),
        }
    }

    /// Wait for `UserEvent(name,...)` (see [`wait_event`](Self::wait_event)
    /// for which one is returned); panics on timeout. The map holds the
    /// event's own fields (`KEY: value` arguments of the UserEvent, with
    /// the leading blanks of the value removed) and the channel's
    /// (`Channel`, `Uniqueid`, `Linkedid`, `CallerIDNum`...).
    pub async fn wait_user_event(&self, name: &str, timeout: Duration) -> Event {
        self.wait_event(|e| is_user_event(e, name), timeout).await
    }

    /// [`wait_user_event`](Self::wait_user_event) for one call only: the
    /// event must come from one of its channels (its `Linkedid` is the
    /// call's, see [`Call`](super::asterisk::Call)).
    pub async fn wait_user_event_for(
        &self,
        call: &super::asterisk::Call,
        name: &str,
        timeout: Duration,
    ) -> Event {
        self.wait_event(|e| is_user_event(e, name) && call.owns(e), timeout)
            .await
    }

    /// The event kinds seen, for failure messages: `Newexten×12, ...`.
    fn summary(&self) -> String {
        let events = self.shared.events.lock().unwrap();
        let mut counts: Vec<(String, usize)> = Vec::new();
        for e in &events.all {
            let mut kind = e.get("Event").cloned().unwrap_or_default();
            if let Some(user) = e.get("UserEvent") {
                kind = format!("UserEvent({user})");
            }
            match counts.iter_mut().find(|(k, _)| *k == kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((kind, 1)),
            }
        }
        counts
            .iter()
            .map(|(k, n)| format!("{k}×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn is_user_event(event: &Event, name: &str) -> bool {
    event.get("Event").map(String::as_str) == Some("UserEvent")
        && event
            .get("UserEvent")
            .is_some_and(|n| n.eq_ignore_ascii_case(name))
}

/// Read messages until the socket closes; hand responses to their waiting
/// action, keep everything else as an event. Holds only a weak reference,
/// so dropping the last [`Ami`] lets the task and socket go.
async fn read_loop(mut read: BufReader<OwnedReadHalf>, shared: std::sync::Weak<Shared>) {
    let mut message = Message::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // Asterisk sends UTF-8 where the data is UTF-8 (caller names);
        // anything else is shown lossily rather than dropped.
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if !text.is_empty() {
            message.0.push(parse_line(text));
            continue;
        }
        if message.0.is_empty() {
            continue;
        }
        let done = std::mem::take(&mut message);
        let waiter = match (done.get("Response"), done.get("ActionID")) {
            (Some(_), Some(id)) => shared.pending.lock().unwrap().remove(id),
            _ => None,
        };
        match waiter {
            Some(tx) => {
                let _ = tx.send(done);
            }
            None => {
                let mut events = shared.events.lock().unwrap();
                events.all.push(done.to_event());
                events.taken.push(false);
                drop(events);
                shared.changed.notify_waiters();
            }
        }
    }
    if let Some(shared) = shared.upgrade() {
        shared.closed.store(true, Ordering::SeqCst);
        // Dropping the senders fails every action still waiting.
        shared.pending.lock().unwrap().clear();
        shared.changed.notify_waiters();
    }
}

/// `Key: Value` → (`Key`, `Value`). The value loses its leading blanks
/// (Asterisk writes one space; UserEvent arguments may add more). A line
/// without a colon is kept whole under an empty key.
fn parse_line(line: &str) -> (String, String) {
    match line.split_once(':') {
        Some((key, value)) if !key.trim().is_empty() => (
            key.trim().to_owned(),
            value.trim_start_matches([' ', '\t']).to_owned(),
        ),
        _ => (String::new(), line.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_at_the_first_colon() {
        assert_eq!(
            parse_line("Output: a: b"),
            ("Output".to_owned(), "a: b".to_owned())
        );
        assert_eq!(parse_line("NAME: "), ("NAME".to_owned(), String::new()));
        assert_eq!(parse_line("KEY:v"), ("KEY".to_owned(), "v".to_owned()));
        assert_eq!(
            parse_line("no colon here"),
            (String::new(), "no colon here".to_owned())
        );
    }

    #[test]
    fn messages_find_keys_case_insensitively() {
        let m = Message(vec![
            ("Response".into(), "Success".into()),
            ("Output".into(), "1".into()),
            ("Output".into(), "2".into()),
        ]);
        assert!(m.is_success());
        assert_eq!(m.get("response"), Some("Success"));
        assert_eq!(m.get_all("Output").collect::<Vec<_>>(), ["1", "2"]);
    }
}
