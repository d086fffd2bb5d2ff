//! Configuration loading end to end: the dialect, every kind of problem
//! with its file:line, xmpp.conf import, the shipped sample, and the
//! templates and forward checks as a call uses them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use popivr::config::{ActionKind, Config, ConfigError, load_file, load_str};
use popivr::forward;
use popivr::template::{self, Values};
use proptest::prelude::*;

const ACCOUNT: &str = "[pbx]\ntype = client\nusername = pbx@example.org/popivr\nsecret = hunter2\n";

fn load(text: &str) -> Config {
    load_str(text, "/etc/asterisk/popivr.conf").unwrap_or_else(|e| panic!("{e}"))
}

fn problems(text: &str) -> Vec<String> {
    let err: ConfigError = load_str(text, "p.conf")
        .map(|c| panic!("should fail, loaded {c:#?}"))
        .unwrap_err();
    err.problems.iter().map(ToString::to_string).collect()
}

/// Asserts that some problem starts with `at` and contains `what`.
fn has(problems: &[String], at: &str, what: &str) {
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with(&format!("{at}: ")) && p.contains(what)),
        "no problem at {at} with {what:?} in\n{}",
        problems.join("\n")
    );
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("popivr-cfg-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        set_mode(&p, 0o600);
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn a_full_config_becomes_the_expected_structs() {
    let c = load(&format!(
        "{ACCOUNT}serverhost = xmpp.example.org\nport = 5223\nusetls = yes\nusesasl = yes\n\
         allow_plaintext = no\ntimeout = 7\nstatusmessage = Pops\nbuddy = x@example.org\n\
         [sales]\ntype = profile\naccount = pbx\n\
         targets = Alice@Example.org, bob@example.org\n\
         hold = custom/hold-music, silence/1\n\
         variables = CALLERID(num), CALLERID(name), EXTEN, PJSIP_HEADER(read,X-Foo)\n\
         sip_headers = X-Customer-Id\n\
         template = Call from $caller_name$ <$caller$> to $number$ [sip.X-Customer-Id]\n\
         confirm = $caller$: $outcome$\nhelp = say 1\n\
         reply = 1, Desk -> continue desk\n\
         reply = 2 | vm -> continue voicemail prompt vm-intro\n\
         reply = fwd -> forward\nreply = h -> hangup\n\
         key = 0 -> continue operator\nkey = # -> forward 2000 prompt transfer\n\
         timeout = 2.5\ndefault = continue voicemail\n\
         forward_allow = _2XXX, _NXXNXXXXXX\n"
    ));
    assert!(
        c.warnings.iter().any(|w| w.contains("`buddy`")),
        "{:?}",
        c.warnings
    );

    let a = &c.accounts["pbx"];
    assert_eq!(a.name, "pbx");
    assert_eq!(a.username, "pbx@example.org/popivr");
    assert_eq!(a.secret, "hunter2");
    assert_eq!(a.serverhost.as_deref(), Some("xmpp.example.org"));
    assert_eq!(a.port, 5223);
    assert!(a.usetls && a.usesasl && !a.allow_plaintext);
    assert_eq!(a.timeout, Duration::from_secs(7));
    assert_eq!(a.statusmessage.as_deref(), Some("Pops"));
    assert_eq!(a.ca_file, None);
    assert_eq!(a.origin, "/etc/asterisk/popivr.conf:1");

    let p = &c.profiles["sales"];
    assert_eq!(p.name, "sales");
    assert_eq!(p.account, "pbx");
    assert_eq!(p.targets, ["alice@example.org", "bob@example.org"]);
    assert_eq!(p.hold, ["custom/hold-music", "silence/1"]);
    assert_eq!(
        p.variables,
        [
            "CALLERID(num)",
            "CALLERID(name)",
            "EXTEN",
            "PJSIP_HEADER(read,X-Foo)"
        ]
    );
    assert_eq!(p.sip_headers, ["X-Customer-Id"]);
    assert_eq!(
        p.template,
        "Call from $caller_name$ <$caller$> to $number$ [sip.X-Customer-Id]"
    );
    assert_eq!(p.confirm, "$caller$: $outcome$");
    assert_eq!(p.help, "say 1");
    let rules: Vec<(Vec<&str>, &ActionKind, Option<&str>)> = p
        .replies
        .iter()
        .map(|r| {
            let words = r.words.iter().map(String::as_str).collect();
            (words, &r.action.kind, r.action.prompt.as_deref())
        })
        .collect();
    assert_eq!(
        rules,
        [
            (
                vec!["1", "desk"],
                &ActionKind::Continue("desk".into()),
                None
            ),
            (
                vec!["2", "vm"],
                &ActionKind::Continue("voicemail".into()),
                Some("vm-intro")
            ),
            (vec!["fwd"], &ActionKind::Forward(None), None),
            (vec!["h"], &ActionKind::Hangup, None),
        ]
    );
    assert_eq!(p.keys.len(), 2);
    assert_eq!(p.keys[&'0'].kind, ActionKind::Continue("operator".into()));
    assert_eq!(p.keys[&'#'].kind, ActionKind::Forward(Some("2000".into())));
    assert_eq!(p.keys[&'#'].prompt.as_deref(), Some("transfer"));
    assert_eq!(p.timeout, Duration::from_millis(2500));
    assert_eq!(
        p.default_action.kind,
        ActionKind::Continue("voicemail".into())
    );
    assert_eq!(p.forward_allow, ["_2XXX", "_NXXNXXXXXX"]);
    assert_eq!(p.origin, "/etc/asterisk/popivr.conf:13");
    assert_eq!(c.account_for(p).map(|a| a.name.as_str()), Some("pbx"));
}

#[test]
fn defaults() {
    let c = load(&format!(
        "{ACCOUNT}[p]\ntype = profile\naccount = pbx\ntargets = a@example.org\n\
         reply = 1, desk -> continue desk\nreply = fwd -> forward\nforward_allow = 2001\n"
    ));
    let a = &c.accounts["pbx"];
    assert_eq!(a.port, 5222);
    assert!(a.usetls && a.usesasl && !a.allow_plaintext);
    assert_eq!(a.timeout, Duration::from_secs(5));
    assert_eq!(a.serverhost, None);
    let p = &c.profiles["p"];
    assert_eq!(p.hold, ["silence/1"]);
    assert_eq!(
        p.variables,
        [
            "POPIVR_CALLER_NUM",
            "POPIVR_CALLER_NAME",
            "POPIVR_EXTEN",
            "POPIVR_DNID",
            "POPIVR_UNIQUEID"
        ]
    );
    assert_eq!(p.timeout, Duration::from_secs(30));
    assert_eq!(
        p.default_action.kind,
        ActionKind::Continue("timeout".into())
    );
    assert_eq!(p.default_action.prompt, None);
    assert_eq!(p.confirm, "Call from $caller$: $outcome$");
    assert_eq!(p.help, "Reply 1 or desk (desk), fwd NUMBER (forward)");
    assert_eq!(
        p.template,
        "Call from $caller_name$ <$caller$> to $number$. Reply 1 or desk (desk), fwd NUMBER (forward)"
    );
    assert!(p.sip_headers.is_empty());
    assert!(p.keys.is_empty());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
}

/// `late_reply`: 10 s unless set; `0` turns the rule off; anything but
/// seconds is refused.
#[test]
fn late_reply_is_seconds_or_off() {
    let with = |v: &str| {
        let line = match v {
            "" => String::new(),
            v => format!("late_reply = {v}\n"),
        };
        format!("[p]\ntype = profile\nkey = 1 -> continue vm\n{line}")
    };
    let secs = |v: &str| load(&with(v)).profiles["p"].late_reply;
    assert_eq!(secs(""), Duration::from_secs(10));
    assert_eq!(secs("0"), Duration::ZERO);
    assert_eq!(secs("2.5"), Duration::from_millis(2500));
    for bad in ["-1", "soon", "0.0"] {
        has(&problems(&with(bad)), "p.conf:4", "[p] late_reply:");
    }
}

#[test]
fn a_keys_only_profile_needs_no_account() {
    let c = load("[night]\ntype = profile\nkey = 1 -> continue vm\ndefault = hangup\n");
    let p = &c.profiles["night"];
    assert!(p.targets.is_empty());
    assert_eq!(p.account, "");
    assert!(c.account_for(p).is_none());
    assert_eq!(p.default_action.kind, ActionKind::Hangup);
}

#[test]
fn inheritance_overrides_single_keys_and_adds_up_rules() {
    let c = load(&format!(
        "{ACCOUNT}[base](!)\ntype = profile\naccount = pbx\ntimeout = 10\nhold = a\n\
         reply = h -> hangup\nkey = 0 -> continue op\n\
         [tmpl2](!,base)\ntargets = a@example.org\n\
         [p](tmpl2)\ntimeout = 20\nreply = 1 -> continue desk\nkey = 1 -> continue one\n\
         [q](base)\n"
    ));
    let p = &c.profiles["p"];
    assert_eq!(p.timeout, Duration::from_secs(20));
    assert_eq!(p.hold, ["a"]);
    assert_eq!(p.targets, ["a@example.org"]);
    let words: Vec<&str> = p.replies.iter().map(|r| r.words[0].as_str()).collect();
    assert_eq!(words, ["h", "1"]);
    assert_eq!(p.keys.keys().collect::<String>(), "01");
    let q = &c.profiles["q"];
    assert_eq!(q.timeout, Duration::from_secs(10));
    assert!(q.targets.is_empty());
    // Templates are not profiles.
    assert_eq!(c.profiles.len(), 2);
}

#[test]
fn an_inherited_rule_given_again_is_a_duplicate_with_both_lines() {
    let e = problems(
        "[base](!)\ntype = profile\nkey = 0 -> hangup\n[p](base)\nkey = 0 -> continue op\n",
    );
    has(&e, "p.conf:5", "key `0` already has an action at p.conf:3");
}

#[test]
fn a_key_set_twice_warns_and_the_last_counts() {
    let c = load("[p]\ntype = profile\ntimeout = 5\ntimeout = 6\nkey = 1 -> hangup\n");
    assert_eq!(c.profiles["p"].timeout, Duration::from_secs(6));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.starts_with("/etc/asterisk/popivr.conf:4: ") && w.contains(":3")),
        "{:?}",
        c.warnings
    );
}

#[test]
fn every_problem_names_its_file_and_line() {
    let text = "\
[general]
xmpp_conf =
colour = blue
[acct]
type = client
username = not-a-jid
secret = hunter2
port = 0
usetls = no
usesasl = no
timeout = -1
secert = hunter2
forceoldssl = yes
oauth_clientid = abc
ca_file = /nonexistent/ca.pem
usetls = maybe
[nouser]
type = client
[p]
type = profile
account = missing
targets = ok@example.org, alice@example.org/phone, garbage
hold = bad file, a
reply = 1 -> continue desk
reply = 1 -> hangup
reply = fwd -> forward
reply = x -> jump
reply = no arrow
key = 12 -> hangup
key = 1 -> hangup
key = 1 -> continue again
key = 2 -> forward
timeout = 0
default = forward
forward_allow = _2XX[, 20a1
variables = A B
sip_headers = X Y
template =
[q]
type = widget
[r]
account = x
[p2]
type = profile
targets = a@example.org
[hp]
type = profile
hold = beep
key = 1 -> hangup prompt beep
";
    let e = problems(text);
    let expect = [
        ("p.conf:2", "[general] xmpp_conf: is empty"),
        ("p.conf:3", "[general]: unknown key `colour`"),
        ("p.conf:6", "[acct] username: not a JID"),
        ("p.conf:8", "[acct] port: must be a port number"),
        ("p.conf:16", "[acct] usetls: `maybe` is not yes or no"),
        (
            "p.conf:10",
            "[acct] usesasl: popivr always logs in with SASL",
        ),
        (
            "p.conf:11",
            "[acct] timeout: `-1` is not a number of seconds",
        ),
        ("p.conf:12", "unknown key `secert` (did you mean `secret`?)"),
        (
            "p.conf:13",
            "[acct] forceoldssl: direct TLS is not supported",
        ),
        (
            "p.conf:14",
            "[acct] oauth_clientid: OAuth login is not supported",
        ),
        (
            "p.conf:15",
            "[acct] ca_file: no such file: /nonexistent/ca.pem",
        ),
        ("p.conf:17", "[nouser]: `username` is required"),
        ("p.conf:17", "[nouser]: `secret` is required"),
        (
            "p.conf:22",
            "[p] targets: `alice@example.org/phone`: a resource",
        ),
        ("p.conf:22", "[p] targets: `garbage`: not a JID"),
        ("p.conf:23", "[p] hold: sound file `bad file`"),
        (
            "p.conf:25",
            "[p] reply: reply word `1` is already used at p.conf:24",
        ),
        ("p.conf:26", "`forward_allow` must say"),
        ("p.conf:27", "unknown action `jump`"),
        ("p.conf:28", "expected `WORD[, WORD…] -> ACTION`"),
        ("p.conf:29", "`12` is not one DTMF key"),
        ("p.conf:31", "key `1` already has an action at p.conf:30"),
        ("p.conf:32", "a key press brings no number"),
        ("p.conf:33", "[p] timeout: must be more than 0"),
        ("p.conf:34", "a timeout brings no number"),
        (
            "p.conf:35",
            "[p] forward_allow: `_2XX[`: `[` without a closing `]`",
        ),
        ("p.conf:35", "[p] forward_allow: `20a1`: a literal number"),
        (
            "p.conf:36",
            "[p] variables: variable `A B` may not hold ' '",
        ),
        ("p.conf:37", "[p] sip_headers: header `X Y`"),
        ("p.conf:38", "[p] template: is empty"),
        (
            "p.conf:40",
            "[q] type: expected `client`, `profile`, `agent` or `group`",
        ),
        ("p.conf:41", "[r]: has no `type`"),
        (
            "p.conf:43",
            "[p2]: `account` is required (the profile has targets",
        ),
        ("p.conf:49", "`beep` is also hold audio"),
    ];
    for (at, what) in expect {
        has(&e, at, what);
    }
    // `usetls = no` is covered by the later `usetls = maybe`; its own error
    // shows in a smaller config below. The missing account [missing] is
    // only checked once [p] itself is valid.
    assert!(e.len() >= expect.len(), "{}", e.join("\n"));

    // Display lists them all, one a line, each with its place.
    let shown = load_str(text, "p.conf").unwrap_err().to_string();
    assert!(shown.starts_with(&format!("{} problems in the configuration:", e.len())));
    assert_eq!(shown.lines().count(), e.len() + 1);
    assert!(shown.lines().skip(1).all(|l| l.starts_with("  p.conf:")));
}

#[test]
fn sip_headers_with_a_space_name_the_header() {
    let e = problems("[p]\ntype = profile\nsip_headers = X-A, X B\n");
    has(&e, "p.conf:3", "header `X B`");
}

#[test]
fn plaintext_needs_allow_plaintext() {
    let e = problems(&format!("{ACCOUNT}usetls = no\n"));
    has(
        &e,
        "p.conf:5",
        "[pbx] usetls: `usetls = no` sends the password unencrypted",
    );
    let c = load(&format!("{ACCOUNT}usetls = no\nallow_plaintext = yes\n"));
    assert!(!c.accounts["pbx"].usetls);
}

#[test]
fn a_profile_must_name_an_existing_account() {
    let e = problems("[p]\ntype = profile\naccount = nope\ntargets = a@example.org\n");
    has(&e, "p.conf:3", "no usable account [nope]");
}

#[test]
fn ini_syntax_errors_come_through_with_their_lines() {
    let e = problems("[a]\ntype = profile\nthis line has no equals\n[b](nope)\n#exec date\n");
    has(&e, "p.conf:3", "no `=`");
    has(&e, "p.conf:4", "unknown template [nope]");
    has(&e, "p.conf:5", "`#exec` is not supported");
}

#[test]
fn secrets_never_show() {
    let secret = "hunter2-Sup3rS3cret";
    let text = format!(
        "[pbx]\ntype = client\nusername = bad\nsecret = {secret}\nsecert = {secret}\n\
         oauth_secret = {secret}\nrefresh_token = {secret}\nsecret = \n"
    );
    let err = load_str(&text, "s.conf").unwrap_err();
    assert_eq!(err.problems.len(), 5, "{err}");
    assert!(!err.to_string().contains(secret), "{err}");
    assert!(!format!("{err:?}").contains(secret));
    // A line the INI parser cannot read is not quoted either.
    let err = load_str(&format!("[pbx]\nsecret {secret}\n"), "s.conf").unwrap_err();
    assert!(!err.to_string().contains(secret), "{err}");

    // A good config: Debug of the whole thing hides the secret.
    let good = load(&format!(
        "[pbx]\ntype = client\nusername = a@example.org\nsecret = {secret}\n"
    ));
    assert_eq!(good.accounts["pbx"].secret, secret);
    assert!(!format!("{good:?}").contains(secret));
    assert!(!good.warnings.iter().any(|w| w.contains(secret)));
    let ini = popivr::config::parse_ini_str(&text, "s.conf").unwrap();
    assert!(!format!("{ini:?}").contains(secret));
}

#[test]
fn agents_and_their_values() {
    let c = load(&format!(
        "{ACCOUNT}[agent](!)\ntype = agent\nvalue = site=Berlin\n\
         [Alice@Example.org](agent)\nvalue = desk = 2001\n\
         [bob](agent)\njid = bob@example.org\nvalue = site=Hamburg\nvalue = desk=2002\n\
         [p]\ntype = profile\naccount = pbx\ntargets = alice@example.org\n\
         confirm = $outcome$ at desk $desk$ in $site$\n"
    ));
    assert_eq!(c.agents.len(), 2);
    let alice = c.agent_values("ALICE@example.org").unwrap();
    assert_eq!(alice["desk"], "2001");
    assert_eq!(alice["site"], "Berlin");
    let bob = c.agent_values("bob@example.org").unwrap();
    assert_eq!(bob["site"], "Hamburg");
    assert_eq!(c.agents["bob@example.org"].name, "bob");
    assert!(c.agent_values("carol@example.org").is_none());
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);

    let mut v = Values {
        outcome: "desk".into(),
        ..Values::default()
    };
    v.custom = bob.clone();
    assert_eq!(
        template::render(&c.profiles["p"].confirm, &v),
        "desk at desk 2002 in Hamburg"
    );
}

#[test]
fn agent_problems() {
    let e = problems(
        "[nojid]\ntype = agent\n[a]\ntype = agent\njid = a@b/c\n\
         [b@example.org]\ntype = agent\nvalue = caller=x\nvalue = no-dash=1\nvalue = nothing\n",
    );
    has(&e, "p.conf:1", "[nojid] jid: not a JID");
    has(&e, "p.conf:5", "[a] jid: a resource");
    has(&e, "p.conf:8", "`$caller$` is a built-in placeholder");
    has(&e, "p.conf:9", "`no-dash`: names are");
    has(&e, "p.conf:10", "expected `value = NAME=TEXT`");
}

#[test]
fn two_agents_with_one_jid() {
    let e = problems("[x@example.org]\ntype = agent\n[again]\ntype = agent\njid = X@EXAMPLE.org\n");
    has(
        &e,
        "p.conf:3",
        "agent x@example.org is already defined at p.conf:1",
    );
}

#[test]
fn warnings_for_placeholders_that_stay_empty() {
    let c = load(&format!(
        "{ACCOUNT}[p]\ntype = profile\naccount = pbx\ntargets = a@example.org\n\
         variables = POPIVR_EXTEN\n\
         template = $caller$ [sip.X-Nope] $outcome$ $mystery$ ${{ARG}} $number$\n\
         confirm = $outcome$\n"
    ));
    let w = c.warnings.join("\n");
    for what in [
        "$caller$ is always empty: `variables` lacks POPIVR_CALLER_NUM",
        "[sip.X-Nope] is always empty: `sip_headers` does not list it",
        "$outcome$ is always empty: it only has a value in `confirm`",
        "$mystery$ is always empty: it is neither built in",
    ] {
        assert!(w.contains(what), "{what:?} missing in\n{w}");
    }
    assert!(!w.contains("${ARG}") && !w.contains("$number$"), "{w}");
    assert!(
        c.warnings
            .iter()
            .all(|l| l.starts_with("/etc/asterisk/popivr.conf:10: "))
    );
}

#[test]
fn variables_that_g_cannot_read_are_named() {
    let c = load(&format!(
        "{ACCOUNT}[p]\ntype = profile\naccount = pbx\n\
         variables = CALLERID(num), EXTEN, MY_VAR\n"
    ));
    let w = c.warnings.join("\n");
    for name in ["CALLERID(num)", "EXTEN"] {
        let what = format!(
            "[p] variables: {name} always reads as empty: Asterisk's G reads plain channel variables only"
        );
        assert!(w.contains(&what), "{what:?} missing in\n{w}");
    }
    assert!(!w.contains("MY_VAR"), "{w}");
}

#[test]
fn includes_are_relative_to_the_including_file() {
    let d = TempDir::new("inc");
    std::fs::create_dir_all(d.0.join("popivr.d")).unwrap();
    d.write("popivr.d/accounts.conf", ACCOUNT);
    d.write(
        "popivr.d/profiles.conf",
        "[p]\ntype = profile\naccount = pbx\ntargets = a@example.org\nport = 1\n",
    );
    let main = d.write(
        "popivr.conf",
        "#include \"popivr.d/accounts.conf\"\n#include popivr.d/profiles.conf\n",
    );
    let err = load_file(&main).unwrap_err();
    let at = format!("{}:5", d.0.join("popivr.d/profiles.conf").display());
    has(
        &err.problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        &at,
        "unknown key `port`",
    );

    d.write(
        "popivr.d/profiles.conf",
        "[p]\ntype = profile\naccount = pbx\ntargets = a@example.org\n",
    );
    let c = load_file(&main).unwrap();
    assert_eq!(c.profiles["p"].account, "pbx");
    assert!(c.accounts["pbx"].origin.ends_with("accounts.conf:1"));
}

#[test]
fn accounts_come_from_xmpp_conf() {
    let d = TempDir::new("xmpp");
    d.write(
        "xmpp.conf",
        "[general]\ndebug = no\nautoprune = no\n\
         [asterisk]\ntype = client\nserverhost = xmpp.example.org\n\
         username = pbx@example.org/pbx\nsecret = s3cret\nport = 5222\nusetls = yes\n\
         usesasl = yes\nbuddy = agent@example.org\nstatusmessage = Asterisk\ntimeout = 5\n\
         [other]\ntype = client\nusername = o@example.org\nsecret = x\n\
         [lan]\ntype = client\nusername = lan@example.org\nsecret = x\nusetls = no\n\
         [component]\ntype = component\n",
    );
    let main = d.write(
        "popivr.conf",
        "[general]\nxmpp_conf = xmpp.conf\n\
         [other]\ntype = client\nusername = mine@example.org\nsecret = y\n\
         [p]\ntype = profile\naccount = asterisk\ntargets = a@example.org\n\
         [q]\ntype = profile\naccount = other\ntargets = a@example.org\n",
    );
    let c = load_file(&main).unwrap();
    assert_eq!(
        c.general.xmpp_conf.as_deref(),
        Some(d.0.join("xmpp.conf").as_path())
    );
    let a = &c.accounts["asterisk"];
    assert_eq!(a.username, "pbx@example.org/pbx");
    assert_eq!(a.secret, "s3cret");
    assert_eq!(a.serverhost.as_deref(), Some("xmpp.example.org"));
    assert!(a.origin.contains("xmpp.conf:4"), "{}", a.origin);
    // popivr.conf wins by name.
    assert_eq!(c.accounts["other"].username, "mine@example.org");
    // An account popivr cannot use, that no profile uses: left out, noted.
    assert!(!c.accounts.contains_key("lan"));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("[lan] is left out") && w.contains("usetls")),
        "{:?}",
        c.warnings
    );
    // xmpp.conf's own keys are normal there: no notes for them.
    assert!(
        !c.warnings.iter().any(|w| w.contains("buddy")),
        "{:?}",
        c.warnings
    );

    // Used by a profile, its problems are errors.
    let main = d.write(
        "popivr.conf",
        "[general]\nxmpp_conf = xmpp.conf\n[p]\ntype = profile\naccount = lan\ntargets = a@example.org\n",
    );
    let err = load_file(&main).unwrap_err();
    let at = format!("{}:23", d.0.join("xmpp.conf").display());
    let e: Vec<String> = err.problems.iter().map(ToString::to_string).collect();
    has(&e, &at, "`usetls = no` sends the password unencrypted");
}

#[test]
fn a_missing_xmpp_conf_is_an_error() {
    let e = problems("[general]\nxmpp_conf = /nonexistent/xmpp.conf\n");
    has(&e, "p.conf:2", "cannot read: /nonexistent/xmpp.conf");
}

#[test]
fn a_secret_others_can_read_is_warned_about() {
    let d = TempDir::new("mode");
    let f = d.write("popivr.conf", ACCOUNT);
    let c = load_file(&f).unwrap();
    assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    set_mode(&f, 0o644);
    let c = load_file(&f).unwrap();
    assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
    let w = &c.warnings[0];
    assert!(w.starts_with(&format!("{}:4: ", f.display())), "{w}");
    assert!(w.contains("others can read") && w.contains("644"), "{w}");
    assert!(!w.contains("hunter2"));
}

#[test]
fn ca_file_is_relative_to_its_file() {
    let d = TempDir::new("ca");
    d.write("ca.pem", "-----BEGIN CERTIFICATE-----\n");
    let f = d.write("popivr.conf", &format!("{ACCOUNT}ca_file = ca.pem\n"));
    let c = load_file(&f).unwrap();
    assert_eq!(
        c.accounts["pbx"].ca_file.as_deref(),
        Some(d.0.join("ca.pem").as_path())
    );
}

#[test]
fn the_shipped_sample_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("dialplan/popivr.conf.sample");
    let c = load_file(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        c.profiles.keys().collect::<Vec<_>>(),
        ["night", "sales", "support"]
    );
    let sales = &c.profiles["sales"];
    assert_eq!(sales.targets, ["alice@example.org", "bob@example.org"]);
    assert_eq!(sales.replies.len(), 5);
    assert_eq!(sales.keys.len(), 2);
    assert!(c.profiles["night"].targets.is_empty());
    assert_eq!(c.agents.len(), 2);
    // The only warning: the sample file itself is world-readable in a
    // checkout, and it holds a (dummy) secret.
    assert!(
        c.warnings.iter().all(|w| w.contains("others can read")),
        "{:#?}",
        c.warnings
    );
}

#[test]
fn a_call_renders_its_pop_safely() {
    let c = load(&format!(
        "{ACCOUNT}[p]\ntype = profile\naccount = pbx\ntargets = a@example.org\n\
         sip_headers = X-Customer-Id\n\
         template = $caller_name$ <$caller$> [sip.X-Customer-Id] ${{EXTEN}}\n"
    ));
    let p = &c.profiles["p"];
    let mut v = Values {
        caller: "+4930\u{202E}123".into(),
        caller_name: "$caller$ ${EXTEN} [sip.X-Customer-Id]\r\nInjected: 1".into(),
        ..Values::default()
    };
    v.vars.insert("EXTEN".into(), "2000".into());
    v.sip.insert("X-Customer-Id".into(), "C-42".into());
    assert_eq!(
        template::render(&p.template, &v),
        "$caller$ ${EXTEN} [sip.X-Customer-Id]  Injected: 1 <+4930123> C-42 2000"
    );
    let url = template::render_url("https://crm.example/?n=$caller_name$&c=$caller$", &v);
    assert_eq!(
        url,
        "https://crm.example/?n=%24caller%24%20%24%7BEXTEN%7D%20%5Bsip.X-Customer-Id%5D%20%20Injected%3A%201&c=%2B4930123"
    );
}

#[test]
fn forward_numbers_against_a_profile() {
    let c = load(&format!(
        "{ACCOUNT}[p]\ntype = profile\naccount = pbx\ntargets = a@example.org\n\
         reply = fwd -> forward\nforward_allow = _2XXX, _0[1-9]X., 0800123456\n"
    ));
    let allow = &c.profiles["p"].forward_allow;
    for n in ["2000", "2999", "030123", "0800123456"] {
        assert!(forward::allowed(n, allow), "{n}");
    }
    for n in [
        "3000",
        "200",
        "20000",
        "00123",
        "030",
        "0080012345",
        "2000;x",
        "2 000",
    ] {
        assert!(!forward::allowed(n, allow), "{n}");
    }
}

/// Text that looks like config, with the characters that break parsers.
fn configish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("[".to_string()),
        Just("]".to_string()),
        Just("(".to_string()),
        Just(")".to_string()),
        Just("!".to_string()),
        Just("+".to_string()),
        Just(",".to_string()),
        Just("=".to_string()),
        Just("=>".to_string()),
        Just("->".to_string()),
        Just(";".to_string()),
        Just(";--".to_string()),
        Just("--;".to_string()),
        Just("\\;".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("#include x".to_string()),
        Just("#exec y".to_string()),
        Just("type = profile\n".to_string()),
        Just("type = client\n".to_string()),
        Just("type = agent\n".to_string()),
        Just("reply = ".to_string()),
        Just("key = ".to_string()),
        Just("targets = ".to_string()),
        Just("forward_allow = _".to_string()),
        Just("continue".to_string()),
        Just("forward".to_string()),
        Just("prompt".to_string()),
        Just("@".to_string()),
        Just("/".to_string()),
        Just("\u{feff}".to_string()),
        "[a-z0-9 ]{0,8}",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..40).prop_map(|v| v.concat())
}

fn templatish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("$".to_string()),
        Just("$$".to_string()),
        Just("${".to_string()),
        Just("}".to_string()),
        Just("[sip.".to_string()),
        Just("]".to_string()),
        Just("$caller$".to_string()),
        Just("caller".to_string()),
        "[a-zA-Z0-9_.-]{0,6}",
        any::<String>(),
    ];
    prop::collection::vec(piece, 0..30).prop_map(|v| v.concat())
}

proptest! {
    #[test]
    fn the_loader_never_panics(text in configish()) {
        let _ = load_str(&text, "fuzz.conf");
    }

    #[test]
    fn the_ini_parser_never_panics_on_any_string(text in any::<String>()) {
        let _ = popivr::config::parse_ini_str(&text, "fuzz.conf");
    }

    #[test]
    fn rendering_never_panics_and_values_stay_literal(
        t in templatish(),
        name in templatish(),
    ) {
        let v = Values { caller_name: name.clone(), ..Values::default() };
        let _ = template::render(&t, &v);
        let _ = template::render_url(&t, &v);
        let _ = template::placeholders(&t);
        // A value is inserted as it is (once cleaned), never expanded.
        prop_assert_eq!(template::render("$caller_name$", &v), template::clean(&name));
    }

    #[test]
    fn url_values_hold_only_unreserved_and_escapes(name in any::<String>()) {
        let v = Values { caller_name: name, ..Values::default() };
        let out = template::render_url("$caller_name$", &v);
        prop_assert!(out.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)));
    }

    #[test]
    fn forward_never_lets_a_bad_number_through(n in any::<String>(), p in "_?[0-9XZN.!\\[\\]-]{0,8}") {
        if forward::allowed(&n, &[p]) {
            prop_assert!(forward::valid_number(&n));
        }
    }
}

#[test]
fn a_broken_popivr_account_does_not_fall_back_to_xmpp_conf() {
    let d = TempDir::new("shadow");
    d.write(
        "xmpp.conf",
        "[pbx]\ntype = client\nusername = pbx@example.org\nsecret = x\n",
    );
    let main = d.write(
        "popivr.conf",
        "[general]\nxmpp_conf = xmpp.conf\n[pbx]\ntype = client\nusername = broken\nsecret = y\n",
    );
    let e: Vec<String> = load_file(&main)
        .unwrap_err()
        .problems
        .iter()
        .map(ToString::to_string)
        .collect();
    has(
        &e,
        &format!("{}:5", main.display()),
        "[pbx] username: not a JID",
    );
    assert_eq!(e.len(), 1, "{e:?}");
}

#[test]
fn groups_expand_in_targets_in_order_without_repeats() {
    let c = load(&format!(
        "{ACCOUNT}[team]\ntype = group\nmembers = B@example.org, c@example.org\n\
         [p]\ntype = profile\naccount = pbx\n\
         targets = a@example.org, @TEAM, c@example.org\n"
    ));
    assert_eq!(
        c.profiles["p"].targets,
        ["a@example.org", "b@example.org", "c@example.org"]
    );
    assert_eq!(c.groups["team"].members.len(), 2);
}

#[test]
fn team_mode_and_room_keys_are_checked() {
    let e = problems(&format!(
        "{ACCOUNT}[p]\ntype = profile\naccount = pbx\ntargets = @nobody\n\
         mode = broadcast\npresence = sometimes\nnobody = shrug\npresence_wait = 0\n\
         [r]\ntype = profile\naccount = pbx\nmode = route\nroom = sales@conference.example.org\n\
         [n]\ntype = profile\nmode = notify\n\
         [g]\ntype = group\n\
         [x@example.org]\ntype = agent\nexten = 20 01\npriority = first\n"
    ));
    has(
        &e,
        "p.conf:8",
        "[p] targets: `@nobody`: no `type = group` section [nobody]",
    );
    has(
        &e,
        "p.conf:9",
        "[p] mode: expected one of interactive, notify, route, missed",
    );
    has(
        &e,
        "p.conf:10",
        "[p] presence: expected one of available, away, busy, any",
    );
    has(
        &e,
        "p.conf:11",
        "[p] nobody: expected one of default, pop, missed",
    );
    has(
        &e,
        "p.conf:12",
        "[p] presence_wait: must be more than 0 seconds",
    );
    has(
        &e,
        "p.conf:17",
        "[r] room: `mode = route` picks one agent by presence",
    );
    has(
        &e,
        "p.conf:13",
        "[r]: `targets` is required (`mode = route` picks one of them)",
    );
    has(
        &e,
        "p.conf:18",
        "[n]: `targets` is required (this mode only sends messages)",
    );
    has(&e, "p.conf:21", "[g]: `members` is required");
    has(&e, "p.conf:25", "[x@example.org] exten: use 1 to 32 of");
    has(
        &e,
        "p.conf:26",
        "[x@example.org] priority: expected a whole number",
    );
}

#[test]
fn room_allow_splits_jids_from_nicks_and_defaults_to_the_targets() {
    let c = load(&format!(
        "{ACCOUNT}[a]\ntype = profile\naccount = pbx\ntargets = t@example.org\n\
         room = Sales@Conference.example.org\nnick = Switch Board\n\
         room_allow = Al@example.org, desk 1\n\
         [b]\ntype = profile\naccount = pbx\ntargets = t@example.org\n\
         room = sales@conference.example.org\n"
    ));
    let a = c.profiles["a"].room.as_ref().unwrap();
    assert_eq!(a.jid, "sales@conference.example.org");
    assert_eq!(a.nick, "Switch Board");
    assert_eq!(a.allow_jids, ["al@example.org"]);
    assert_eq!(a.allow_nicks, ["desk 1"]);
    let b = c.profiles["b"].room.as_ref().unwrap();
    assert_eq!(b.nick, "popivr");
    assert_eq!(b.allow_jids, ["t@example.org"]);
    assert!(b.allow_nicks.is_empty());
}

#[test]
fn reply_rules_in_a_mode_that_does_not_wait_are_flagged() {
    let c = load(&format!(
        "{ACCOUNT}[p]\ntype = profile\naccount = pbx\ntargets = a@example.org\n\
         mode = notify\nreply = 1 -> continue desk\n"
    ));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.contains("`reply` rules do nothing in this mode")),
        "{:?}",
        c.warnings
    );
}
