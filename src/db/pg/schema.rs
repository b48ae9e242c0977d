//! The PostgreSQL schema, versioned in the `hush_schema` table.
//!
//! `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`; all
//! pending steps run in one transaction under an advisory lock, so nodes
//! starting together migrate once and a failed step leaves the previous
//! version. Never edit a released migration; append one. (Version 1 is
//! the SQLite schema as of its version 6; the two count separately.)

use postgres::Client;

use crate::db::StoreError;

const MIGRATIONS: &[&str] = &[
    // 0 -> 1: everything, as of SQLite schema 6. Times are Unix seconds.
    "CREATE TABLE accounts (
        key bytea PRIMARY KEY CHECK (length(key) = 32),
        created_at bigint NOT NULL,
        invite_id bytea,
        removed_at bigint
    );
    CREATE TABLE invites (
        id bytea PRIMARY KEY CHECK (length(id) = 8),
        secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
        uses_total bigint NOT NULL CHECK (uses_total > 0),
        uses_left bigint NOT NULL CHECK (uses_left >= 0 AND uses_left <= uses_total),
        expires_at bigint,
        created_at bigint NOT NULL
    );
    CREATE TABLE devices (
        key bytea PRIMARY KEY CHECK (length(key) = 32),
        account bytea NOT NULL REFERENCES accounts(key),
        certificate bytea NOT NULL,
        created_at bigint NOT NULL,
        revoked_at bigint
    );
    CREATE INDEX devices_account ON devices(account);
    CREATE TABLE key_packages (
        hash_ref bytea PRIMARY KEY,
        device bytea NOT NULL REFERENCES devices(key),
        account bytea NOT NULL,
        data bytea NOT NULL,
        last_resort boolean NOT NULL,
        created_at bigint NOT NULL
    );
    CREATE INDEX key_packages_device ON key_packages(device, last_resort);
    CREATE INDEX key_packages_account ON key_packages(account);
    CREATE TABLE claimed (
        hash_ref bytea PRIMARY KEY,
        device bytea NOT NULL,
        account bytea NOT NULL,
        claimed_at bigint NOT NULL
    );
    CREATE TABLE groups (
        gid bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        id bytea NOT NULL UNIQUE CHECK (length(id) BETWEEN 1 AND 255),
        epoch bigint NOT NULL,
        last_seq bigint NOT NULL,
        -- Bytes of the group's stored messages (the storage quota).
        bytes bigint NOT NULL DEFAULT 0,
        created_at bigint NOT NULL
    );
    CREATE TABLE group_states (
        gid bigint PRIMARY KEY REFERENCES groups(gid),
        state bytea NOT NULL,
        group_info bytea
    );
    CREATE TABLE members (
        gid bigint NOT NULL REFERENCES groups(gid),
        device bytea NOT NULL,
        account bytea NOT NULL,
        joined_after bigint NOT NULL,
        left_at bigint,
        left_epoch bigint,
        acked bigint NOT NULL,
        PRIMARY KEY (gid, device)
    );
    CREATE INDEX members_device ON members(device);
    CREATE INDEX members_account ON members(account);
    CREATE TABLE log (
        gid bigint NOT NULL REFERENCES groups(gid),
        seq bigint NOT NULL,
        epoch bigint NOT NULL,
        data bytea NOT NULL,
        created_at bigint NOT NULL,
        PRIMARY KEY (gid, seq)
    );
    CREATE TABLE inbox (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        recipient bytea NOT NULL,
        gid bigint NOT NULL,
        data bytea NOT NULL,
        created_at bigint NOT NULL
    );
    CREATE INDEX inbox_recipient ON inbox(recipient, id);
    CREATE TABLE links (
        id bytea PRIMARY KEY,
        account bytea NOT NULL REFERENCES accounts(key),
        created_at bigint NOT NULL,
        expires_at bigint NOT NULL,
        device bytea,
        offer bytea,
        certificate bytea,
        bundle bytea
    );
    CREATE INDEX links_account ON links(account);
    CREATE INDEX links_expires ON links(expires_at);",
    // 1 -> 2: what a committing node tells the others (issue 29). The
    // NOTIFY payload names only the sending node and a row here, so a role
    // that may merely connect learns nothing by LISTENing and names nothing
    // by NOTIFYing; a node reads the row (hushd's role only may) and acts
    // on what the log and devices tables say. Rows are kept for
    // `limits::NOTICE_RETENTION` (the expiry deletes older ones).
    "CREATE TABLE notices (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        node bigint NOT NULL,
        kind text NOT NULL CHECK (kind IN ('m', 'w', 'r')),
        grp bytea CHECK (length(grp) BETWEEN 1 AND 255),
        seq bigint,
        device bytea CHECK (length(device) = 32),
        created_at timestamptz NOT NULL DEFAULT now()
    );",
    // 2 -> 3: each node numbers its notices itself (upwards from 1 in each
    // process), so it can authenticate the wake-up for a row before the
    // row exists; a wake-up names the node and its number.
    "ALTER TABLE notices ADD COLUMN nseq bigint;
    CREATE UNIQUE INDEX notices_wake ON notices(node, nseq);",
    // 3 -> 4: verifiable delivery. Each group's hash chain (`crate::chain`):
    // the head after its last message and the sequence number it started at
    // (NULL until the first message after this migration: a group's chain
    // starts there), and each message's head.
    "ALTER TABLE groups ADD COLUMN head bytea, ADD COLUMN chain_start bigint;
    ALTER TABLE log ADD COLUMN head bytea;",
    // 4 -> 5: files (issue 32). One row per blob (its bytes are files in
    // the blob directory every node shares): the group it was uploaded
    // for, the uploader, its size, how much of it is durable, and its
    // hash once complete.
    "CREATE TABLE blobs (
        id bytea PRIMARY KEY CHECK (length(id) = 16),
        gid bigint NOT NULL REFERENCES groups(gid),
        account bytea NOT NULL,
        device bytea NOT NULL,
        size bigint NOT NULL,
        received bigint NOT NULL,
        hash bytea,
        created_at bigint NOT NULL,
        completed_at bigint
    );
    CREATE INDEX blobs_account ON blobs(account);
    CREATE INDEX blobs_device ON blobs(device);",
    // 5 -> 6: disappearing messages (issue 33). Each group's timer (from
    // its verified group context), when each message and blob expires,
    // and for an expired message its digest in place of its bytes (its
    // link in the chain). Only messages with a timer enter the index.
    "ALTER TABLE groups ADD COLUMN disappear bigint NOT NULL DEFAULT 0;
    ALTER TABLE log ADD COLUMN expires_at bigint, ADD COLUMN gone bytea;
    CREATE INDEX log_expires ON log(expires_at) WHERE expires_at IS NOT NULL;
    ALTER TABLE blobs ADD COLUMN expires_at bigint;
    CREATE INDEX blobs_expires ON blobs(expires_at) WHERE expires_at IS NOT NULL;",
    // 6 -> 7: post-quantum groups (issue 35). Each KeyPackage's
    // ciphersuite (every one stored before is classic, 0x0001): a device
    // keeps packages, and a last-resort one, of each suite. And the
    // devices whose membership row went (issue 34): they never read the
    // log again through their account's membership.
    "ALTER TABLE key_packages ADD COLUMN suite integer NOT NULL DEFAULT 1;
    CREATE INDEX key_packages_suite ON key_packages(device, suite, last_resort);
    CREATE TABLE former_members (
        gid bigint NOT NULL REFERENCES groups(gid),
        device bytea NOT NULL,
        PRIMARY KEY (gid, device)
    );",
    // 7 -> 8: performance at scale (issue 37). A version that counts the
    // changes of each group's state: the writer takes a verdict prepared
    // off it while the version is the snapshot's, without reading the
    // state back to compare. The database advances it, on every write of
    // a state by any node: a node of the version before (during an
    // upgrade) writes states without knowing of it (red team, issue 37).
    "ALTER TABLE groups ADD COLUMN state_version bigint NOT NULL DEFAULT 0;
    CREATE FUNCTION hush_state_version() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE groups SET state_version = state_version + 1 WHERE gid = NEW.gid;
        RETURN NULL;
    END $$;
    CREATE TRIGGER group_states_version AFTER UPDATE OF state ON group_states
        FOR EACH ROW EXECUTE FUNCTION hush_state_version();",
    // 8 -> 9: a membership that starts or ends advances the group's state
    // version too, whichever node or process writes it (the operator's
    // removal ends a membership without a new state when the group does not
    // list the server's removal key): a cached roster, and a verdict, hold
    // only at one version (red team, issue 37). (Revocations advance it on
    // SQLite, where the writer also caches revoked members; on a shared
    // database it does not, see `Storage::SHARED`, and a trigger there
    // would only lock more group rows.)
    "CREATE FUNCTION hush_members_version() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE groups SET state_version = state_version + 1 WHERE gid = NEW.gid;
        RETURN NULL;
    END $$;
    CREATE TRIGGER members_version AFTER INSERT OR UPDATE OF left_at ON members
        FOR EACH ROW EXECUTE FUNCTION hush_members_version();",
];

/// Key of the advisory lock migrations hold ("hush" in ASCII).
const MIGRATION_LOCK: i64 = 0x6875_7368;

/// The schema version this build writes.
pub fn latest() -> i64 {
    i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX)
}

/// Brings the database to [`latest`]; refuses one from a newer hushd.
pub fn migrate(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS hush_schema (version integer NOT NULL)")?;
    let found = match tx.query_opt("SELECT version FROM hush_schema", &[])? {
        Some(row) => i64::from(row.get::<_, i32>(0)),
        None => {
            tx.execute("INSERT INTO hush_schema (version) VALUES (0)", &[])?;
            0
        }
    };
    if found > latest() {
        return Err(StoreError::SchemaTooNew { found, supported: latest() });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(usize::MAX)) {
        tx.batch_execute(sql)?;
        let next = i32::try_from(version + 1).unwrap_or(i32::MAX);
        tx.execute("UPDATE hush_schema SET version = $1", &[&next])?;
    }
    tx.commit()?;
    Ok(())
}
