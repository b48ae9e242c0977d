//! Hostile frames get error codes; the server keeps serving everyone.

use hush::client::Connection;
use hush::limits::MAX_REQUEST_FRAME;
use hush::wire::{ErrorCode, Request, Response};

use crate::support::*;

async fn error_code(conn: &Connection, frame: &[u8]) -> ErrorCode {
    let bytes = conn.raw(frame).await.unwrap();
    match Response::decode(&bytes).unwrap() {
        Response::Error { code, .. } => code,
        other => panic!("frame {:?} got {other:?}", &frame[..frame.len().min(8)]),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_oversized_and_trailing_frames_get_error_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (_id, conn) = registered_client(&server).await;
    let (_id2, bystander) = registered_client(&server).await;

    let ping = Request::Ping { nonce: 5 }.encode().unwrap();
    let mut trailing = ping.clone();
    trailing.push(0);
    let mut fetch_trailing = Request::Fetch { group: vec![1], after: 0, limit: 0 }.encode().unwrap();
    fetch_trailing.push(0);
    let cases: Vec<(&str, Vec<u8>, ErrorCode)> = vec![
        ("empty", vec![], ErrorCode::Malformed),
        ("truncated", ping[..ping.len() - 1].to_vec(), ErrorCode::Malformed),
        // Longer than any Ping can be: refused before it is read.
        ("trailing garbage beyond the tag's size", trailing, ErrorCode::TooLarge),
        ("trailing garbage", fetch_trailing, ErrorCode::Malformed),
        ("bad bool", vec![0x01, 0x07], ErrorCode::Malformed),
        ("overlong invite", [vec![0x01, 0x01, 0xff], vec![b'a'; 255]].concat(), ErrorCode::Malformed),
        ("unknown tag", vec![0x7f], ErrorCode::UnknownRequest),
        ("oversized", vec![0x03; MAX_REQUEST_FRAME + 1], ErrorCode::TooLarge),
    ];
    for (name, frame, expected) in &cases {
        assert_eq!(error_code(&conn, frame).await, *expected, "{name}");
    }
    // Still serving, on the same connection and for others.
    assert_eq!(conn.call(&Request::Ping { nonce: 6 }).await.unwrap(), Response::Pong { nonce: 6 });
    bystander.status().await.unwrap();
}

#[tokio::test]
async fn a_half_sent_request_times_out_without_blocking_others() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_REQUEST_TIMEOUT_SECS", "1")]);
    let (_id, conn) = registered_client(&server).await;
    // Open a stream, send part of a frame and never finish it.
    let (mut send, mut recv) = conn.quic().open_bi().await.unwrap();
    send.write_all(&[0x03, 0, 0]).await.unwrap();
    // Meanwhile other requests are served.
    conn.status().await.unwrap();
    let bytes = tokio::time::timeout(WAIT, recv.read_to_end(4096)).await.unwrap().unwrap();
    match Response::decode(&bytes).unwrap() {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::Timeout),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_client_may_not_open_unidirectional_streams() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (_id, conn) = registered_client(&server).await;
    // The server grants no unidirectional stream credit: opening one waits
    // forever rather than reaching the server.
    let opened = tokio::time::timeout(std::time::Duration::from_millis(500), conn.quic().open_uni()).await;
    assert!(opened.is_err(), "the server granted a unidirectional stream");
    conn.status().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_rate_limit_get_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let server =
        Hushd::start_with(&tmp.path().join("s"), "127.0.0.1:0", &[("HUSHD_REQUESTS_PER_SECOND_PER_ACCOUNT", "2")]);
    let (_id, conn) = registered_client(&server).await;
    let (_other, bystander) = registered_client(&server).await;
    let mut limited = None;
    // `request` shows the server's answer as it is (`call` would wait and
    // retry).
    for i in 0..20 {
        if let Response::Error { code, detail, .. } = conn.request(&Request::Ping { nonce: i }).await.unwrap() {
            assert_eq!(code, ErrorCode::RateLimited);
            limited = Some(detail);
            break;
        }
    }
    let retry_ms = limited.expect("20 requests at once were never rate limited at 2/s");
    assert!(retry_ms > 0 && retry_ms <= 1000, "retry after {retry_ms} ms");
    // Other accounts are not affected, and the limited one recovers.
    bystander.status().await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(retry_ms + 50)).await;
    conn.call(&Request::Ping { nonce: 99 }).await.unwrap();
}
