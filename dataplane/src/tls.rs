//! QUIC configurations with mutual authentication against the organisation CA.
//!
//! BoringSSL verifies the chain (signature, expiry); a verify callback then checks the leaf's
//! sluice role, so a certificate from another CA, an expired one, or one of the wrong role fails
//! the handshake with a TLS alert. The refusing side logs why in one line; the refused side reads
//! the alert from the peer's CONNECTION_CLOSE (see [`describe_close`]).

use std::fs;
use std::sync::Arc;

use boring::pkey::PKey;
use boring::ssl::{
    SslContextBuilder, SslInfoCallbackMode, SslMethod, SslSignatureAlgorithm, SslVerifyMode,
};
use boring::x509::store::X509StoreBuilder;
use boring::x509::{X509VerifyError, X509};

use crate::identity::{identity_from_der, identity_from_pem, Identity, IdentityError, Role};
use crate::revocation::{CaKey, RevocationError, Revocations};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("TLS setup failed: {0}")]
    Boring(#[from] boring::error::ErrorStack),
    #[error("QUIC setup failed: {0}")]
    Quic(#[from] quiche::Error),
}

/// A node's certificate, key and the CA it trusts, loaded from PEM files.
#[derive(Clone)]
pub struct Credentials {
    cert_chain: Vec<X509>,
    key: PKey<boring::pkey::Private>,
    ca: X509,
    pub identity: Identity,
    /// The revocation list this node enforces: every handshake checks it, and whoever loads
    /// a new list (a file, the relay) puts it here. Clones of these credentials share it.
    pub revocations: Revocations,
}

fn read(path: &str) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|e| IdentityError::File {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn bad(path: &str, what: &str) -> IdentityError {
    IdentityError::File {
        path: path.into(),
        reason: format!("not a PEM {what}"),
    }
}

impl Credentials {
    /// Whether this node's certificate is signed by the CA it trusts. When not, every peer
    /// refuses it (the caller warns: a CA being replaced is a moment when this is expected).
    pub fn signed_by_own_ca(&self) -> bool {
        let (Some(leaf), Ok(ca_key)) = (self.cert_chain.first(), self.ca.public_key()) else {
            return false;
        };
        leaf.verify(&ca_key).unwrap_or(false)
    }

    pub fn load(cert_path: &str, key_path: &str, ca_path: &str) -> Result<Self, IdentityError> {
        let (cert, key, ca) = (read(cert_path)?, read(key_path)?, read(ca_path)?);
        Self::from_pem(&cert, &key, &ca, [cert_path, key_path, ca_path])
    }

    /// Credentials from PEM bytes (an Apple host keeps them in the Keychain, not in files);
    /// `names` say what to call the certificate, key and CA in errors.
    pub fn from_pem(
        cert_pem: &[u8],
        key_pem: &[u8],
        ca_pem: &[u8],
        names: [&str; 3],
    ) -> Result<Self, IdentityError> {
        let [cert_path, key_path, ca_path] = names;
        let cert_chain =
            X509::stack_from_pem(cert_pem).map_err(|_| bad(cert_path, "certificate"))?;
        if cert_chain.is_empty() {
            return Err(bad(cert_path, "certificate"));
        }
        let key = PKey::private_key_from_pem(key_pem).map_err(|_| bad(key_path, "private key"))?;
        let ca = X509::from_pem(ca_pem).map_err(|_| bad(ca_path, "CA certificate"))?;
        // Caught here, with both files named, rather than as BoringSSL's KEY_VALUES_MISMATCH
        // or a peer's refusal at the first handshake.
        let leaf = &cert_chain[0];
        let leaf_key = leaf
            .public_key()
            .map_err(|_| bad(cert_path, "certificate"))?;
        if !leaf_key.public_eq(&key) {
            return Err(IdentityError::File {
                path: key_path.into(),
                reason: format!("this key does not belong to the certificate {cert_path}"),
            });
        }

        let identity = identity_from_pem(&String::from_utf8_lossy(cert_pem)).map_err(|e| {
            IdentityError::File {
                path: cert_path.into(),
                reason: e.to_string(),
            }
        })?;
        Ok(Credentials {
            cert_chain,
            key,
            ca,
            identity,
            revocations: Revocations::default(),
        })
    }

    /// What checks peers' renewed certificates, against this node's CA and revocation list.
    pub fn peer_check(&self) -> Result<PeerCheck, TlsError> {
        Ok(PeerCheck {
            ca: self.ca.public_key()?,
            revocations: self.revocations.clone(),
        })
    }

    /// This node's certificate (DER), as it presents it to peers when it renews.
    pub fn certificate_der(&self) -> Result<Vec<u8>, TlsError> {
        match self.cert_chain.first() {
            Some(c) => Ok(c.to_der()?),
            None => Err(TlsError::Identity(IdentityError::NoName)),
        }
    }

    /// `msg` signed with this node's key (Ed25519, as `sluice ca` issues them): what a
    /// connector puts on its registry record.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, TlsError> {
        let mut signer = boring::sign::Signer::new_without_digest(&self.key)?;
        Ok(signer.sign_oneshot_to_vec(msg)?)
    }

    /// The trusted CA's key, which revocation lists must be signed with.
    pub fn ca_key(&self) -> Result<CaKey, RevocationError> {
        let der = (self.ca.to_der()).map_err(|e| RevocationError::CaKey(e.to_string()))?;
        CaKey::from_cert_der(&der)
    }
}

/// Why a peer's renewed certificate was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewalError {
    #[error("not a certificate")]
    NotACertificate,
    #[error("not signed by our CA")]
    NotSignedByCa,
    #[error("not valid now (valid from {not_before} to {not_after}, Unix seconds)")]
    NotValidNow { not_before: i64, not_after: i64 },
    #[error("{0}")]
    Identity(String),
    #[error("it is for another key (peer {0}): a new key needs a new connection")]
    OtherKey(String),
    #[error("it names {got}, not {want}")]
    OtherHolder { got: String, want: String },
    #[error("it is revoked ({1} is on revocation list #{0})")]
    Revoked(u64, crate::revocation::Revoked),
}

/// Checks a certificate that a peer sends over a connection its previous certificate
/// authenticated (a renewal): signed by our CA, valid now, the same key, name and role, not
/// revoked. The connection's handshake proved the key; the CA vouches for the rest.
#[derive(Clone)]
pub struct PeerCheck {
    ca: PKey<boring::pkey::Public>,
    revocations: Revocations,
}

impl PeerCheck {
    /// A certificate (DER) checked as any peer's is: signed by our CA, valid at `now_unix`,
    /// naming a sluice identity, not revoked. Also returns its public key.
    pub fn certificate(
        &self,
        der: &[u8],
        now_unix: i64,
    ) -> Result<(Identity, PKey<boring::pkey::Public>), RenewalError> {
        let cert = X509::from_der(der).map_err(|_| RenewalError::NotACertificate)?;
        if !cert.verify(&self.ca).unwrap_or(false) {
            return Err(RenewalError::NotSignedByCa);
        }
        let (not_before, not_after) = crate::identity::validity_of_der(der)
            .map_err(|e| RenewalError::Identity(e.to_string()))?;
        if now_unix < not_before || now_unix > not_after {
            return Err(RenewalError::NotValidNow {
                not_before,
                not_after,
            });
        }
        let id = identity_from_der(der).map_err(|e| RenewalError::Identity(e.to_string()))?;
        if let Some((seq, why)) = self.revocations.revokes(&id) {
            return Err(RenewalError::Revoked(seq, why));
        }
        let key = cert
            .public_key()
            .map_err(|_| RenewalError::NotACertificate)?;
        Ok((id, key))
    }

    /// The renewed identity of the peer now known as `current`.
    pub fn renewed(
        &self,
        current: &Identity,
        der: &[u8],
        now_unix: i64,
    ) -> Result<Identity, RenewalError> {
        let (id, _) = self.certificate(der, now_unix)?;
        if id.peer_id != current.peer_id {
            return Err(RenewalError::OtherKey(id.peer_id.short()));
        }
        if id.name != current.name || id.role != current.role {
            return Err(RenewalError::OtherHolder {
                got: format!("{} {:?}", id.role, id.name),
                want: format!("{} {:?}", current.role, current.name),
            });
        }
        Ok(id)
    }
}

/// Transport settings shared by every sluice QUIC connection.
#[derive(Debug, Clone)]
pub struct QuicParams {
    pub alpn: &'static [u8],
    /// Largest UDP payload this side sends.
    pub max_udp_payload: usize,
    pub idle_timeout_ms: u64,
    pub dgram_queue: usize,
    /// Whether the connection carries framed messages on streams (both kinds now do).
    pub streams: bool,
}

impl QuicParams {
    /// A control connection (agent or connector to relay).
    pub fn control() -> Self {
        QuicParams {
            alpn: ALPN_CONTROL,
            max_udp_payload: crate::wire::CONTROL_UDP_PAYLOAD,
            // Clients send a keepalive every 2 s and give up on a relay silent for 6 s; the
            // relay drops a silent client after this (a killed connector's registration goes
            // away in seconds, not half a minute).
            idle_timeout_ms: 8_000,
            dgram_queue: 1024,
            streams: true,
        }
    }

    /// An end-to-end tunnel (agent to connector): its packets fit a relay forward DATAGRAM.
    pub fn tunnel() -> Self {
        QuicParams {
            alpn: ALPN_TUNNEL,
            max_udp_payload: crate::wire::TUNNEL_UDP_PAYLOAD,
            idle_timeout_ms: 120_000,
            dgram_queue: 1024,
            streams: true,
        }
    }
}

/// ALPN of control connections (agent or connector to relay).
pub const ALPN_CONTROL: &[u8] = b"sluice-control/1";
/// ALPN of end-to-end tunnels (agent to connector).
pub const ALPN_TUNNEL: &[u8] = b"sluice-tunnel/1";

/// Builds a quiche config presenting `creds` and accepting only peers of the `accept` roles.
pub fn quic_config(
    creds: &Credentials,
    accept: &'static [Role],
    params: &QuicParams,
) -> Result<quiche::Config, TlsError> {
    let mut b = SslContextBuilder::new(SslMethod::tls())?;
    let mut chain = creds.cert_chain.iter();
    if let Some(leaf) = chain.next() {
        b.set_certificate(leaf)?;
    }
    for extra in chain {
        b.add_extra_chain_cert(extra.clone())?;
    }
    b.set_private_key(&creds.key)?;
    b.check_private_key()?;
    // BoringSSL does not accept Ed25519 signatures unless asked to; sluice uses nothing else.
    b.set_verify_algorithm_prefs(&[SslSignatureAlgorithm::ED25519])?;
    let mut store = X509StoreBuilder::new()?;
    store.add_cert(creds.ca.clone())?;
    b.set_cert_store(store.build());

    let me = Arc::new(creds.identity.name.clone());
    let revocations = creds.revocations.clone();
    b.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        move |preverify_ok, ctx| {
            let subject = ctx
                .current_cert()
                .and_then(|c| {
                    c.subject_name()
                        .entries()
                        .next()
                        .and_then(|e| e.data().as_utf8().ok().map(|s| s.to_string()))
                })
                .unwrap_or_else(|| "?".into());
            if !preverify_ok {
                tracing::warn!(
                    "refusing peer certificate {subject:?}: {} (depth {})",
                    ctx.verify_result()
                        .err()
                        .map(|e| e.error_string())
                        .unwrap_or("verification failed"),
                    ctx.error_depth()
                );
                return false;
            }
            if ctx.error_depth() != 0 {
                return true;
            }
            let der = match ctx.current_cert().map(|c| c.to_der()) {
                Some(Ok(der)) => der,
                _ => return false,
            };
            match identity_from_der(&der) {
                Ok(id) if accept.contains(&id.role) => match revocations.revokes(&id) {
                    None => true,
                    Some((seq, why)) => {
                        tracing::warn!(
                            "refusing {id}: certificate revoked ({why} is on revocation list #{seq})"
                        );
                        // BoringSSL answers with the "certificate revoked" alert (44).
                        ctx.set_error(Err(X509VerifyError::CERT_REVOKED));
                        false
                    }
                },
                Ok(id) => {
                    tracing::warn!(
                        "refusing peer certificate {subject:?}: role {}, but {me} accepts only {}",
                        id.role,
                        accept
                            .iter()
                            .map(|r| r.as_str())
                            .collect::<Vec<_>>()
                            .join(" or ")
                    );
                    ctx.set_error(Err(X509VerifyError::APPLICATION_VERIFICATION));
                    false
                }
                Err(e) => {
                    tracing::warn!("refusing peer certificate {subject:?}: {e}");
                    ctx.set_error(Err(X509VerifyError::APPLICATION_VERIFICATION));
                    false
                }
            }
        },
    );
    b.set_info_callback(|ssl, mode, _| {
        if mode == SslInfoCallbackMode::HANDSHAKE_DONE {
            let peer = ssl
                .peer_certificate()
                .and_then(|c| c.to_der().ok())
                .and_then(|d| identity_from_der(&d).ok())
                .map(|id| id.to_string())
                .unwrap_or_else(|| "?".into());
            tracing::info!(
                "TLS handshake done with {peer}: key exchange {}, cipher {}",
                ssl.curve_name().unwrap_or("unknown"),
                ssl.current_cipher().map(|c| c.name()).unwrap_or("unknown"),
            );
        }
    });

    let mut cfg = quiche::Config::with_boring_ssl_ctx_builder(quiche::PROTOCOL_VERSION, b)?;
    cfg.set_application_protos(&[params.alpn])?;
    cfg.set_max_idle_timeout(params.idle_timeout_ms);
    cfg.set_max_recv_udp_payload_size(params.max_udp_payload.max(1500));
    cfg.set_max_send_udp_payload_size(params.max_udp_payload);
    cfg.enable_dgram(true, params.dgram_queue, params.dgram_queue);
    cfg.set_initial_max_data(if params.streams { 1 << 20 } else { 0 });
    cfg.set_initial_max_stream_data_bidi_local(if params.streams { 1 << 18 } else { 0 });
    cfg.set_initial_max_stream_data_bidi_remote(if params.streams { 1 << 18 } else { 0 });
    cfg.set_initial_max_streams_bidi(if params.streams { 4 } else { 0 });
    cfg.set_initial_max_streams_uni(0);
    cfg.set_active_connection_id_limit(4);
    cfg.set_initial_congestion_window_packets(64);
    // Explicit, since ACK holding relies on it (`ack_hold::ACK_HOLD` stays below).
    cfg.set_max_ack_delay(crate::ack_hold::MAX_ACK_DELAY_MS);
    cfg.set_disable_active_migration(false);
    Ok(cfg)
}

/// A TLS alert number in words (RFC 8446 §6).
pub fn alert_name(alert: u64) -> &'static str {
    match alert {
        40 => "handshake failure",
        42 => "bad certificate",
        43 => "unsupported certificate",
        44 => "certificate revoked",
        45 => "certificate expired",
        46 => "certificate unknown (wrong role or not a sluice certificate)",
        48 => "unknown CA (certificate from another organisation)",
        49 => "access denied",
        116 => "certificate required",
        120 => "no application protocol",
        _ => "TLS alert",
    }
}

/// Says why a connection closed, in words, or None when it closed without an error.
pub fn describe_close(conn: &quiche::Connection) -> Option<String> {
    if let Some(e) = conn.peer_error() {
        return Some(describe_error("peer", e));
    }
    if let Some(e) = conn.local_error() {
        return Some(describe_error("we", e));
    }
    if conn.is_timed_out() {
        return Some("idle timeout: no answer from the peer".into());
    }
    None
}

fn describe_error(who: &str, e: &quiche::ConnectionError) -> String {
    let reason = String::from_utf8_lossy(&e.reason);
    if !e.is_app && (0x100..0x200).contains(&e.error_code) {
        let alert = e.error_code - 0x100;
        let whose = if who == "peer" {
            "the peer refused us"
        } else {
            "we refused the peer"
        };
        let detail = if reason.is_empty() {
            String::new()
        } else {
            format!(": {reason}")
        };
        return format!("{whose}: {} (TLS alert {alert}){detail}", alert_name(alert));
    }
    if e.is_app && !reason.is_empty() {
        format!("{who} closed the connection: {reason}")
    } else if e.is_app {
        format!("{who} closed the connection: code {}", e.error_code)
    } else {
        format!(
            "{who} closed the connection: QUIC error {:#x} {reason}",
            e.error_code
        )
    }
}
