//! The client listener's certificate, swapped by a reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The listener's certificate, replaceable while serving: a reload with a renewed certificate
/// takes effect for the next handshake, open connections keep theirs.
pub struct CertSwap(ArcSwap<CertifiedKey>);

// rustls asks for `Debug`; the key stays out of it.
impl std::fmt::Debug for CertSwap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertSwap")
    }
}

impl CertSwap {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<CertSwap> {
        Arc::new(CertSwap(ArcSwap::new(key)))
    }

    pub fn set(&self, key: Arc<CertifiedKey>) {
        self.0.store(key);
    }
}

impl ResolvesServerCert for CertSwap {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}
