//! Authentication in the handshake: pinned server keys, client key pairs,
//! the registration deadline.

use hush::client::{ClientError, Connection};
use hush::wire::{close, ErrorCode, Request};

use crate::support::*;

#[test]
fn a_client_pinning_another_fingerprint_refuses_the_server() {
    let tmp = tempfile::tempdir().unwrap();
    let a = Hushd::start(&tmp.path().join("a"));
    let b = Hushd::start(&tmp.path().join("b"));
    let token = b.invite(&[]);
    // B's host and port, but A's fingerprint.
    let mut wrong = b.address.clone();
    wrong.fingerprint = a.address.fingerprint;
    let home = tmp.path().join("alice");
    let out = hush(&home, &["register", &wrong.to_string(), "--invite", &token]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("does not match the one you pinned"), "{err}");
    assert!(err.contains(&b.address.fingerprint.to_string()), "names what was presented: {err}");
    // Nothing was registered with B.
    let accounts = ok(run(hushd_command(&b.data_dir).arg("accounts")));
    assert!(accounts.trim().is_empty(), "{accounts}");
}

#[test]
fn a_server_with_a_swapped_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let first = Hushd::start(&tmp.path().join("first"));
    let token = first.invite(&[]);
    let home = tmp.path().join("alice");
    ok(hush(&home, &["register", &first.address.to_string(), "--invite", &token]));
    let port = first.port();
    let (status, _) = first.terminate();
    assert!(status.success());

    // Same host and port, different key.
    let second = Hushd::start_with(&tmp.path().join("second"), &format!("127.0.0.1:{port}"), &[]);
    assert_eq!(second.port(), port);
    let out = hush(&home, &["status"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not match the one you pinned"), "{}", stderr(&out));
}

#[tokio::test]
async fn a_client_without_a_certificate_gets_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    // TLS 1.3 lets the client finish its side of the handshake before the
    // server has checked it, so the refusal may show on connect or on the
    // first request; either way nothing is served.
    let outcome = match Connection::connect_with(&server.address, None).await {
        Err(e) => Err(e),
        Ok(conn) => conn.request(&Request::Ping { nonce: 1 }).await.map(|_| ()),
    };
    let err = outcome.expect_err("a connection without a client certificate was served");
    assert!(matches!(err, ClientError::Refused(_) | ClientError::Connection(_)), "{err:?}");
}

#[tokio::test]
async fn a_client_with_a_non_ed25519_certificate_gets_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["x".into()]).unwrap().self_signed(&key).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signer = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
    let credentials = std::sync::Arc::new(rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signer));
    let outcome = match Connection::connect_with(&server.address, Some(credentials)).await {
        Err(e) => Err(e),
        Ok(conn) => conn.request(&Request::Ping { nonce: 1 }).await.map(|_| ()),
    };
    let err = outcome.expect_err("a connection with an ECDSA certificate was served");
    assert!(matches!(err, ClientError::Refused(_) | ClientError::Connection(_)), "{err:?}");
}

#[tokio::test]
async fn an_unregistered_key_may_only_register_and_is_closed_after_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_AUTH_DEADLINE_SECS", "1")]);
    let id = hush::auth::Identity::generate().unwrap();
    let conn = Connection::connect(&server.address, &id).await.unwrap();
    for request in [Request::Status, Request::Ping { nonce: 7 }] {
        let err = conn.call(&request).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NotRegistered), "{request:?}: {err}");
    }
    let closed = tokio::time::timeout(WAIT, conn.closed()).await.expect("not closed after the deadline");
    match closed {
        ClientError::Closed { code, .. } => assert_eq!(code, u64::from(close::REGISTRATION_DEADLINE)),
        other => panic!("unexpected close: {other:?}"),
    }
}

#[tokio::test]
async fn registering_in_time_lifts_the_deadline() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_AUTH_DEADLINE_SECS", "1")]);
    let (_id, conn) = registered_client(&server).await;
    // Outlive the deadline; the registered connection must stay usable.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(matches!(conn.call(&Request::Ping { nonce: 9 }).await.unwrap(), hush::wire::Response::Pong { nonce: 9 }));
    conn.status().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_per_address_are_capped_but_accounts_still_get_in() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_MAX_UNREGISTERED_PER_IP", "2")]);
    let (member, member_conn) = registered_client(&server).await;
    let mut strangers = vec![];
    for _ in 0..2 {
        let id = hush::auth::Identity::generate().unwrap();
        let conn = Connection::connect(&server.address, &id).await.unwrap();
        assert_eq!(conn.call(&Request::Status).await.unwrap_err().code(), Some(ErrorCode::NotRegistered));
        strangers.push(conn);
    }
    let id = hush::auth::Identity::generate().unwrap();
    let third = Connection::connect(&server.address, &id).await.unwrap();
    match tokio::time::timeout(WAIT, third.closed()).await.unwrap() {
        ClientError::Closed { code, .. } => assert_eq!(code, u64::from(close::BUSY)),
        other => panic!("unexpected: {other:?}"),
    }
    // Registered accounts are not strangers: a new connection of the
    // member's key gets in while the stranger slots are full.
    member_conn.status().await.unwrap();
    let again = Connection::connect(&server.address, &member).await.unwrap();
    again.status().await.unwrap();
    // A stranger leaving frees its slot.
    strangers.pop().unwrap().close().await;
    let mut admitted = false;
    for _ in 0..50 {
        let id = hush::auth::Identity::generate().unwrap();
        let c = Connection::connect(&server.address, &id).await.unwrap();
        if c.call(&Request::Status).await.is_err_and(|e| e.code() == Some(ErrorCode::NotRegistered)) {
            admitted = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(admitted, "the freed stranger slot was never reused");
}
