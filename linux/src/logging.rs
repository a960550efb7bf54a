//! Log lines on standard error: for people by default, one JSON object per line for log
//! collectors (`--log-format json`), at the levels `RUST_LOG` sets.
//!
//! What is logged never holds a secret: private keys are read into memory and never printed,
//! and certificates are named by their file, peer id and name only.

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `2026-12-02T10:00:00Z  INFO relay listening on ...`
    Text,
    /// `{"timestamp":"...","level":"INFO","fields":{"message":"..."}}`
    Json,
}

/// Sluice's own crates: a bare level in `RUST_LOG` applies to these.
const OUR_CRATES: [&str; 5] = [
    "sluice",
    "sluice_dataplane",
    "sluice_netstack",
    "sluice_policy",
    "sluice_relay",
];

/// The tracing filter for a `RUST_LOG` value. A bare level (`debug`) is for Sluice's crates
/// only: other crates stay at `warn` unless named (`hickory_proto=debug`), since some of them
/// dump whole DNS messages or handshakes at debug level, about 15 lines per lookup.
fn log_filter(rust_log: Option<&str>) -> String {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let mut ours = "info".to_string();
    let mut others = "warn";
    let mut named = Vec::new();
    for d in rust_log.unwrap_or("").split(',').map(str::trim) {
        let lower = d.to_ascii_lowercase();
        if d.is_empty() {
            continue;
        } else if let Some(level) = LEVELS.iter().find(|l| **l == lower) {
            ours = level.to_string();
            // Quieter than warn (error, off) quiets everything; louder stays ours alone.
            if matches!(*level, "off" | "error") {
                others = level;
            }
        } else {
            named.push(d.to_string());
        }
    }
    let mut f = vec![others.to_string()];
    f.extend(OUR_CRATES.iter().map(|c| format!("{c}={ours}")));
    f.extend(named);
    f.join(",")
}

/// Installs the subscriber for the whole process.
pub fn init(format: Format) {
    let spec = log_filter(std::env::var("RUST_LOG").ok().as_deref());
    let filter = tracing_subscriber::EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("warning: RUST_LOG: {e}; logging at info");
        tracing_subscriber::EnvFilter::new(log_filter(None))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    match format {
        Format::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Collectors want the module too, to tell the core's lines from the host's.
        Format::Json => builder.json().with_target(true).with_ansi(false).init(),
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn a_bare_level_is_for_our_crates_and_others_stay_at_warn() {
        let f = log_filter(Some("debug"));
        assert!(f.starts_with("warn,"), "{f}");
        assert!(
            f.contains("sluice=debug") && f.contains("sluice_dataplane=debug"),
            "{f}"
        );
        assert!(!f.contains("hickory"), "{f}");

        let f = log_filter(None);
        assert!(
            f.starts_with("warn,") && f.contains("sluice_netstack=info"),
            "{f}"
        );

        // Named crates get what they ask for.
        let f = log_filter(Some("info,hickory_proto=debug"));
        assert!(
            f.ends_with(",hickory_proto=debug") && f.contains("sluice=info"),
            "{f}"
        );

        // Quieter than warn quiets the others too.
        assert!(log_filter(Some("error")).starts_with("error,"));
        assert!(log_filter(Some("OFF")).starts_with("off,"));
        // Every result is a filter tracing accepts.
        for v in ["debug", "", "trace,quiche=info", "sluice_relay=trace"] {
            tracing_subscriber::EnvFilter::try_new(log_filter(Some(v))).unwrap();
        }
    }
}
