//! The host's callbacks, callable from the engine's thread, and silenced for good once `stop`
//! has joined it (a late callback into a freed host object is what crashed NetBird's iOS app).

use std::ffi::{c_char, CString};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::SluiceCallbacks;

pub struct Callbacks {
    raw: SluiceCallbacks,
    live: AtomicBool,
}

// SAFETY: the header's contract: the host's callbacks and their context may be called from the
// engine's thread (the library's own thread), and are never called after `stop` returns.
unsafe impl Send for Callbacks {}
// SAFETY: as above; the host's functions are called, never the context touched by us.
unsafe impl Sync for Callbacks {}

impl Callbacks {
    pub fn new(raw: SluiceCallbacks) -> Self {
        Callbacks {
            raw,
            live: AtomicBool::new(true),
        }
    }

    /// No callback runs after this (called once the engine's thread is joined).
    pub fn silence(&self) {
        self.live.store(false, Ordering::SeqCst);
    }

    fn live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    pub fn has_log(&self) -> bool {
        self.raw.log.is_some() && self.live()
    }

    pub fn log(&self, level: i32, target: &str, message: &str) {
        let Some(f) = self.raw.log.filter(|_| self.live()) else {
            return;
        };
        let c = |s: &str| CString::new(s.replace('\0', " ")).unwrap_or_default();
        let (t, m) = (c(target), c(message));
        // SAFETY: a host function, given its own context and strings valid during the call.
        unsafe {
            f(
                self.raw.context,
                level,
                t.as_ptr() as *const c_char,
                m.as_ptr(),
            )
        }
    }

    pub fn work_waiting(&self) {
        if let Some(f) = self.raw.work_waiting.filter(|_| self.live()) {
            // SAFETY: a host function, given its own context.
            unsafe { f(self.raw.context) }
        }
    }

    /// The host's clock, if it gave one.
    pub fn clock_ns(&self) -> Option<u64> {
        let f = self.raw.clock_ns.filter(|_| self.live())?;
        // SAFETY: a host function, given its own context.
        Some(unsafe { f(self.raw.context) })
    }
}
