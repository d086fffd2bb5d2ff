//! The demo's embedded configuration: one account for popivr, one agent,
//! one profile, written to a private temp file for the real binary.

use popivr_testkit::testbed::Prosody;

/// The popivr account's user name on the throw-away server.
pub const PBX_USER: &str = "pbx";
/// The agent's user name.
pub const AGENT_USER: &str = "alice";
/// The profile the demo call runs.
pub const PROFILE: &str = "sales";
/// What the dialplan passes after the profile (`${queue}` in the pop).
pub const ARGS: &[&str] = &["queue=Support"];

/// The caller's channel, as Asterisk would answer `G` for it.
pub const CALLER_NUM: &str = "+4930555123";
pub const CALLER_NAME: &str = "Jane Doe";
pub const EXTEN: &str = "200";

/// The hold file and how long it plays: short, so the transcript shows
/// the loop (each `F` queues it again).
pub const HOLD: &str = "custom/hold-music";
pub const HOLD_SECONDS: f64 = 0.8;

/// `popivr.conf` for the demo. `{…}` fields are filled in by [`render`].
const TEMPLATE: &str = "\
; popivr demo: the configuration this call runs with.
; Everything below also works in /etc/asterisk/popivr.conf.

[pbx]                             ; popivr's own XMPP account
type = client
username = {pbx_jid}/demo
secret = {secret}
serverhost = 127.0.0.1            ; the throw-away prosody
port = {port}
ca_file = {ca_file}               ; its private CA
timeout = 5

[{agent_jid}]                     ; values the agent's own texts may use
type = agent
value = desk=2001

[sales]
type = profile
account = pbx
targets = {agent_jid}
hold = {hold}
template = Call from $caller_name$ <$caller$> to $number$ (${queue}). Reply 1 desk, 2 voicemail, fwd NUMBER, h hang up
confirm = Call from $caller$: $outcome$ (desk $desk$)
reply = 1, desk -> continue desk
reply = 2, vm, voicemail -> continue voicemail prompt vm-intro
reply = fwd -> forward
reply = h, hangup -> hangup
key = 0 -> continue operator
timeout = 30
default = continue voicemail
forward_allow = _2XXX
";

/// The configuration for `server`, with `secret` for the popivr account.
pub fn render(server: &Prosody, secret: &str) -> String {
    TEMPLATE
        .replace("{pbx_jid}", &server.jid(PBX_USER))
        .replace("{agent_jid}", &server.jid(AGENT_USER))
        .replace("{port}", &server.port().to_string())
        .replace("{ca_file}", &server.ca_pem().display().to_string())
        .replace("{hold}", HOLD)
        .replace("{secret}", secret)
}

/// A random password (hex), from the kernel.
pub fn random_secret() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
