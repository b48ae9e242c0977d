//! The PostgreSQL store against a throwaway cluster (skipped, saying why,
//! where the machine has no PostgreSQL binaries).

use std::sync::{Arc, OnceLock};

use super::cluster::{Cluster, ClusterError};
use super::{PgDb, Target};
use crate::client::mls::Member;
use crate::delivery::storage::{Backend as _, DeviceRecord};
use crate::delivery::{Caller, Delivery, Storage as _};
use crate::wire::{Request, Response};

/// A new database on the process's cluster, or `None` (skip) without
/// binaries.
pub(crate) fn database() -> Option<Arc<Target>> {
    static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
    match CLUSTER.get_or_init(|| Cluster::start(false).map_err(|e| e.to_string())) {
        Ok(cluster) => Some(Target::parse(&cluster.database().unwrap()).unwrap()),
        Err(e) if e == &ClusterError::Missing.to_string() => {
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
    assert_eq!(all.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=11).collect::<Vec<_>>());
    assert!(!more);
    let deleted = db.write(|s| ds.expire(s, 1_105)).unwrap();
    assert_eq!(deleted, 5);
    let (kept, _) = db.read(|s| s.fetch(&g.id, 0, None, 100, usize::MAX)).unwrap().unwrap();
    assert_eq!(kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (6..=11).collect::<Vec<_>>());
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
