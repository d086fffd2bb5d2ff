//! Writing command lines so that Asterisk handles every one of them.
//!
//! Asterisk handles **one command line per wake-up** of its command fd
//! (externalivr-protocol.md, "How Asterisk reads commands"): each time
//! `poll()` finds the fd readable, `ast_iostream_gets()` returns a line
//! already in the stream's buffer or else reads what the fd holds (every
//! line in it goes into the buffer) and returns the first. Lines left in
//! that buffer wake nothing: they wait until the fd has bytes again. A
//! burst written at once would leave all but its first line there, the
//! final `E` or `H` for good.
//!
//! One property makes every stranded line harmless: while the fd holds
//! bytes, Asterisk wakes again and again and hands out one buffered line
//! per turn, reading the fd only once the buffer is empty. So a single
//! write that reaches the fd *after* Asterisk's last read drains the whole
//! buffer. An empty line does that without doing anything itself (Asterisk
//! ignores lines under 3 characters). The writer uses it in two ways:
//!
//! - **On a pipe** (per-call mode) it sees exactly what Asterisk has read:
//!   `FIONREAD` on the write end counts the bytes still in the pipe. A batch
//!   is written only when the pipe is empty, and Asterisk's buffer is then
//!   empty too. A batch of one line is read and handled alone; a batch of
//!   several is followed, once Asterisk has read it, by one empty line.
//! - **On a socket** (`ivr://` to `popivr serve`) nothing shows what the
//!   other end has read, only what it answers. A batch of several lines
//!   starts with a `G,POPIVR_SYNC` the writer adds (its answer never
//!   reaches the call): that answer proves Asterisk has read the batch's
//!   start, so an empty line written the moment it comes drains the
//!   batch, one round trip after it was written. Every batch also ends
//!   with a line Asterisk answers unmistakably (`E`, `H`, or else another
//!   `G,POPIVR_SYNC`), and until the answers to all such lines have come
//!   the writer wakes Asterisk again at each answer and at growing
//!   intervals (a batch that reached Asterisk in pieces): Asterisk handles
//!   lines in order, so the last answer proves that every line before it
//!   was handled.
//!
//! Either way no line is left behind, however the reads fall, and the
//! cost is an empty line per batch (and on a socket a `G` or two).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc, watch};

use super::Event;

/// The plain variable the socket writer reads to learn that Asterisk has
/// handled a batch. Nothing sets it; its answer is `POPIVR_SYNC=`.
pub const SYNC_VAR: &str = "POPIVR_SYNC";

/// The empty line that wakes Asterisk without doing anything.
const WAKE: &[u8] = b"\n";

/// On a socket, the first wake-up follows a batch after this long, the
/// next ones at twice the previous interval, up to [`MAX_WAKE`].
const FIRST_WAKE: Duration = Duration::from_millis(1);
const MAX_WAKE: Duration = Duration::from_millis(64);

/// On a pipe, how often the pipe is looked at while Asterisk has not read
/// it: often at first (it reads within a fraction of a millisecond when
/// idle), then less.
const FIRST_LOOK: Duration = Duration::from_micros(20);
const MAX_LOOK: Duration = Duration::from_millis(2);

/// How the writer stopped: Asterisk's side is closed, or it read nothing
/// (or answered nothing) for this long.
pub const STALL: Duration = Duration::from_secs(10);

/// Commands queued for a writer that Asterisk is not reading, past which
/// the writer stops at once rather than hold more: a call queues a few
/// hundred bytes at a time, so this much waiting means an Asterisk that
/// reads nothing while it keeps sending events (each one answered by a
/// command).
pub const MAX_BACKLOG: usize = 64 * 1024;

/// Before a call's writer exists, `popivr serve` writes `P` and the
/// variable reads every profile needs in one write: Asterisk handles `P`,
/// the first line, and holds the reads in its buffer. Once `P`'s answer has
/// come, this empty line drains them (the same rule as the writer's).
pub async fn drain_after_answer<W: AsyncWrite + Unpin>(out: &mut W) -> io::Result<()> {
    tokio::time::timeout(STALL, out.write_all(WAKE))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))?
}

/// The command side of one call: takes batches of rendered lines and
/// writes them as the module doc says, on a thread (pipe) or a task
/// (socket) of its own, so the call never waits for Asterisk's reads.
pub struct CommandWriter {
    batches: mpsc::UnboundedSender<Vec<String>>,
    stop: Arc<watch::Sender<Option<String>>>,
    stopped: watch::Receiver<Option<String>>,
    answers: Answers,
    /// Bytes queued and not yet taken by the writer.
    backlog: Arc<AtomicUsize>,
}

impl CommandWriter {
    /// Write to a pipe whose other end Asterisk reads (the per-call
    /// process's stdout). Anything but a pipe gets no pacing beyond the
    /// empty line after each batch of several lines.
    pub fn pipe(fd: OwnedFd) -> CommandWriter {
        let (batches, mut rx) = mpsc::unbounded_channel::<Vec<String>>();
        let (stop, stopped) = watch::channel(None);
        let stop = Arc::new(stop);
        let backlog = Arc::new(AtomicUsize::new(0));
        let is_pipe = is_fifo(&fd);
        let (stopping, taken) = (stop.clone(), backlog.clone());
        std::thread::Builder::new()
            .name("eivr-writer".into())
            .spawn(move || {
                let mut pipe = Pipe { fd, is_pipe };
                while let Some(mut batch) = rx.blocking_recv() {
                    while let Ok(more) = rx.try_recv() {
                        batch.extend(more);
                    }
                    taken.fetch_sub(size(&batch), Ordering::SeqCst);
                    if let Err(e) = pipe.write_batch(&batch) {
                        stop_with(&stopping, e.to_string());
                        return;
                    }
                }
            })
            .expect("start the command writer thread");
        CommandWriter {
            batches,
            stop,
            stopped,
            answers: Answers::default(),
            backlog,
        }
    }

    /// Write to a socket Asterisk reads. Every event Asterisk sends on it
    /// must be shown to [`CommandWriter::answers`].
    pub fn socket<W>(out: W) -> CommandWriter
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let answers = Answers::default();
        let (batches, rx) = mpsc::unbounded_channel();
        let (stop, stopped) = watch::channel(None);
        let stop = Arc::new(stop);
        let backlog = Arc::new(AtomicUsize::new(0));
        let (counted, stopping, taken) = (answers.clone(), stop.clone(), backlog.clone());
        tokio::spawn(async move {
            if let Err(e) = write_socket(out, rx, counted, taken).await {
                stop_with(&stopping, e.to_string());
            }
        });
        CommandWriter {
            batches,
            stop,
            stopped,
            answers,
            backlog,
        }
    }

    /// What the event reader tells about Asterisk's answers.
    pub fn answers(&self) -> Answers {
        self.answers.clone()
    }

    /// Queue a batch of lines (each rendered with its `\n`). Past
    /// [`MAX_BACKLOG`] unwritten bytes the writer stops instead.
    pub fn send(&self, batch: Vec<String>) {
        if batch.is_empty() || self.stop.borrow().is_some() {
            return;
        }
        let queued = self.backlog.fetch_add(size(&batch), Ordering::SeqCst) + size(&batch);
        if queued > MAX_BACKLOG {
            stop_with(
                &self.stop,
                format!("Asterisk read nothing of {} KiB of commands", queued / 1024),
            );
            return;
        }
        let _ = self.batches.send(batch);
    }

    /// Resolves once the writer cannot go on, with the reason.
    pub async fn stopped(&mut self) -> String {
        match self.stopped.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or_default(),
            Err(_) => "the command writer is gone".to_string(),
        }
    }
}

fn size(batch: &[String]) -> usize {
    batch.iter().map(String::len).sum()
}

/// Record why the writer stops, unless a reason is already there.
fn stop_with(stop: &watch::Sender<Option<String>>, why: String) {
    stop.send_if_modified(|reason| {
        if reason.is_some() {
            return false;
        }
        *reason = Some(why);
        true
    });
}

/// The per-call writer's pipe.
struct Pipe {
    fd: OwnedFd,
    is_pipe: bool,
}

impl Pipe {
    fn write_batch(&mut self, batch: &[String]) -> io::Result<()> {
        // Asterisk's buffer is empty once the pipe is: what it last read
        // was one line alone, or an empty line after a batch.
        self.wait_read()?;
        write_fd(&self.fd, batch.concat().as_bytes())?;
        if batch.len() > 1 {
            self.wait_read()?;
            write_fd(&self.fd, WAKE)?;
        }
        Ok(())
    }

    /// Until Asterisk has read everything in the pipe.
    fn wait_read(&self) -> io::Result<()> {
        if !self.is_pipe {
            return Ok(());
        }
        let start = Instant::now();
        let mut look = FIRST_LOOK;
        while unread(&self.fd)? > 0 {
            if start.elapsed() > STALL {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("Asterisk read nothing for {STALL:?}"),
                ));
            }
            std::thread::sleep(look);
            look = (look * 2).min(MAX_LOOK);
        }
        Ok(())
    }
}

fn is_fifo(fd: &OwnedFd) -> bool {
    // SAFETY: fstat fills a plain struct for a descriptor we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe {
        libc::fstat(fd.as_raw_fd(), &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    }
}

/// Bytes in the pipe that its reader has not read yet.
fn unread(fd: &OwnedFd) -> io::Result<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n.max(0) as usize)
}

fn write_fd(fd: &OwnedFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for its length.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Counts Asterisk's answers on a socket, for its writer.
#[derive(Debug, Clone, Default)]
pub struct Answers(Arc<AnswerCount>);

#[derive(Debug, Default)]
struct AnswerCount {
    heard: AtomicU64,
    notify: Notify,
}

impl Answers {
    /// Count `event` if it answers a command. `true` when it is the
    /// answer to the writer's own [`SYNC_VAR`] read, which is not the
    /// call's business.
    pub fn heard(&self, event: &Event) -> bool {
        // Only answers no other line can cause: a stray `G` or `P` event
        // must not pass for the answer to a batch.
        let ours = match event {
            Event::Vars(data) if is_sync_answer(data) => true,
            Event::Exit | Event::Hangup => false,
            _ => return false,
        };
        self.0.heard.fetch_add(1, Ordering::SeqCst);
        self.0.notify.notify_one();
        ours
    }

    fn count(&self) -> u64 {
        self.0.heard.load(Ordering::SeqCst)
    }
}

fn is_sync_answer(data: &str) -> bool {
    data.strip_prefix(SYNC_VAR)
        .is_some_and(|rest| rest.starts_with('='))
}

/// Whether this rendered line ends a batch with an answer of its own
/// (`E`, `H`); any other batch gets the writer's sync read.
fn is_final(line: &str) -> bool {
    matches!(line.as_bytes().first(), Some(b'E' | b'H'))
}

async fn write_socket<W: AsyncWrite + Unpin>(
    mut out: W,
    mut batches: mpsc::UnboundedReceiver<Vec<String>>,
    answers: Answers,
    backlog: Arc<AtomicUsize>,
) -> io::Result<()> {
    let sync = format!("G,{SYNC_VAR}\n");
    let mut asked = answers.count();
    // While answers are due: when to wake Asterisk next, and the interval.
    let mut wake: Option<(tokio::time::Instant, Duration)> = None;
    let mut waiting_since = tokio::time::Instant::now();
    loop {
        tokio::select! {
            batch = batches.recv() => {
                let Some(mut batch) = batch else { return Ok(()) };
                backlog.fetch_sub(size(&batch), Ordering::SeqCst);
                if batch.len() > 1 {
                    batch.insert(0, sync.clone());
                }
                if !batch.last().is_some_and(|l| is_final(l)) {
                    batch.push(sync.clone());
                }
                asked += batch.iter().filter(|l| is_final(l) || **l == sync).count() as u64;
                write_timed(&mut out, batch.concat().as_bytes()).await?;
                if wake.is_none() {
                    waiting_since = tokio::time::Instant::now();
                }
                wake = Some((tokio::time::Instant::now() + FIRST_WAKE, FIRST_WAKE));
            }
            _ = answers.0.notify.notified(), if wake.is_some() => {
                // Asterisk read the line it answered, and with it what
                // came along: wake it for the rest at once.
                if answers.count() < asked {
                    write_timed(&mut out, WAKE).await?;
                }
            }
            _ = sleep_until(wake.map(|(at, _)| at)) => {
                if waiting_since.elapsed() > STALL {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("Asterisk answered nothing for {STALL:?}"),
                    ));
                }
                write_timed(&mut out, WAKE).await?;
                let next = wake.map_or(FIRST_WAKE, |(_, every)| (every * 2).min(MAX_WAKE));
                wake = Some((tokio::time::Instant::now() + next, next));
            }
        }
        if answers.count() >= asked {
            wake = None;
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn write_timed<W: AsyncWrite + Unpin>(out: &mut W, bytes: &[u8]) -> io::Result<()> {
    let write = async {
        out.write_all(bytes).await?;
        out.flush().await
    };
    match tokio::time::timeout(STALL, write).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("Asterisk read nothing for {STALL:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_lines() {
        for line in ["E,bye\n", "H,bye\n"] {
            assert!(is_final(line), "{line}");
        }
        for line in [
            "G,X\n",
            "P,x\n",
            "S,a\n",
            "A,a\n",
            "V,A=1\n",
            "L,x\n",
            "I,x\n",
            "O,autoclear\n",
            "T,x\n",
        ] {
            assert!(!is_final(line), "{line}");
        }
    }

    #[test]
    fn only_the_sync_answer_is_the_writers_own() {
        let a = Answers::default();
        assert!(a.heard(&Event::Vars("POPIVR_SYNC=".into())));
        assert!(a.heard(&Event::Vars("POPIVR_SYNC=set by someone".into())));
        assert!(!a.heard(&Event::Vars("POPIVR_SYNCX=".into())));
        assert!(!a.heard(&Event::Vars("POPIVR_CALLER_NUM=1".into())));
        assert!(!a.heard(&Event::Exit));
        assert!(!a.heard(&Event::Params(vec!["x".into()])));
        assert!(!a.heard(&Event::Finished("a".into())));
        assert_eq!(a.count(), 3, "stray G, P and F events are no answers");
    }

    /// On a socket the batch is drained the moment Asterisk answers its
    /// first line, not at the first timed wake-up: on a paused clock the
    /// empty line comes without any time passing.
    #[tokio::test(start_paused = true)]
    async fn a_socket_batch_is_drained_as_soon_as_its_first_line_is_answered() {
        use tokio::io::AsyncReadExt;
        let (out, mut asterisk) = tokio::io::duplex(4096);
        let writer = CommandWriter::socket(out);
        let answers = writer.answers();
        let t0 = tokio::time::Instant::now();
        writer.send(vec!["S,a\n".into(), "A,b\n".into()]);
        let mut buf = vec![0u8; 4096];
        let n = asterisk.read(&mut buf).await.unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "G,POPIVR_SYNC\nS,a\nA,b\nG,POPIVR_SYNC\n"
        );
        // Asterisk read all of it and handled the first line only.
        assert!(answers.heard(&Event::Vars("POPIVR_SYNC=".into())));
        let n = asterisk.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], WAKE);
        assert_eq!(
            tokio::time::Instant::now(),
            t0,
            "woken by the timer, not the answer"
        );
    }

    #[tokio::test]
    async fn a_writer_nobody_reads_stops_once_its_backlog_is_full() {
        // Asterisk's end: held open, never read.
        let (out, _asterisk) = tokio::io::duplex(64);
        let mut writer = CommandWriter::socket(out);
        let line = format!("A,{}\n", "x".repeat(1000));
        let mut sent = 0;
        while sent < 2 * MAX_BACKLOG {
            writer.send(vec![line.clone()]);
            sent += line.len();
        }
        let why = tokio::time::timeout(Duration::from_secs(1), writer.stopped())
            .await
            .expect("stops long before STALL");
        assert!(why.starts_with("Asterisk read nothing of 64 KiB"), "{why}");
        // A second reason never replaces the first.
        writer.send(vec![line]);
        assert_eq!(writer.stopped().await, why);
    }
}
