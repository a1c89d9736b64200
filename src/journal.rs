//! `Journal`: the fsynced local log behind `ACK_MODE=durable`.
//!
//! In durable mode an event is answered only once it is on disk here. The
//! request side records the event into its shard, appends it to the journal
//! and waits for the journal's next fsync; one thread writes and fsyncs for
//! everybody (group commit): a write starts when `JOURNAL_FLUSH_EVENTS`
//! events wait or the oldest has waited `JOURNAL_FLUSH_US`, and every request
//! waiting on that write is released together.
//!
//! Every durable event carries an `event_id` (the client's, or one the service
//! makes), so replaying the journal after a crash is exactly-once through the
//! database's `event_ids` table, whatever of it was committed or spooled
//! before the crash.
//!
//! The journal only has to keep what is not yet durable elsewhere. Segments:
//! at each flush the coordinator first [`rotates`](Journal::rotate) (appends
//! from then on go to a new segment), then takes the shards. An event is
//! recorded before it is appended, so every event in the segments up to the
//! cut is in that flush's batches or earlier ones; once those are committed
//! or spooled (in flush order), the segments up to the cut are deleted. A
//! clean shutdown leaves the journal empty; after a crash, the segments left
//! are read back at the next start ([`Journal::open`]) and delivered like
//! any batch.
//!
//! Record format: `len: u32, crc32: u32, version: u8, row` (see
//! [`crate::batch::codec`]). Reading stops at the first torn or damaged
//! record of a segment: everything after it was never fsynced, so never
//! acknowledged. Nothing here touches the database.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::batch::{codec, Batch, Buffer, Row};
use crate::stats::{Counter, Stats};

const SUFFIX: &str = ".journal";

/// Why an event could not be made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    #[error("journal write failed: {0}")]
    Io(String),
    #[error("journal fsync took longer than {0:?}")]
    Slow(Duration),
    #[error("the journal is closed")]
    Closed,
}

/// What the writer thread has made durable, as the waiters see it.
#[derive(Debug, Clone, Default)]
struct Synced {
    /// Every record with a sequence number up to this was written (or failed).
    upto: u64,
    /// Recent writes that failed: (first, last) sequence numbers and the error.
    failed: Vec<(u64, u64, String)>,
    closed: bool,
}

/// Appended records not yet written.
struct Pending {
    /// Sequence number of the last record appended.
    seq: u64,
    /// The segment new records go to.
    segment: u64,
    /// Bytes per segment, oldest first (a rotation closes the last one).
    chunks: Vec<(u64, Vec<u8>)>,
    events: usize,
    first_at: Option<Instant>,
    stop: bool,
    /// Cuts waiting to be settled, in flush order: cut id → (last segment, settled).
    cuts: BTreeMap<u64, (u64, bool)>,
    next_cut: u64,
}

/// The fsynced local log of acknowledged events.
pub struct Journal {
    dir: PathBuf,
    pending: Mutex<Pending>,
    wake: Condvar,
    synced: watch::Sender<Synced>,
    linger: Duration,
    batch_events: usize,
    stats: Arc<Stats>,
}

/// Segments from an earlier run, read back.
pub struct Recovered {
    pub batches: Vec<Batch>,
    pub events: usize,
    /// The files they came from (delete once the batches are durable).
    pub files: Vec<PathBuf>,
    /// Bytes after the last good record of each segment (torn tails).
    pub torn_bytes: u64,
}

/// A position in the journal: the segments up to it can go once the
/// batches of its flush are durable. Settle it with [`Journal::settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut(u64);

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:020}{SUFFIX}"))
}

fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let n = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(n) = n {
            out.push((n, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Appends one record for `row` to `out`.
fn encode(out: &mut Vec<u8>, row: &Row<'_>) {
    let start = out.len();
    out.extend_from_slice(&[0; 8]);
    out.push(codec::ROW_VERSION);
    codec::encode_row(out, row);
    let len = (out.len() - start - 8) as u32;
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
}

/// Reads a segment's good records into `buffers` (at most `max_rows` each);
/// returns the events read and the bytes after the last good record.
fn read_segment(
    path: &Path,
    max_rows: usize,
    buffers: &mut Vec<Buffer>,
) -> io::Result<(usize, u64)> {
    let data = fs::read(path)?;
    let mut r = codec::Reader::new(&data);
    let mut events = 0;
    let mut good = 0usize;
    while let (Some(len), Some(crc)) = (r.u32(), r.u32()) {
        let Some(payload) = r.take(len as usize) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let mut p = codec::Reader::new(payload);
        let row = p
            .u8()
            .filter(|v| (1..=codec::ROW_VERSION).contains(v))
            .and_then(|v| codec::decode_row(&mut p, v));
        let Some(row) = row.filter(|_| p.at_end()) else {
            break;
        };
        if buffers.last().is_none_or(|b| b.len() >= max_rows) {
            buffers.push(Buffer::new());
        }
        if let Some(b) = buffers.last_mut() {
            if b.push(&row).is_err() {
                break;
            }
        }
        events += 1;
        good += 8 + len as usize;
    }
    Ok((events, (data.len() - good) as u64))
}

impl Journal {
    /// Opens the journal in `dir` (created, mode 0700) and reads back what an
    /// earlier run left there, as batches of at most `max_rows` events.
    pub fn open(
        dir: impl Into<PathBuf>,
        linger: Duration,
        batch_events: usize,
        max_rows: usize,
        stats: Arc<Stats>,
    ) -> io::Result<(Arc<Journal>, Recovered)> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let old = segments(&dir)?;
        let mut buffers = Vec::new();
        let (mut events, mut torn_bytes) = (0, 0);
        for (_, path) in &old {
            let (n, torn) = read_segment(path, max_rows.max(1), &mut buffers)?;
            events += n;
            torn_bytes += torn;
        }
        let next = old.last().map_or(1, |(n, _)| n + 1);
        let journal = Arc::new(Journal {
            dir,
            pending: Mutex::new(Pending {
                seq: 0,
                segment: next,
                chunks: Vec::new(),
                events: 0,
                first_at: None,
                stop: false,
                cuts: BTreeMap::new(),
                next_cut: 0,
            }),
            wake: Condvar::new(),
            synced: watch::Sender::new(Synced::default()),
            linger,
            batch_events: batch_events.max(1),
            stats,
        });
        let recovered = Recovered {
            batches: buffers
                .into_iter()
                .map(|b| Batch::from_parts(vec![b]))
                .collect(),
            events,
            files: old.into_iter().map(|(_, p)| p).collect(),
            torn_bytes,
        };
        Ok((journal, recovered))
    }

    /// Starts the writer thread; it ends after [`Journal::close`].
    pub fn start(self: &Arc<Self>) -> io::Result<()> {
        let j = self.clone();
        std::thread::Builder::new()
            .name("ingest-journal".into())
            .spawn(move || j.write_loop())
            .map(|_| ())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `row`; returns its sequence number, to [`wait`](Journal::wait) on.
    pub fn append(&self, row: &Row<'_>) -> u64 {
        let mut p = self.lock();
        let segment = p.segment;
        match p.chunks.last_mut() {
            Some((s, bytes)) if *s == segment => encode(bytes, row),
            _ => {
                let mut bytes = Vec::with_capacity(64 * 1024);
                encode(&mut bytes, row);
                p.chunks.push((segment, bytes));
            }
        }
        p.seq += 1;
        p.events += 1;
        if p.first_at.is_none() {
            p.first_at = Some(Instant::now());
            self.wake.notify_one();
        } else if p.events >= self.batch_events {
            self.wake.notify_one();
        }
        p.seq
    }

    /// The sequence number of the last record appended (a repeat waits for it:
    /// its first sighting may still be on its way to disk).
    pub fn last(&self) -> u64 {
        self.lock().seq
    }

    /// Waits until record `seq` is on disk (at most `timeout`).
    pub async fn wait(&self, seq: u64, timeout: Duration) -> Result<(), JournalError> {
        let mut rx = self.synced.subscribe();
        let waited =
            tokio::time::timeout(timeout, rx.wait_for(|s| s.upto >= seq || s.closed)).await;
        match waited {
            Err(_) => Err(JournalError::Slow(timeout)),
            Ok(Err(_)) => Err(JournalError::Closed),
            Ok(Ok(s)) if s.upto >= seq => {
                match s
                    .failed
                    .iter()
                    .find(|(lo, hi, _)| (*lo..=*hi).contains(&seq))
                {
                    Some((_, _, e)) => Err(JournalError::Io(e.clone())),
                    None => Ok(()),
                }
            }
            Ok(Ok(_)) => Err(JournalError::Closed),
        }
    }

    /// Closes the current segment: appends from now on go to the next one.
    /// Called by the coordinator just before it takes the shards.
    pub fn rotate(&self) -> Cut {
        let mut p = self.lock();
        let closed = p.segment;
        p.segment += 1;
        let id = p.next_cut;
        p.next_cut += 1;
        p.cuts.insert(id, (closed, false));
        tracing::debug!(cut = id, closed, seq = p.seq, "journal: rotated");
        Cut(id)
    }

    /// The batches of `cut`'s flush are durable (committed, spooled or
    /// quarantined). Once every earlier cut is settled too, the segments up
    /// to it are deleted.
    pub fn settle(&self, cut: Cut) {
        let mut upto = None;
        {
            let mut p = self.lock();
            if let Some(c) = p.cuts.get_mut(&cut.0) {
                c.1 = true;
            }
            while let Some(entry) = p.cuts.first_entry() {
                if !entry.get().1 {
                    break;
                }
                upto = Some(entry.get().0);
                entry.remove();
            }
        }
        tracing::debug!(cut = cut.0, ?upto, "journal: settled");
        if let Some(last) = upto {
            self.delete_upto(last);
        }
    }

    fn delete_upto(&self, last: u64) {
        // The writer may still write a closed segment's last chunk: only
        // segments whose bytes are all written are deleted (the next round
        // deletes the others).
        let unwritten: Vec<u64> = self.lock().chunks.iter().map(|(s, _)| *s).collect();
        let Ok(all) = segments(&self.dir) else { return };
        for (n, path) in all {
            if n <= last && !unwritten.contains(&n) {
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot delete a settled journal segment");
                }
            }
        }
    }

    /// Stops the writer thread once everything appended is written.
    pub fn close(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }

    fn write_loop(&self) {
        let mut file: Option<(u64, File)> = None;
        loop {
            let chunks = {
                let mut p = self.lock();
                loop {
                    if p.chunks.is_empty() {
                        if p.stop {
                            drop(p);
                            self.synced.send_modify(|s| s.closed = true);
                            return;
                        }
                        p = self
                            .wake
                            .wait_timeout(p, Duration::from_millis(100))
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                        continue;
                    }
                    let waited = p.first_at.map_or(self.linger, |t| t.elapsed());
                    if p.stop || p.events >= self.batch_events || waited >= self.linger {
                        break;
                    }
                    let left = self.linger - waited;
                    p = self
                        .wake
                        .wait_timeout(p, left)
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                let seq = p.seq;
                let events = p.events;
                p.events = 0;
                p.first_at = None;
                (std::mem::take(&mut p.chunks), seq, events)
            };
            let (chunks, seq, events) = chunks;
            match self.write(&mut file, &chunks) {
                Ok(()) => {
                    self.stats.add(Counter::JournalSyncs, 1);
                    self.stats.add(Counter::JournalEvents, events as u64);
                    self.synced.send_modify(|s| s.upto = seq);
                }
                Err(e) => {
                    self.stats.add(Counter::JournalFailures, 1);
                    tracing::error!(error = %e, events, "journal write failed; these events are answered 503");
                    // The file may end in part of a record, and a reader stops
                    // there: everything from now on goes to a fresh segment
                    // (a later one, so it is kept at least as long).
                    file = None;
                    {
                        let mut p = self.lock();
                        p.segment += 1;
                        let fresh = p.segment;
                        for c in p.chunks.iter_mut() {
                            c.0 = fresh;
                        }
                    }
                    self.synced.send_modify(|s| {
                        if s.failed.len() >= 64 {
                            s.failed.remove(0);
                        }
                        s.failed.push((s.upto + 1, seq, e.to_string()));
                        s.upto = seq;
                    });
                }
            }
        }
    }

    /// Writes the chunks to their segments and fsyncs each file written.
    fn write(&self, file: &mut Option<(u64, File)>, chunks: &[(u64, Vec<u8>)]) -> io::Result<()> {
        for (segment, bytes) in chunks {
            if file.as_ref().is_none_or(|(s, _)| s != segment) {
                if let Some((_, f)) = file.take() {
                    f.sync_data()?;
                }
                let path = segment_path(&self.dir, *segment);
                tracing::debug!(segment, "journal: opening segment");
                let created = !path.exists();
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&path)?;
                if created {
                    File::open(&self.dir)?.sync_all()?;
                }
                *file = Some((*segment, f));
            }
            if let Some((_, f)) = file.as_mut() {
                f.write_all(bytes)?;
            }
        }
        if let Some((_, f)) = file.as_ref() {
            f.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::EventKind;
    use uuid::Uuid;

    fn row(i: u128, url: &str) -> Row<'_> {
        Row {
            kind: EventKind::Impression,
            ad_unit_id: Uuid::from_u128(1),
            campaign_id: Uuid::from_u128(2),
            creative_id: Uuid::from_u128(3),
            timestamp_ms: 1_700_000_000_000,
            received_ms: 1_700_000_000_000,
            page_url: url,
            user_agent: Some("ua"),
            invalid: None,
            filtered: true,
            event_id: Some(Uuid::from_u128(i)),
        }
    }

    fn dir(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ingest-journal-{tag}-{}", Uuid::new_v4().simple()))
    }

    #[tokio::test]
    async fn appended_events_come_back_after_a_crash_and_settled_segments_go() {
        let d = dir("crash");
        let (j, rec) = Journal::open(
            &d,
            Duration::from_micros(200),
            8,
            100,
            Arc::new(Stats::new()),
        )
        .expect("open");
        assert_eq!(rec.events, 0);
        j.start().expect("start");
        let mut last = 0;
        for i in 0..20 {
            last = j.append(&row(i, "https://e.x/a"));
        }
        j.wait(last, Duration::from_secs(5)).await.expect("durable");
        let cut = j.rotate();
        for i in 20..25 {
            last = j.append(&row(i, "https://e.x/b"));
        }
        j.wait(last, Duration::from_secs(5)).await.expect("durable");
        assert_eq!(segments(&d).expect("list").len(), 2);
        j.settle(cut);
        assert_eq!(
            segments(&d).expect("list").len(),
            1,
            "the first segment is gone"
        );
        // A torn tail: half a record after the good ones.
        let (_, path) = segments(&d).expect("list").remove(0);
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(&[0, 0, 0, 90, 1, 2]).expect("tear");
        j.close();
        drop(j);
        let (_, rec) = Journal::open(&d, Duration::from_micros(200), 8, 3, Arc::new(Stats::new()))
            .expect("reopen");
        assert_eq!(rec.events, 5, "the events of the unsettled segment");
        assert_eq!(rec.torn_bytes, 6);
        assert_eq!(rec.batches.len(), 2, "at most 3 rows per batch");
        let ids: Vec<u128> = rec
            .batches
            .iter()
            .flat_map(|b| {
                b.rows()
                    .map(|r| r.event_id.expect("id").as_u128())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(ids, (20..25).collect::<Vec<_>>());
        let _ = fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn settling_out_of_order_waits_for_the_earlier_flush() {
        let d = dir("order");
        let (j, _) = Journal::open(
            &d,
            Duration::from_micros(100),
            1,
            100,
            Arc::new(Stats::new()),
        )
        .expect("open");
        j.start().expect("start");
        let s1 = j.append(&row(1, "a"));
        j.wait(s1, Duration::from_secs(5)).await.expect("durable");
        let c1 = j.rotate();
        let s2 = j.append(&row(2, "b"));
        j.wait(s2, Duration::from_secs(5)).await.expect("durable");
        let c2 = j.rotate();
        let s3 = j.append(&row(3, "c"));
        j.wait(s3, Duration::from_secs(5)).await.expect("durable");
        j.settle(c2);
        assert_eq!(
            segments(&d).expect("list").len(),
            3,
            "c1 is not settled yet"
        );
        j.settle(c1);
        assert_eq!(segments(&d).expect("list").len(), 1);
        j.close();
        let _ = fs::remove_dir_all(&d);
    }
}
