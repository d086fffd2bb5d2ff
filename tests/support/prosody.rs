//! The throw-away prosody now lives in the library as
//! [`popivr_testkit::testbed`]; this keeps `support::prosody::*` working.

pub use popivr_testkit::testbed::*;
