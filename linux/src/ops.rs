//! What an operator's tools see of a running role: `/metrics`, `/healthz` and `/ready` over
//! HTTP on `metrics_listen`, and systemd's view (sd_notify: readiness, watchdog keepalives,
//! reloads, stopping).
//!
//! The role's loop publishes a [`Sample`] once a second ([`Ops::publish`]); the HTTP server
//! only reads the latest one, so a scrape never waits on the packet path. The same beat
//! drives systemd's watchdog, so a stuck loop stops both `/healthz` and the keepalives.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use sd_notify::NotifyState;
use tokio::sync::watch;

use crate::metrics::{self, Format, Sample};

/// A loop that has not published for this long is stuck: `/healthz` says so.
const STALE_AFTER: Duration = Duration::from_secs(5);
/// A scrape connection may take this long in all (slow clients are dropped).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the roles publish.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(1);

/// A role's metrics endpoint and its link to systemd.
pub struct Ops {
    tx: watch::Sender<Sample>,
    server: Option<tokio::task::JoinHandle<()>>,
    /// READY=1 went out.
    told_ready: bool,
    /// Half systemd's watchdog interval, when it wants keepalives.
    watchdog_every: Option<Duration>,
    last_watchdog: Option<Instant>,
}

impl Drop for Ops {
    fn drop(&mut self) {
        if let Some(t) = self.server.take() {
            t.abort();
        }
    }
}

impl Ops {
    /// Serves HTTP on `listen` (when set) from now on; binds before returning, so a bad or
    /// busy address is an error at startup. Must run inside a tokio runtime.
    pub async fn start(listen: Option<SocketAddr>, first: Sample) -> Result<Ops> {
        let (tx, rx) = watch::channel(first);
        let server = match listen {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("`metrics_listen` {addr}: cannot listen"))?;
                let at = listener.local_addr().unwrap_or(addr);
                tracing::info!("metrics on http://{at}/metrics (also /healthz and /ready)");
                Some(tokio::spawn(serve(listener, rx)))
            }
            None => None,
        };
        let watchdog_every = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
        );
        Ok(Ops {
            tx,
            server,
            told_ready: false,
            watchdog_every,
            last_watchdog: None,
        })
    }

    /// The loop's latest numbers; also tells systemd once the role is `up`, and keeps its
    /// watchdog fed while the loop runs.
    pub fn publish(&mut self, sample: Sample, up: bool) {
        if up && !self.told_ready {
            self.told_ready = true;
            notify(&[NotifyState::Ready, NotifyState::Status("running")]);
        }
        if let Some(every) = self.watchdog_every {
            let now = sample.taken;
            if self
                .last_watchdog
                .is_none_or(|t| now.saturating_duration_since(t) >= every)
            {
                self.last_watchdog = Some(now);
                notify(&[NotifyState::Watchdog]);
            }
        }
        self.tx.send_replace(sample);
    }

    /// A SIGHUP reload starts: systemd shows the unit as reloading until [`Ops::reloaded`].
    pub fn reloading(&self) {
        let mut states = vec![NotifyState::Reloading];
        // systemd 253+ wants the time with RELOADING=1; older ones ignore it.
        if let Ok(t) = NotifyState::monotonic_usec_now() {
            states.push(t);
        }
        notify(&states);
    }

    /// The reload ended (applied or refused: either way the role runs on).
    pub fn reloaded(&self, status: &str) {
        if self.told_ready {
            notify(&[NotifyState::Ready, NotifyState::Status(status)]);
        } else {
            notify(&[NotifyState::Status(status)]);
        }
    }

    /// The role is shutting down.
    pub fn stopping(&self) {
        notify(&[NotifyState::Stopping]);
    }
}

/// How often to feed systemd's watchdog: half its `WATCHDOG_USEC`, when that is meant for this
/// process (as libsystemd's `sd_watchdog_enabled` reads it, a missing `WATCHDOG_PID` means
/// this one).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(100)))
}

/// Tells systemd, when it is listening (`NOTIFY_SOCKET`); nothing happens without it.
fn notify(states: &[NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

async fn serve(listener: tokio::net::TcpListener, rx: watch::Receiver<Sample>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, say: wait instead of spinning on the error.
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let rx = rx.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                let rx = rx.clone();
                async move { Ok::<_, Infallible>(answer(&req, &rx.borrow(), Instant::now())) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
        });
    }
}

/// The answer to one request, from the latest sample.
fn answer<B>(req: &Request<B>, s: &Sample, now: Instant) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    let stale = now.saturating_duration_since(s.taken) > STALE_AFTER;
    match req.uri().path() {
        "/metrics" => {
            let accept = req.headers().get(hyper::header::ACCEPT);
            let format = Format::from_accept(accept.and_then(|a| a.to_str().ok()));
            let mut r = Response::new(Full::new(Bytes::from(metrics::render(s, format))));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(format.content_type()),
            );
            r
        }
        "/healthz" if stale => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "stalled: the {} has not run its loop for {}s\n",
                s.role.name(),
                now.saturating_duration_since(s.taken).as_secs()
            ),
        ),
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/ready" if s.ready && !stale => text(StatusCode::OK, "ready\n".into()),
        "/ready" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", why_not_ready(s, stale)),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz or /ready\n".into(),
        ),
    }
}

fn why_not_ready(s: &Sample, stale: bool) -> &'static str {
    use crate::metrics::NodeRole;
    if stale {
        return "the event loop is stalled";
    }
    match (s.role, s.relay_connected) {
        (NodeRole::Relay, _) => "not listening yet",
        (_, Some(false)) | (_, None) => "not connected to the relay",
        (NodeRole::Agent, Some(true)) => "the TUN device is not up",
        (NodeRole::Connector, Some(true)) => "starting",
    }
}

fn text(code: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{CertExpiry, NodeRole};

    fn get(path: &str) -> Request<()> {
        Request::builder().uri(path).body(()).unwrap()
    }

    fn sample(ready: bool, relay: bool) -> Sample {
        let mut s = Sample::starting(NodeRole::Connector, CertExpiry { node: 0, ca: None });
        s.ready = ready;
        s.relay_connected = Some(relay);
        s
    }

    #[test]
    fn the_watchdog_is_fed_at_half_its_interval_when_it_is_ours() {
        let me = std::process::id().to_string();
        let half = Some(Duration::from_secs(15));
        assert_eq!(watchdog_interval(Some("30000000"), Some(&me)), half);
        assert_eq!(watchdog_interval(Some("30000000"), None), half);
        assert_eq!(watchdog_interval(Some("30000000"), Some("1")), None);
        assert_eq!(watchdog_interval(None, Some(&me)), None);
        assert_eq!(watchdog_interval(Some("0"), None), None);
        assert_eq!(watchdog_interval(Some("soon"), None), None);
        assert_eq!(
            watchdog_interval(Some("1000"), None),
            Some(Duration::from_millis(100))
        );
    }

    #[test]
    fn ready_and_healthz_follow_the_sample() {
        let s = sample(false, false);
        let now = s.taken;
        assert_eq!(answer(&get("/healthz"), &s, now).status(), StatusCode::OK);
        let r = answer(&get("/ready"), &s, now);
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        let s = sample(true, true);
        assert_eq!(answer(&get("/ready"), &s, now).status(), StatusCode::OK);
        // A loop that stopped publishing is neither healthy nor ready.
        let later = now + STALE_AFTER + Duration::from_secs(1);
        assert_eq!(
            answer(&get("/healthz"), &s, later).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            answer(&get("/ready"), &s, later).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            answer(&get("/nope"), &s, now).status(),
            StatusCode::NOT_FOUND
        );
        let post = Request::builder()
            .method(Method::POST)
            .uri("/metrics")
            .body(())
            .unwrap();
        assert_eq!(
            answer(&post, &s, now).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        let m = answer(&get("/metrics"), &s, now);
        assert_eq!(m.status(), StatusCode::OK);
        assert!(m.headers()[hyper::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let scraper = Request::builder()
            .uri("/metrics")
            .header(
                hyper::header::ACCEPT,
                "application/openmetrics-text; version=1.0.0",
            )
            .body(())
            .unwrap();
        let m = answer(&scraper, &s, now);
        assert!(m.headers()[hyper::header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"));
    }
}
