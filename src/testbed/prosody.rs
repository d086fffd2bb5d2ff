//! Starting, controlling and stopping one throw-away prosody.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::{Error, Install, TestCa, ensure_installed, free_port};
use crate::config::Account;

/// Default XMPP domain of a test server. Connections go to 127.0.0.1 with
/// `serverhost`, and the certificate is checked against this name.
pub const DOMAIN: &str = "popivr.test";

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How a test server is set up.
#[derive(Clone)]
pub struct Builder {
    domain: String,
    hosts: Vec<String>,
    plaintext: bool,
    /// (user, host, password); host `None` is the main domain.
    users: Vec<(String, Option<String>, String)>,
    cert_names: Option<Vec<String>>,
    install: Install,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Passwords stay out of Debug output.
        let users: Vec<String> = self
            .users
            .iter()
            .map(|(u, h, _)| format!("{u}@{}", h.as_deref().unwrap_or(&self.domain)))
            .collect();
        f.debug_struct("Builder")
            .field("domain", &self.domain)
            .field("hosts", &self.hosts)
            .field("plaintext", &self.plaintext)
            .field("users", &users)
            .field("cert_names", &self.cert_names)
            .field("install", &self.install)
            .finish()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            domain: DOMAIN.to_owned(),
            hosts: Vec::new(),
            plaintext: false,
            users: Vec::new(),
            cert_names: None,
            install: Install::Quiet,
        }
    }
}

impl Builder {
    /// Allow clients to log in without TLS (STARTTLS is still offered).
    pub fn plaintext_allowed(mut self) -> Self {
        self.plaintext = true;
        self
    }

    /// The main domain (default [`DOMAIN`]).
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = domain.to_owned();
        self
    }

    /// Serve one more VirtualHost, e.g. a look-alike of the main domain.
    /// Its name goes into the default certificate; add users to it with
    /// [`user_on`](Self::user_on).
    pub fn host(mut self, domain: &str) -> Self {
        self.hosts.push(domain.to_owned());
        self
    }

    /// Serve a certificate for these names instead of the hosts (and
    /// `localhost`), to test name checks.
    pub fn certificate_for(mut self, names: &[&str]) -> Self {
        self.cert_names = Some(names.iter().map(|n| n.to_string()).collect());
        self
    }

    /// Register `user@domain` before the server starts.
    pub fn user(mut self, user: &str, password: &str) -> Self {
        self.users
            .push((user.to_owned(), None, password.to_owned()));
        self
    }

    /// Register `user@host` before the server starts; `host` is the main
    /// domain or one added with [`host`](Self::host).
    pub fn user_on(mut self, host: &str, user: &str, password: &str) -> Self {
        self.users
            .push((user.to_owned(), Some(host.to_owned()), password.to_owned()));
        self
    }

    /// How to install prosody when it is missing (default
    /// [`Install::Quiet`]).
    pub fn install(mut self, how: Install) -> Self {
        self.install = how;
        self
    }

    /// Start the server and wait until it listens; panics on failure.
    ///
    /// Call it from the test's own thread (not `spawn_blocking`): prosody
    /// is tied to the spawning thread's life so that a killed test process
    /// cannot leave it running.
    pub fn start(self) -> Prosody {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start`](Self::start) that reports failures instead of panicking.
    pub fn try_start(self) -> Result<Prosody, Error> {
        ensure_installed(self.install)?;
        fn io(what: &'static str) -> impl Fn(std::io::Error) -> Error {
            move |e| Error::new(format!("{what}: {e}"))
        }
        let dir = tempfile::Builder::new()
            .prefix("popivr-prosody-")
            .tempdir()
            .map_err(io("temp dir"))?;
        let ca = TestCa::new("popivr test CA");
        let names = self.cert_names.clone().unwrap_or_else(|| {
            let mut names = vec![self.domain.clone()];
            names.extend(self.hosts.iter().cloned());
            names.push("localhost".to_owned());
            names
        });
        ca.try_write_server_cert(&names, dir.path())?;
        fs::write(dir.path().join("ca.pem"), ca.pem()).map_err(io("write ca.pem"))?;
        fs::create_dir_all(dir.path().join("data")).map_err(io("data dir"))?;
        fs::create_dir_all(dir.path().join("certs")).map_err(io("certs dir"))?;

        let mut server = Prosody {
            dir,
            domain: self.domain.clone(),
            hosts: self.hosts.clone(),
            port: 0,
            plaintext: self.plaintext,
            child: None,
            startup: Duration::ZERO,
        };
        // Registration and start-up are separate processes: overlap them.
        let t0 = Instant::now();
        // prosodyctl gets a config file of its own: prosody's is rewritten
        // with the port while the registrations may still be reading.
        server.write_config(&server.ctl_config_path())?;
        let mut adders = Vec::new();
        for (user, host, password) in &self.users {
            let jid = format!("{user}@{}", host.as_deref().unwrap_or(&self.domain));
            adders.push((jid.clone(), server.spawn_adduser(&jid, password)?));
        }
        server.launch()?;
        for (jid, mut child) in adders {
            let status = child.wait().map_err(io("prosodyctl adduser"))?;
            if !status.success() {
                return Err(Error::new(format!(
                    "prosodyctl adduser {jid} failed: {status}"
                )));
            }
        }
        server.startup = t0.elapsed();
        Ok(server)
    }
}

/// A running test prosody.
#[derive(Debug)]
pub struct Prosody {
    dir: TempDir,
    domain: String,
    hosts: Vec<String>,
    port: u16,
    plaintext: bool,
    child: Option<Child>,
    startup: Duration,
}

impl Prosody {
    /// A TLS-required server with no users yet.
    pub fn start() -> Prosody {
        Builder::default().start()
    }

    pub fn builder() -> Builder {
        Builder::default()
    }

    /// The main domain.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The extra virtual hosts ([`Builder::host`]).
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// The multi-user chat service, `conference.<domain>`. Any local user
    /// may create rooms there; room options (such as exposing real JIDs)
    /// are set by the room's owner.
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
    pub fn scratch_dir(&self) -> &Path {
        self.dir.path()
    }

    /// How long [`Builder::start`] took (users, certificates, launch).
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

    /// Register a user (also while running); panics on failure.
    pub fn add_user(&self, user: &str, password: &str) {
        self.try_add_user(&self.jid(user), password)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Register `user@host` (also while running); panics on failure.
    pub fn add_user_on(&self, host: &str, user: &str, password: &str) {
        self.try_add_user(&self.jid_on(host, user), password)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Register a full bare JID on a served host.
    pub fn try_add_user(&self, jid: &str, password: &str) -> Result<(), Error> {
        let status = self
            .spawn_adduser(jid, password)?
            .wait()
            .map_err(|e| Error::new(format!("prosodyctl adduser: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::new(format!(
                "prosodyctl adduser {jid} failed: {status}"
            )))
        }
    }

    /// Stop the server politely (SIGTERM: clients get a stream end).
    pub fn stop(&mut self) {
        self.signal_and_reap(libc::SIGTERM);
    }

    /// Kill the server (SIGKILL: connections drop without a stream end).
    pub fn kill(&mut self) {
        self.signal_and_reap(libc::SIGKILL);
    }

    /// Freeze the server (SIGSTOP): TCP still connects, nothing answers.
    pub fn freeze(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Undo [`Prosody::freeze`].
    pub fn thaw(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Start again after [`stop`](Self::stop)/[`kill`](Self::kill), same
    /// port, users and stored data (offline messages survive).
    pub fn restart(&mut self) {
        self.signal_and_reap(libc::SIGTERM);
        let port = self.port;
        if let Err(why) = self.try_launch_on(port) {
            panic!("prosody did not restart on port {port}: {why}");
        }
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The server's process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server's log so far (info level: no stanzas, no passwords).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("prosody.log")).unwrap_or_default()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("prosody.cfg.lua")
    }

    fn ctl_config_path(&self) -> PathBuf {
        self.dir.path().join("prosodyctl.cfg.lua")
    }

    fn write_config(&self, path: &Path) -> Result<(), Error> {
        let d = self.dir.path().display();
        let encryption = if self.plaintext { "false" } else { "true" };
        let extra_hosts: String = self
            .hosts
            .iter()
            .map(|h| format!("VirtualHost \"{h}\"\n"))
            .collect();
        // Modules: what a small production server has, minus everything
        // that opens ports or needs the network (s2s, http). Global
        // settings come first: in prosody's config everything after a
        // VirtualHost or Component line belongs to it.
        let config = format!(
            r#"-- generated by popivr's testbed
run_as_root = true
pidfile = "{d}/prosody.pid"
data_path = "{d}/data"
certificates = "{d}/certs"
log = {{ info = "{d}/prosody.log" }}
interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{}}
legacy_ssl_ports = {{}}
s2s_ports = {{}}
component_ports = {{}}
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "ping"; "carbons"; "time"; "version" }}
modules_disabled = {{ "s2s"; "s2s_auth_certs" }}
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = {encryption}
ssl = {{ certificate = "{d}/server.pem"; key = "{d}/server.key"; }}
VirtualHost "{domain}"
{extra_hosts}Component "conference.{domain}" "muc"
    restrict_room_creation = false
    -- New rooms open at once and show occupants' real JIDs, so a test
    -- does not depend on who happened to create the room.
    muc_room_locking = false
    muc_room_default_public_jids = true
"#,
            port = self.port,
            domain = self.domain,
        );
        fs::write(path, config).map_err(|e| Error::new(format!("write prosody config: {e}")))
    }

    fn spawn_adduser(&self, jid: &str, password: &str) -> Result<Child, Error> {
        let mut child = Command::new("prosodyctl")
            .arg("--config")
            .arg(self.ctl_config_path())
            .arg("adduser")
            .arg(jid)
            .stdin(Stdio::piped())
            // Its prompts and messages are noise; the exit status tells.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error::new(format!("run prosodyctl: {e}")))?;
        let mut stdin = child.stdin.take().expect("stdin");
        // prosodyctl asks twice (new password, retype).
        writeln!(stdin, "{password}\n{password}")
            .map_err(|e| Error::new(format!("prosodyctl adduser {jid}: {e}")))?;
        drop(stdin);
        Ok(child)
    }

    /// Start on a fresh free port; retry if another process took it in
    /// between (free-port probing is inherently racy).
    fn launch(&mut self) -> Result<(), Error> {
        let mut last = String::new();
        for _ in 0..5 {
            match self.try_launch_on(free_port()) {
                Ok(()) => return Ok(()),
                Err(why) => last = why,
            }
        }
        Err(Error::new(format!("prosody did not start: {last}")))
    }

    fn try_launch_on(&mut self, port: u16) -> Result<(), String> {
        self.port = port;
        self.write_config(&self.config_path())
            .map_err(|e| e.to_string())?;
        let log_path = self.dir.path().join("prosody.log");
        let log_len = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let out = fs::File::create(self.dir.path().join("console.log"))
            .map_err(|e| format!("console log: {e}"))?;
        let mut cmd = Command::new("prosody");
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| format!("dup: {e}"))?)
            .stderr(out)
            // Own process group, so Drop can kill whatever it spawns.
            .process_group(0);
        // If our process dies without running Drop, take prosody along.
        // PDEATHSIG fires when the spawning *thread* exits, which is why
        // servers must be started on a thread that lives as long as they do.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("spawn prosody: {e}"))?;
        self.child = Some(child);

        let ready = format!("Activated service 'c2s' on [127.0.0.1]:{port}");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = fs::read(&log_path).unwrap_or_default();
            let new = String::from_utf8_lossy(log.get(log_len as usize..).unwrap_or_default());
            if new.contains("Failed to open server port") {
                self.signal_and_reap(libc::SIGKILL);
                return Err(format!("port {port} in use"));
            }
            if new.contains(&ready) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                let console =
                    fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default();
                return Err(format!("prosody exited ({status}): {console}{new}"));
            }
            if Instant::now() > deadline {
                self.signal_and_reap(libc::SIGKILL);
                return Err(format!("not ready after {START_TIMEOUT:?}: {new}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(child) = &self.child {
            // The group id is the child's pid (process_group(0)).
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), sig);
            }
        }
    }

    fn signal_and_reap(&mut self, sig: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = -(child.id() as libc::pid_t);
        unsafe {
            // A frozen server cannot act on SIGTERM.
            libc::kill(pgid, libc::SIGCONT);
            libc::kill(pgid, sig);
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
        // Anything else left in the group (prosody starts no helpers
        // today, but the group is what we own).
        unsafe {
            libc::kill(pgid, libc::SIGKILL);
        }
    }
}

impl Drop for Prosody {
    fn drop(&mut self) {
        self.signal_and_reap(libc::SIGKILL);
    }
}
