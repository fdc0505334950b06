//! The spool's tests: round trips, bounds, eviction, and every way a file on disk can be
//! damaged.

use super::*;

fn frame(i: usize, payload_len: usize) -> SpooledFrame {
    SpooledFrame {
        name: format!("cam0/{i:04}.jpg"),
        captured_unix_ms: 1_700_000_000_000 + i as u64,
        bundle_id: "b3a1c0ffee".into(),
        payload: (0..payload_len).map(|k| (k * 31 + i) as u8).collect(),
    }
}

fn names(range: impl IntoIterator<Item = usize>) -> Vec<String> {
    range.into_iter().map(|i| frame(i, 0).name).collect()
}

fn limits(max_bytes: u64, max_frames: usize) -> SpoolLimits {
    SpoolLimits {
        max_bytes,
        max_frames,
    }
}

fn open(dir: &tempfile::TempDir, limits: SpoolLimits) -> (Spool, Vec<Discarded>) {
    Spool::open(dir.path(), limits).unwrap()
}

fn open_roomy(dir: &tempfile::TempDir) -> (Spool, Vec<Discarded>) {
    open(dir, limits(1 << 20, 100))
}

/// Peeks and removes everything, returning the names in order.
fn drain(spool: &mut Spool) -> Vec<String> {
    let mut names = Vec::new();
    while let Some((id, f)) = spool.peek_oldest().unwrap() {
        spool.remove(id).unwrap();
        names.push(f.name);
    }
    names
}

fn entry_files(dir: &tempfile::TempDir) -> Vec<PathBuf> {
    let files = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path());
    let mut files: Vec<_> = files
        .filter(|p| p.extension() == Some("frame".as_ref()))
        .collect();
    files.sort();
    files
}

#[test]
fn round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, discarded) = open_roomy(&dir);
    assert!(discarded.is_empty() && spool.is_empty());
    let f = frame(7, 3000);
    let pushed = spool.push(&f).unwrap();
    assert!(pushed.evicted.is_empty());
    assert_eq!((spool.len(), spool.bytes()), (1, encoded_len(&f)));
    assert_eq!(spool.peek_oldest().unwrap(), Some((pushed.id, f)));
    spool.remove(pushed.id).unwrap();
    assert!(spool.is_empty() && spool.peek_oldest().unwrap().is_none());
    assert_eq!((spool.bytes(), entry_files(&dir).len()), (0, 0));
}

#[test]
fn order_survives_reopen_and_ids_keep_growing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open_roomy(&dir);
    let ids: Vec<_> = (0..12)
        .map(|i| spool.push(&frame(i, 100)).unwrap().id)
        .collect();
    let bytes = spool.bytes();
    drop(spool);
    let (mut spool, discarded) = open_roomy(&dir);
    assert!(discarded.is_empty());
    assert_eq!((spool.len(), spool.bytes()), (12, bytes));
    assert!(spool.push(&frame(12, 100)).unwrap().id > ids[11]);
    assert_eq!(drain(&mut spool), names(0..13));
}

#[test]
fn full_by_count_evicts_the_oldest_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(&dir, limits(1 << 20, 3));
    let mut evicted = Vec::new();
    for i in 0..5 {
        let out = spool.push(&frame(i, 50)).unwrap();
        assert_eq!(out.evicted.len(), usize::from(i >= 3));
        evicted.extend(out.evicted.into_iter().map(|e| e.name));
    }
    assert_eq!(evicted, names(0..2));
    assert_eq!(drain(&mut spool), names(2..5));
}

#[test]
fn full_by_bytes_evicts_as_many_as_needed() {
    let dir = tempfile::tempdir().unwrap();
    let one = encoded_len(&frame(0, 1000));
    let (mut spool, _) = open(&dir, limits(one * 5 / 2, 100));
    assert!(spool.push(&frame(0, 1000)).unwrap().evicted.is_empty());
    assert!(spool.push(&frame(1, 1000)).unwrap().evicted.is_empty());
    let out = spool.push(&frame(2, 1000)).unwrap();
    let evicted: Vec<_> = out
        .evicted
        .iter()
        .map(|e| (e.name.clone(), e.bytes))
        .collect();
    assert_eq!(evicted, [(frame(0, 0).name, one)]);
    // A bigger frame needs both older entries gone.
    let out = spool.push(&frame(3, 2000)).unwrap();
    let evicted: Vec<_> = out.evicted.into_iter().map(|e| e.name).collect();
    assert_eq!(evicted, names(1..3));
    assert_eq!(
        (spool.len(), spool.bytes()),
        (1, encoded_len(&frame(3, 2000)))
    );
}

#[test]
fn too_big_frames_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open(&dir, limits(4096, 10));
    spool.push(&frame(0, 100)).unwrap();
    let err = spool.push(&frame(1, 5000)).unwrap_err();
    assert!(
        matches!(
            err,
            SpoolError::TooLarge {
                what: "entry",
                max: 4096,
                ..
            }
        ),
        "{err}"
    );
    let err = spool
        .push(&frame(2, MAX_PAYLOAD_BYTES as usize + 1))
        .unwrap_err();
    assert!(
        matches!(
            err,
            SpoolError::TooLarge {
                what: "payload",
                ..
            }
        ),
        "{err}"
    );
    let mut long = frame(3, 10);
    long.name = "x".repeat(MAX_NAME_BYTES as usize + 1);
    let err = spool.push(&long).unwrap_err();
    assert!(
        matches!(err, SpoolError::TooLarge { what: "name", .. }),
        "{err}"
    );
    assert_eq!(entry_files(&dir).len(), 1);
    assert_eq!(drain(&mut spool), names([0]));
}

#[test]
fn truncated_and_flipped_entries_are_discarded_on_open_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open_roomy(&dir);
    (0..4).for_each(|i| drop(spool.push(&frame(i, 500)).unwrap()));
    drop(spool);
    let files = entry_files(&dir);
    let bytes = fs::read(&files[1]).unwrap();
    fs::write(&files[1], &bytes[..bytes.len() - 7]).unwrap();
    let mut bytes = fs::read(&files[2]).unwrap();
    bytes[200] ^= 0x10;
    fs::write(&files[2], &bytes).unwrap();
    let (mut spool, discarded) = open_roomy(&dir);
    let seen: Vec<_> = discarded.iter().map(|d| (&d.file, &d.reason)).collect();
    assert!(
        matches!(
            seen[..],
            [
                (f1, DiscardReason::Corrupt(EntryError::LengthMismatch(..))),
                (f2, DiscardReason::Corrupt(EntryError::Checksum(..))),
            ] if *f1 == files[1] && *f2 == files[2]
        ),
        "{discarded:?}"
    );
    assert!(!files[1].exists() && !files[2].exists());
    assert_eq!(drain(&mut spool), names([0, 3]));
}

#[test]
fn every_flipped_byte_and_every_truncation_is_caught() {
    let good = encode(9, &frame(9, 40)).unwrap();
    assert_eq!(decode(&good, 9), Ok(frame(9, 40)));
    for pos in 0..good.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = good.clone();
            bad[pos] ^= flip;
            assert!(
                decode(&bad, 9).is_err(),
                "flip {flip:#x} at {pos} went unnoticed"
            );
        }
    }
    for cut in 0..good.len() {
        assert!(decode(&good[..cut], 9).is_err(), "truncated to {cut}");
    }
    assert_eq!(decode(&good, 10), Err(EntryError::SequenceMismatch(9, 10)));
}

#[test]
fn headers_that_lie_are_typed_errors() {
    let good = encode(1, &frame(1, 40)).unwrap();
    let with = |at: usize, patch: &[u8]| {
        let mut bad = good.clone();
        bad[at..at + patch.len()].copy_from_slice(patch);
        decode(&bad, 1)
    };
    let huge = with(34, &u32::MAX.to_le_bytes());
    assert_eq!(
        huge,
        Err(EntryError::FieldTooLong("payload", u32::MAX.into()))
    );
    let lie = with(34, &(MAX_PAYLOAD_BYTES as u32).to_le_bytes());
    assert!(
        matches!(lie, Err(EntryError::LengthMismatch(..))),
        "{lie:?}"
    );
    assert_eq!(with(4, &[2, 0]), Err(EntryError::UnsupportedVersion(2)));
    assert_eq!(with(0, b"JUNK"), Err(EntryError::BadMagic(*b"JUNK")));
    // A name that is not UTF-8, under a checksum that matches.
    let mut bad = good.clone();
    bad[38] = 0xff;
    let crc = crc32fast::hash(&bad[CRC_FROM..]);
    bad[6..10].copy_from_slice(&crc.to_le_bytes());
    assert_eq!(decode(&bad, 1), Err(EntryError::NotUtf8("name")));
}

#[test]
fn seeded_garbage_and_mutations_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..3000u64 {
        let len = (next() % 200) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if round % 2 == 0 {
            bytes = encode(round, &frame(round as usize, len)).unwrap();
            for _ in 0..=next() % 4 {
                let pos = next() as usize % bytes.len();
                bytes[pos] = next() as u8;
            }
        }
        let _ = decode(&bytes, round);
    }
}

#[test]
fn leftover_temp_files_are_removed_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open_roomy(&dir);
    spool.push(&frame(0, 10)).unwrap();
    drop(spool);
    // A crash after a write but before its rename, and one in the middle of a write.
    let complete = dir.path().join(file_name(1, TEMP_SUFFIX));
    fs::write(&complete, encode(1, &frame(1, 10)).unwrap()).unwrap();
    let partial = dir.path().join(file_name(2, TEMP_SUFFIX));
    fs::write(&partial, b"CLSP\x01").unwrap();
    let stranger = dir.path().join("notes.txt");
    fs::write(&stranger, b"not ours").unwrap();
    let (mut spool, discarded) = open_roomy(&dir);
    let seen: Vec<_> = discarded.into_iter().map(|d| (d.name, d.reason)).collect();
    let interrupted = DiscardReason::InterruptedWrite;
    assert_eq!(
        seen,
        [
            (Some(frame(1, 0).name), interrupted.clone()),
            (None, interrupted)
        ]
    );
    assert!(!complete.exists() && !partial.exists() && stranger.exists());
    // The temp files' sequence numbers are not reused.
    assert_eq!(spool.push(&frame(3, 10)).unwrap().id, EntryId(3));
    assert_eq!(drain(&mut spool), names([0, 3]));
}

#[test]
fn removing_an_unknown_id_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open_roomy(&dir);
    assert!(matches!(
        spool.remove(EntryId(5)),
        Err(SpoolError::UnknownEntry(EntryId(5)))
    ));
    let id = spool.push(&frame(0, 10)).unwrap().id;
    spool.remove(id).unwrap();
    assert!(matches!(spool.remove(id), Err(SpoolError::UnknownEntry(i)) if i == id));
}

#[test]
fn an_entry_damaged_after_open_is_reported_by_peek_and_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open_roomy(&dir);
    let first = spool.push(&frame(0, 100)).unwrap().id;
    spool.push(&frame(1, 100)).unwrap();
    fs::write(&entry_files(&dir)[0], b"rot").unwrap();
    let err = spool.peek_oldest().unwrap_err();
    let SpoolError::Corrupt { id, name, error } = err else {
        panic!("{err}")
    };
    assert_eq!(
        (id, name, error),
        (first, frame(0, 0).name, EntryError::TooShort(3))
    );
    assert_eq!(drain(&mut spool), names([1]));
}

#[test]
fn smaller_limits_on_reopen_drop_the_oldest_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let (mut spool, _) = open_roomy(&dir);
    (0..6).for_each(|i| drop(spool.push(&frame(i, 100)).unwrap()));
    drop(spool);
    let (mut spool, discarded) = open(&dir, limits(1 << 20, 4));
    let seen: Vec<_> = discarded.into_iter().map(|d| (d.name, d.reason)).collect();
    let over = |i| (Some(frame(i, 0).name), DiscardReason::OverLimits);
    assert_eq!(seen, [over(0), over(1)]);
    assert_eq!(drain(&mut spool), names(2..6));
}

#[test]
fn a_thousand_pushes_keep_the_bounds_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let bounds = limits(64 * 1024, 40);
    let (mut spool, _) = open(&dir, bounds);
    let mut evicted = Vec::new();
    for i in 0..1000 {
        let out = spool.push(&frame(i, (i * 977) % 4000)).unwrap();
        evicted.extend(out.evicted.into_iter().map(|e| e.id));
        assert!(spool.len() <= bounds.max_frames && spool.bytes() <= bounds.max_bytes);
    }
    assert_eq!(evicted.len() + spool.len(), 1000);
    assert!(
        evicted.windows(2).all(|w| w[0] < w[1]),
        "evicted oldest first"
    );
    let (len, bytes) = (spool.len(), spool.bytes());
    drop(spool);
    let files = entry_files(&dir);
    let on_disk: u64 = files.iter().map(|p| p.metadata().unwrap().len()).sum();
    assert_eq!((files.len(), on_disk), (len, bytes));
    let (mut spool, discarded) = open(&dir, bounds);
    assert!(discarded.is_empty());
    assert_eq!((spool.len(), spool.bytes()), (len, bytes));
    assert_eq!(drain(&mut spool), names(1000 - len..1000));
}

#[test]
fn one_owner_per_folder_and_limits_that_hold_an_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, _) = open_roomy(&dir);
    assert!(matches!(
        Spool::open(dir.path(), limits(1 << 20, 1)),
        Err(SpoolError::Locked(_))
    ));
    drop(spool);
    assert!(Spool::open(dir.path(), limits(1 << 20, 1)).is_ok());
    for bad in [limits(1 << 20, 0), limits(HEADER_BYTES - 1, 1)] {
        let err = Spool::open(dir.path(), bad).unwrap_err();
        assert!(matches!(err, SpoolError::InvalidLimits(_)), "{err}");
    }
}
