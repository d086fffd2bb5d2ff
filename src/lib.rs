//! popivr: interactive screen pops for Asterisk's ExternalIVR over XMPP.

pub mod call;
pub mod claim;
pub mod cli;
pub mod config;
pub mod eivr;
pub mod forward;
pub mod logging;
pub mod run;
pub mod serve;
pub mod template;
pub mod xmpp;
