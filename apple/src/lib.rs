//! libsluice_apple: the Sluice agent engine behind a C ABI, for an Apple Network Extension
//! (and for the C test host on Linux). Only the exports and their types live here; cbindgen
//! turns this file into `include/sluice.h` (`tests/header.rs` checks it is current).
//!
//! Conventions: every function returns a `SluiceStatus` code as int32_t; strings in are
//! NUL-terminated UTF-8; text and bytes out go into the caller's buffers (on SLUICE_TOO_SMALL,
//! *len is the capacity needed and nothing was consumed); after an error code,
//! sluice_last_error() says why (per calling thread); no Rust panic crosses the boundary (it
//! becomes SLUICE_ERR_PANIC); after sluice_engine_stop() returns, no callback runs, ever.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::Duration;

mod callbacks;
pub mod config;
mod events;
mod ffi;
mod host;
mod logging;
mod network;
mod queue;
pub mod utun;

use ffi::{guard, Error};

pub const SLUICE_ABI_VERSION: u32 = 1;

/// Status codes every function returns (as int32_t).
#[repr(C)]
#[allow(non_camel_case_types)]
pub enum SluiceStatus {
    SLUICE_OK = 0,
    /// Nothing waiting (next_event, take_packet).
    SLUICE_EMPTY = 1,
    /// The buffer is too small; *len = the capacity needed.
    SLUICE_TOO_SMALL = 2,
    /// NULL pointer, bad UTF-8, bad JSON, unknown mode.
    SLUICE_ERR_ARGUMENT = -1,
    /// The agent YAML is invalid.
    SLUICE_ERR_CONFIG = -2,
    /// Certificate, key or CA unusable.
    SLUICE_ERR_CREDENTIALS = -3,
    /// The policy YAML is invalid.
    SLUICE_ERR_POLICY = -4,
    /// Not started, already started, already stopped.
    SLUICE_ERR_STATE = -5,
    /// A socket or the descriptor failed.
    SLUICE_ERR_IO = -6,
    SLUICE_ERR_PANIC = -99,
}

#[repr(C)]
#[allow(non_camel_case_types)]
pub enum SluicePacketMode {
    /// The host passes packets in (inject) and takes them out (take).
    SLUICE_PACKETS_HOST = 0,
    /// The library reads/writes fd; each packet has utun's 4-byte big-endian address family
    /// in front (AF_INET=2, AF_INET6: the platform's value, 30 on Darwin, 10 on Linux).
    SLUICE_PACKETS_UTUN = 1,
    /// The library reads/writes fd; bare IP packets (Linux TUN, IFF_NO_PI).
    SLUICE_PACKETS_RAW = 2,
}

#[repr(C)]
#[allow(non_camel_case_types)]
pub enum SluiceLogLevel {
    SLUICE_LOG_ERROR = 1,
    SLUICE_LOG_WARN = 2,
    SLUICE_LOG_INFO = 3,
    SLUICE_LOG_DEBUG = 4,
    SLUICE_LOG_TRACE = 5,
}

/// The host's callbacks. Each may be NULL.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SluiceCallbacks {
    pub context: *mut c_void,
    /// A log line; target and message are valid only during the call. May be NULL.
    pub log: Option<
        unsafe extern "C" fn(
            context: *mut c_void,
            level: i32,
            target: *const c_char,
            message: *const c_char,
        ),
    >,
    /// Events or packets are waiting: call next_event / take_packet soon (not from inside
    /// this callback: it runs on the engine's thread). May be NULL (then poll).
    pub work_waiting: Option<unsafe extern "C" fn(context: *mut c_void)>,
    /// Monotonic nanoseconds that keep counting through sleep (Darwin: CLOCK_MONOTONIC, i.e.
    /// clock_gettime_nsec_np(CLOCK_MONOTONIC)). May be NULL: the library then reads
    /// CLOCK_MONOTONIC (Linux: CLOCK_BOOTTIME) itself. Called on the engine's thread.
    pub clock_ns: Option<unsafe extern "C" fn(context: *mut c_void) -> u64>,
}

/// An engine (opaque). Every function may be called on it from any thread, at the same time
/// as others (each hands a command to the engine's thread, or reads a locked queue), except
/// sluice_engine_free, which must be the last call.
pub struct SluiceEngine {
    agent: host::Agent,
}

/// The engine behind a handle, with its log dispatcher in force for the call. Not an unsafe fn
/// only so that each export's body reads plainly: every caller passes the C caller's handle,
/// which the export's own safety contract says is NULL or live.
fn with_engine(e: *mut SluiceEngine, f: impl FnOnce(&host::Agent) -> Result<i32, Error>) -> i32 {
    guard(|| {
        // SAFETY: the export's caller promises a NULL or live handle from sluice_engine_new.
        let Some(engine) = (unsafe { e.as_ref() }) else {
            return Err(Error::Argument("engine is NULL".into()));
        };
        tracing::dispatcher::with_default(&engine.agent.dispatch, || f(&engine.agent))
    })
}

#[no_mangle]
pub extern "C" fn sluice_abi_version() -> u32 {
    SLUICE_ABI_VERSION
}

/// The text of the last error on this thread (empty if none).
///
/// # Safety
/// `buf` points at `cap` writable bytes (or is NULL with cap 0); `len` is writable.
#[no_mangle]
pub unsafe extern "C" fn sluice_last_error(buf: *mut c_char, cap: usize, len: *mut usize) -> i32 {
    guard(|| {
        let text = ffi::last_error();
        // SAFETY: the caller's promise above.
        unsafe { ffi::write_text(&text, buf, cap, len) }
    })
}

/// A new engine, not running yet. config_yaml: the agent YAML (relay, listen, tun, dns,
/// direct_paths; cert/key/ca/policy/status_socket/audit_log/metrics_listen keys are accepted
/// and ignored).
/// policy_yaml: the policy (no includes). cert/key/ca: PEM bytes.
///
/// # Safety
/// The strings are NUL-terminated; each byte pointer has its length readable; `out` is
/// writable. The callbacks may be called from the engine's thread until stop returns.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn sluice_engine_new(
    config_yaml: *const c_char,
    policy_yaml: *const c_char,
    cert: *const u8,
    cert_len: usize,
    key: *const u8,
    key_len: usize,
    ca: *const u8,
    ca_len: usize,
    callbacks: SluiceCallbacks,
    out: *mut *mut SluiceEngine,
) -> i32 {
    guard(|| {
        if out.is_null() {
            return Err(Error::Argument("out is NULL".into()));
        }
        // SAFETY: the caller's promises above.
        let (config, policy, cert, key, ca) = unsafe {
            (
                ffi::str_arg(config_yaml, "config_yaml")?,
                ffi::str_arg(policy_yaml, "policy_yaml")?,
                ffi::bytes_arg(cert, cert_len, "cert")?,
                ffi::bytes_arg(key, key_len, "key")?,
                ffi::bytes_arg(ca, ca_len, "ca")?,
            )
        };
        let cb = Arc::new(callbacks::Callbacks::new(callbacks));
        let dispatch = logging::dispatch(cb.clone());
        let made = tracing::dispatcher::with_default(&dispatch, || {
            host::Agent::new(config, policy, cert, key, ca, cb.clone(), dispatch.clone())
        });
        let agent = match made {
            Ok(a) => a,
            Err(e) => {
                // A failed new runs no callback later either.
                cb.silence();
                return Err(e);
            }
        };
        let engine = Box::new(SluiceEngine { agent });
        // SAFETY: `out` is writable (checked non-NULL, promised by the caller).
        unsafe { *out = Box::into_raw(engine) };
        Ok(ffi::OK)
    })
}

/// Starts the engine's thread: it binds its UDP sockets and dials the relay. mode is a
/// SluicePacketMode; fd is the utun/TUN descriptor for UTUN/RAW (dup'ed: the caller keeps
/// its own), ignored (pass -1) for HOST. The first event is always a settings event: a host
/// should apply it before it starts moving packets.
///
/// # Safety
/// `engine` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_start(engine: *mut SluiceEngine, mode: i32, fd: i32) -> i32 {
    with_engine(engine, |a| {
        const HOST: i32 = SluicePacketMode::SLUICE_PACKETS_HOST as i32;
        const UTUN: i32 = SluicePacketMode::SLUICE_PACKETS_UTUN as i32;
        const RAW: i32 = SluicePacketMode::SLUICE_PACKETS_RAW as i32;
        let mode = match mode {
            HOST => host::Mode::Host,
            UTUN => host::Mode::Device(utun::Framing::Utun),
            RAW => host::Mode::Device(utun::Framing::Raw),
            m => return Err(Error::Argument(format!("unknown packet mode {m}"))),
        };
        a.start(mode, fd).map(|_| ffi::OK)
    })
}

/// Says goodbye to the relay and connectors (waits up to timeout_ms for it to be sent), stops
/// the thread and joins it. After it returns no callback runs. Idempotent.
///
/// # Safety
/// `engine` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_stop(engine: *mut SluiceEngine, timeout_ms: u32) -> i32 {
    with_engine(engine, |a| {
        a.stop(Duration::from_millis(u64::from(timeout_ms)))
            .map(|_| ffi::OK)
    })
}

/// Frees an engine (stops it first if needed). NULL is fine.
///
/// # Safety
/// `engine` is NULL or a live handle, not used again after this.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_free(engine: *mut SluiceEngine) {
    if engine.is_null() {
        return;
    }
    let _ = guard(|| {
        // SAFETY: the caller's promise above: the handle came from Box::into_raw in new.
        let e = unsafe { Box::from_raw(engine) };
        e.agent.stop(Duration::from_secs(1))?;
        drop(e);
        Ok(ffi::OK)
    });
}

/// The next event as one JSON object:
///   {"type":"settings","generation":1,"ipv4":"100.96.0.1/32","ipv6":"fd5c:1ce0:1::1/128"|null,
///    "mtu":1280,"routes":["10.0.0.0/24","198.18.0.0/15",...],
///    "dns_servers":["100.96.0.53"],"match_domains":["corp.internal",...]}
///   {"type":"tunnel","connector":"office","state":"connecting"|"up"|"closed",
///    "path":"relay"|"direct"}
///   {"type":"audit","line":"{...one JSON audit line...}"}
///   {"type":"stopped","reason":"..."}   (the engine's thread ended on its own, e.g. fd error)
/// SLUICE_EMPTY when none. Written NUL-terminated; *len = its length without the NUL (on
/// SLUICE_TOO_SMALL: the capacity needed, NUL included).
///
/// # Safety
/// `engine` is a live handle; `buf` has `cap` writable bytes; `len` is writable.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_next_event(
    engine: *mut SluiceEngine,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> i32 {
    with_engine(engine, |a| {
        let mut code = ffi::EMPTY;
        a.next_event(|text| {
            // SAFETY: the caller's promise above.
            code = unsafe { ffi::write_text(text, buf, cap, len) }?;
            Ok(code == ffi::OK)
        })?;
        Ok(code)
    })
}

/// The settings the engine starts with, as the JSON of a settings event (the format
/// next_event gives). Readable at any time after new, before start too: UTUN mode needs them
/// applied before it has a descriptor (the utun interface exists only once
/// NEPacketTunnelNetworkSettings are applied). After start, the first settings event carries
/// the same, generation 1; a host that applied these may skip it. Written as next_event writes.
///
/// # Safety
/// `engine` is a live handle; `buf` has `cap` writable bytes; `len` is writable.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_initial_settings(
    engine: *mut SluiceEngine,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> i32 {
    with_engine(engine, |a| {
        let text = a.initial_settings();
        // SAFETY: the caller's promise above.
        unsafe { ffi::write_text(&text, buf, cap, len) }
    })
}

/// HOST mode: packets read from packetFlow (bare IP packets). Copied; returns once queued
/// (packets past the engine's bounded queue are dropped and counted, as a full NIC would).
///
/// # Safety
/// `engine` is a live handle; `packets` and `lens` have `count` entries; each packet has its
/// length readable.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_inject_packets(
    engine: *mut SluiceEngine,
    packets: *const *const u8,
    lens: *const usize,
    count: usize,
) -> i32 {
    with_engine(engine, |a| {
        if count == 0 {
            return Ok(ffi::OK);
        }
        if packets.is_null() || lens.is_null() {
            return Err(Error::Argument("packets or lens is NULL".into()));
        }
        // SAFETY: the caller's promise above.
        let (ps, ls) = unsafe {
            (
                std::slice::from_raw_parts(packets, count),
                std::slice::from_raw_parts(lens, count),
            )
        };
        let mut v = Vec::with_capacity(count);
        for (i, (&p, &l)) in ps.iter().zip(ls).enumerate() {
            // SAFETY: the caller's promise above.
            v.push(unsafe { ffi::bytes_arg(p, l, &format!("packets[{i}]")) }?);
        }
        a.inject(&v).map(|_| ffi::OK)
    })
}

/// HOST mode: the next bare IP packet to write to packetFlow; SLUICE_EMPTY when none.
/// *ip_version is set to 4 or 6 (packetFlow.writePackets wants AF_INET/AF_INET6 for them);
/// ip_version may be NULL.
///
/// # Safety
/// `engine` is a live handle; `buf` has `cap` writable bytes; `len` is writable;
/// `ip_version` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_take_packet(
    engine: *mut SluiceEngine,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
    ip_version: *mut i32,
) -> i32 {
    with_engine(engine, |a| {
        let mut code = ffi::EMPTY;
        a.take_packet(|p| {
            // SAFETY: the caller's promise above.
            code = unsafe { ffi::write_bytes(p, buf, cap, len) }?;
            if code == ffi::OK && !ip_version.is_null() {
                // SAFETY: non-NULL, writable by the caller's promise.
                unsafe { *ip_version = i32::from(p.first().map_or(0, |b| b >> 4)) };
            }
            Ok(code == ffi::OK)
        })?;
        Ok(code)
    })
}

/// The network path changed. change_json: {"interfaces":["192.0.2.10","2001:db8::10"],
/// "resolvers":["192.0.2.53:53"]}; both keys optional (missing interfaces: the library lists
/// them itself with getifaddrs, leaving out the tunnel device's own address; a resolver may
/// be a bare IP, port 53). NULL means {}.
///
/// # Safety
/// `engine` is a live handle; `change_json` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_path_changed(
    engine: *mut SluiceEngine,
    change_json: *const c_char,
) -> i32 {
    with_engine(engine, |a| {
        let json = if change_json.is_null() {
            "{}"
        } else {
            // SAFETY: the caller's promise above.
            unsafe { ffi::str_arg(change_json, "change_json") }?
        };
        a.path_changed(network::parse_path_change(json)?)
            .map(|_| ffi::OK)
    })
}

/// The machine goes to sleep: the engine's timers stop until sluice_engine_wake.
///
/// # Safety
/// `engine` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_sleep(engine: *mut SluiceEngine) -> i32 {
    with_engine(engine, |a| a.sleep().map(|_| ffi::OK))
}

/// The machine woke up: the relay is dialled again and the tunnels probed.
///
/// # Safety
/// `engine` is a live handle.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_wake(engine: *mut SluiceEngine) -> i32 {
    with_engine(engine, |a| a.wake().map(|_| ffi::OK))
}

/// A new policy (YAML). SLUICE_ERR_POLICY (last_error says why) keeps the old one.
///
/// # Safety
/// `engine` is a live handle; `policy_yaml` is NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_set_policy(
    engine: *mut SluiceEngine,
    policy_yaml: *const c_char,
) -> i32 {
    with_engine(engine, |a| {
        // SAFETY: the caller's promise above.
        let text = unsafe { ffi::str_arg(policy_yaml, "policy_yaml") }?;
        a.set_policy(text).map(|_| ffi::OK)
    })
}

/// Status as JSON (the same document `sluice status --json` prints on Linux, plus a "host"
/// object with this library's own counters). Written as next_event writes.
///
/// # Safety
/// `engine` is a live handle; `buf` has `cap` writable bytes; `len` is writable.
#[no_mangle]
pub unsafe extern "C" fn sluice_engine_status(
    engine: *mut SluiceEngine,
    buf: *mut c_char,
    cap: usize,
    len: *mut usize,
) -> i32 {
    with_engine(engine, |a| {
        let text = a.status()?;
        // SAFETY: the caller's promise above.
        unsafe { ffi::write_text(&text, buf, cap, len) }
    })
}
