//! Placeholder rendering for pops and confirmations.
