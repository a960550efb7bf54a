//! What the agent, connector and relay processes share: credentials, the UDP socket, the event
//! loop's timer, signals, the wall clock, interface addresses and relay name resolution.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_dataplane::identity::{IdentityError, Role};
use sluice_dataplane::tls::Credentials;

use crate::config::{ConfigError, IdentityFiles};
use crate::IdentityArgs;

/// Packets (or messages) taken from one source in one round of an event loop before the rest is
/// flushed. Bounded so that no source starves another: under CPU pressure, draining the UDP
/// socket without a bound let the TUN queue overflow and drop the kernel's ACKs and SYNs.
pub const ROUND_BATCH: usize = 64;
/// Socket buffers: userspace tunnels lose throughput to receive-buffer drops otherwise.
const SOCKET_BUFFER: usize = 4 << 20;

pub fn override_identity(
    cert: &mut PathBuf,
    key: &mut PathBuf,
    ca: &mut PathBuf,
    args: &IdentityArgs,
) {
    if let Some(c) = &args.cert {
        *cert = c.clone();
    }
    if let Some(k) = &args.key {
        *key = k.clone();
    }
    if let Some(c) = &args.ca {
        *ca = c.clone();
    }
}

/// Loads the node's credentials and checks the certificate is for the role being run. Every
/// error is a configuration error (exit status 2) that names the key and the file.
pub fn credentials(files: &IdentityFiles, role: Role, origin: &str) -> Result<Credentials> {
    let path = |p: &PathBuf| p.to_string_lossy().into_owned();
    // Which setting a file came from: `cert: ...` in the file, or --cert.
    let key_of = |p: &str| {
        if Path::new(p) == files.cert {
            "cert"
        } else if Path::new(p) == files.key {
            "key"
        } else {
            "ca"
        }
    };
    let creds = Credentials::load(&path(&files.cert), &path(&files.key), &path(&files.ca))
        .map_err(|e| match e {
            IdentityError::File { path, reason } => {
                ConfigError(format!("{origin}: `{}` {path}: {reason}", key_of(&path)))
            }
            other => ConfigError(format!(
                "{origin}: `cert` {}: {other}",
                files.cert.display()
            )),
        })?;
    if creds.identity.role != role {
        return Err(ConfigError(format!(
            "{origin}: `cert` {}: this is a {} certificate, but this process runs the {role} role (issue one with `sluice ca issue --role {role}`)",
            files.cert.display(),
            creds.identity.role
        )).into());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if creds.identity.not_after < now {
        return Err(ConfigError(format!(
            "{origin}: `cert` {}: certificate expired {} ago; issue a new one",
            files.cert.display(),
            crate::node::human_duration(Duration::from_secs(
                (now - creds.identity.not_after) as u64
            ))
        ))
        .into());
    }
    if !creds.signed_by_own_ca() {
        tracing::warn!(
            "{origin}: `cert` {} is not signed by the CA in `ca` {}: peers will refuse this node",
            files.cert.display(),
            files.ca.display()
        );
    }
    if let Ok(m) = std::fs::metadata(&files.key) {
        use std::os::unix::fs::PermissionsExt;
        let mode = m.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                "{origin}: `key` {} can be read by other users (mode {mode:04o}); `chmod 600 {}`",
                files.key.display(),
                files.key.display()
            );
        }
    }
    Ok(creds)
}

/// When the node's certificate and its CA expire, for `/metrics`.
pub fn cert_expiry(creds: &Credentials, ca: &Path) -> crate::metrics::CertExpiry {
    let ca = std::fs::read_to_string(ca)
        .ok()
        .and_then(|t| sluice_dataplane::identity::summarize_pem(&t).ok())
        .map(|s| s.not_after);
    crate::metrics::CertExpiry {
        node: creds.identity.not_after,
        ca,
    }
}

/// SIGHUP, the operator's "reload" (systemd's `ExecReload`).
pub struct Hangups(Option<tokio::signal::unix::Signal>);

impl Hangups {
    /// Must run inside a tokio runtime.
    pub fn new() -> Hangups {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Hangups(Some(s)),
            Err(e) => {
                tracing::warn!("cannot handle SIGHUP ({e}): reloads need a restart");
                Hangups(None)
            }
        }
    }

    /// The next SIGHUP (never, without a handler).
    pub async fn recv(&mut self) {
        match &mut self.0 {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// A duration for people: "45s", "12min", "3h", "2 days".
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}min", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{} days", s / 86_400),
    }
}

/// Wall-clock time now, for the sans-IO cores (which read no clock).
pub fn unix_nanos() -> i128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A UDP socket with large buffers (forced past rmem_max when we may).
pub fn bind_udp(addr: SocketAddr) -> Result<tokio::net::UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    s.set_nonblocking(true)?;
    for (opt, fallback) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let v = SOCKET_BUFFER as libc::c_int;
        // SAFETY: setsockopt with a valid fd and a c_int value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &v as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let _ = if fallback == libc::SO_RCVBUF {
                s.set_recv_buffer_size(SOCKET_BUFFER)
            } else {
                s.set_send_buffer_size(SOCKET_BUFFER)
            };
        }
    }
    s.bind(&addr.into())?;
    Ok(tokio::net::UdpSocket::from_std(s.into())?)
}

/// An event loop's one timer, re-armed each round to the loop's next deadline.
///
/// It is moved both ways, so it never fires for a deadline that went away (at 20 ms between
/// pings, a held ACK's deadline that the next ping cleared woke each process once per ping for
/// nothing). Moving a tokio timer earlier wakes the runtime's driver (an eventfd write and one
/// more epoll round): that is unavoidable with tokio's timer. Moving it later is cheap, but
/// `Sleep::reset` only extends the deadline lazily (the driver still wakes at the old time, then
/// re-files the timer), so a timer that must go later by more than [`LoopTimer::LATER`] is
/// replaced instead.
pub struct LoopTimer(std::pin::Pin<Box<tokio::time::Sleep>>);

impl LoopTimer {
    /// Smaller moves later are not worth a new timer: tokio's wheel counts whole milliseconds,
    /// and firing that much early is harmless since every loop checks each deadline against the
    /// clock.
    const LATER: Duration = Duration::from_millis(1);

    /// A timer that fires at once (the loop's first round then computes the real deadline).
    pub fn new() -> Self {
        LoopTimer(Box::pin(tokio::time::sleep(Duration::ZERO)))
    }

    /// Arms the timer for `after` from now.
    pub fn rearm(&mut self, after: Duration) {
        self.rearm_at(tokio::time::Instant::now() + after);
    }

    fn rearm_at(&mut self, deadline: tokio::time::Instant) {
        let armed = self.0.deadline();
        if self.0.is_elapsed() || deadline < armed {
            self.0.as_mut().reset(deadline);
        } else if deadline > armed + Self::LATER {
            self.0 = Box::pin(tokio::time::sleep_until(deadline));
        }
    }

    /// Resolves when the armed deadline passes.
    pub async fn fired(&mut self) {
        self.0.as_mut().await
    }
}

impl Default for LoopTimer {
    fn default() -> Self {
        Self::new()
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The host's interface addresses (of interfaces that are up), but `skip_iface`'s (the
/// agent's own TUN device): the direct-path candidates come from these.
pub fn interface_ips(skip_iface: Option<&str>) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    match nix::ifaddrs::getifaddrs() {
        Ok(addrs) => {
            for a in addrs {
                if Some(a.interface_name.as_str()) == skip_iface
                    || !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP)
                {
                    continue;
                }
                let Some(sa) = a.address else { continue };
                let ip: IpAddr = if let Some(v4) = sa.as_sockaddr_in() {
                    IpAddr::V4(v4.ip())
                } else if let Some(v6) = sa.as_sockaddr_in6() {
                    IpAddr::V6(v6.ip())
                } else {
                    continue;
                };
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
        }
        Err(e) => tracing::warn!("cannot list interface addresses: {e}"),
    }
    ips
}

/// Resolves a relay name off the event loop (the system resolver blocks); `done` gets the
/// answer, for [`ControlLink::handle_resolved`].
pub fn resolve_relay(
    host: String,
    port: u16,
    done: impl FnOnce(Result<Vec<SocketAddr>, String>) + Send + 'static,
) {
    tokio::task::spawn_blocking(move || {
        use std::net::ToSocketAddrs;
        done(
            (host.as_str(), port)
                .to_socket_addrs()
                .map(Iterator::collect)
                .map_err(|e| e.to_string()),
        );
    });
}

/// Raises the soft limit of open files to the hard one: a connector holds a socket per flow,
/// and the usual soft limit (1024) would let a few busy agents use up what the others need.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 || lim.rlim_cur >= lim.rlim_max {
            return;
        }
        let old = lim.rlim_cur;
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
            tracing::debug!("open files limit raised from {old} to {}", lim.rlim_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, but only bounds that hold on any machine: a tokio timer never fires before its
    // deadline, and the upper bounds are seconds.

    #[tokio::test]
    async fn a_timer_moved_later_does_not_fire_at_the_old_deadline() {
        let mut t = LoopTimer::new();
        t.rearm(Duration::from_millis(10));
        let start = tokio::time::Instant::now();
        t.rearm(Duration::from_millis(60));
        t.fired().await;
        assert!(start.elapsed() >= Duration::from_millis(60));
    }

    #[tokio::test]
    async fn a_timer_moved_earlier_fires_at_the_new_deadline() {
        let mut t = LoopTimer::new();
        t.rearm(Duration::from_secs(3600));
        t.rearm(Duration::from_millis(10));
        tokio::time::timeout(Duration::from_secs(5), t.fired())
            .await
            .expect("the earlier deadline fired");
    }

    #[tokio::test]
    async fn a_fired_timer_is_armed_again() {
        let mut t = LoopTimer::new();
        t.fired().await;
        let start = tokio::time::Instant::now();
        t.rearm(Duration::from_millis(30));
        t.fired().await;
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[tokio::test]
    async fn a_move_later_within_a_millisecond_keeps_the_armed_deadline() {
        let mut t = LoopTimer::new();
        let armed = tokio::time::Instant::now() + Duration::from_secs(10);
        t.rearm_at(armed);
        t.rearm_at(armed + Duration::from_micros(900));
        assert_eq!(t.0.deadline(), armed);
        t.rearm_at(armed + Duration::from_millis(2));
        assert_eq!(t.0.deadline(), armed + Duration::from_millis(2));
    }
}
