//! A throw-away XMPP server for tests, benchmarks and `popivr demo`.
//!
//! [`Prosody`] runs a real prosody on 127.0.0.1 with its own temp dir,
//! generated config, data, test CA ([`TestCa`]) and free port. Each user
//! starts their own (about a quarter of a second), so tests run in
//! parallel and may stop, freeze or restart their server without
//! disturbing others. Dropping it kills the process group and removes the
//! directory.
//!
//! The server has a multi-user chat service at `conference.<domain>`
//! ([`Prosody::muc_domain`]) where any local user may create rooms, and
//! may serve further virtual hosts ([`Builder::host`]), for example a
//! look-alike domain.
//!
//! Passwords go to `prosodyctl adduser` on stdin, never in argv, and are
//! never printed.
//!
//! ```no_run
//! use popivr_testkit::testbed::Prosody;
//! let server = Prosody::builder().user("pbx", "pw1").user("alice", "pw2").start();
//! let account = server.account("pbx", "pw1"); // TLS with the test CA
//! assert_eq!(server.jid("alice"), "alice@popivr.test");
//! # drop(account);
//! ```

mod ami;
pub mod asterisk;
mod ca;
mod ejabberd;
mod prosody;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub use ami::{Ami, Event, Message, event_time};
pub use asterisk::Asterisk;
pub use ca::TestCa;
pub use ejabberd::{Builder as EjabberdBuilder, Ejabberd};
pub use prosody::{Builder, Prosody};

use std::path::PathBuf;
use std::time::{Duration, Instant};

use popivr::config::Account;

/// Default XMPP domain of a test server. Connections go to 127.0.0.1 with
/// `serverhost`, and the certificate is checked against this name.
pub const DOMAIN: &str = "popivr.test";

/// What every throw-away server has: a temp dir (config, data, test CA),
/// a domain, a port on 127.0.0.1. [`Prosody`] and [`Ejabberd`] dereference
/// to it, so `server.account(..)` reads the same for both.
#[derive(Debug)]
pub struct ServerBase {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) domain: String,
    pub(crate) hosts: Vec<String>,
    pub(crate) port: u16,
    pub(crate) startup: Duration,
    /// The server process while it runs (leader of its own group).
    pub(crate) child: Option<std::process::Child>,
}

impl ServerBase {
    /// Stop the server politely (SIGTERM: clients get a stream end).
    pub fn stop(&mut self) {
        self.reap(libc::SIGTERM);
    }

    /// Kill the server (SIGKILL: connections drop without a stream end).
    pub fn kill(&mut self) {
        self.reap(libc::SIGKILL);
    }

    /// Freeze the server (SIGSTOP): TCP still connects, nothing answers.
    /// Returns once the server is stopped: a signal takes effect when its
    /// process is next scheduled, on a loaded machine milliseconds later
    /// (long enough to answer a stanza sent after this call).
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
        let Some(pid) = self.pid() else { return };
        // Every thread (ejabberd's VM has many): the leader shows `T` as
        // soon as it has stopped, while another may still handle a stanza.
        let thread_stopped = |stat: String| {
            // The state follows the parenthesised command name.
            let rest = &stat[stat.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|s| s == "T" || s == "t")
        };
        let stopped = || {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                return true;
            };
            tasks.flatten().all(|task| {
                std::fs::read_to_string(task.path().join("stat"))
                    .ok()
                    .and_then(thread_stopped)
                    .unwrap_or(true)
            })
        };
        let t0 = std::time::Instant::now();
        while !stopped() && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Undo [`freeze`](Self::freeze).
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// After spawning `self.child`: wait until the log at `log_path`
    /// (new text after `log_len`) holds `ready`. A line holding `in_use`
    /// means the port was taken (try another), an exit or `timeout` fails.
    pub(crate) fn wait_ready(
        &mut self,
        log_path: &std::path::Path,
        log_len: u64,
        ready: &str,
        in_use: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read(log_path).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(log_len as usize..).unwrap_or_default());
            if new.contains(in_use) {
                self.reap(libc::SIGKILL);
                return Err(format!("port {} in use", self.port));
            }
            if new.contains(ready) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let console = std::fs::read_to_string(self.dir.path().join("console.log"))
                    .unwrap_or_default();
                return Err(format!("exited ({status}): {console}{new}"));
            }
            if Instant::now() > deadline {
                self.reap(libc::SIGKILL);
                return Err(format!("not ready after {timeout:?}: {new}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // The group id is the child's pid (see `spawn_tied`).
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), sig);
            }
        }
    }

    /// Signal the server's process group, wait (5 s at most) for the
    /// server to exit, then SIGKILL whatever is left in the group: the
    /// group is what the test owns (ejabberd's VM starts port programs).
    pub(crate) fn reap(&mut self, sig: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = -(child.id() as libc::pid_t);
        unsafe {
            libc::kill(pgid, sig);
            // A frozen server cannot act on SIGTERM; SIGKILL needs no
            // help, and a continued server would first read and answer
            // what waited in its socket (a test of what a server never
            // read would then find it read).
            if sig != libc::SIGKILL {
                libc::kill(pgid, libc::SIGCONT);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    unsafe {
                        libc::kill(pgid, libc::SIGKILL);
                    }
                    let _ = child.wait();
                    break;
                }
            }
        }
        unsafe {
            libc::kill(pgid, libc::SIGKILL);
        }
    }
    /// The main domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The extra virtual hosts.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The multi-user chat service, `conference.<domain>`. Any local user
    /// may create rooms there. New rooms on prosody show real JIDs
    /// (`muc_room_default_public_jids`); on ejabberd they hide them, as
    /// both servers' stock configs do for rooms an admin creates.
    pub fn muc_domain(&self) -> String {
        format!("conference.{}", self.domain)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// PEM of the CA that signed the server certificate.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A directory for a test's own files, removed with the server.
    pub fn scratch_dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// How long starting took (users, certificates, launch).
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// `user@domain`.
    pub fn jid(&self, user: &str) -> String {
        format!("{user}@{}", self.domain)
    }

    /// `user@host`, for any served host.
    pub fn jid_on(&self, host: &str, user: &str) -> String {
        format!("{user}@{host}")
    }

    /// A popivr account for `user` on this server: TLS with the test CA,
    /// connecting to 127.0.0.1.
    pub fn account(&self, user: &str, password: &str) -> Account {
        self.account_for(self.jid(user), user, password)
    }

    /// [`account`](Self::account) for `user@host`.
    pub fn account_on(&self, host: &str, user: &str, password: &str) -> Account {
        self.account_for(self.jid_on(host, user), user, password)
    }

    fn account_for(&self, jid: String, name: &str, password: &str) -> Account {
        Account {
            name: name.to_owned(),
            username: jid,
            secret: password.to_owned(),
            serverhost: Some("127.0.0.1".to_owned()),
            port: self.port,
            usetls: true,
            usesasl: true,
            allow_plaintext: false,
            ca_file: Some(self.ca_pem()),
            statusmessage: Some("popivr".to_owned()),
            timeout: Duration::from_secs(5),
            origin: "test".to_owned(),
        }
    }
}

/// What tests need of a throw-away XMPP server, whichever it is, so one
/// test can run against [`Prosody`] and [`Ejabberd`] alike.
pub trait Server: Send + Sync {
    /// `"prosody"` or `"ejabberd"`, for test output.
    fn name(&self) -> &'static str;
    fn base(&self) -> &ServerBase;
    fn base_mut(&mut self) -> &mut ServerBase;
    /// Start again after a stop or kill: same port, users and data.
    fn restart(&mut self);
    /// Register `user@domain` (also while running); panics on failure.
    fn add_user(&self, user: &str, password: &str);
    /// The server's log so far.
    fn log(&self) -> String;

    fn domain(&self) -> &str {
        self.base().domain()
    }
    fn muc_domain(&self) -> String {
        self.base().muc_domain()
    }
    fn port(&self) -> u16 {
        self.base().port()
    }
    fn addr(&self) -> std::net::SocketAddr {
        self.base().addr()
    }
    fn ca_pem(&self) -> PathBuf {
        self.base().ca_pem()
    }
    fn jid(&self, user: &str) -> String {
        self.base().jid(user)
    }
    fn account(&self, user: &str, password: &str) -> Account {
        self.base().account(user, password)
    }
    fn scratch_dir(&self) -> &std::path::Path {
        self.base().scratch_dir()
    }
    fn stop(&mut self) {
        self.base_mut().stop()
    }
    fn kill(&mut self) {
        self.base_mut().kill()
    }
    fn freeze(&self) {
        self.base().freeze()
    }
    fn thaw(&self) {
        self.base().thaw()
    }
}

impl Server for Prosody {
    fn name(&self) -> &'static str {
        "prosody"
    }
    fn base(&self) -> &ServerBase {
        self
    }
    fn base_mut(&mut self) -> &mut ServerBase {
        self
    }
    fn restart(&mut self) {
        Prosody::restart(self)
    }
    fn add_user(&self, user: &str, password: &str) {
        Prosody::add_user(self, user, password)
    }
    fn log(&self) -> String {
        Prosody::log(self)
    }
}

impl Server for Ejabberd {
    fn name(&self) -> &'static str {
        "ejabberd"
    }
    fn base(&self) -> &ServerBase {
        self
    }
    fn base_mut(&mut self) -> &mut ServerBase {
        self
    }
    fn restart(&mut self) {
        Ejabberd::restart(self)
    }
    fn add_user(&self, user: &str, password: &str) {
        Ejabberd::add_user(self, user, password)
    }
    fn log(&self) -> String {
        Ejabberd::log(self)
    }
}

/// A shared server (tests hand one to several tasks).
impl<T: Server + ?Sized> Server for std::sync::Arc<T> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn base(&self) -> &ServerBase {
        (**self).base()
    }
    fn base_mut(&mut self) -> &mut ServerBase {
        std::sync::Arc::get_mut(self)
            .expect("a shared server is stopped only by its last holder")
            .base_mut()
    }
    fn restart(&mut self) {
        std::sync::Arc::get_mut(self)
            .expect("a shared server is restarted only by its last holder")
            .restart()
    }
    fn add_user(&self, user: &str, password: &str) {
        (**self).add_user(user, password)
    }
    fn log(&self) -> String {
        (**self).log()
    }
}

impl Drop for ServerBase {
    fn drop(&mut self) {
        self.reap(libc::SIGKILL);
    }
}

/// Spawn a server in its own process group (so dropping it kills whatever
/// it started) that dies with the spawning thread if the test process
/// dies without running Drop: PDEATHSIG fires when the spawning *thread*
/// exits, which is why servers must be started on a thread that lives as
/// long as they do. The flag survives exec (erl execs beam.smp).
pub(crate) fn spawn_tied(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Why a test server could not be set up.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Error(String);

impl Error {
    pub(crate) fn new(why: impl Into<String>) -> Error {
        Error(why.into())
    }
}

/// A port nobody listens on right now (racy by nature: take it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Run `launch` on a fresh free port, again on another one if a process
/// took the port in between (free-port probing is racy by nature).
pub(crate) fn on_free_port(
    what: &str,
    mut launch: impl FnMut(u16) -> Result<(), String>,
) -> Result<(), Error> {
    let mut last = String::new();
    for _ in 0..5 {
        match launch(free_port()) {
            Ok(()) => return Ok(()),
            Err(why) => last = why,
        }
    }
    Err(Error::new(format!("{what} did not start: {last}")))
}

/// How to get prosody onto the machine when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Never install; report what to run.
    Never,
    /// `apt-get install prosody` as root; `sudo -n` (no password prompt)
    /// otherwise. For tests and CI.
    Quiet,
    /// As [`Install::Quiet`], but `sudo` may ask for a password on the
    /// terminal. For `popivr demo`.
    Interactive,
}

/// Make sure `prosody` and `prosodyctl` are on the PATH, installing the
/// Debian package when missing (once per process). Fresh CI machines and
/// new users' machines start without it.
pub fn ensure_installed(how: Install) -> Result<(), Error> {
    static INSTALLED: OnceLock<Result<(), Error>> = OnceLock::new();
    if let Some(done) = INSTALLED.get() {
        return done.clone();
    }
    let result = install(how);
    if result.is_ok() || how != Install::Never {
        let _ = INSTALLED.set(result.clone());
    }
    result
}

fn install(how: Install) -> Result<(), Error> {
    if have("prosody") && have("prosodyctl") {
        return Ok(());
    }
    let root = unsafe { libc::geteuid() } == 0;
    let hint = "prosody is not installed: run `sudo apt-get install -y prosody`";
    if how == Install::Never || (!root && !have("sudo")) || !have("apt-get") {
        return Err(Error::new(hint));
    }
    let apt = |args: &[&str]| {
        let mut cmd = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            if how == Install::Quiet {
                sudo.arg("-n");
            }
            sudo.arg("env")
                .arg("DEBIAN_FRONTEND=noninteractive")
                .arg("apt-get");
            sudo
        };
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let ok = apt(&["install", "-y", "-q", "prosody"])
        || (apt(&["update", "-q"]) && apt(&["install", "-y", "-q", "prosody"]));
    if ok && have("prosody") && have("prosodyctl") {
        Ok(())
    } else {
        Err(Error::new(format!(
            "`apt-get install -y prosody` failed; {hint}"
        )))
    }
}

/// Write a file only its owner can read (keys, configs with secrets).
pub fn write_private(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: narrow it before writing.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)
}

/// Whether `program` is an executable file on the PATH.
pub(crate) fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}
