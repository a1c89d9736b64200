//! `Spool`: the bounded on-disk queue for batches the database would not take,
//! and the quarantine beside it.
//!
//! When a batch cannot be written (database down, slow or refusing), the
//! writer appends it here and forgets it only after `fsync`. A replay loop
//! feeds the segments back to the writer oldest first once the database is
//! back, while new traffic keeps flowing; a spool left by a crash is replayed
//! at the next start. Replaying a batch that did commit is harmless: every
//! batch carries its id into the `ingest_batches` ledger.
//!
//! On disk: `SPOOL_DIR/<seq>.seg`, append-only, rotated at [`SEGMENT_BYTES`].
//! Each record is `magic u32 | len u32 | crc32 u32 | payload`, big-endian,
//! the CRC over the payload. A reader that meets a bad record (torn, failed
//! checksum, undecodable) reports it and resyncs on the next valid record;
//! nothing is ever replayed as garbage, and a segment with damage is moved to
//! `SPOOL_DIR/quarantine/` after its good records, never deleted. Rows the
//! database refuses in both tables are quarantined there too, each as a
//! one-record segment with a `.error` file beside it.
//!
//! Disk I/O never runs on an async runtime and never under the bookkeeping
//! lock: appends (write + fsync) run on blocking threads and serialize on
//! their own lock; the runtime's calls ([`Spool::oldest`], sizes) only take
//! the bookkeeping lock, or skip when an append holds the file. A full disk
//! (`ENOSPC`) truncates the partial record away, and the spool refuses appends
//! for [`DISK_FULL_PAUSE`] before trying again; what is already on disk stays.
//! Files are created `0600` in a `0700` directory, and the directory is
//! locked: a second process on the same `SPOOL_DIR` refuses to start.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant, SystemTime};

use uuid::Uuid;

use crate::batch::{codec, Batch, Buffer};

/// A segment is sealed (and becomes replayable) at this size.
pub const SEGMENT_BYTES: u64 = 16 << 20;
/// After a full disk, appends are refused this long before the next try.
pub const DISK_FULL_PAUSE: Duration = Duration::from_secs(1);
const MAGIC: u32 = 0x5350_4f4c; // "SPOL"
const HEADER: usize = 12;
/// A record's version is its rows' version ([`codec::ROW_VERSION`]: 3 adds
/// `event_id`, 2 the invalid-traffic reason); older records are still read.
const FORMAT_VERSION: u8 = codec::ROW_VERSION;
const QUARANTINE: &str = "quarantine";
const LOCK_FILE: &str = ".lock";

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({used} of {max} bytes used, record needs {need})")]
    Full { used: u64, max: u64, need: u64 },
    #[error("spool disk is full (ENOSPC); refusing appends for a moment")]
    DiskFull,
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Why the spool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("another process is using SPOOL_DIR {0} (it holds {0}/.lock); give each process its own directory")]
    InUse(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A sealed segment waiting for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    pub len: u64,
}

/// The segment appends go to; owned by the append lock.
struct Active {
    seq: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

/// Bookkeeping only; never held across I/O.
struct State {
    next_seq: u64,
    sealed: VecDeque<Segment>,
}

/// The spool directory and its size accounting.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    active: Mutex<Option<Active>>,
    /// Bytes on disk (sealed + active).
    bytes: AtomicU64,
    /// `epoch` milliseconds before which appends are refused (disk full).
    paused_until_ms: AtomicU64,
    epoch: Instant,
    /// Held (locked) for the life of the process.
    _lock: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn private_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let perms = fs::metadata(dir)?.permissions();
    if perms.mode() & 0o777 != 0o700 {
        if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(0o700)) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot make the spool directory private (0700)");
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir` and locks it.
    /// Segments found there, from an earlier run or a crash, are queued for replay.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> Result<Spool, OpenError> {
        let dir = dir.into();
        private_dir(&dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(OpenError::InUse(dir.display().to_string()))
            }
            Err(fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let mut found: Vec<Segment> = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(seq) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            let len = entry.metadata()?.len();
            if len == 0 {
                let _ = fs::remove_file(entry.path());
                continue;
            }
            found.push(Segment {
                seq,
                path: entry.path(),
                len,
            });
        }
        found.sort_by_key(|s| s.seq);
        let next_seq = found.last().map_or(1, |s| s.seq + 1);
        let bytes = found.iter().map(|s| s.len).sum();
        Ok(Spool {
            dir,
            max_bytes,
            state: Mutex::new(State {
                next_seq,
                sealed: found.into(),
            }),
            active: Mutex::new(None),
            bytes: AtomicU64::new(bytes),
            paused_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where quarantined rows and damaged segments are kept.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.dir.join(QUARANTINE)
    }

    /// Bytes on disk now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// False for a moment after the disk was found full.
    pub fn accepting(&self) -> bool {
        self.now_ms() >= self.paused_until_ms.load(Relaxed)
    }

    /// True when nothing waits on disk (an append in progress counts as data).
    pub fn is_empty(&self) -> bool {
        let active_empty = match self.active.try_lock() {
            Ok(a) => a.as_ref().is_none_or(|a| a.len == 0),
            Err(TryLockError::Poisoned(p)) => p.into_inner().as_ref().is_none_or(|a| a.len == 0),
            Err(TryLockError::WouldBlock) => false,
        };
        active_empty && lock(&self.state).sealed.is_empty()
    }

    /// Appends `batch` durably (written and fsynced) or fails leaving nothing
    /// on disk that a reader would take for a record. Blocking: call it from
    /// a blocking thread.
    pub fn append(&self, batch: &Batch) -> Result<u64, SpoolError> {
        if !self.accepting() {
            return Err(SpoolError::DiskFull);
        }
        // Appends take turns; encoding inside the turn keeps one encoded
        // copy in memory at a time, however many batches wait.
        let mut active = lock(&self.active);
        let record = encode_record(batch);
        let need = record.len() as u64;
        let used = self.bytes.load(Relaxed);
        if used + need > self.max_bytes {
            return Err(SpoolError::Full {
                used,
                max: self.max_bytes,
                need,
            });
        }
        if active.is_none() {
            let seq = {
                let mut st = lock(&self.state);
                st.next_seq += 1;
                st.next_seq - 1
            };
            let path = self.dir.join(format!("{seq:016}.seg"));
            let file = create_private(&path).map_err(|e| self.io_error(e))?;
            // Make the new file's directory entry durable too.
            sync_dir(&self.dir).map_err(|e| self.io_error(e))?;
            *active = Some(Active {
                seq,
                path,
                file,
                len: 0,
            });
        }
        let Some(a) = active.as_mut() else {
            return Err(SpoolError::Io(io::Error::other("no active segment")));
        };
        if let Err(e) = a.file.write_all(&record).and_then(|_| a.file.sync_data()) {
            // Cut the partial record off so the segment stays clean; if even
            // that fails, seal it as it is (a reader skips a torn tail).
            let clean = a
                .file
                .set_len(a.len)
                .and_then(|_| a.file.sync_data())
                .is_ok();
            if !clean {
                if let Some(torn) = active.take() {
                    let len = torn.file.metadata().map(|m| m.len()).unwrap_or(torn.len);
                    self.bytes.fetch_add(len.saturating_sub(torn.len), Relaxed);
                    lock(&self.state).sealed.push_back(Segment {
                        seq: torn.seq,
                        path: torn.path,
                        len,
                    });
                }
            }
            return Err(self.io_error(e));
        }
        a.len += need;
        self.bytes.fetch_add(need, Relaxed);
        if a.len >= SEGMENT_BYTES {
            if let Some(full) = active.take() {
                self.seal(full);
            }
        }
        Ok(need)
    }

    /// Turns a full disk into a pause; passes other errors through.
    fn io_error(&self, e: io::Error) -> SpoolError {
        if e.raw_os_error() == Some(28) {
            // ENOSPC
            self.paused_until_ms
                .store(self.now_ms() + DISK_FULL_PAUSE.as_millis() as u64, Relaxed);
            SpoolError::DiskFull
        } else {
            SpoolError::Io(e)
        }
    }

    fn seal(&self, a: Active) {
        if a.len > 0 {
            lock(&self.state).sealed.push_back(Segment {
                seq: a.seq,
                path: a.path,
                len: a.len,
            });
        } else {
            let _ = fs::remove_file(&a.path);
        }
    }

    /// The oldest segment to replay. If only the active segment holds data,
    /// it is sealed first (new appends start a new segment), unless an append
    /// is writing it right now: then `None`, and the caller asks again. Never
    /// waits for disk I/O.
    pub fn oldest(&self) -> Option<Segment> {
        if let Some(s) = lock(&self.state).sealed.front() {
            return Some(s.clone());
        }
        let taken = match self.active.try_lock() {
            Ok(mut a) => a.take(),
            Err(TryLockError::Poisoned(p)) => p.into_inner().take(),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(a) = taken {
            self.seal(a);
        }
        lock(&self.state).sealed.front().cloned()
    }

    fn forget(&self, seg: &Segment) {
        let mut st = lock(&self.state);
        if let Some(i) = st.sealed.iter().position(|s| s.seq == seg.seq) {
            st.sealed.remove(i);
        }
        drop(st);
        self.bytes
            .fetch_sub(seg.len.min(self.bytes.load(Relaxed)), Relaxed);
    }

    /// Deletes a fully replayed segment. Blocking (a file system call).
    pub fn remove(&self, seg: &Segment) -> io::Result<()> {
        self.forget(seg);
        match fs::remove_file(&seg.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Moves a segment with damage into the quarantine (its good records were
    /// replayed), with a note of what was wrong. Blocking.
    pub fn quarantine_segment(&self, seg: &Segment, why: &str) -> io::Result<PathBuf> {
        let qdir = self.quarantine_dir();
        private_dir(&qdir)?;
        let name = format!("damaged-{:016}", seg.seq);
        let to = qdir.join(format!("{name}.seg"));
        fs::rename(&seg.path, &to)?;
        write_note(&qdir.join(format!("{name}.error")), why)?;
        sync_dir(&qdir)?;
        sync_dir(&self.dir)?;
        self.forget(seg);
        Ok(to)
    }

    /// Keeps one encoded record in the quarantine (see [`quarantine_record`]).
    pub fn quarantine(&self, id: Uuid, record: &[u8], error: &str) -> io::Result<PathBuf> {
        quarantine_record(&self.dir, id, record, error)
    }
}

/// Keeps one encoded record (see [`encode_record`]) in the quarantine of the
/// spool in `spool_dir`, as `<id>.seg` with `error` in `<id>.error`; an older
/// file of the same id is replaced. Needs no lock on the spool (the service
/// and `ingest quarantine retry` may both write here). Blocking.
pub fn quarantine_record(
    spool_dir: &Path,
    id: Uuid,
    record: &[u8],
    error: &str,
) -> io::Result<PathBuf> {
    let qdir = spool_dir.join(QUARANTINE);
    private_dir(&qdir)?;
    let path = qdir.join(format!("{id}.seg"));
    let tmp = qdir.join(format!("{id}.seg.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = create_private(&tmp)?;
    f.write_all(record)?;
    f.sync_data()?;
    fs::rename(&tmp, &path)?;
    write_note(&qdir.join(format!("{id}.error")), error)?;
    sync_dir(&qdir)?;
    Ok(path)
}

fn write_note(path: &Path, text: &str) -> io::Result<()> {
    let _ = fs::remove_file(path);
    let mut f = create_private(path)?;
    let when = humantime::format_rfc3339_seconds(SystemTime::now());
    writeln!(f, "{when} {text}")?;
    f.sync_data()
}

/// One stretch of a segment that could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Offset of the first bad byte.
    pub offset: u64,
    /// Bytes skipped until the next valid record (or the end).
    pub skipped_bytes: u64,
    pub reason: &'static str,
}

/// The readable records of one segment, and the stretches skipped.
pub struct SegmentContents {
    pub batches: Vec<Batch>,
    pub damage: Vec<Damage>,
}

/// The record at `off`, if it is whole, checks out and decodes.
fn record_at(data: &[u8], off: usize) -> Result<(Batch, usize), &'static str> {
    let Some(header) = data.get(off..off + HEADER) else {
        return Err("torn record header");
    };
    let word =
        |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    if word(0) != MAGIC {
        return Err("bad record magic");
    }
    let len = word(4) as usize;
    let Some(payload) = data.get(off + HEADER..off + HEADER + len) else {
        return Err("torn record payload");
    };
    if crc32fast::hash(payload) != word(8) {
        return Err("checksum mismatch");
    }
    decode(payload)
        .map(|b| (b, HEADER + len))
        .ok_or("undecodable record")
}

/// Reads a whole segment, resyncing past damage. Blocking.
pub fn read_segment(path: &Path) -> io::Result<SegmentContents> {
    let data = fs::read(path)?;
    let mut batches = Vec::new();
    let mut damage = Vec::new();
    let mut off = 0usize;
    while off < data.len() {
        match record_at(&data, off) {
            Ok((b, n)) => {
                batches.push(b);
                off += n;
            }
            Err(reason) => {
                // Resync: the next offset where a valid record starts.
                let magic = MAGIC.to_be_bytes();
                let next = (off + 1..data.len())
                    .filter(|&i| data[i..].starts_with(&magic))
                    .find(|&i| record_at(&data, i).is_ok())
                    .unwrap_or(data.len());
                damage.push(Damage {
                    offset: off as u64,
                    skipped_bytes: (next - off) as u64,
                    reason,
                });
                off = next;
            }
        }
    }
    Ok(SegmentContents { batches, damage })
}

/// A batch as one spool record (header and payload in one buffer: the only
/// copy of the batch the spool makes).
pub fn encode_record(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + 32 + batch.len() * 160);
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.extend_from_slice(&[0; 8]); // len and crc, filled in below
    out.push(FORMAT_VERSION);
    out.extend_from_slice(batch.id.as_bytes());
    out.extend_from_slice(&(batch.len() as u32).to_be_bytes());
    for row in batch.rows() {
        codec::encode_row(&mut out, &row);
    }
    let len = (out.len() - HEADER) as u32;
    let crc = crc32fast::hash(&out[HEADER..]);
    out[4..8].copy_from_slice(&len.to_be_bytes());
    out[8..12].copy_from_slice(&crc.to_be_bytes());
    out
}

fn decode(payload: &[u8]) -> Option<Batch> {
    let mut r = codec::Reader::new(payload);
    let version = r.u8()?;
    if !(1..=FORMAT_VERSION).contains(&version) {
        return None;
    }
    let id = r.uuid()?;
    let n = r.u32()? as usize;
    let mut data = Buffer::new();
    for _ in 0..n {
        let row = codec::decode_row(&mut r, version)?;
        data.push(&row).ok()?;
    }
    if !r.at_end() {
        return None;
    }
    Some(Batch::restore(id, vec![data]))
}

/// One quarantined file, as `ingest quarantine list` shows it.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub path: PathBuf,
    pub batches: usize,
    pub events: usize,
    /// The note written beside it (time and the database's error, or the damage).
    pub note: String,
}

/// The quarantine of the spool in `spool_dir`, oldest first. Blocking.
pub fn list_quarantine(spool_dir: &Path) -> io::Result<Vec<Quarantined>> {
    let qdir = spool_dir.join(QUARANTINE);
    let mut out = Vec::new();
    let entries = match fs::read_dir(&qdir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    let mut files: Vec<(SystemTime, PathBuf)> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_some_and(|x| x == "seg") {
            files.push((entry.metadata()?.modified()?, path));
        }
    }
    files.sort();
    for (_, path) in files {
        let contents = read_segment(&path)?;
        let note = fs::read_to_string(path.with_extension("error")).unwrap_or_default();
        out.push(Quarantined {
            batches: contents.batches.len(),
            events: contents.batches.iter().map(Batch::len).sum(),
            path,
            note: note.trim().to_string(),
        });
    }
    Ok(out)
}

/// Removes a quarantined file and its note (after a successful retry). Blocking.
pub fn remove_quarantined(path: &Path) -> io::Result<()> {
    fs::remove_file(path)?;
    let _ = fs::remove_file(path.with_extension("error"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{EventKind, InvalidReason, Row};

    fn batch(n: usize, tag: &str) -> Batch {
        let mut d = Buffer::new();
        for i in 0..n {
            let url = format!("https://example.com/{tag}/{i}");
            d.push(&Row {
                kind: if i % 3 == 0 {
                    EventKind::Click
                } else {
                    EventKind::Impression
                },
                ad_unit_id: Uuid::from_u128(1),
                campaign_id: Uuid::from_u128(2 + (i % 2) as u128),
                creative_id: Uuid::from_u128(4),
                timestamp_ms: 1_700_000_000_000 + i as i64,
                received_ms: 1_700_000_000_000,
                page_url: &url,
                user_agent: (i % 2 == 0).then_some("ua/1"),
                invalid: InvalidReason::from_u8((i % 6) as u8).flatten(),
                filtered: i % 5 != 0,
                event_id: (i % 4 == 1).then(|| Uuid::from_u128(77 + i as u128)),
            })
            .expect("room");
        }
        Batch::from_parts(vec![d])
    }

    fn rows(b: &Batch) -> Vec<(u8, String, Option<String>, i64)> {
        b.rows()
            .map(|r| {
                (
                    r.kind as u8,
                    r.page_url.to_string(),
                    r.user_agent.map(str::to_string),
                    r.timestamp_ms,
                )
            })
            .collect()
    }

    #[test]
    fn batches_survive_a_round_trip_through_disk_with_their_ids() {
        let dir = tempdir("roundtrip");
        let spool = Spool::open(&dir, 1 << 30).expect("open");
        let (a, b) = (batch(10, "a"), batch(3, "b"));
        spool.append(&a).expect("append");
        spool.append(&b).expect("append");
        // A restart finds the same segment.
        drop(spool);
        let spool = Spool::open(&dir, 1 << 30).expect("reopen");
        let seg = spool.oldest().expect("segment");
        let got = read_segment(&seg.path).expect("read");
        assert!(got.damage.is_empty());
        assert_eq!(got.batches.len(), 2);
        assert_eq!(got.batches[0].id, a.id);
        assert_eq!(rows(&got.batches[0]), rows(&a));
        let mut got_aggs: Vec<_> = got.batches[0].aggregates().collect();
        let mut want_aggs: Vec<_> = a.aggregates().collect();
        got_aggs.sort_by_key(|(k, _)| **k);
        want_aggs.sort_by_key(|(k, _)| **k);
        assert_eq!(got_aggs, want_aggs);
        assert_eq!(got.batches[1].id, b.id);
        spool.remove(&seg).expect("remove");
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn files_are_private_and_a_second_process_is_refused() {
        let dir = tempdir("private");
        let spool = Spool::open(&dir, 1 << 30).expect("open");
        spool.append(&batch(2, "p")).expect("append");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        let seg = spool.oldest().expect("segment");
        assert_eq!(mode(&seg.path), 0o600);
        match Spool::open(&dir, 1 << 30) {
            Err(OpenError::InUse(d)) => assert_eq!(d, dir.display().to_string()),
            Err(e) => panic!("expected InUse, got {e}"),
            Ok(_) => panic!("expected InUse, got a second spool"),
        }
        drop(spool);
        Spool::open(&dir, 1 << 30).expect("free again once the first is gone");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_torn_tail_is_reported_and_skipped() {
        let dir = tempdir("torn");
        let spool = Spool::open(&dir, 1 << 30).expect("open");
        let a = batch(5, "a");
        spool.append(&a).expect("append");
        spool.append(&batch(5, "b")).expect("append");
        let seg = spool.oldest().expect("segment");
        // Cut the second record short, as a crash mid-write would.
        let full = fs::read(&seg.path).expect("read");
        assert_eq!(read_segment(&seg.path).expect("read").batches.len(), 2);
        let cut = full.len() - 20;
        fs::write(&seg.path, &full[..cut]).expect("truncate");
        let got = read_segment(&seg.path).expect("read");
        assert_eq!(got.batches.len(), 1);
        assert_eq!(got.batches[0].id, a.id);
        assert_eq!(got.damage.len(), 1);
        assert_eq!(got.damage[0].reason, "torn record payload");
        assert_eq!(
            got.damage[0].offset + got.damage[0].skipped_bytes,
            cut as u64
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn damage_in_the_middle_is_skipped_and_the_rest_is_read() {
        let dir = tempdir("flip");
        let spool = Spool::open(&dir, 1 << 30).expect("open");
        let (a, b, c) = (batch(5, "a"), batch(5, "b"), batch(5, "c"));
        for x in [&a, &b, &c] {
            spool.append(x).expect("append");
        }
        let seg = spool.oldest().expect("segment");
        let mut bytes = fs::read(&seg.path).expect("read");
        let second = encode_record(&a).len();
        bytes[second + HEADER + 20] ^= 0x40; // inside b's payload
        fs::write(&seg.path, &bytes).expect("write");
        let got = read_segment(&seg.path).expect("read");
        let ids: Vec<Uuid> = got.batches.iter().map(|x| x.id).collect();
        assert_eq!(ids, vec![a.id, c.id], "b is skipped, c is read");
        assert_eq!(got.damage.len(), 1);
        assert_eq!(got.damage[0].reason, "checksum mismatch");
        assert_eq!(got.damage[0].offset, second as u64);
        assert_eq!(got.damage[0].skipped_bytes, encode_record(&b).len() as u64);
        let moved = spool
            .quarantine_segment(&seg, "checksum mismatch")
            .expect("quarantine");
        assert!(moved.exists() && !seg.path.exists());
        assert_eq!(spool.bytes(), 0);
        let listed = list_quarantine(&dir).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].batches, 2);
        assert!(listed[0].note.contains("checksum mismatch"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_size_cap_is_enforced() {
        let dir = tempdir("cap");
        let spool = Spool::open(&dir, 600).expect("open");
        spool.append(&batch(5, "a")).expect("fits");
        match spool.append(&batch(5, "b")) {
            Err(SpoolError::Full { max: 600, .. }) => {}
            other => panic!("expected Full, got {other:?}"),
        }
        assert!(spool.bytes() <= 600);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_quarantined_batch_reads_back_with_its_error() {
        let dir = tempdir("quarantine");
        let spool = Spool::open(&dir, 1 << 30).expect("open");
        let b = batch(1, "q");
        let path = spool
            .quarantine(b.id, &encode_record(&b), "SQLSTATE 23514: violates check")
            .expect("quarantine");
        let listed = list_quarantine(&dir).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].path, path);
        assert_eq!(listed[0].events, 1);
        assert!(listed[0].note.ends_with("SQLSTATE 23514: violates check"));
        let back = read_segment(&path).expect("read");
        assert_eq!(rows(&back.batches[0]), rows(&b));
        remove_quarantined(&path).expect("remove");
        assert!(list_quarantine(&dir).expect("list").is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ingest-spool-test-{tag}-{}",
            Uuid::new_v4().simple()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }
}
