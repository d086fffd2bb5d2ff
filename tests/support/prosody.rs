//! The throw-away prosody now lives in the library as
//! [`popivr::testbed`]; this keeps `support::prosody::*` working.

pub use popivr::testbed::*;
