//! A throw-away prosody for tests: its own temp dir, config, data, test CA
//! and free port on 127.0.0.1. Each test starts its own (about a quarter
//! of a second), so tests run in parallel and may stop, freeze or restart
//! their server without disturbing others. Dropping it kills the process
//! group and removes the directory.
//!
//! Passwords go to `prosodyctl adduser` on stdin, never in argv, and are
//! never printed.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use popivr::config::Account;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tempfile::TempDir;

/// Default XMPP domain of a test server. Connections go to 127.0.0.1 with
/// `serverhost`, and the certificate is checked against this name.
pub const DOMAIN: &str = "popivr.test";

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How a test server is set up.
#[derive(Debug, Clone)]
pub struct Builder {
    domain: String,
    plaintext: bool,
    users: Vec<(String, String)>,
    cert_names: Option<Vec<String>>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            domain: DOMAIN.to_owned(),
            plaintext: false,
            users: Vec::new(),
            cert_names: None,
        }
    }
}

impl Builder {
    /// Allow clients to log in without TLS (STARTTLS is still offered).
    pub fn plaintext_allowed(mut self) -> Self {
        self.plaintext = true;
        self
    }

    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = domain.to_owned();
        self
    }

    /// Serve a certificate for these names instead of the domain (and
    /// `localhost`), to test name checks.
    pub fn certificate_for(mut self, names: &[&str]) -> Self {
        self.cert_names = Some(names.iter().map(|n| n.to_string()).collect());
        self
    }

    /// Register `user@domain` before the server starts.
    pub fn user(mut self, user: &str, password: &str) -> Self {
        self.users.push((user.to_owned(), password.to_owned()));
        self
    }

    /// Start the server and wait until it listens.
    ///
    /// Call it from the test's own thread (not `spawn_blocking`): prosody
    /// is tied to the spawning thread's life so that a killed test process
    /// cannot leave it running.
    pub fn start(self) -> Prosody {
        ensure_installed();
        let dir = tempfile::Builder::new()
            .prefix("popivr-prosody-")
            .tempdir()
            .expect("temp dir");
        let ca = TestCa::new("popivr test CA");
        let names = self
            .cert_names
            .clone()
            .unwrap_or_else(|| vec![self.domain.clone(), "localhost".to_owned()]);
        ca.write_server_cert(&names, dir.path());
        fs::write(dir.path().join("ca.pem"), ca.pem()).expect("write ca.pem");
        fs::create_dir_all(dir.path().join("data")).expect("data dir");
        fs::create_dir_all(dir.path().join("certs")).expect("certs dir");

        let mut server = Prosody {
            dir,
            domain: self.domain.clone(),
            port: 0,
            plaintext: self.plaintext,
            child: None,
            startup: Duration::ZERO,
        };
        // Registration and start-up are separate processes: overlap them.
        let t0 = Instant::now();
        // prosodyctl gets a config file of its own: prosody's is rewritten
        // with the port while the registrations may still be reading.
        server.write_config(&server.ctl_config_path());
        let adders: Vec<Child> = self
            .users
            .iter()
            .map(|(user, password)| server.spawn_adduser(user, password))
            .collect();
        server.launch();
        for mut child in adders {
            let status = child.wait().expect("prosodyctl adduser");
            assert!(status.success(), "prosodyctl adduser failed: {status}");
        }
        server.startup = t0.elapsed();
        server
    }
}

/// A running test prosody.
#[derive(Debug)]
pub struct Prosody {
    dir: TempDir,
    domain: String,
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

    pub fn domain(&self) -> &str {
        &self.domain
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

    /// A popivr account for `user` on this server: TLS with the test CA,
    /// connecting to 127.0.0.1.
    pub fn account(&self, user: &str, password: &str) -> Account {
        Account {
            name: user.to_owned(),
            username: self.jid(user),
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

    /// Register a user (also while running).
    pub fn add_user(&self, user: &str, password: &str) {
        let status = self
            .spawn_adduser(user, password)
            .wait()
            .expect("prosodyctl adduser");
        assert!(
            status.success(),
            "prosodyctl adduser {user} failed: {status}"
        );
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
        self.launch_on(self.port);
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
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

    fn write_config(&self, path: &Path) {
        let d = self.dir.path().display();
        let encryption = if self.plaintext { "false" } else { "true" };
        // Modules: what a small production server has, minus everything
        // that opens ports or needs the network (s2s, http).
        let config = format!(
            r#"-- generated by popivr's test harness
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
modules_enabled = {{ "roster"; "saslauth"; "tls"; "disco"; "ping"; "carbons"; "time"; "version" }}
modules_disabled = {{ "s2s"; "s2s_auth_certs" }}
authentication = "internal_hashed"
storage = "internal"
c2s_require_encryption = {encryption}
ssl = {{ certificate = "{d}/server.pem"; key = "{d}/server.key"; }}
VirtualHost "{domain}"
"#,
            port = self.port,
            domain = self.domain,
        );
        fs::write(path, config).expect("write prosody config");
    }

    fn spawn_adduser(&self, user: &str, password: &str) -> Child {
        let mut child = Command::new("prosodyctl")
            .arg("--config")
            .arg(self.ctl_config_path())
            .arg("adduser")
            .arg(self.jid(user))
            .stdin(Stdio::piped())
            // Its prompts and messages are noise; the exit status tells.
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prosodyctl");
        let mut stdin = child.stdin.take().expect("stdin");
        // prosodyctl asks twice (new password, retype).
        writeln!(stdin, "{password}\n{password}").expect("write password");
        drop(stdin);
        child
    }

    /// Start on a fresh free port; retry if another process took it in
    /// between (free-port probing is inherently racy).
    fn launch(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            match self.try_launch_on(free_port()) {
                Ok(()) => return,
                Err(why) => last = why,
            }
        }
        panic!("prosody did not start: {last}");
    }

    fn launch_on(&mut self, port: u16) {
        if let Err(why) = self.try_launch_on(port) {
            panic!("prosody did not restart on port {port}: {why}");
        }
    }

    fn try_launch_on(&mut self, port: u16) -> Result<(), String> {
        self.port = port;
        self.write_config(&self.config_path());
        let log_path = self.dir.path().join("prosody.log");
        let log_len = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let out = fs::File::create(self.dir.path().join("console.log")).expect("console log");
        let mut cmd = Command::new("prosody");
        cmd.arg("--config")
            .arg(self.config_path())
            .arg("-F")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            // Own process group, so Drop can kill whatever it spawns.
            .process_group(0);
        // If the test process dies without running Drop, take prosody
        // along. PDEATHSIG fires when the spawning *thread* exits, which
        // is why servers must be started on the test's own thread.
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

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A certificate authority made at test time.
pub struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA cert");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Write the CA certificate to `path`.
    pub fn write_pem(&self, path: &Path) {
        fs::write(path, &self.pem).expect("write CA PEM");
    }

    /// Write `server.pem` and `server.key` for `names` into `dir`.
    pub fn write_server_cert(&self, names: &[String], dir: &Path) {
        let mut params = CertificateParams::new(names.to_vec()).expect("server params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("x"),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("server cert");
        fs::write(dir.join("server.pem"), cert.pem()).expect("write server.pem");
        fs::write(dir.join("server.key"), key.serialize_pem()).expect("write server.key");
    }
}

/// Install prosody when missing (CI machines start fresh). Needs root;
/// otherwise the failure says what to run.
fn ensure_installed() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        if have("prosody") && have("prosodyctl") {
            return Ok(());
        }
        if unsafe { libc::geteuid() } != 0 {
            return Err("prosody is not installed and we are not root: \
                        run `sudo apt-get install -y prosody`"
                .into());
        }
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        let ok = apt(&["install", "-y", "-q", "prosody"])
            || (apt(&["update", "-q"]) && apt(&["install", "-y", "-q", "prosody"]));
        if ok && have("prosody") {
            Ok(())
        } else {
            Err("`apt-get install -y prosody` failed".into())
        }
    });
    if let Err(why) = result {
        panic!("{why}");
    }
}

fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}
