//! The PostgreSQL store against a throwaway cluster (skipped, saying why,
//! where the machine has no PostgreSQL binaries).

use std::sync::{Arc, OnceLock};

use super::cluster::{Cluster, ClusterError};
use super::{PgDb, Target};
use crate::client::mls::Member;
use crate::delivery::storage::{Backend as _, DeviceRecord, Unit as _};
use crate::delivery::{Caller, Delivery, Storage as _};
use crate::wire::{Request, Response};

/// A new database on the process's cluster, or `None` (skip) without
/// binaries.
pub(crate) fn database() -> Option<Arc<Target>> {
    static CLUSTER: OnceLock<Result<Cluster, ClusterError>> = OnceLock::new();
    match CLUSTER.get_or_init(|| Cluster::start(false)) {
        Ok(cluster) => Some(Target::parse(&cluster.database().unwrap()).unwrap()),
        Err(e @ ClusterError::Missing) => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("cannot start a throwaway PostgreSQL cluster: {e}"),
    }
}

fn registered(db: &mut PgDb, member: &Member) -> Caller {
    let cert = member.certificate().clone();
    db.write(|s| {
        s.insert_account(&cert.account, None, 1)?;
        s.insert_device(&cert.device, &DeviceRecord::new(cert.account, cert.encode(), 1))
    })
    .unwrap();
    Caller::of(&cert)
}

#[test]
fn messages_are_sequenced_fetched_and_expired_like_on_sqlite() {
    let Some(target) = database() else { return };
    let mut db = PgDb::connect(target.clone()).unwrap();
    // A second node's connection migrates nothing more.
    drop(PgDb::connect(target).unwrap());
    let removal_key = crate::auth::Identity::generate().unwrap().public_key();
    let mut ds = Delivery::new(100, removal_key);
    let (_, _, mut alice) = Member::generate().unwrap();
    let caller = registered(&mut db, &alice);
    let mut run = |db: &mut PgDb, request: Request, now: u64| {
        let out = db.write(|s| Ok(ds.handle(s, caller, request, now))).unwrap();
        assert!(!matches!(out.response, Response::Error { .. }), "{:?}", out.response);
        out
    };
    let g = alice.create_group(&removal_key).unwrap();
    run(&mut db, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }, 1_000);
    for t in (1_000..1_010).chain([1_001]) {
        let m = alice.encrypt(&g.id, b"x").unwrap();
        run(&mut db, Request::Send { message: m, welcome: None, group_info: None }, t);
    }
    let (all, more) = db.read(|s| s.fetch(&g.id, 0, None, 100, usize::MAX)).unwrap().unwrap();
    assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=11).collect::<Vec<_>>());
    assert!(!more);
    let deleted = db.write(|s| ds.expire(s, 1_105)).unwrap();
    assert_eq!(deleted, 5);
    let (kept, _) = db.read(|s| s.fetch(&g.id, 0, None, 100, usize::MAX)).unwrap().unwrap();
    assert_eq!(kept.iter().map(|m| m.seq).collect::<Vec<_>>(), (6..=11).collect::<Vec<_>>());
    assert_eq!(db.read(|s| s.log_len(&g.id)).unwrap().unwrap(), 6);
    assert!(db.read(|s| s.database_bytes()).unwrap().unwrap() > 0);
}

#[test]
fn two_nodes_appending_to_one_group_get_dense_distinct_sequences() {
    let Some(target) = database() else { return };
    let removal_key = crate::auth::Identity::generate().unwrap().public_key();
    let mut db = PgDb::connect(target.clone()).unwrap();
    let (_, _, mut alice) = Member::generate().unwrap();
    let caller = registered(&mut db, &alice);
    let g = alice.create_group(&removal_key).unwrap();
    let mut ds = Delivery::new(1_000_000, removal_key);
    let create = Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree };
    db.write(|s| Ok(ds.handle(s, caller, create, 1))).unwrap();
    let messages: Vec<Vec<u8>> = (0..200).map(|_| alice.encrypt(&g.id, b"x").unwrap()).collect();
    let nodes: Vec<_> = messages
        .chunks(100)
        .map(|chunk| {
            let target = target.clone();
            let chunk = chunk.to_vec();
            std::thread::spawn(move || {
                let mut db = PgDb::connect(target).unwrap();
                let mut ds = Delivery::new(1_000_000, removal_key);
                let mut seqs = Vec::new();
                // Batches of ten per transaction, as the engine does.
                for batch in chunk.chunks(10) {
                    db.write(|s| {
                        for m in batch {
                            let request = Request::Send { message: m.clone(), welcome: None, group_info: None };
                            match ds.handle(s, caller, request, 2).response {
                                Response::Accepted { seq, .. } => seqs.push(seq),
                                other => panic!("{other:?}"),
                            }
                        }
                        Ok(())
                    })
                    .unwrap();
                }
                seqs
            })
        })
        .collect();
    let mut seqs: Vec<u64> = nodes.into_iter().flat_map(|n| n.join().unwrap()).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

/// PEM armour for DER bytes (test certificates for the database server).
fn pem(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in der.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                text.push('=');
            }
        }
    }
    let lines: Vec<&str> = text.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).unwrap()).collect();
    format!("-----BEGIN {label}-----\n{}\n-----END {label}-----\n", lines.join("\n"))
}

#[test]
fn tls_to_a_database_is_required_and_verified_for_its_name_against_the_given_root() {
    if super::cluster::binaries().is_err() {
        eprintln!("skipped: {}", ClusterError::Missing);
        return;
    }
    let issued = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let certificate = pem("CERTIFICATE", issued.cert.der());
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cluster =
        Cluster::start_tls(port, &certificate, &pem("PRIVATE KEY", &issued.signing_key.serialize_der())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, &certificate).unwrap();
    let connects = |url: String| PgDb::connect(Target::parse(&url).unwrap()).map(drop).map_err(|e| e.to_string());
    // The server's certificate, for its name, from the given root: in.
    connects(format!("postgresql://postgres@localhost:{port}/postgres?sslrootcert={}", root.display())).unwrap();
    // The system's CA bundle does not vouch for it.
    let e = connects(format!("postgresql://postgres@localhost:{port}/postgres")).unwrap_err();
    assert!(e.contains("certificate") || e.contains("issuer"), "{e}");
    // A certificate for another name than the one dialled.
    let e = connects(format!("postgresql://postgres@127.0.0.1:{port}/postgres?sslrootcert={}", root.display()))
        .unwrap_err();
    assert!(e.contains("certificate") || e.contains("name"), "{e}");
    // Without TLS the server (TLS only over TCP) refuses: what connected
    // above was TLS.
    assert!(connects(format!("postgresql://postgres@localhost:{port}/postgres?sslmode=disable")).is_err());
    drop(cluster);
}

#[test]
fn a_database_from_a_newer_hushd_is_refused() {
    let Some(target) = database() else { return };
    let mut db = PgDb::connect(target.clone()).unwrap();
    db.client.batch_execute("UPDATE hush_schema SET version = 99").unwrap();
    drop(db);
    let e = PgDb::connect(target).unwrap_err();
    assert!(matches!(e, crate::db::StoreError::SchemaTooNew { found: 99, .. }), "{e}");
}

/// Red team, issue 37: a node of the version before (during an upgrade)
/// writes a group's state with the statement it knows, which says nothing
/// of the state's version. The database advances the version anyway, so a
/// verdict prepared before that write is not applied over it.
#[test]
fn a_state_written_by_a_node_that_knows_no_version_still_advances_it() {
    let Some(target) = database() else { return };
    let mut db = PgDb::connect(target).unwrap();
    let removal_key = crate::auth::Identity::generate().unwrap().public_key();
    let mut ds = Delivery::new(100, removal_key);
    let (_, _, mut alice) = Member::generate().unwrap();
    let caller = registered(&mut db, &alice);
    let g = alice.create_group(&removal_key).unwrap();
    let create = Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree };
    let out = db.write(|s| Ok(ds.handle(s, caller, create, 1_000))).unwrap();
    assert!(matches!(out.response, Response::Accepted { .. }), "{:?}", out.response);
    let version = |db: &mut PgDb| db.read(|s| s.group(&g.id)).unwrap().unwrap().unwrap().version;
    let before = version(&mut db);
    // The statement of PostgreSQL schema 7's update_group.
    let id: String = g.id.iter().map(|b| format!("{b:02x}")).collect();
    db.client
        .batch_execute(&format!(
            "WITH g AS (UPDATE groups SET epoch = epoch WHERE id = '\\x{id}'::bytea RETURNING gid)
             UPDATE group_states s SET state = s.state FROM g WHERE s.gid = g.gid"
        ))
        .unwrap();
    assert_eq!(version(&mut db), before + 1);
    // And hushd's own update advances it once, not twice.
    db.write(|s| {
        let record = s.group(&g.id)?.unwrap();
        s.update_group(&g.id, record.epoch, &record.state)
    })
    .unwrap();
    assert_eq!(version(&mut db), before + 2);
}

/// Issue 29, finding 6: what a node tells the others is a row only
/// hushd's role reads (the wake-up names just the row), decoded back to
/// the same notice by another node, skipped by its own, and deleted once
/// past its retention.
#[test]
fn notices_are_rows_read_back_by_other_nodes_and_deleted_after_their_retention() {
    use super::listen::{in_order, Notice};
    use crate::auth::DeviceId;
    use crate::delivery::Notification;
    let Some(target) = database() else { return };
    let mut db = PgDb::connect(target.clone()).unwrap();
    let d = DeviceId([3; 32]);
    let notifications = [
        Notification::Welcome { recipient: d },
        Notification::Revoked { device: d },
        Notification::Message {
            group: vec![1, 2],
            seq: 7,
            head: None,
            message: vec![0xee; 10],
            recipients: Arc::new([d]),
        },
    ];
    db.write(|s| s.announce(&notifications)).unwrap();
    let rows = db.client.query("SELECT nseq, node, kind, grp, seq, device FROM notices ORDER BY id", &[]).unwrap();
    let named: Vec<(u64, i64)> = rows.iter().map(|r| (target.node, r.get(0))).collect();
    assert_eq!(named.iter().map(|(_, n)| *n).collect::<Vec<_>>(), [1, 2, 3], "the node numbers its notices");
    let expected: Vec<Notice> = notifications.iter().map(Notice::of).collect();
    assert_eq!(in_order(target.node.wrapping_add(1), &named, &rows), expected);
    assert!(in_order(target.node, &named, &rows).is_empty(), "a node skips its own notices");
    // Names of no row are skipped; repeated ones read once.
    let (node, third) = named[2];
    let asked = vec![(node, -1), (node, third + 1000), (node.wrapping_add(1), third), (node, third), (node, third)];
    assert_eq!(in_order(target.node.wrapping_add(1), &asked, &rows), [expected[2].clone()]);
    // No message bytes in the table.
    let stored: i64 = db
        .client
        .query_one("SELECT count(*) FROM notices WHERE position('\\xeeee'::bytea IN grp) > 0", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, 0);
    // Past the retention, the expiry deletes them (and only them).
    db.client.execute("UPDATE notices SET created_at = now() - interval '1 day' WHERE kind <> 'm'", &[]).unwrap();
    db.write(|s| s.expire(0)).unwrap();
    let left: Vec<String> =
        db.client.query("SELECT kind FROM notices", &[]).unwrap().iter().map(|r| r.get(0)).collect();
    assert_eq!(left, ["m"]);
}

#[test]
fn postgres_errors_never_show_the_row_values_the_server_quotes() {
    let Some(target) = database() else { return };
    let mut db = PgDb::connect(target).unwrap();
    let key = crate::auth::AccountId([0xab; 32]);
    db.write(|s| s.insert_account(&key, None, 1)).unwrap();
    let e = db.write(|s| s.insert_account(&key, None, 1)).unwrap_err().to_string();
    assert!(e.contains("duplicate key") && e.contains("23505"), "{e}");
    assert!(!e.contains("abab") && !e.contains("DETAIL"), "{e}");
}
