//! The bench as Asterisk for one call: a child process on pipes (as
//! `ExternalIVR(/path(args))` starts it) or one TCP connection to
//! `popivr serve` (as `ExternalIVR(ivr://host:port(args))` opens it).
//!
//! A reader thread, already blocked in `read` before the child starts or
//! the connection opens, timestamps each line as it arrives and answers
//! `G` and `P` at once, as Asterisk does from the channel's thread. The
//! bench plays Asterisk itself rather than through `popivr_testkit::sim` because
//! it needs the child's pid (`wait4`, `/proc`) and these timestamps.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// How long any single wait may take before the run is declared broken.
pub const WAIT: Duration = Duration::from_secs(20);

/// What `G` reads answer (the default `variables` of a profile).
pub const VARS: &[(&str, &str)] = &[
    ("POPIVR_CALLER_NUM", "5551234"),
    ("POPIVR_CALLER_NAME", "Doe%20John"),
    ("POPIVR_EXTEN", "100"),
    ("POPIVR_DNID", "100"),
    ("POPIVR_UNIQUEID", "1700000000.42"),
];

type Writer = Arc<Mutex<Option<Box<dyn Write + Send>>>>;

/// Asterisk's side of one running call.
pub struct Asterisk {
    /// The child's pid (process mode).
    pub pid: Option<libc::pid_t>,
    /// Just before the spawn or the connect.
    pub t0: Instant,
    writer: Writer,
    lines: UnboundedReceiver<(Instant, String)>,
    stderr: Arc<Mutex<Vec<String>>>,
    seen: Vec<String>,
    /// A failed exit is counted by the caller instead of ending the run.
    pub lenient: bool,
    /// The child exited with status 0 (after `close_and_wait`).
    pub exited_ok: bool,
}

/// A program to start as the call's child.
pub struct Program {
    pub path: PathBuf,
    /// Arguments before `n=N`.
    pub args: Vec<String>,
    /// Environment besides `PATH`.
    pub env: Vec<(String, PathBuf)>,
}

impl Asterisk {
    /// Start call `n` as a child process, as `ExternalIVR()` does: no
    /// shell, an environment of `PATH` and what the dialplan adds.
    pub fn spawn(program: &Program, n: usize) -> Asterisk {
        let (out_r, out_w) = std::io::pipe().expect("pipe");
        let (in_r, in_w) = std::io::pipe().expect("pipe");
        let (err_r, err_w) = std::io::pipe().expect("pipe");
        let writer: Writer = Arc::new(Mutex::new(Some(Box::new(in_w))));
        let (tx, lines) = unbounded_channel();
        // The readers wait in `read` before the child exists.
        spawn_reader(Box::new(out_r), writer.clone(), tx, String::new());
        let stderr = Arc::new(Mutex::new(Vec::new()));
        spawn_stderr_reader(err_r, stderr.clone());

        let mut cmd = Command::new(&program.path);
        cmd.args(&program.args)
            .arg(format!("n={n}"))
            .env_clear()
            .stdin(in_r)
            .stdout(out_w)
            .stderr(err_w);
        for (k, v) in &program.env {
            cmd.env(k, v);
        }
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let t0 = Instant::now();
        #[expect(
            clippy::zombie_processes,
            reason = "reaped by wait4 in close_and_wait, which also reads its rusage"
        )]
        let child = cmd.spawn().expect("spawn the call's program");
        // Our copies of the child's ends must go, or EOF never comes.
        drop(cmd);
        Asterisk {
            pid: Some(child.id() as libc::pid_t),
            t0,
            writer,
            lines,
            stderr,
            seen: Vec::new(),
            lenient: false,
            exited_ok: false,
        }
    }

    /// Open call `n` on `popivr serve` at `addr` with `profile`: the `P`
    /// answer carries `ivr://ADDR,PROFILE,n=N`, as Asterisk builds it.
    pub fn connect(addr: &str, profile: &str, n: usize) -> Asterisk {
        let params = format!("ivr://{addr},{profile},n={n}");
        let t0 = Instant::now();
        let stream = TcpStream::connect(addr).expect("connect to popivr serve");
        let _ = stream.set_nodelay(true);
        let read = stream.try_clone().expect("clone the socket");
        let writer: Writer = Arc::new(Mutex::new(Some(Box::new(stream))));
        let (tx, lines) = unbounded_channel();
        spawn_reader(Box::new(read), writer.clone(), tx, params);
        Asterisk {
            pid: None,
            t0,
            writer,
            lines,
            stderr: Arc::new(Mutex::new(Vec::new())),
            seen: Vec::new(),
            lenient: false,
            exited_ok: false,
        }
    }

    /// The next command line starting with `prefix`, and when it was read.
    pub async fn expect(&mut self, prefix: &str) -> (Instant, String) {
        match self.try_expect(prefix).await {
            Some(got) => got,
            None => self.fail(&format!("no {prefix:?} within {WAIT:?}, or output closed")),
        }
    }

    /// The call's start: the first `S,` and `reads` variable reads (`G,`
    /// other than the socket writer's own sync read), in whatever order
    /// they come (a serve call reads with `P`, before the audio). The
    /// instants of the `S,` and of the last read.
    pub async fn expect_start(&mut self, reads: usize) -> (Instant, Instant) {
        let deadline = tokio::time::Instant::now() + WAIT;
        let (mut audio, mut last_read, mut left) = (None, None, reads);
        while audio.is_none() || left > 0 {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) => {
                    self.seen.push(line.clone());
                    if line.starts_with("S,") && audio.is_none() {
                        audio = Some(at);
                    } else if line.starts_with("G,")
                        && !line.starts_with("G,POPIVR_SYNC")
                        && left > 0
                    {
                        left -= 1;
                        last_read = Some(at);
                    }
                }
                Ok(None) | Err(_) => self.fail(&format!(
                    "no S, and {reads} G, within {WAIT:?}, or output closed"
                )),
            }
        }
        let audio = audio.expect("seen");
        (audio, last_read.unwrap_or(audio))
    }

    /// The same, `None` if it does not come within [`WAIT`].
    pub async fn try_expect(&mut self, prefix: &str) -> Option<(Instant, String)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return Some((at, line));
                    }
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Write an event line (a timestamp is added).
    pub fn event(&self, tag: &str) {
        write_event(&self.writer, &format!("{tag},{}", unix_time()));
    }

    /// What the program wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lock").join(" | ")
    }

    /// Close the input (no event first); for a child, wait for its exit:
    /// the time from the close to `wait4` returning, and its CPU time.
    pub async fn close_and_wait(&mut self) -> (Duration, Duration) {
        let writer = self.writer.clone();
        let Some(pid) = self.pid else {
            if let Some(w) = writer.lock().expect("writer lock").take() {
                drop(w);
            }
            return (Duration::ZERO, Duration::ZERO);
        };
        let (after, status, cpu) = tokio::task::spawn_blocking(move || {
            let w = writer.lock().expect("writer lock").take();
            // Timed from just before the close: taken after it, a
            // preemption between the two would hide the exit entirely.
            let closed = Instant::now();
            drop(w);
            let mut status = 0;
            // SAFETY: a zeroed rusage is a valid out-parameter.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // A child that does not leave on EOF is killed after a while
            // (and the call reported as failed), as Asterisk's own exit
            // check would.
            let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let watchdog = done.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                while t.elapsed() < WAIT {
                    std::thread::sleep(Duration::from_millis(100));
                    if watchdog.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                }
                // SAFETY: our own child, not reaped while `done` is unset.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            });
            // SAFETY: pid is our own child, not yet reaped.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            assert_eq!(r, pid, "wait4: {}", std::io::Error::last_os_error());
            let after = closed.elapsed();
            (after, status, cpu_time(&usage))
        })
        .await
        .expect("wait4 task");
        self.exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        if !self.exited_ok && !self.lenient {
            self.fail(&format!("the program ended with wait status {status:#x}"));
        }
        (after, cpu)
    }

    pub fn fail(&self, why: &str) -> ! {
        panic!(
            "call (pid {:?}): {why}\n commands read: {:?}\n stderr:\n  {}",
            self.pid,
            self.seen,
            self.stderr()
        );
    }
}

fn cpu_time(u: &libc::rusage) -> Duration {
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

fn spawn_reader(
    out: Box<dyn Read + Send>,
    writer: Writer,
    tx: UnboundedSender<(Instant, String)>,
    params: String,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let at = Instant::now();
            let line = line.trim().to_string();
            if let Some(name) = line.strip_prefix("G,") {
                let value = VARS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map_or("", |(_, v)| *v);
                write_event(&writer, &format!("G,{},{name}={value}", unix_time()));
            } else if line.starts_with("P,") {
                write_event(&writer, &format!("P,{},{params}", unix_time()));
            }
            // Nobody listening any more is fine: keep draining.
            let _ = tx.send((at, line));
        }
    });
}

fn spawn_stderr_reader(err: std::io::PipeReader, lines: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines() {
            let Ok(line) = line else { return };
            lines.lock().expect("stderr lock").push(line);
        }
    });
}

fn write_event(writer: &Writer, line: &str) {
    if let Some(w) = writer.lock().expect("writer lock").as_mut() {
        // A program that has gone shows up as a missing command later.
        let _ = w.write_all(format!("{line}\n").as_bytes());
        let _ = w.flush();
    }
}

pub fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Memory of a live process from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Peak resident set (`VmHWM`).
    ///
    /// Not `wait4`'s `ru_maxrss`: Linux folds the high-water mark of the
    /// memory a process had *before* `execve` into it (`exec_mmap` →
    /// `setmax_mm_hiwater_rss`), and a child spawned with `vfork` had its
    /// parent's, so `ru_maxrss` reports at least the spawner's own peak.
    pub hwm: u64,
    /// Resident now.
    pub rss: u64,
    /// Resident now: anonymous (heap, stacks) and file-backed.
    pub anon: u64,
    pub file: u64,
}

/// Read `/proc/<pid>/status`; with `BENCH_SMAPS=<prefix>` the first call
/// of each `label` also copies its smaps to `<prefix>.<label>`.
pub fn memory(pid: libc::pid_t, label: &str) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    if let Some(prefix) = std::env::var_os("BENCH_SMAPS") {
        let mut file = prefix;
        file.push(format!(".{label}"));
        let file = PathBuf::from(file);
        if !file.exists() {
            let _ = std::fs::copy(format!("/proc/{pid}/smaps"), &file);
        }
    }
    Some(Memory {
        hwm: field("VmHWM:")?,
        rss: field("VmRSS:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
    })
}

/// User + system CPU time of a live process so far (`/proc/<pid>/stat`).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after ")".
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_secs_f64((utime + stime) as f64 / hz as f64))
}
