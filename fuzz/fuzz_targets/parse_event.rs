//! Any bytes into the event parser: it must never panic, an accepted line
//! must render back to the same event, and an error message must be one
//! printable ASCII line whatever the input held.
#![no_main]

use libfuzzer_sys::fuzz_target;
use popivr::eivr::parse_event;

fuzz_target!(|line: &[u8]| {
    match parse_event(line) {
        Ok(event) => {
            let wire = event.to_wire();
            assert_eq!(parse_event(wire.as_bytes()), Ok(event), "{wire:?}");
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.bytes().all(|b| (0x20..0x7f).contains(&b)), "{msg:?}");
        }
    }
});
