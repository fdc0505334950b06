//! A bounded on-disk spool for frames taken while the link is down.
//!
//! The head daemon runs for months on boards whose uplink comes and goes. Under the `spool`
//! link-down policy, coded frames wait here until a tail answers again. They survive a
//! restart. The folder never grows past its limits: the oldest entries make room, and each
//! one evicted is reported. Nothing vanishes silently: an entry that a crash or a failing
//! card left unreadable is named when the spool is opened, or when it is next read.
//!
//! The module is synchronous (`std::fs`), so the daemon calls it from
//! `tokio::task::spawn_blocking`. One process owns a folder at a time, enforced by an advisory
//! lock on `spool.lock`. Delivery is at-least-once: call [`Spool::peek_oldest`], send, and call
//! [`Spool::remove`] once the answer has arrived.
//!
//! # Layout
//!
//! There is one file per frame, named `<seq>.frame`. `seq` is a sequence number, zero-padded
//! to 20 digits, that only grows, so sorting the names sorts the frames by arrival. A push
//! first evicts what it must, then writes `<seq>.tmp`, syncs it, renames it and syncs the
//! folder. Removals and evictions are not synced: after a crash, a removed entry may come back,
//! which means a frame is sent twice. At-least-once delivery allows that. On open, a `.tmp`
//! left by a crash is removed and reported. Other names are left alone.
//!
//! Each entry is laid out as follows; integers are little-endian:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `CLSP` |
//! | 4 | 2 | format version, 1 |
//! | 6 | 4 | CRC-32 (IEEE) of every byte from offset 10 to the end |
//! | 10 | 8 | sequence number, the same as in the file name |
//! | 18 | 8 | capture time, Unix milliseconds |
//! | 26 | 4 | name length `n`, at most [`MAX_NAME_BYTES`] |
//! | 30 | 4 | bundle id length `b`, at most [`MAX_BUNDLE_ID_BYTES`] |
//! | 34 | 4 | payload length `p`, at most [`MAX_PAYLOAD_BYTES`] |
//! | 38 | n + b + p | name (UTF-8), bundle id (UTF-8), payload |
//!
//! The file must be exactly `38 + n + b + p` bytes long. A reader checks the file's real length
//! against [`MAX_ENTRY_BYTES`] before reading it, and checks the header against that length
//! before trusting any field. So a damaged or hostile file costs at most one bounded read, and
//! it yields an [`EntryError`] rather than a panic.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: [u8; 4] = *b"CLSP";
const VERSION: u16 = 1;
/// The bytes before the name: magic, version, checksum, sequence, capture time, three lengths.
pub const HEADER_BYTES: u64 = 38;
/// The longest frame name an entry holds.
pub const MAX_NAME_BYTES: u64 = 4096;
/// The longest bundle id an entry holds.
pub const MAX_BUNDLE_ID_BYTES: u64 = 256;
/// The largest payload an entry holds (16 MiB).
pub const MAX_PAYLOAD_BYTES: u64 = 16 << 20;
/// The largest file that can be a valid entry.
pub const MAX_ENTRY_BYTES: u64 =
    HEADER_BYTES + MAX_NAME_BYTES + MAX_BUNDLE_ID_BYTES + MAX_PAYLOAD_BYTES;
const FIELDS: [(&str, u64); 3] = [
    ("name", MAX_NAME_BYTES),
    ("bundle id", MAX_BUNDLE_ID_BYTES),
    ("payload", MAX_PAYLOAD_BYTES),
];
const ENTRY_SUFFIX: &str = ".frame";
const TEMP_SUFFIX: &str = ".tmp";
const SEQ_DIGITS: usize = 20;
/// The checksum covers everything from this offset on.
const CRC_FROM: usize = 10;

/// One coded frame waiting for the link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledFrame {
    /// The frame's name in reports (its source path or id).
    pub name: String,
    /// When it was captured, in Unix milliseconds.
    pub captured_unix_ms: u64,
    /// The id of the bundle that coded it.
    pub bundle_id: String,
    /// The coded feature frame.
    pub payload: Vec<u8>,
}

/// How much the spool may hold; both limits apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// The most bytes its entries may take on disk, headers included (at least 38).
    pub max_bytes: u64,
    /// The most entries it may hold (at least 1).
    pub max_frames: usize,
}

/// Which entry of a spool: its sequence number, never reused within a folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(pub u64);

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:0SEQ_DIGITS$}", self.0)
    }
}

/// An entry deleted to make room: a lost frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictedFrame {
    /// Which entry it was.
    pub id: EntryId,
    /// The frame's name.
    pub name: String,
    /// The bytes it took on disk.
    pub bytes: u64,
}

/// What a successful [`Spool::push`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushOutcome {
    /// The new entry.
    pub id: EntryId,
    /// The older entries evicted to make room for it, oldest first.
    pub evicted: Vec<EvictedFrame>,
}

/// A file that [`Spool::open`] found in the folder and deleted: a lost frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discarded {
    /// The file.
    pub file: PathBuf,
    /// The frame's name, where it could still be read.
    pub name: Option<String>,
    /// Why it was deleted.
    pub reason: DiscardReason,
}

/// Why [`Spool::open`] deleted a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscardReason {
    /// A push was interrupted before its rename, so it never returned success.
    #[error("interrupted write")]
    InterruptedWrite,
    /// The entry does not decode.
    #[error("corrupt entry: {0}")]
    Corrupt(EntryError),
    /// The entry is valid, but the limits are now smaller; the oldest entries go first.
    #[error("spool over its limits")]
    OverLimits,
}

/// Why the bytes of a file are not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// The file (of this length) is shorter than the header.
    #[error("{0} bytes is shorter than the header")]
    TooShort(u64),
    /// The file (of this length) is longer than [`MAX_ENTRY_BYTES`].
    #[error("{0} bytes is more than an entry may hold")]
    TooLarge(u64),
    /// The file does not start with `CLSP`.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The format version is not one this build reads.
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    /// A length in the header (field, length) is over its limit.
    #[error("{0} length {1} is over its limit")]
    FieldTooLong(&'static str, u64),
    /// The header's lengths (`38 + n + b + p`) differ from the file's: a truncated write.
    #[error("header describes {0} bytes, the file has {1}")]
    LengthMismatch(u64, u64),
    /// The checksum (stored, computed) does not match the contents.
    #[error("checksum mismatch: stored {0:08x}, computed {1:08x}")]
    Checksum(u32, u32),
    /// The header's sequence number differs from the file name's (header, file name).
    #[error("sequence {0} in the header, {1} in the file name")]
    SequenceMismatch(u64, u64),
    /// The name or bundle id is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
    /// The file disappeared while the spool still listed it.
    #[error("the file is gone")]
    Vanished,
}

/// What can go wrong with a spool.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// A file or the folder could not be read, written or deleted.
    #[error("spool {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The limits cannot hold any entry.
    #[error("spool limits: {0}")]
    InvalidLimits(&'static str),
    /// Another spool, in this process or another, holds the folder's lock.
    #[error("spool {} is in use by another process", .0.display())]
    Locked(PathBuf),
    /// A field of the frame, or its whole entry (`what` is `"entry"`, `max` the spool's
    /// `max_bytes`), is over its limit. The frame is refused and nothing changes.
    #[error("frame refused: its {what} of {len} bytes exceeds {max}")]
    TooLarge {
        /// `"name"`, `"bundle id"`, `"payload"` or `"entry"`.
        what: &'static str,
        /// Its length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// [`Spool::push`] failed and the frame is not stored, unless only the final folder sync
    /// failed: then it is stored but may not survive a crash (a retry may store it twice).
    /// The entries evicted before the failure are gone.
    #[error("spool {}: push failed: {source} ({} evicted before)", path.display(), evicted.len())]
    PushFailed {
        /// The file or folder at fault.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
        /// The entries evicted before the failure: lost frames.
        evicted: Vec<EvictedFrame>,
    },
    /// No entry has this id (never pushed, or already removed or evicted).
    #[error("no spool entry {0}")]
    UnknownEntry(EntryId),
    /// The oldest entry no longer decodes. It has been deleted; peek again for the next one.
    #[error("spool entry {id} ({name}) was corrupt and is deleted: {error}")]
    Corrupt {
        /// Which entry.
        id: EntryId,
        /// The frame's name, as pushed or read on open.
        name: String,
        /// What was wrong.
        error: EntryError,
    },
    /// Every sequence number has been used (a file named `18446744073709551615.frame`).
    #[error("spool sequence numbers exhausted")]
    SequenceExhausted,
}

/// A bounded, crash-safe queue of [`SpooledFrame`]s in one folder, oldest first.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    /// By sequence number: the frame's name and its size on disk.
    entries: BTreeMap<u64, (String, u64)>,
    bytes: u64,
    /// `None` once `u64::MAX` has been used.
    next_seq: Option<u64>,
    /// Held for the spool's lifetime; dropping it releases the lock.
    _lock: File,
}

impl Spool {
    /// Opens the spool in `dir`, creating the folder if needed, and recovers what a previous
    /// run left there. Returns the spool and, in the order they were found, the files it
    /// deleted: interrupted writes, corrupt entries, and the oldest entries over `limits`.
    /// An entry that cannot be read at all (an I/O error, not bad contents) fails the open
    /// rather than being deleted, since it may be intact.
    pub fn open(
        dir: impl Into<PathBuf>,
        limits: SpoolLimits,
    ) -> Result<(Spool, Vec<Discarded>), SpoolError> {
        if limits.max_frames == 0 {
            return Err(SpoolError::InvalidLimits("max_frames must be at least 1"));
        }
        if limits.max_bytes < HEADER_BYTES {
            return Err(SpoolError::InvalidLimits("max_bytes must be at least 38"));
        }
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_at(&dir))?;
        let lock = lock(&dir)?;
        let (mut found, mut temps) = (BTreeMap::new(), BTreeMap::new());
        for item in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let item = item.map_err(io_at(&dir))?;
            if !item.file_type().map_err(io_at(&item.path()))?.is_file() {
                continue;
            }
            let name = item.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = parse_file_name(name, ENTRY_SUFFIX) {
                found.insert(seq, item.path());
            } else if let Some(seq) = parse_file_name(name, TEMP_SUFFIX) {
                temps.insert(seq, item.path());
            }
        }
        let last = found.keys().chain(temps.keys()).max().copied();
        let mut spool = Spool {
            next_seq: last.map_or(Some(0), |seq| seq.checked_add(1)),
            dir,
            limits,
            entries: BTreeMap::new(),
            bytes: 0,
            _lock: lock,
        };
        let mut discarded = Vec::new();
        let mut discard = |file: PathBuf, name, reason| {
            remove_if_present(&file).map_err(io_at(&file))?;
            discarded.push(Discarded { file, name, reason });
            Ok::<_, SpoolError>(())
        };
        for (seq, file) in temps {
            let name = read_entry(&file, seq).ok().map(|frame| frame.name);
            discard(file, name, DiscardReason::InterruptedWrite)?;
        }
        for (seq, file) in found {
            match read_entry(&file, seq) {
                Ok(frame) => {
                    let size = encoded_len(&frame);
                    spool.insert(seq, frame.name, size);
                }
                Err(ReadError::Io(source)) => return Err(SpoolError::Io { path: file, source }),
                Err(ReadError::Entry(e)) => discard(file, None, DiscardReason::Corrupt(e))?,
            }
        }
        while spool.entries.len() > limits.max_frames || spool.bytes > limits.max_bytes {
            let Some(old) = spool.forget_oldest() else {
                break;
            };
            discard(
                spool.entry_path(old.id.0),
                Some(old.name),
                DiscardReason::OverLimits,
            )?;
        }
        if !discarded.is_empty() {
            sync_dir(&spool.dir).map_err(io_at(&spool.dir))?;
        }
        Ok((spool, discarded))
    }

    /// Stores `frame` as the newest entry, first evicting the oldest entries until the folder,
    /// new entry included, fits both limits. A frame with a field over its limit, or whose
    /// entry alone exceeds `max_bytes`, is refused with nothing changed.
    pub fn push(&mut self, frame: &SpooledFrame) -> Result<PushOutcome, SpoolError> {
        let seq = self.next_seq.ok_or(SpoolError::SequenceExhausted)?;
        let encoded = encode(seq, frame)?;
        let (len, max) = (encoded.len() as u64, self.limits.max_bytes);
        if len > max {
            return Err(SpoolError::TooLarge {
                what: "entry",
                len,
                max,
            });
        }
        let mut evicted = Vec::new();
        while self.entries.len() >= self.limits.max_frames || self.bytes + len > max {
            let Some(old) = self.forget_oldest() else {
                break;
            };
            let path = self.entry_path(old.id.0);
            if let Err(source) = remove_if_present(&path) {
                self.insert(old.id.0, old.name, old.bytes);
                return Err(push_failed(path, source, evicted));
            }
            evicted.push(old);
        }
        let temp = self.dir.join(file_name(seq, TEMP_SUFFIX));
        let path = self.entry_path(seq);
        if let Err(source) = write_synced(&temp, &encoded).and_then(|()| fs::rename(&temp, &path)) {
            // Best effort: a temp file left behind is removed and reported on the next open.
            let _ = fs::remove_file(&temp);
            return Err(push_failed(temp, source, evicted));
        }
        self.next_seq = seq.checked_add(1);
        self.insert(seq, frame.name.clone(), len);
        if let Err(source) = sync_dir(&self.dir) {
            return Err(push_failed(self.dir.clone(), source, evicted));
        }
        Ok(PushOutcome {
            id: EntryId(seq),
            evicted,
        })
    }

    /// Reads the oldest entry without removing it; `None` when the spool is empty. An entry
    /// that no longer decodes is deleted and returned as [`SpoolError::Corrupt`].
    pub fn peek_oldest(&mut self) -> Result<Option<(EntryId, SpooledFrame)>, SpoolError> {
        let Some((&seq, _)) = self.entries.first_key_value() else {
            return Ok(None);
        };
        let path = self.entry_path(seq);
        match read_entry(&path, seq) {
            Ok(frame) => Ok(Some((EntryId(seq), frame))),
            Err(ReadError::Io(source)) => Err(SpoolError::Io { path, source }),
            Err(ReadError::Entry(error)) => {
                remove_if_present(&path).map_err(io_at(&path))?;
                let name = self.forget_oldest().map(|old| old.name).unwrap_or_default();
                Err(SpoolError::Corrupt {
                    id: EntryId(seq),
                    name,
                    error,
                })
            }
        }
    }

    /// Deletes an entry, normally once its frame has been answered.
    pub fn remove(&mut self, id: EntryId) -> Result<(), SpoolError> {
        let Some((_, bytes)) = self.entries.get(&id.0) else {
            return Err(SpoolError::UnknownEntry(id));
        };
        let bytes = *bytes;
        let path = self.entry_path(id.0);
        remove_if_present(&path).map_err(io_at(&path))?;
        self.entries.remove(&id.0);
        self.bytes -= bytes;
        Ok(())
    }

    /// How many entries the spool holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the spool holds no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes its entries take on disk, headers included.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn entry_path(&self, seq: u64) -> PathBuf {
        self.dir.join(file_name(seq, ENTRY_SUFFIX))
    }

    fn insert(&mut self, seq: u64, name: String, bytes: u64) {
        self.entries.insert(seq, (name, bytes));
        self.bytes += bytes;
    }

    /// Drops the oldest entry from the index; the caller deals with its file.
    fn forget_oldest(&mut self) -> Option<EvictedFrame> {
        let (seq, (name, bytes)) = self.entries.pop_first()?;
        self.bytes -= bytes;
        Some(EvictedFrame {
            id: EntryId(seq),
            name,
            bytes,
        })
    }
}

fn io_at(path: &Path) -> impl Fn(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn push_failed(path: PathBuf, source: io::Error, evicted: Vec<EvictedFrame>) -> SpoolError {
    SpoolError::PushFailed {
        path,
        source,
        evicted,
    }
}

fn lock(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join("spool.lock");
    let mut options = OpenOptions::new();
    let file = options.create(true).truncate(false).write(true).open(&path);
    let file = file.map_err(io_at(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => Err(SpoolError::Locked(dir.to_path_buf())),
        // Where the platform has no file locks, keeping to one owner is the caller's job.
        Err(TryLockError::Error(e)) if e.kind() == io::ErrorKind::Unsupported => Ok(file),
        Err(TryLockError::Error(source)) => Err(SpoolError::Io { path, source }),
    }
}

fn file_name(seq: u64, suffix: &str) -> String {
    format!("{seq:0SEQ_DIGITS$}{suffix}")
}

/// The sequence number of `<20 digits><suffix>`, or `None` for any other name.
fn parse_file_name(name: &str, suffix: &str) -> Option<u64> {
    let digits = name.strip_suffix(suffix)?;
    let ours = digits.len() == SEQ_DIGITS && digits.bytes().all(|b| b.is_ascii_digit());
    digits.parse().ok().filter(|_| ours)
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes renames and deletions in `dir` durable, where the platform can sync a folder.
fn sync_dir(dir: &Path) -> io::Result<()> {
    if cfg!(unix) {
        File::open(dir)?.sync_all()
    } else {
        Ok(())
    }
}

fn encoded_len(frame: &SpooledFrame) -> u64 {
    HEADER_BYTES + (frame.name.len() + frame.bundle_id.len() + frame.payload.len()) as u64
}

fn encode(seq: u64, frame: &SpooledFrame) -> Result<Vec<u8>, SpoolError> {
    let fields = [
        frame.name.as_bytes(),
        frame.bundle_id.as_bytes(),
        &frame.payload,
    ];
    let mut out = Vec::with_capacity(usize::try_from(encoded_len(frame)).unwrap_or(0));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&frame.captured_unix_ms.to_le_bytes());
    for (field, (what, max)) in fields.iter().zip(FIELDS) {
        let len = field.len() as u64;
        if len > max {
            return Err(SpoolError::TooLarge { what, len, max });
        }
        out.extend_from_slice(&(len as u32).to_le_bytes());
    }
    fields.iter().for_each(|field| out.extend_from_slice(field));
    let crc = crc32fast::hash(out.get(CRC_FROM..).unwrap_or_default());
    if let Some(slot) = out.get_mut(6..CRC_FROM) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    Ok(out)
}

enum ReadError {
    Io(io::Error),
    Entry(EntryError),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => ReadError::Entry(EntryError::Vanished),
            _ => ReadError::Io(e),
        }
    }
}

/// Reads and decodes one entry, never reading more than an entry may hold.
fn read_entry(path: &Path, seq: u64) -> Result<SpooledFrame, ReadError> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    if len > MAX_ENTRY_BYTES {
        return Err(ReadError::Entry(EntryError::TooLarge(len)));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_ENTRY_BYTES + 1).read_to_end(&mut bytes)?;
    decode(&bytes, seq).map_err(ReadError::Entry)
}

/// Takes `N` bytes off the front of `rest`; running out means the file is too short.
fn take<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], EntryError> {
    let whole = rest.len() as u64;
    let (head, tail) = rest
        .split_first_chunk::<N>()
        .ok_or(EntryError::TooShort(whole))?;
    *rest = tail;
    Ok(*head)
}

/// Decodes the bytes of the entry whose file name says `file_seq`.
fn decode(bytes: &[u8], file_seq: u64) -> Result<SpooledFrame, EntryError> {
    let len = bytes.len() as u64;
    if len < HEADER_BYTES {
        return Err(EntryError::TooShort(len));
    }
    if len > MAX_ENTRY_BYTES {
        return Err(EntryError::TooLarge(len));
    }
    let rest = &mut &bytes[..];
    let magic = take::<4>(rest)?;
    if magic != MAGIC {
        return Err(EntryError::BadMagic(magic));
    }
    let version = u16::from_le_bytes(take(rest)?);
    if version != VERSION {
        return Err(EntryError::UnsupportedVersion(version));
    }
    let stored = u32::from_le_bytes(take(rest)?);
    let seq = u64::from_le_bytes(take(rest)?);
    let captured_unix_ms = u64::from_le_bytes(take(rest)?);
    let mut lens = [0usize; 3];
    for (slot, (what, max)) in lens.iter_mut().zip(FIELDS) {
        let n = u32::from_le_bytes(take(rest)?);
        if u64::from(n) > max {
            return Err(EntryError::FieldTooLong(what, n.into()));
        }
        *slot = n as usize;
    }
    // Each length is at most 16 MiB, so neither this sum nor the splits below can overflow.
    let expected = HEADER_BYTES + lens.iter().sum::<usize>() as u64;
    if expected != len {
        return Err(EntryError::LengthMismatch(expected, len));
    }
    let computed = crc32fast::hash(bytes.get(CRC_FROM..).unwrap_or_default());
    if computed != stored {
        return Err(EntryError::Checksum(stored, computed));
    }
    if seq != file_seq {
        return Err(EntryError::SequenceMismatch(seq, file_seq));
    }
    let [name_len, bundle_id_len, _] = lens;
    let short = EntryError::TooShort(len);
    let (name, rest) = rest.split_at_checked(name_len).ok_or(short.clone())?;
    let (bundle_id, payload) = rest.split_at_checked(bundle_id_len).ok_or(short)?;
    let text = |bytes: &[u8], what| {
        String::from_utf8(bytes.to_vec()).map_err(|_| EntryError::NotUtf8(what))
    };
    Ok(SpooledFrame {
        name: text(name, "name")?,
        captured_unix_ms,
        bundle_id: text(bundle_id, "bundle id")?,
        payload: payload.to_vec(),
    })
}

#[cfg(test)]
mod tests;
