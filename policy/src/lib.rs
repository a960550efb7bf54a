//! Sluice access policy: the YAML format admins write ([`model`]), its validation with errors
//! that name file, line, column and key ([`compile`]), the compiled matcher that decides a flow
//! in a few lookups ([`matcher`]), per-flow caching, reloading and the audit log.
//!
//! Precedence, everywhere: an unexpired deny rule that matches beats any allow; with no
//! matching rule a flow is denied. See docs/policy.md.

pub mod audit;
pub mod cache;
pub mod compile;
pub mod diagnostic;
pub mod locate;
pub mod matcher;
pub mod model;
pub mod watch;

pub use compile::{compile, Compiled};
pub use diagnostic::{Diagnostic, PolicyErrors, Severity};
pub use matcher::{Decision, Flow, Policy, Proto, Subject, Verdict};
