//! `Batch`: the one hand-off type between the request side and the write side.
//!
//! This file owns the event *as stored* ([`Row`]), the compact buffer rows wait
//! in ([`Buffer`]: fixed fields inline, strings in one byte arena, hourly
//! counters updated in place), and [`Batch`], the buffers of one flush with
//! their counters merged. The request side fills buffers (one per shard) and
//! the coordinator moves them into a batch without copying; the write side
//! (writer, COPY encoder, spool) reads a batch only through [`Batch::rows`]
//! and [`Batch::aggregates`], so a change to how shards keep their buffers
//! never reaches the database code. Nothing here does I/O.

use std::collections::HashMap;

use uuid::Uuid;

/// Milliseconds in one hour: aggregates are bucketed by `timestamp_ms / HOUR_MS`.
pub const HOUR_MS: i64 = 3_600_000;

/// The hasher for aggregate keys: fast, and seeded per process so that
/// client-chosen UUIDs cannot be crafted into collisions.
pub type KeyHasher = foldhash::fast::RandomState;

/// Which endpoint an event arrived on; stored as `events.event_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum EventKind {
    Impression = 0,
    Click = 1,
}

impl EventKind {
    /// The value written to `events.event_type`, as the Node service wrote it.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Impression => "impression",
            EventKind::Click => "click",
        }
    }

    /// The inverse of `kind as u8` (the spool's encoding).
    pub fn from_u8(b: u8) -> Option<EventKind> {
        match b {
            0 => Some(EventKind::Impression),
            1 => Some(EventKind::Click),
            _ => None,
        }
    }
}

/// Why an event is invalid traffic (stored in `events.invalid_reason`; `None`
/// is a valid event). The order is the order of the checks: an event gets the
/// first reason that applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum InvalidReason {
    /// No `User-Agent`, or an empty one.
    NoUserAgent = 1,
    /// A known bot, spider or HTTP library.
    BotUa = 2,
    /// A prefetch or prerender (`Sec-Purpose`, `Purpose`, `X-Moz`, `X-Purpose`).
    Prefetch = 3,
    /// The client address is in `IP_EXCLUDE_FILE`.
    IpExcluded = 4,
    /// The same click again within `CLICK_DEDUP_WINDOW_S`.
    DuplicateClick = 5,
}

impl InvalidReason {
    pub const ALL: [InvalidReason; 5] = [
        InvalidReason::NoUserAgent,
        InvalidReason::BotUa,
        InvalidReason::Prefetch,
        InvalidReason::IpExcluded,
        InvalidReason::DuplicateClick,
    ];

    /// The value in `events.invalid_reason` and the `reason` label in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::NoUserAgent => "no_user_agent",
            InvalidReason::BotUa => "bot_ua",
            InvalidReason::Prefetch => "prefetch",
            InvalidReason::IpExcluded => "ip_excluded",
            InvalidReason::DuplicateClick => "duplicate_click",
        }
    }

    /// The inverse of `reason as u8` (the spool's encoding; 0 is valid).
    pub fn from_u8(b: u8) -> Option<Option<InvalidReason>> {
        Some(match b {
            0 => None,
            1 => Some(InvalidReason::NoUserAgent),
            2 => Some(InvalidReason::BotUa),
            3 => Some(InvalidReason::Prefetch),
            4 => Some(InvalidReason::IpExcluded),
            5 => Some(InvalidReason::DuplicateClick),
            _ => return None,
        })
    }

    /// Position in [`InvalidReason::ALL`].
    pub fn index(self) -> usize {
        self as usize - 1
    }
}

/// An hourly aggregate bucket before the account is known (the writer
/// resolves campaign → account).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggKey {
    pub campaign_id: Uuid,
    pub ad_unit_id: Uuid,
    /// Hours since the unix epoch (`timestamp_ms.div_euclid(HOUR_MS)`).
    pub hour: i64,
}

/// Counts of one aggregate bucket: billed (net) and invalid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub impressions: u64,
    pub clicks: u64,
    pub invalid_impressions: u64,
    pub invalid_clicks: u64,
}

impl Counts {
    pub fn add(&mut self, other: Counts) {
        self.impressions += other.impressions;
        self.clicks += other.clicks;
        self.invalid_impressions += other.invalid_impressions;
        self.invalid_clicks += other.invalid_clicks;
    }

    /// Takes one row's count back out (a row found to be a duplicate at write time).
    fn uncount(&mut self, row: &Row<'_>) {
        let mut one = Counts::default();
        one.count(row);
        self.impressions = self.impressions.saturating_sub(one.impressions);
        self.clicks = self.clicks.saturating_sub(one.clicks);
        self.invalid_impressions = self
            .invalid_impressions
            .saturating_sub(one.invalid_impressions);
        self.invalid_clicks = self.invalid_clicks.saturating_sub(one.invalid_clicks);
    }

    fn count(&mut self, row: &Row<'_>) {
        let invalid = row.invalid.is_some() && row.filtered;
        match (row.kind, invalid) {
            (EventKind::Impression, false) => self.impressions += 1,
            (EventKind::Click, false) => self.clicks += 1,
            (EventKind::Impression, true) => self.invalid_impressions += 1,
            (EventKind::Click, true) => self.invalid_clicks += 1,
        }
    }
}

/// One event as it is stored: the write side's view of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Row<'a> {
    pub kind: EventKind,
    pub ad_unit_id: Uuid,
    pub campaign_id: Uuid,
    pub creative_id: Uuid,
    /// Event time, unix milliseconds.
    pub timestamp_ms: i64,
    /// Receipt time, unix milliseconds.
    pub received_ms: i64,
    pub page_url: &'a str,
    pub user_agent: Option<&'a str>,
    /// Why the event is invalid traffic, if it is.
    pub invalid: Option<InvalidReason>,
    /// True when an invalid event counts in the invalid columns
    /// (`IVT_FILTER=on`); false counts it as billed, as the Node service did.
    pub filtered: bool,
    /// The client's idempotency key (`event_id`), if it sent one.
    pub event_id: Option<Uuid>,
}

impl Row<'_> {
    /// The aggregate bucket this row counts in.
    pub fn key(&self) -> AggKey {
        AggKey {
            campaign_id: self.campaign_id,
            ad_unit_id: self.ad_unit_id,
            hour: self.timestamp_ms.div_euclid(HOUR_MS),
        }
    }

    /// Memory a row costs while buffered (its fixed part, its strings and a
    /// share of the aggregate table): what the memory cap counts.
    pub fn cost(&self) -> u64 {
        (std::mem::size_of::<Stored>()
            + 48
            + self.page_url.len()
            + self.user_agent.map_or(0, str::len)) as u64
    }
}

/// Where a string lives in a buffer's arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct TextRef {
    off: u32,
    len: u32,
}

impl TextRef {
    const NONE: TextRef = TextRef {
        off: 0,
        len: u32::MAX,
    };
}

/// A row with its strings in the arena.
#[derive(Clone, Copy, Debug)]
struct Stored {
    ad_unit_id: Uuid,
    campaign_id: Uuid,
    creative_id: Uuid,
    timestamp_ms: i64,
    received_ms: i64,
    page_url: TextRef,
    user_agent: TextRef,
    kind: EventKind,
    invalid: Option<InvalidReason>,
    filtered: bool,
    event_id: Option<Uuid>,
}

/// A buffer's string arena is addressed with 32-bit offsets; past 4 GiB it
/// refuses rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer string arena is full")]
pub struct ArenaFull;

/// Rows in compact form plus their hourly counters.
#[derive(Debug, Default)]
pub struct Buffer {
    rows: Vec<Stored>,
    arena: Vec<u8>,
    aggregates: HashMap<AggKey, Counts, KeyHasher>,
    /// Receipt time of the earliest event (0 when empty).
    first_received_ms: i64,
    /// Sum of [`Row::cost`] over the rows.
    counted_bytes: u64,
}

impl Buffer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty buffer with room for `rows` rows and `keys` aggregate keys.
    pub fn with_capacity(rows: usize, keys: usize) -> Self {
        Buffer {
            rows: Vec::with_capacity(rows),
            arena: Vec::with_capacity(rows * 80),
            aggregates: HashMap::with_capacity_and_hasher(keys, KeyHasher::default()),
            first_received_ms: 0,
            counted_bytes: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The memory-cap estimate of this buffer's rows (see [`Row::cost`]).
    pub fn counted_bytes(&self) -> u64 {
        self.counted_bytes
    }

    /// Appends one row: its fixed fields, its strings, and its aggregate count.
    pub fn push(&mut self, row: &Row<'_>) -> Result<(), ArenaFull> {
        let need = row.page_url.len() + row.user_agent.map_or(0, str::len);
        if self.arena.len() + need >= u32::MAX as usize {
            return Err(ArenaFull);
        }
        if self.rows.is_empty() || row.received_ms < self.first_received_ms {
            self.first_received_ms = row.received_ms;
        }
        self.counted_bytes += row.cost();
        let page_url = self.store(Some(row.page_url));
        let user_agent = self.store(row.user_agent);
        self.rows.push(Stored {
            ad_unit_id: row.ad_unit_id,
            campaign_id: row.campaign_id,
            creative_id: row.creative_id,
            timestamp_ms: row.timestamp_ms,
            received_ms: row.received_ms,
            page_url,
            user_agent,
            kind: row.kind,
            invalid: row.invalid,
            filtered: row.filtered,
            event_id: row.event_id,
        });
        self.aggregates.entry(row.key()).or_default().count(row);
        Ok(())
    }

    fn store(&mut self, s: Option<&str>) -> TextRef {
        match s {
            None => TextRef::NONE,
            Some(s) => {
                // `push` checked that the arena stays under 4 GiB.
                let off = self.arena.len() as u32;
                self.arena.extend_from_slice(s.as_bytes());
                TextRef {
                    off,
                    len: s.len() as u32,
                }
            }
        }
    }

    fn text(&self, r: TextRef) -> Option<&str> {
        if r == TextRef::NONE {
            return None;
        }
        let bytes = self
            .arena
            .get(r.off as usize..(r.off as usize + r.len as usize))?;
        // Only `&str` ever goes into the arena, at these exact boundaries.
        std::str::from_utf8(bytes).ok()
    }

    fn row(&self, s: &Stored) -> Row<'_> {
        Row {
            kind: s.kind,
            ad_unit_id: s.ad_unit_id,
            campaign_id: s.campaign_id,
            creative_id: s.creative_id,
            timestamp_ms: s.timestamp_ms,
            received_ms: s.received_ms,
            page_url: self.text(s.page_url).unwrap_or(""),
            user_agent: self.text(s.user_agent),
            invalid: s.invalid,
            filtered: s.filtered,
            event_id: s.event_id,
        }
    }

    /// Every row, in the order they were pushed.
    pub fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(|s| self.row(s))
    }

    /// The hourly counters of the rows.
    pub fn aggregates(&self) -> impl Iterator<Item = (&AggKey, &Counts)> {
        self.aggregates.iter()
    }
}

/// Something to run once every batch of one flush is durable (committed,
/// spooled or quarantined): in durable mode, letting the journal drop the
/// segments that held those events. Shared by the flush's chunks; the write
/// side calls [`Settle::done`] once per chunk, and never for a chunk it
/// could not make durable (the journal then keeps its events).
#[derive(Clone)]
pub struct Settle(std::sync::Arc<SettleInner>);

struct SettleInner {
    remaining: std::sync::atomic::AtomicUsize,
    hook: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl Settle {
    /// Runs `hook` after `parts` calls of [`Settle::done`].
    pub fn new(parts: usize, hook: impl FnOnce() + Send + 'static) -> Settle {
        Settle(std::sync::Arc::new(SettleInner {
            remaining: std::sync::atomic::AtomicUsize::new(parts.max(1)),
            hook: std::sync::Mutex::new(Some(Box::new(hook))),
        }))
    }

    /// One part is durable.
    pub fn done(&self) {
        use std::sync::atomic::Ordering::AcqRel;
        if self.0.remaining.fetch_sub(1, AcqRel) == 1 {
            let hook = self.0.hook.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(hook) = hook {
                hook();
            }
        }
    }
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settle")
    }
}

/// Events taken from all shards at one flush (or read back from the spool),
/// ready to be written in one transaction.
#[derive(Debug)]
pub struct Batch {
    /// Unique per batch: the exactly-once ledger key (`ingest_batches.id`).
    pub id: Uuid,
    parts: Vec<Buffer>,
    /// Merged counters of every row in `parts`.
    aggregates: HashMap<AggKey, Counts, KeyHasher>,
    events: usize,
    oldest_received_ms: i64,
    settle: Option<Settle>,
}

impl Batch {
    /// Merges buffers into one batch under a new id. Empty buffers are dropped.
    pub fn from_parts(parts: Vec<Buffer>) -> Batch {
        Batch::restore(Uuid::new_v4(), parts)
    }

    /// Rebuilds a batch under its original id (spool replay: the id is what
    /// makes a second commit of the same events a no-op).
    pub fn restore(id: Uuid, mut parts: Vec<Buffer>) -> Batch {
        parts.retain(|p| !p.is_empty());
        let events = parts.iter().map(Buffer::len).sum();
        let oldest_received_ms = parts.iter().map(|p| p.first_received_ms).min().unwrap_or(0);
        // Start from the largest table and fold the others into it.
        let largest = parts
            .iter()
            .enumerate()
            .max_by_key(|(_, p)| p.aggregates.len())
            .map(|(i, _)| i);
        let mut aggregates = match largest {
            Some(i) => std::mem::take(&mut parts[i].aggregates),
            None => HashMap::with_hasher(KeyHasher::default()),
        };
        for part in parts.iter_mut() {
            for (k, c) in std::mem::take(&mut part.aggregates) {
                aggregates.entry(k).or_default().add(c);
            }
        }
        Batch {
            id,
            parts,
            aggregates,
            events,
            oldest_received_ms,
            settle: None,
        }
    }

    /// Attaches what to tell once this batch is durable.
    pub fn set_settle(&mut self, settle: Settle) {
        self.settle = Some(settle);
    }

    /// Takes the batch's [`Settle`], to call once it is durable.
    pub fn take_settle(&mut self) -> Option<Settle> {
        self.settle.take()
    }

    /// Number of events in the batch.
    pub fn len(&self) -> usize {
        self.events
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Receipt time (unix ms) of the oldest event in the batch.
    pub fn oldest_received_ms(&self) -> i64 {
        self.oldest_received_ms
    }

    /// Every row of the batch.
    pub fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.parts.iter().flat_map(Buffer::rows)
    }

    /// The merged hourly counters: one entry per (campaign, ad unit, hour).
    pub fn aggregates(&self) -> impl Iterator<Item = (&AggKey, &Counts)> {
        self.aggregates.iter()
    }

    /// The merged hourly counters without the rows whose position (in
    /// [`Batch::rows`] order) is in `skip` (sorted): what the batch counts once
    /// the rows the `event_ids` arbiter found to be repeats are left out.
    pub fn aggregates_without(&self, skip: &[usize]) -> HashMap<AggKey, Counts, KeyHasher> {
        let mut out = self.aggregates.clone();
        let mut skip = skip.iter().peekable();
        for (i, row) in self.rows().enumerate() {
            if skip.peek().is_none() {
                break;
            }
            if skip.next_if(|&&s| s == i).is_some() {
                if let Some(c) = out.get_mut(&row.key()) {
                    c.uncount(&row);
                }
            }
        }
        out.retain(|_, c| *c != Counts::default());
        out
    }

    /// Number of distinct aggregate keys.
    pub fn aggregate_keys(&self) -> usize {
        self.aggregates.len()
    }

    /// Distinct campaigns in the batch, sorted.
    pub fn campaigns(&self) -> Vec<Uuid> {
        let mut v: Vec<Uuid> = self.aggregates.keys().map(|k| k.campaign_id).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The memory-cap estimate of the batch's events (what admission counts).
    pub fn counted_bytes(&self) -> u64 {
        self.parts.iter().map(Buffer::counted_bytes).sum()
    }

    /// Copies `rows` into one buffer under `id`.
    fn of_rows<'a>(id: Uuid, rows: impl Iterator<Item = Row<'a>>) -> Batch {
        let mut b = Buffer::new();
        for r in rows {
            // The rows come from buffers that held them, so they fit again.
            let _ = b.push(&r);
        }
        Batch::restore(id, vec![b])
    }

    /// The batch as two halves (the first `len / 2` rows, and the rest) whose
    /// ids are derived from this one: the same batch always splits into the
    /// same halves with the same ids, so each half is exactly-once in the
    /// ledger however often the split is repeated. `None` for one row or none.
    pub fn halves(&self) -> Option<(Batch, Batch)> {
        if self.events < 2 {
            return None;
        }
        let mid = self.events / 2;
        let first = Batch::of_rows(Uuid::new_v5(&self.id, b"0"), self.rows().take(mid));
        let second = Batch::of_rows(Uuid::new_v5(&self.id, b"1"), self.rows().skip(mid));
        Some((first, second))
    }

    /// This batch as batches of at most `max_rows` rows (itself when it is
    /// small enough; else copies under new ids, for live batches that have
    /// not been written or spooled yet).
    pub fn into_chunks(self, max_rows: usize) -> Vec<Batch> {
        let max_rows = max_rows.max(1);
        if self.events <= max_rows {
            return vec![self];
        }
        let mut out = Vec::with_capacity(self.events.div_ceil(max_rows));
        let mut rows = self.rows().peekable();
        while rows.peek().is_some() {
            out.push(Batch::of_rows(Uuid::new_v4(), rows.by_ref().take(max_rows)));
        }
        out
    }
}

/// The byte form of one [`Row`], shared by the spool (batches the database
/// would not take) and the durable-acknowledgement journal, so both read and
/// write rows the same way. Version 3 adds `event_id`; version 2 added the
/// invalid-traffic reason and filter flag; older versions are still read.
pub mod codec {
    use super::{EventKind, InvalidReason, Row};
    use uuid::Uuid;

    /// The version [`encode_row`] writes.
    pub const ROW_VERSION: u8 = 3;

    /// Appends `row` in the current version's form.
    pub fn encode_row(out: &mut Vec<u8>, row: &Row<'_>) {
        out.push(row.kind as u8);
        out.push(row.invalid.map_or(0, |r| r as u8));
        out.push(u8::from(row.filtered));
        match row.event_id {
            Some(id) => {
                out.push(1);
                out.extend_from_slice(id.as_bytes());
            }
            None => out.push(0),
        }
        out.extend_from_slice(row.ad_unit_id.as_bytes());
        out.extend_from_slice(row.campaign_id.as_bytes());
        out.extend_from_slice(row.creative_id.as_bytes());
        out.extend_from_slice(&row.timestamp_ms.to_be_bytes());
        out.extend_from_slice(&row.received_ms.to_be_bytes());
        let url = row.page_url.as_bytes();
        out.extend_from_slice(&(url.len() as u32).to_be_bytes());
        out.extend_from_slice(url);
        match row.user_agent {
            Some(ua) => {
                out.extend_from_slice(&(ua.len() as u32).to_be_bytes());
                out.extend_from_slice(ua.as_bytes());
            }
            None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        }
    }

    /// Reads big-endian fields off a byte slice; every read is bounds-checked.
    pub struct Reader<'a> {
        data: &'a [u8],
        off: usize,
    }

    impl<'a> Reader<'a> {
        pub fn new(data: &'a [u8]) -> Self {
            Reader { data, off: 0 }
        }
        /// True when every byte was read.
        pub fn at_end(&self) -> bool {
            self.off == self.data.len()
        }
        pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let s = self.data.get(self.off..self.off.checked_add(n)?)?;
            self.off += n;
            Some(s)
        }
        pub fn u8(&mut self) -> Option<u8> {
            self.take(1).map(|b| b[0])
        }
        pub fn u32(&mut self) -> Option<u32> {
            self.take(4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        }
        pub fn u64(&mut self) -> Option<u64> {
            let b = self.take(8)?;
            Some(u64::from_be_bytes([
                b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
            ]))
        }
        pub fn i64(&mut self) -> Option<i64> {
            self.u64().map(|v| v as i64)
        }
        pub fn uuid(&mut self) -> Option<Uuid> {
            Uuid::from_slice(self.take(16)?).ok()
        }
        pub fn str(&mut self, len: usize) -> Option<&'a str> {
            std::str::from_utf8(self.take(len)?).ok()
        }
    }

    /// Reads one row written by `version` (1 to [`ROW_VERSION`]); `None` if
    /// the bytes are not a row of that version.
    pub fn decode_row<'a>(r: &mut Reader<'a>, version: u8) -> Option<Row<'a>> {
        let kind = EventKind::from_u8(r.u8()?)?;
        let (invalid, filtered) = if version >= 2 {
            (InvalidReason::from_u8(r.u8()?)?, r.u8()? == 1)
        } else {
            (None, true)
        };
        let event_id = if version >= 3 {
            match r.u8()? {
                0 => None,
                1 => Some(r.uuid()?),
                _ => return None,
            }
        } else {
            None
        };
        let ad_unit_id = r.uuid()?;
        let campaign_id = r.uuid()?;
        let creative_id = r.uuid()?;
        let timestamp_ms = r.i64()?;
        let received_ms = r.i64()?;
        let url_len = r.u32()? as usize;
        let page_url = r.str(url_len)?;
        let user_agent = match r.u32()? {
            u32::MAX => None,
            len => Some(r.str(len as usize)?),
        };
        Some(Row {
            kind,
            ad_unit_id,
            campaign_id,
            creative_id,
            timestamp_ms,
            received_ms,
            page_url,
            user_agent,
            invalid,
            filtered,
            event_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(i: usize, url: &str) -> Row<'_> {
        Row {
            kind: if i.is_multiple_of(4) {
                EventKind::Click
            } else {
                EventKind::Impression
            },
            ad_unit_id: Uuid::from_u128(1),
            campaign_id: Uuid::from_u128(2 + (i % 2) as u128),
            creative_id: Uuid::from_u128(4),
            timestamp_ms: 1_700_000_000_000 + i as i64 * 1_000_000,
            received_ms: 1_700_000_000_000 + i as i64,
            page_url: url,
            user_agent: i.is_multiple_of(3).then_some("ua/1"),
            // Two invalid impressions counted apart; one invalid click kept
            // in the net numbers (IVT_FILTER=off when it was recorded).
            invalid: match i {
                1 | 6 => Some(InvalidReason::BotUa),
                8 => Some(InvalidReason::DuplicateClick),
                _ => None,
            },
            filtered: i != 8,
            event_id: (i % 5 == 2).then(|| Uuid::from_u128(1000 + i as u128)),
        }
    }

    #[test]
    fn rows_come_back_as_pushed_and_counters_merge_across_buffers() {
        let urls: Vec<String> = (0..10).map(|i| format!("https://e.x/{i}")).collect();
        let mut a = Buffer::new();
        let mut b = Buffer::with_capacity(4, 4);
        for (i, u) in urls.iter().enumerate() {
            let target = if i < 6 { &mut a } else { &mut b };
            target.push(&row(i, u)).expect("room");
        }
        let batch = Batch::from_parts(vec![a, Buffer::new(), b]);
        assert_eq!(batch.len(), 10);
        let got: Vec<Row<'_>> = batch.rows().collect();
        let want: Vec<Row<'_>> = urls.iter().enumerate().map(|(i, u)| row(i, u)).collect();
        assert_eq!(got, want);
        let mut total = Counts::default();
        let mut from_rows: HashMap<AggKey, Counts> = HashMap::new();
        for r in &want {
            from_rows.entry(r.key()).or_default().count(r);
        }
        for (k, c) in batch.aggregates() {
            assert_eq!(from_rows.get(k), Some(c));
            total.add(*c);
        }
        assert_eq!(batch.aggregate_keys(), from_rows.len());
        assert_eq!(
            total,
            Counts {
                impressions: 5,
                clicks: 3,
                invalid_impressions: 2,
                invalid_clicks: 0,
            }
        );
        assert_eq!(batch.oldest_received_ms(), 1_700_000_000_000);
        assert_eq!(
            batch.campaigns(),
            vec![Uuid::from_u128(2), Uuid::from_u128(3)]
        );
        assert_eq!(
            batch.counted_bytes(),
            want.iter().map(Row::cost).sum::<u64>()
        );
    }

    fn sample(n: usize, urls: &[String]) -> Batch {
        let mut b = Buffer::new();
        for (i, u) in urls.iter().enumerate().take(n) {
            b.push(&row(i, u)).expect("room");
        }
        Batch::from_parts(vec![b])
    }

    #[test]
    fn halves_are_deterministic_and_keep_every_row_and_count() {
        let urls: Vec<String> = (0..11).map(|i| format!("https://e.x/{i}")).collect();
        let batch = sample(11, &urls);
        let (a, b) = batch.halves().expect("two halves");
        let (a2, b2) = batch.halves().expect("again");
        assert_eq!((a.id, b.id), (a2.id, b2.id), "same ids every time");
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, batch.id);
        assert_eq!((a.len(), b.len()), (5, 6));
        let rows: Vec<Row<'_>> = a.rows().chain(b.rows()).collect();
        assert_eq!(rows, batch.rows().collect::<Vec<_>>());
        let sum = |bs: &[&Batch]| {
            let mut c = Counts::default();
            for b in bs {
                for (_, x) in b.aggregates() {
                    c.add(*x);
                }
            }
            c
        };
        assert_eq!(sum(&[&a, &b]), sum(&[&batch]));
        let one = sample(1, &urls);
        assert!(one.halves().is_none());
    }

    #[test]
    fn chunks_hold_at_most_max_rows() {
        let urls: Vec<String> = (0..10).map(|i| format!("https://e.x/{i}")).collect();
        let batch = sample(10, &urls);
        let id = batch.id;
        let all: Vec<String> = batch.rows().map(|r| r.page_url.to_string()).collect();
        let chunks = batch.into_chunks(4);
        assert_eq!(chunks.iter().map(Batch::len).collect::<Vec<_>>(), [4, 4, 2]);
        let again: Vec<String> = chunks
            .iter()
            .flat_map(|c| c.rows().map(|r| r.page_url.to_string()))
            .collect();
        assert_eq!(again, all);
        let small = sample(3, &urls);
        let small_id = small.id;
        let same = small.into_chunks(4);
        assert_eq!(same.len(), 1);
        assert_eq!(same[0].id, small_id, "a small batch keeps its id");
        assert_ne!(chunks[0].id, id);
    }

    #[test]
    fn rows_survive_the_codec_and_skipped_rows_leave_the_counts() {
        let urls: Vec<String> = (0..10).map(|i| format!("https://e.x/{i}")).collect();
        let batch = sample(10, &urls);
        let mut bytes = Vec::new();
        for r in batch.rows() {
            codec::encode_row(&mut bytes, &r);
        }
        let mut rd = codec::Reader::new(&bytes);
        let back: Vec<Row<'_>> = (0..10)
            .map(|_| codec::decode_row(&mut rd, codec::ROW_VERSION).expect("a row"))
            .collect();
        assert!(rd.at_end());
        assert_eq!(back, batch.rows().collect::<Vec<_>>());
        assert!(back.iter().any(|r| r.event_id.is_some()));

        let skip = [0usize, 2, 7];
        let got = batch.aggregates_without(&skip);
        let mut want: HashMap<AggKey, Counts, KeyHasher> = HashMap::default();
        for (i, r) in batch.rows().enumerate() {
            if !skip.contains(&i) {
                want.entry(r.key()).or_default().count(&r);
            }
        }
        assert_eq!(got, want);
        assert_eq!(batch.aggregates_without(&[]).len(), batch.aggregate_keys());
    }
}
