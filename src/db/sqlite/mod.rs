//! Persistence: SQLite (rusqlite, bundled) in WAL mode.
//!
//! [`Db`] is an open database: the [`crate::delivery::storage::Backend`]
//! the server's engine ([`crate::server::engine::Engine`]) runs on its
//! threads (so async tasks never block on SQLite), and what short-lived
//! commands (`hushd invite`, `hushd accounts`) use directly. [`SqlStore`]
//! is the [`crate::delivery::Storage`] on a connection: everything the
//! server persists. Several
//! processes may open the same database: writes take SQLite's write lock
//! (`BEGIN IMMEDIATE`) and wait up to [`BUSY_TIMEOUT`] for it.
//!
//! Durability: `synchronous=FULL`, so a write acknowledged to a client has
//! been fsynced. `foreign_keys=ON`. The schema is versioned with
//! `PRAGMA user_version` and migrated forward in the `schema` module.
//!
//! The store holds public keys, device certificates, hashed invite
//! secrets, public MLS group state and GroupInfo, and ciphertext. It never
//! holds the server's private keys.

mod db;
pub mod maintenance;
mod schema;
mod sql;

pub use db::Db;
pub use sql::SqlStore;

use crate::db::StoreError;

pub use crate::sqlite::BUSY_TIMEOUT;

/// File name of the database inside the data directory.
pub const DB_FILE: &str = "hush.db";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::mls::Member;
    use crate::delivery::storage::{Backend as _, DeviceRecord};
    use crate::delivery::{Caller, Delivery, Storage as _};
    use crate::wire::{Request, Response};

    #[test]
    fn retention_deletes_the_oldest_messages_of_each_group_and_nothing_younger() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("t.db")).unwrap();
        let removal_key = crate::auth::Identity::generate().unwrap().public_key();
        let mut ds = Delivery::new(100, removal_key);
        let (_, _, mut alice) = Member::generate().unwrap();
        let caller = Caller::of(alice.certificate());
        let mut run = |db: &mut Db, request: Request, now: u64| {
            let out = db.write(|s| Ok(ds.handle(s, caller, request, now))).unwrap();
            assert!(!matches!(out.response, Response::Error { .. }), "{:?}", out.response);
        };
        let cert = alice.certificate().clone();
        db.write(|s| {
            s.insert_account(&cert.account, None, 1)?;
            let record = DeviceRecord::new(cert.account, cert.encode(), 1);
            s.insert_device(&cert.device, &record)
        })
        .unwrap();
        let g = alice.create_group(&removal_key).unwrap();
        run(&mut db, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree }, 1_000);
        // Ten messages at t = 1000..1009, then one stamped earlier (a clock
        // that stepped back): retention removes a prefix, never a hole.
        for t in (1_000..1_010).chain([1_001]) {
            let m = alice.encrypt(&g.id, b"x").unwrap();
            run(&mut db, Request::Send { message: m, welcome: None, group_info: None }, t);
        }
        let deleted = ds.expire(&mut SqlStore::new(&db.conn), 1_105).unwrap();
        assert_eq!(deleted, 5, "messages stamped 1000..=1004 are older than 100 s");
        let mut store = SqlStore::new(&db.conn);
        let (kept, _) = store.fetch(&g.id, 0, None, 100, usize::MAX).unwrap();
        assert_eq!(kept.iter().map(|m| m.seq).collect::<Vec<_>>(), (6..=11).collect::<Vec<_>>());
        assert_eq!(store.log_len(&g.id).unwrap(), 6);
        assert_eq!(ds.expire(&mut SqlStore::new(&db.conn), 2_000).unwrap(), 6);
        assert_eq!(SqlStore::new(&db.conn).log_len(&g.id).unwrap(), 0);
    }
}
