//! The simulator proper: runs a child the way `ExternalIVR()` does and
//! plays Asterisk's part on its pipes, driven by cues from a test.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, lookup_host};
use tokio::process::{Child, ChildStderr, Command};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{MissedTickBehavior, timeout, timeout_at};

use super::channel::{Channel, EndReason, FRAME, Output, SILENCE};
use super::invocation::{Invocation, split_host_port};
use super::lines::{CommandInput, LineSplitter, ast_strip};
use super::transcript::{Dir, Transcript};

/// How long queued events may take to reach the child at the end before
/// its stdin is closed anyway (a child that stops reading must not hang
/// the simulator).
pub const WRITE_GRACE: Duration = Duration::from_millis(500);

/// `ivr://` without a port connects here (`EXTERNALIVR_PORT`).
pub const EXTERNALIVR_PORT: u16 = 2949;

/// How long stderr is drained at the end for lines already written.
const STDERR_DRAIN: Duration = Duration::from_millis(100);

/// What to run and the channel it runs on.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The data of `ExternalIVR(<data>)`: `/path/prog(arg1,arg2),opts`.
    pub data: String,
    /// Environment of the child. It starts empty apart from `PATH`.
    pub env: Vec<(String, String)>,
    /// Channel variables, keyed as `G` asks for them (`CALLERID(num)`).
    pub vars: BTreeMap<String, String>,
    /// The sound files that exist, with their play time.
    /// [`SILENCE`] (10 s) is there from the start.
    pub sounds: BTreeMap<String, Duration>,
    /// Working directory of the child (a program path without `/` is
    /// relative to it, as `execv` takes it).
    pub cwd: Option<PathBuf>,
}

impl SimConfig {
    pub fn new(data: impl Into<String>) -> Self {
        SimConfig {
            data: data.into(),
            env: Vec::new(),
            vars: BTreeMap::new(),
            sounds: BTreeMap::from([(SILENCE.to_string(), Duration::from_secs(10))]),
            cwd: None,
        }
    }

    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.vars.insert(name.into(), value.into());
        self
    }

    pub fn sound(mut self, name: impl Into<String>, length: Duration) -> Self {
        self.sounds.insert(name.into(), length);
        self
    }
}

/// Something the test makes happen on the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cue {
    /// The caller presses a key.
    Key(char),
    /// The caller hangs up.
    Hangup,
    /// Write this line to the child as it is (a newline is added if missing).
    Raw(String),
    /// Stop and close the pipes without any event.
    Close,
}

/// A command line Asterisk read (and acted on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Time since the child was started.
    pub at: Duration,
    /// The line as Asterisk saw it, stripped.
    pub line: String,
}

/// The result of waiting for the next command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Command(Received),
    TimedOut,
    /// The session is over and every command read was handed out.
    Ended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEnd {
    pub reason: EndReason,
    /// Time since start at which the child's stdin was closed.
    pub at: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitReport {
    pub status: ExitStatus,
    /// From the close of the child's stdin to its exit as seen here (zero
    /// when it had exited before).
    pub after_close: Duration,
}

#[derive(Debug)]
pub enum ExitError {
    /// Asterisk is still talking to the child.
    SessionOpen,
    /// The child was still running `waited` after the close; it was killed.
    NotExited {
        waited: Duration,
    },
    Wait(io::Error),
    /// `ivr://` runs no process: Asterisk closes the socket and is done.
    NoProcess,
}

impl std::fmt::Display for ExitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitError::SessionOpen => f.write_str("the session is still open"),
            ExitError::NotExited { waited } => {
                write!(
                    f,
                    "the child still ran {waited:?} after its stdin was closed (killed)"
                )
            }
            ExitError::Wait(e) => write!(f, "waiting for the child: {e}"),
            ExitError::NoProcess => f.write_str("ivr:// runs no process that could exit"),
        }
    }
}

impl std::error::Error for ExitError {}

/// State shared between the session task and the handle.
#[derive(Debug)]
struct Shared {
    channel: Channel,
    transcript: Transcript,
    stderr: Vec<String>,
    end: Option<SessionEnd>,
    closed_at: Option<Instant>,
    exit: Option<(Instant, Result<ExitStatus, String>)>,
}

impl Shared {
    fn new(invocation: &Invocation, config: SimConfig) -> Arc<Mutex<Shared>> {
        let channel = Channel::new(invocation, config.vars, config.sounds);
        Arc::new(Mutex::new(Shared {
            channel,
            transcript: Transcript::default(),
            stderr: Vec::new(),
            end: None,
            closed_at: None,
            exit: None,
        }))
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A panic while holding the lock leaves plain data behind; keep going.
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running simulated call. Dropping it ends the session and kills the
/// child if it still runs.
pub struct Sim {
    invocation: Invocation,
    started: Instant,
    cues: mpsc::UnboundedSender<Cue>,
    commands: mpsc::UnboundedReceiver<Received>,
    shared: Arc<Mutex<Shared>>,
    done: watch::Receiver<bool>,
    exited: watch::Receiver<bool>,
    /// Kills the child; dropped with the simulator, which kills it too.
    kill: Option<oneshot::Sender<()>>,
}

impl Sim {
    /// Start the child as `ExternalIVR(<config.data>)` would and begin
    /// playing Asterisk's part. Call from within a tokio runtime.
    pub fn start(config: SimConfig) -> io::Result<Sim> {
        let invocation = Invocation::parse(&config.data)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if invocation.options.dead && !invocation.options.no_answer {
            return Ok(Sim::refuse(config, invocation));
        }
        if invocation.socket().is_some() {
            return Ok(Sim::start_socket(config, invocation));
        }
        let program = invocation.program();
        // execv: no PATH search; a bare name is relative to the directory.
        let path = if program.contains('/') {
            program.to_string()
        } else {
            format!("./{program}")
        };
        let mut command = Command::new(&path);
        command
            .arg0(program)
            .args(invocation.args())
            .env_clear()
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(p) = std::env::var_os("PATH") {
            command.env("PATH", p);
        }
        command.envs(config.env.iter().map(|(k, v)| (k, v)));
        if let Some(dir) = &config.cwd {
            command.current_dir(dir);
        }
        let mut child = spawn(&mut command)?;
        let started = Instant::now();

        let shared = Shared::new(&invocation, config);
        lock(&shared).transcript.push(
            Duration::ZERO,
            Dir::Note,
            format!(
                "started {:?} (pid {:?}), options {:?}",
                invocation.argv,
                child.id(),
                invocation.options
            ),
        );

        let pipes = Pipes {
            stdin: Box::new(child.stdin.take().expect("stdin is piped")),
            stdout: child
                .stdout
                .take()
                .expect("stdout is piped")
                .into_owned_fd()?,
            stderr: Some(child.stderr.take().expect("stderr is piped")),
        };
        let (kill_tx, kill_rx) = oneshot::channel();
        let (exited_tx, exited_rx) = watch::channel(false);
        tokio::spawn(watch_child(
            child,
            kill_rx,
            shared.clone(),
            started,
            exited_tx,
        ));
        let open = std::future::ready(Ok(pipes));
        Ok(Sim::launch(
            invocation,
            shared,
            started,
            open,
            exited_rx,
            Some(kill_tx),
        ))
    }

    /// `ivr://HOST[:PORT]`: connect as `app_externalivr.c` does (each
    /// address of the host in turn until one accepts, port 2949 unless
    /// given) and run the session on the socket; no stderr. If none
    /// accepts, the session ends at once with [`EndReason::ConnectFailed`].
    fn start_socket(config: SimConfig, invocation: Invocation) -> Sim {
        let started = Instant::now();
        let shared = Shared::new(&invocation, config);
        let target = invocation.socket().unwrap_or_default().to_string();
        lock(&shared).transcript.push(
            Duration::ZERO,
            Dir::Note,
            format!(
                "connecting to {target} for {:?}, options {:?}",
                &invocation.argv[1..],
                invocation.options
            ),
        );
        let shared_for_connect = shared.clone();
        let open = async move {
            connect(target, shared_for_connect, started)
                .await
                .ok_or(EndReason::ConnectFailed)
        };
        // Nothing exits in socket mode; see `wait_exit`.
        let (_, exited_rx) = watch::channel(false);
        Sim::launch(invocation, shared, started, open, exited_rx, None)
    }

    /// Option `d` without `n`: the channel is not up (the simulated
    /// dialplan never answers it), and a real Asterisk will not answer a
    /// hung-up channel, so ExternalIVR fails before it starts a child or
    /// connects (`app_externalivr.c`). The session is over at once.
    fn refuse(config: SimConfig, invocation: Invocation) -> Sim {
        let started = Instant::now();
        let shared = Shared::new(&invocation, config);
        lock(&shared).transcript.push(
            Duration::ZERO,
            Dir::Note,
            "Running ExternalIVR with 'd'ead flag on non-hungup channel isn't supported \
             (option d needs n here: nothing started)"
                .to_string(),
        );
        let (_, exited_rx) = watch::channel(false);
        Sim::launch(
            invocation,
            shared,
            started,
            async { Err(EndReason::Refused) },
            exited_rx,
            None,
        )
    }

    /// The session task on the pipes or socket `open` yields (or the
    /// reason it ended before any), and the handle on it.
    fn launch(
        invocation: Invocation,
        shared: Arc<Mutex<Shared>>,
        started: Instant,
        open: impl Future<Output = Result<Pipes, EndReason>> + Send + 'static,
        exited: watch::Receiver<bool>,
        kill: Option<oneshot::Sender<()>>,
    ) -> Sim {
        let (cue_tx, cue_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (done_tx, done_rx) = watch::channel(false);
        let session = Session {
            shared: shared.clone(),
            started,
            commands: cmd_tx,
        };
        tokio::spawn(async move {
            match open.await {
                Ok(pipes) => session.run(pipes, cue_rx, done_tx).await,
                Err(reason) => {
                    let at = session.at();
                    lock(&session.shared).end = Some(SessionEnd { reason, at });
                    let _ = done_tx.send(true);
                }
            }
        });
        Sim {
            invocation,
            started,
            cues: cue_tx,
            commands: cmd_rx,
            shared,
            done: done_rx,
            exited,
            kill,
        }
    }

    /// `ivr://` mode: the session runs on a socket, and there is no child.
    pub fn is_socket(&self) -> bool {
        self.invocation.socket().is_some()
    }

    pub fn invocation(&self) -> &Invocation {
        &self.invocation
    }

    /// When the child was started; transcript times count from here.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    pub fn cue(&self, cue: Cue) {
        self.note(format!("cue: {cue:?}"));
        // After the end nobody listens; the cue is moot then.
        let _ = self.cues.send(cue);
    }

    /// The caller presses `key` (`0`-`9`, `A`-`D`, `*`, `#`).
    pub fn key(&self, key: char) {
        self.cue(Cue::Key(key));
    }

    /// The caller hangs up.
    pub fn hangup(&self) {
        self.cue(Cue::Hangup);
    }

    /// Write a raw line to the child.
    pub fn send_raw(&self, line: impl Into<String>) {
        self.cue(Cue::Raw(line.into()));
    }

    /// End the session without an event and close the pipes.
    pub fn close(&self) {
        self.cue(Cue::Close);
    }

    /// The next command Asterisk read, waiting at most `within`.
    pub async fn next_command(&mut self, within: Duration) -> Next {
        match timeout(within, self.commands.recv()).await {
            Ok(Some(received)) => Next::Command(received),
            Ok(None) => Next::Ended,
            Err(_) => Next::TimedOut,
        }
    }

    /// Look at the channel (variables, function writes, playlist, …).
    pub fn channel<R>(&self, f: impl FnOnce(&Channel) -> R) -> R {
        f(&lock(&self.shared).channel)
    }

    pub fn var(&self, name: &str) -> Option<String> {
        self.channel(|c| c.var(name).map(str::to_string))
    }

    pub fn function_writes(&self) -> Vec<(String, String)> {
        self.channel(|c| c.function_writes().to_vec())
    }

    /// The child's stderr lines so far, stripped as Asterisk logs them.
    pub fn stderr(&self) -> Vec<String> {
        lock(&self.shared).stderr.clone()
    }

    pub fn transcript(&self) -> Transcript {
        lock(&self.shared).transcript.clone()
    }

    /// Add a line of the test's own to the transcript.
    pub fn note(&self, text: impl Into<String>) {
        let at = self.elapsed();
        lock(&self.shared).transcript.push(at, Dir::Note, text);
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<SessionEnd> {
        lock(&self.shared).end
    }

    /// Wait at most `within` for the session to end.
    pub async fn wait_end(&mut self, within: Duration) -> Option<SessionEnd> {
        let _ = timeout(within, self.done.wait_for(|done| *done)).await;
        self.end()
    }

    /// After the session ended: wait for the child to exit, at most
    /// `bound` from the close of its stdin. A child still running then is
    /// killed and reported.
    ///
    /// Tests should pass a generous bound (2 s) so a loaded machine does not
    /// make them flaky; popivr's target of 100 ms after stdin EOF is for
    /// benches to measure with [`ExitReport::after_close`].
    pub async fn wait_exit(&mut self, bound: Duration) -> Result<ExitReport, ExitError> {
        if self.is_socket() {
            return Err(ExitError::NoProcess);
        }
        let closed_at = lock(&self.shared).closed_at.ok_or(ExitError::SessionOpen)?;
        let deadline = tokio::time::Instant::from_std(closed_at + bound);
        if timeout_at(deadline, self.exited.wait_for(|e| *e))
            .await
            .is_err()
        {
            if let Some(kill) = self.kill.take() {
                let _ = kill.send(());
            }
            let _ = timeout(Duration::from_secs(5), self.exited.wait_for(|e| *e)).await;
            self.note(format!(
                "child still running {bound:?} after the close: killed"
            ));
            return Err(ExitError::NotExited { waited: bound });
        }
        match &lock(&self.shared).exit {
            Some((at, Ok(status))) => Ok(ExitReport {
                status: *status,
                after_close: at.saturating_duration_since(closed_at),
            }),
            Some((_, Err(e))) => Err(ExitError::Wait(io::Error::other(e.clone()))),
            None => unreachable!("the exit is recorded before it is announced"),
        }
    }
}

/// Owns the child: records when it exits, kills it on request or when the
/// simulator is dropped.
async fn watch_child(
    mut child: Child,
    kill: oneshot::Receiver<()>,
    shared: Arc<Mutex<Shared>>,
    started: Instant,
    exited: watch::Sender<bool>,
) {
    let status = tokio::select! {
        status = child.wait() => status,
        _ = kill => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let now = Instant::now();
    {
        let mut shared = lock(&shared);
        let text = match &status {
            Ok(s) => format!("child exited ({s})"),
            Err(e) => format!("waiting for the child failed: {e}"),
        };
        shared.transcript.push(now - started, Dir::Note, text);
        shared.exit = Some((now, status.map_err(|e| e.to_string())));
    }
    let _ = exited.send(true);
}

/// Asterisk's ends of the conversation: the child's pipes, or the
/// `ivr://` socket (written through `stdin`, read through a second
/// descriptor of it in `stdout`; no stderr then).
struct Pipes {
    stdin: Box<dyn AsyncWrite + Send + Unpin>,
    /// Read as [`CommandInput`] does: only when the fd is polled ready.
    stdout: OwnedFd,
    stderr: Option<ChildStderr>,
}

/// Resolve `target` (`HOST[:PORT]`) and connect to each address in turn
/// until one accepts, noting every failure; the socket's two halves.
async fn connect(target: String, shared: Arc<Mutex<Shared>>, started: Instant) -> Option<Pipes> {
    let note = |text: String| {
        let at = started.elapsed();
        lock(&shared).transcript.push(at, Dir::Note, text);
    };
    let addrs: Vec<_> = match split_host_port(&target) {
        Some((host, port)) => match lookup_host((host, port.unwrap_or(EXTERNALIVR_PORT))).await {
            Ok(addrs) => addrs.collect(),
            Err(e) => {
                note(format!("Unable to locate host '{target}': {e}"));
                Vec::new()
            }
        },
        None => {
            note(format!("Unable to locate host '{target}'"));
            Vec::new()
        }
    };
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                note(format!("connected to {addr}"));
                let halves = stream.into_std().and_then(|s| {
                    let read = OwnedFd::from(s.try_clone()?);
                    Ok((read, TcpStream::from_std(s)?))
                });
                match halves {
                    Ok((read, write)) => {
                        return Some(Pipes {
                            stdin: Box::new(write),
                            stdout: read,
                            stderr: None,
                        });
                    }
                    Err(e) => note(format!("socket to {addr} unusable: {e}")),
                }
            }
            Err(e) => note(format!("connect to {addr} failed: {e}")),
        }
    }
    note("Could not connect to any host.  ExternalIVR failed.".into());
    None
}

/// The task that plays Asterisk: `eivr_comm()`'s loop.
struct Session {
    shared: Arc<Mutex<Shared>>,
    started: Instant,
    commands: mpsc::UnboundedSender<Received>,
}

impl Session {
    fn at(&self) -> Duration {
        self.started.elapsed()
    }

    fn note(&self, text: impl Into<String>) {
        let at = self.at();
        lock(&self.shared).transcript.push(at, Dir::Note, text);
    }

    async fn run(
        self,
        pipes: Pipes,
        mut cues: mpsc::UnboundedReceiver<Cue>,
        done: watch::Sender<bool>,
    ) {
        let (events, event_rx) = mpsc::unbounded_channel::<String>();
        let mut writer = tokio::spawn(write_events(
            pipes.stdin,
            event_rx,
            self.shared.clone(),
            self.started,
        ));
        let mut commands = match CommandInput::new(pipes.stdout) {
            Ok(input) => input,
            Err(e) => panic!("the simulator cannot poll the command fd: {e}"),
        };
        let (stop_stderr, stop_rx) = oneshot::channel();
        let stderr_reader = pipes.stderr.map(|stderr| {
            tokio::spawn(read_stderr(
                stderr,
                stop_rx,
                self.shared.clone(),
                self.started,
            ))
        });

        let mut frames = tokio::time::interval(FRAME);
        frames.set_missed_tick_behavior(MissedTickBehavior::Delay);

        let reason = loop {
            let outputs = lock(&self.shared).channel.check_hangup();
            if let Some(reason) = self.emit(outputs, &events) {
                break reason;
            }
            let mut received = None;
            let outputs = tokio::select! {
                cue = cues.recv() => self.on_cue(cue, &events),
                line = commands.next() => match line {
                    Some(raw) => self.on_line(&raw, &mut received),
                    None => vec![
                        Output::Note("child process went away".into()),
                        Output::End(EndReason::ChildWentAway),
                    ],
                },
                _ = frames.tick() => lock(&self.shared).channel.tick(Instant::now()),
            };
            let end = self.emit(outputs, &events);
            if let Some(received) = received {
                // Handed out after Asterisk acted on it, so the test sees
                // the channel as the command left it.
                let _ = self.commands.send(received);
            }
            if let Some(reason) = end {
                break reason;
            }
        };

        // Asterisk stops reading and closes its ends of all three pipes.
        drop(events);
        if timeout(WRITE_GRACE, &mut writer).await.is_err() {
            writer.abort();
            let _ = writer.await;
            self.note("the child does not read its stdin: closing it with events unsent");
        }
        // Exit times count from here: the child can see end of file now.
        let closed_at = Instant::now();
        let at = self.at();
        self.note(format!("session over ({reason:?}): stdin closed"));
        for line in commands.unread().iter().map(|raw| ast_strip(raw)) {
            // Empty lines are wake-ups: nothing was lost with them.
            if !line.is_empty() {
                self.note(format!("not read by Asterisk (after the end): {line}"));
            }
        }
        let _ = stop_stderr.send(());
        if let Some(reader) = stderr_reader {
            let _ = reader.await;
        }
        {
            let mut shared = lock(&self.shared);
            shared.closed_at = Some(closed_at);
            shared.end = Some(SessionEnd { reason, at });
        }
        let _ = done.send(true);
    }

    fn on_cue(&self, cue: Option<Cue>, events: &mpsc::UnboundedSender<String>) -> Vec<Output> {
        match cue {
            Some(Cue::Key(key)) => lock(&self.shared).channel.key(key),
            Some(Cue::Hangup) => {
                lock(&self.shared).channel.hangup();
                Vec::new()
            }
            Some(Cue::Raw(mut line)) => {
                if !line.ends_with('\n') {
                    line.push('\n');
                }
                let at = self.at();
                lock(&self.shared)
                    .transcript
                    .push(at, Dir::Event, line.trim_end_matches('\n'));
                let _ = events.send(line);
                Vec::new()
            }
            Some(Cue::Close) | None => vec![Output::End(EndReason::Closed)],
        }
    }

    fn on_line(&self, raw: &[u8], received: &mut Option<Received>) -> Vec<Output> {
        let line = ast_strip(raw);
        let at = self.at();
        let mut shared = lock(&self.shared);
        if line.len() < 3 {
            shared.transcript.push(
                at,
                Dir::Note,
                format!("ignored short line {:?}", String::from_utf8_lossy(raw)),
            );
            return Vec::new();
        }
        shared.transcript.push(at, Dir::Command, line.clone());
        let outputs = shared.channel.command(&line);
        *received = Some(Received { at, line });
        outputs
    }

    /// Carry out the channel's outputs; the end reason if one says so.
    fn emit(
        &self,
        outputs: Vec<Output>,
        events: &mpsc::UnboundedSender<String>,
    ) -> Option<EndReason> {
        let mut end = None;
        for output in outputs {
            let at = self.at();
            match output {
                Output::Event(event) => {
                    let line = event.render(unix_time());
                    lock(&self.shared)
                        .transcript
                        .push(at, Dir::Event, line.trim_end_matches('\n'));
                    let _ = events.send(line);
                }
                Output::Note(text) => lock(&self.shared).transcript.push(at, Dir::Note, text),
                Output::End(reason) => end = Some(reason),
            }
        }
        end
    }
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The stdin writer: never blocks the session; ends (closing stdin) when
/// the session drops its sender or a write fails.
async fn write_events(
    mut stdin: impl AsyncWrite + Unpin,
    mut events: mpsc::UnboundedReceiver<String>,
    shared: Arc<Mutex<Shared>>,
    started: Instant,
) {
    while let Some(line) = events.recv().await {
        if let Err(e) = stdin.write_all(line.as_bytes()).await {
            let at = started.elapsed();
            lock(&shared).transcript.push(
                at,
                Dir::Note,
                format!("write to the child's stdin failed: {e}"),
            );
            return;
        }
    }
}

/// Keep each stderr line like Asterisk's log copy. On `stop`, take what is
/// already in the pipe, then close it.
async fn read_stderr(
    mut pipe: ChildStderr,
    mut stop: oneshot::Receiver<()>,
    shared: Arc<Mutex<Shared>>,
    started: Instant,
) {
    let mut split = LineSplitter::default();
    let mut buf = [0u8; 4096];
    let mut open = true;
    let record = |split: &mut LineSplitter, at_eof: bool| {
        let mut lines = Vec::new();
        while let Some(line) = split.next_line() {
            lines.push(line);
        }
        if at_eof {
            lines.extend(split.finish());
        }
        let at = started.elapsed();
        let mut shared = lock(&shared);
        for raw in lines {
            let line = ast_strip(&raw);
            shared.transcript.push(at, Dir::Stderr, line.clone());
            shared.stderr.push(line);
        }
    };
    while open {
        tokio::select! {
            _ = &mut stop => break,
            r = pipe.read(&mut buf) => match r {
                Ok(n @ 1..) => split.push(&buf[..n]),
                _ => open = false,
            },
        }
        record(&mut split, !open);
    }
    if open {
        let deadline = tokio::time::Instant::now() + STDERR_DRAIN;
        while let Ok(Ok(n @ 1..)) = timeout_at(deadline, pipe.read(&mut buf)).await {
            split.push(&buf[..n]);
        }
        record(&mut split, true);
    }
}

/// Start the child. A program written a moment ago can fail with "Text
/// file busy" (ETXTBSY) while another thread of this process forks: the
/// new child holds the writer's descriptor until it execs. That passes
/// within milliseconds, so a few tries with a short pause get it.
fn spawn(command: &mut tokio::process::Command) -> io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}
