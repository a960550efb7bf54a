//! Stateless QUIC retry tokens: proof that a client can receive at the address it claims,
//! so the relay answers nobody's spoofed Initials with more than a small Retry packet.
//!
//! Token: `[issued at: u64 BE seconds][odcid len: u8][odcid][HMAC-SHA256 over all before + addr]`.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

pub const TOKEN_LIFETIME: Duration = Duration::from_secs(30);

pub struct RetryTokens {
    key: hmac::Key,
}

fn addr_bytes(addr: &SocketAddr) -> Vec<u8> {
    let mut v = match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v.extend_from_slice(&addr.port().to_be_bytes());
    v
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RetryTokens {
    /// A fresh random key: tokens do not survive a relay restart, which is fine (clients retry).
    pub fn new() -> Self {
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        RetryTokens {
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
        }
    }

    pub fn mint(&self, odcid: &[u8], addr: &SocketAddr) -> Vec<u8> {
        self.mint_at(odcid, addr, now_secs())
    }

    fn mint_at(&self, odcid: &[u8], addr: &SocketAddr, at: u64) -> Vec<u8> {
        let mut t = Vec::with_capacity(8 + 1 + odcid.len() + 32);
        t.extend_from_slice(&at.to_be_bytes());
        t.push(odcid.len() as u8);
        t.extend_from_slice(odcid);
        let mut signed = t.clone();
        signed.extend_from_slice(&addr_bytes(addr));
        t.extend_from_slice(hmac::sign(&self.key, &signed).as_ref());
        t
    }

    /// The original destination connection id the token was minted for, if the token is ours,
    /// fresh, and for this address.
    pub fn validate(&self, token: &[u8], addr: &SocketAddr) -> Option<Vec<u8>> {
        self.validate_at(token, addr, now_secs())
    }

    fn validate_at(&self, token: &[u8], addr: &SocketAddr, now: u64) -> Option<Vec<u8>> {
        let at = u64::from_be_bytes(token.get(..8)?.try_into().ok()?);
        let len = *token.get(8)? as usize;
        let odcid = token.get(9..9 + len)?;
        let tag = token.get(9 + len..)?;
        let mut signed = token[..9 + len].to_vec();
        signed.extend_from_slice(&addr_bytes(addr));
        hmac::verify(&self.key, &signed, tag).ok()?;
        if now < at || now - at > TOKEN_LIFETIME.as_secs() {
            return None;
        }
        Some(odcid.to_vec())
    }
}

impl Default for RetryTokens {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tokens_bind_address_and_time() {
        let r = RetryTokens::new();
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        let t = r.mint_at(b"odcid", &a, 1000);
        assert_eq!(r.validate_at(&t, &a, 1010), Some(b"odcid".to_vec()));
        assert_eq!(r.validate_at(&t, &b, 1010), None, "other address");
        assert_eq!(r.validate_at(&t, &a, 1031), None, "expired");
        assert_eq!(r.validate_at(&t, &a, 999), None, "from the future");
        let mut forged = t.clone();
        forged[0] ^= 1;
        assert_eq!(r.validate_at(&forged, &a, 1010), None, "tampered");
        assert_eq!(
            RetryTokens::new().validate_at(&t, &a, 1010),
            None,
            "other key"
        );
    }

    proptest! {
        #[test]
        fn garbage_tokens_are_refused(t in proptest::collection::vec(any::<u8>(), 0..100)) {
            let r = RetryTokens::new();
            prop_assert_eq!(r.validate(&t, &"192.0.2.1:1".parse().unwrap()), None);
        }
    }
}
