//! The bodies of Sluice's fuzz targets, one plain function per input that a peer, a packet or a
//! file controls. `fuzz/fuzz_targets/*.rs` wrap each in libFuzzer's `fuzz_target!`, and
//! `tests/replay.rs` feeds every committed corpus and regression file through the same
//! functions in the normal `cargo test`, so CI replays them without a sanitizer build.
//!
//! A target panics only when an invariant of ours fails (a parsed message that does not
//! survive re-encoding, an answer we built that does not parse); every error a hostile input
//! causes must come back as a typed error instead.
//!
//! Stateful targets read their input as a sequence of operations ([`Ops`]).

pub mod config;
pub mod connector_record;
pub mod dns;
pub mod engine;
pub mod packet;
pub mod policy;
pub mod relay;
pub mod revocation;
pub mod terminator;
pub mod wire;

pub mod fixtures;

// Each target at the crate's root, as the fuzzers call it (a function and its module share a
// name: they live in different namespaces).
pub use config::config;
pub use connector_record::connector_record;
pub use dns::dns;
pub use engine::engine_device;
pub use packet::packet;
pub use policy::policy;
pub use relay::relay;
pub use revocation::revocation;
pub use terminator::terminator;
pub use wire::{control_message, control_stream, datagram, punch};

/// A target's body: one input in, a panic only for a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name its fuzzer binary, corpus and regression folders have.
pub const TARGETS: &[(&str, Target)] = &[
    ("packet", packet::packet),
    ("engine_device", engine::engine_device),
    ("control_message", wire::control_message),
    ("control_stream", wire::control_stream),
    ("datagram", wire::datagram),
    ("punch", wire::punch),
    ("relay", relay::relay),
    ("dns", dns::dns),
    ("terminator", terminator::terminator),
    ("policy", policy::policy),
    ("config", config::config),
    ("revocation", revocation::revocation),
    ("connector_record", connector_record::connector_record),
];

/// A stateful target's input: operations `[tag u8][length u16 BE][length bytes]`, the last
/// one cut short where the input ends. A simple framing rather than `arbitrary`'s, so seeds
/// from real traffic are easy to write (see `fuzz/seeds.py`) and to read in a hex dump.
pub struct Ops<'a>(pub &'a [u8]);

impl<'a> Iterator for Ops<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let (&tag, rest) = self.0.split_first()?;
        let (len, rest) = match rest {
            [a, b, rest @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), rest),
            _ => (0, &[][..]),
        };
        let (body, rest) = rest.split_at(len.min(rest.len()));
        self.0 = rest;
        Some((tag, body))
    }
}

/// Appends one operation in [`Ops`] framing (for seed writers and tests).
pub fn put_op(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    out.push(tag);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body[..usize::from(len)]);
}

/// The first bytes of `b` as a number (missing bytes are 0).
fn num(b: &[u8]) -> u64 {
    b.iter().take(8).fold(0, |n, &x| n << 8 | u64::from(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_frame_and_cut_short() {
        let mut b = Vec::new();
        put_op(&mut b, 1, b"abc");
        put_op(&mut b, 2, b"");
        b.extend_from_slice(&[3, 0, 9, b'x']);
        let ops: Vec<_> = Ops(&b).collect();
        assert_eq!(ops, vec![(1, &b"abc"[..]), (2, &b""[..]), (3, &b"x"[..])]);
        assert_eq!(Ops(&[7]).collect::<Vec<_>>(), vec![(7, &b""[..])]);
    }

    #[test]
    fn target_names_are_unique() {
        let mut names: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TARGETS.len());
    }
}
