//! Faults: the server is killed with SIGKILL while clients write; nothing
//! it acknowledged may be lost or duplicated.

use std::time::Duration;

use hush::client::mls::{Member, Received};
use hush::client::Connection;

use crate::support::*;

/// How many SIGKILLs the test survives (CI keeps this; HUSH_LONG_TESTS=1
/// runs more).
fn kills() -> usize {
    if std::env::var_os("HUSH_LONG_TESTS").is_some() {
        25
    } else {
        5
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_loses_nothing_acknowledged() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let mut server = Hushd::start(&dir);
    let port = server.port();
    let listen = format!("127.0.0.1:{port}");

    // alice writes, bob checks.
    let (alice_id, mut alice) = registered_client(&server).await;
    let (bob_id, mut bob) = registered_client(&server).await;
    let mut alice_mls = Member::new(alice_id.account_id()).unwrap();
    let mut bob_mls = Member::new(bob_id.account_id()).unwrap();
    bob.publish_key_packages(bob_mls.key_packages(2).unwrap(), Some(1)).await.unwrap();
    let g = alice_mls.create_group().unwrap();
    alice.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let kp = alice.claim_key_package(&bob_id.account_id()).await.unwrap();
    let (commit, welcome) = alice_mls.add(&g.id, &[kp]).unwrap();
    let (first_seq, _) = alice.send(commit, Some(welcome)).await.unwrap();
    alice_mls.merge_pending(&g.id).unwrap();
    let welcomes = bob.fetch_welcomes().await.unwrap();
    bob_mls.join(&welcomes[0].1).unwrap();

    let mut acked: Vec<(u64, String)> = vec![];
    let mut counter = 0u64;
    for round in 0..kills() {
        // Write as fast as possible; SIGKILL the server at a random moment,
        // with requests in flight.
        let delay = Duration::from_millis(150 + (u64::from(rand_byte()) * 3));
        let victim = server;
        let killer = tokio::task::spawn_blocking(move || {
            std::thread::sleep(delay);
            victim.kill9();
        });
        tokio::pin!(killer);
        loop {
            counter += 1;
            let text = format!("message {counter}");
            let m = alice_mls.encrypt(&g.id, text.as_bytes()).unwrap();
            tokio::select! {
                r = alice.send(m, None) => match r {
                    Ok((seq, _)) => acked.push((seq, text)),
                    Err(_) => {
                        (&mut killer).await.unwrap();
                        break;
                    }
                },
                k = &mut killer => {
                    k.unwrap();
                    break;
                }
            }
        }
        server = Hushd::start_with(&dir, &listen, &[]);
        alice = Connection::connect(&server.address, &alice_id).await.unwrap();
        bob = Connection::connect(&server.address, &bob_id).await.unwrap();
        let integrity = ok(run(hushd_command(&dir).arg("check")));
        assert!(integrity.contains("integrity ok"), "round {round}: {integrity}");
    }

    // Everything acknowledged is there, once, in order, and decrypts.
    let mut stored: Vec<(u64, String)> = vec![];
    let mut after = first_seq;
    loop {
        let (messages, more) = bob.fetch(&g.id, after, 0).await.unwrap();
        for (seq, m) in messages {
            assert!(seq > after, "sequence numbers must increase");
            after = seq;
            match bob_mls.receive(&g.id, &m).unwrap() {
                Received::Application { data, .. } => stored.push((seq, String::from_utf8(data).unwrap())),
                other => panic!("unexpected {other:?}"),
            }
        }
        if !more {
            break;
        }
    }
    assert!(acked.len() >= kills(), "too few writes to mean anything: {}", acked.len());
    for (seq, text) in &acked {
        let found: Vec<_> = stored.iter().filter(|(s, t)| s == seq && t == text).collect();
        assert_eq!(found.len(), 1, "acknowledged message {seq} ({text}) stored {} times", found.len());
    }
    let texts: Vec<&String> = stored.iter().map(|(_, t)| t).collect();
    let mut unique = texts.clone();
    unique.dedup();
    assert_eq!(unique.len(), texts.len(), "a message was stored twice");
    eprintln!("kill -9 x{}: {} acknowledged, {} stored, 0 lost", kills(), acked.len(), stored.len());
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).unwrap();
    b[0]
}
