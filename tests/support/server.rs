//! The two kinds of throw-away XMPP server a test runs against (prosody
//! and a stock ejabberd, `popivr_testkit::testbed`), started the same way, and the
//! popivr account section for either.

use popivr_testkit::testbed::{Ejabberd, Prosody, Server};

/// A server kind a test can be generic over: `S::start_with(users)`.
pub trait Start: Server + Sized + 'static {
    /// A server of this kind on 127.0.0.1 (ejabberd with Debian's stock
    /// config) with `users` (name, password) registered.
    fn start_with(users: &[(&str, &str)]) -> Self;
}

/// Both servers' builders read alike: `user(name, password)`, `start()`.
macro_rules! start_from_builder {
    ($($server:ident),*) => {$(
        impl Start for $server {
            fn start_with(users: &[(&str, &str)]) -> Self {
                users
                    .iter()
                    .fold($server::builder(), |b, (user, pw)| b.user(user, pw))
                    .start()
            }
        }
    )*};
}

start_from_builder!(Prosody, Ejabberd);

/// popivr's client section `[pbx]` for `user@domain` (password `secret`)
/// on `server`, trusting the test CA, then a blank line.
pub fn account_section(server: &(impl Server + ?Sized), user: &str, secret: &str) -> String {
    format!(
        "[pbx]\ntype = client\nserverhost = 127.0.0.1\nport = {port}\nusername = {jid}\n\
         secret = {secret}\nca_file = {ca}\n\n",
        port = server.port(),
        jid = server.jid(user),
        ca = server.ca_pem().display(),
    )
}
