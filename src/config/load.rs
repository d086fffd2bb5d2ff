//! From parsed sections to a validated [`Config`].
//!
//! Everything is checked up front and every problem is collected, each with
//! the file and line it comes from, so one run of `popivr check` shows the
//! admin all of them. Secrets never appear in a message.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::ini::{
    Entry, Ini, IniError, IniErrorKind, Location, Section, edit_distance, parse_ini, parse_ini_str,
};
use super::{
    Account, Action, ActionKind, Agent, Config, General, Group, Mode, Nobody, PresencePolicy,
    Profile, ReplyRule, Room,
};
use crate::call as calldata;
use crate::forward;
use crate::template::{self, Placeholder};

/// Channel variables read when a profile names none: those the shipped
/// `popivr-calldata` dialplan context sets.
pub const DEFAULT_VARIABLES: [&str; 5] = [
    calldata::CALLER_NUM,
    calldata::CALLER_NAME,
    calldata::EXTEN,
    calldata::DNID,
    calldata::UNIQUEID,
];
/// Names Asterisk computes (`pbx_retrieve_variable`): `G` reads them, like
/// any dialplan function, as empty.
const COMPUTED: &[&str] = &[
    "CALLERID",
    "CALLERIDNUM",
    "CALLERIDNAME",
    "CALLINGPRES",
    "CALLINGANI2",
    "CALLINGTON",
    "CALLINGTNS",
    "DNID",
    "RDNIS",
    "EXTEN",
    "CONTEXT",
    "PRIORITY",
    "CHANNEL",
    "UNIQUEID",
    "HANGUPCAUSE",
    "LANGUAGE",
    "ACCOUNTCODE",
    "HINT",
    "HINTNAME",
    "EPOCH",
    "SYSTEMNAME",
    "ENTITYID",
];
/// Hold audio when a profile names none.
pub const DEFAULT_HOLD: &str = "silence/1";
pub const DEFAULT_CONFIRM: &str = "Call from $caller$: $outcome$";
/// Sent to the other agents when one took the call.
pub const DEFAULT_TAKEN: &str = "Call from $caller$ was taken by $agent$: $outcome$";
/// The missed-call notice.
pub const DEFAULT_MISSED: &str = "Missed call from $caller$ $caller_name$ to $number$.";
/// How long presence may take to come in after login.
const DEFAULT_PRESENCE_WAIT: Duration = Duration::from_millis(1500);
const MAX_NICK: usize = 64;
const DEFAULT_TEMPLATE_HEAD: &str = "Call from $caller_name$ <$caller$> to $number$.";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_DEFAULT_LABEL: &str = "timeout";
const DEFAULT_PORT: u16 = 5222;
const DEFAULT_ACCOUNT_TIMEOUT: Duration = Duration::from_secs(5);
/// No timeout may be longer than a day.
const MAX_SECONDS: f64 = 86_400.0;
const MAX_LABEL: usize = 32;
const MAX_WORD: usize = 32;
const MAX_SOUND: usize = 255;
const MAX_VAR_NAME: usize = 128;
const MAX_HEADER: usize = 64;
const MAX_VALUE_NAME: usize = 32;
const MAX_JID_PART: usize = 1023;

const GENERAL_KEYS: &[&str] = &["xmpp_conf"];
const CLIENT_KEYS: &[&str] = &[
    "type",
    "serverhost",
    "username",
    "secret",
    "port",
    "usetls",
    "usesasl",
    "allow_plaintext",
    "ca_file",
    "timeout",
    "statusmessage",
    "forceoldssl",
    "refresh_token",
    "oauth_clientid",
    "oauth_secret",
];
/// `xmpp.conf` client keys that mean nothing to popivr.
const CLIENT_IGNORED: &[&str] = &[
    "buddy",
    "debug",
    "keepalive",
    "autoprune",
    "autoregister",
    "auth_policy",
    "sendtodialplan",
    "context",
    "priority",
    "distribute_events",
    "status",
    "pubsub_node",
];
const PROFILE_KEYS: &[&str] = &[
    "type",
    "account",
    "targets",
    "hold",
    "variables",
    "sip_headers",
    "template",
    "confirm",
    "help",
    "reply",
    "key",
    "timeout",
    "default",
    "forward_allow",
    "mode",
    "presence",
    "nobody",
    "presence_wait",
    "late_reply",
    "taken",
    "missed",
    "url",
    "room",
    "nick",
    "room_allow",
];
const AGENT_KEYS: &[&str] = &["type", "jid", "value", "exten", "priority"];
const GROUP_KEYS: &[&str] = &["type", "members"];
/// Keys that may be given several times; all of them count.
const REPEATABLE: &[&str] = &["reply", "key", "value"];

/// What is wrong, without where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProblemKind {
    #[error(transparent)]
    Ini(#[from] IniErrorKind),
    #[error("[{section}]: unknown key `{key}`{hint}")]
    UnknownKey {
        section: String,
        key: String,
        hint: String,
    },
    #[error("[{section}]: `{key}` is required{why}")]
    Missing {
        section: String,
        key: String,
        why: String,
    },
    #[error("[{section}] {key}: {reason}")]
    Invalid {
        section: String,
        key: String,
        reason: String,
    },
    #[error("[{section}]: {reason}")]
    Section { section: String, reason: String },
}

/// One problem and where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {kind}")]
pub struct Problem {
    pub at: Location,
    pub kind: ProblemKind,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "{one}"),
            all => {
                write!(f, "{} problems in the configuration:", all.len())?;
                for p in all {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConfigError {}

impl From<Vec<IniError>> for ConfigError {
    fn from(errors: Vec<IniError>) -> Self {
        let problems = errors
            .into_iter()
            .map(|e| Problem {
                at: e.at,
                kind: ProblemKind::Ini(e.kind),
            })
            .collect();
        ConfigError { problems }
    }
}

/// Why a JID is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    #[error("not a JID: expected local@domain")]
    NoAt,
    #[error("the part before `@` is empty")]
    EmptyLocal,
    #[error("the part before `@` may not hold {0:?}")]
    BadLocal(char),
    #[error("the domain is not a valid host name")]
    BadDomain,
    #[error("a resource (`/…`) is not allowed here: give the bare JID")]
    Resource,
    #[error("the resource after `/` is empty or holds a control character")]
    BadResource,
    #[error("a JID part is longer than {MAX_JID_PART} bytes")]
    TooLong,
    /// The XMPP rules for JIDs (RFC 7622 stringprep, IDNA) refuse it.
    #[error("not a valid JID: {0}")]
    Invalid(String),
}

struct Jid<'a> {
    resource: Option<&'a str>,
    /// The JID as servers compare it: stringprep (nodeprep, nameprep,
    /// resourceprep) applied by the `jid` crate.
    prepped: xmpp_parsers::jid::Jid,
}

fn parse_jid(s: &str) -> Result<Jid<'_>, JidError> {
    let s = s.trim();
    let (bare, resource) = match s.split_once('/') {
        Some((b, r)) => (b, Some(r)),
        None => (s, None),
    };
    let (local, domain) = bare.split_once('@').ok_or(JidError::NoAt)?;
    if local.is_empty() {
        return Err(JidError::EmptyLocal);
    }
    if [local, domain, resource.unwrap_or("")]
        .iter()
        .any(|p| p.len() > MAX_JID_PART)
    {
        return Err(JidError::TooLong);
    }
    if let Some(c) = local
        .chars()
        .find(|&c| c.is_whitespace() || c.is_control() || "\"&'/:<>@".contains(c))
    {
        return Err(JidError::BadLocal(c));
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if !domain_ok(domain) {
        return Err(JidError::BadDomain);
    }
    if resource.is_some_and(|r| r.is_empty() || r.chars().any(char::is_control)) {
        return Err(JidError::BadResource);
    }
    let text = match resource {
        Some(r) => format!("{local}@{domain}/{r}"),
        None => format!("{local}@{domain}"),
    };
    let prepped =
        xmpp_parsers::jid::Jid::new(&text).map_err(|e| JidError::Invalid(e.to_string()))?;
    Ok(Jid { resource, prepped })
}

fn domain_ok(domain: &str) -> bool {
    if let Some(ip) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) {
        return ip.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.chars().count() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_alphanumeric() || c == '-')
        })
}

/// The normalised form of a bare JID (`Alice@Example.ORG` →
/// `alice@example.org`), the form the `jid` crate gives every sender of a
/// stanza: the same stringprep profiles the servers apply, so a target
/// compares equal to exactly the senders the server takes for that
/// account. A resource, or anything that is not a JID, is refused.
pub fn normalize_jid(jid: &str) -> Result<String, JidError> {
    let j = parse_jid(jid)?;
    if j.resource.is_some() {
        return Err(JidError::Resource);
    }
    Ok(j.prepped.to_bare().to_string())
}

/// Reads and checks a configuration file (with its includes and, if it
/// says so, an `xmpp.conf`).
pub fn load_file(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let ini = parse_ini(path)?;
    build(ini)
}

/// Checks configuration text. `origin` names it in messages, and relative
/// paths (`#include`, `xmpp_conf`, `ca_file`) start from its directory.
pub fn load_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
    let ini = parse_ini_str(text, origin)?;
    build(ini)
}

#[derive(Default)]
struct Sink {
    problems: Vec<Problem>,
    warnings: Vec<String>,
}

impl Sink {
    fn problem(&mut self, at: &Location, kind: ProblemKind) {
        self.problems.push(Problem {
            at: at.clone(),
            kind,
        });
    }

    fn invalid(&mut self, s: &Section, e: &Entry, reason: impl fmt::Display) {
        self.problem(
            &e.at,
            ProblemKind::Invalid {
                section: s.name.clone(),
                key: e.key.clone(),
                reason: reason.to_string(),
            },
        );
    }

    fn missing(&mut self, s: &Section, key: &str, why: &str) {
        self.problem(
            &s.at,
            ProblemKind::Missing {
                section: s.name.clone(),
                key: key.to_string(),
                why: why.to_string(),
            },
        );
    }

    fn section(&mut self, s: &Section, reason: impl fmt::Display) {
        self.problem(
            &s.at,
            ProblemKind::Section {
                section: s.name.clone(),
                reason: reason.to_string(),
            },
        );
    }

    fn warn(&mut self, at: &Location, text: impl fmt::Display) {
        self.warnings.push(format!("{at}: {text}"));
    }

    fn absorb(&mut self, other: Sink) {
        self.problems.extend(other.problems);
        self.warnings.extend(other.warnings);
    }
}

/// A path written in `base_file`: relative ones start from its directory.
fn resolve(base_file: &str, value: &str) -> PathBuf {
    let dir = Path::new(base_file).parent().unwrap_or(Path::new(""));
    dir.join(value)
}

/// An account from xmpp.conf, parsed on its own: its problems only count if
/// a profile uses it.
struct Imported {
    /// The account and where its secret is.
    account: Option<(Account, Location)>,
    sink: Sink,
    at: Location,
}

/// The client sections of an xmpp.conf. Trouble reading the file itself
/// is reported at the `xmpp_conf` line.
fn import_xmpp(
    path: &Path,
    entry: Option<&Entry>,
    files: &mut Vec<PathBuf>,
    sink: &mut Sink,
) -> BTreeMap<String, Imported> {
    let mut imported = BTreeMap::new();
    let ini = match parse_ini(path) {
        Ok(ini) => ini,
        Err(errors) => {
            for mut p in ConfigError::from(errors).problems {
                if let Some(e) = entry.filter(|_| p.at.line == 0) {
                    p.at = e.at.clone();
                    if let ProblemKind::Ini(IniErrorKind::Io(why)) = &mut p.kind {
                        *why = format!("{}: {why}", path.display());
                    }
                }
                sink.problems.push(p);
            }
            return imported;
        }
    };
    files.extend(ini.files.iter().cloned());
    for s in ini
        .sections
        .iter()
        .filter(|s| !s.template && !is_general(s))
    {
        let is_client = s
            .get("type")
            .is_some_and(|t| t.value.eq_ignore_ascii_case("client"));
        if is_client {
            let mut own = Sink::default();
            let account = account(s, &mut own, false);
            let at = s.at.clone();
            imported.insert(
                s.name.clone(),
                Imported {
                    account,
                    sink: own,
                    at,
                },
            );
        }
    }
    imported
}

fn build(ini: Ini) -> Result<Config, ConfigError> {
    let mut sink = Sink::default();
    let mut config = Config::default();
    let mut files: Vec<PathBuf> = ini.files.clone();
    // Where each account's secret is written, to check who can read it.
    let mut secrets: BTreeMap<String, Location> = BTreeMap::new();
    let sections: Vec<&Section> = ini.sections.iter().filter(|s| !s.template).collect();

    let mut xmpp_entry = None;
    for s in sections.iter().filter(|s| is_general(s)) {
        config.general = general(s, &mut sink);
        xmpp_entry = s.get("xmpp_conf");
    }
    let imported = match &config.general.xmpp_conf {
        Some(path) => import_xmpp(path, xmpp_entry, &mut files, &mut sink),
        None => BTreeMap::new(),
    };

    let mut profile_sections = Vec::new();
    let mut agent_sections = Vec::new();
    let mut group_sections = Vec::new();
    let mut own_accounts = BTreeSet::new();
    for s in sections.iter().copied().filter(|s| !is_general(s)) {
        let Some(t) = s.get("type") else {
            sink.section(
                s,
                "has no `type`: set `type = client`, `type = profile`, `type = agent` \
                 or `type = group`",
            );
            continue;
        };
        match t.value.to_ascii_lowercase().as_str() {
            "client" => {
                own_accounts.insert(s.name.as_str());
                if let Some((a, at)) = account(s, &mut sink, true) {
                    secrets.insert(s.name.clone(), at);
                    config.accounts.insert(s.name.clone(), a);
                }
            }
            "profile" => profile_sections.push(s),
            "agent" => agent_sections.push(s),
            "group" => group_sections.push(s),
            "component" => sink.invalid(s, t, "XMPP components are not supported"),
            _ => sink.invalid(s, t, "expected `client`, `profile`, `agent` or `group`"),
        }
    }

    let used: BTreeSet<&str> = profile_sections
        .iter()
        .filter_map(|s| s.get("account"))
        .map(|e| e.value.as_str())
        .collect();
    for (name, (a, at)) in take_imported(imported, &own_accounts, &used, &mut sink) {
        secrets.insert(name.clone(), at);
        config.accounts.insert(name, a);
    }

    for s in agent_sections {
        if let Some(a) = agent(s, &mut sink) {
            match config.agents.get(&a.jid) {
                Some(other) => sink.section(
                    s,
                    format_args!("agent {} is already defined at {}", a.jid, other.origin),
                ),
                None => {
                    config.agents.insert(a.jid.clone(), a);
                }
            }
        }
    }
    for s in group_sections {
        if let Some(g) = group(s, &mut sink) {
            config.groups.insert(g.name.clone(), g);
        }
    }
    let custom: BTreeSet<&str> = config
        .agents
        .values()
        .flat_map(|a| a.values.keys().map(String::as_str))
        .collect();

    let mut profiles = BTreeMap::new();
    for s in profile_sections {
        if let Some(p) = profile(s, &custom, &config.groups, &mut sink) {
            if !p.account.is_empty() && !config.accounts.contains_key(&p.account) {
                let e = s.get("account").expect("a named account has an entry");
                sink.invalid(
                    s,
                    e,
                    format_args!(
                        "no usable account [{}]: define a `type = client` section, \
                         or import an xmpp.conf with `xmpp_conf` in [general]",
                        p.account
                    ),
                );
            }
            profiles.insert(p.name.clone(), p);
        }
    }
    config.profiles = profiles;

    warn_readable_secrets(&secrets, &files, &mut sink);

    let mut seen = HashSet::new();
    sink.problems.retain(|p| seen.insert(p.to_string()));
    let mut seen = HashSet::new();
    sink.warnings.retain(|w| seen.insert(w.clone()));
    if sink.problems.is_empty() {
        config.warnings = sink.warnings;
        Ok(config)
    } else {
        Err(ConfigError {
            problems: sink.problems,
        })
    }
}

/// The accounts imported from xmpp.conf that popivr takes: popivr.conf's
/// own sections win by name, and the problems of one only count if a
/// profile (`used`) names it; one nobody uses and popivr cannot use is left
/// out with a warning.
fn take_imported(
    imported: BTreeMap<String, Imported>,
    own: &BTreeSet<&str>,
    used: &BTreeSet<&str>,
    sink: &mut Sink,
) -> Vec<(String, (Account, Location))> {
    let mut taken = Vec::new();
    for (name, parsed) in imported {
        if own.contains(name.as_str()) {
            continue;
        }
        if used.contains(name.as_str()) || parsed.sink.problems.is_empty() {
            sink.absorb(parsed.sink);
            if let Some(account) = parsed.account {
                taken.push((name, account));
            }
        } else {
            let first = &parsed.sink.problems[0];
            sink.warn(
                &parsed.at,
                format_args!(
                    "[{name}] is left out: popivr cannot use it ({}: {}), and no profile does",
                    first.at, first.kind
                ),
            );
        }
    }
    taken
}

fn is_general(s: &Section) -> bool {
    s.name.eq_ignore_ascii_case("general")
}

/// Secrets in files that others can read.
fn warn_readable_secrets(secrets: &BTreeMap<String, Location>, files: &[PathBuf], sink: &mut Sink) {
    let mut warned = BTreeSet::new();
    for (name, at) in secrets {
        let on_disk = files.iter().any(|f| f.display().to_string() == at.file);
        if !on_disk || !warned.insert(at.file.clone()) {
            continue;
        }
        if let Some(mode) = others_can_read(Path::new(&at.file)) {
            sink.warn(
                at,
                format_args!(
                    "the secret of [{}] is in a file others can read (mode {mode:o}); \
                     run `chmod o-r {}`",
                    name, at.file
                ),
            );
        }
    }
}

#[cfg(unix)]
fn others_can_read(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o004 != 0).then_some(mode)
}

#[cfg(not(unix))]
fn others_can_read(_path: &Path) -> Option<u32> {
    None
}

/// Unknown keys are errors; `ignored` ones get a warning if `warn_ignored`;
/// a single-valued key set twice in the section itself gets a warning.
fn check_keys(s: &Section, known: &[&str], ignored: &[&str], warn_ignored: bool, sink: &mut Sink) {
    let mut first: BTreeMap<&str, &Location> = BTreeMap::new();
    for e in &s.entries {
        let key = e.key.as_str();
        if ignored.contains(&key) {
            if warn_ignored {
                sink.warn(
                    &e.at,
                    format_args!(
                        "[{}] `{key}` is an xmpp.conf key popivr does not use",
                        s.name
                    ),
                );
            }
            continue;
        }
        if !known.contains(&key) {
            let hint = closest(key, known)
                .map(|k| format!(" (did you mean `{k}`?)"))
                .unwrap_or_default();
            let kind = ProblemKind::UnknownKey {
                section: s.name.clone(),
                key: key.to_string(),
                hint,
            };
            sink.problem(&e.at, kind);
            continue;
        }
        if REPEATABLE.contains(&key) || e.inherited_from.is_some() {
            continue;
        }
        if let Some(prev) = first.insert(key, &e.at) {
            sink.warn(
                &e.at,
                format_args!(
                    "[{}] `{key}` is also set at {prev}; this later one counts",
                    s.name
                ),
            );
        }
    }
}

/// The known key nearest to a misspelt one, if it is close.
fn closest<'a>(key: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|&(d, _)| d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn bool_value(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "yes" | "true" | "y" | "t" | "1" | "on" => Some(true),
        "no" | "false" | "n" | "f" | "0" | "off" => Some(false),
        _ => None,
    }
}

/// Positive seconds, decimals allowed, at most a day.
fn seconds(v: &str) -> Result<Duration, String> {
    let shape_ok = {
        let (int, frac) = v.split_once('.').unwrap_or((v, "0"));
        !int.is_empty()
            && !frac.is_empty()
            && int.bytes().all(|b| b.is_ascii_digit())
            && frac.bytes().all(|b| b.is_ascii_digit())
    };
    let secs: f64 = match v.parse() {
        Ok(s) if shape_ok => s,
        _ => return Err(format!("`{v}` is not a number of seconds")),
    };
    if secs <= 0.0 {
        return Err("must be more than 0 seconds".into());
    }
    if secs > MAX_SECONDS {
        return Err(format!("must be at most {MAX_SECONDS} seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A comma-separated list; an empty value is an empty list.
fn items(v: &str) -> Result<Vec<&str>, String> {
    if v.trim().is_empty() {
        return Ok(Vec::new());
    }
    let items: Vec<&str> = v.split(',').map(str::trim).collect();
    if items.iter().any(|i| i.is_empty()) {
        return Err("the list has an empty item".into());
    }
    Ok(items)
}

/// Splits on commas outside parentheses (`PJSIP_HEADER(read,X), EXTEN`).
fn split_top_level(v: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in v.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(v[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(v[start..].trim());
    out
}

fn label_ok(l: &str) -> bool {
    (1..=MAX_LABEL).contains(&l.len())
        && l.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn sound_ok(f: &str) -> bool {
    (1..=MAX_SOUND).contains(&f.len())
        && f.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_/.-".contains(&b))
}

fn header_ok(h: &str) -> bool {
    (1..=MAX_HEADER).contains(&h.len())
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn value_name_ok(n: &str) -> bool {
    (1..=MAX_VALUE_NAME).contains(&n.len())
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// A channel variable or function name as `G` reads it: one name per `G`,
/// so no comma outside parentheses, and nothing Asterisk would evaluate.
fn var_name_check(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_VAR_NAME {
        return Err(format!("variable names are 1 to {MAX_VAR_NAME} characters"));
    }
    if let Some(c) = v
        .chars()
        .find(|&c| c.is_whitespace() || c.is_control() || "=${}".contains(c))
    {
        return Err(format!("variable `{v}` may not hold {c:?}"));
    }
    let mut depth = 0i32;
    for c in v.chars() {
        depth += match c {
            '(' => 1,
            ')' => -1,
            _ => 0,
        };
        if depth < 0 {
            break;
        }
    }
    if depth != 0 {
        return Err(format!("variable `{v}` has unbalanced parentheses"));
    }
    Ok(())
}

/// Text the admin wrote for a message: any printable text.
fn text_check(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("is empty".into());
    }
    if t.chars().any(|c| c.is_control() && c != '\t') {
        return Err("holds a control character".into());
    }
    Ok(())
}

fn general(s: &Section, sink: &mut Sink) -> General {
    check_keys(s, GENERAL_KEYS, &[], false, sink);
    let mut g = General::default();
    if let Some(e) = s.get("xmpp_conf") {
        if e.value.is_empty() {
            sink.invalid(s, e, "is empty");
        } else {
            g.xmpp_conf = Some(resolve(&e.at.file, &e.value));
        }
    }
    g
}

/// The account, and where its secret is written.
fn account(s: &Section, sink: &mut Sink, warn_ignored: bool) -> Option<(Account, Location)> {
    let before = sink.problems.len();
    check_keys(s, CLIENT_KEYS, CLIENT_IGNORED, warn_ignored, sink);

    let username = match s.get("username") {
        None => {
            sink.missing(
                s,
                "username",
                " (the account's JID, like pbx@example.org/popivr)",
            );
            String::new()
        }
        Some(e) => match parse_jid(&e.value) {
            Ok(_) => e.value.clone(),
            Err(err) => {
                sink.invalid(s, e, err);
                String::new()
            }
        },
    };
    let (secret, secret_at) = match s.get("secret") {
        Some(e) if !e.value.is_empty() => (e.value.clone(), Some(e.at.clone())),
        Some(e) => {
            sink.invalid(s, e, "is empty");
            (String::new(), None)
        }
        None => {
            sink.missing(s, "secret", "");
            (String::new(), None)
        }
    };
    let serverhost = s.get("serverhost").and_then(|e| {
        let host = e.value.trim_start_matches('[').trim_end_matches(']');
        let ok = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<std::net::IpAddr>().is_ok() || domain_ok(host));
        if !ok {
            sink.invalid(s, e, "is not a host name or IP address");
        }
        ok.then(|| e.value.clone())
    });
    let port = match s.get("port") {
        None => DEFAULT_PORT,
        Some(e) => match e.value.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                sink.invalid(s, e, "must be a port number, 1 to 65535");
                DEFAULT_PORT
            }
        },
    };
    let (usetls, usesasl, allow_plaintext) = login_security(s, sink);
    let ca_file = s.get("ca_file").and_then(|e| {
        let p = resolve(&e.at.file, &e.value);
        if e.value.is_empty() || !p.is_file() {
            sink.invalid(s, e, format_args!("no such file: {}", p.display()));
            return None;
        }
        Some(p)
    });
    let timeout = seconds_key(s, "timeout", DEFAULT_ACCOUNT_TIMEOUT, sink);
    let statusmessage = s.get("statusmessage").map(|e| {
        if let Err(r) = text_check(&e.value) {
            sink.invalid(s, e, r);
        }
        e.value.clone()
    });

    let account = Account {
        name: s.name.clone(),
        username,
        secret,
        serverhost,
        port,
        usetls,
        usesasl,
        allow_plaintext,
        ca_file,
        statusmessage,
        timeout,
        origin: s.at.to_string(),
    };
    match secret_at {
        Some(at) if sink.problems.len() == before => Some((account, at)),
        _ => None,
    }
}

/// How an account logs in: `usetls`, `usesasl`, `allow_plaintext`, with
/// the login ways popivr refuses (plaintext without the second key, the
/// old non-SASL login, direct TLS, OAuth) named.
fn login_security(s: &Section, sink: &mut Sink) -> (bool, bool, bool) {
    let flag = |sink: &mut Sink, key: &str, default: bool| -> bool {
        match s.get(key) {
            None => default,
            Some(e) => bool_value(&e.value).unwrap_or_else(|| {
                sink.invalid(s, e, format_args!("`{}` is not yes or no", e.value));
                default
            }),
        }
    };
    let usetls = flag(sink, "usetls", true);
    let usesasl = flag(sink, "usesasl", true);
    let allow_plaintext = flag(sink, "allow_plaintext", false);
    if let Some(e) = s.get("usesasl").filter(|_| !usesasl) {
        sink.invalid(
            s,
            e,
            "popivr always logs in with SASL; the old non-SASL login is not supported",
        );
    }
    if let Some(e) = s.get("usetls").filter(|_| !usetls && !allow_plaintext) {
        sink.invalid(
            s,
            e,
            "`usetls = no` sends the password unencrypted; \
             add `allow_plaintext = yes` to allow that (trusted networks only)",
        );
    }
    if let Some(e) = s
        .get("forceoldssl")
        .filter(|_| flag(sink, "forceoldssl", false))
    {
        sink.invalid(
            s,
            e,
            "direct TLS is not supported; use STARTTLS (`usetls = yes`, usually port 5222)",
        );
    }
    for key in ["refresh_token", "oauth_clientid", "oauth_secret"] {
        if let Some(e) = s.get(key).filter(|e| !e.value.is_empty()) {
            sink.invalid(s, e, "OAuth login is not supported; use `secret`");
        }
    }
    (usetls, usesasl, allow_plaintext)
}

fn agent(s: &Section, sink: &mut Sink) -> Option<Agent> {
    let before = sink.problems.len();
    check_keys(s, AGENT_KEYS, &[], false, sink);
    let (jid_text, jid_at) = match s.get("jid") {
        Some(e) => (e.value.as_str(), &e.at),
        None => (s.name.as_str(), &s.at),
    };
    let jid = normalize_jid(jid_text).unwrap_or_else(|err| {
        let kind = ProblemKind::Invalid {
            section: s.name.clone(),
            key: "jid".into(),
            reason: format!("{err} (without `jid`, the section name is the JID)"),
        };
        sink.problem(jid_at, kind);
        String::new()
    });
    let mut values = BTreeMap::new();
    for e in s.all("value") {
        let Some((name, text)) = e.value.split_once('=') else {
            sink.invalid(s, e, "expected `value = NAME=TEXT`");
            continue;
        };
        let (name, text) = (name.trim(), text.trim());
        if !value_name_ok(name) {
            sink.invalid(
                s,
                e,
                format_args!("`{name}`: names are 1 to {MAX_VALUE_NAME} of A-Z a-z 0-9 _"),
            );
        } else if template::BUILTIN.contains(&name) {
            sink.invalid(s, e, format_args!("`${name}$` is a built-in placeholder"));
        } else if let Err(r) = text_check(text) {
            sink.invalid(s, e, format_args!("`{name}` {r}"));
        } else {
            // Later ones (the section's own after inherited) win.
            values.insert(name.to_string(), text.to_string());
        }
    }
    let exten = s.get("exten").and_then(|e| {
        let ok = (1..=MAX_LABEL).contains(&e.value.len())
            && e.value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"*#+_-".contains(&b));
        if !ok {
            sink.invalid(s, e, "use 1 to 32 of A-Z a-z 0-9 * # + _ -");
        }
        ok.then(|| e.value.clone())
    });
    let priority = match s.get("priority") {
        None => 0,
        Some(e) => e.value.parse::<i32>().unwrap_or_else(|_| {
            sink.invalid(s, e, "expected a whole number (lower goes first)");
            0
        }),
    };
    (sink.problems.len() == before).then(|| Agent {
        name: s.name.clone(),
        jid,
        values,
        exten,
        priority,
        origin: s.at.to_string(),
    })
}

fn group(s: &Section, sink: &mut Sink) -> Option<Group> {
    let before = sink.problems.len();
    check_keys(s, GROUP_KEYS, &[], false, sink);
    let mut members = Vec::new();
    match s.get("members") {
        None => sink.missing(s, "members", ""),
        Some(e) => match items(&e.value) {
            Err(r) => sink.invalid(s, e, r),
            Ok(list) => {
                for m in list {
                    match normalize_jid(m) {
                        Err(err) => sink.invalid(s, e, format_args!("`{m}`: {err}")),
                        Ok(j) if members.contains(&j) => {}
                        Ok(j) => members.push(j),
                    }
                }
            }
        },
    }
    (sink.problems.len() == before).then(|| Group {
        name: s.name.clone(),
        members,
        origin: s.at.to_string(),
    })
}

/// `@group` in a target list: its members.
fn expand_group<'a>(
    name: &str,
    groups: &'a BTreeMap<String, Group>,
) -> Result<&'a [String], String> {
    groups
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, g)| g.members.as_slice())
        .ok_or_else(|| format!("no `type = group` section [{name}]"))
}

fn one_of<T: Copy>(s: &Section, key: &str, choices: &[(&str, T)], sink: &mut Sink) -> T {
    let default = choices[0].1;
    let Some(e) = s.get(key) else {
        return default;
    };
    let v = e.value.to_ascii_lowercase();
    match choices.iter().find(|(name, _)| *name == v) {
        Some((_, t)) => *t,
        None => {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            sink.invalid(s, e, format_args!("expected one of {}", names.join(", ")));
            default
        }
    }
}

fn nick_ok(n: &str) -> bool {
    !n.is_empty() && n.chars().count() <= MAX_NICK && !n.chars().any(char::is_control)
}

/// `continue LABEL [prompt FILE]` | `forward [NUMBER] [prompt FILE]` |
/// `hangup [prompt FILE]`.
fn parse_action(text: &str) -> Result<Action, String> {
    let mut words = text.split_whitespace().peekable();
    let verb = words
        .next()
        .ok_or("no action: expected `continue LABEL`, `forward [NUMBER]` or `hangup`")?;
    let is_prompt = |w: &&str| w.eq_ignore_ascii_case("prompt");
    let kind = match verb.to_ascii_lowercase().as_str() {
        "continue" => {
            let label = words.next().ok_or("`continue` needs a LABEL")?;
            if !label_ok(label) {
                return Err(format!(
                    "label `{label}`: use 1 to {MAX_LABEL} of A-Z a-z 0-9 _ -"
                ));
            }
            ActionKind::Continue(label.to_string())
        }
        "forward" => match words.next_if(|w| !is_prompt(w)) {
            None => ActionKind::Forward(None),
            Some(n) if forward::valid_number(n) => ActionKind::Forward(Some(n.to_string())),
            Some(n) => {
                return Err(format!(
                    "`{n}` is not a number (1 to {} of 0-9 * # +)",
                    forward::MAX_NUMBER_LEN
                ));
            }
        },
        "hangup" => ActionKind::Hangup,
        other => {
            return Err(format!(
                "unknown action `{other}`: expected `continue`, `forward` or `hangup`"
            ));
        }
    };
    let prompt = match words.next() {
        None => None,
        Some(w) if is_prompt(&w) => {
            let file = words.next().ok_or("`prompt` needs a sound file name")?;
            if !sound_ok(file) {
                return Err(format!(
                    "sound file `{file}`: use A-Z a-z 0-9 _ / . - (no extension needed)"
                ));
            }
            Some(file.to_string())
        }
        Some(w) => return Err(format!("unexpected `{w}` (only `prompt FILE` may follow)")),
    };
    if let Some(w) = words.next() {
        return Err(format!("unexpected `{w}` after the prompt"));
    }
    Ok(Action { kind, prompt })
}

/// `WORDS -> ACTION`, words separated by `,` or `|`.
fn parse_reply(text: &str) -> Result<ReplyRule, String> {
    let (words, action) = text
        .split_once("->")
        .ok_or("expected `WORD[, WORD…] -> ACTION`")?;
    let mut out = Vec::new();
    for w in words.split([',', '|']).map(str::trim) {
        if w.is_empty() {
            return Err("a reply word is empty".into());
        }
        if w.chars().count() > MAX_WORD {
            return Err(format!("reply word `{w}` is longer than {MAX_WORD}"));
        }
        if let Some(c) = w
            .chars()
            .find(|&c| c.is_whitespace() || c.is_control() || "$[]".contains(c))
        {
            return Err(format!(
                "reply word `{w}` may not hold {c:?} (one word each)"
            ));
        }
        out.push(w.to_lowercase());
    }
    let action = parse_action(action)?;
    Ok(ReplyRule { words: out, action })
}

/// `K -> ACTION` with one DTMF key.
fn parse_key(text: &str) -> Result<(char, Action), String> {
    let (key, action) = text.split_once("->").ok_or("expected `KEY -> ACTION`")?;
    let key = key.trim();
    let mut chars = key.chars();
    let k = match (chars.next(), chars.next()) {
        (Some(c), None) if c.is_ascii_digit() || "ABCDabcd*#".contains(c) => c.to_ascii_uppercase(),
        _ => {
            return Err(format!("`{key}` is not one DTMF key (0-9, A-D, * or #)"));
        }
    };
    let action = parse_action(action)?;
    if action.kind == ActionKind::Forward(None) {
        return Err("a key press brings no number: use `forward NUMBER`".into());
    }
    Ok((k, action))
}

fn describe(rule: &ReplyRule) -> String {
    let words: Vec<String> = rule
        .words
        .iter()
        .map(|w| match rule.action.kind {
            ActionKind::Forward(None) => format!("{w} NUMBER"),
            _ => w.clone(),
        })
        .collect();
    let what = match &rule.action.kind {
        ActionKind::Continue(label) => label.clone(),
        ActionKind::Forward(None) => "forward".into(),
        ActionKind::Forward(Some(n)) => format!("forward to {n}"),
        ActionKind::Hangup => "hang up".into(),
    };
    format!("{} ({what})", words.join(" or "))
}

/// The help text when the profile gives none: built from its rules.
pub fn default_help(rules: &[ReplyRule]) -> String {
    if rules.is_empty() {
        return "This call takes no replies.".into();
    }
    let parts: Vec<String> = rules.iter().map(describe).collect();
    format!("Reply {}", parts.join(", "))
}

fn profile(
    s: &Section,
    custom: &BTreeSet<&str>,
    groups: &BTreeMap<String, Group>,
    sink: &mut Sink,
) -> Option<Profile> {
    let before = sink.problems.len();
    check_keys(s, PROFILE_KEYS, &[], false, sink);

    // Who gets the pop, and how.
    let targets = targets(s, groups, sink);
    let delivery = Delivery::of(s, sink);
    let room = profile_room(s, &targets, delivery.mode, sink);
    let account = s
        .get("account")
        .map(|e| e.value.clone())
        .unwrap_or_default();
    if account.is_empty() && (!targets.is_empty() || room.is_some()) {
        sink.missing(s, "account", " (the profile has targets to send pops to)");
    }

    // What the caller hears and what the call reads.
    let hold = hold(s, sink);
    let variables = variables(s, sink);
    let sip_headers = sip_headers(s, sink);

    // How the call is decided.
    let forward_allow = forward_allow(s, sink);
    let mut prompts: Vec<(String, Location)> = Vec::new();
    let replies = replies(s, &forward_allow, &mut prompts, sink);
    let keys = keys(s, &mut prompts, sink);
    let timeout = seconds_key(s, "timeout", DEFAULT_TIMEOUT, sink);
    let default_action = default_action(s, &mut prompts, sink);
    for (p, at) in &prompts {
        if hold.contains(p) {
            let kind = ProblemKind::Invalid {
                section: s.name.clone(),
                key: "prompt".into(),
                reason: format!(
                    "`{p}` is also hold audio; the call could not tell when the prompt ends"
                ),
            };
            sink.problem(at, kind);
        }
    }

    // What the agents read.
    let texts = Texts::of(s, &replies, sink);
    if targets.is_empty() && room.is_none() {
        if keys.is_empty() {
            sink.warn(
                &s.at,
                format_args!(
                    "[{}] has no targets and no keys: every call waits for the timeout",
                    s.name
                ),
            );
        }
        if let Some(e) = s.get("reply") {
            sink.warn(
                &e.at,
                format_args!("[{}] reply rules do nothing without targets", s.name),
            );
        }
    } else {
        let known = Known {
            section: &s.name,
            variables: &variables,
            sip_headers: &sip_headers,
            custom,
        };
        texts.check(&known, sink);
    }
    if delivery.mode != Mode::Interactive {
        for key in ["reply", "key"] {
            if let Some(e) = s.get(key) {
                sink.warn(
                    &e.at,
                    format_args!(
                        "[{}] `{key}` rules do nothing in this mode: the call leaves without waiting",
                        s.name
                    ),
                );
            }
        }
    }

    let Texts {
        help,
        template,
        confirm,
        taken,
        missed,
        url,
    } = texts;
    (sink.problems.len() == before).then(|| Profile {
        name: s.name.clone(),
        account,
        targets,
        template: template.0,
        confirm: confirm.0,
        help,
        hold,
        variables,
        sip_headers,
        replies,
        keys,
        timeout,
        default_action,
        forward_allow,
        mode: delivery.mode,
        presence: delivery.presence,
        nobody: delivery.nobody,
        presence_wait: delivery.presence_wait,
        late_reply: delivery.late_reply,
        taken: taken.map_or_else(|| DEFAULT_TAKEN.to_string(), |(t, _)| t),
        missed: missed.map_or_else(|| DEFAULT_MISSED.to_string(), |(t, _)| t),
        url: url.map(|(u, _)| u),
        room,
        origin: s.at.to_string(),
    })
}

/// `targets`: bare JIDs and `@groups`, normalised, each once.
fn targets(s: &Section, groups: &BTreeMap<String, Group>, sink: &mut Sink) -> Vec<String> {
    let mut targets: Vec<String> = Vec::new();
    let Some(e) = s.get("targets") else {
        return targets;
    };
    let list = match items(&e.value) {
        Err(r) => {
            sink.invalid(s, e, r);
            return targets;
        }
        Ok(list) => list,
    };
    for t in list {
        if let Some(name) = t.strip_prefix('@') {
            match expand_group(name, groups) {
                Err(r) => sink.invalid(s, e, format_args!("`{t}`: {r}")),
                Ok(members) => {
                    for m in members {
                        if !targets.contains(m) {
                            targets.push(m.clone());
                        }
                    }
                }
            }
            continue;
        }
        match normalize_jid(t) {
            Err(err) => sink.invalid(s, e, format_args!("`{t}`: {err}")),
            Ok(j) if targets.contains(&j) => {
                sink.warn(
                    &e.at,
                    format_args!("[{}] target {j} is listed twice", s.name),
                );
            }
            Ok(j) => targets.push(j),
        }
    }
    targets
}

/// How a pop is delivered: `mode`, `presence`, `nobody`, and the two
/// waits around it (`presence_wait`, `late_reply`).
struct Delivery {
    mode: Mode,
    presence: PresencePolicy,
    nobody: Nobody,
    presence_wait: Duration,
    late_reply: Duration,
}

impl Delivery {
    fn of(s: &Section, sink: &mut Sink) -> Delivery {
        let mode = one_of(
            s,
            "mode",
            &[
                ("interactive", Mode::Interactive),
                ("notify", Mode::Notify),
                ("route", Mode::Route),
                ("missed", Mode::Missed),
            ],
            sink,
        );
        let presence = one_of(
            s,
            "presence",
            &[
                ("available", PresencePolicy::Available),
                ("away", PresencePolicy::Away),
                ("busy", PresencePolicy::Busy),
                ("any", PresencePolicy::Any),
            ],
            sink,
        );
        let nobody = one_of(
            s,
            "nobody",
            &[
                ("default", Nobody::Default),
                ("pop", Nobody::Pop),
                ("missed", Nobody::Missed),
            ],
            sink,
        );
        let presence_wait = seconds_key(s, "presence_wait", DEFAULT_PRESENCE_WAIT, sink);
        let late_reply = match s.get("late_reply") {
            Some(e) if e.value.trim() == "0" => Duration::ZERO,
            _ => seconds_key(s, "late_reply", crate::claim::LATE_REPLY, sink),
        };
        Delivery {
            mode,
            presence,
            nobody,
            presence_wait,
            late_reply,
        }
    }
}

/// A key of seconds (more than 0), `default` when absent or invalid.
fn seconds_key(s: &Section, key: &str, default: Duration, sink: &mut Sink) -> Duration {
    match s.get(key) {
        None => default,
        Some(e) => seconds(&e.value).unwrap_or_else(|r| {
            sink.invalid(s, e, r);
            default
        }),
    }
}

/// `room` (with `nick`, `room_allow`), and what `mode` needs of the
/// profile's recipients.
fn profile_room(s: &Section, targets: &[String], mode: Mode, sink: &mut Sink) -> Option<Room> {
    let room = match s.get("room") {
        None => {
            for key in ["nick", "room_allow"] {
                if let Some(e) = s.get(key) {
                    sink.warn(
                        &e.at,
                        format_args!("[{}] `{key}` does nothing without `room`", s.name),
                    );
                }
            }
            None
        }
        Some(e) => room(s, e, targets, sink),
    };
    if mode == Mode::Route && room.is_some() {
        let e = s.get("room").expect("room is set");
        sink.invalid(
            s,
            e,
            "`mode = route` picks one agent by presence; a room cannot be dialled",
        );
    }
    if mode == Mode::Route && targets.is_empty() {
        sink.missing(s, "targets", " (`mode = route` picks one of them)");
    }
    if matches!(mode, Mode::Notify | Mode::Missed) && targets.is_empty() && room.is_none() {
        sink.missing(s, "targets", " (this mode only sends messages)");
    }
    room
}

/// `hold`: the sound files played in turn while the call waits.
fn hold(s: &Section, sink: &mut Sink) -> Vec<String> {
    let mut hold: Vec<String> = Vec::new();
    let Some(e) = s.get("hold") else {
        hold.push(DEFAULT_HOLD.into());
        return hold;
    };
    match items(&e.value) {
        Err(r) => sink.invalid(s, e, r),
        Ok(list) if list.is_empty() => sink.invalid(s, e, "needs at least one sound file"),
        Ok(list) => {
            for f in list {
                if !sound_ok(f) {
                    sink.invalid(
                        s,
                        e,
                        format_args!("sound file `{f}`: use A-Z a-z 0-9 _ / . -"),
                    );
                } else if hold.iter().any(|h| h == f) {
                    sink.invalid(
                        s,
                        e,
                        format_args!("`{f}` is listed twice; the call could not tell them apart"),
                    );
                } else {
                    hold.push(f.to_string());
                }
            }
        }
    }
    hold
}

/// `variables`: the channel variables the call reads with `G`.
fn variables(s: &Section, sink: &mut Sink) -> Vec<String> {
    let mut variables: Vec<String> = Vec::new();
    match s.get("variables") {
        None => variables.extend(DEFAULT_VARIABLES.iter().map(|v| v.to_string())),
        Some(e) if e.value.trim().is_empty() => {}
        Some(e) => {
            for v in split_top_level(&e.value) {
                match var_name_check(v) {
                    Err(r) => sink.invalid(s, e, r),
                    Ok(()) if variables.iter().any(|x| x == v) => {}
                    Ok(()) => {
                        if v.ends_with(')') || COMPUTED.contains(&v) {
                            sink.warn(
                                &e.at,
                                format_args!(
                                    "[{}] variables: {v} always reads as empty: Asterisk's G \
                                     reads plain channel variables only; copy it into one with \
                                     Set() before ExternalIVR (the MSet line of \
                                     popivr-calldata.conf sets {}, …)",
                                    s.name,
                                    calldata::CALLER_NUM
                                ),
                            );
                        }
                        variables.push(v.to_string());
                    }
                }
            }
        }
    }
    variables
}

/// `sip_headers`: the headers the dialplan copies for the texts.
fn sip_headers(s: &Section, sink: &mut Sink) -> Vec<String> {
    let mut sip_headers: Vec<String> = Vec::new();
    let Some(e) = s.get("sip_headers") else {
        return sip_headers;
    };
    match items(&e.value) {
        Err(r) => sink.invalid(s, e, r),
        Ok(list) => {
            for h in list {
                if !header_ok(h) {
                    sink.invalid(s, e, format_args!("header `{h}`: use A-Z a-z 0-9 _ . -"));
                } else if !sip_headers.iter().any(|x| x.eq_ignore_ascii_case(h)) {
                    sip_headers.push(h.to_string());
                }
            }
        }
    }
    sip_headers
}

/// `forward_allow`: the numbers a reply may forward to.
fn forward_allow(s: &Section, sink: &mut Sink) -> Vec<String> {
    let mut forward_allow = Vec::new();
    let Some(e) = s.get("forward_allow") else {
        return forward_allow;
    };
    match items(&e.value) {
        Err(r) => sink.invalid(s, e, r),
        Ok(list) => {
            for p in list {
                match forward::validate_pattern(p) {
                    Ok(()) => forward_allow.push(p.to_string()),
                    Err(err) => sink.invalid(s, e, format_args!("`{p}`: {err}")),
                }
            }
        }
    }
    forward_allow
}

/// The `reply` rules, each word once; their prompts go to `prompts`.
fn replies(
    s: &Section,
    forward_allow: &[String],
    prompts: &mut Vec<(String, Location)>,
    sink: &mut Sink,
) -> Vec<ReplyRule> {
    let mut replies: Vec<ReplyRule> = Vec::new();
    let mut word_at: BTreeMap<String, Location> = BTreeMap::new();
    for e in s.all("reply") {
        let rule = match parse_reply(&e.value) {
            Ok(r) => r,
            Err(r) => {
                sink.invalid(s, e, r);
                continue;
            }
        };
        let mut ok = true;
        for w in &rule.words {
            if let Some(prev) = word_at.insert(w.clone(), e.at.clone()) {
                sink.invalid(
                    s,
                    e,
                    format_args!("reply word `{w}` is already used at {prev}"),
                );
                ok = false;
            }
        }
        if rule.action.kind == ActionKind::Forward(None) && forward_allow.is_empty() {
            sink.invalid(
                s,
                e,
                "`forward` takes the number from the reply, so `forward_allow` must say \
                 which numbers are allowed (or give a fixed number: `forward 2000`)",
            );
            ok = false;
        }
        if let Some(p) = &rule.action.prompt {
            prompts.push((p.clone(), e.at.clone()));
        }
        if ok {
            replies.push(rule);
        }
    }
    replies
}

/// The `key` rules, each key once; their prompts go to `prompts`.
fn keys(
    s: &Section,
    prompts: &mut Vec<(String, Location)>,
    sink: &mut Sink,
) -> BTreeMap<char, Action> {
    let mut keys = BTreeMap::new();
    let mut key_at: BTreeMap<char, Location> = BTreeMap::new();
    for e in s.all("key") {
        match parse_key(&e.value) {
            Err(r) => sink.invalid(s, e, r),
            Ok((k, action)) => {
                if let Some(prev) = key_at.insert(k, e.at.clone()) {
                    sink.invalid(
                        s,
                        e,
                        format_args!("key `{k}` already has an action at {prev}"),
                    );
                    continue;
                }
                if let Some(p) = &action.prompt {
                    prompts.push((p.clone(), e.at.clone()));
                }
                keys.insert(k, action);
            }
        }
    }
    keys
}

/// `default`: the action at the timeout; its prompt goes to `prompts`.
fn default_action(s: &Section, prompts: &mut Vec<(String, Location)>, sink: &mut Sink) -> Action {
    let Some(e) = s.get("default") else {
        return Action {
            kind: ActionKind::Continue(DEFAULT_DEFAULT_LABEL.into()),
            prompt: None,
        };
    };
    match parse_action(&e.value) {
        Ok(a) if a.kind == ActionKind::Forward(None) => {
            sink.invalid(s, e, "a timeout brings no number: use `forward NUMBER`");
            a
        }
        Ok(a) => {
            if let Some(p) = &a.prompt {
                prompts.push((p.clone(), e.at.clone()));
            }
            a
        }
        Err(r) => {
            sink.invalid(s, e, r);
            Action {
                kind: ActionKind::Hangup,
                prompt: None,
            }
        }
    }
}

/// What the agents read: the pop (`template`), `help`, `confirm`, and the
/// optional `taken`, `missed`, `url`, with where each was written.
struct Texts {
    help: String,
    template: (String, Location),
    confirm: (String, Location),
    taken: Option<(String, Location)>,
    missed: Option<(String, Location)>,
    url: Option<(String, Location)>,
}

impl Texts {
    fn of(s: &Section, replies: &[ReplyRule], sink: &mut Sink) -> Texts {
        let text = |sink: &mut Sink, key: &str| -> Option<(String, Location)> {
            let e = s.get(key)?;
            match text_check(&e.value) {
                Ok(()) => Some((e.value.clone(), e.at.clone())),
                Err(r) => {
                    sink.invalid(s, e, r);
                    None
                }
            }
        };
        let help = text(sink, "help").map_or_else(|| default_help(replies), |(t, _)| t);
        let template = text(sink, "template")
            .unwrap_or_else(|| (format!("{DEFAULT_TEMPLATE_HEAD} {help}"), s.at.clone()));
        let confirm =
            text(sink, "confirm").unwrap_or_else(|| (DEFAULT_CONFIRM.to_string(), s.at.clone()));
        Texts {
            help,
            template,
            confirm,
            taken: text(sink, "taken"),
            missed: text(sink, "missed"),
            url: text(sink, "url"),
        }
    }

    /// Warn about placeholders that stay empty. Defaults are not checked:
    /// the admin did not write them.
    fn check(&self, known: &Known, sink: &mut Sink) {
        known.check(&self.template.0, &self.template.1, "template", true, sink);
        known.check(&self.confirm.0, &self.confirm.1, "confirm", false, sink);
        for (key, text, is_pop) in [
            ("taken", &self.taken, false),
            ("missed", &self.missed, true),
            ("url", &self.url, true),
        ] {
            if let Some((text, at)) = text {
                known.check(text, at, key, is_pop, sink);
            }
        }
    }
}

/// `room`, `nick`, `room_allow`.
fn room(s: &Section, e: &Entry, targets: &[String], sink: &mut Sink) -> Option<Room> {
    let jid = match normalize_jid(&e.value) {
        Ok(j) => j,
        Err(err) => {
            sink.invalid(s, e, format_args!("`{}`: {err}", e.value));
            return None;
        }
    };
    let nick = match s.get("nick") {
        None => "popivr".to_string(),
        Some(n) if nick_ok(n.value.trim()) => n.value.trim().to_string(),
        Some(n) => {
            sink.invalid(s, n, format_args!("1 to {MAX_NICK} printable characters"));
            return None;
        }
    };
    let mut allow_jids = Vec::new();
    let mut allow_nicks = Vec::new();
    if let Some(a) = s.get("room_allow") {
        match items(&a.value) {
            Err(r) => sink.invalid(s, a, r),
            Ok(list) => {
                for item in list {
                    if item.contains('@') {
                        match normalize_jid(item) {
                            Ok(j) => allow_jids.push(j),
                            Err(err) => sink.invalid(s, a, format_args!("`{item}`: {err}")),
                        }
                    } else if nick_ok(item) {
                        allow_nicks.push(item.to_string());
                    } else {
                        sink.invalid(
                            s,
                            a,
                            format_args!("nick `{item}`: printable, 1 to {MAX_NICK}"),
                        );
                    }
                }
            }
        }
    }
    if allow_jids.is_empty() {
        allow_jids = targets.to_vec();
    }
    if allow_jids.is_empty() && allow_nicks.is_empty() {
        sink.warn(
            &e.at,
            format_args!(
                "[{}] nobody in room {jid} may answer: list them in `room_allow` or `targets`",
                s.name
            ),
        );
    }
    Some(Room {
        jid,
        nick,
        allow_jids,
        allow_nicks,
    })
}

/// What a profile's templates can draw on, to warn about placeholders that
/// will always be empty.
struct Known<'a> {
    section: &'a str,
    variables: &'a [String],
    sip_headers: &'a [String],
    custom: &'a BTreeSet<&'a str>,
}

impl Known<'_> {
    fn check(&self, text: &str, at: &Location, key: &str, is_pop: bool, sink: &mut Sink) {
        let reads = |v: &str| self.variables.iter().any(|x| x.eq_ignore_ascii_case(v));
        let mut seen = BTreeSet::new();
        for p in template::placeholders(text) {
            if !seen.insert(p.clone()) {
                continue;
            }
            let why = match &p {
                Placeholder::Word(w) => match w.as_str() {
                    "caller" if !reads(calldata::CALLER_NUM) => {
                        "`variables` lacks POPIVR_CALLER_NUM"
                    }
                    "caller_name" if !reads(calldata::CALLER_NAME) => {
                        "`variables` lacks POPIVR_CALLER_NAME"
                    }
                    "number" if !reads(calldata::EXTEN) => "`variables` lacks POPIVR_EXTEN",
                    "called" if !reads(calldata::DNID) => "`variables` lacks POPIVR_DNID",
                    "outcome" | "agent" if is_pop => "it only has a value in `confirm`",
                    w if !p.is_builtin() && !self.custom.contains(w) => {
                        "it is neither built in nor a `value` of any agent"
                    }
                    _ => continue,
                },
                Placeholder::Sip(h) => {
                    if self.sip_headers.iter().any(|x| x.eq_ignore_ascii_case(h)) {
                        continue;
                    }
                    "`sip_headers` does not list it"
                }
                // May come from a program argument: cannot be known here.
                Placeholder::Var(_) => continue,
            };
            sink.warn(
                at,
                format_args!("[{}] {key}: {p} is always empty: {why}", self.section),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jids() {
        assert_eq!(
            normalize_jid(" Alice@Example.ORG ").unwrap(),
            "alice@example.org"
        );
        assert_eq!(
            normalize_jid("ÄNNE@exämple.org.").unwrap(),
            "änne@exämple.org"
        );
        assert_eq!(normalize_jid("a@[::1]").unwrap(), "a@[::1]");
        assert_eq!(normalize_jid("a@b/c"), Err(JidError::Resource));
        assert_eq!(normalize_jid("example.org"), Err(JidError::NoAt));
        assert_eq!(normalize_jid("@example.org"), Err(JidError::EmptyLocal));
        assert_eq!(
            normalize_jid("a b@example.org"),
            Err(JidError::BadLocal(' '))
        );
        assert_eq!(normalize_jid("a@b@c"), Err(JidError::BadDomain));
        assert_eq!(normalize_jid("a@-x.org"), Err(JidError::BadDomain));
        assert_eq!(normalize_jid("a@x..org"), Err(JidError::BadDomain));
        assert_eq!(normalize_jid("a@"), Err(JidError::BadDomain));
        assert!(parse_jid("pbx@example.org/popivr").is_ok());
        assert_eq!(
            parse_jid("pbx@example.org/").err(),
            Some(JidError::BadResource)
        );
    }

    /// Compared the way servers compare: nodeprep case-folds beyond
    /// `to_lowercase` (`ß` → `ss`) and maps compatibility forms (`ﬁ` →
    /// `fi`); what stringprep prohibits is refused.
    #[test]
    fn jids_are_stringprepped_like_senders() {
        use xmpp_parsers::jid::BareJid;
        for (config, sender) in [
            ("Straße@Example.ORG", "strasse@example.org"),
            ("\u{fb01}nance@example.org", "finance@example.org"),
            ("ALICE@EXAMPLE.ORG.", "alice@example.org"),
        ] {
            let from = BareJid::new(sender).unwrap().to_string();
            assert_eq!(normalize_jid(config).unwrap(), from, "{config}");
        }
        assert!(matches!(
            normalize_jid("a\u{e000}@example.org"),
            Err(JidError::Invalid(_))
        ));
    }

    #[test]
    fn actions() {
        let a = parse_action("continue desk").unwrap();
        assert_eq!(a.kind, ActionKind::Continue("desk".into()));
        assert_eq!(a.prompt, None);
        let a = parse_action("Continue vm Prompt custom/vm-intro").unwrap();
        assert_eq!(a.kind, ActionKind::Continue("vm".into()));
        assert_eq!(a.prompt.as_deref(), Some("custom/vm-intro"));
        assert_eq!(
            parse_action("forward").unwrap().kind,
            ActionKind::Forward(None)
        );
        let a = parse_action("forward +492001 prompt x").unwrap();
        assert_eq!(a.kind, ActionKind::Forward(Some("+492001".into())));
        assert_eq!(a.prompt.as_deref(), Some("x"));
        let a = parse_action("forward prompt x").unwrap();
        assert_eq!(a.kind, ActionKind::Forward(None));
        assert_eq!(parse_action("hangup").unwrap().kind, ActionKind::Hangup);
        for bad in [
            "",
            "continue",
            "continue a,b",
            "continue has.dot",
            &format!("continue {}", "a".repeat(MAX_LABEL + 1)),
            "forward 20a1",
            "hangup now",
            "hangup prompt",
            "hangup prompt a,b",
            "hangup prompt a b",
            "jump x",
        ] {
            assert!(parse_action(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reply_and_key_rules() {
        let r = parse_reply("1, Desk | D -> continue desk").unwrap();
        assert_eq!(r.words, ["1", "desk", "d"]);
        assert!(parse_reply("1 continue desk").is_err());
        assert!(parse_reply("a b -> hangup").is_err());
        assert!(parse_reply("1,,2 -> hangup").is_err());
        assert!(parse_reply("$x -> hangup").is_err());
        assert_eq!(parse_key("0 -> continue op").unwrap().0, '0');
        assert_eq!(parse_key("d -> hangup").unwrap().0, 'D');
        assert_eq!(parse_key("# -> hangup").unwrap().0, '#');
        assert!(parse_key("10 -> hangup").is_err());
        assert!(parse_key("E -> hangup").is_err());
        assert!(parse_key("1 -> forward").is_err());
        assert!(parse_key("1 -> forward 2000").is_ok());
    }

    #[test]
    fn seconds_values() {
        assert_eq!(seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(seconds("2.5"), Ok(Duration::from_millis(2500)));
        for bad in [
            "0", "0.0", "-1", "1e3", "inf", "NaN", ".5", "5.", "", "86401", " 5",
        ] {
            assert!(seconds(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn help_is_built_from_the_rules() {
        let rules: Vec<ReplyRule> = [
            "1, desk -> continue desk",
            "fwd -> forward",
            "boss -> forward 2000",
            "h -> hangup",
        ]
        .iter()
        .map(|r| parse_reply(r).unwrap())
        .collect();
        assert_eq!(
            default_help(&rules),
            "Reply 1 or desk (desk), fwd NUMBER (forward), boss (forward to 2000), h (hang up)"
        );
        assert_eq!(default_help(&[]), "This call takes no replies.");
    }

    #[test]
    fn variable_names() {
        assert_eq!(
            split_top_level("CALLERID(num), PJSIP_HEADER(read,X-A),EXTEN"),
            ["CALLERID(num)", "PJSIP_HEADER(read,X-A)", "EXTEN"]
        );
        assert!(var_name_check("PJSIP_HEADER(read,X-A)").is_ok());
        for bad in ["", "A B", "A=B", "${X}", "F(x", "F)x(", "A\u{1}"] {
            assert!(var_name_check(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_sample_shows_every_key() {
        let sample = include_str!("../../dialplan/popivr.conf.sample");
        // `key = …`, active or commented out.
        let shown = |key: &str| {
            sample.lines().any(|l| {
                let l = l.trim_start().trim_start_matches(';').trim_start();
                l.strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        let refused = [
            "forceoldssl",
            "refresh_token",
            "oauth_clientid",
            "oauth_secret",
        ];
        let keys = GENERAL_KEYS
            .iter()
            .chain(CLIENT_KEYS)
            .chain(PROFILE_KEYS)
            .chain(AGENT_KEYS);
        for key in keys {
            if refused.contains(key) {
                assert!(sample.contains(key), "{key} not mentioned");
            } else {
                assert!(shown(key), "no `{key} =` line");
            }
        }
        for key in CLIENT_IGNORED {
            assert!(sample.contains(key), "{key} not mentioned");
        }
    }

    #[test]
    fn hints_for_misspelt_keys() {
        assert_eq!(closest("secert", CLIENT_KEYS), Some("secret"));
        assert_eq!(closest("usrname", CLIENT_KEYS), Some("username"));
        assert_eq!(closest("zzzzzz", CLIENT_KEYS), None);
    }
}
