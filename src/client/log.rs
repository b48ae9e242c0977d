//! Reading one group's log: the fetch → process → acknowledge loop that
//! the app, the tests and the fuzzer all run, written once and sans-IO.
//!
//! A [`GroupLog`] holds a member's cursor in one group and the sequences it
//! sent itself (which it cannot decrypt and skips). It says which request
//! fetches the next page ([`GroupLog::fetch`]), checks a page before
//! anything of it is used ([`GroupLog::check`]: the server cannot make a
//! reader go backwards, repeat itself or read past the end it announced),
//! processes each message with the member ([`GroupLog::read`], which also
//! says when the member can no longer follow the group and must rejoin)
//! and says what to acknowledge ([`GroupLog::ack`]: everything up to the
//! cursor, our own messages included, or the server keeps them for us). [`GroupLog::read_all`]
//! runs the loop over any request function; [`GroupLog::read_all_over`]
//! over a [`Connection`].

use std::collections::BTreeSet;

use openmls_traits::OpenMlsProvider;

use super::mls::{Member, MlsError, Received, Unprocessed};
use super::{ClientError, Connection};
use crate::wire::{Logged, Request, Response};

/// What reading one message did.
#[derive(Debug)]
pub enum Read {
    /// Processed.
    Received { seq: u64, received: Received },
    /// One of ours: not processed (a member cannot decrypt what it sent).
    Own { seq: u64 },
    /// Expired: the group's disappearing timer deleted it before this
    /// member read it (only its place in the chain is left).
    Gone { seq: u64 },
    /// Could not be processed. `stuck`: this member can no longer follow
    /// the group (a commit of its epoch, a message of a later epoch, or no
    /// state at all) and must rejoin it ([`Member::resync`]); otherwise the
    /// message is simply lost to it (e.g. of an epoch it has left behind).
    Failed { seq: u64, error: MlsError, cause: Option<Unprocessed>, stuck: bool },
}

impl Read {
    pub fn seq(&self) -> u64 {
        match self {
            Self::Received { seq, .. } | Self::Own { seq } | Self::Gone { seq } | Self::Failed { seq, .. } => *seq,
        }
    }

    /// Whether the member must rejoin before it reads on.
    pub fn stuck(&self) -> bool {
        matches!(self, Self::Failed { stuck: true, .. })
    }
}

/// What was received in `reads`, in order (own messages left out), or the
/// first message that failed, with its sequence.
pub fn all_received(reads: Vec<Read>) -> Result<Vec<Received>, (u64, MlsError)> {
    let mut out = Vec::with_capacity(reads.len());
    for r in reads {
        match r {
            Read::Received { received, .. } => out.push(received),
            Read::Own { .. } | Read::Gone { .. } => {}
            Read::Failed { seq, error, .. } => return Err((seq, error)),
        }
    }
    Ok(out)
}

/// A page the server should not have sent; nothing of it is used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PageError {
    #[error("it sent message {seq} after {previous} in a log it said ends at {bound}")]
    OutOfOrder { seq: u64, previous: u64, bound: u64 },
    #[error("it said more messages remain but sent none")]
    EmptyButMore,
    #[error("it answered a fetch with a {0} response")]
    Unexpected(&'static str),
}

/// Why [`GroupLog::read_all_over`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("the server misbehaved: {0}")]
    Page(#[from] PageError),
}

/// One member's reading position in one group.
#[derive(Debug, Clone)]
pub struct GroupLog {
    group: Vec<u8>,
    cursor: u64,
    /// Up to where the server was told (our own messages move the cursor
    /// without a fetch, and must be acknowledged too).
    acked: u64,
    own: BTreeSet<u64>,
}

impl GroupLog {
    /// Reading `group` after sequence `cursor` (0: from the start; a member
    /// added later starts after the commit that added it).
    pub fn new(group: &[u8], cursor: u64) -> Self {
        Self { group: group.to_vec(), cursor, acked: cursor, own: BTreeSet::new() }
    }

    pub fn group(&self) -> &[u8] {
        &self.group
    }

    /// The last sequence read (or skipped).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Remembers that this member sent `seq`, so it is skipped when it
    /// comes back; a message sent right after the cursor moves it.
    pub fn sent(&mut self, seq: u64) {
        if seq == self.cursor.saturating_add(1) {
            self.cursor = seq;
        } else if seq > self.cursor {
            self.own.insert(seq);
        }
    }

    /// Moves the cursor to `seq` (past a rejoin: what came before it is
    /// lost to this member).
    pub fn skip_to(&mut self, seq: u64) {
        self.cursor = self.cursor.max(seq);
        self.own = self.own.split_off(&self.cursor.saturating_add(1));
    }

    /// The request for the next page.
    pub fn fetch(&self) -> Request {
        Request::Fetch { group: self.group.clone(), after: self.cursor, limit: 0 }
    }

    /// The request acknowledging everything up to the cursor, if there is
    /// anything new to acknowledge (and from then on, it counts as sent).
    pub fn ack(&mut self) -> Option<Request> {
        (self.cursor > self.acked).then(|| {
            self.acked = self.cursor;
            Request::Ack { group: self.group.clone(), seq: self.cursor }
        })
    }

    /// Checks a page before any of it is used: sequences strictly
    /// increasing after the cursor and at most `bound` (the end of the log
    /// the server announced, if it did), and not empty when more remain.
    pub fn check(&self, messages: &[Logged], more: bool, bound: Option<u64>) -> Result<(), PageError> {
        if more && messages.is_empty() {
            return Err(PageError::EmptyButMore);
        }
        let mut previous = self.cursor;
        for Logged { seq, .. } in messages {
            if *seq <= previous || bound.is_some_and(|b| *seq > b) {
                return Err(PageError::OutOfOrder { seq: *seq, previous, bound: bound.unwrap_or(u64::MAX) });
            }
            previous = *seq;
        }
        Ok(())
    }

    /// Processes the message at `seq` (after [`GroupLog::check`]) with
    /// `member` and moves the cursor past it.
    pub fn read<P: OpenMlsProvider>(&mut self, member: &mut Member<P>, seq: u64, bytes: &[u8]) -> Read {
        self.cursor = self.cursor.max(seq);
        if self.own.remove(&seq) {
            return Read::Own { seq };
        }
        match member.receive(&self.group, bytes) {
            Ok(received) => Read::Received { seq, received },
            Err(error) => {
                let ours = member.epoch(&self.group);
                let cause = member.unprocessed(&self.group, bytes);
                let stuck = cause.is_some_and(|c| ours.is_none_or(|o| c.epoch > o || (c.commit && c.epoch == o)));
                Read::Failed { seq, error, cause, stuck }
            }
        }
    }

    /// Reads pages through `call` (fetch, then acknowledge each page) until
    /// the log ends or a message leaves the member stuck (the last
    /// [`Read`]; rejoin, [`GroupLog::skip_to`] the rejoining commit, and
    /// read on).
    pub fn read_all<P: OpenMlsProvider>(
        &mut self,
        member: &mut Member<P>,
        mut call: impl FnMut(Request) -> Response,
    ) -> Result<Vec<Read>, PageError> {
        let mut out = Vec::new();
        loop {
            let (messages, more) = match call(self.fetch()) {
                Response::Messages { messages, more, .. } => (messages, more),
                other => return Err(PageError::Unexpected(other.kind())),
            };
            let stuck = self.page(member, &messages, more, None, &mut out)?;
            if let Some(ack) = self.ack() {
                call(ack);
            }
            if stuck || !more {
                return Ok(out);
            }
        }
    }

    /// [`GroupLog::read_all`] over a connection, within `bound` if the
    /// server announced the end of the log.
    pub async fn read_all_over<P: OpenMlsProvider>(
        &mut self,
        member: &mut Member<P>,
        conn: &Connection,
        bound: Option<u64>,
    ) -> Result<Vec<Read>, ReadError> {
        let mut out = Vec::new();
        loop {
            let (messages, more) = conn.fetch(&self.group, self.cursor, 0).await?;
            let stuck = self.page(member, &messages, more, bound, &mut out)?;
            if let Some(Request::Ack { seq, .. }) = self.ack() {
                conn.ack(&self.group, seq).await?;
            }
            if stuck || !more {
                return Ok(out);
            }
        }
    }

    /// Checks and reads one page; true if it stopped at a stuck message.
    fn page<P: OpenMlsProvider>(
        &mut self,
        member: &mut Member<P>,
        messages: &[Logged],
        more: bool,
        bound: Option<u64>,
        out: &mut Vec<Read>,
    ) -> Result<bool, PageError> {
        self.check(messages, more, bound)?;
        for m in messages {
            if m.gone.is_some() {
                self.cursor = self.cursor.max(m.seq);
                self.own.remove(&m.seq);
                out.push(Read::Gone { seq: m.seq });
                continue;
            }
            let read = self.read(member, m.seq, &m.data);
            let stuck = read.stuck();
            out.push(read);
            if stuck {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_that_goes_back_repeats_or_passes_the_announced_end_is_refused() {
        let log = GroupLog::new(b"g", 5);
        let m = |seq: u64| Logged::new(seq, None, vec![]);
        assert!(log.check(&[m(6), m(8)], false, Some(8)).is_ok());
        assert!(matches!(log.check(&[m(5)], false, None), Err(PageError::OutOfOrder { seq: 5, previous: 5, .. })));
        assert!(matches!(log.check(&[m(7), m(7)], false, None), Err(PageError::OutOfOrder { seq: 7, .. })));
        assert!(matches!(log.check(&[m(9)], false, Some(8)), Err(PageError::OutOfOrder { seq: 9, bound: 8, .. })));
        assert_eq!(log.check(&[], true, None), Err(PageError::EmptyButMore));
        assert!(log.check(&[], false, None).is_ok());
    }

    #[test]
    fn own_messages_move_the_cursor_or_are_skipped_and_are_acknowledged_too() {
        let mut log = GroupLog::new(b"g", 3);
        assert!(log.ack().is_none(), "nothing new to acknowledge");
        log.sent(4);
        assert_eq!(log.cursor(), 4, "the next message was ours: nothing to fetch for it");
        log.sent(7);
        assert_eq!(log.cursor(), 4);
        assert_eq!(log.ack(), Some(Request::Ack { group: b"g".to_vec(), seq: 4 }));
        assert!(log.ack().is_none());
        log.skip_to(9);
        assert_eq!(log.cursor(), 9);
        assert_eq!(log.fetch(), Request::Fetch { group: b"g".to_vec(), after: 9, limit: 0 });
    }
}
