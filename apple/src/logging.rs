//! `tracing` events to the host's log callback. Nothing global is installed: each engine has
//! its own dispatcher, set on its thread and around its exports, so two engines (or a host that
//! uses tracing itself) do not step on each other.

use std::fmt::Write;
use std::sync::Arc;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

use crate::callbacks::Callbacks;

/// The most detailed level forwarded: SLUICE_LOG (error, warn, info, debug, trace), else info.
fn max_level() -> Level {
    std::env::var("SLUICE_LOG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(Level::INFO)
}

/// The header's `SluiceLogLevel` of a tracing level.
pub fn level_code(l: &Level) -> i32 {
    use crate::SluiceLogLevel as L;
    (match *l {
        Level::ERROR => L::SLUICE_LOG_ERROR,
        Level::WARN => L::SLUICE_LOG_WARN,
        Level::INFO => L::SLUICE_LOG_INFO,
        Level::DEBUG => L::SLUICE_LOG_DEBUG,
        Level::TRACE => L::SLUICE_LOG_TRACE,
    }) as i32
}

struct HostLog {
    callbacks: Arc<Callbacks>,
    max: Level,
}

impl<S: Subscriber> Layer<S> for HostLog {
    // Interest is cached per call site across every dispatcher: ask each time, as engines differ.
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn enabled(&self, meta: &tracing::Metadata<'_>, _: Context<'_, S>) -> bool {
        *meta.level() <= self.max && self.callbacks.has_log()
    }

    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut v = Message(String::new());
        event.record(&mut v);
        let meta = event.metadata();
        self.callbacks
            .log(level_code(meta.level()), meta.target(), v.0.trim_start());
    }
}

/// The message, then any other fields as ` key=value`.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

/// A dispatcher that sends this engine's log lines to its host.
pub fn dispatch(callbacks: Arc<Callbacks>) -> tracing::Dispatch {
    let layer = HostLog {
        callbacks,
        max: max_level(),
    };
    tracing::Dispatch::new(tracing_subscriber::registry().with(layer))
}
