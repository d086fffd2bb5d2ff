//! A throw-away real Asterisk for tests: its own temp dir, config, free
//! AMI port and process group.
//!
//! [`Asterisk`] runs the real binary (found or built by
//! [`asterisk_binary`]) with a complete private tree under a temp dir:
//! every Asterisk directory except the modules points there, so the
//! control socket, logs, databases and sounds never touch a system
//! Asterisk or another test's. Each test starts its own (well under a
//! second), so tests run in parallel. Dropping it stops Asterisk, kills
//! whatever is left in its process group (ExternalIVR children included)
//! and removes the directory.
//!
//! Calls are driven over AMI ([`Ami`], reachable through `Deref`): the
//! caller is a Local channel, `Local/EXTEN@CONTEXT`, whose `;2` half runs
//! the dialplan under test while the `;1` half plays the caller
//! ([`Originate`]).
//!
//! ```no_run
//! # async fn demo() {
//! use popivr_testkit::testbed::asterisk::{Asterisk, Originate};
//! use std::time::Duration;
//! let pbx = Asterisk::builder()
//!     .dialplan(
//!         "[from-pbx]\n\
//!          exten => 100,1,Answer()\n \
//!          same => n,UserEvent(Seen,NUM: ${CALLERID(num)})\n \
//!          same => n,Hangup()\n",
//!     )
//!     .start()
//!     .await;
//! let call = pbx
//!     .originate(Originate::new("Local/100@from-pbx").caller_id("+4930555", "Jane Doe"))
//!     .await
//!     .unwrap();
//! let seen = pbx.wait_user_event_for(&call, "Seen", Duration::from_secs(5)).await;
//! assert_eq!(seen["NUM"], "+4930555");
//! # }
//! ```
//!
//! Caller ID: AMI's `CallerID: "Name" <num>` header sets the `;1` half's
//! caller ID, and the Local channel copies it to the `;2` half, so
//! `CALLERID(num)` / `CALLERID(name)` there are what [`Originate::caller_id`]
//! was given. Commas, quotes, parentheses, backslashes, blanks at either
//! end and non-ASCII names arrive intact (the name is sent quoted, with
//! `\"` and `\\` escapes). Two limits of Asterisk's Originate remain: the
//! number loses blanks and `()-.` (`+49 (30) 555-12.3` arrives as
//! `+4930555123`), and the header is read into a 256-byte buffer, so
//! [`Asterisk::originate`] refuses a caller ID longer than 255 bytes
//! (quoted and escaped) rather than let Asterisk cut it. To give the `;2`
//! side an exact or longer value, pass it as a variable
//! ([`Originate::var`]; variables reach the `;2` half too) and
//! `Set(CALLERID(num)=${VAR})` in the dialplan.
//!
//! The secret of the AMI user is random, lives only in the private
//! `manager.conf` and on the socket, and is never printed.

use std::fs;
use std::io::{Read, Write};
use std::ops::Deref;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::ami::{Ami, Event};
use super::{Error, free_port};

/// The Asterisk release `build.sh` builds (and the cache dir is named by).
pub const ASTERISK_VERSION: &str = "23.4.1";

/// How long Asterisk may take to start answering on AMI (it takes about
/// half a second; a loaded CI machine running many tests at once more).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Modules every test Asterisk loads. `require` (not `load`): a missing
/// module stops Asterisk at once with its name in the console output,
/// instead of a dialplan failing later for no visible reason. Local
/// channels, `Answer`, `Wait`, `Set`, `Goto`, `Hangup` and friends are in
/// the core and need nothing here.
const MODULES: &[&str] = &[
    // extensions.conf
    "pbx_config",
    // the applications popivr's dialplan and the tests use
    "app_externalivr",
    "app_userevent",
    "app_verbose",
    "app_senddtmf",
    "app_exec",
    "app_playback",
    "app_echo",
    "app_system",
    "app_read",
    // functions
    "func_strings",
    "func_callerid",
    "func_env",
    "func_logic",
    "func_global",
    "func_channel",
    "func_uri",
    "func_math",
    // Sounds are 8 kHz signed linear (.sln), the format Originate gives a
    // Local channel, so playing them needs no translation; the codecs are
    // for tests that use other formats.
    "format_sln",
    "format_wav",
    "codec_ulaw",
    "codec_alaw",
    "codec_a_mu",
    "codec_resample",
    // A timer paces file playback and ExternalIVR's generator on Local
    // channels (nothing else sends them frames at 20 ms intervals).
    "res_timing_timerfd",
    // `channel originate` on the CLI
    "res_clioriginate",
];

/// `Gosub` (app_stack): loaded when the build has it. It cannot load
/// without res_agi (it links against res_agi's functions and Asterisk
/// opens modules with RTLD_NOW), which needs res_speech; a build without
/// them has no Gosub, and [`Builder::try_start`] says so when the dialplan
/// uses it.
const GOSUB_MODULES: &[&str] = &["res_speech", "res_agi", "app_stack"];

/// Where the binary comes from, in this order: `$POPIVR_ASTERISK`;
/// `asterisk` on the PATH; the cached build
/// `${XDG_CACHE_HOME:-$HOME/.cache}/popivr/asterisk-23.4.1/sbin/asterisk`;
/// else it builds that with `$POPIVR_SHARED/asterisk/build.sh` (default
/// shared dir: `../shared` beside this crate), a few minutes, once per
/// machine: a lock file in the cache dir makes parallel test processes
/// wait for the one that builds.
pub fn asterisk_binary() -> Result<PathBuf, Error> {
    if let Some(path) = std::env::var_os("POPIVR_ASTERISK").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(Error::new(format!(
                "POPIVR_ASTERISK is {}, which is not a file",
                path.display()
            )))
        };
    }
    if let Some(path) = on_path("asterisk") {
        return Ok(path);
    }
    static BUILT: OnceLock<Result<PathBuf, Error>> = OnceLock::new();
    BUILT.get_or_init(build_cached).clone()
}

fn on_path(program: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// `${XDG_CACHE_HOME:-$HOME/.cache}/popivr`.
fn cache_dir() -> Result<PathBuf, Error> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| {
                    Error::new("no asterisk: POPIVR_ASTERISK unset, none on PATH, and no HOME for the cache")
                })?,
        )
        .join(".cache"),
    };
    Ok(base.join("popivr"))
}

/// The cached build, building it first if needed (under the lock).
fn build_cached() -> Result<PathBuf, Error> {
    let cache = cache_dir()?;
    let prefix = cache.join(format!("asterisk-{ASTERISK_VERSION}"));
    let binary = prefix.join("sbin/asterisk");
    if binary.is_file() {
        return Ok(binary);
    }
    fs::create_dir_all(&cache)
        .map_err(|e| Error::new(format!("create {}: {e}", cache.display())))?;
    // The same lock file as `.ci/deps` (`flock` on it), so a CI script
    // and test processes never build at the same time.
    let lock_path = cache.join(format!("asterisk-{ASTERISK_VERSION}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::new(format!("open {}: {e}", lock_path.display())))?;
    use std::os::fd::AsRawFd;
    // Blocks while another process builds; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::new(format!(
            "lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        )));
    }
    if binary.is_file() {
        // Someone else built it while we waited.
        return Ok(binary);
    }
    let shared = match std::env::var_os("POPIVR_SHARED").filter(|p| !p.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    let script = shared.join("asterisk/build.sh");
    if !script.is_file() {
        return Err(Error::new(format!(
            "no asterisk: POPIVR_ASTERISK is unset, there is none on the PATH or in {}, \
             and the build script {} is missing (set POPIVR_SHARED to the shared dir)",
            prefix.display(),
            script.display()
        )));
    }
    // Its output (a few lines; the compiler's goes to PREFIX/build.log)
    // goes to our stderr: a first test run that takes minutes says why.
    let status = Command::new("bash")
        .arg(&script)
        .arg(&prefix)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| Error::new(format!("run {}: {e}", script.display())))?;
    if status.success() && binary.is_file() {
        Ok(binary)
    } else {
        Err(Error::new(format!(
            "building asterisk with {} failed ({status}); see {}",
            script.display(),
            prefix.join("build.log").display()
        )))
    }
}

/// Where the installation beside `binary` keeps what a private tree
/// cannot hold itself: the modules, and the XML documentation (Asterisk
/// refuses to start without it: its core config objects are checked
/// against it, and stasis fails to initialise).
struct Install {
    modules: PathBuf,
    documentation: PathBuf,
}

impl Install {
    fn has_gosub(&self) -> bool {
        GOSUB_MODULES
            .iter()
            .all(|m| self.modules.join(format!("{m}.so")).is_file())
    }

    fn beside(binary: &Path) -> Result<Install, Error> {
        let binary = fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
        // PREFIX/sbin/asterisk → PREFIX (build.sh, ./configure --prefix)
        let prefix = binary
            .parent()
            .and_then(Path::parent)
            .unwrap_or(Path::new("/usr"))
            .to_owned();
        let first = |candidates: Vec<PathBuf>, what: &str, probe: &str| {
            candidates
                .iter()
                .find(|dir| dir.join(probe).exists())
                .cloned()
                .ok_or_else(|| {
                    Error::new(format!(
                        "no Asterisk {what} for {} (looked for {probe} in {})",
                        binary.display(),
                        candidates
                            .iter()
                            .map(|d| d.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
        };
        let modules = first(
            vec![
                prefix.join("lib/asterisk/modules"),
                prefix.join("lib64/asterisk/modules"),
                prefix.join("lib/x86_64-linux-gnu/asterisk/modules"),
                prefix.join("lib/aarch64-linux-gnu/asterisk/modules"),
                PathBuf::from("/usr/lib/asterisk/modules"),
            ],
            "modules",
            "app_externalivr.so",
        )?;
        let documentation = first(
            vec![
                prefix.join("var/lib/asterisk/documentation"),
                prefix.join("share/asterisk/documentation"),
                PathBuf::from("/var/lib/asterisk/documentation"),
                PathBuf::from("/usr/share/asterisk/documentation"),
            ],
            "documentation",
            "core-en_US.xml",
        )?;
        Ok(Install {
            modules,
            documentation,
        })
    }
}

/// How a test Asterisk is set up. Every method adds to what is there.
#[derive(Clone, Default)]
pub struct Builder {
    dialplan: String,
    /// (name in the etc dir, contents, executable)
    files: Vec<(String, Vec<u8>, bool)>,
    xmpp_conf: Option<String>,
    env: Vec<(String, String)>,
    sounds: Vec<(String, Duration)>,
    modules: Vec<String>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // File contents, xmpp.conf and environment values may hold
        // passwords: names only.
        let files: Vec<&str> = self.files.iter().map(|(n, _, _)| n.as_str()).collect();
        let env: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Builder")
            .field("dialplan", &self.dialplan)
            .field("files", &files)
            .field("xmpp_conf", &self.xmpp_conf.is_some())
            .field("env", &env)
            .field("sounds", &self.sounds)
            .field("modules", &self.modules)
            .finish()
    }
}

impl Builder {
    /// Dialplan for `extensions.conf`, after its `[general]` section
    /// (contexts, `[globals]`, `#include name` of a [`file`](Self::file)).
    pub fn dialplan(mut self, text: &str) -> Self {
        self.dialplan.push_str(text);
        if !text.ends_with('\n') {
            self.dialplan.push('\n');
        }
        self
    }

    /// A file in Asterisk's config dir (`${ASTETCDIR}` in the dialplan),
    /// e.g. a dialplan snippet to `#include` as an admin would, or
    /// `popivr.conf`. Only the owner can read it (it may hold passwords).
    /// `name` is relative and may have sub directories.
    pub fn file(mut self, name: &str, contents: impl AsRef<[u8]>) -> Self {
        self.files
            .push((name.to_owned(), contents.as_ref().to_vec(), false));
        self
    }

    /// An executable file in the config dir (mode 0700), e.g. a script
    /// for `ExternalIVR(${ASTETCDIR}/child.sh)`.
    pub fn executable(mut self, name: &str, contents: impl AsRef<[u8]>) -> Self {
        self.files
            .push((name.to_owned(), contents.as_ref().to_vec(), true));
        self
    }

    /// Write `xmpp.conf` and load `res_xmpp` (Asterisk's own XMPP client,
    /// `JabberSend` and friends).
    pub fn xmpp_conf(mut self, text: &str) -> Self {
        self.xmpp_conf = Some(text.to_owned());
        self
    }

    /// An environment variable for Asterisk, and so for the ExternalIVR
    /// programs it starts (e.g. `POPIVR_CONFIG`). Otherwise Asterisk gets
    /// only `PATH`, `HOME` and `LANG=C.UTF-8`.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// A sound `name` (e.g. `custom/hold`, played as `Playback(custom/hold)`
    /// or `S,custom/hold`) lasting `duration`: a quiet 440 Hz tone, 8 kHz
    /// 16-bit mono (`.sln`). `silence/10` (ten seconds of silence, what
    /// ExternalIVR plays while its playlist is empty) is always there.
    pub fn sound(mut self, name: &str, duration: Duration) -> Self {
        self.sounds.push((name.to_owned(), duration));
        self
    }

    /// Load one more module (by name, e.g. `app_dial`), beyond the set
    /// every test Asterisk has.
    pub fn module(mut self, name: &str) -> Self {
        self.modules.push(name.trim_end_matches(".so").to_owned());
        self
    }

    /// Start Asterisk and wait until it is fully booted and AMI is logged
    /// in; panics on failure with Asterisk's own output.
    ///
    /// Asterisk is tied to the life of the thread that starts it (so that
    /// a killed test process cannot leave it running): start it from the
    /// test itself, not from `spawn_blocking`. The AMI reader runs on the
    /// current tokio runtime.
    pub async fn start(self) -> Asterisk {
        self.try_start().await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`start`](Self::start) that reports failures instead of panicking.
    pub async fn try_start(self) -> Result<Asterisk, Error> {
        let t0 = Instant::now();
        let binary = asterisk_binary()?;
        let install = Install::beside(&binary)?;
        if !install.has_gosub() && self.uses_gosub() {
            return Err(Error::new(format!(
                "the dialplan uses Gosub, but the Asterisk at {} cannot run it: app_stack \
                 needs res_agi and res_speech, which are not in {} (build.sh needs \
                 `--enable res_agi --enable res_speech`)",
                binary.display(),
                install.modules.display()
            )));
        }
        let dir = tempfile::Builder::new()
            .prefix("popivr-asterisk-")
            .tempdir()
            .map_err(|e| Error::new(format!("temp dir: {e}")))?;
        let tree = Tree::new(dir.path());
        self.write_tree(&tree, &install)?;
        let secret = random_hex(16)?;

        let mut last = String::new();
        // A free port may be taken between probing and Asterisk's bind:
        // then our login fails (another AMI, another secret) and we retry
        // on a fresh port.
        for _ in 0..4 {
            let port = free_port();
            write_private(
                &tree.etc.join("manager.conf"),
                manager_conf(port, &secret).as_bytes(),
            )?;
            let mut child = self.spawn(&binary, &tree)?;
            match wait_ready(&mut child, port, &secret, &tree).await {
                // Asterisk exited: a new port will not help.
                Err(Failed::Exited(why)) => {
                    kill_group(&mut child);
                    return Err(why);
                }
                Ok(ami) => {
                    return Ok(Asterisk {
                        tree,
                        child: Some(child),
                        ami,
                        port,
                        secret,
                        startup: t0.elapsed(),
                        binary,
                        dir,
                    });
                }
                Err(Failed::Retry(why)) => {
                    kill_group(&mut child);
                    last = why.to_string();
                }
            }
        }
        Err(Error::new(format!("asterisk did not start: {last}")))
    }

    /// Whether the dialplan or a file for the config dir calls Gosub.
    fn uses_gosub(&self) -> bool {
        let calls = |text: &[u8]| {
            String::from_utf8_lossy(text)
                .to_ascii_lowercase()
                .contains("gosub(")
        };
        calls(self.dialplan.as_bytes()) || self.files.iter().any(|(_, c, _)| calls(c))
    }

    fn write_tree(&self, tree: &Tree, install: &Install) -> Result<(), Error> {
        for dir in tree.dirs() {
            fs::create_dir_all(dir)
                .map_err(|e| Error::new(format!("create {}: {e}", dir.display())))?;
        }
        std::os::unix::fs::symlink(&install.documentation, tree.data.join("documentation"))
            .map_err(|e| Error::new(format!("link documentation: {e}")))?;

        let put = |name: &str, text: &str| write_private(&tree.etc.join(name), text.as_bytes());
        put("asterisk.conf", &asterisk_conf(tree, &install.modules))?;
        put("logger.conf", LOGGER_CONF)?;
        let mut modules = String::from("[modules]\nautoload = no\n");
        for module in MODULES {
            modules.push_str(&format!("require => {module}.so\n"));
        }
        if install.has_gosub() {
            for module in GOSUB_MODULES {
                modules.push_str(&format!("require => {module}.so\n"));
            }
        }
        for module in &self.modules {
            modules.push_str(&format!("load => {module}.so\n"));
        }
        if let Some(xmpp) = &self.xmpp_conf {
            put("xmpp.conf", xmpp)?;
            // `load`, not `require`: a test may give it a config it
            // rejects, and Asterisk should still start.
            modules.push_str("load => res_xmpp.so\n");
        }
        put("modules.conf", &modules)?;
        put(
            "extensions.conf",
            &format!(
                "; generated by popivr's testbed\n[general]\nstatic = yes\nwriteprotect = yes\n\n{}",
                self.dialplan
            ),
        )?;
        for (name, contents, executable) in &self.files {
            let path = safe_join(&tree.etc, name)?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| Error::new(format!("create {}: {e}", parent.display())))?;
            }
            write_private(&path, contents)?;
            if *executable {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                    .map_err(|e| Error::new(format!("chmod {name}: {e}")))?;
            }
        }
        // Asterisk looks for `NAME` as `sounds/<language>/NAME.<format>`;
        // the channels' language is `en`.
        let sounds = tree.data.join("sounds/en");
        write_sound(&sounds, "silence/10", Duration::from_secs(10), 0)?;
        for (name, duration) in &self.sounds {
            write_sound(&sounds, name, *duration, 1000)?;
        }
        Ok(())
    }

    fn spawn(&self, binary: &Path, tree: &Tree) -> Result<Child, Error> {
        let console = fs::File::create(tree.root.join("console.log"))
            .map_err(|e| Error::new(format!("console log: {e}")))?;
        let mut cmd = Command::new(binary);
        // -f: stay in the foreground (no fork, so the pid is Asterisk's),
        // without -c: no console reading stdin. -n: no colour codes. -q:
        // the console output (start-up noise) is quiet; the log file has
        // everything.
        cmd.arg("-f")
            .arg("-n")
            .arg("-q")
            .arg("-C")
            .arg(tree.etc.join("asterisk.conf"))
            .current_dir(&tree.root)
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("LANG", "C.UTF-8")
            .env(
                "HOME",
                std::env::var_os("HOME").unwrap_or_else(|| tree.root.clone().into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(
                console
                    .try_clone()
                    .map_err(|e| Error::new(format!("dup: {e}")))?,
            )
            .stderr(console);
        // Its own process group: ExternalIVR children stay in it (they are
        // forked without a new group), so Drop kills them too; and it dies
        // with this process even without Drop.
        super::spawn_tied(&mut cmd)
            .map_err(|e| Error::new(format!("spawn {}: {e}", binary.display())))
    }
}

/// Why a start attempt failed.
enum Failed {
    /// Asterisk exited or hung: say why, do not try again.
    Exited(Error),
    /// Someone else answered on the port: try another.
    Retry(Error),
}

/// Poll AMI until it answers, log in, and wait for `FullyBooted` (modules
/// loaded, dialplan read). Fails at once if Asterisk exits.
async fn wait_ready(
    child: &mut Child,
    port: u16,
    secret: &str,
    tree: &Tree,
) -> Result<Ami, Failed> {
    let deadline = Instant::now() + START_TIMEOUT;
    let exited = |child: &mut Child| -> Option<Failed> {
        let status = child.try_wait().ok().flatten()?;
        let console = fs::read_to_string(tree.root.join("console.log")).unwrap_or_default();
        let log = fs::read_to_string(tree.log.join("full")).unwrap_or_default();
        Some(Failed::Exited(Error::new(format!(
            "asterisk exited ({status}) while starting:\n{}{}",
            complaints(&console),
            complaints(&log),
        ))))
    };
    let hung = |what: &str| {
        Failed::Exited(Error::new(format!(
            "{what} after {START_TIMEOUT:?}:\n{}",
            complaints(&fs::read_to_string(tree.log.join("full")).unwrap_or_default())
        )))
    };
    let ami = loop {
        if let Some(e) = exited(child) {
            return Err(e);
        }
        if Instant::now() > deadline {
            return Err(hung(&format!("AMI on port {port} not up")));
        }
        match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            // Someone listens: ours or a thief of the port. Login tells.
            Ok(probe) => {
                drop(probe);
                match Ami::connect(port, USERNAME, secret).await {
                    Ok(ami) => break ami,
                    Err(e) => return Err(exited(child).unwrap_or(Failed::Retry(e))),
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let booted = ami
        .try_wait_event(
            |e| e.get("Event").map(String::as_str) == Some("FullyBooted"),
            left,
        )
        .await;
    if booted.is_none() {
        ami.close();
        return Err(exited(child).unwrap_or_else(|| hung("asterisk not fully booted")));
    }
    Ok(ami)
}

/// The AMI user of every test Asterisk (the secret is per instance).
const USERNAME: &str = "popivr-test";

/// Verbose messages up to level 5 reach the log file (app_externalivr
/// logs each command it gets at level 4: `got command '...'`), with
/// millisecond timestamps for timing checks.
const LOGGER_CONF: &str = "\
[general]
dateformat = %F %T.%3q
[logfiles]
full => notice,warning,error,verbose(5),debug,dtmf
";

fn asterisk_conf(tree: &Tree, modules: &Path) -> String {
    let d = |p: &Path| p.display().to_string();
    format!(
        "; generated by popivr's testbed: everything but the modules in a temp dir
[directories]
astcachedir => {cache}
astetcdir => {etc}
astmoddir => {modules}
astvarlibdir => {varlib}
astdbdir => {db}
astkeydir => {keys}
astdatadir => {data}
astagidir => {agi}
astspooldir => {spool}
astrundir => {run}
astlogdir => {log}
astsbindir => {sbin}

[options]
; the levels the log file needs (logger.conf), no colour codes
verbose = 5
debug = 0
nocolor = yes
; runs as whoever runs the tests: no runuser/rungroup
; the private control socket (astrundir/asterisk.ctl) is ours alone
astctlpermissions = 0600
",
        cache = d(&tree.cache),
        etc = d(&tree.etc),
        modules = d(modules),
        varlib = d(&tree.varlib),
        db = d(&tree.db),
        keys = d(&tree.keys),
        data = d(&tree.data),
        agi = d(&tree.agi),
        spool = d(&tree.spool),
        run = d(&tree.run),
        log = d(&tree.log),
        sbin = d(&tree.sbin),
    )
}

fn manager_conf(port: u16, secret: &str) -> String {
    format!(
        "[general]
enabled = yes
bindaddr = 127.0.0.1
port = {port}
; every event carries `Timestamp: <epoch seconds>.<microseconds>`, taken
; when Asterisk raised it (timing checks compare it with the test's clock)
timestampevents = yes

[{USERNAME}]
secret = {secret}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = all
write = all
"
    )
}

/// The private directory tree of one Asterisk.
#[derive(Debug)]
struct Tree {
    root: PathBuf,
    etc: PathBuf,
    cache: PathBuf,
    varlib: PathBuf,
    db: PathBuf,
    keys: PathBuf,
    data: PathBuf,
    agi: PathBuf,
    spool: PathBuf,
    run: PathBuf,
    log: PathBuf,
    sbin: PathBuf,
}

impl Tree {
    fn new(root: &Path) -> Tree {
        let at = |name: &str| root.join(name);
        Tree {
            root: root.to_owned(),
            etc: at("etc"),
            cache: at("cache"),
            varlib: at("lib"),
            db: at("lib/db"),
            keys: at("lib/keys"),
            data: at("data"),
            agi: at("data/agi-bin"),
            spool: at("spool"),
            run: at("run"),
            log: at("log"),
            sbin: at("sbin"),
        }
    }

    fn dirs(&self) -> [&Path; 11] {
        [
            &self.etc,
            &self.cache,
            &self.varlib,
            &self.db,
            &self.keys,
            &self.data,
            &self.agi,
            &self.spool,
            &self.run,
            &self.log,
            &self.sbin,
        ]
    }
}

/// A running test Asterisk. AMI methods ([`Ami`]) are available on it
/// directly.
pub struct Asterisk {
    tree: Tree,
    child: Option<Child>,
    ami: Ami,
    port: u16,
    /// The AMI secret, for the blocking `core stop now` in Drop.
    secret: String,
    startup: Duration,
    binary: PathBuf,
    // Last: removed after Drop has stopped Asterisk.
    dir: TempDir,
}

impl std::fmt::Debug for Asterisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secret.
        f.debug_struct("Asterisk")
            .field("dir", &self.dir.path())
            .field("ami_port", &self.port)
            .field("pid", &self.pid())
            .field("binary", &self.binary)
            .finish()
    }
}

impl Deref for Asterisk {
    type Target = Ami;
    fn deref(&self) -> &Ami {
        &self.ami
    }
}

/// Unique ids for Originate's channels, across all instances.
static CALLS: AtomicU64 = AtomicU64::new(1);

impl Asterisk {
    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A handle on the AMI connection to give to other tasks.
    pub fn ami(&self) -> Ami {
        self.ami.clone()
    }

    /// The temp dir holding everything (removed on Drop); a place for the
    /// test's own files too.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The config dir (`${ASTETCDIR}`).
    pub fn etc_dir(&self) -> &Path {
        &self.tree.etc
    }

    /// The sounds dir (`<astdatadir>/sounds/en`).
    pub fn sounds_dir(&self) -> PathBuf {
        self.tree.data.join("sounds/en")
    }

    pub fn ami_port(&self) -> u16 {
        self.port
    }

    /// The Asterisk binary in use.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Asterisk's pid (also its process group), while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How long [`Builder::start`] took.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The whole `full` log so far: notices, warnings, errors, verbose
    /// messages to level 5 (ExternalIVR's `got command '...'` lines, the
    /// child's `stderr:` lines), DTMF.
    pub fn log(&self) -> String {
        fs::read_to_string(self.tree.log.join("full")).unwrap_or_default()
    }

    /// Wait until the log holds `needle`, or `timeout`; returns whether
    /// it does. Asterisk writes its log from a thread of its own, so a
    /// line can land a moment after the AMI event of the same step.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Start a call (always as an asynchronous AMI Originate, so the
    /// shared AMI connection is never blocked while a call rings). With
    /// [`Originate::wait_answer`], waits until the PBX side answered (or
    /// fails with the reason).
    pub async fn originate(&self, o: Originate) -> Result<Call, Error> {
        let n = CALLS.fetch_add(1, Ordering::Relaxed);
        let call = Call {
            id: format!("popivr-call-{}-{n}", std::process::id()),
            pbx_id: format!("popivr-call-{}-{n}-pbx", std::process::id()),
        };
        let timeout_ms = o.answer_timeout.as_millis().to_string();
        let mut headers: Vec<(&str, String)> = vec![("Channel", o.channel.clone())];
        match &o.caller {
            CallerSide::App { app, data } => {
                headers.push(("Application", app.clone()));
                headers.push(("Data", data.clone()));
            }
            CallerSide::Exten {
                context,
                exten,
                priority,
            } => {
                headers.push(("Context", context.clone()));
                headers.push(("Exten", exten.clone()));
                headers.push(("Priority", priority.to_string()));
            }
        }
        if let Some(callerid) = caller_id_header(&o.caller_num, &o.caller_name)? {
            headers.push(("CallerID", callerid));
        }
        for (name, value) in &o.variables {
            if name.is_empty() || name.contains(['=', ',']) {
                return Err(Error::new(format!("bad variable name {name:?}")));
            }
            headers.push(("Variable", format!("{name}={}", escape_arg(value))));
        }
        headers.push(("Timeout", timeout_ms));
        headers.push(("ChannelId", call.id.clone()));
        headers.push(("OtherChannelId", call.pbx_id.clone()));
        headers.push(("Async", "true".to_owned()));
        let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = self.ami.action("Originate", &refs).await?;
        if !response.is_success() {
            return Err(Error::new(format!(
                "Originate {} refused: {}",
                o.channel,
                response.get("Message").unwrap_or("")
            )));
        }
        if !o.asynchronous {
            let id = call.id.clone();
            let answer = self
                .ami
                .try_wait_event(
                    |e| {
                        e.get("Event").map(String::as_str) == Some("OriginateResponse")
                            && e.get("Uniqueid") == Some(&id)
                    },
                    o.answer_timeout + Duration::from_secs(5),
                )
                .await
                .ok_or_else(|| Error::new(format!("no OriginateResponse for {}", o.channel)))?;
            if answer.get("Response").map(String::as_str) != Some("Success") {
                return Err(Error::new(format!(
                    "call to {} not answered (reason {})",
                    o.channel,
                    answer.get("Reason").map(String::as_str).unwrap_or("?")
                )));
            }
        }
        Ok(call)
    }

    /// `core show channels concise`, one row per channel, fields split on
    /// `!`: channel, context, exten, priority, state, application, data,
    /// caller id, account code, peer account, AMA flags, duration, bridge
    /// id, unique id.
    pub async fn channels(&self) -> Vec<Vec<String>> {
        self.command("core show channels concise")
            .await
            .lines()
            .filter(|l| l.contains('!'))
            .map(|l| l.split('!').map(str::to_owned).collect())
            .collect()
    }

    /// How many channels are inside application `app` right now (e.g.
    /// `ExternalIVR`; case-insensitive).
    pub async fn channels_in_app(&self, app: &str) -> usize {
        self.channels()
            .await
            .iter()
            .filter(|row| row.get(5).is_some_and(|a| a.eq_ignore_ascii_case(app)))
            .count()
    }

    /// Hang up a channel by name, or every channel whose name matches
    /// `/regex/`.
    pub async fn hangup(&self, channel: &str) -> Result<(), Error> {
        let response = self.ami.action("Hangup", &[("Channel", channel)]).await?;
        if response.is_success() {
            Ok(())
        } else {
            Err(Error::new(format!(
                "Hangup {channel}: {}",
                response.get("Message").unwrap_or("")
            )))
        }
    }

    /// Hang up the caller side of `call` (the PBX side follows, as when a
    /// real caller hangs up). Nothing to do if the call is already over.
    pub async fn hangup_call(&self, call: &Call) -> Result<(), Error> {
        for row in self.channels().await {
            if row.last() == Some(&call.id) {
                self.hangup(&row[0]).await?;
            }
        }
        Ok(())
    }

    /// Hang up every channel.
    pub async fn hangup_all(&self) {
        // "No such channel" when there are none: nothing to do.
        let _ = self.hangup("/.*/").await;
    }

    /// Wait until no channel is left (e.g. after the dialplan hung up),
    /// or `timeout`; returns whether none is left.
    pub async fn wait_no_channels(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.channels().await.is_empty() {
                return true;
            }
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stop Asterisk now (Drop does the same): `core stop now`, then
    /// SIGTERM and SIGKILL to its process group after a short grace. The
    /// directory stays until the value is dropped.
    ///
    /// A clean stop takes about 0.9 s: Asterisk's shutdown joins the
    /// astdb sync thread, which sleeps in 1 s steps. The grace after
    /// `core stop now` covers that on a loaded machine; SIGTERM (the same
    /// shutdown, started from Asterisk's signal thread) and SIGKILL are
    /// there in case the command never ran (seen once in ~100 stops).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        self.ami.close();
        // A blocking AMI session of its own: this runs in Drop, where the
        // async connection cannot be awaited. The socket stays open until
        // Asterisk is gone: closing it with the command unread could
        // reset the connection and lose the command.
        let _session = self.blocking_stop_command();
        if !wait_exit(&mut child, Duration::from_secs(3)) {
            signal_group(&child, libc::SIGTERM);
            if !wait_exit(&mut child, Duration::from_secs(2)) {
                signal_group(&child, libc::SIGKILL);
                let _ = child.wait();
            }
        }
        // ExternalIVR children left behind (Asterisk does not kill them
        // when a call ends) are still in the group.
        signal_group(&child, libc::SIGKILL);
    }

    fn blocking_stop_command(&self) -> Option<std::net::TcpStream> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        stream
            .write_all(
                format!(
                    "Action: Login\r\nUsername: {USERNAME}\r\nSecret: {}\r\nEvents: off\r\n\r\n\
                     Action: Command\r\nCommand: core stop now\r\n\r\n",
                    self.secret
                )
                .as_bytes(),
            )
            .ok()?;
        Some(stream)
    }
}

impl Drop for Asterisk {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_exit(child: &mut Child, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => return false,
        }
    }
}

fn signal_group(child: &Child, sig: libc::c_int) {
    // The group id is Asterisk's pid (process_group(0)). The group lives
    // on after Asterisk exits while any of its children do.
    unsafe {
        libc::kill(-(child.id() as libc::pid_t), sig);
    }
}

/// Kill a start attempt that failed.
fn kill_group(child: &mut Child) {
    signal_group(child, libc::SIGKILL);
    let _ = child.wait();
}

/// What the caller half (`;1`) of an originated Local channel does once
/// the PBX half answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerSide {
    /// Run one application, e.g. `Wait` with `30`.
    App { app: String, data: String },
    /// Run the dialplan from `exten` in `context` (priority 1 unless
    /// changed), e.g. a caller context that sends DTMF and hangs up.
    Exten {
        context: String,
        exten: String,
        priority: u32,
    },
}

/// A call to start with [`Asterisk::originate`].
#[derive(Debug, Clone)]
pub struct Originate {
    /// `Local/EXTEN@CONTEXT`: its `;2` half runs the dialplan under test.
    pub channel: String,
    pub caller_num: String,
    pub caller_name: String,
    /// What the caller half does (default: `Wait(60)`, a caller that
    /// listens until the PBX side hangs up).
    pub caller: CallerSide,
    /// Channel variables, set on the caller half and copied to the PBX
    /// half by the Local channel. Any value is passed literally.
    pub variables: Vec<(String, String)>,
    /// How long the PBX side may take to answer.
    pub answer_timeout: Duration,
    /// `true` (default): return once Asterisk queued the call. `false`:
    /// return once the PBX side answered.
    pub asynchronous: bool,
}

impl Originate {
    pub fn new(channel: &str) -> Originate {
        Originate {
            channel: channel.to_owned(),
            caller_num: String::new(),
            caller_name: String::new(),
            caller: CallerSide::App {
                app: "Wait".to_owned(),
                data: "60".to_owned(),
            },
            variables: Vec::new(),
            answer_timeout: Duration::from_secs(30),
            asynchronous: true,
        }
    }

    /// The caller's number and name, as `CALLERID(num)`/`CALLERID(name)`
    /// on both halves (see the module doc for what Asterisk changes).
    pub fn caller_id(mut self, num: &str, name: &str) -> Originate {
        self.caller_num = num.to_owned();
        self.caller_name = name.to_owned();
        self
    }

    /// The caller half runs `app(data)`.
    pub fn app(mut self, app: &str, data: &str) -> Originate {
        self.caller = CallerSide::App {
            app: app.to_owned(),
            data: data.to_owned(),
        };
        self
    }

    /// The caller half runs `exten@context` from priority 1.
    pub fn exten(mut self, context: &str, exten: &str) -> Originate {
        self.caller = CallerSide::Exten {
            context: context.to_owned(),
            exten: exten.to_owned(),
            priority: 1,
        };
        self
    }

    /// A channel variable for both halves.
    pub fn var(mut self, name: &str, value: &str) -> Originate {
        self.variables.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Return only once the PBX side answered.
    pub fn wait_answer(mut self) -> Originate {
        self.asynchronous = false;
        self
    }
}

/// An originated call: the unique ids of its two halves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The caller half (`;1`): also the `Linkedid` of every channel of
    /// the call.
    pub id: String,
    /// The PBX half (`;2`), where the dialplan under test runs.
    pub pbx_id: String,
}

impl Call {
    /// Whether an AMI event is about one of this call's channels.
    pub fn owns(&self, event: &Event) -> bool {
        let is = |key: &str, id: &str| event.get(key).is_some_and(|v| v == id);
        is("Uniqueid", &self.id) || is("Uniqueid", &self.pbx_id) || is("Linkedid", &self.id)
    }
}

/// `"Name" <num>` for AMI's CallerID header. Asterisk's parser
/// (`ast_callerid_parse`) takes a quoted name with `\"` and `\\` escapes,
/// so any name without line breaks survives. None when both are empty.
fn caller_id_header(num: &str, name: &str) -> Result<Option<String>, Error> {
    if num.contains(['<', '>', '"', '\\', '\r', '\n']) {
        return Err(Error::new(format!(
            "caller number {num:?}: Originate cannot carry <, >, \", \\ or line breaks"
        )));
    }
    if name.contains(['\r', '\n']) {
        return Err(Error::new(
            "caller name with a line break: AMI headers cannot carry it",
        ));
    }
    if num.is_empty() && name.is_empty() {
        return Ok(None);
    }
    let quoted = name.replace('\\', "\\\\").replace('"', "\\\"");
    let header = format!("\"{quoted}\" <{num}>");
    // action_originate copies the header into `char tmp2[256]`: longer
    // ones lose their end, number included.
    if header.len() > 255 {
        return Err(Error::new(format!(
            "caller ID of {} bytes: Asterisk's Originate keeps only 255 \
             (pass long values as a variable)",
            header.len()
        )));
    }
    Ok(Some(header))
}

/// Escape a value for an AMI `Variable:` header, which Asterisk splits
/// like application arguments (on commas, minding quotes, brackets and
/// parentheses): a backslash makes any character literal.
fn escape_arg(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '\\' | '"' | ',' | '(' | ')' | '[' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `dir/name.sln`: `duration` of 8 kHz signed 16-bit little-endian mono,
/// a 440 Hz tone of `amplitude` (0 for silence; 1000 is quiet).
fn write_sound(dir: &Path, name: &str, duration: Duration, amplitude: i16) -> Result<(), Error> {
    let path = safe_join(dir, &format!("{name}.sln"))?;
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| Error::new(format!("create {}: {e}", parent.display())))?;
    }
    let samples = (duration.as_secs_f64() * 8000.0).round() as usize;
    let mut data = Vec::with_capacity(samples * 2);
    for i in 0..samples {
        let t = i as f64 / 8000.0;
        let v = (f64::from(amplitude) * (2.0 * std::f64::consts::PI * 440.0 * t).sin()) as i16;
        data.extend_from_slice(&v.to_le_bytes());
    }
    fs::write(&path, data).map_err(|e| Error::new(format!("write {}: {e}", path.display())))
}

/// `dir/name`, refusing names that would leave `dir`.
fn safe_join(dir: &Path, name: &str) -> Result<PathBuf, Error> {
    let rel = Path::new(name);
    let ok = !name.is_empty()
        && rel
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok {
        Ok(dir.join(rel))
    } else {
        Err(Error::new(format!("{name:?} is not a plain relative path")))
    }
}

fn write_private(path: &Path, contents: &[u8]) -> Result<(), Error> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents))
        .map_err(|e| Error::new(format!("write {}: {e}", path.display())))
}

fn random_hex(bytes: usize) -> Result<String, Error> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::new(format!("/dev/urandom: {e}")))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// What in Asterisk's output says why it stopped: the lines that
/// complain, then the last few (start-up output is mostly hundreds of
/// lines of registrations).
fn complaints(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let complaining = |l: &&&str| {
        let l = l.to_ascii_lowercase();
        [
            "error",
            "warning",
            "fail",
            "unable",
            "cannot",
            "could not",
            "no such",
            "exiting",
        ]
        .iter()
        .any(|w| l.contains(w))
    };
    let mut out: Vec<&str> = lines.iter().filter(complaining).take(20).copied().collect();
    out.push("...");
    out.extend(&lines[lines.len().saturating_sub(5)..]);
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_id_quotes_the_name() {
        assert_eq!(
            caller_id_header("+4930", r#"Smith, "J" \ (x)"#).unwrap(),
            Some(r#""Smith, \"J\" \\ (x)" <+4930>"#.to_owned())
        );
        assert_eq!(caller_id_header("", "").unwrap(), None);
        assert!(caller_id_header("1>2", "x").is_err());
        assert!(caller_id_header("1", "a\nb").is_err());
        // `"` + 250 + `" <1>` = 256 bytes
        assert!(caller_id_header("1", &"x".repeat(250)).is_err());
        assert!(caller_id_header("1", &"x".repeat(249)).is_ok());
    }

    #[test]
    fn variable_values_are_escaped() {
        assert_eq!(escape_arg(r#"a,b"(c)\"#), r#"a\,b\"\(c\)\\"#);
    }

    #[test]
    fn paths_stay_inside() {
        assert!(safe_join(Path::new("/x"), "a/b.conf").is_ok());
        assert!(safe_join(Path::new("/x"), "../b").is_err());
        assert!(safe_join(Path::new("/x"), "/etc/passwd").is_err());
    }
}
