//! Where the database is and how to reach it.

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::listen::WakeKey;
use crate::db::{StoreError, TargetError};

/// CA bundle used to verify a database server's certificate when the URL
/// names none (`sslrootcert=FILE`).
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

use crate::limits::DATABASE_CONNECT_TIMEOUT as CONNECT_TIMEOUT;

/// A PostgreSQL database to connect to: parsed settings, TLS for TCP hosts,
/// and this process's node id (which tells a node its own `NOTIFY`s apart
/// from other nodes').
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    pub node: u64,
    /// Authenticates this node's wake-ups and checks other nodes'
    /// ([`super::listen`]); without it (a command that only connects) no
    /// wake-up is sent or taken.
    wake: Option<WakeKey>,
    /// The number of this node's last notice (each process numbers its
    /// own upwards from 1; clones share it).
    notices: Arc<AtomicI64>,
}

impl std::fmt::Debug for Target {
    // The URL may hold a password: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("tls", &self.tls.is_some()).finish_non_exhaustive()
    }
}

impl Target {
    /// Parses a `postgresql://` URL (or `key=value` settings). A Unix-socket
    /// host needs no TLS; TCP hosts get TLS, required (an unencrypted
    /// fallback is taken only with an explicit `sslmode=disable`).
    pub fn parse(url: &str) -> Result<Arc<Self>, TargetError> {
        let (url, root) = take_param(url, "sslrootcert");
        let mut config = tokio_postgres::Config::from_str(&url).map_err(|e| TargetError::Url(e.to_string()))?;
        if config.get_hosts().is_empty() {
            return Err(TargetError::Url("it names no host (a TCP host name or a socket directory)".into()));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("hushd");
        }
        let tcp = config.get_hosts().iter().any(|h| matches!(h, Host::Tcp(_)));
        let tls = if tcp && config.get_ssl_mode() != SslMode::Disable {
            // `prefer` (the default) would fall back to plain text; hush
            // does not.
            config.ssl_mode(SslMode::Require);
            Some(tls(root.map(PathBuf::from).unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE)))?)
        } else {
            config.ssl_mode(SslMode::Disable);
            None
        };
        let mut node = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut node).map_err(|_| TargetError::Random)?;
        Ok(Arc::new(Self {
            config,
            tls,
            node: u64::from_le_bytes(node),
            wake: None,
            notices: Arc::new(AtomicI64::new(0)),
        }))
    }

    /// [`Target::parse`] for a node of the deployment whose wake-up secret
    /// is `wake`: it sends and takes authenticated wake-ups.
    pub fn for_node(url: &str, wake: &[u8; 32]) -> Result<Arc<Self>, TargetError> {
        let mut target = Arc::unwrap_or_clone(Self::parse(url)?);
        target.wake = Some(WakeKey::from_secret(wake));
        Ok(Arc::new(target))
    }

    /// The key wake-ups are authenticated with, if this is a node.
    pub fn wake_key(&self) -> Option<&WakeKey> {
        self.wake.as_ref()
    }

    /// Numbers for `k` new notices of this node, and their wake-ups (none
    /// without a key): the first number is one more than the last ever
    /// handed out.
    pub(super) fn number_notices(&self, k: usize) -> (Vec<i64>, Vec<String>) {
        let k64 = i64::try_from(k).unwrap_or(i64::MAX);
        let first = self.notices.fetch_add(k64, Ordering::Relaxed).saturating_add(1);
        let numbers: Vec<i64> = (0..k64).map(|i| first.saturating_add(i)).collect();
        let texts = match &self.wake {
            Some(key) => {
                let at = crate::util::now_unix();
                numbers.iter().map(|n| super::listen::wake_up_text(key, self.node, *n, at)).collect()
            }
            None => Vec::new(),
        };
        (numbers, texts)
    }

    /// A blocking client (the engine's threads, short commands).
    pub fn connect_blocking(&self) -> Result<postgres::Client, StoreError> {
        let config = postgres::Config::from(self.config.clone());
        Ok(match &self.tls {
            Some(tls) => config.connect(tls.clone())?,
            None => config.connect(tokio_postgres::NoTls)?,
        })
    }

    /// The settings, for an async connection ([`super::listen`]).
    pub(super) fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    pub(super) fn tls(&self) -> Option<&MakeRustlsConnect> {
        self.tls.as_ref()
    }
}

/// Removes `name=value` from a URL's query (or a `key=value` string) and
/// returns it: a setting hush reads itself that the driver does not know.
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let prefix = format!("{name}=");
    let mut value = None;
    let mut keep = |p: &&str| match p.strip_prefix(&prefix) {
        Some(v) => {
            value = Some(v.to_string());
            false
        }
        None => true,
    };
    let url = if let Some((base, query)) = url.split_once('?') {
        let kept: Vec<&str> = query.split('&').filter(&mut keep).collect();
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else if !url.contains("://") {
        url.split_whitespace().filter(&mut keep).collect::<Vec<_>>().join(" ")
    } else {
        url.to_string()
    };
    (url, value)
}

fn tls(roots: PathBuf) -> Result<MakeRustlsConnect, TargetError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let bad = |why: String| TargetError::RootCerts { path: roots.clone(), why };
    let mut store = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&roots).map_err(|e| bad(e.to_string()))? {
        store.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(bad("no certificates in it".into()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(store)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_from_urls_and_settings() {
        let (u, v) = take_param("postgresql://h/db?sslrootcert=/x.pem&sslmode=require", "sslrootcert");
        assert_eq!((u.as_str(), v.as_deref()), ("postgresql://h/db?sslmode=require", Some("/x.pem")));
        let (u, v) = take_param("host=h sslrootcert=/y.pem dbname=d", "sslrootcert");
        assert_eq!((u.as_str(), v.as_deref()), ("host=h dbname=d", Some("/y.pem")));
        assert_eq!(take_param("postgresql://h/db", "sslrootcert").1, None);
    }

    #[test]
    fn unix_sockets_go_without_tls_and_tcp_requires_it() {
        let t = Target::parse("postgresql:///hush?host=/run/postgresql").unwrap();
        assert!(t.tls.is_none());
        let t = Target::parse("postgresql://db.example/hush").unwrap();
        assert!(t.tls.is_some() && t.config.get_ssl_mode() == SslMode::Require);
        let t = Target::parse("postgresql://127.0.0.1/hush?sslmode=disable").unwrap();
        assert!(t.tls.is_none());
        assert!(Target::parse("postgresql://h/db?sslrootcert=/nonexistent.pem").is_err());
        assert!(format!("{:?}", Target::parse("postgresql://u:secret@h/db").unwrap()).find("secret").is_none());
    }
}
