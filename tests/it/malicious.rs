//! A malicious server against the real `hush` client (issue 12).
//!
//! The "server" here is the real hushd behind a proxy that holds the
//! server's own key (as its operator, or anyone with its disk, does), so
//! every client's pin matches. It answers each request as it likes: it
//! forwards to hushd and may substitute the response. (To forward, it
//! connects to hushd with the client's device key read from the client's
//! home: a test shortcut; a real malicious server needs no such thing, it
//! simply answers.) The clients must hold their ground with what MLS and
//! the device certificates give them, never trusting the server.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hush::auth::online::{CurrentKey, ServerKey};
use hush::auth::tls::{device_of_peer, server_crypto};
use hush::auth::{HushAddress, Identity};
use hush::chain::Head;
use hush::client::mls::adversary::credential_of_key_package;
use hush::client::mls::Member;
use hush::client::Connection;
use hush::wire::{Logged, Request, Response, MAX_REQUEST_FRAME};
use rustls::pki_types::CertificateDer;

use crate::support::*;

/// What the proxy does to a response: `None` forwards it unchanged.
type Rewrite = Arc<dyn Fn(&Request, &Response) -> Option<Response> + Send + Sync>;

/// [`Rewrite`], told which home's connection (its index) it answers.
type RewriteFor = Arc<dyn Fn(usize, &Request, &Response) -> Option<Response> + Send + Sync>;

/// The malicious server.
struct Evil {
    address: HushAddress,
    endpoint: quinn::Endpoint,
}

impl Evil {
    async fn start(server: &Hushd, homes: Vec<PathBuf>, rewrite: Rewrite) -> Self {
        Self::start_for(server, homes, Arc::new(move |_, req, resp| rewrite(req, resp))).await
    }

    async fn start_for(server: &Hushd, homes: Vec<PathBuf>, rewrite: RewriteFor) -> Self {
        let key = Identity::load(&server.data_dir.join("server.key")).unwrap();
        let fingerprint = key.fingerprint();
        let crypto = server_crypto(CurrentKey::new(ServerKey::identity(key).unwrap())).unwrap();
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
        let port = endpoint.local_addr().unwrap().port();
        let address = HushAddress { host: "127.0.0.1".into(), port, fingerprint };
        let upstream = server.address.clone();
        let ep = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = ep.accept().await {
                let (homes, rewrite, upstream) = (homes.clone(), rewrite.clone(), upstream.clone());
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    let device = conn
                        .peer_identity()
                        .and_then(|p| p.downcast::<Vec<CertificateDer<'static>>>().ok())
                        .and_then(|c| device_of_peer(&c));
                    // Whose home holds this device key?
                    let Some((home, key)) = homes.iter().enumerate().find_map(|(i, h)| {
                        let k = Identity::load(&h.join("device.key")).ok()?;
                        (Some(k.public_key()) == device.map(|d| d.0)).then_some((i, k))
                    }) else {
                        return;
                    };
                    let Ok(up) = Connection::connect(&upstream, &key).await else { return };
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let Ok(frame) = recv.read_to_end(MAX_REQUEST_FRAME).await else { return };
                        let Ok(answer) = up.raw(&frame).await else { return };
                        let answer = match (Request::decode(&frame), Response::decode(&answer)) {
                            (Ok(req), Ok(resp)) => match rewrite(home, &req, &resp) {
                                Some(forged) => forged.encode().unwrap(),
                                None => answer,
                            },
                            _ => answer,
                        };
                        let _ = send.write_all(&answer).await;
                        let _ = send.finish();
                        let _ = send.stopped().await;
                    }
                });
            }
        });
        Self { address, endpoint }
    }
}

impl Drop for Evil {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"");
    }
}

/// What the malicious server does now.
#[derive(Clone)]
enum Mode {
    Honest,
    /// Answers every KeyPackage claim with this package.
    ClaimWith(Vec<u8>),
    /// Answers every Welcome fetch with this Welcome.
    WelcomeWith(Vec<u8>),
    /// Answers every fetch with an empty page that says more remain.
    EndlessPages,
    /// Answers every fetch with its first message renumbered to u64::MAX.
    HugeSequence,
    /// Says every group is 5 epochs ahead (so the client rejoins) and
    /// answers the GroupInfo fetch with this GroupInfo and tree.
    RejoinWith(Vec<u8>, Vec<u8>),
    /// [`Mode::EndlessPages`] for this group only.
    EndlessPagesIn(Vec<u8>),
    /// Answers every fetch of this group with an error.
    FailFetchIn(Vec<u8>),
}

fn rewrite(mode: Arc<Mutex<Mode>>) -> Rewrite {
    Arc::new(move |req, _resp| match (req, mode.lock().unwrap().clone()) {
        (Request::ClaimKeyPackage { .. } | Request::ClaimKeyPackages { .. }, Mode::ClaimWith(p)) => {
            Some(Response::KeyPackages { packages: vec![p] })
        }
        (Request::FetchWelcomes, Mode::WelcomeWith(w)) => Some(Response::Welcomes { welcomes: vec![(1_000_000, w)] }),
        (Request::AckWelcome { id: 1_000_000 }, Mode::WelcomeWith(_)) => Some(Response::Done),
        (Request::Fetch { group, .. }, Mode::EndlessPages) => {
            Some(Response::Messages { group: group.clone(), messages: vec![], more: true })
        }
        (Request::Fetch { group, .. }, Mode::EndlessPagesIn(g)) if *group == g => {
            Some(Response::Messages { group: group.clone(), messages: vec![], more: true })
        }
        (Request::Fetch { group, .. }, Mode::FailFetchIn(g)) if *group == g => {
            Some(Response::error(hush::wire::ErrorCode::Internal, "not today"))
        }
        (Request::ListGroups, Mode::RejoinWith(..)) => match _resp {
            Response::Groups { groups } => Some(Response::Groups {
                groups: groups
                    .iter()
                    .cloned()
                    .map(|mut g| {
                        g.epoch += 5;
                        g
                    })
                    .collect(),
            }),
            _ => None,
        },
        (Request::FetchGroupInfo { group }, Mode::RejoinWith(info, tree)) => {
            Some(Response::GroupInfo { group: group.clone(), group_info: info, ratchet_tree: Some(tree) })
        }
        (Request::Fetch { group, .. }, Mode::HugeSequence) => match _resp {
            Response::Messages { messages, .. } if !messages.is_empty() => Some(Response::Messages {
                group: group.clone(),
                messages: vec![Logged::new(u64::MAX, None, messages[0].data.clone())],
                more: false,
            }),
            _ => None,
        },
        _ => None,
    })
}

/// Registers a `hush` home through `address` and returns its account id.
fn register(server: &Hushd, home: &std::path::Path, address: &HushAddress) -> String {
    let token = server.invite(&[]);
    ok(hush(home, &["register", &address.to_string(), "--invite", &token]));
    ok(hush(home, &["whoami"])).lines().next().unwrap().to_string()
}

/// A real hushd behind the malicious proxy, with `hush` homes registered
/// through the proxy (their pins are the server's: it holds the key).
struct Scene {
    _tmp: tempfile::TempDir,
    server: Hushd,
    homes: Vec<PathBuf>,
    ids: Vec<String>,
    mode: Arc<Mutex<Mode>>,
    _evil: Evil,
}

impl Scene {
    async fn start(names: &[&str]) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let server = Hushd::start(&tmp.path().join("s"));
        let homes: Vec<PathBuf> = names.iter().map(|n| tmp.path().join(n)).collect();
        let mode = Arc::new(Mutex::new(Mode::Honest));
        let evil = Evil::start(&server, homes.clone(), rewrite(mode.clone())).await;
        // Blocking CLI runs off the runtime's workers, which the proxy needs.
        let ids: Vec<String> =
            tokio::task::block_in_place(|| homes.iter().map(|h| register(&server, h, &evil.address)).collect());
        // Everyone knows the first home (the one that invites): its
        // invitations are joined at once.
        tokio::task::block_in_place(|| {
            for h in homes.iter().skip(1) {
                ok(hush(h, &["contact", "add", names[0], &ids[0]]));
            }
        });
        Self { _tmp: tmp, server, homes, ids, mode, _evil: evil }
    }

    /// The first home creates group "team" with the second in it (who has
    /// joined).
    fn team(&self) {
        let (alice, bob) = (&self.homes[0], &self.homes[1]);
        tokio::task::block_in_place(|| {
            ok(hush(alice, &["contact", "add", "bob", &self.ids[1]]));
            ok(hush(alice, &["group", "create", "team"]));
            ok(hush(alice, &["group", "add", "team", "bob"]));
            ok(hush(bob, &["sync"]));
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_substitutes_key_packages_cannot_join_a_group() {
    let s = Scene::start(&["alice", "bob", "carol"]).await;
    let (server, mode, ids) = (&s.server, &s.mode, &s.ids);
    let (alice, bob, carol) = (&s.homes[0], &s.homes[1], &s.homes[2]);
    let (bob_id, carol_id) = (&ids[1], &ids[2]);
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["contact", "add", "bob", bob_id]));
        ok(hush(alice, &["contact", "add", "carol", carol_id]));
        ok(hush(alice, &["group", "create", "team"]));
    });

    // The packages a server could hand out instead of bob's: bob's genuine
    // certificate over the operator's own key; a certificate naming bob's
    // account that bob never signed; carol's genuine package.
    let carol_device = Identity::load(&carol.join("device.key")).unwrap();
    let carol_conn = Connection::connect(&server.address, &carol_device).await.unwrap();
    // The group is post-quantum (the default): the packages are too.
    let pq = hush::mls::Suite::Pq;
    let bobs_real = carol_conn.claim_key_packages_of(&bob_id.parse().unwrap(), pq).await.unwrap().remove(0);
    let bobs_classic = carol_conn.claim_key_packages(&bob_id.parse().unwrap()).await.unwrap().remove(0);
    let carols_real = {
        let alice_device = Identity::load(&alice.join("device.key")).unwrap();
        let c = Connection::connect(&server.address, &alice_device).await.unwrap();
        c.claim_key_packages_of(&carol_id.parse().unwrap(), pq).await.unwrap().remove(0)
    };
    let bob_cert = credential_of_key_package(&bobs_real).unwrap();
    let mut unsigned = bob_cert.clone();
    unsigned[70] ^= 1;
    let forged = [
        (
            "bob's certificate, the operator's key",
            Member::forger(bob_cert).unwrap().key_packages_of(pq, 1).unwrap().remove(0),
        ),
        ("a certificate bob never signed", Member::forger(unsigned).unwrap().key_packages_of(pq, 1).unwrap().remove(0)),
        ("carol's genuine package", carols_real),
    ];
    for (what, package) in forged {
        *mode.lock().unwrap() = Mode::ClaimWith(package);
        let out = tokio::task::block_in_place(|| hush(alice, &["group", "add", "team", "bob"]));
        assert!(!out.status.success(), "{what}: the add succeeded");
        let err = stderr(&out);
        assert!(err.contains("refused to add bob") && err.contains("compromised"), "{what}: {err}");
        let members = tokio::task::block_in_place(|| ok(hush(alice, &["group", "members", "team"])));
        assert_eq!(members.trim(), "you", "{what}: the group changed");
    }
    // The user sees the refusal in the group's history.
    let history = tokio::task::block_in_place(|| ok(hush(alice, &["read", "team"])));
    assert!(history.contains("refused to add bob"), "{history}");
    // bob's genuine classic package for the post-quantum group: refused
    // (issue 35), never a quiet downgrade of bob's leaf.
    *mode.lock().unwrap() = Mode::ClaimWith(bobs_classic);
    let out = tokio::task::block_in_place(|| hush(alice, &["group", "add", "team", "bob"]));
    assert!(!out.status.success(), "a classic package went into a post-quantum group");
    assert!(stderr(&out).contains("another ciphersuite"), "{}", stderr(&out));
    let members = tokio::task::block_in_place(|| ok(hush(alice, &["group", "members", "team"])));
    assert_eq!(members.trim(), "you");

    // With an honest answer the same command works: nothing was broken.
    *mode.lock().unwrap() = Mode::Honest;
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["group", "add", "team", "bob"]));
        ok(hush(bob, &["sync"]));
        ok(hush(alice, &["send", "team", "hello bob"]));
        let got = ok(hush(bob, &["sync"]));
        assert!(got.contains("hello bob"), "{got}");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_welcome_whose_tree_holds_a_forged_leaf_is_refused() {
    let s = Scene::start(&["alice", "bob"]).await;
    let (server, mode, ids) = (&s.server, &s.mode, &s.ids);
    let (alice, bob) = (&s.homes[0], &s.homes[1]);

    // The operator makes its own group whose only other leaf claims alice
    // (her genuine certificate, copied from one of her KeyPackages, over
    // the operator's key) and invites bob with one of his real packages.
    let alice_device = Identity::load(&alice.join("device.key")).unwrap();
    let as_alice = Connection::connect(&server.address, &alice_device).await.unwrap();
    let alices_real = as_alice.claim_key_packages(&ids[0].parse().unwrap()).await.unwrap().remove(0);
    let bobs_real = as_alice.claim_key_packages(&ids[1].parse().unwrap()).await.unwrap().remove(0);
    let removal_key = as_alice.status().await.unwrap().removal_key;
    let mut forger = Member::forger(credential_of_key_package(&alices_real).unwrap()).unwrap();
    let g = forger.create_group(&removal_key).unwrap();
    let welcome = forger.add_unchecked(&g.id, &[bobs_real]).unwrap().welcome.unwrap();

    *mode.lock().unwrap() = Mode::WelcomeWith(welcome);
    let out = tokio::task::block_in_place(|| ok(hush(bob, &["sync"])));
    assert!(out.contains("did not join") && out.contains("not certified"), "{out}");
    let groups = tokio::task::block_in_place(|| ok(hush(bob, &["group", "list"])));
    assert!(groups.trim().is_empty(), "bob joined the forged group: {groups}");
}

// ---- a malicious member (raw openmls) against the real hushd ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_cannot_become_another_member_or_upload_for_another_device() {
    use hush::client::mls::Received;
    use hush::wire::ErrorCode;
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let (_, alice, mut alice_mls) = registered_member(&server).await;
    let (_, bob, mut bob_mls) = registered_member(&server).await;
    let (_, mallory, mut mallory_mls) = registered_member(&server).await;
    for (c, m) in [(&bob, &bob_mls), (&mallory, &mallory_mls)] {
        c.publish_key_packages(m.key_packages(2).unwrap(), Some(1)).await.unwrap();
    }
    let removal_key = alice.status().await.unwrap().removal_key;
    let g = alice_mls.create_group(&removal_key).unwrap();
    alice.create_group(g.group_info, g.ratchet_tree).await.unwrap();
    let mut kps = claim(&alice, bob_mls.account()).await;
    kps.extend(claim(&alice, mallory_mls.account()).await);
    let commit = alice_mls.add(&g.id, &kps).unwrap();
    alice.commit(commit).await.unwrap();
    alice_mls.merge_pending(&g.id).unwrap();
    for (c, m) in [(&bob, &mut bob_mls), (&mallory, &mut mallory_mls)] {
        let w = c.fetch_welcomes().await.unwrap();
        m.join(&w[0].1).unwrap();
    }
    let bob_cert = bob_mls.certificate().encode();

    // Mallory commits an update whose leaf carries bob's certificate.
    let forged = mallory_mls.impersonating_update(&g.id, bob_cert.clone()).unwrap();
    let e = mallory.send(forged.clone(), None).await.expect_err("the server accepted an impersonating update");
    assert_eq!(e.code(), Some(ErrorCode::InvalidCredential), "{e}");
    assert!(e.to_string().contains("leaf"), "the refusal names the leaf: {e}");
    mallory_mls.discard_pending(&g.id).unwrap();
    // The same commit handed to a client directly (as a server that let it
    // through would): refused, and alice's view is unchanged.
    let before = alice_mls.epoch_authenticator(&g.id);
    assert!(matches!(alice_mls.receive(&g.id, &forged).unwrap(), Received::Refused { .. }));
    assert_eq!(alice_mls.epoch_authenticator(&g.id), before);
    assert_eq!(alice_mls.members(&g.id).len(), 3);

    // Mallory uploads KeyPackages carrying bob's certificate.
    let packages = Member::forger(bob_cert).unwrap().key_packages(2).unwrap();
    let e = mallory.publish_key_packages(packages, None).await.expect_err("a KeyPackage for bob was accepted");
    assert_eq!(e.code(), Some(ErrorCode::InvalidCredential), "{e}");
    // ... or bob's own genuine ones.
    let e = mallory.publish_key_packages(bob_mls.key_packages(1).unwrap(), None).await.expect_err("accepted");
    assert_eq!(e.code(), Some(ErrorCode::InvalidCredential), "{e}");

    // Bob still speaks as bob, and the group still works.
    let text = bob_mls.encrypt(&g.id, b"it is really me").unwrap();
    bob.send(text.clone(), None).await.unwrap();
    match alice_mls.receive(&g.id, &text).unwrap() {
        Received::Application { sender, data, .. } => {
            assert_eq!(sender, Some(bob_mls.account()));
            assert_eq!(data, b"it is really me");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_needs_a_certificate_for_the_connections_own_key() {
    use hush::wire::ErrorCode;
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let token = server.invite(&[]);
    let (_, device, member) = Member::generate().unwrap();
    // Another key presents this device's certificate.
    let thief = Identity::generate().unwrap();
    let conn = Connection::connect(&server.address, &thief).await.unwrap();
    let e = conn.register(Some(&token), member.certificate()).await.expect_err("registered with another's certificate");
    assert_eq!(e.code(), Some(ErrorCode::InvalidCredential), "{e}");
    // A certificate whose signature does not verify.
    let mut bytes = member.certificate().encode();
    bytes[100] ^= 1;
    let conn = Connection::connect(&server.address, &device).await.unwrap();
    let raw = Request::Register { invite: Some(token.clone()), certificate: bytes }.encode().unwrap();
    match Response::decode(&conn.raw(&raw).await.unwrap()).unwrap() {
        Response::Error { code, .. } => assert_eq!(code, ErrorCode::InvalidCredential),
        other => panic!("{other:?}"),
    }
    // The invite was not spent: the genuine registration works.
    assert!(conn.register(Some(&token), member.certificate()).await.unwrap());
}

// ---- a hostile server against the client's loops (issue 14) ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_ends_a_page_or_jumps_to_the_last_sequence_cannot_hang_or_pin_the_client() {
    let s = Scene::start(&["alice", "bob"]).await;
    let mode = &s.mode;
    let (alice, bob) = (&s.homes[0], &s.homes[1]);
    s.team();
    tokio::task::block_in_place(|| ok(hush(alice, &["send", "team", "first"])));
    // `run` kills the command if it takes longer than WAIT: a hang fails.
    *mode.lock().unwrap() = Mode::EndlessPages;
    let out = tokio::task::block_in_place(|| hush(bob, &["sync"]));
    assert!(!out.status.success(), "sync succeeded against a lying server");
    let err = stderr(&out);
    assert!(err.contains("misbehaved") && err.contains("said more messages remain but sent none"), "{err}");
    // A sequence past the end of the log the server listed is not read
    // (it comes with the next sync, if it is ever in the list): the cursor
    // is not pinned at the top.
    *mode.lock().unwrap() = Mode::HugeSequence;
    let out = tokio::task::block_in_place(|| ok(hush(bob, &["sync"])));
    assert!(!out.contains("first"), "{out}");
    // Against an honest answer again, nothing is stuck.
    *mode.lock().unwrap() = Mode::Honest;
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["send", "team", "second"]));
        let got = ok(hush(bob, &["sync"]));
        assert!(got.contains("first") && got.contains("second"), "{got}");
        ok(hush(bob, &["send", "team", "back to you"]));
        assert!(ok(hush(alice, &["sync"])).contains("back to you"));
    });
}

/// The id of the group a home calls `name`.
fn group_id(server: &Hushd, home: &std::path::Path, name: &str) -> Vec<u8> {
    let key = Identity::load(&home.join("device.key")).unwrap();
    let app = hush::client::app::App::open(home, key, server.address.clone()).unwrap();
    app.resolve_group(name).unwrap().id
}

// ---- issue 29: one group's failure, and repair that goes back ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_that_cannot_be_synced_stops_neither_the_others_nor_a_send() {
    let s = Scene::start(&["alice", "bob"]).await;
    let (mode, server) = (&s.mode, &s.server);
    let (alice, bob) = (&s.homes[0], &s.homes[1]);
    s.team();
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["group", "create", "other"]));
        ok(hush(alice, &["group", "add", "other", "bob"]));
        ok(hush(bob, &["sync"]));
        ok(hush(alice, &["send", "other", "news in the other group"]));
        ok(hush(alice, &["send", "team", "news in team"]));
    });
    // "team" comes first in bob's list, and its log never ends.
    *mode.lock().unwrap() = Mode::EndlessPagesIn(group_id(server, bob, "team"));
    let out = tokio::task::block_in_place(|| hush(bob, &["sync"]));
    assert!(stdout(&out).contains("news in the other group"), "{}", stdout(&out));
    assert!(stdout(&out).contains("this group could not be synced"), "{}", stdout(&out));
    assert!(!out.status.success(), "a group that failed must show in the exit code");
    assert!(stderr(&out).contains("could not sync team"), "{}", stderr(&out));
    tokio::task::block_in_place(|| {
        ok(hush(bob, &["send", "other", "sent while team is broken"]));
        assert!(ok(hush(alice, &["sync"])).contains("sent while team is broken"));
    });
}

/// alice and bob (through the proxy) and mallory (raw openmls, straight
/// to hushd) in "team"; returns mallory, her member and the group id.
async fn team_with_mallory(s: &Scene) -> (Connection, Member, Vec<u8>) {
    let (server, alice, bob) = (&s.server, &s.homes[0], &s.homes[1]);
    let (_, mallory, mut mallory_mls) = crate::repair::raw_member(server).await;
    let mallory_id = mallory_mls.account().to_string();
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["contact", "add", "bob", &s.ids[1]]));
        ok(hush(alice, &["contact", "add", "mallory", &mallory_id]));
        ok(hush(alice, &["group", "create", "team"]));
        ok(hush(alice, &["group", "add", "team", "bob", "mallory"]));
        ok(hush(bob, &["sync"]));
    });
    let welcomes = mallory.fetch_welcomes().await.unwrap();
    let group = mallory_mls.join(&welcomes[0].1).unwrap();
    mallory.ack_welcome(welcomes[0].0).await.unwrap();
    (mallory, mallory_mls, group)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_roll_a_member_back_to_before_a_removal() {
    let s = Scene::start(&["alice", "bob"]).await;
    let (mode, server) = (&s.mode, &s.server);
    let (alice, bob) = (&s.homes[0], &s.homes[1]);
    let (mallory, mut mallory_mls, group) = team_with_mallory(&s).await;
    // The GroupInfo of the epoch before mallory's removal, as the server
    // kept it.
    let (stale_info, stale_tree) = mallory.group_info(&group).await.unwrap();
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["group", "remove", "team", "mallory"]));
        let out = ok(hush(bob, &["sync"]));
        assert!(out.contains(" was removed by "), "{out}");
    });
    let bob_before = crate::repair::authenticator(server, bob, "team");

    // The server says bob fell behind, and hands him the old state.
    *mode.lock().unwrap() = Mode::RejoinWith(stale_info, stale_tree.unwrap_or_default());
    let out = tokio::task::block_in_place(|| ok(hush(bob, &["sync"])));
    assert!(out.contains("not after the epoch this device already verified"), "{out}");
    assert!(!out.contains("rejoined"), "{out}");
    assert_eq!(crate::repair::authenticator(server, bob, "team"), bob_before, "bob's state changed");

    // mallory, who kept the state of before her removal, forks it two
    // epochs on with bob's leaf still in; the server serves her fork, of a
    // later epoch than bob's. No commit in the log leads there from bob's
    // state, so bob does not move.
    for _ in 0..2 {
        let _ = mallory_mls.self_update(&group).unwrap();
        mallory_mls.merge_pending(&group).unwrap();
    }
    let _ = mallory_mls.self_update(&group).unwrap();
    mallory_mls.merge_pending(&group).unwrap();
    // Her fork's GroupInfo with its tree in it (a self-update's own leaves
    // the tree out, for the server to hand out beside it).
    let fork = mallory_mls.handover(&group).unwrap().unwrap().info;
    *mode.lock().unwrap() = Mode::RejoinWith(fork, Vec::new());
    let out = tokio::task::block_in_place(|| ok(hush(bob, &["sync"])));
    assert!(out.contains("did not show the commits that lead there"), "{out}");
    assert!(!out.contains("rejoined"), "{out}");
    assert_eq!(crate::repair::authenticator(server, bob, "team"), bob_before, "bob's state changed");

    // Honest again: bob reads on in the real group, without mallory.
    *mode.lock().unwrap() = Mode::Honest;
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["send", "team", "after the removal"]));
        let got = ok(hush(bob, &["sync"]));
        assert!(got.contains("after the removal"), "{got}");
        assert!(!ok(hush(bob, &["group", "members", "team"])).contains("mallory"));
    });
    assert_eq!(crate::repair::authenticator(server, alice, "team"), crate::repair::authenticator(server, bob, "team"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_use_group_repair_to_slip_a_forged_tree_under_a_member() {
    let s = Scene::start(&["alice", "bob"]).await;
    let (server, mode, ids) = (&s.server, &s.mode, &s.ids);
    let (alice, bob) = (&s.homes[0], &s.homes[1]);
    s.team();
    let group = {
        let key = Identity::load(&bob.join("device.key")).unwrap();
        let app = hush::client::app::App::open(bob, key, server.address.clone()).unwrap();
        app.groups().unwrap().remove(0).id
    };
    // The operator's own tree for the group's id, its one leaf bob's
    // genuine certificate over the operator's key.
    let bob_device = Identity::load(&bob.join("device.key")).unwrap();
    let conn = Connection::connect(&server.address, &bob_device).await.unwrap();
    let removal_key = conn.status().await.unwrap().removal_key;
    let bobs_package = conn.claim_key_packages(&ids[1].parse().unwrap()).await.unwrap().remove(0);
    let mut forger = Member::forger(credential_of_key_package(&bobs_package).unwrap()).unwrap();
    // In the group's own suite (another one is refused before the tree is
    // looked at).
    let forged = forger.create_group_with_id_of(&removal_key, &group, hush::mls::DEFAULT_SUITE).unwrap();

    // The server says bob fell behind and hands him its tree to rejoin.
    *mode.lock().unwrap() = Mode::RejoinWith(forged.group_info, forged.ratchet_tree);
    let out = tokio::task::block_in_place(|| ok(hush(bob, &["sync"])));
    assert!(out.contains("could not rejoin") && out.contains("not certified"), "{out}");
    let members = tokio::task::block_in_place(|| ok(hush(bob, &["group", "members", "team"])));
    assert_eq!(members.lines().count(), 2, "bob's view of the group changed: {members}");

    // Honest again: bob kept his state and reads on.
    *mode.lock().unwrap() = Mode::Honest;
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["send", "team", "still the real group"]));
        let got = ok(hush(bob, &["sync"]));
        assert!(got.contains("still the real group"), "{got}");
    });
}

/// Red team: `hush device revoke` synced every group first and stopped at
/// the first that failed, before it even kept the revocation itself: an
/// operator that keeps the revoked device (stolen, say) breaks one group,
/// and the account-signed revocation reaches no member anywhere, not even
/// the first device's own later syncs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_the_server_breaks_does_not_keep_a_revocation_from_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let homes: Vec<PathBuf> = ["alice", "bob", "laptop"].iter().map(|n| tmp.path().join(n)).collect();
    let mode = Arc::new(Mutex::new(Mode::Honest));
    let evil = Evil::start(&server, homes.clone(), rewrite(mode.clone())).await;
    let (alice, bob, laptop) = (&homes[0], &homes[1], &homes[2]);
    tokio::task::block_in_place(|| {
        let alice_id = register(&server, alice, &evil.address);
        let bob_id = register(&server, bob, &evil.address);
        ok(hush(alice, &["contact", "add", "bob", &bob_id]));
        ok(hush(bob, &["contact", "add", "alice", &alice_id]));
        for g in ["team", "other"] {
            ok(hush(alice, &["group", "create", g]));
            ok(hush(alice, &["group", "add", g, "bob"]));
        }
        ok(hush(bob, &["sync"]));
        crate::devices::link(alice, laptop, "laptop");
        ok(hush(laptop, &["sync"]));
        ok(hush(bob, &["sync"]));
        ok(hush(alice, &["sync"]));
    });
    *mode.lock().unwrap() = Mode::FailFetchIn(group_id(&server, alice, "team"));
    tokio::task::block_in_place(|| {
        let out = hush(alice, &["device", "revoke", "laptop"]);
        assert!(!out.status.success() && stderr(&out).contains("team"), "{}", stderr(&out));
        let _ = hush(bob, &["sync"]);
        let other = ok(hush(bob, &["read", "other"]));
        assert!(
            other.contains("revoked one of its devices (signed with the account key)"),
            "the revocation never reached the group that works: {other}"
        );
    });
}

/// Red team, against the real `hush`: the operator's own device (certified
/// by an account the operator made; it needs no leaf and no registration)
/// builds an external commit into "team" from the GroupInfo the server
/// keeps. The proxy shows bob a commit he cannot read followed by it, says
/// the group moved on, and hands him the GroupInfo of the operator's fork.
/// bob's repair walks the log from his state: the walk must refuse the
/// outsider's commit (bob's own `receive` does), so bob does not rejoin
/// the fork, and what he sends next is not the operator's to read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_own_external_commit_does_not_walk_a_member_into_its_fork() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let homes: Vec<PathBuf> = ["alice", "bob"].iter().map(|n| tmp.path().join(n)).collect();
    type Fork = Option<(Vec<u8>, u64, Vec<(u64, Vec<u8>)>, Vec<u8>)>;
    let fork: Arc<Mutex<Fork>> = Arc::new(Mutex::new(None));
    let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let (f, s) = (fork.clone(), sent.clone());
    let rewrite: Rewrite = Arc::new(move |req, resp| {
        let (group, epoch, log, info) = f.lock().unwrap().clone()?;
        let last = log.last().map_or(0, |(seq, _)| *seq);
        match (req, resp) {
            (Request::ListGroups, Response::Groups { groups }) => Some(Response::Groups {
                groups: groups
                    .iter()
                    .cloned()
                    .map(|mut g| {
                        if g.group == group {
                            g.epoch = epoch;
                            g.last_seq = last;
                        }
                        g
                    })
                    .collect(),
            }),
            (Request::Fetch { group: g, after, .. }, _) if *g == group => Some(Response::Messages {
                group: group.clone(),
                messages: log
                    .iter()
                    .filter(|(seq, _)| seq > after)
                    .map(|(seq, data)| Logged::new(*seq, None, data.clone()))
                    .collect(),
                more: false,
            }),
            (Request::FetchGroupInfo { group: g }, _) if *g == group => {
                Some(Response::GroupInfo { group: group.clone(), group_info: info.clone(), ratchet_tree: None })
            }
            (Request::Send { message, .. }, _) => {
                s.lock().unwrap().push(message.clone());
                Some(Response::Accepted { group: group.clone(), seq: last + 1, epoch: epoch + 1, head: Head([0; 32]) })
            }
            (Request::Ack { .. }, _) => Some(Response::Done),
            _ => None,
        }
    });
    let evil = Evil::start(&server, homes.clone(), rewrite).await;
    let (alice, bob) = (&homes[0], &homes[1]);
    let group = tokio::task::block_in_place(|| {
        let alice_id = register(&server, alice, &evil.address);
        let bob_id = register(&server, bob, &evil.address);
        ok(hush(alice, &["contact", "add", "bob", &bob_id]));
        ok(hush(bob, &["contact", "add", "alice", &alice_id]));
        ok(hush(alice, &["group", "create", "team"]));
        ok(hush(alice, &["group", "add", "team", "bob"]));
        ok(hush(bob, &["sync"]));
        group_id(&server, bob, "team")
    });
    // The GroupInfo of bob's epoch, as the server keeps it (read here with
    // bob's key, a test shortcut).
    let bob_key = Identity::load(&bob.join("device.key")).unwrap();
    let direct = Connection::connect(&server.address, &bob_key).await.unwrap();
    let (info, tree) = direct.group_info(&group).await.unwrap();
    let summary = direct.groups().await.unwrap().into_iter().find(|g| g.group == group).unwrap();
    let (_, _, mut operator) = Member::generate().unwrap();
    let intrusion = operator.rejoin_unchecked(&group, &info, tree.as_deref()).unwrap();
    operator.merge_pending(&group).unwrap();
    // The fork's GroupInfo with its tree in it (a rejoin's own leaves the
    // tree out, for the server to hand out beside it).
    let fork_info = operator.handover(&group).unwrap().unwrap().info;
    let mut junk = intrusion.message.clone();
    *junk.last_mut().unwrap() ^= 1;
    let log = vec![(summary.last_seq + 1, junk), (summary.last_seq + 2, intrusion.message.clone())];
    *fork.lock().unwrap() = Some((group.clone(), summary.epoch + 1, log, fork_info));

    tokio::task::block_in_place(|| {
        let _ = hush(bob, &["sync"]);
        let _ = hush(bob, &["send", "team", "for the team only"]);
    });
    for message in sent.lock().unwrap().iter() {
        if let Ok(hush::client::mls::Received::Application { data, .. }) = operator.receive(&group, message) {
            panic!("the operator read bob: {:?}", String::from_utf8_lossy(&data));
        }
    }
    let history = tokio::task::block_in_place(|| ok(hush(bob, &["read", "team"])));
    assert!(!history.contains("this device rejoined the group"), "{history}");
}

/// Issue 29, the gap session 9 left: a linked device's first join checked
/// only that the state was not older than its first device's. mallory,
/// removed from "team", builds an external commit into the group from the
/// GroupInfo the server keeps (the operator hands it to her); the operator
/// shows alice's new laptop that commit in the log and her fork as the
/// group's state, of a later epoch than alice's. The laptop walks the log
/// from the state alice handed over, finds no commit a member would take
/// leading there, and joins nothing; once the server is honest, it joins
/// the real group, without mallory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_is_not_forked_into_a_removed_members_group() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let homes: Vec<PathBuf> = ["alice", "bob", "laptop"].iter().map(|n| tmp.path().join(n)).collect();
    type Fork = Option<(Vec<u8>, Vec<(u64, Vec<u8>)>, Vec<u8>, u64)>;
    let fork: Arc<Mutex<Fork>> = Arc::new(Mutex::new(None));
    let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let (f, s) = (fork.clone(), sent.clone());
    let rewrite: Rewrite = Arc::new(move |req, _| {
        let (group, log, info, epoch) = f.lock().unwrap().clone()?;
        let last = log.last().map_or(0, |(seq, _)| *seq);
        match req {
            Request::Fetch { group: g, after, .. } if *g == group => Some(Response::Messages {
                group: group.clone(),
                messages: log
                    .iter()
                    .filter(|(seq, _)| seq > after)
                    .map(|(seq, data)| Logged::new(*seq, None, data.clone()))
                    .collect(),
                more: false,
            }),
            Request::FetchGroupInfo { group: g } if *g == group => {
                Some(Response::GroupInfo { group: group.clone(), group_info: info.clone(), ratchet_tree: None })
            }
            Request::Send { message, .. } => {
                s.lock().unwrap().push(message.clone());
                Some(Response::Accepted { group: group.clone(), seq: last + 1, epoch: epoch + 1, head: Head([0; 32]) })
            }
            Request::Ack { .. } => Some(Response::Done),
            _ => None,
        }
    });
    let evil = Evil::start(&server, homes.clone(), rewrite).await;
    let (alice, bob, laptop) = (&homes[0], &homes[1], &homes[2]);
    let (_, mallory, mut mallory_mls) = crate::repair::raw_member(&server).await;
    let mallory_id = mallory_mls.account().to_string();
    let group = tokio::task::block_in_place(|| {
        let alice_id = register(&server, alice, &evil.address);
        let bob_id = register(&server, bob, &evil.address);
        ok(hush(alice, &["contact", "add", "bob", &bob_id]));
        ok(hush(bob, &["contact", "add", "alice", &alice_id]));
        ok(hush(alice, &["contact", "add", "mallory", &mallory_id]));
        ok(hush(alice, &["group", "create", "team"]));
        ok(hush(alice, &["group", "add", "team", "bob", "mallory"]));
        ok(hush(bob, &["sync"]));
        group_id(&server, alice, "team")
    });
    let welcomes = mallory.fetch_welcomes().await.unwrap();
    mallory_mls.join(&welcomes[0].1).unwrap();
    tokio::task::block_in_place(|| {
        ok(hush(alice, &["group", "remove", "team", "mallory"]));
        ok(hush(bob, &["sync"]));
        // alice links her laptop now: her state is the one without mallory.
        crate::devices::link(alice, laptop, "laptop");
    });
    // The operator hands removed mallory the GroupInfo it keeps (read here
    // with alice's key, a test shortcut), and she forces her way back in.
    let alice_key = Identity::load(&alice.join("device.key")).unwrap();
    let direct = Connection::connect(&server.address, &alice_key).await.unwrap();
    let (info, tree) = direct.group_info(&group).await.unwrap();
    let summary = direct.groups().await.unwrap().into_iter().find(|g| g.group == group).unwrap();
    let forced = mallory_mls.rejoin_unchecked(&group, &info, tree.as_deref()).unwrap();
    mallory_mls.merge_pending(&group).unwrap();
    // Her fork's GroupInfo with its tree in it (a rejoin's own leaves the
    // tree out, for the server to hand out beside it).
    let fork_info = mallory_mls.handover(&group).unwrap().unwrap().info;
    let log = vec![(summary.last_seq + 1, forced.message.clone())];
    *fork.lock().unwrap() = Some((group.clone(), log, fork_info, summary.epoch + 1));

    let out = tokio::task::block_in_place(|| hush(laptop, &["sync"]));
    let shown = stdout(&out);
    assert!(shown.contains("could not join the group"), "{shown}");
    assert!(shown.contains("did not show the commits that lead there"), "{shown}");
    assert!(!shown.contains("joined the group at epoch"), "{shown}");
    assert!(sent.lock().unwrap().is_empty(), "the laptop committed into mallory's fork");

    // Honest again: the laptop's next sync joins the real group, checked
    // from alice's state.
    *fork.lock().unwrap() = None;
    tokio::task::block_in_place(|| {
        let out = ok(hush(laptop, &["sync"]));
        assert!(out.contains("checked commit by commit from your first device's state"), "{out}");
        assert!(!ok(hush(laptop, &["group", "members", "team"])).contains("mallory"));
        ok(hush(bob, &["send", "team", "hello both of you"]));
        assert!(ok(hush(laptop, &["sync"])).contains("hello both of you"));
    });
}

/// Red team (session 30): the walk takes any "new device of a member"
/// external commit, and a linked device knows none of its account's
/// revocations (they are not in the hand-over, and the revocation payloads
/// were sent in epochs before it joined). alice's laptop is stolen and
/// revoked; she links a phone. The operator, with the thief, shows the phone
/// a log whose one commit is the revoked laptop joining as "a new device of
/// alice", and its GroupInfo: the phone's walk reaches it, and the phone
/// joins a fork where the laptop reads what it sends. alice's own device
/// would have removed the laptop (it holds the revocation); so does the
/// phone now, which gets alice's revocations with the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_is_not_forked_into_a_group_with_its_accounts_revoked_device() {
    use hush::auth::DeviceId;
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let homes: Vec<PathBuf> = ["alice", "bob", "laptop", "phone"].iter().map(|n| tmp.path().join(n)).collect();
    // The fork the operator shows the phone: group, log, GroupInfo, epoch,
    // acknowledged sequence; what the phone sends goes into it.
    type Fork = Option<(Vec<u8>, Vec<(u64, Vec<u8>)>, Vec<u8>, u64, u64)>;
    let fork: Arc<Mutex<Fork>> = Arc::new(Mutex::new(None));
    let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let (f, s) = (fork.clone(), sent.clone());
    let rewrite: Rewrite = Arc::new(move |req, resp| {
        let mut fork = f.lock().unwrap();
        let (group, log, info, epoch, acked) = fork.as_mut()?;
        let last = log.last().map_or(0, |(seq, _)| *seq);
        match req {
            // Listed once the phone is in (before, it is not a member).
            Request::ListGroups if !s.lock().unwrap().is_empty() => {
                let Response::Groups { groups } = resp else { return None };
                let mut groups: Vec<_> = groups.iter().filter(|g| g.group != *group).cloned().collect();
                groups.push(hush::wire::GroupSummary {
                    group: group.clone(),
                    epoch: *epoch,
                    last_seq: last,
                    acked_seq: *acked,
                    first_seq: 0,
                    member: true,
                });
                Some(Response::Groups { groups })
            }
            Request::Fetch { group: g, after, .. } if g == group => Some(Response::Messages {
                group: group.clone(),
                messages: log
                    .iter()
                    .filter(|(seq, _)| seq > after)
                    .map(|(seq, data)| Logged::new(*seq, None, data.clone()))
                    .collect(),
                more: false,
            }),
            Request::FetchGroupInfo { group: g } if g == group => {
                Some(Response::GroupInfo { group: group.clone(), group_info: info.clone(), ratchet_tree: None })
            }
            Request::Send { message, group_info, .. } => {
                s.lock().unwrap().push(message.clone());
                log.push((last + 1, message.clone()));
                if let Some(i) = group_info {
                    *epoch += 1;
                    *info = i.clone();
                }
                Some(Response::Accepted { group: group.clone(), seq: last + 1, epoch: *epoch, head: Head([0; 32]) })
            }
            Request::Ack { seq, .. } => {
                *acked = *seq;
                Some(Response::Done)
            }
            _ => None,
        }
    });
    let evil = Evil::start(&server, homes.clone(), rewrite).await;
    let (alice, bob, laptop, phone) = (&homes[0], &homes[1], &homes[2], &homes[3]);
    let group = tokio::task::block_in_place(|| {
        let alice_id = register(&server, alice, &evil.address);
        let bob_id = register(&server, bob, &evil.address);
        ok(hush(alice, &["contact", "add", "bob", &bob_id]));
        ok(hush(bob, &["contact", "add", "alice", &alice_id]));
        ok(hush(alice, &["group", "create", "team"]));
        ok(hush(alice, &["group", "add", "team", "bob"]));
        ok(hush(bob, &["sync"]));
        crate::devices::link(alice, laptop, "laptop");
        ok(hush(laptop, &["sync"]));
        ok(hush(bob, &["sync"]));
        // The laptop is stolen: alice revokes it (and removes it from
        // "team"), then links a phone.
        ok(hush(alice, &["device", "revoke", "laptop"]));
        ok(hush(bob, &["sync"]));
        crate::devices::link(alice, phone, "phone");
        group_id(&server, alice, "team")
    });
    // The thief's laptop (raw openmls; a certificate of alice's account for
    // the laptop's device, as the laptop holds one) joins from the GroupInfo
    // the operator hands it, as "a new device of alice".
    let alice_key = Identity::load(&alice.join("device.key")).unwrap();
    let direct = Connection::connect(&server.address, &alice_key).await.unwrap();
    let (info, tree) = direct.group_info(&group).await.unwrap();
    let summary = direct.groups().await.unwrap().into_iter().find(|g| g.group == group).unwrap();
    let laptop_key = Identity::load(&laptop.join("device.key")).unwrap();
    let alice_account = Identity::load(&alice.join("account.key")).unwrap();
    let mut thief = Member::new(&alice_account, DeviceId(laptop_key.public_key())).unwrap();
    let forced = thief.join_external(&group, &info, tree.as_deref()).unwrap();
    thief.merge_pending(&group).unwrap();
    // The fork's GroupInfo with its tree in it (a join's own leaves the
    // tree out, for the server to hand out beside it).
    let fork_info = thief.handover(&group).unwrap().unwrap().info;
    let log = vec![(summary.last_seq + 1, forced.message.clone())];
    *fork.lock().unwrap() = Some((group.clone(), log, fork_info, summary.epoch + 1, summary.last_seq));

    let out = tokio::task::block_in_place(|| {
        let out = hush(phone, &["sync"]);
        let _ = hush(phone, &["send", "team", "for alice and bob only"]);
        out
    });
    for message in sent.lock().unwrap().iter() {
        if let Ok(hush::client::mls::Received::Application { data, .. }) = thief.receive(&group, message) {
            panic!("the revoked laptop read the phone: {:?}", String::from_utf8_lossy(&data));
        }
    }
    // The phone holds alice's revocations (handed over with the link): it
    // removes the laptop before anything else.
    let shown = stdout(&out);
    assert!(shown.contains("you removed 1 device(s) their account revoked"), "{shown}");
}

/// Withholding: the server stops delivering the group's messages to bob
/// while alice and carol talk. Bob's next message says how far he had
/// read (signed by him, in its authenticated data): alice's client reports
/// that bob has not seen the last messages, in her sync and in
/// `hush verify`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_stops_delivering_to_one_member_is_reported_by_the_others() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let homes: Vec<PathBuf> = ["alice", "bob", "carol"].iter().map(|n| tmp.path().join(n)).collect();
    // From `cut` on, bob's fetches end there.
    let cut: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
    let c = cut.clone();
    let rewrite: RewriteFor = Arc::new(move |home, req, resp| {
        let cut = (*c.lock().unwrap())?;
        match (home, req, resp) {
            (1, Request::Fetch { .. }, Response::Messages { group, messages, .. }) => Some(Response::Messages {
                group: group.clone(),
                messages: messages.iter().filter(|m| m.seq <= cut).cloned().collect(),
                more: false,
            }),
            (1, Request::ListGroups, Response::Groups { groups }) => Some(Response::Groups {
                groups: groups
                    .iter()
                    .cloned()
                    .map(|mut g| {
                        g.last_seq = g.last_seq.min(cut);
                        g
                    })
                    .collect(),
            }),
            _ => None,
        }
    });
    let evil = Evil::start_for(&server, homes.clone(), rewrite).await;
    let (alice, bob, carol) = (&homes[0], &homes[1], &homes[2]);
    tokio::task::block_in_place(|| {
        let ids: Vec<String> = homes.iter().map(|h| register(&server, h, &evil.address)).collect();
        for (h, names) in [(alice, [1, 2]), (bob, [0, 2]), (carol, [0, 1])] {
            for n in names {
                ok(hush(h, &["contact", "add", ["alice", "bob", "carol"][n], &ids[n]]));
            }
        }
        ok(hush(alice, &["group", "create", "team"]));
        ok(hush(alice, &["group", "add", "team", "bob", "carol"]));
        ok(hush(bob, &["sync"]));
        ok(hush(carol, &["sync"]));
        ok(hush(bob, &["send", "team", "hi all"]));
        ok(hush(alice, &["sync"]));
        ok(hush(carol, &["sync"]));
        ok(hush(bob, &["sync"]));
    });
    let healthy = tokio::task::block_in_place(|| ok(hush(alice, &["verify", "team"])));
    assert!(!healthy.contains("has not seen"), "{healthy}");

    // The server stops delivering to bob where he is.
    let db = rusqlite::Connection::open(server.data_dir.join(hush::db::sqlite::DB_FILE)).unwrap();
    let last: u64 = db.query_row("SELECT MAX(last_seq) FROM groups", [], |r| r.get(0)).unwrap();
    *cut.lock().unwrap() = Some(last);
    tokio::task::block_in_place(|| {
        for i in 0..6 {
            ok(hush(alice, &["send", "team", &format!("alice {i}")]));
            ok(hush(carol, &["send", "team", &format!("carol {i}")]));
        }
        let bob_sees = ok(hush(bob, &["sync"]));
        assert!(!bob_sees.contains("alice 0"), "the server delivered to bob: {bob_sees}");
        ok(hush(bob, &["send", "team", "anyone there?"]));
    });
    let told = tokio::task::block_in_place(|| ok(hush(alice, &["sync"])));
    assert!(told.contains("anyone there?"), "{told}");
    assert!(told.contains("bob has not seen the last 12 messages"), "{told}");
    let report = tokio::task::block_in_place(|| ok(hush(alice, &["verify", "team"])));
    assert!(report.contains("bob: wrote message") && report.contains("has not seen the last 12 messages"), "{report}");
    let v: serde_json::Value =
        serde_json::from_str(&tokio::task::block_in_place(|| ok(hush(alice, &["verify", "team", "--json"])))).unwrap();
    let bob_row = v["members"].as_array().unwrap().iter().find(|m| m["name"] == "bob").unwrap().clone();
    assert_eq!(bob_row["behind"], 12, "{v}");
}

// ---- Red team (issue 31): evading the chain through a malicious proxy ----

/// Alice, bob and carol (homes 0, 1, 2) registered through a proxy that
/// answers with `rewrite`, contacts of each other, all in group "team"
/// and synced. Returns the last sequence number of the log then.
async fn evil_team(rewrite: RewriteFor) -> (tempfile::TempDir, Hushd, Vec<PathBuf>, Evil, u64) {
    let tmp = tempfile::tempdir().unwrap();
    let server = Hushd::start(&tmp.path().join("s"));
    let homes: Vec<PathBuf> = ["alice", "bob", "carol"].iter().map(|n| tmp.path().join(n)).collect();
    let evil = Evil::start_for(&server, homes.clone(), rewrite).await;
    let (alice, bob, carol) = (&homes[0], &homes[1], &homes[2]);
    tokio::task::block_in_place(|| {
        let ids: Vec<String> = homes.iter().map(|h| register(&server, h, &evil.address)).collect();
        for (h, names) in [(alice, [1, 2]), (bob, [0, 2]), (carol, [0, 1])] {
            for n in names {
                ok(hush(h, &["contact", "add", ["alice", "bob", "carol"][n], &ids[n]]));
            }
        }
        ok(hush(alice, &["group", "create", "team"]));
        ok(hush(alice, &["group", "add", "team", "bob", "carol"]));
        ok(hush(bob, &["sync"]));
        ok(hush(carol, &["sync"]));
        ok(hush(alice, &["send", "team", "hello"]));
        for h in &homes {
            ok(hush(h, &["sync"]));
        }
    });
    let db = rusqlite::Connection::open(server.data_dir.join(hush::db::sqlite::DB_FILE)).unwrap();
    let last: u64 = db.query_row("SELECT MAX(last_seq) FROM groups", [], |r| r.get(0)).unwrap();
    (tmp, server, homes, evil, last)
}

/// The operator drops a message for bob and hands him every later message
/// without its chain head, as if stored before the chain began. A device
/// that follows the chain already must not take a message without a head
/// as "nothing to check": bob's sync alarms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_strips_chain_heads_cannot_drop_a_message_silently() {
    // From this sequence number on, bob's fetches lose it and every head.
    let drop_at: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
    let d = drop_at.clone();
    let rewrite: RewriteFor = Arc::new(move |home, req, resp| {
        let at = (*d.lock().unwrap())?;
        match (home, req, resp) {
            (1, Request::Fetch { .. }, Response::Messages { group, messages, more }) => Some(Response::Messages {
                group: group.clone(),
                messages: messages
                    .iter()
                    .filter(|m| m.seq != at)
                    .map(|m| Logged::new(m.seq, if m.seq >= at { None } else { m.head }, m.data.clone()))
                    .collect(),
                more: *more,
            }),
            _ => None,
        }
    });
    let (_tmp, _server, homes, _evil, last) = evil_team(rewrite).await;
    let (alice, bob) = (&homes[0], &homes[1]);
    *drop_at.lock().unwrap() = Some(last + 1);
    let out = tokio::task::block_in_place(|| {
        ok(hush(alice, &["send", "team", "dropped for bob"]));
        ok(hush(alice, &["send", "team", "shown to bob"]));
        hush(bob, &["sync"])
    });
    let shown = stdout(&out);
    assert!(shown.contains("shown to bob") && !shown.contains("dropped for bob"), "{shown}");
    assert!(!out.status.success() && shown.contains("!! ALARM"), "bob was not alarmed: {shown}");
    assert!(!tokio::task::block_in_place(|| hush(bob, &["verify", "team"])).status.success());
}

/// The operator drops two messages for bob, who read the group a moment
/// ago, and says (`Status`) that it keeps messages 0 seconds and
/// (`ListGroups`) that its log starts after them: a gap that cannot be
/// retention (the server refuses a retention under a day) must still be
/// an alarm, not "expired on the server".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_announces_no_retention_cannot_pass_a_drop_off_as_expiry() {
    // The sequence numbers bob loses, from `.0` to `.1`.
    let dropped: Arc<Mutex<Option<(u64, u64)>>> = Arc::new(Mutex::new(None));
    let d = dropped.clone();
    let rewrite: RewriteFor = Arc::new(move |home, req, resp| {
        let (from, to) = (*d.lock().unwrap())?;
        match (home, req, resp) {
            (1, Request::Status, Response::Status { account, device, registered_at, server_time, removal_key, .. }) => {
                Some(Response::Status {
                    account: *account,
                    device: *device,
                    registered_at: *registered_at,
                    server_time: *server_time,
                    removal_key: *removal_key,
                    retention: 0,
                })
            }
            (1, Request::ListGroups, Response::Groups { groups }) => Some(Response::Groups {
                groups: groups
                    .iter()
                    .cloned()
                    .map(|mut g| {
                        g.first_seq = to + 1;
                        g
                    })
                    .collect(),
            }),
            (1, Request::Fetch { .. }, Response::Messages { group, messages, more }) => Some(Response::Messages {
                group: group.clone(),
                messages: messages.iter().filter(|m| m.seq < from || m.seq > to).cloned().collect(),
                more: *more,
            }),
            _ => None,
        }
    });
    let (_tmp, _server, homes, _evil, last) = evil_team(rewrite).await;
    let (alice, bob) = (&homes[0], &homes[1]);
    *dropped.lock().unwrap() = Some((last + 1, last + 2));
    let out = tokio::task::block_in_place(|| {
        ok(hush(alice, &["send", "team", "dropped 1"]));
        ok(hush(alice, &["send", "team", "dropped 2"]));
        ok(hush(alice, &["send", "team", "shown"]));
        hush(bob, &["sync"])
    });
    let shown = stdout(&out);
    assert!(shown.contains("shown") && !shown.contains("dropped 1"), "{shown}");
    assert!(!out.status.success() && shown.contains("!! ALARM"), "bob was not alarmed: {shown}");
}

/// The operator hides carol's two messages from bob, then acknowledges
/// bob's next message with the place (and head) of carol's second. Bob
/// takes the message there for his own and skips it: carol's message is
/// never shown to him (and a server that stores nothing of bob's drops his
/// message for everyone). The message at the place the server gave must be
/// the one bob sent, or his sync alarms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_give_a_members_own_message_the_place_of_another() {
    // Carol's messages once accepted: (seq, epoch, head); and whether the
    // proxy hides them from bob and lies to him.
    let carols: Arc<Mutex<Vec<(u64, u64, Head)>>> = Arc::new(Mutex::new(Vec::new()));
    let armed = Arc::new(Mutex::new(false));
    let (c, a) = (carols.clone(), armed.clone());
    let rewrite: RewriteFor = Arc::new(move |home, req, resp| {
        if !*a.lock().unwrap() {
            return None;
        }
        let first = c.lock().unwrap().first().copied();
        match (home, req, resp) {
            (2, Request::Send { .. }, Response::Accepted { seq, epoch, head, .. }) => {
                c.lock().unwrap().push((*seq, *epoch, *head));
                None
            }
            (1, Request::ListGroups, Response::Groups { groups }) => {
                let (hidden, ..) = first?;
                Some(Response::Groups {
                    groups: groups
                        .iter()
                        .cloned()
                        .map(|mut g| {
                            g.last_seq = g.last_seq.min(hidden - 1);
                            g
                        })
                        .collect(),
                })
            }
            (1, Request::Fetch { .. }, Response::Messages { group, messages, .. }) => {
                let (hidden, ..) = first?;
                Some(Response::Messages {
                    group: group.clone(),
                    messages: messages.iter().filter(|m| m.seq < hidden).cloned().collect(),
                    more: false,
                })
            }
            (1, Request::Send { .. }, Response::Accepted { group, .. }) => {
                let (seq, epoch, head) = c.lock().unwrap().get(1).copied()?;
                Some(Response::Accepted { group: group.clone(), seq, epoch, head })
            }
            _ => None,
        }
    });
    let (_tmp, _server, homes, _evil, _) = evil_team(rewrite).await;
    let (bob, carol) = (&homes[1], &homes[2]);
    *armed.lock().unwrap() = true;
    tokio::task::block_in_place(|| {
        ok(hush(carol, &["send", "team", "carol one"]));
        ok(hush(carol, &["send", "team", "for bob's eyes"]));
        ok(hush(bob, &["send", "team", "from bob"]));
    });
    *armed.lock().unwrap() = false;
    let out = tokio::task::block_in_place(|| hush(bob, &["sync"]));
    let shown = stdout(&out);
    assert!(shown.contains("carol one"), "{shown}");
    assert!(!out.status.success() && shown.contains("!! ALARM"), "bob was not alarmed: {shown}");
    assert!(shown.contains("for bob's eyes"), "carol's message was never shown to bob: {shown}");
}

/// The operator acknowledges bob's message with a place bob had already
/// read (and stores nothing): his message is dropped for everyone. An
/// honest server appends after everything bob read, so this alarms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_acknowledge_a_message_at_a_place_already_read() {
    let place: Arc<Mutex<Option<(u64, u64, Head)>>> = Arc::new(Mutex::new(None));
    let p = place.clone();
    let rewrite: RewriteFor = Arc::new(move |home, req, resp| match (home, req, resp) {
        (1, Request::Send { .. }, Response::Accepted { group, .. }) => {
            let (seq, epoch, head) = (*p.lock().unwrap())?;
            Some(Response::Accepted { group: group.clone(), seq, epoch, head })
        }
        (0, Request::Send { .. }, Response::Accepted { seq, epoch, head, .. }) => {
            *p.lock().unwrap() = Some((*seq, *epoch, *head));
            None
        }
        _ => None,
    });
    let (_tmp, _server, homes, _evil, _) = evil_team(rewrite).await;
    let (alice, bob) = (&homes[0], &homes[1]);
    let out = tokio::task::block_in_place(|| {
        ok(hush(alice, &["send", "team", "read by bob"]));
        ok(hush(bob, &["sync"]));
        hush(bob, &["send", "team", "lost"])
    });
    let out2 = tokio::task::block_in_place(|| hush(bob, &["verify", "team"]));
    assert!(
        !out2.status.success(),
        "bob's message was acknowledged at a place he had read, and nothing says so: {}{}",
        stdout(&out),
        stdout(&out2)
    );
}

/// The operator makes bob rejoin the group when he need not: once, it
/// shows him, at the place of alice's commit, her next message (of the
/// epoch after it, so bob cannot read it and rejoins by group repair),
/// then answers honestly. Bob's chain restarts at his rejoining commit:
/// the commit was hidden and the messages between it and his rejoin are
/// lost to him, with a group-repair event and no alarm. (Not fixed: the
/// message shown at the commit's place, with a head the operator
/// recomputed from bob's position, is never followed, and the chain
/// restarts at the rejoin without linking to bob's position; following the
/// stuck message first and checking the chain from there through the
/// messages before the rejoining commit would show the contradiction.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_cannot_force_a_group_repair_to_drop_messages_silently() {
    // Armed with the commit's place: the next fetch of bob's that holds
    // it shows the message after it there instead (once).
    // The head shown must link from bob's position: the operator
    // recomputes it from the head before the commit (every head it served
    // is kept here).
    let at: Arc<Mutex<Option<u64>>> = Arc::new(Mutex::new(None));
    let heads: Arc<Mutex<std::collections::HashMap<u64, Head>>> = Arc::default();
    let (a, h) = (at.clone(), heads.clone());
    let rewrite: RewriteFor = Arc::new(move |home, req, resp| {
        if let Response::Messages { messages, .. } = resp {
            h.lock().unwrap().extend(messages.iter().filter_map(|m| Some((m.seq, m.head?))));
        }
        if let Response::Accepted { seq, head, .. } = resp {
            h.lock().unwrap().insert(*seq, *head);
        }
        let commit = (*a.lock().unwrap())?;
        match (home, req, resp) {
            (1, Request::Fetch { .. }, Response::Messages { group, messages, .. })
                if messages.first().is_some_and(|m| m.seq == commit) && messages.len() > 1 =>
            {
                *a.lock().unwrap() = None;
                let next = &messages[1];
                let epoch = hush::mls::frame(&next.data).unwrap().epoch;
                let before = h.lock().unwrap()[&(commit - 1)];
                let head = before.next(commit, epoch, &next.data);
                Some(Response::Messages {
                    group: group.clone(),
                    messages: vec![Logged::new(commit, Some(head), next.data.clone())],
                    more: false,
                })
            }
            _ => None,
        }
    });
    let (_tmp, _server, homes, _evil, last) = evil_team(rewrite).await;
    let (alice, bob) = (&homes[0], &homes[1]);
    *at.lock().unwrap() = Some(last + 1);
    let out = tokio::task::block_in_place(|| {
        ok(hush(alice, &["group", "remove", "team", "carol"]));
        ok(hush(alice, &["send", "team", "lost 1"]));
        ok(hush(alice, &["send", "team", "lost 2"]));
        hush(bob, &["sync"])
    });
    let shown = stdout(&out);
    assert!(
        (!out.status.success() && shown.contains("!! ALARM")) || shown.contains("lost 1"),
        "bob lost messages to a repair the server forced, and nothing alarmed: {shown}"
    );
}
