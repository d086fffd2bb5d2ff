//! Shared helpers for integration tests: a throw-away prosody or
//! ejabberd, a test XMPP client and what the real-Asterisk suites read
//! back. Use with `mod support;` from a test file.

// Each test binary uses a different subset.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod agent;
pub mod pbx;
pub mod prosody;
pub mod real;
pub mod server;

pub use agent::{TestAgent, TestMessage, WAIT, Wrapper, body, subscribe};
pub use prosody::{Prosody, TestCa, free_port};
pub use server::{Start, account_section};
