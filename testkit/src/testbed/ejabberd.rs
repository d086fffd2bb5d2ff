//! Starting, controlling and stopping one throw-away ejabberd.
//!
//! The config is Debian 12's shipped `/etc/ejabberd/ejabberd.yml` (ejabberd
//! 23.01) with only what a test server must change: its own host, the test
//! CA's certificate, one client port on 127.0.0.1, and no other listeners
//! (direct TLS, s2s, HTTP, STUN, MQTT open ports and are not what popivr
//! talks to). Everything an admin gets by default stays: `mod_fail2ban`,
//! `max_user_sessions: 10`, `c2s_shaper: normal` (3,000 B/s), rooms that
//! hide real JIDs, stream management, `disable_sasl_mechanisms`.
//! [`Builder::config_line`] changes one default for a test that is about it.
//!
//! The Erlang VM runs as a child of the test, started directly (not via
//! `ejabberdctl`, which would switch to the `ejabberd` user and use the
//! system-wide node `ejabberd@localhost`). It runs **without Erlang
//! distribution**: no node name, so no `epmd` is started, nothing listens
//! besides the client port, and parallel servers cannot collide on a node
//! name. Administration (registering users, creating rooms) goes through the
//! VM's stdin instead of `ejabberdctl`: a small loop started with `-eval`
//! reads one Erlang expression per line and prints its result to the console
//! log. Passwords travel that way too, never in argv, and are not printed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{DOMAIN, Error, ServerBase, TestCa, have};

const START_TIMEOUT: Duration = Duration::from_secs(30);
const CTL_TIMEOUT: Duration = Duration::from_secs(20);

/// How a test ejabberd is set up.
#[derive(Clone)]
pub struct Builder {
    domain: String,
    hosts: Vec<String>,
    /// (user, host, password); host `None` is the main domain.
    users: Vec<(String, Option<String>, String)>,
    extra_config: Vec<String>,
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
            .field("users", &users)
            .field("extra_config", &self.extra_config)
            .finish()
    }
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            domain: DOMAIN.to_owned(),
            hosts: Vec::new(),
            users: Vec::new(),
            extra_config: Vec::new(),
        }
    }
}

impl Builder {
    /// The main domain (default [`DOMAIN`]).
    pub fn domain(mut self, domain: &str) -> Self {
        self.domain = domain.to_owned();
        self
    }

    /// Serve one more host; its name goes into the certificate.
    pub fn host(mut self, domain: &str) -> Self {
        self.hosts.push(domain.to_owned());
        self
    }

    /// Register `user@domain` once the server runs.
    pub fn user(mut self, user: &str, password: &str) -> Self {
        self.users
            .push((user.to_owned(), None, password.to_owned()));
        self
    }

    /// Register `user@host` once the server runs.
    pub fn user_on(mut self, host: &str, user: &str, password: &str) -> Self {
        self.users
            .push((user.to_owned(), Some(host.to_owned()), password.to_owned()));
        self
    }

    /// Top-level YAML for the config: it replaces the stock block of the
    /// same key (e.g. all of `shaper_rules`) or adds one. For tests about
    /// changing a default.
    pub fn config_line(mut self, yaml: &str) -> Self {
        self.extra_config.push(yaml.to_owned());
        self
    }

    /// Start the server and wait until it listens; panics on failure.
    /// Call it from the test's own thread (see [`super::Prosody`]).
    pub fn start(self) -> Ejabberd {
        self.try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start`](Self::start) that reports failures instead of panicking.
    pub fn try_start(self) -> Result<Ejabberd, Error> {
        let libs = erl_libs()?;
        let io = |what: &'static str| move |e: std::io::Error| Error::new(format!("{what}: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("popivr-ejabberd-")
            .tempdir()
            .map_err(io("temp dir"))?;
        let ca = TestCa::new("popivr test CA");
        let mut names = vec![self.domain.clone()];
        names.extend(self.hosts.iter().cloned());
        names.extend(
            std::iter::once(&self.domain)
                .chain(&self.hosts)
                .map(|h| format!("conference.{h}")),
        );
        names.push("localhost".to_owned());
        ca.try_write_server_cert(&names, dir.path())?;
        fs::write(dir.path().join("ca.pem"), ca.pem()).map_err(io("write ca.pem"))?;
        fs::create_dir_all(dir.path().join("spool")).map_err(io("spool dir"))?;

        let mut server = Ejabberd {
            base: ServerBase {
                dir,
                domain: self.domain.clone(),
                hosts: self.hosts.clone(),
                port: 0,
                startup: Duration::ZERO,
                child: None,
            },
            libs,
            extra_config: self.extra_config.clone(),
            ctl: Mutex::new(None),
        };
        let t0 = Instant::now();
        server.launch()?;
        for (user, host, password) in &self.users {
            let host = host.as_deref().unwrap_or(&self.domain);
            server.try_add_user_on(host, user, password)?;
        }
        server.startup = t0.elapsed();
        Ok(server)
    }
}

/// The control channel: the VM's stdin and a counter that tags answers.
struct Ctl {
    stdin: ChildStdin,
    next: u64,
}

/// A running test ejabberd. Its address, domain, accounts and directory
/// are [`ServerBase`]'s.
pub struct Ejabberd {
    base: ServerBase,
    libs: String,
    extra_config: Vec<String>,
    ctl: Mutex<Option<Ctl>>,
}

impl std::ops::Deref for Ejabberd {
    type Target = ServerBase;
    fn deref(&self) -> &ServerBase {
        &self.base
    }
}

impl std::ops::DerefMut for Ejabberd {
    fn deref_mut(&mut self) -> &mut ServerBase {
        &mut self.base
    }
}

impl std::fmt::Debug for Ejabberd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ejabberd")
            .field("dir", &self.dir.path())
            .field("domain", &self.domain)
            .field("port", &self.port)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl Ejabberd {
    /// A server with no users yet.
    pub fn start() -> Ejabberd {
        Builder::default().start()
    }

    pub fn builder() -> Builder {
        Builder::default()
    }

    /// Register a user (while running); panics on failure.
    pub fn add_user(&self, user: &str, password: &str) {
        let domain = self.domain.clone();
        self.try_add_user_on(&domain, user, password)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Register `user@host`; panics on failure.
    pub fn add_user_on(&self, host: &str, user: &str, password: &str) {
        self.try_add_user_on(host, user, password)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Register `user@host`, reporting failures.
    pub fn try_add_user_on(&self, host: &str, user: &str, password: &str) -> Result<(), Error> {
        let expr = format!(
            "ejabberd_auth:try_register({}, {}, {}).",
            erl_binary(user),
            erl_binary(host),
            erl_binary(password)
        );
        match self.eval(&expr)?.as_str() {
            "ok" => Ok(()),
            other => Err(Error::new(format!(
                "register {user}@{host} failed: {other}"
            ))),
        }
    }

    /// Create a persistent room on [`muc_domain`](Self::muc_domain) the
    /// way an admin does (`ejabberdctl create_room_with_opts`), with the
    /// stock default options plus `options` (e.g. `[("anonymous",
    /// "false")]`). Nobody is its owner or occupant, as with a room an admin
    /// made for a team.
    pub fn create_room(&self, name: &str, options: &[(&str, &str)]) -> Result<(), Error> {
        let opts: Vec<String> = std::iter::once(("persistent", "true"))
            .chain(options.iter().copied())
            .map(|(k, v)| format!("{{{}, {}}}", erl_binary(k), erl_binary(v)))
            .collect();
        let expr = format!(
            "mod_muc_admin:create_room_with_opts({}, {}, {}, [{}]).",
            erl_binary(name),
            erl_binary(&self.muc_domain()),
            erl_binary(&self.domain),
            opts.join(", ")
        );
        match self.eval(&expr)?.as_str() {
            "ok" => Ok(()),
            other => Err(Error::new(format!("create room {name} failed: {other}"))),
        }
    }

    /// How many sessions `user@domain` has right now.
    pub fn session_count(&self, user: &str) -> Result<usize, Error> {
        let expr = format!(
            "length(ejabberd_sm:get_user_resources({}, {})).",
            erl_binary(user),
            erl_binary(&self.domain)
        );
        let out = self.eval(&expr)?;
        out.parse()
            .map_err(|_| Error::new(format!("session count: {out}")))
    }

    /// Start again on the same port with the same spool (users survive).
    pub fn restart(&mut self) {
        self.reap(libc::SIGTERM);
        let port = self.port;
        if let Err(why) = self.try_launch_on(port) {
            panic!("ejabberd did not restart on port {port}: {why}");
        }
    }

    /// The server's log so far (info level: no stanzas, no passwords).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("ejabberd.log")).unwrap_or_default()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("ejabberd.yml")
    }

    fn console_path(&self) -> PathBuf {
        self.dir.path().join("console.log")
    }

    fn write_config(&self) -> Result<(), Error> {
        let d = self.dir.path().display();
        let hosts: String = std::iter::once(&self.domain)
            .chain(&self.hosts)
            .map(|h| format!("  - \"{h}\"\n"))
            .collect();
        let mut stock = STOCK.to_owned();
        for extra in &self.extra_config {
            stock = without_key(&stock, extra);
        }
        let config = stock
            .replace("@HOSTS@", &hosts)
            .replace("@CERT@", &format!("{d}/server.pem"))
            .replace("@KEY@", &format!("{d}/server.key"))
            .replace("@PORT@", &self.port.to_string());
        let mut config =
            format!("# generated by popivr's testbed from Debian 12's ejabberd.yml\n{config}");
        for extra in &self.extra_config {
            config.push_str(extra);
            config.push('\n');
        }
        super::write_private(&self.config_path(), config.as_bytes())
            .map_err(|e| Error::new(format!("write ejabberd config: {e}")))
    }

    /// Start on a fresh free port; retry if another process took it.
    fn launch(&mut self) -> Result<(), Error> {
        super::on_free_port("ejabberd", |port| self.try_launch_on(port))
    }

    fn try_launch_on(&mut self, port: u16) -> Result<(), String> {
        self.port = port;
        self.write_config().map_err(|e| e.to_string())?;
        let d = self.dir.path();
        let log_path = d.join("ejabberd.log");
        let log_len = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let out = fs::File::create(self.console_path()).map_err(|e| format!("console log: {e}"))?;
        let mut cmd = Command::new("erl");
        cmd.arg("-noshell")
            .args(["+K", "true", "+P", "250000"])
            .args(["-mnesia", "dir"])
            .arg(format!("\"{}\"", d.join("spool").display()))
            .args(["-s", "ejabberd", "-eval", CTL_LOOP])
            .env("EJABBERD_CONFIG_PATH", self.config_path())
            .env("EJABBERD_LOG_PATH", &log_path)
            .env("ERL_LIBS", &self.libs)
            .env("ERL_CRASH_DUMP", d.join("erl_crash.dump"))
            .env("ERL_CRASH_DUMP_BYTES", "0")
            .env("HOME", d)
            .current_dir(d)
            .stdin(Stdio::piped())
            .stdout(out.try_clone().map_err(|e| format!("dup: {e}"))?)
            .stderr(out);
        let mut child = super::spawn_tied(&mut cmd).map_err(|e| format!("spawn erl: {e}"))?;
        let stdin = child.stdin.take().expect("stdin");
        self.child = Some(child);
        *self.ctl.lock().unwrap_or_else(|e| e.into_inner()) = Some(Ctl { stdin, next: 0 });

        let ready = format!("Start accepting TCP connections at 127.0.0.1:{port} ");
        self.base
            .wait_ready(&log_path, log_len, &ready, "eaddrinuse", START_TIMEOUT)
    }

    /// Evaluate Erlang expressions (ending in `.`) in the server, as an
    /// admin's `ejabberdctl debug` shell would, and return the printed
    /// result on one line (`{error,Reason}` for an exception).
    pub fn eval(&self, expr: &str) -> Result<String, Error> {
        let mut guard = self.ctl.lock().unwrap_or_else(|e| e.into_inner());
        let ctl = guard
            .as_mut()
            .filter(|_| self.is_running())
            .ok_or_else(|| Error::new("ejabberd is not running"))?;
        let id = ctl.next;
        ctl.next += 1;
        let console = self.console_path();
        let before = fs::metadata(&console).map(|m| m.len()).unwrap_or(0) as usize;
        writeln!(ctl.stdin, "{id} {}", expr.replace('\n', " "))
            .and_then(|()| ctl.stdin.flush())
            .map_err(|e| Error::new(format!("ejabberd control channel: {e}")))?;
        let tag = format!("popivr-ctl {id} ");
        let deadline = Instant::now() + CTL_TIMEOUT;
        loop {
            let text = fs::read(&console).unwrap_or_default();
            let text = String::from_utf8_lossy(text.get(before..).unwrap_or_default());
            if let Some(at) = text.find(&tag) {
                let rest = &text[at + tag.len()..];
                if let Some(end) = rest.find('\n') {
                    return Ok(rest[..end].trim().to_owned());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "ejabberd did not answer a control request within {CTL_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// `config` without the top-level block whose key starts `extra`.
fn without_key(config: &str, extra: &str) -> String {
    let Some(key) = extra.split(':').next().map(str::trim) else {
        return config.to_owned();
    };
    let mut out = String::with_capacity(config.len());
    let mut skipping = false;
    for line in config.split_inclusive('\n') {
        let top = !line.starts_with(' ') && !line.starts_with('-');
        if top {
            skipping = line.split(':').next().map(str::trim) == Some(key);
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out
}

/// An Erlang binary literal for any string: `<<104,105>>`, so no quoting
/// can go wrong (and a password is not readable at a glance).
fn erl_binary(s: &str) -> String {
    let bytes: Vec<String> = s.bytes().map(|b| b.to_string()).collect();
    format!("<<{}>>", bytes.join(","))
}

/// Where ejabberd's Erlang applications are: the `ERL_LIBS` Debian's
/// `ejabberdctl` sets (`/usr/lib/<multiarch>`).
fn erl_libs() -> Result<String, Error> {
    let hint = "ejabberd is not installed: run `.ci/deps`-style `apt-get install -y ejabberd` \
                (.ci/test does it and keeps Debian's own ejabberd service stopped)";
    if !have("erl") {
        return Err(Error::new(hint));
    }
    let script = fs::read_to_string("/usr/sbin/ejabberdctl").map_err(|_| Error::new(hint))?;
    script
        .lines()
        .find_map(|l| l.trim().strip_prefix("ERL_LIBS="))
        .map(|v| v.trim_matches(|c| c == '\'' || c == '"').to_owned())
        .filter(|dir| Path::new(dir).is_dir())
        .ok_or_else(|| Error::new(format!("no ERL_LIBS in /usr/sbin/ejabberdctl; {hint}")))
}

/// Reads `<id> <expression>` lines from stdin, evaluates each in its own
/// process and prints `popivr-ctl <id> <result>`. Results are printed with
/// `~0p` (one line); an exception prints as `error:...`.
const CTL_LOOP: &str = r#"spawn(fun() ->
  Eval = fun(Line) ->
    {Id, Rest} = string:to_integer(Line),
    Result = try
      {ok, Toks, _} = erl_scan:string(Rest),
      {ok, Exprs} = erl_parse:parse_exprs(Toks),
      {value, V, _} = erl_eval:exprs(Exprs, erl_eval:new_bindings()),
      V
    catch C:E -> {C, E}
    end,
    io:format("popivr-ctl ~b ~0p~n", [Id, Result])
  end,
  Loop = fun L() ->
    case io:get_line('') of
      eof -> ok;
      {error, _} -> ok;
      Line -> Eval(Line), L()
    end
  end,
  Loop()
end)."#;

/// Debian 12's `/etc/ejabberd/ejabberd.yml` (ejabberd 23.01-1), comments
/// dropped, with these changes: `hosts` and `certfiles` are the test's;
/// the client listener binds 127.0.0.1 on a free port; the listeners for
/// direct TLS (5223), s2s (5269), HTTP (5443, 5280), STUN (3478) and MQTT
/// (1883) are left out. Every other line is as shipped.
const STOCK: &str = r#"loglevel: info
log_rotate_count: 0
hosts:
@HOSTS@
certfiles:
  - "@CERT@"
  - "@KEY@"
define_macro:
  'TLS_CIPHERS': "HIGH:!aNULL:!eNULL:!3DES:@STRENGTH"
  'TLS_OPTIONS':
    - "no_sslv3"
    - "no_tlsv1"
    - "no_tlsv1_1"
    - "cipher_server_preference"
    - "no_compression"
c2s_ciphers: 'TLS_CIPHERS'
s2s_ciphers: 'TLS_CIPHERS'
c2s_protocol_options: 'TLS_OPTIONS'
s2s_protocol_options: 'TLS_OPTIONS'
listen:
  -
    port: @PORT@
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: c2s_shaper
    access: c2s
    starttls_required: true
    protocol_options: 'TLS_OPTIONS'
disable_sasl_mechanisms:
  - "digest-md5"
  - "X-OAUTH2"
s2s_use_starttls: required
auth_password_format: scram
acl:
  admin:
     user:
       - ""
  local:
    user_regexp: ""
  loopback:
    ip:
      - 127.0.0.0/8
      - ::1/128
access_rules:
  local:
    allow: local
  c2s:
    deny: blocked
    allow: all
  announce:
    allow: admin
  configure:
    allow: admin
  muc_create:
    allow: local
  pubsub_createnode:
    allow: local
  trusted_network:
    allow: loopback
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
  "admin access":
    who:
      access:
        allow:
          - acl: loopback
          - acl: admin
      oauth:
        scope: "ejabberd:admin"
        access:
          allow:
            - acl: loopback
            - acl: admin
    what:
      - "*"
      - "!stop"
      - "!start"
  "public commands":
    who:
      ip: 127.0.0.1/8
    what:
      - status
      - connected_users_number
shaper:
  normal:
    rate: 3000
    burst_size: 20000
  fast: 200000
shaper_rules:
  max_user_sessions: 10
  max_user_offline_messages:
    5000: admin
    100: all
  c2s_shaper:
    none: admin
    normal: all
  s2s_shaper: fast
modules:
  mod_adhoc: {}
  mod_admin_extra: {}
  mod_announce:
    access: announce
  mod_avatar: {}
  mod_blocking: {}
  mod_bosh: {}
  mod_caps: {}
  mod_carboncopy: {}
  mod_client_state: {}
  mod_configure: {}
  mod_disco: {}
  mod_fail2ban: {}
  mod_http_api: {}
  mod_last: {}
  mod_mqtt: {}
  mod_muc:
    access:
      - allow
    access_admin:
      - allow: admin
    access_create: muc_create
    access_persistent: muc_create
    access_mam:
      - allow
    default_room_options:
      mam: true
  mod_muc_admin: {}
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_ping: {}
  mod_pres_counter:
    count: 5
    interval: 60
  mod_privacy: {}
  mod_private: {}
  mod_pubsub:
    access_createnode: pubsub_createnode
    plugins:
      - flat
      - pep
    force_node_config:
      "eu.siacs.conversations.axolotl.*":
        access_model: open
      storage:bookmarks:
        access_model: whitelist
  mod_push: {}
  mod_push_keepalive: {}
  mod_roster:
    versioning: true
  mod_s2s_dialback: {}
  mod_shared_roster: {}
  mod_sic: {}
  mod_stream_mgmt:
    resend_on_timeout: if_offline
  mod_stun_disco: {}
  mod_vcard:
    search: false
  mod_vcard_xupdate: {}
  mod_version: {}
"#;
