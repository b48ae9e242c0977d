//! Request frames, declared once: each kind's tag, fields (with their
//! codecs and caps), log name, and whether a stranger may send it and
//! whether it writes. Encoding, decoding, the largest frame of a tag, the
//! stranger check and the read/write split all follow from the table.

use super::fields::{Bytes16, Bytes32, Bytes8, Codec, List, Opt, Raw, Text8, U16, U32, U64};
use super::{DecodeError, EncodeError, Reader, Writer, MAX_REQUEST_FRAME};
use crate::limits::{
    MAX_CERTIFICATE, MAX_GROUP_ID, MAX_INVITE_LEN, MAX_KEY_PACKAGE, MAX_KEY_PACKAGES, MAX_LINK_BUNDLE, MAX_LINK_OFFER,
    MAX_MLS_MESSAGE,
};

/// A group id field.
type GroupId = Bytes8<MAX_GROUP_ID>;
/// An MLS message field.
type Mls = Bytes32<MAX_MLS_MESSAGE>;
/// A link id.
type LinkId = Raw<16>;

/// Whether a flag list names `stranger` (or `read`).
macro_rules! has_flag {
    ($want:ident;) => { false };
    (stranger; stranger $($rest:ident)*) => { true };
    (read; read $($rest:ident)*) => { true };
    ($want:ident; $other:ident $($rest:ident)*) => { has_flag!($want; $($rest)*) };
}

/// Declares [`Request`] and everything that follows from its table.
/// `stranger`: a key that is not a registered device may send it; `read`:
/// it changes nothing (the engine runs it on its reader).
macro_rules! requests {
    ($(
        $(#[$meta:meta])*
        $tag:literal $name:ident $({ $($field:ident: $codec:ty = $label:literal),* $(,)? })? => $kind:literal $($flag:ident)*;
    )*) => {
        /// A request from client to server.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Request {
            $( $(#[$meta])* $name $({ $($field: <$codec as Codec>::Value),* })?, )*
        }

        impl Request {
            pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
                let mut w = Writer::new();
                match self {
                    $( Self::$name $({ $($field),* })? => {
                        w.u8($tag);
                        $($( <$codec as Codec>::write($field, &mut w, $label)?; )*)?
                    } )*
                }
                Ok(w.into_inner())
            }

            /// Never panics; a frame with bytes after its last field is
            /// malformed.
            pub fn decode(input: &[u8]) -> Result<Self, DecodeError> {
                let mut r = Reader::new(input);
                let request = match r.u8()? {
                    $( $tag => Self::$name $({ $($field: <$codec as Codec>::read(&mut r, $label)?),* })?, )*
                    tag => return Err(DecodeError::UnknownTag { what: "request", tag }),
                };
                r.finish()?;
                Ok(request)
            }

            /// The largest frame a request with this tag can be, from its
            /// fields' limits (capped at [`MAX_REQUEST_FRAME`]); `None` for
            /// an unknown tag. The server reads the tag first and reserves
            /// this much memory before reading the rest, so a small request
            /// can never hold a large buffer.
            pub fn max_frame(tag: u8) -> Option<usize> {
                let len: usize = match tag {
                    $( $tag => 1 $($( + <$codec as Codec>::MAX_LEN )*)?, )*
                    _ => return None,
                };
                Some(len.min(MAX_REQUEST_FRAME))
            }

            /// Whether a key that is not a registered device may send a
            /// request with this tag (`Register`, and the new device's half
            /// of linking). Anything else is refused unread.
            pub fn from_stranger(tag: u8) -> bool {
                match tag {
                    $( $tag => has_flag!(stranger; $($flag)*), )*
                    _ => false,
                }
            }

            /// Whether the request may change what the server stores (the
            /// engine runs it on its writer; the others on its reader).
            pub fn writes(&self) -> bool {
                match self {
                    $( Self::$name { .. } => !has_flag!(read; $($flag)*), )*
                }
            }

            /// A short name for logs (never the contents).
            pub fn kind(&self) -> &'static str {
                match self {
                    $( Self::$name { .. } => $kind, )*
                }
            }
        }
    };
}

impl Request {
    /// The tag of an upload head: the blob's bytes follow it on the stream
    /// (the server reads the head, then streams the rest to disk).
    pub const UPLOAD_TAG: u8 = 0x19;
    /// The tag of a download: its answers (errors too) are a `u32`
    /// length and the response frame, then the blob's bytes.
    pub const DOWNLOAD_TAG: u8 = 0x1a;
}

requests! {
    /// Make the connection's key a device of a new account, using an invite
    /// token when the server requires one. `certificate` is the device
    /// certificate for the connection's key. Harmless for a device that is
    /// already registered with the same certificate.
    0x01 Register { invite: Opt<Text8<MAX_INVITE_LEN>> = "invite", certificate: Bytes16<MAX_CERTIFICATE> = "certificate" }
        => "register" stranger;
    /// Who am I to the server?
    0x02 Status => "status" read;
    /// Round trip check.
    0x03 Ping { nonce: U64 = "nonce" } => "ping" read;
    /// Store KeyPackages for this account; `last_resort` marks one of them
    /// as the package handed out (and kept) when the others are gone.
    0x04 PublishKeyPackages {
        packages: List<Bytes32<MAX_KEY_PACKAGE>, MAX_KEY_PACKAGES> = "key packages",
        last_resort: Opt<U16> = "last resort",
    } => "publish-key-packages";
    /// Take one KeyPackage of each of `account`'s devices, to add that
    /// account to a group.
    0x05 ClaimKeyPackage { account: Raw<32> = "account" } => "claim-key-package";
    /// How many KeyPackages does this account have left?
    0x06 CountKeyPackages => "count-key-packages" read;
    /// Register a new group from its GroupInfo and ratchet tree.
    0x07 CreateGroup { group_info: Mls = "group info", ratchet_tree: Mls = "ratchet tree" } => "create-group";
    /// Post an MLS message to its group (the group id is read from the
    /// message), with the Welcome for the members a commit adds and, with
    /// every commit, the GroupInfo of the epoch it creates (what a member
    /// that cannot process the commit rejoins from).
    0x08 Send { message: Mls = "message", welcome: Opt<Mls> = "welcome", group_info: Opt<Mls> = "group info" }
        => "send";
    /// Messages of `group` after sequence `after`, at most `limit`.
    0x09 Fetch { group: GroupId = "group id", after: U64 = "after", limit: U16 = "limit" } => "fetch" read;
    /// Everything in `group` up to `seq` has been processed.
    0x0a Ack { group: GroupId = "group id", seq: U64 = "sequence" } => "ack";
    /// Welcomes waiting for this account.
    0x0b FetchWelcomes => "fetch-welcomes" read;
    /// The Welcome `id` has been processed; delete it.
    0x0c AckWelcome { id: U64 = "welcome id" } => "ack-welcome";
    /// The groups this account is (or was) in.
    0x0d ListGroups => "list-groups" read;
    /// The GroupInfo of `group`'s current epoch, to rejoin it by an
    /// external commit (group repair).
    0x0e FetchGroupInfo { group: GroupId = "group id" } => "fetch-group-info" read;
    /// Revoke a device of the caller's account (signed by the account key).
    0x0f RevokeDevice { revocation: Bytes16<MAX_CERTIFICATE> = "revocation" } => "revoke-device";
    /// The caller's account's devices.
    0x10 ListDevices => "list-devices" read;
    /// Open a one-time link for a new device of the caller's account.
    0x11 LinkOpen { link: LinkId = "link", expires_in: U32 = "expires in" } => "link-open";
    /// A new device's sealed keys, for the link (from a key that is not a
    /// device yet).
    0x12 LinkOffer { link: LinkId = "link", offer: Bytes16<MAX_LINK_OFFER> = "offer" } => "link-offer" stranger;
    /// The offer waiting on the caller's link, if any.
    0x13 LinkFetch { link: LinkId = "link" } => "link-fetch" read;
    /// The certificate for the offering key, and the sealed bundle for it.
    0x14 LinkAnswer {
        link: LinkId = "link",
        certificate: Bytes16<MAX_CERTIFICATE> = "certificate",
        bundle: Bytes32<MAX_LINK_BUNDLE> = "bundle",
    } => "link-answer";
    /// The answer to the caller's offer, if any.
    0x15 LinkResult { link: LinkId = "link" } => "link-result" stranger read;
    /// The server's signature over `group`'s chain head after message
    /// `seq` (a message the caller may read, or the last one).
    0x16 Head { group: GroupId = "group id", seq: U64 = "sequence" } => "head" read;
    /// Start an upload of a blob of `size` bytes (a padded size, see
    /// [`crate::files::Layout::of_blob`]) for `group`; the server answers
    /// with the blob's id.
    0x17 UploadOpen { group: GroupId = "group id", size: U64 = "size" } => "upload-open";
    /// How much of the caller's upload `id` the server holds durably.
    0x18 UploadStatus { id: Raw<16> = "blob id" } => "upload-status" read;
    /// The head of an upload stream: the blob's bytes from `offset` (what
    /// the server holds) follow this frame on the same stream, until the
    /// client finishes it. Not a request frame of its own.
    0x19 Upload { id: Raw<16> = "blob id", offset: U64 = "offset" } => "upload" read;
    /// The bytes of blob `id` from `offset`, `length` of them (0: to the
    /// end); answered by a [`super::Response::Blob`] head and the bytes.
    0x1a Download { id: Raw<16> = "blob id", offset: U64 = "offset", length: U64 = "length" } => "download" read;
    /// Drop the caller's unfinished upload `id` (it stops counting against
    /// the quota).
    0x1b UploadCancel { id: Raw<16> = "blob id" } => "upload-cancel";
    /// Take one KeyPackage of `suite` (a ciphersuite code point) of each
    /// of `account`'s devices, to add that account to a group of that
    /// suite.
    0x1c ClaimKeyPackages { account: Raw<32> = "account", suite: U16 = "ciphersuite" } => "claim-key-packages";
    /// How many KeyPackages of `suite` does this device have left?
    0x1d CountKeyPackagesOf { suite: U16 = "ciphersuite" } => "count-key-packages-of" read;
}
