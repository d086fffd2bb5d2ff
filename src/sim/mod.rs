//! An Asterisk-side simulator for tests and the demo.
