//! TLS 1.3 configuration for both ends, and the two certificate verifiers.
//!
//! * The **server** presents a self-signed certificate for its Ed25519 key.
//!   The client's [`PinnedServerVerifier`] ignores names, dates and CAs and
//!   accepts the certificate only if the SHA-256 of its SubjectPublicKeyInfo
//!   equals the fingerprint pinned from the `hush://` address.
//! * The **client** must present a self-signed certificate for its Ed25519
//!   device key (never the account key: that one only signs device
//!   certificates). The server's [`DeviceKeyVerifier`] accepts any
//!   well-formed certificate whose key is Ed25519 (there is no registry of
//!   allowed keys at this layer: unknown keys may still register), and
//!   rustls then checks the client's CertificateVerify signature with that
//!   key. The connection is bound to the key: see [`device_of_peer`]; the
//!   server maps it to an account through the device's certificate.
//!
//! Both sides offer only TLS 1.3, only the Ed25519 signature scheme, no
//! session resumption and no 0-RTT (early data would arrive before the
//! client is authenticated).

use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, SubjectPublicKeyInfoDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use thiserror::Error;

use super::address::Fingerprint;
use super::cert;
use super::device::DeviceId;
use super::identity::KeyError;
use super::online::{self, CurrentKey, OnlineCert, OnlineError};
use crate::wire::ALPN;

/// Why a TLS configuration could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks a TLS 1.3 CertificateVerify signature made with the Ed25519 key
/// in `cert`. Any other key type or signature scheme is refused.
fn verify_ed25519(
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algs: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(rustls::Error::InvalidCertificate(CertificateError::BadSignature));
    }
    let spki = ed25519_spki_of(cert)?;
    rustls::crypto::verify_tls13_signature_with_raw_key(message, &SubjectPublicKeyInfoDer::from(spki), dss, algs)
}

fn ed25519_spki_of(cert: &CertificateDer<'_>) -> Result<Vec<u8>, rustls::Error> {
    let spki = cert::spki_of_certificate(cert.as_ref())
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    cert::ed25519_key(&spki).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
    Ok(spki)
}

/// The device key a verified peer certificate chain binds the connection to.
pub fn device_of_peer(certs: &[CertificateDer<'_>]) -> Option<DeviceId> {
    let first = certs.first()?;
    let spki = cert::spki_of_certificate(first.as_ref()).ok()?;
    cert::ed25519_key(&spki).ok().map(DeviceId)
}

/// Server side: accepts any well-formed Ed25519 client certificate; rustls
/// then verifies the handshake signature through `verify_ed25519`.
#[derive(Debug)]
pub struct DeviceKeyVerifier {
    algs: WebPkiSupportedAlgorithms,
}

/// The signature half of both verifiers: TLS 1.3 handshake signatures
/// with Ed25519 only (`self.algs`), TLS 1.2 never.
macro_rules! ed25519_tls13_only {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is not supported".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_ed25519(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

impl ClientCertVerifier for DeviceKeyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        ed25519_spki_of(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    ed25519_tls13_only!();
}

/// Client side: the server must present the pinned key, or an online key
/// the pinned identity certified that is valid now (the certificate is
/// the chain's second entry; see [`super::online`]). Records what it saw
/// so a refusal can be reported precisely.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    pin: Fingerprint,
    seen: Arc<Mutex<Seen>>,
    algs: WebPkiSupportedAlgorithms,
}

/// What the client's verifier saw in the handshake.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The fingerprint of the key the server presented.
    pub presented: Option<Fingerprint>,
    /// Why that key was refused, if it was.
    pub refused: Option<OnlineError>,
    /// The online-key certificate of an accepted key (none when the
    /// identity key served itself).
    pub cert: Option<OnlineCert>,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let spki = cert::spki_of_certificate(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        let presented = Fingerprint::of_spki(&spki);
        let key =
            cert::ed25519_key(&spki).map_err(|_| rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        let chain: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
        let verdict = online::check_server_key(&self.pin, &key, &chain, now.as_secs());
        let cert = match (&verdict, chain.first()) {
            (Ok(()), Some(first)) if !presented.matches(&self.pin) => OnlineCert::decode(first).ok(),
            _ => None,
        };
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Seen { presented: Some(presented), refused: verdict.clone().err(), cert };
        }
        verdict.map_err(|_| rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))?;
        Ok(ServerCertVerified::assertion())
    }

    ed25519_tls13_only!();
}

/// The server's QUIC crypto configuration: each handshake presents the
/// key `current` holds then.
pub fn server_crypto(current: CurrentKey) -> Result<QuicServerConfig, TlsError> {
    let provider = provider();
    let verifier = DeviceKeyVerifier { algs: provider.signature_verification_algorithms };
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(current));
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    cfg.send_tls13_tickets = 0;
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    QuicServerConfig::try_from(cfg).map_err(|e| TlsError::Quic(e.to_string()))
}

/// What the client's verifier saw, for error reporting.
#[derive(Debug, Clone, Default)]
pub struct SeenFingerprint(Arc<Mutex<Seen>>);

impl SeenFingerprint {
    /// The fingerprint of the key the server presented.
    pub fn get(&self) -> Option<Fingerprint> {
        self.seen().presented
    }

    /// Everything the verifier saw.
    pub fn seen(&self) -> Seen {
        self.0.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// A certificate with its signing key, as rustls uses them.
pub type Credentials = Arc<CertifiedKey>;

/// The client's QUIC crypto configuration: pins `pin` and presents
/// `credentials` (normally [`crate::auth::Identity::tls_credentials`]; `None` presents
/// no certificate, which the server refuses; only tests want that).
pub fn client_crypto(
    credentials: Option<Credentials>,
    pin: Fingerprint,
) -> Result<(QuicClientConfig, SeenFingerprint), TlsError> {
    let provider = provider();
    let seen = SeenFingerprint::default();
    let verifier = PinnedServerVerifier { pin, seen: seen.0.clone(), algs: provider.signature_verification_algorithms };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut cfg = match credentials {
        Some(credentials) => builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(credentials))),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.enable_early_data = false;
    cfg.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(cfg).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok((quic, seen))
}
