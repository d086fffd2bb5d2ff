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
//! use popivr::testbed::Prosody;
//! let server = Prosody::builder().user("pbx", "pw1").user("alice", "pw2").start();
//! let account = server.account("pbx", "pw1"); // TLS with the test CA
//! assert_eq!(server.jid("alice"), "alice@popivr.test");
//! # drop(account);
//! ```

mod ami;
pub mod asterisk;
mod ca;
mod prosody;

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub use ami::{Ami, Event, Message, event_time};
pub use asterisk::Asterisk;
pub use ca::TestCa;
pub use prosody::{Builder, DOMAIN, Prosody};

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
