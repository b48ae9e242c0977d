//! Error codes of responses, and the connection close codes.

/// Stable numeric error codes, declared once with their numbers. New
/// codes may appear; an unknown code decodes as [`ErrorCode::Other`] so old
/// clients still show the message.
macro_rules! error_codes {
    ($( $(#[$meta:meta])* $code:literal $name:ident, )*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$meta])* $name, )*
            /// A code this version does not know.
            Other(u16),
        }

        impl ErrorCode {
            pub fn to_u16(self) -> u16 {
                match self {
                    $( Self::$name => $code, )*
                    Self::Other(c) => c,
                }
            }

            pub fn from_u16(code: u16) -> Self {
                match code {
                    $( $code => Self::$name, )*
                    c => Self::Other(c),
                }
            }
        }
    };
}

error_codes! {
    /// The request frame could not be decoded.
    1 Malformed,
    /// The request frame exceeded [`super::MAX_REQUEST_FRAME`], or a value
    /// exceeded a limit.
    2 TooLarge,
    /// The request tag is not known to this server.
    3 UnknownRequest,
    /// The server failed; nothing was changed. Retry later.
    4 Internal,
    /// The server is shutting down. Reconnect later.
    5 ShuttingDown,
    /// Too many requests; `detail` is the number of milliseconds to wait.
    6 RateLimited,
    /// The request stream did not deliver its frame in time.
    7 Timeout,
    /// The key is not a registered account; only `Register` is allowed.
    10 NotRegistered,
    /// The server needs an invite token to register.
    11 InviteRequired,
    /// The invite token is not known to this server.
    12 InviteUnknown,
    /// The invite token has expired.
    13 InviteExpired,
    /// The invite token has no uses left.
    14 InviteUsedUp,
    /// Not a member of that group (or the group does not exist).
    20 NotMember,
    /// The commit is for an old epoch; `detail` is the current epoch.
    21 StaleEpoch,
    /// The commit or proposal failed MLS verification (the message says why).
    22 InvalidCommit,
    /// A storage quota would be exceeded.
    23 QuotaExceeded,
    /// A KeyPackage failed validation; `detail` is its index in the upload.
    24 InvalidKeyPackage,
    /// The account has no KeyPackage left to claim.
    25 NoKeyPackage,
    /// The MLS message is malformed or of a kind this request does not take.
    26 InvalidMessage,
    /// A group with this id already exists.
    27 GroupExists,
    /// A device certificate or an MLS leaf's credential is not valid
    /// (forged, for another account or device, or not matching the leaf's
    /// key); `detail` is the leaf index in the tree, or the package's index
    /// in an upload. The message says which leaf and why.
    28 InvalidCredential,
    /// The group has no GroupInfo yet (it was created by an older
    /// server); any member's next commit stores one.
    29 NoGroupInfo,
    /// This device was revoked, or its account removed by the
    /// operator; its key is refused for good.
    30 Revoked,
    /// No such link (or not yours to use).
    31 LinkUnknown,
    /// The link code expired.
    32 LinkExpired,
    /// The link code was already used.
    33 LinkUsed,
    /// The server no longer holds what was asked for (a chain head of a
    /// message every member read, or that expired).
    34 Gone,
    /// No such file, or not one the caller may fetch (a missing blob, a
    /// group the caller is not a member of, someone else's upload: all
    /// answered alike).
    35 NoSuchFile,
    /// An upload stream started at the wrong offset; `detail` is the
    /// offset the server holds (start there).
    36 UploadOffset,
    /// The device has as many unfinished uploads as it may; `detail` is
    /// that limit.
    37 TooManyUploads,
}

/// QUIC application close codes the server uses.
pub mod close {
    /// The peer closed normally.
    pub const NORMAL: u32 = 0;
    /// The server is shutting down.
    pub const SHUTTING_DOWN: u32 = 1;
    /// The key did not register before the deadline.
    pub const REGISTRATION_DEADLINE: u32 = 2;
    /// The peer broke the protocol (e.g. opened a stream it may not open).
    pub const PROTOCOL_VIOLATION: u32 = 3;
    /// Too many connections (in total or from this address).
    pub const BUSY: u32 = 4;
    /// The handshake did not yield an account key.
    pub const NOT_AUTHENTICATED: u32 = 5;
    /// The device was revoked or its account removed.
    pub const REVOKED: u32 = 6;

    /// A human description of a close code, for error messages.
    pub fn describe(code: u64) -> &'static str {
        match code {
            0 => "closed normally",
            1 => "the server is shutting down",
            2 => "this key is not registered and did not register in time",
            3 => "protocol violation",
            4 => "the server is busy (too many connections)",
            5 => "not authenticated",
            6 => "this device was revoked, or its account removed by the server's operator",
            _ => "unknown reason",
        }
    }
}
