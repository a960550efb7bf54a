//! The relays' shared registry on etcd: the tokio shell that keeps this relay's keys there and
//! feeds what the others put to the sans-IO cache (`sluice_relay::registry`).
//!
//! - One lease per relay (TTL [`LEASE_TTL`], kept alive every [`KEEPALIVE_EVERY`]): every key
//!   this relay writes is under it, so when the relay dies its keys go with the lease.
//! - What this relay wants in etcd is held here as a desired state (its own record, the
//!   records of the connectors connected to it). After any failure (etcd unreachable, the lease
//!   lost, e.g. expired while etcd was frozen) the whole state is written again under a new
//!   lease: the registry converges without anyone having to notice what was lost.
//! - A put is "latest wins". A delete happens only while the value is still ours (a compare of
//!   the value in a transaction), so a relay never removes a connector that moved elsewhere.
//! - The prefix is read once, then watched from the next revision; a watch that is cancelled
//!   (compacted) or fails is replaced by a read again and a new watch.
//!
//! Every call has a deadline ([`CALL_TIMEOUT`]): a frozen etcd shows as a failed call, never as
//! a stuck relay. The relay's packet path never waits on this task; it reads the cache.

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use sluice_relay::registry::Event;
use tokio::sync::mpsc;

/// How long the relay's keys outlive it.
pub const LEASE_TTL: i64 = 10;
/// How often the lease is kept alive (a third of its TTL: two can fail before it runs out).
pub const KEEPALIVE_EVERY: Duration = Duration::from_secs(3);
/// The deadline of every call to etcd.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// The wait before trying etcd again after a failure, doubled up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// A change this relay wants in the registry, as the relay core asks for it.
pub use sluice_relay::server::RegistryWrite as Write;

/// What the task tells the relay.
#[derive(Debug)]
pub enum Feed {
    /// The whole prefix at `revision` (the first read, or a read again after a lost watch).
    Loaded {
        kvs: Vec<(Vec<u8>, Vec<u8>, i64)>,
        revision: i64,
    },
    Event(Event),
    /// etcd answers again, with every key of ours written under lease `lease`.
    Up {
        lease: i64,
    },
    /// etcd does not answer (or refused): why, in words. The cache keeps serving.
    Down(String),
}

#[derive(Debug, thiserror::Error)]
enum EtcdError {
    #[error("{0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("no answer within {}s", CALL_TIMEOUT.as_secs())]
    Timeout,
    #[error("the lease ran out")]
    LeaseLost,
    #[error("the watch was cancelled ({0})")]
    WatchCancelled(String),
    #[error("the watch ended")]
    WatchEnded,
}

async fn call<T, F>(f: F) -> Result<T, EtcdError>
where
    F: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    match tokio::time::timeout(CALL_TIMEOUT, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(EtcdError::Timeout),
    }
}

/// The handle the relay keeps: writes go in, feeds come out.
pub struct EtcdRegistry {
    writes: mpsc::UnboundedSender<Write>,
    pub feeds: mpsc::UnboundedReceiver<Feed>,
}

impl EtcdRegistry {
    /// Starts the task on the current runtime: it connects to `endpoints`, keeps `own` (this
    /// relay's record: key and value) under its lease, and watches `prefix`.
    pub fn start(endpoints: Vec<String>, prefix: String, own: (String, Vec<u8>)) -> Self {
        let (wtx, wrx) = mpsc::unbounded_channel();
        let (ftx, frx) = mpsc::unbounded_channel();
        let mut desired = HashMap::new();
        desired.insert(own.0, own.1);
        let task = Task {
            endpoints,
            prefix,
            desired,
            writes: wrx,
            feeds: ftx,
        };
        tokio::spawn(task.run());
        EtcdRegistry {
            writes: wtx,
            feeds: frx,
        }
    }

    pub fn write(&self, w: Write) {
        // The task runs as long as the relay does.
        let _ = self.writes.send(w);
    }
}

struct Task {
    endpoints: Vec<String>,
    prefix: String,
    /// Every key this relay wants under its lease, with its value.
    desired: HashMap<String, Vec<u8>>,
    writes: mpsc::UnboundedReceiver<Write>,
    feeds: mpsc::UnboundedSender<Feed>,
}

impl Task {
    async fn run(mut self) {
        let mut wait = RETRY_FIRST;
        let mut down = false;
        loop {
            let e = self.session(&mut down, &mut wait).await;
            if self.feeds.is_closed() {
                return;
            }
            if !down {
                down = true;
                let _ = self.feeds.send(Feed::Down(e.to_string()));
            }
            // Writes that came meanwhile still count: they are in the desired state.
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    w = self.writes.recv() => match w {
                        Some(w) => self.note(&w),
                        None => return,
                    },
                }
            }
            wait = (wait * 2).min(RETRY_MAX);
        }
    }

    /// Records a write in the desired state.
    fn note(&mut self, w: &Write) {
        match w {
            Write::Put { key, value } => {
                self.desired.insert(key.clone(), value.clone());
            }
            Write::Delete { key, value } => {
                if self.desired.get(key) == Some(value) {
                    self.desired.remove(key);
                }
            }
        }
    }

    /// One connection to etcd, from the lease to the failure that ends it.
    async fn session(&mut self, down: &mut bool, wait: &mut Duration) -> EtcdError {
        let opts = ConnectOptions::new()
            .with_connect_timeout(CALL_TIMEOUT)
            .with_timeout(CALL_TIMEOUT)
            .with_keep_alive(Duration::from_secs(2), CALL_TIMEOUT);
        let mut client = match call(Client::connect(&self.endpoints, Some(opts))).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let lease = match call(client.lease_grant(LEASE_TTL, None)).await {
            Ok(l) => l.id(),
            Err(e) => return e,
        };
        let (mut keeper, mut keepalives) = match call(client.lease_keep_alive(lease)).await {
            Ok(k) => k,
            Err(e) => return e,
        };
        let keys: Vec<(String, Vec<u8>)> = self
            .desired
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in keys {
            if let Err(e) = self.put(&mut client, lease, &k, v).await {
                return e;
            }
        }
        let revision = match self.load(&mut client).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        let mut watch = match self.watch(&mut client, revision + 1).await {
            Ok(w) => w,
            Err(e) => return e,
        };
        *down = false;
        *wait = RETRY_FIRST;
        let _ = self.feeds.send(Feed::Up { lease });
        let mut tick = tokio::time::interval(KEEPALIVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Answers to keepalives: one must come within the TTL.
        let mut last_answer = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if last_answer.elapsed() > Duration::from_secs(LEASE_TTL as u64) {
                        return EtcdError::LeaseLost;
                    }
                    if let Err(e) = call(keeper.keep_alive()).await {
                        return e;
                    }
                }
                a = keepalives.message() => match a {
                    Ok(Some(r)) if r.ttl() > 0 => last_answer = tokio::time::Instant::now(),
                    // TTL 0: etcd no longer has the lease (it expired): write it all again.
                    Ok(Some(_)) => return EtcdError::LeaseLost,
                    Ok(None) => return EtcdError::LeaseLost,
                    Err(e) => return e.into(),
                },
                m = watch.message() => match m {
                    Ok(Some(resp)) => {
                        if resp.canceled() {
                            return EtcdError::WatchCancelled(resp.cancel_reason().to_string());
                        }
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let ev = match ev.event_type() {
                                EventType::Put => Event::Put {
                                    key: kv.key().to_vec(),
                                    value: kv.value().to_vec(),
                                    mod_revision: kv.mod_revision(),
                                },
                                EventType::Delete => Event::Delete {
                                    key: kv.key().to_vec(),
                                    mod_revision: kv.mod_revision(),
                                },
                            };
                            let _ = self.feeds.send(Feed::Event(ev));
                        }
                    }
                    Ok(None) => return EtcdError::WatchEnded,
                    Err(e) => return e.into(),
                },
                w = self.writes.recv() => {
                    let Some(w) = w else { return EtcdError::WatchEnded };
                    self.note(&w);
                    let r = match w {
                        Write::Put { key, value } => self.put(&mut client, lease, &key, value).await,
                        Write::Delete { key, value } => {
                            let txn = Txn::new()
                                .when([Compare::value(key.clone(), CompareOp::Equal, value)])
                                .and_then([TxnOp::delete(key, None)]);
                            call(client.txn(txn)).await.map(|_| ())
                        }
                    };
                    if let Err(e) = r {
                        return e;
                    }
                }
            }
        }
    }

    async fn put(
        &self,
        client: &mut Client,
        lease: i64,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), EtcdError> {
        let opts = PutOptions::new().with_lease(lease);
        call(client.put(key, value, Some(opts))).await.map(|_| ())
    }

    /// Reads the whole prefix; the relay's cache takes it as the truth at that revision.
    async fn load(&self, client: &mut Client) -> Result<i64, EtcdError> {
        let resp =
            call(client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let kvs = resp
            .kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.value().to_vec(), kv.mod_revision()))
            .collect();
        let _ = self.feeds.send(Feed::Loaded { kvs, revision });
        Ok(revision)
    }

    async fn watch(
        &self,
        client: &mut Client,
        from: i64,
    ) -> Result<etcd_client::WatchStream, EtcdError> {
        let opts = WatchOptions::new().with_prefix().with_start_revision(from);
        call(client.watch(self.prefix.as_str(), Some(opts))).await
    }
}
