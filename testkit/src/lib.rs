//! popivr's bench, apart from the product: the Asterisk simulator that
//! speaks ExternalIVR as a real Asterisk reads it ([`sim`], with the
//! replay runner of `protocol-tests/`), and throw-away servers for tests,
//! benchmarks and the demo ([`testbed`]: prosody, ejabberd, a real
//! Asterisk, a test CA). The programs beside it: `popivr-demo` (one call
//! end to end, `.ci/demo`) and `popivr-man` (the man pages, at packaging
//! time). Nothing here is in the `popivr` binary Asterisk starts.

pub mod sim;
pub mod testbed;
