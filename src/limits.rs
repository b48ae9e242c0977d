//! Every limit hush enforces, in one place.
//!
//! Hard caps (`MAX_*` without a config key) bound what the wire decoders
//! accept and are part of the protocol: a peer that exceeds them is sending
//! malformed frames. Defaults (`DEFAULT_*`) are the starting values of the
//! operator-tunable limits in [`crate::config::ServerConfig`]; each names the
//! attack it bounds. `SECURITY.md` carries the same table for operators.

use std::time::Duration;

/// Largest request frame the server reads from one stream. Bounds the memory
/// one stream can make the server allocate before anything is parsed.
pub const MAX_REQUEST_FRAME: usize = 1024 * 1024;

/// Largest request frame from a key that is not a registered device (a
/// `Register` with its invite and device certificate is about 1.1 KiB).
/// Strangers get nothing bigger, whatever the request.
pub const MAX_STRANGER_FRAME: usize = 2048;

/// QUIC connection receive window (bytes the peer may send before we read
/// any) until the connection's key is known to be a registered device. Every
/// connection starts with it, so a stranger can never make the server
/// buffer more than this per connection, read or unread.
pub const STRANGER_RECEIVE_WINDOW: u32 = 4096;

/// Receive window of a registered device's connection: room for two
/// largest requests in flight.
pub const DEVICE_RECEIVE_WINDOW: u32 = 2 * 1024 * 1024;

/// QUIC receive window of one stream: what a peer may send on a stream
/// before the server reads it (within the connection's window above). An
/// upload stream needs room for a few of the server's buffers
/// ([`BLOB_IO_BUFFER`]) to keep the link busy while it writes to disk.
pub const STREAM_RECEIVE_WINDOW: u32 = 1024 * 1024;

/// Bytes of request frames one connection may hold in memory at once. A
/// stream reserves [`crate::wire::Request::max_frame`] of its tag before
/// its body is read; a stream that cannot get it waits (at most the request
/// timeout, then error 6) and is never buffered meanwhile.
pub const REQUEST_BUDGET_PER_CONNECTION: usize = 2 * 1024 * 1024;

// The largest request must fit a connection's budget (and the smallest
// server budget, 2 MiB), or it could never be read.
const _: () = assert!(MAX_REQUEST_FRAME <= REQUEST_BUDGET_PER_CONNECTION);
const _: () = assert!(MAX_STRANGER_FRAME as u64 <= STRANGER_RECEIVE_WINDOW as u64);

/// Largest size of one leaf node (TLS encoding) in a KeyPackage, a new
/// group, an Add or an Update. hush's leaves are about 400 bytes; the cap
/// stops members from parking large blobs in the group's public state,
/// which every later handshake decodes and rewrites.
pub const MAX_LEAF_NODE: usize = 1024;

/// Devices a post-quantum group may hold (issue 35). Every X-Wing key is
/// 1216 bytes and every encapsulation 1120 (X25519's: 32 and 32): a group's
/// tree costs about 1.6 KiB per device in a GroupInfo (2.8 KiB once its
/// parent nodes fill), a commit up to 1.2 KiB per device it encrypts to,
/// and a Welcome carries the tree again. Measured (`hushd bench`): adding
/// 99 devices at once to a new group is a 289 KB commit, a 285 KB Welcome
/// and a 163 KB GroupInfo, 736 KB in one request; 128 devices keep every
/// request within [`MAX_REQUEST_FRAME`] and every field within
/// [`MAX_MLS_MESSAGE`]. Larger post-quantum groups need GroupInfos and
/// Welcomes without the tree (members fetching it from the server), which
/// hush does not do yet.
pub const MAX_PQ_GROUP_MEMBERS: u64 = 128;

/// Proposals a group may have pending (waiting for a commit) at once.
pub const MAX_PENDING_PROPOSALS: usize = 64;

/// Pending proposals a first device hands over with a group's state when
/// it links a new device: the members' ([`MAX_PENDING_PROPOSALS`]) and the
/// server's removals (one per leaf), with room for large groups.
pub const MAX_HANDOVER_PROPOSALS: usize = 1024;

/// Largest public state the server keeps for one group (as openmls holds
/// it, [`crate::mls::state_size`]: stored compacted, it takes about a
/// quarter of that, [`crate::compact`]); a commit
/// or proposal that would grow it beyond is refused with error 23. Bounds
/// what every later handshake of the group costs the writer.
pub const MAX_GROUP_STATE: usize = 8 * 1024 * 1024;

/// Largest response frame a client reads from one stream. Bounds what a
/// malicious or broken server can make a client allocate.
pub const MAX_RESPONSE_FRAME: usize = 4 * 1024 * 1024;

/// Largest push frame body (after the 4-byte length prefix).
pub const MAX_PUSH_FRAME: usize = 256 * 1024;

/// Longest invite token text accepted on the wire (tokens are 39 characters;
/// the slack allows for separators a user may paste).
pub const MAX_INVITE_LEN: usize = 64;

/// Largest device certificate carried in a request (certificates are
/// [`crate::auth::device::CERTIFICATE_LEN`] bytes; the slack lets a later
/// version grow without a new frame).
pub const MAX_CERTIFICATE: usize = 1024;

/// Devices one account may have at once (revoked ones do not count).
/// Bounds the KeyPackages one claim returns and the leaves one account
/// adds to a group.
pub const MAX_DEVICES_PER_ACCOUNT: usize = 16;

/// Devices one account may ever have, revoked ones included (what one
/// `Devices` response lists).
pub const MAX_DEVICES_EVER: usize = 64;

/// Largest sealed offer a new device sends through a link (its two public
/// keys, sealed with its salt: 96 bytes; slack for a later version).
pub const MAX_LINK_OFFER: usize = 256;

/// Largest sealed bundle a first device hands a new one: the account's
/// contacts, group names and each group's state (GroupInfo with its tree,
/// about 400 bytes a member), so the new device's first join can be walked
/// from it. As large as one request allows; groups whose state does not
/// fit are handed over without it (and the new device says so).
pub const MAX_LINK_BUNDLE: usize = MAX_REQUEST_FRAME - 4 * 1024;

// The link answer (certificate and bundle) is one request.
const _: () = assert!(1 + 16 + 2 + MAX_CERTIFICATE + 4 + MAX_LINK_BUNDLE <= MAX_REQUEST_FRAME);

/// Longest a link code may stay usable.
pub const MAX_LINK_LIFETIME: Duration = Duration::from_secs(15 * 60);

/// How long `hush device add` keeps its code usable.
pub const DEFAULT_LINK_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// Links one account may have open at once.
pub const MAX_OPEN_LINKS: u64 = 4;

/// Longest human-readable message in an error response.
pub const MAX_ERROR_MESSAGE: usize = 512;

/// Longest opaque MLS group identifier.
pub const MAX_GROUP_ID: usize = 255;

/// Largest ciphertext a push frame may carry inline (the wire format's cap,
/// what a client accepts); the server inlines only up to its own, smaller
/// `server::push::PUSH_INLINE_THRESHOLD` and announces larger messages
/// without their body, to be fetched.
pub const MAX_PUSH_CIPHERTEXT: usize = 64 * 1024;

/// Largest MLS message (commit, application message, Welcome, GroupInfo,
/// ratchet tree) carried in one field of a request.
pub const MAX_MLS_MESSAGE: usize = 480 * 1024;

/// Largest serialized KeyPackage.
pub const MAX_KEY_PACKAGE: usize = 16 * 1024;

/// KeyPackages in one upload, and held per account (the uploader must top
/// up, not hoard: bounds storage per account).
pub const MAX_KEY_PACKAGES: usize = 100;

/// Entries in one fetch response (messages or Welcomes).
pub const MAX_FETCH_ENTRIES: usize = 256;

/// Bytes of payload one fetch response carries at most; the client fetches
/// again for the rest. Below [`MAX_RESPONSE_FRAME`] with room for framing.
pub const FETCH_BYTE_BUDGET: usize = 3 * 1024 * 1024;

/// Group rosters the writer keeps in memory (the recipients of each
/// message); past this many the shortest of [`EVICTION_SAMPLE`] goes.
pub const MAX_CACHED_ROSTERS: usize = 4096;

/// Entries a full per-group cache compares to choose the one it drops
/// (the shortest: the cheapest to load again), so that a put costs the
/// same however large the cache is.
pub const EVICTION_SAMPLE: usize = 16;

/// Ratchet trees the reader keeps to hand out with GroupInfos that do
/// not carry them (each at most [`MAX_GROUP_STATE`]'s worth; in a group
/// of 1000 about 330 KB); past this many the shortest goes.
pub const MAX_CACHED_TREES: usize = 8;

/// Groups listed in one response.
pub const MAX_GROUPS_LISTED: usize = 1024;

/// The shortest retention a server may be configured with
/// (`retention_days` is at least 1). Clients never take a shorter one from
/// a server's `Status`: a gap in a group's chain is "expired" only for a
/// device that has not read the group for at least this long.
pub const MIN_RETENTION: Duration = Duration::from_secs(86_400);

/// KeyPackage claims one account may make in a burst; refilled at
/// [`CLAIM_REFILL`] per claim. Bounds how fast a member can drain others'
/// KeyPackages (RFC 9750 §5.2 asks the DS to resist exhaustion).
pub const CLAIM_BURST: u32 = 100;

/// Time to earn back one KeyPackage claim.
pub const CLAIM_REFILL: Duration = Duration::from_secs(6);

/// How long messages and Welcomes are kept at most, acknowledged or not.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Pushes queued for one connection; past this the connection gets one
/// `Resync` and must fetch. Bounds memory per slow reader.
pub const PUSH_QUEUE: usize = 256;

/// Queued pushes a connection's push task takes and writes at once (one
/// write of up to this many frames; they were queued already, so this
/// bounds nothing new).
pub const PUSH_WRITE_BATCH: usize = 64;

/// Threads that verify handshakes off the writer thread (one per core but
/// one, at least one, and never more than this): each holds one group's
/// decoded state at a time.
pub const MAX_VERIFIERS: usize = 8;

/// Commits and proposals one account may have waiting for a verifier or
/// in verification at once; more are refused with `RateLimited` (a client
/// commits to a group one at a time).
pub const MAX_HANDSHAKES_IN_VERIFICATION: usize = 8;

/// What such a refusal tells the client to wait.
pub const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);

/// Times a handshake that reached the writer without a verdict that holds
/// (its group changed since the snapshot, or had no snapshot of its epoch
/// yet) goes back to be verified off the writer again; after that it is
/// refused with `RateLimited` (the client retries), so the writer never
/// verifies what a member sends.
pub const MAX_SENT_BACK: u8 = 2;

/// Longest a commit or proposal waits in the queue for a verifier thread;
/// past that it is answered `RateLimited` unverified (when many accounts
/// flood junk handshakes at once, the queue drains at the rate of answers,
/// not of verifications, and an honest client's retry is not stuck behind
/// work nobody waits for any more).
pub const MAX_VERIFY_WAIT: Duration = Duration::from_secs(5);

/// Requests the writer thread folds into one SQLite transaction (group
/// commit): one fsync acknowledges them all.
pub const MAX_WRITE_BATCH: usize = 256;

/// Longest the writer holds a batch open for requests it expects (see
/// `server::engine`'s commit delay). Never longer than the last flush
/// either.
pub const MAX_COMMIT_DELAY: std::time::Duration = std::time::Duration::from_millis(2);

/// The writer holds a batch open for more requests only when it expects at
/// least this many (compare PostgreSQL's `commit_siblings`): fewer are as
/// likely to be unrelated arrivals, which waiting would only delay.
pub const COMMIT_SIBLINGS: usize = 4;

/// Commits the writer makes without a commit delay after one whose wait
/// ended before the requests it expected came (they are slower to come
/// back than a flush: waiting would only cost).
pub const COMMIT_DELAY_BACKOFF: u32 = 16;

/// Times a request that conflicted with another node's transaction (on a
/// shared PostgreSQL database) is run again before it fails.
pub const MAX_CONFLICT_RETRIES: u32 = 3;

/// Other nodes' wake-ups (PostgreSQL `NOTIFY`) a node holds before it gives
/// up on them and tells its connections to resync instead.
pub const NOTICE_QUEUE: usize = 4096;

/// Other nodes whose last authenticated wake-up a node remembers (to
/// refuse replays: each node numbers its wake-ups upwards). Each node
/// process is one; past this many, the longest silent is forgotten.
pub const MAX_WAKE_NODES: usize = 1024;

/// How far a wake-up's time may be from the listening node's clock. Older
/// ones are refused: their rows may be gone, so a restarted node could not
/// tell a replay from news. Half of [`NOTICE_RETENTION`], so nodes whose
/// clocks differ by less than this still hear each other (keep them on
/// NTP).
pub const WAKE_UP_FRESHNESS: Duration = Duration::from_secs(NOTICE_RETENTION.as_secs() / 2);

/// Wake-ups a node looks up in the `notices` table in one query.
pub const NOTICE_LOOKUP_BATCH: usize = 256;

/// How long a row of the `notices` table is kept for the nodes that were
/// woken up to read it (they read it at once; the expiry deletes older
/// rows). Bounds the table to what the nodes write in this long plus one
/// expiry interval.
pub const NOTICE_RETENTION: Duration = Duration::from_secs(10 * 60);

/// How long connecting to a PostgreSQL database may take.
pub const DATABASE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node on PostgreSQL waits at start for its `LISTEN`
/// connection before it serves anyway.
pub const LISTEN_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a node waits before reconnecting its lost `LISTEN` connection.
pub const LISTEN_RECONNECT_DELAY: Duration = Duration::from_secs(1);

/// Groups one account may be a current member of. Bounds what one account
/// can make the server store.
pub const DEFAULT_MAX_GROUPS_PER_ACCOUNT: u32 = 256;

/// Members per group (MLS leaves). Bounds the size of one group's public
/// state and the fan-out of one message.
pub const DEFAULT_MAX_MEMBERS_PER_GROUP: u32 = 1000;

/// Messages a group's log may hold (not yet acknowledged by everyone and not
/// yet expired). New application messages and proposals are refused beyond
/// it until members catch up; commits are still accepted, so a stalled
/// member can be removed.
pub const DEFAULT_MAX_LOG_PER_GROUP: u64 = 100_000;

/// Database size above which new data is refused with `QuotaExceeded`
/// (reads, acknowledgements and deletions keep working), so the disk does not
/// fill up.
pub const DEFAULT_MAX_DATABASE_MB: u64 = 10 * 1024;

/// Sustained requests per second per account (burst: twice this).
pub const DEFAULT_REQUESTS_PER_SECOND_PER_ACCOUNT: u32 = 100;

/// Sustained requests per second per source IP address, for connections whose
/// key is not an account yet (burst: twice this). Registered devices are
/// limited per account only, so strangers behind one NAT cannot lock a
/// member out.
pub const DEFAULT_REQUESTS_PER_SECOND_PER_IP: u32 = 400;

/// Rate-limit entries kept before idle ones are forgotten.
pub const RATE_LIMIT_ENTRIES: usize = 65_536;

/// Longest textual `hush://` address accepted from a user or a file.
pub const MAX_ADDRESS_LEN: usize = 512;

/// Largest configuration file read from the data directory.
pub const MAX_CONFIG_FILE: u64 = 64 * 1024;

/// How long a key that is not yet an account may stay connected without
/// registering. Bounds idle unauthenticated connections.
pub const DEFAULT_AUTH_DEADLINE: Duration = Duration::from_secs(10);

/// QUIC idle timeout: a connection silent this long is dropped.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one request stream may take to deliver its whole frame. Bounds
/// slow-loris streams that trickle bytes.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent connections, all addresses together.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// Concurrent connections from one IP address.
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: u32 = 32;

/// Concurrent connections from one IP address whose key is not (yet) an
/// account. Bounds what strangers can hold open while they try to register.
pub const DEFAULT_MAX_UNREGISTERED_PER_IP: u32 = 16;

/// Concurrent connections whose key is not (yet) a registered device, all
/// addresses together.
pub const DEFAULT_MAX_UNREGISTERED: u32 = 256;

/// Bytes of request frames all connections together may hold in memory at
/// once (MiB). Reserved before a stream's body is read.
pub const DEFAULT_MAX_REQUEST_MEMORY_MB: u32 = 64;

/// Concurrent request streams one connection may have open.
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Handshakes in progress above which new connection attempts must first
/// prove their source address (QUIC retry). Bounds handshake floods from
/// spoofed addresses.
pub const DEFAULT_RETRY_ABOVE_PENDING: u32 = 64;

/// Connection attempts quinn buffers before they are accepted or refused.
pub const DEFAULT_MAX_INCOMING: u32 = 256;

/// Bytes quinn buffers for one not-yet-accepted connection attempt.
pub const INCOMING_BUFFER_BYTES: u64 = 64 * 1024;

/// Bytes quinn buffers for all not-yet-accepted attempts together.
pub const INCOMING_BUFFER_BYTES_TOTAL: u64 = 8 * 1024 * 1024;

/// How long graceful shutdown waits for in-flight requests before closing.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Default number of registrations an invite allows.
pub const DEFAULT_INVITE_USES: u32 = 1;

/// Largest number of uses one invite may carry.
pub const MAX_INVITE_USES: u32 = 10_000;

/// Default lifetime of an invite.
pub const DEFAULT_INVITE_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long the client waits for a connection or a response.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Times the client retries a request the server refused with
/// `RateLimited`, after the wait the server named.
pub const CLIENT_RATE_LIMIT_RETRIES: u32 = 8;

/// Longest the client waits in all for one request to get past rate
/// limits before it reports the refusal.
pub const CLIENT_MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(30);

/// Keep-alive interval the client uses so an idle connection survives the
/// server's idle timeout.
pub const CLIENT_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Connections to the metrics listener open at once. When all are taken,
/// a new connection closes the oldest one that has not sent its request
/// yet (so idle connections cannot starve scrapes, issue 29); if every
/// one is being answered, the new one is dropped.
pub const MAX_METRICS_CONNECTIONS: usize = 8;

/// Bytes of one scrape's HTTP request head.
pub const MAX_METRICS_REQUEST: usize = 8 * 1024;

/// How long a connection to the metrics listener may take to send its
/// request head (a scraper sends it at once).
pub const METRICS_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long one scrape may take, request and answer.
pub const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

// ---- Files (issue 32, `crate::files`) ----

/// Plaintext bytes per AEAD chunk of an encrypted file. Part of the file
/// format: changing it makes old files unreadable.
pub const FILE_CHUNK: usize = 64 * 1024;

/// Smallest padded plaintext of a file: anything smaller is padded up, so
/// a blob never tells the server the size of a small file.
pub const MIN_PADDED_FILE: u64 = 4096;

/// Largest file name a file message carries (bytes of UTF-8); a received
/// name is cut to [`MAX_SAVED_NAME`] before it is used.
pub const MAX_FILE_NAME: usize = 1024;

/// Largest name a received file is saved under (bytes), its extension kept.
pub const MAX_SAVED_NAME: usize = 200;

/// Largest media type a file message carries.
pub const MAX_MEDIA_TYPE: usize = 127;

/// Largest blob (padded ciphertext) any server accepts: the hard cap of
/// the configurable `max_file_mb`.
pub const MAX_BLOB_SIZE: u64 = 64 * 1024 * 1024 * 1024;

/// Default largest blob a member may upload (`max_file_mb`): 1 GiB.
pub const DEFAULT_MAX_FILE_MB: u64 = 1024;

/// Default blob storage per account (`storage_quota_mb`): uploads in
/// progress count in full, from the moment they are opened.
pub const DEFAULT_STORAGE_QUOTA_MB: u64 = 4 * 1024;

/// Default uploads one device may have open (started, not finished) at
/// once (`uploads_per_device`).
pub const DEFAULT_UPLOADS_PER_DEVICE: u64 = 4;

/// Memory one transfer (upload or download) holds on the server: the
/// buffer it reads into and writes from, whatever the file's size.
pub const BLOB_IO_BUFFER: usize = 256 * 1024;

/// An upload is made durable (flushed, its progress recorded) at least
/// every this many bytes: what an interrupted upload resumes from.
pub const BLOB_SYNC_EVERY: u64 = 8 * 1024 * 1024;

/// An upload not finished this long after it was opened is deleted (and
/// stops counting against its account's quota).
pub const ABANDONED_UPLOAD_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How long an upload stream may go without receiving a byte before the
/// server gives up on it (the client resumes where it was acknowledged).
pub const BLOB_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Blob ids one expiry run deletes at most (the rest wait for the next).
pub const MAX_BLOBS_EXPIRED_PER_RUN: usize = 1024;

// ---- disappearing messages (issue 33) ----

/// Longest disappearing-message timer a group may set: a year. Longer is
/// what the server's retention is for.
pub const MAX_DISAPPEAR: Duration = Duration::from_secs(365 * 86_400);

/// How often the server deletes expired messages and files by default
/// (`sweep_seconds`): a message is gone from the server within this long
/// after its time is up (and is never served in between).
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// The longest `sweep_seconds` may be: expired messages are gone within a
/// minute at most.
pub const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Expired messages one sweep step deletes at most (the sweep repeats
/// until none is left, each step its own short write).
pub const MAX_MESSAGES_EXPIRED_PER_RUN: usize = 1024;

/// How often a running `hush chat` deletes the expired messages of its
/// history.
pub const CLIENT_PURGE_INTERVAL: Duration = Duration::from_secs(1);

/// Bytes of the server's online-key certificate
/// ([`crate::auth::online::OnlineCert`]: magic, identity, online key, two
/// times, signature), which signed chain heads and members' claims carry
/// as they are.
pub const ONLINE_CERT_LEN: usize = 8 + 32 + 32 + 8 + 8 + 64;

/// Longest line `hush jsonrpc` and `hush daemon` read (one request); a
/// longer one is answered with an Invalid Request error and skipped
/// without being held.
pub const MAX_RPC_LINE: usize = 1024 * 1024;

/// Responses and notifications waiting for one JSON-RPC client to read
/// them. Past this, notifications for that client are dropped (and
/// counted in a `dropped` notification once it reads again); responses
/// wait, and so does that client's next request.
pub const RPC_CLIENT_QUEUE: usize = 256;

/// JSON-RPC clients one `hush daemon` serves at once.
pub const MAX_RPC_CLIENTS: usize = 16;

/// How long a notification waits for room in a JSON-RPC client's queue
/// before that client counts as not reading: from then on notifications
/// for it are dropped (and counted) without waiting, until its queue has
/// room again. A burst larger than the queue thus reaches every client
/// that reads, and a client that does not delays the others once, by
/// this much.
pub const RPC_STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// Bytes of answers and notifications waiting for one JSON-RPC client
/// (with [`RPC_CLIENT_QUEUE`] items): a message can be large, so the
/// count of items alone bounds nothing.
pub const RPC_CLIENT_QUEUE_BYTES: usize = 8 * 1024 * 1024;
