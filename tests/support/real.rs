//! Pieces for running popivr against a real Asterisk (the testbed's):
//! the shipped dialplan snippets and a `popivr serve` daemon.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;

/// The popivr binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_popivr");

/// A path in the repository.
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A shipped dialplan snippet (dialplan/NAME), as an admin copies it.
pub fn shipped(name: &str) -> String {
    std::fs::read_to_string(repo("dialplan").join(name)).expect("shipped snippet")
}

/// `popivr serve` on 127.0.0.1:`port`, killed on drop. Its stderr goes to
/// `log` when given (at `-v`: pops, replies and actions too), else nowhere.
pub struct Daemon {
    child: Child,
    pub port: u16,
}

impl Daemon {
    pub fn start(conf: &Path, port: u16, log: Option<&Path>) -> Daemon {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).expect("daemon log")),
            None => Stdio::null(),
        };
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ];
        if log.is_some() {
            args.push("-v".into());
        }
        let child = Command::new(BIN)
            .args(&args)
            .env("POPIVR_CONFIG", conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("popivr serve starts");
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "popivr serve does not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        Daemon { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Children of `parent` running [`BIN`] (the per-call popivr processes an
/// Asterisk started and that are still alive).
pub fn popivr_children(parent: u32) -> Vec<u32> {
    let Ok(bin) = std::fs::canonicalize(BIN) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: the comm may hold blanks and parens.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent)
            && std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe == bin)
        {
            found.push(pid);
        }
    }
    found
}
