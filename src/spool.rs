//! `Spool`: the bounded on-disk queue for batches the database would not take.
//!
//! When a batch cannot be written (database down, slow or refusing), the
//! writer appends it here and forgets it only after `fsync`. A replay loop
//! feeds the segments back to the writer oldest first once the database is
//! back, while new traffic keeps flowing; a spool left by a crash is replayed
//! at the next start. Replaying a batch that did commit is harmless: every
//! batch carries its id into the `ingest_batches` ledger.
//!
//! On disk: `SPOOL_DIR/<seq>.seg`, append-only, rotated at
//! [`SEGMENT_BYTES`]. Each record is `magic u32 | len u32 | crc32 u32 |
//! payload`, all big-endian, the CRC over the payload. A reader stops at the
//! first record that is short (a torn write) or fails its checksum or its
//! decoding, reports it, and skips the rest of that segment: nothing is ever
//! replayed as garbage. Appends after a restart go to a new segment, never
//! after a torn tail. The total size is capped by `SPOOL_MAX_BYTES`.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use uuid::Uuid;

use crate::batch::{Batch, Buffer, EventKind, Row};

/// A segment is sealed (and becomes replayable) at this size.
pub const SEGMENT_BYTES: u64 = 16 << 20;
const MAGIC: u32 = 0x5350_4f4c; // "SPOL"
const HEADER: usize = 12;
const FORMAT_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool is full ({used} of {max} bytes used, record needs {need})")]
    Full { used: u64, max: u64, need: u64 },
    #[error("spool I/O error: {0}")]
    Io(#[from] io::Error),
}

/// A sealed segment waiting for replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub seq: u64,
    pub path: PathBuf,
    pub len: u64,
}

struct Active {
    seq: u64,
    path: PathBuf,
    file: File,
    len: u64,
}

struct State {
    next_seq: u64,
    active: Option<Active>,
    sealed: VecDeque<Segment>,
}

/// The spool directory and its size accounting.
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
    /// Bytes on disk (sealed + active).
    bytes: AtomicU64,
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`. Segments found there,
    /// from an earlier run or a crash, are queued for replay.
    pub fn open(dir: impl Into<PathBuf>, max_bytes: u64) -> io::Result<Spool> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
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
                active: None,
                sealed: found.into(),
            }),
            bytes: AtomicU64::new(bytes),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes on disk now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// True when nothing waits on disk.
    pub fn is_empty(&self) -> bool {
        let st = self.lock();
        st.sealed.is_empty() && st.active.as_ref().is_none_or(|a| a.len == 0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `batch` durably (written and fsynced) or fails without a trace
    /// on disk that a reader would take for a record. Blocking: call it from
    /// a blocking context.
    pub fn append(&self, batch: &Batch) -> Result<u64, SpoolError> {
        let payload = encode(batch);
        let mut record = Vec::with_capacity(HEADER + payload.len());
        record.extend_from_slice(&MAGIC.to_be_bytes());
        record.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        record.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        record.extend_from_slice(&payload);
        let need = record.len() as u64;

        let mut st = self.lock();
        let used = self.bytes.load(Relaxed);
        if used + need > self.max_bytes {
            return Err(SpoolError::Full {
                used,
                max: self.max_bytes,
                need,
            });
        }
        if st.active.is_none() {
            let seq = st.next_seq;
            st.next_seq += 1;
            let path = self.dir.join(format!("{seq:016}.seg"));
            let file = OpenOptions::new()
                .create_new(true)
                .append(true)
                .open(&path)?;
            // Make the new file's directory entry durable too.
            File::open(&self.dir)?.sync_all()?;
            st.active = Some(Active {
                seq,
                path,
                file,
                len: 0,
            });
        }
        let Some(active) = st.active.as_mut() else {
            return Err(SpoolError::Io(io::Error::other("no active segment")));
        };
        let written = active
            .file
            .write_all(&record)
            .and_then(|_| active.file.sync_data());
        if let Err(e) = written {
            // The tail may now hold a partial record: seal the segment so no
            // later append lands after it (the reader skips the torn tail).
            let torn = st.active.take();
            if let Some(a) = torn {
                let len = a.file.metadata().map(|m| m.len()).unwrap_or(a.len);
                self.bytes.fetch_add(len - a.len, Relaxed);
                if len > 0 {
                    st.sealed.push_back(Segment {
                        seq: a.seq,
                        path: a.path,
                        len,
                    });
                } else {
                    let _ = fs::remove_file(&a.path);
                }
            }
            return Err(e.into());
        }
        active.len += need;
        self.bytes.fetch_add(need, Relaxed);
        if active.len >= SEGMENT_BYTES {
            Self::seal(&mut st);
        }
        Ok(need)
    }

    fn seal(st: &mut State) {
        if let Some(a) = st.active.take() {
            if a.len > 0 {
                st.sealed.push_back(Segment {
                    seq: a.seq,
                    path: a.path,
                    len: a.len,
                });
            } else {
                let _ = fs::remove_file(&a.path);
            }
        }
    }

    /// The oldest segment to replay. If only the active segment holds data,
    /// it is sealed first (new appends start a new segment).
    pub fn oldest(&self) -> Option<Segment> {
        let mut st = self.lock();
        if st.sealed.is_empty() {
            Self::seal(&mut st);
        }
        st.sealed.front().cloned()
    }

    /// Deletes a fully replayed segment.
    pub fn remove(&self, seg: &Segment) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(i) = st.sealed.iter().position(|s| s.seq == seg.seq) {
            st.sealed.remove(i);
        }
        drop(st);
        self.bytes
            .fetch_sub(seg.len.min(self.bytes.load(Relaxed)), Relaxed);
        match fs::remove_file(&seg.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Why a segment could not be read to its end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Offset of the first bad record.
    pub offset: u64,
    /// Bytes skipped from there to the end of the segment.
    pub skipped_bytes: u64,
    pub reason: &'static str,
}

/// The readable records of one segment, and where reading stopped if it had to.
pub struct SegmentContents {
    pub batches: Vec<Batch>,
    pub damage: Option<Damage>,
}

/// Reads a whole segment. Blocking.
pub fn read_segment(path: &Path) -> io::Result<SegmentContents> {
    let data = fs::read(path)?;
    let mut batches = Vec::new();
    let mut off = 0usize;
    let damage = loop {
        if off == data.len() {
            break None;
        }
        let bad = |reason| {
            Some(Damage {
                offset: off as u64,
                skipped_bytes: (data.len() - off) as u64,
                reason,
            })
        };
        let Some(header) = data.get(off..off + HEADER) else {
            break bad("torn record header");
        };
        let magic = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let crc = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        if magic != MAGIC {
            break bad("bad record magic");
        }
        let Some(payload) = data.get(off + HEADER..off + HEADER + len) else {
            break bad("torn record payload");
        };
        if crc32fast::hash(payload) != crc {
            break bad("checksum mismatch");
        }
        match decode(payload) {
            Some(b) => batches.push(b),
            None => break bad("undecodable record"),
        }
        off += HEADER + len;
    };
    Ok(SegmentContents { batches, damage })
}

fn encode(batch: &Batch) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + batch.len() * 160);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(batch.id.as_bytes());
    out.extend_from_slice(&(batch.len() as u32).to_be_bytes());
    for row in batch.rows() {
        out.push(row.kind as u8);
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
    out
}

struct Reader<'a> {
    data: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.data.get(self.off..self.off.checked_add(n)?)?;
        self.off += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i64(&mut self) -> Option<i64> {
        let b = self.take(8)?;
        Some(i64::from_be_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }
    fn uuid(&mut self) -> Option<Uuid> {
        Uuid::from_slice(self.take(16)?).ok()
    }
    fn str(&mut self, len: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(len)?).ok()
    }
}

fn decode(payload: &[u8]) -> Option<Batch> {
    let mut r = Reader {
        data: payload,
        off: 0,
    };
    if r.u8()? != FORMAT_VERSION {
        return None;
    }
    let id = r.uuid()?;
    let n = r.u32()? as usize;
    let mut data = Buffer::new();
    for _ in 0..n {
        let kind = EventKind::from_u8(r.u8()?)?;
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
        data.push(&Row {
            kind,
            ad_unit_id,
            campaign_id,
            creative_id,
            timestamp_ms,
            received_ms,
            page_url,
            user_agent,
        })
        .ok()?;
    }
    if r.off != payload.len() {
        return None;
    }
    Some(Batch::restore(id, vec![data]))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(got.damage.is_none());
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
    fn a_torn_tail_is_reported_and_skipped() {
        let dir = tempdir("torn");
        let spool = Spool::open(&dir, 1 << 30).expect("open");
        let a = batch(5, "a");
        spool.append(&a).expect("append");
        spool.append(&batch(5, "b")).expect("append");
        let seg = spool.oldest().expect("segment");
        // Cut the second record in half, as a crash mid-write would.
        let full = fs::read(&seg.path).expect("read");
        let first_len = (full.len() / 2) as u64;
        let first = read_segment(&seg.path).expect("read").batches.len();
        assert_eq!(first, 2);
        let cut = full.len() - 20;
        fs::write(&seg.path, &full[..cut]).expect("truncate");
        let got = read_segment(&seg.path).expect("read");
        assert_eq!(got.batches.len(), 1);
        assert_eq!(got.batches[0].id, a.id);
        let damage = got.damage.expect("damage reported");
        assert_eq!(damage.reason, "torn record payload");
        assert!(damage.offset > 0 && damage.skipped_bytes > 0 && damage.offset < first_len * 2);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let dir = tempdir("flip");
        let spool = Spool::open(&dir, 1 << 30).expect("open");
        spool.append(&batch(5, "a")).expect("append");
        let seg = spool.oldest().expect("segment");
        let mut bytes = fs::read(&seg.path).expect("read");
        let last = bytes.len() - 3;
        bytes[last] ^= 0x40;
        fs::write(&seg.path, &bytes).expect("write");
        let got = read_segment(&seg.path).expect("read");
        assert!(got.batches.is_empty());
        assert_eq!(got.damage.expect("damage").reason, "checksum mismatch");
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

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "ingest-spool-test-{tag}-{}",
            Uuid::new_v4().simple()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }
}
