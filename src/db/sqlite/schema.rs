//! Schema migrations, keyed by `PRAGMA user_version`.
//!
//! `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`. Each runs
//! in the same transaction as the version bump, so a crash mid-migration
//! leaves the previous version intact. Never edit a released migration;
//! append a new one.

use rusqlite::Connection;

use super::StoreError;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1: accounts and invites.
    "CREATE TABLE accounts (
        key BLOB PRIMARY KEY NOT NULL CHECK (length(key) = 32),
        created_at INTEGER NOT NULL,
        invite_id BLOB
    ) WITHOUT ROWID;
    CREATE TABLE invites (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 8),
        secret_hash BLOB NOT NULL CHECK (length(secret_hash) = 32),
        uses_total INTEGER NOT NULL CHECK (uses_total > 0),
        uses_left INTEGER NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses_total),
        expires_at INTEGER,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;",
    // 1 -> 2: the Delivery Service. Groups get a small integer `gid` so the
    // log's key stays two integers (bytes per message do not depend on the
    // group id's length).
    "CREATE TABLE key_packages (
        hash_ref BLOB PRIMARY KEY NOT NULL,
        owner BLOB NOT NULL REFERENCES accounts(key),
        data BLOB NOT NULL,
        last_resort INTEGER NOT NULL CHECK (last_resort IN (0, 1)),
        created_at INTEGER NOT NULL
    );
    CREATE INDEX key_packages_owner ON key_packages(owner, last_resort);
    CREATE TABLE claimed (
        hash_ref BLOB PRIMARY KEY NOT NULL,
        owner BLOB NOT NULL,
        claimed_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE groups (
        gid INTEGER PRIMARY KEY,
        id BLOB NOT NULL UNIQUE CHECK (length(id) BETWEEN 1 AND 255),
        epoch INTEGER NOT NULL,
        state BLOB NOT NULL,
        last_seq INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE members (
        gid INTEGER NOT NULL REFERENCES groups(gid),
        account BLOB NOT NULL,
        joined_after INTEGER NOT NULL,
        left_at INTEGER,
        acked INTEGER NOT NULL,
        PRIMARY KEY (gid, account)
    ) WITHOUT ROWID;
    CREATE INDEX members_account ON members(account);
    CREATE TABLE log (
        gid INTEGER NOT NULL REFERENCES groups(gid),
        seq INTEGER NOT NULL,
        epoch INTEGER NOT NULL,
        data BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (gid, seq)
    ) WITHOUT ROWID;
    CREATE INDEX log_created ON log(created_at);
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        recipient BLOB NOT NULL,
        gid INTEGER NOT NULL REFERENCES groups(gid),
        data BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX inbox_recipient ON inbox(recipient, id);",
    // 2 -> 3: a group's public MLS state (kilobytes, overflow pages) moves
    // out of the `groups` row, so the per-message sequence bump rewrites a
    // small row instead of the whole state. The log loses its `created_at`
    // index (one b-tree insert less per message): retention deletes a
    // prefix of each group's log, found by walking the primary key.
    "CREATE TABLE group_states (
        gid INTEGER PRIMARY KEY REFERENCES groups(gid),
        state BLOB NOT NULL
    );
    INSERT INTO group_states (gid, state) SELECT gid, state FROM groups;
    ALTER TABLE groups DROP COLUMN state;
    DROP INDEX log_created;",
    // 3 -> 4: devices and certified credentials. Connections authenticate
    // with a device key; each device has the account's certificate, which
    // is also its MLS credential. KeyPackages, memberships, cursors and the
    // Welcome inbox belong to devices. Only empty databases take this step
    // ([`migrate`] refuses one with accounts or groups: their MLS leaves
    // carry no certificate and cannot be vouched for after the fact).
    "CREATE TABLE devices (
        key BLOB PRIMARY KEY NOT NULL CHECK (length(key) = 32),
        account BLOB NOT NULL REFERENCES accounts(key),
        certificate BLOB NOT NULL,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX devices_account ON devices(account);
    DROP TABLE key_packages;
    CREATE TABLE key_packages (
        hash_ref BLOB PRIMARY KEY NOT NULL,
        device BLOB NOT NULL REFERENCES devices(key),
        account BLOB NOT NULL,
        data BLOB NOT NULL,
        last_resort INTEGER NOT NULL CHECK (last_resort IN (0, 1)),
        created_at INTEGER NOT NULL
    );
    CREATE INDEX key_packages_device ON key_packages(device, last_resort);
    CREATE INDEX key_packages_account ON key_packages(account);
    DROP TABLE claimed;
    CREATE TABLE claimed (
        hash_ref BLOB PRIMARY KEY NOT NULL,
        device BLOB NOT NULL,
        account BLOB NOT NULL,
        claimed_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    DROP TABLE members;
    CREATE TABLE members (
        gid INTEGER NOT NULL REFERENCES groups(gid),
        device BLOB NOT NULL,
        account BLOB NOT NULL,
        joined_after INTEGER NOT NULL,
        left_at INTEGER,
        left_epoch INTEGER,
        acked INTEGER NOT NULL,
        PRIMARY KEY (gid, device)
    ) WITHOUT ROWID;
    CREATE INDEX members_device ON members(device);
    CREATE INDEX members_account ON members(account);
    DROP TABLE inbox;
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY,
        recipient BLOB NOT NULL,
        gid INTEGER NOT NULL REFERENCES groups(gid),
        data BLOB NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE INDEX inbox_recipient ON inbox(recipient, id);",
    // 4 -> 5: group repair. The GroupInfo of each group's current epoch, as
    // its last committer signed it (NULL for a group nobody committed to
    // since: it gets one with the next commit).
    "ALTER TABLE group_states ADD COLUMN group_info BLOB;",
    // 5 -> 6: several devices per account. Revoked devices and removed
    // (offboarded) accounts stay, marked, so their keys are refused for
    // good; link codes wait in `links` (the server holds only the code's
    // id and ciphertext it cannot read, see `delivery::links`).
    "ALTER TABLE devices ADD COLUMN revoked_at INTEGER;
    ALTER TABLE accounts ADD COLUMN removed_at INTEGER;
    CREATE TABLE links (
        id BLOB PRIMARY KEY NOT NULL,
        account BLOB NOT NULL REFERENCES accounts(key),
        created_at INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        device BLOB,
        offer BLOB,
        certificate BLOB,
        bundle BLOB
    );
    CREATE INDEX links_account ON links(account);
    CREATE INDEX links_expires ON links(expires_at);",
    // 6 -> 7: verifiable delivery. Each group's hash chain (`crate::chain`):
    // the head after its last message and the sequence number it started at
    // (NULL until the first message after this migration: a group's chain
    // starts there), and each message's head.
    "ALTER TABLE groups ADD COLUMN head BLOB;
    ALTER TABLE groups ADD COLUMN chain_start INTEGER;
    ALTER TABLE log ADD COLUMN head BLOB;",
    // 7 -> 8: files (issue 32). One row per blob (its bytes are a file in
    // the blob directory): the group it was uploaded for, the uploader,
    // its size, how much of it is durable, and its hash once complete.
    "CREATE TABLE blobs (
        id BLOB PRIMARY KEY NOT NULL CHECK (length(id) = 16),
        gid INTEGER NOT NULL REFERENCES groups(gid),
        account BLOB NOT NULL,
        device BLOB NOT NULL,
        size INTEGER NOT NULL,
        received INTEGER NOT NULL,
        hash BLOB,
        created_at INTEGER NOT NULL,
        completed_at INTEGER
    );
    CREATE INDEX blobs_account ON blobs(account);
    CREATE INDEX blobs_device ON blobs(device);",
    // 8 -> 9: disappearing messages (issue 33). Each group's timer (from
    // its verified group context), when each message and blob expires,
    // and for an expired message its digest in place of its bytes (its
    // link in the chain). Only messages with a timer enter the index.
    "ALTER TABLE groups ADD COLUMN disappear INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE log ADD COLUMN expires_at INTEGER;
    ALTER TABLE log ADD COLUMN gone BLOB;
    CREATE INDEX log_expires ON log(expires_at) WHERE expires_at IS NOT NULL;
    ALTER TABLE blobs ADD COLUMN expires_at INTEGER;
    CREATE INDEX blobs_expires ON blobs(expires_at) WHERE expires_at IS NOT NULL;",
    // 9 -> 10: post-quantum groups (issue 35). Each KeyPackage's
    // ciphersuite (every one stored before is classic, 0x0001): a device
    // keeps packages, and a last-resort one, of each suite. And the
    // devices whose membership row went (issue 34): they never read the
    // log again through their account's membership.
    "ALTER TABLE key_packages ADD COLUMN suite INTEGER NOT NULL DEFAULT 1;
    CREATE INDEX key_packages_suite ON key_packages(device, suite, last_resort);
    CREATE TABLE former_members (
        gid INTEGER NOT NULL REFERENCES groups(gid),
        device BLOB NOT NULL,
        PRIMARY KEY (gid, device)
    ) WITHOUT ROWID;",
    // 10 -> 11: performance at scale (issue 37). Each group's GroupInfo in
    // a row of its own: SQLite rewrites a whole row on every update, so
    // with the GroupInfo next to the state a commit of a group of 1000
    // (state and GroupInfo each carry the whole tree, ~400 KiB apiece)
    // wrote both twice, and every proposal rewrote the GroupInfo too.
    "CREATE TABLE group_infos (
        gid INTEGER PRIMARY KEY NOT NULL REFERENCES groups(gid),
        info BLOB NOT NULL
    );
    INSERT INTO group_infos (gid, info) SELECT gid, group_info FROM group_states WHERE group_info IS NOT NULL;
    ALTER TABLE group_states DROP COLUMN group_info;",
    // 11 -> 12: performance at scale (issue 37). A version that counts the
    // changes of each group's state, kept in the small `groups` row: the
    // writer takes a verdict prepared off it while the version is the
    // snapshot's, without reading the (up to 8 MiB) state back to compare.
    "ALTER TABLE groups ADD COLUMN state_version INTEGER NOT NULL DEFAULT 0;",
    // 12 -> 13: a membership that starts or ends, and a member device
    // revoked, advance the group's state version too, whoever writes them
    // (the operator's removal runs in a process of its own, and ends a
    // membership without a new state when the group does not list the
    // server's removal key): the writer's cached members of a group (and
    // which of them are revoked), and a verdict, hold only at one version.
    "CREATE TRIGGER members_joined_version AFTER INSERT ON members BEGIN
        UPDATE groups SET state_version = state_version + 1 WHERE gid = NEW.gid;
    END;
    CREATE TRIGGER members_left_version AFTER UPDATE OF left_at ON members BEGIN
        UPDATE groups SET state_version = state_version + 1 WHERE gid = NEW.gid;
    END;
    CREATE TRIGGER devices_revoked_version AFTER UPDATE OF revoked_at ON devices BEGIN
        UPDATE groups SET state_version = state_version + 1
            WHERE gid IN (SELECT gid FROM members WHERE device = NEW.key AND left_at IS NULL);
    END;",
];

/// The first schema version with device certificates.
const CERTIFIED: i64 = 4;

/// The schema version this build writes.
pub fn latest() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// Brings the database to [`latest`], refusing databases from the future
/// and databases with data from before device certificates.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    migrate_to(conn, latest())
}

fn migrate_to(conn: &mut Connection, target: i64) -> Result<(), StoreError> {
    crate::sqlite::migrate(
        conn,
        MIGRATIONS,
        target,
        |found, supported| StoreError::SchemaTooNew { found, supported },
        |version, tx| {
            if version == CERTIFIED - 1 {
                let rows: i64 =
                    tx.query_row("SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM groups)", [], |r| {
                        r.get(0)
                    })?;
                if rows > 0 {
                    return Err(StoreError::Uncertified { found: version });
                }
            }
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_2_groups_keep_their_state_and_messages_through_migration_3() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        for (v, sql) in MIGRATIONS.iter().take(2).enumerate() {
            conn.execute_batch(sql).unwrap();
            conn.pragma_update(None, "user_version", v + 1).unwrap();
        }
        conn.execute_batch(
            "INSERT INTO groups (gid, id, epoch, state, last_seq, created_at) VALUES (7, x'0102', 3, x'aabbcc', 2, 10);
             INSERT INTO log (gid, seq, epoch, data, created_at) VALUES (7, 1, 3, x'01', 10), (7, 2, 3, x'02', 11);",
        )
        .unwrap();
        migrate_to(&mut conn, 3).unwrap();
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 3);
        let (epoch, state, last): (i64, Vec<u8>, i64) = conn
            .query_row(
                "SELECT g.epoch, s.state, g.last_seq FROM groups g JOIN group_states s ON s.gid = g.gid WHERE g.id = x'0102'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!((epoch, state, last), (3, vec![0xaa, 0xbb, 0xcc], 2));
        let n: i64 = conn.query_row("SELECT count(*) FROM log WHERE gid = 7", [], |r| r.get(0)).unwrap();
        assert_eq!(n, 2);
        let fk: Vec<String> = conn
            .prepare("PRAGMA foreign_key_check")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(fk.is_empty(), "{fk:?}");
    }

    #[test]
    fn a_database_with_uncertified_accounts_is_refused_and_left_untouched() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 3).unwrap();
        conn.execute_batch("INSERT INTO accounts (key, created_at) VALUES (zeroblob(32), 1)").unwrap();
        let e = migrate(&mut conn).unwrap_err();
        assert!(matches!(e, StoreError::Uncertified { found: 3 }), "{e}");
        assert!(e.to_string().contains("move hush.db"), "{e}");
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 3);
        // An empty database of the old version is simply brought up to date.
        let mut empty = Connection::open_in_memory().unwrap();
        migrate_to(&mut empty, 3).unwrap();
        migrate(&mut empty).unwrap();
        let version: i64 = empty.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
        assert_eq!(version, latest());
    }

    /// A database of schema `version` holding one group (gid 3, state
    /// aabb), migrated to the latest schema.
    fn one_group_migrated_from(version: i64) -> Connection {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, version).unwrap();
        conn.execute_batch(
            "INSERT INTO groups (gid, id, epoch, last_seq, created_at) VALUES (3, x'0102', 5, 9, 10);
             INSERT INTO group_states (gid, state) VALUES (3, x'aabb');",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        conn
    }

    #[test]
    fn version_4_groups_migrate_without_a_group_info_until_their_next_commit() {
        let conn = one_group_migrated_from(4);
        let state: Vec<u8> = conn.query_row("SELECT state FROM group_states WHERE gid = 3", [], |r| r.get(0)).unwrap();
        let infos: i64 = conn.query_row("SELECT count(*) FROM group_infos", [], |r| r.get(0)).unwrap();
        assert_eq!((state, infos), (vec![0xaa, 0xbb], 0));
    }

    #[test]
    fn version_11_groups_start_at_state_version_0() {
        let conn = one_group_migrated_from(11);
        let version: i64 = conn.query_row("SELECT state_version FROM groups WHERE gid = 3", [], |r| r.get(0)).unwrap();
        assert_eq!(version, 0);
    }

    #[test]
    fn version_10_group_infos_move_to_their_own_table() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate_to(&mut conn, 10).unwrap();
        conn.execute_batch(
            "INSERT INTO groups (gid, id, epoch, last_seq, created_at) VALUES (3, x'0102', 5, 9, 10);
             INSERT INTO groups (gid, id, epoch, last_seq, created_at) VALUES (4, x'0304', 1, 1, 10);
             INSERT INTO group_states (gid, state, group_info) VALUES (3, x'aabb', x'ccdd');
             INSERT INTO group_states (gid, state) VALUES (4, x'ee');",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let info: Vec<u8> = conn.query_row("SELECT info FROM group_infos WHERE gid = 3", [], |r| r.get(0)).unwrap();
        assert_eq!(info, vec![0xcc, 0xdd]);
        let infos: i64 = conn.query_row("SELECT count(*) FROM group_infos", [], |r| r.get(0)).unwrap();
        assert_eq!(infos, 1, "a group without a GroupInfo gets none");
        let state: Vec<u8> = conn.query_row("SELECT state FROM group_states WHERE gid = 4", [], |r| r.get(0)).unwrap();
        assert_eq!(state, vec![0xee]);
    }
}
