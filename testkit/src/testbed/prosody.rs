//! Starting, controlling and stopping one throw-away prosody.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{DOMAIN, Error, Install, ServerBase, TestCa, ensure_installed};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The modules a test prosody loads: those of Debian's stock
/// `prosody.cfg.lua` that popivr meets (roster, login, TLS, disco, ping,
/// carbons, private storage, time, software version).
const MODULES: &[&str] = &[
    "roster", "saslauth", "tls", "disco", "ping", "carbons", "private", "time", "version",
];

/// How a test server is set up.
#[derive(Clone)]
pub struct Builder {
    domain: String,
    hosts: Vec<String>,
    plaintext: bool,
    /// Modules of [`MODULES`] left out.
    left_out: Vec<&'static str>,
    /// Modules of the test's own: (name, Lua source).
    extra: Vec<(String, String)>,
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
            .field("left_out", &self.left_out)
            .field(
                "extra",
                &self.extra.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
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
            left_out: Vec::new(),
            extra: Vec::new(),
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

    /// Leave mod_version out (prosody's stock config loads it): the server
    /// refuses to name its software (XEP-0092).
    pub fn without_version(mut self) -> Self {
        self.left_out.push("version");
        self
    }

    /// Leave mod_private out (prosody's stock config loads it): the server
    /// keeps no private XML storage (XEP-0049).
    pub fn without_private(mut self) -> Self {
        self.left_out.push("private");
        self
    }

    /// Load a module of the test's own (`mod_NAME.lua` with this Lua
    /// source) after the stock ones: a server that misbehaves in one
    /// precise way a stock one never stages on demand.
    pub fn extra_module(mut self, name: &str, source: &str) -> Self {
        self.extra.push((name.to_owned(), source.to_owned()));
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
        fs::create_dir_all(dir.path().join("plugins")).map_err(io("plugins dir"))?;
        for (name, source) in &self.extra {
            fs::write(dir.path().join(format!("plugins/mod_{name}.lua")), source)
                .map_err(io("write a module"))?;
        }

        let mut server = Prosody {
            base: ServerBase {
                dir,
                domain: self.domain.clone(),
                hosts: self.hosts.clone(),
                port: 0,
                startup: Duration::ZERO,
                child: None,
            },
            plaintext: self.plaintext,
            left_out: self.left_out.clone(),
            extra: self.extra.iter().map(|(n, _)| n.clone()).collect(),
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

/// A running test prosody. Its address, domain, accounts and directory
/// are [`ServerBase`]'s.
#[derive(Debug)]
pub struct Prosody {
    base: ServerBase,
    plaintext: bool,
    left_out: Vec<&'static str>,
    /// Names of the test's own modules, in `plugins/`.
    extra: Vec<String>,
}

impl std::ops::Deref for Prosody {
    type Target = ServerBase;
    fn deref(&self) -> &ServerBase {
        &self.base
    }
}

impl std::ops::DerefMut for Prosody {
    fn deref_mut(&mut self) -> &mut ServerBase {
        &mut self.base
    }
}

impl Prosody {
    /// A TLS-required server with no users yet.
    pub fn start() -> Prosody {
        Builder::default().start()
    }

    pub fn builder() -> Builder {
        Builder::default()
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

    /// Start again after [`stop`](Self::stop)/[`kill`](Self::kill), same
    /// port, users and stored data (offline messages survive).
    pub fn restart(&mut self) {
        self.reap(libc::SIGTERM);
        let port = self.port;
        if let Err(why) = self.try_launch_on(port) {
            panic!("prosody did not restart on port {port}: {why}");
        }
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
        let modules: Vec<String> = MODULES
            .iter()
            .filter(|m| !self.left_out.contains(m))
            .copied()
            .chain(self.extra.iter().map(String::as_str))
            .map(|m| format!("\"{m}\""))
            .collect();
        let modules = modules.join("; ");
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
plugin_paths = {{ "{d}/plugins" }}
certificates = "{d}/certs"
log = {{ info = "{d}/prosody.log" }}
interfaces = {{ "127.0.0.1" }}
c2s_interfaces = {{ "127.0.0.1" }}
c2s_ports = {{ {port} }}
c2s_direct_tls_ports = {{}}
legacy_ssl_ports = {{}}
s2s_ports = {{}}
component_ports = {{}}
modules_enabled = {{ {modules} }}
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
        super::on_free_port("prosody", |port| self.try_launch_on(port))
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
            .stderr(out);
        let child = super::spawn_tied(&mut cmd).map_err(|e| format!("spawn prosody: {e}"))?;
        self.child = Some(child);

        let ready = format!("Activated service 'c2s' on [127.0.0.1]:{port}");
        self.base.wait_ready(
            &log_path,
            log_len,
            &ready,
            "Failed to open server port",
            START_TIMEOUT,
        )
    }
}
