//! Configuration: Asterisk-style INI (`popivr.conf`, optionally accounts
//! from `xmpp.conf`), parsed once into plain structs and validated up front.

mod ini;
mod load;

pub use ini::{Entry, Ini, IniError, IniErrorKind, Location, Section, parse_ini, parse_ini_str};
pub use load::{
    ConfigError, JidError, Problem, ProblemKind, default_help, load_file, load_str, normalize_jid,
};

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// Default location, overridable with `--config` or `POPIVR_CONFIG`.
pub const DEFAULT_PATH: &str = "/etc/asterisk/popivr.conf";

#[derive(Debug, Clone, Default)]
pub struct Config {
    pub accounts: BTreeMap<String, Account>,
    pub profiles: BTreeMap<String, Profile>,
    /// The `[general]` section.
    pub general: General,
    /// `type = agent` sections, by normalised bare JID.
    pub agents: BTreeMap<String, Agent>,
    /// `type = group` sections, by section name.
    pub groups: BTreeMap<String, Group>,
    /// Things worth telling the admin that do not stop popivr
    /// (`file:line: text`): ignored keys, a secret others can read, …
    pub warnings: Vec<String>,
}

impl Config {
    /// The account a profile logs in with (`None` for a keys-only profile).
    pub fn account_for(&self, profile: &Profile) -> Option<&Account> {
        self.accounts.get(&profile.account)
    }

    /// The custom template values (`$name$`) of an agent, by bare JID.
    pub fn agent_values(&self, jid: &str) -> Option<&BTreeMap<String, String>> {
        let jid = normalize_jid(jid).ok()?;
        self.agents.get(&jid).map(|a| &a.values)
    }
}

/// `[general]`.
#[derive(Debug, Clone, Default)]
pub struct General {
    /// `xmpp_conf`: also read accounts from this `xmpp.conf`.
    pub xmpp_conf: Option<PathBuf>,
}

/// `type = agent`: values for one agent's `$name$` placeholders.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The section name.
    pub name: String,
    /// `jid` (default: the section name), a normalised bare JID.
    pub jid: String,
    /// `value = name=text`, repeatable.
    pub values: BTreeMap<String, String>,
    /// `exten`: where the dialplan reaches this agent (presence routing
    /// sets `POPIVR_AGENT_EXTEN` to it).
    pub exten: Option<String>,
    /// `priority` (default 0): presence routing tries lower numbers first;
    /// equal ones keep the order of the profile's `targets`.
    pub priority: i32,
    pub origin: String,
}

/// `type = group`: a named list of agents, used in `targets` as `@name`.
#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    /// `members`: normalised bare JIDs, in order.
    pub members: Vec<String>,
    pub origin: String,
}

/// An XMPP account; keys as in Asterisk's `xmpp.conf` client sections.
#[derive(Clone)]
pub struct Account {
    pub name: String,
    /// `username`: a bare or full JID (`pbx@example.org/pbx`).
    pub username: String,
    /// `secret`. Never logged (see the `Debug` impl).
    pub secret: String,
    /// `serverhost`: connect here instead of the JID's domain.
    pub serverhost: Option<String>,
    /// `port`, default 5222.
    pub port: u16,
    /// `usetls` (default yes): STARTTLS with a verified certificate.
    pub usetls: bool,
    /// `usesasl` (default yes). popivr always uses SASL; `no` is rejected.
    pub usesasl: bool,
    /// `allow_plaintext` (default no): `usetls=no` is refused unless this is yes.
    pub allow_plaintext: bool,
    /// `ca_file`: extra PEM CA certificates trusted beside the system roots.
    pub ca_file: Option<PathBuf>,
    /// `statusmessage`.
    pub statusmessage: Option<String>,
    /// `timeout` (seconds, default 5): connect + TLS + auth must finish within it.
    pub timeout: Duration,
    /// Where the account was defined, for error messages.
    pub origin: String,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.name)
            .field("username", &self.username)
            .field("secret", &"<hidden>")
            .field("serverhost", &self.serverhost)
            .field("port", &self.port)
            .field("usetls", &self.usetls)
            .field("allow_plaintext", &self.allow_plaintext)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// What a reply, key or timeout does to the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionKind {
    /// Set `POPIVR_ACTION=<label>` and leave with `E`.
    Continue(String),
    /// Set `POPIVR_ACTION=forward`, `POPIVR_TARGET=<number>` and `E`.
    /// `None`: the number comes from the reply (`fwd 2001`).
    Forward(Option<String>),
    /// `H`.
    Hangup,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub kind: ActionKind,
    /// Played (interrupting the hold audio) before leaving.
    pub prompt: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ReplyRule {
    /// Lower-case words that select this rule (`1`, `vm`, `fwd`).
    pub words: Vec<String>,
    pub action: Action,
}

/// What a profile does with a call (`mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Pop, then wait for a reply, a key or the timeout.
    #[default]
    Interactive,
    /// Pop, then `E` at once: the dialplan goes on while agents read it.
    Notify,
    /// No reply: pick the first available agent, pop them and `E` with
    /// `POPIVR_AGENT`/`POPIVR_AGENT_EXTEN` set for the dialplan to dial.
    Route,
    /// For the `h` extension (options `nd`): no audio; send the missed-call
    /// notice built from the channel variables, then `E`.
    Missed,
}

/// Which presence makes an agent available (`presence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PresencePolicy {
    /// Online or free for chat.
    #[default]
    Available,
    /// Also away.
    Away,
    /// Any available resource, whatever its show (also xa, dnd).
    Busy,
    /// Ignore presence: every target, even offline ones.
    Any,
}

/// What to do when no target is available (`nobody`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Nobody {
    /// Take the default action at once.
    #[default]
    Default,
    /// Send to every target anyway (offline ones get it from storage).
    Pop,
    /// Send every target the missed-call notice, then the default action.
    Missed,
}

/// `room`: pop into a group chat (XEP-0045) too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Room {
    /// The room's bare JID.
    pub jid: String,
    /// `nick`: ours in the room.
    pub nick: String,
    /// Occupants whose real JID is one of these may answer (from
    /// `room_allow` entries holding `@`, else the profile's targets).
    pub allow_jids: Vec<String>,
    /// Occupants with these nicks may answer, only in a room that hides
    /// real JIDs (`room_allow` entries without `@`).
    pub allow_nicks: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    /// Name of an entry in [`Config::accounts`]; empty for a keys-only
    /// profile (no targets) that names none.
    pub account: String,
    /// Bare JIDs that get the pop and may answer it.
    pub targets: Vec<String>,
    /// The pop text (see `template`).
    pub template: String,
    /// The confirmation sent to the agent who steered the call.
    pub confirm: String,
    /// Sent back on a reply that matches no rule.
    pub help: String,
    /// Hold audio, played in a loop.
    pub hold: Vec<String>,
    /// Channel variables read with `G` at call start.
    pub variables: Vec<String>,
    /// SIP headers read with `G,PJSIP_HEADER(read,X)`.
    pub sip_headers: Vec<String>,
    pub replies: Vec<ReplyRule>,
    /// Caller keys → action.
    pub keys: BTreeMap<char, Action>,
    pub timeout: Duration,
    pub default_action: Action,
    /// FILTER-like allowed numbers for `forward`: Asterisk patterns (`_2XXX`) or literals.
    pub forward_allow: Vec<String>,
    pub mode: Mode,
    pub presence: PresencePolicy,
    pub nobody: Nobody,
    /// How long presence may take to come in after login before the pop
    /// goes to those known to be available.
    pub presence_wait: Duration,
    /// For how long after this call ends a reply without thread or tag
    /// from an agent it popped moves no other call (it may be a late
    /// answer to this one); zero: not at all.
    pub late_reply: Duration,
    /// Sent to the other agents when one of them took the call.
    pub taken: String,
    /// The missed-call notice.
    pub missed: String,
    /// `url`: a CRM link template (values URL-encoded), appended to the pop
    /// and attached as XEP-0066 out-of-band data.
    pub url: Option<String>,
    pub room: Option<Room>,
    pub origin: String,
}

impl Profile {
    /// Whether the profile talks XMPP at all.
    pub fn uses_xmpp(&self) -> bool {
        !self.targets.is_empty() || self.room.is_some()
    }
}
