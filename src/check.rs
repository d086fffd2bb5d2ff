//! `popivr check`: validate the configuration, point out risky settings,
//! log in with each account a profile uses and say what its server means
//! for overlapping per-call sessions. Never prints a secret.
//!
//! Exit status 0 when the file is valid and every login worked (and, with
//! `--strict`, nothing risky was found); 1 otherwise.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use popivr::call::RealJids;
use popivr::config::{self, ActionKind, Config, PresencePolicy, Profile};
use popivr::xmpp::{ContactState, Show, Software, XmppEvent, XmppStatus};

/// A caller on hold longer than this is probably a typo (minutes for
/// seconds) or an abandoned caller.
const LONG_HOLD: Duration = Duration::from_secs(300);
/// Less than this leaves an agent no time to read the pop and reply.
const SHORT_HOLD: Duration = Duration::from_secs(5);
/// A login bound above this holds up every pop while a server is down.
const LONG_LOGIN: Duration = Duration::from_secs(15);
/// How long to wait for the server to name its software: a server that
/// does not answer XEP-0092 may stay silent.
const SOFTWARE_WAIT: Duration = Duration::from_secs(2);

pub struct Options {
    /// Only validate the file; don't log in.
    pub offline: bool,
    /// Risky settings fail the check too.
    pub strict: bool,
    /// How long to listen for the targets' presence after login.
    pub presence_wait: Duration,
}

pub fn check(path: &Path, options: Options) -> Result<ExitCode> {
    let config = config::load_file(path)?;
    println!("{}: configuration is valid", path.display());
    let mut failures = Vec::new();
    if config.profiles.is_empty() {
        failures.push(format!("{} defines no profile", path.display()));
    }
    for w in &config.warnings {
        println!("warning: {w}");
    }
    let left = placeholders(&config);
    for p in &left {
        println!("placeholder: {p}");
    }
    if !left.is_empty() {
        failures.push(format!(
            "{} placeholder(s) of the sample left in place",
            left.len()
        ));
    }
    let risks = risks(&config, path);
    for r in &risks {
        println!("risk: {r}");
    }
    if options.strict && !(risks.is_empty() && config.warnings.is_empty()) {
        failures.push(format!(
            "{} warning(s) and risk(s) (--strict)",
            risks.len() + config.warnings.len()
        ));
    }
    for (name, p) in &config.profiles {
        println!(
            "profile [{name}]: {} target(s), {} reply rule(s), {} key(s), timeout {}",
            p.targets.len(),
            p.replies.len(),
            p.keys.len(),
            secs(p.timeout)
        );
    }
    if !options.offline {
        let (failed, unseen, rooms) = logins(&config, options.presence_wait)?;
        if failed > 0 {
            failures.push(format!("{failed} account(s) could not log in"));
        }
        if rooms > 0 {
            failures.push(format!(
                "{rooms} room(s) cannot be joined or hide who answers"
            ));
        }
        if unseen > 0 {
            failures.push(format!(
                "{unseen} target(s) have not accepted popivr's presence subscription \
                 and get no pops"
            ));
        }
    }
    if failures.is_empty() {
        println!("check passed");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("check FAILED: {}", failures.join("; "));
        Ok(ExitCode::FAILURE)
    }
}

/// The shipped sample's secret.
const SAMPLE_SECRET: &str = "CHANGE-ME";

/// What the shipped sample holds only as an example and an admin must
/// replace: its secret, and names under the domains RFC 2606 reserves for
/// examples (`example.org`, `.com`, `.net`, and their subdomains). Named
/// by section and key; a secret is never shown.
fn placeholders(config: &Config) -> Vec<String> {
    let example = |name: &str| {
        let host = name.rsplit('@').next().unwrap_or(name);
        let host = host.split('/').next().unwrap_or(host).trim_end_matches('.');
        let host = host.to_ascii_lowercase();
        ["example.org", "example.com", "example.net"]
            .iter()
            .any(|d| host == *d || host.ends_with(&format!(".{d}")))
    };
    let mut found: Vec<String> = config
        .accounts
        .iter()
        .filter(|(_, a)| a.secret == SAMPLE_SECRET)
        .map(|(section, _)| format!("[{section}] secret: still the sample's `{SAMPLE_SECRET}`"))
        .collect();
    // (section, key, name) of every name the file gives.
    let mut names: Vec<(&str, &str, &str)> = Vec::new();
    for (section, a) in &config.accounts {
        names.push((section, "username", &a.username));
        names.extend(
            a.serverhost
                .as_deref()
                .map(|h| (section.as_str(), "serverhost", h)),
        );
    }
    for (section, p) in &config.profiles {
        names.extend(
            p.targets
                .iter()
                .map(|t| (section.as_str(), "targets", t.as_str())),
        );
        names.extend(
            p.room
                .as_ref()
                .map(|r| (section.as_str(), "room", r.jid.as_str())),
        );
        let url_host = p.url.as_deref().and_then(|u| u.split("://").nth(1));
        let url_host = url_host.and_then(|r| r.split(['/', '?', ':']).next());
        names.extend(url_host.map(|h| (section.as_str(), "url", h)));
    }
    names.extend(
        config
            .agents
            .keys()
            .map(|jid| (jid.as_str(), "jid", jid.as_str())),
    );
    found.extend(
        names
            .into_iter()
            .filter(|(_, _, value)| example(value))
            .map(|(section, key, value)| {
                format!("[{section}] {key}: `{value}` is an example name (RFC 2606)")
            }),
    );
    found
}

/// Log in with each account a profile with targets uses, then show how
/// each target stands with it. Returns the number of accounts that could
/// not log in, and of targets that get no pops because popivr cannot see
/// their presence.
fn logins(config: &Config, presence_wait: Duration) -> Result<(usize, usize, usize)> {
    let used: BTreeSet<&str> = config
        .profiles
        .values()
        .filter(|p| needs_xmpp(p))
        .map(|p| p.account.as_str())
        .collect();
    if used.is_empty() {
        println!("no profile has targets: no XMPP login needed");
        return Ok((0, 0, 0));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let mut failed = 0;
    let mut unseen = 0;
    let mut rooms = 0;
    for name in used {
        let Some(account) = config.accounts.get(name) else {
            continue;
        };
        let server = account.serverhost.as_deref().unwrap_or("the JID's domain");
        let transport = match account.usetls {
            true => "STARTTLS, certificate verified",
            false => "PLAINTEXT",
        };
        match rt.block_on(popivr::xmpp::login(account)) {
            Ok(mut conn) => {
                println!(
                    "account [{name}]: logged in as {} via {server}:{} ({transport}, {}) in {}",
                    conn.jid, account.port, conn.mechanism, conn.timings
                );
                if let Some(why) = conn.unbound.filter(|_| account.usetls) {
                    println!("account [{name}]: note: no channel binding: {why}");
                }
                let (software, storage) = rt.block_on(async {
                    let software = conn.server_software(SOFTWARE_WAIT).await;
                    let storage = conn.private_storage(SOFTWARE_WAIT).await;
                    conn.close().await;
                    (software, storage)
                });
                println!("account [{name}]: {}", sessions_note(&software));
                println!("account [{name}]: {}", storage_note(&storage));
            }
            Err(e) => {
                failed += 1;
                println!(
                    "account [{name}]: login FAILED via {server}:{}: {e}",
                    account.port
                );
                continue;
            }
        }
        rooms += rt.block_on(check_rooms(config, name, account, presence_wait));
        let targets = targets_of(config, name);
        if targets.is_empty() {
            continue;
        }
        match rt.block_on(popivr::xmpp::survey(account, &targets, presence_wait)) {
            Ok(states) => {
                for state in &states {
                    let needed = needs_presence(config, name, &state.jid);
                    if needed && !state.subscribed {
                        unseen += 1;
                    }
                    println!("  {}", describe(state, needed));
                }
            }
            Err(e) => {
                failed += 1;
                println!("account [{name}]: roster and presence FAILED: {e}");
            }
        }
    }
    Ok((failed, unseen, rooms))
}

/// What the account's private storage means for per-call mode.
fn storage_note(storage: &Result<(), String>) -> String {
    match storage {
        Ok(()) => "private storage (XEP-0049): yes: per-call processes tell a late answer \
                   to a call that ended from an answer to the next one (`late_reply`)"
            .to_string(),
        Err(why) => format!(
            "note: no private storage (XEP-0049: {why}): in per-call mode a late answer \
             to a call that ended can move the next one; enable it on the server \
             (prosody: mod_private, ejabberd: mod_private) or use `popivr serve`"
        ),
    }
}

/// Join each room a profile of `account` posts to, as a call does, and
/// say whether popivr can tell who answers there. Returns how many rooms
/// failed: not joined, or hiding real JIDs while `room_allow` names none
/// of the nicks it could go by instead.
async fn check_rooms(
    config: &Config,
    name: &str,
    account: &config::Account,
    wait: Duration,
) -> usize {
    let mut seen = BTreeSet::new();
    let mut failed = 0;
    let rooms = config
        .profiles
        .values()
        .filter(|p| p.account == name)
        .filter_map(|p| p.room.as_ref())
        .filter(|r| seen.insert(r.jid.clone()));
    for room in rooms {
        let options = popivr::xmpp::SessionOptions {
            rooms: vec![(room.jid.clone(), room.nick.clone())],
            ..Default::default()
        };
        let mut session = popivr::xmpp::spawn(account.clone(), options);
        let bound = account.timeout + wait;
        let result = tokio::time::timeout(bound, async {
            loop {
                match session.recv().await {
                    Some(XmppEvent::Joined(_, jids)) => return Ok(jids),
                    Some(XmppEvent::RoomFailed(_, cause)) => return Err(cause),
                    Some(XmppEvent::Status(XmppStatus::Failed(cause))) => return Err(cause),
                    Some(_) => continue,
                    None => return Err("the session ended".to_string()),
                }
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {}", secs(bound))));
        session.close().await;
        let jid = &room.jid;
        match result {
            Ok(RealJids::Shown) => println!("  room {jid}: joined; real JIDs shown"),
            Ok(RealJids::Hidden) if !room.allow_nicks.is_empty() => println!(
                "  room {jid}: joined; real JIDs hidden: answers are checked by nick only \
                 ({})",
                room.allow_nicks.join(", ")
            ),
            Ok(RealJids::Hidden) => {
                failed += 1;
                println!(
                    "  room {jid}: FAILED: {}",
                    popivr::call::room_hides_jids(jid)
                );
            }
            Err(cause) => {
                failed += 1;
                println!("  room {jid}: join FAILED: {cause}");
            }
        }
    }
    failed
}

/// What the server's software means for overlapping per-call sessions.
/// XMPP has no way to read a server's limit on sessions per account, and
/// trying it out would replace live sessions of the account (a daemon, or
/// calls in progress), so this goes by the software's defaults. A note,
/// never a failure: whether calls run per call or in `popivr serve` is
/// the dialplan's choice, which check cannot see.
fn sessions_note(software: &Result<Software, String>) -> String {
    let unknown = "its limit on sessions per account is unknown";
    let software = match software {
        Ok(software) => software,
        Err(why) => return format!("server software unknown ({why}): {unknown}"),
    };
    let meaning = match software.name.to_ascii_lowercase().as_str() {
        "ejabberd" => {
            "ejabberd limits sessions per account (max_user_sessions, 10 in its stock \
             config; check cannot read the configured value). In per-call mode each waiting \
             call is one session, so more overlapping calls than the limit replace each \
             other's sessions (conflict in the log). If calls overlap, use `popivr serve` \
             (one session for all calls) or raise the limit for this account (README, \
             ejabberd)"
        }
        "prosody" => {
            "prosody 0.12's own modules set no limit on sessions per account (mod_limits \
             limits bandwidth): overlapping per-call sessions do not replace each other"
        }
        _ => unknown,
    };
    format!("server {software}: {meaning}")
}

/// A profile that logs in: it pops targets or a room.
fn needs_xmpp(p: &Profile) -> bool {
    !p.targets.is_empty() || p.room.is_some()
}

/// Every target of the profiles that use `account`, once, in order.
fn targets_of(config: &Config, account: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    config
        .profiles
        .values()
        .filter(|p| p.account == account)
        .flat_map(|p| p.targets.iter())
        .filter(|t| seen.insert(t.as_str()))
        .cloned()
        .collect()
}

/// Whether some profile of `account` pops `target` only when it sees the
/// target available (so a missing subscription means no pops).
fn needs_presence(config: &Config, account: &str, target: &str) -> bool {
    config.profiles.values().any(|p| {
        p.account == account
            && p.presence != PresencePolicy::Any
            && p.targets.iter().any(|t| t == target)
    })
}

/// One line on a target: subscription, then presence per resource.
fn describe(state: &ContactState, needed: bool) -> String {
    let jid = &state.jid;
    if !state.subscribed {
        let then = match needed {
            true => "gets no pops until they accept",
            false => "their profiles ignore presence (presence = any)",
        };
        let asked = match state.asked {
            true => "popivr's request waits for them to accept in their client",
            false => "no request pending",
        };
        return format!("{jid}: NOT subscribed: {asked}; {then}");
    }
    let online: Vec<String> = state
        .resources
        .iter()
        .filter(|(_, show)| *show != Show::Unavailable)
        .map(|(full, show)| {
            let resource = full.split_once('/').map_or(full.as_str(), |(_, r)| r);
            format!("{resource}: {}", show_name(*show))
        })
        .collect();
    match online.is_empty() {
        true => format!("{jid}: subscribed, offline"),
        false => format!("{jid}: subscribed, online ({})", online.join("; ")),
    }
}

fn show_name(show: Show) -> &'static str {
    match show {
        Show::Online => "available",
        Show::Chat => "free for chat",
        Show::Away => "away",
        Show::Xa => "extended away",
        Show::Dnd => "do not disturb",
        Show::Unavailable => "offline",
    }
}

/// Settings that work but are risky, one sentence each.
fn risks(config: &Config, path: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o002 != 0
    {
        out.push(format!(
            "{}: anyone on this machine may change it (who gets pops, where calls go); chmod o-w",
            path.display()
        ));
    }
    for (name, a) in &config.accounts {
        if !used_by_a_profile(config, name) {
            continue;
        }
        if !a.usetls {
            out.push(format!(
                "account [{name}] ({}): usetls = no: the password and every pop cross the \
                 network unencrypted",
                a.origin
            ));
        }
        if let Some(ca) = &a.ca_file
            && std::fs::metadata(ca).is_ok_and(|m| m.permissions().mode() & 0o002 != 0)
        {
            out.push(format!(
                "account [{name}]: ca_file {} is writable by anyone: they could make popivr \
                 trust their own server",
                ca.display()
            ));
        }
        if a.timeout > LONG_LOGIN {
            out.push(format!(
                "account [{name}]: timeout = {}: while the server is unreachable each call \
                 waits that long for its pop",
                secs(a.timeout)
            ));
        }
    }
    for (name, p) in &config.profiles {
        profile_risks(config, name, p, &mut out);
    }
    out
}

fn profile_risks(config: &Config, name: &str, p: &Profile, out: &mut Vec<String>) {
    if p.timeout > LONG_HOLD {
        out.push(format!(
            "profile [{name}]: timeout = {}: a caller nobody answers stays on hold that long",
            secs(p.timeout)
        ));
    }
    if !needs_xmpp(p) {
        return;
    }
    if p.timeout < SHORT_HOLD {
        out.push(format!(
            "profile [{name}]: timeout = {}: agents have little time to read and reply",
            secs(p.timeout)
        ));
    }
    if let Some(account) = config.account_for(p) {
        if account.timeout >= p.timeout {
            out.push(format!(
                "profile [{name}]: the account's login timeout ({}) is not below the call's \
                 timeout ({}): with a slow server the default action comes before any pop",
                secs(account.timeout),
                secs(p.timeout)
            ));
        }
        let bare = account.username.split('/').next().unwrap_or_default();
        let own = config::normalize_jid(bare).ok();
        if let Some(own) = own.filter(|own| p.targets.contains(own)) {
            out.push(format!(
                "profile [{name}]: targets include popivr's own account {own}"
            ));
        }
    }
    if let Some(room) = &p.room
        && !room.allow_nicks.is_empty()
    {
        out.push(format!(
            "profile [{name}]: room_allow names nicks ({}): in a room that hides real JIDs \
             whoever joins with such a nick may answer; prefer JIDs and a room that shows \
             real JIDs to popivr",
            room.allow_nicks.join(", ")
        ));
    }
    let forwards_from_reply = p
        .replies
        .iter()
        .any(|r| r.action.kind == ActionKind::Forward(None));
    if forwards_from_reply {
        for pattern in p.forward_allow.iter().filter(|f| open_ended(f)) {
            out.push(format!(
                "profile [{name}]: forward_allow `{pattern}` matches numbers of any length \
                 (long distance, international, premium rate); list the numbers or \
                 fixed-length patterns agents may forward to"
            ));
        }
    }
}

/// An Asterisk pattern that ends in `.` or `!` matches without a length
/// limit.
fn open_ended(pattern: &str) -> bool {
    pattern.starts_with('_') && (pattern.ends_with('.') || pattern.ends_with('!'))
}

fn used_by_a_profile(config: &Config, account: &str) -> bool {
    config
        .profiles
        .values()
        .any(|p| needs_xmpp(p) && p.account == account)
}

fn secs(d: Duration) -> String {
    format!("{} s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "\
[pbx]
type = client
username = pbx@example.org
secret = s3cret-Value
serverhost = 127.0.0.1

[sales]
type = profile
account = pbx
targets = alice@example.org
reply = 1 -> continue desk
";

    fn risks_of(extra_account: &str, extra_profile: &str) -> Vec<String> {
        let text = BASE.replace(
            "serverhost = 127.0.0.1\n",
            &format!("serverhost = 127.0.0.1\n{extra_account}\n"),
        ) + extra_profile;
        let config = config::load_str(&text, "/nonexistent/popivr.conf").expect("valid");
        risks(&config, Path::new("/nonexistent/popivr.conf"))
    }

    #[test]
    fn a_plain_profile_has_no_risks() {
        assert_eq!(risks_of("", ""), Vec::<String>::new());
    }

    #[test]
    fn plaintext_is_a_risk() {
        let r = risks_of("usetls = no\nallow_plaintext = yes", "");
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].contains("unencrypted"), "{r:?}");
    }

    #[test]
    fn open_forwards_are_a_risk() {
        let r = risks_of("", "reply = fwd -> forward\nforward_allow = _2XXX, _0.\n");
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].contains("`_0.`"), "{r:?}");
        // A fixed number needs no pattern.
        let r = risks_of("", "reply = boss -> forward 2000\nforward_allow = _X!\n");
        assert_eq!(r, Vec::<String>::new());
    }

    #[test]
    fn odd_timeouts_are_risks() {
        let r = risks_of("timeout = 20", "timeout = 600\n");
        assert_eq!(r.len(), 2, "{r:?}");
        assert!(r[0].contains("account [pbx]: timeout = 20 s"), "{r:?}");
        assert!(r[1].contains("timeout = 600 s"), "{r:?}");
        let r = risks_of("timeout = 5", "timeout = 4\n");
        assert!(r.iter().any(|r| r.contains("little time")), "{r:?}");
        assert!(r.iter().any(|r| r.contains("before any pop")), "{r:?}");
    }

    #[test]
    fn answers_by_nick_are_a_risk() {
        let r = risks_of(
            "",
            "room = desk@conference.example.org\nroom_allow = alice@example.org, frontdesk\n",
        );
        assert_eq!(r.len(), 1, "{r:?}");
        assert!(r[0].contains("nicks (frontdesk)"), "{r:?}");
        let r = risks_of(
            "",
            "room = desk@conference.example.org\nroom_allow = alice@example.org\n",
        );
        assert_eq!(r, Vec::<String>::new());
    }

    #[test]
    fn popping_ourselves_is_a_risk() {
        let r = risks_of("", "targets = PBX@example.org\n");
        assert!(r.iter().any(|r| r.contains("own account")), "{r:?}");
    }

    #[test]
    fn the_sessions_note_follows_the_server_software() {
        let note = |name: &str| {
            sessions_note(&Ok(Software {
                name: name.to_string(),
                version: "1.0".to_string(),
            }))
        };
        let ejabberd = note("ejabberd");
        assert!(ejabberd.starts_with("server ejabberd 1.0: "), "{ejabberd}");
        for words in ["max_user_sessions", "10", "popivr serve", "raise the limit"] {
            assert!(ejabberd.contains(words), "{words}: {ejabberd}");
        }
        let prosody = note("Prosody");
        assert!(prosody.starts_with("server Prosody 1.0: "), "{prosody}");
        assert!(prosody.contains("no limit on sessions"), "{prosody}");
        assert!(!prosody.contains("popivr serve"), "{prosody}");
        let other = note("Openfire");
        assert_eq!(
            other,
            "server Openfire 1.0: its limit on sessions per account is unknown"
        );
        let silent = sessions_note(&Err("no answer within 2 s".to_string()));
        assert_eq!(
            silent,
            "server software unknown (no answer within 2 s): its limit on sessions per \
             account is unknown"
        );
    }

    #[test]
    fn risks_never_hold_the_secret() {
        let r = risks_of(
            "usetls = no\nallow_plaintext = yes\ntimeout = 30",
            "timeout = 1\n",
        );
        assert!(!r.is_empty());
        assert!(r.iter().all(|r| !r.contains("s3cret")), "{r:?}");
    }
}
