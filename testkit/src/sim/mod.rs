//! An Asterisk-side simulator for tests and the demo.
//!
//! [`Sim`] runs a child exactly as `ExternalIVR()` does in process mode (or
//! connects to a server as in `ivr://` mode) and plays Asterisk's part on
//! its pipes or socket, as `externalivr-protocol.md`
//! describes (and `app_externalivr.c` implements). It shares no code with
//! popivr's own codec, so it is an independent check of it:
//!
//! - `ivr://host[:port](args)` runs the same session over TCP, as
//!   `app_externalivr.c` does: each address of the host in turn until one
//!   accepts (port 2949 unless given), events and commands on the one
//!   socket, no stderr, the `P` answer starting with `ivr://host:port`;
//!   the socket is closed at the end and nothing is waited for
//!   ([`Sim::wait_exit`] says [`ExitError::NoProcess`]);
//! - the child is started from the `cmd(arg1,arg2,...)[,options]` syntax
//!   ([`Invocation`]): no shell, no `PATH` search, an environment holding
//!   only `PATH` and what the test gives; stdin and stdout are piped and
//!   each stderr line is kept, as Asterisk copies it to its log;
//! - options `n` (not answered: playback gets `Z` until `T`), `i` (a hangup
//!   sends `I,<ts>,HANGUP` and the child must end with `H`) and `d`
//!   (already hung up; the channel was never answered, so without `n`
//!   ExternalIVR refuses to run at all, as a real Asterisk does);
//! - command lines are read as `ast_iostream_gets` reads them
//!   ([`lines::CommandInput`]): **one line per wake-up of the command fd**,
//!   so the tail of a burst waits in Asterisk's buffer until the child
//!   writes again (lines left there at the end are noted in the
//!   transcript); 1023 bytes at most per line (a longer line goes on as
//!   another command), stripped, lines under 3 bytes ignored, dispatched
//!   on their first byte;
//! - `P` (argv comma-joined, cut to 99 bytes like Asterisk's 100-byte
//!   buffer), `G` (plain variables from a table, missing → empty; dialplan functions
//!   such as `CALLERID(num)` and built-ins such as `EXTEN` read as empty,
//!   as on a real Asterisk), `V` (split on
//!   every comma and the first `=`; writes to names ending in `)` are
//!   recorded as function writes), `L`, `T`, `D`, `O`, `E`/`H` (answered,
//!   then the pipes are closed);
//! - a playlist against a table of sound files with play times, in real
//!   time: `S`, `A`, `I`, `Z` for unknown files or a channel that is not
//!   up, `silence/10` when empty (no events), `F` when a file ends, `T`/`D`
//!   on clears, autoclear on keys ([`channel`] has the details);
//! - keys, hangups and raw lines on cue ([`Cue`]); every line crossing the
//!   wire is kept in a timed [`Transcript`];
//! - after the session [`Sim::wait_exit`] checks that the child exits and
//!   how long it took after its stdin was closed.
//!
//! Writes to the child never block the simulator (a writer task with a
//! queue; at the end queued events get [`WRITE_GRACE`] before stdin is
//! closed anyway).
//!
//! One deliberate difference: Asterisk stops reading stderr the moment it
//! ends; the simulator first takes the stderr lines already in the pipe,
//! so a test sees what the child logged up to then.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use popivr_testkit::sim::{Next, Sim, SimConfig};
//!
//! let config = SimConfig::new("/usr/bin/popivr(keys)")
//!     .env("POPIVR_CONFIG", "/tmp/popivr.conf")
//!     .var("CALLERID(num)", "5551234")
//!     .sound("moh/a", Duration::from_secs(1));
//! let mut sim = Sim::start(config)?;
//! if let Next::Command(c) = sim.next_command(Duration::from_secs(2)).await {
//!     assert_eq!(c.line, "S,moh/a");
//! }
//! sim.key('1');
//! // ... expect V and E, then:
//! let exit = sim.wait_exit(Duration::from_secs(2)).await;
//! # Ok(()) }
//! ```
//!
//! [`script`] reads replay scripts (`protocol-tests/*.eivr`) and
//! [`replay`] runs them against a program with the simulator.

pub mod channel;
pub mod glob;
pub mod invocation;
pub mod lines;
pub mod replay;
pub mod script;
mod session;
pub mod transcript;

pub use channel::{Channel, EndReason, SILENCE};
pub use invocation::{Invocation, InvocationError, Options};
pub use session::{
    Cue, EXTERNALIVR_PORT, ExitError, ExitReport, Next, Received, SessionEnd, Sim, SimConfig,
    WRITE_GRACE,
};
pub use transcript::{Dir, Entry, Transcript};
