use super::*;

fn record(path: &str, open: OpenRecord) -> FidRecord {
    FidRecord {
        uid: 1000,
        open,
        qid_path: 42,
        path: PathBuf::from(path),
    }
}

fn versioned() -> Replayed {
    Replayed {
        msize: Some(65536),
        fids: HashMap::new(),
    }
}

#[test]
fn an_empty_file_is_an_empty_journal() {
    let file = new_journal().unwrap();
    assert_eq!(load(&file).unwrap(), Replayed::default());
    let _journal = Journal::start(file.try_clone().unwrap(), &Replayed::default()).unwrap();
    assert_eq!(load(&file).unwrap(), Replayed::default());
}

#[test]
fn fids_replay_as_last_set() {
    let file = new_journal().unwrap();
    let journal = Journal::start(file.try_clone().unwrap(), &Replayed::default()).unwrap();
    journal.version(Some(8192));
    journal.set_fid(0, &record("", OpenRecord::None));
    journal.set_fid(1, &record("a/b", OpenRecord::None));
    journal.set_fid(1, &record("a/b", OpenRecord::Flags(2)));
    journal.set_fid(2, &record("c", OpenRecord::Xattr));
    journal.clunk(2);
    journal.clunk(7);
    let replayed = load(&file).unwrap();
    assert_eq!(replayed.msize, Some(8192));
    assert_eq!(replayed.fids.len(), 2);
    assert_eq!(replayed.fids[&0], record("", OpenRecord::None));
    assert_eq!(replayed.fids[&1], record("a/b", OpenRecord::Flags(2)));
    // A new Tversion forgets every fid.
    journal.version(Some(4096));
    let replayed = load(&file).unwrap();
    assert_eq!((replayed.msize, replayed.fids.len()), (Some(4096), 0));
}

#[test]
fn a_torn_last_record_is_ignored() {
    let file = new_journal().unwrap();
    let journal = Journal::start(file.try_clone().unwrap(), &versioned()).unwrap();
    journal.set_fid(1, &record("kept", OpenRecord::None));
    let before = file.metadata().unwrap().len();
    journal.set_fid(2, &record("torn", OpenRecord::None));
    let after = file.metadata().unwrap().len();
    // Every cut through the last record loses it and only it.
    for cut in before..after {
        let copy = new_journal().unwrap();
        let mut bytes = vec![0u8; cut as usize];
        file.read_exact_at(&mut bytes, 0).unwrap();
        copy.write_all_at(&bytes, 0).unwrap();
        let replayed = load(&copy).unwrap();
        assert_eq!(replayed.fids.len(), 1, "cut at {cut}");
        assert!(replayed.fids.contains_key(&1));
    }
    // A flipped byte in it: the same.
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, after - 1).unwrap();
    file.write_all_at(&[byte[0] ^ 1], after - 1).unwrap();
    assert_eq!(load(&file).unwrap().fids.len(), 1);
}

#[test]
fn a_new_incarnation_continues_after_a_torn_record() {
    let file = new_journal().unwrap();
    let journal = Journal::start(file.try_clone().unwrap(), &versioned()).unwrap();
    journal.set_fid(1, &record("one", OpenRecord::None));
    drop(journal);
    // Half a record's worth of garbage past the log, as a kill mid-write leaves.
    let size = file.metadata().unwrap().len();
    file.write_all_at(&[0x20, 0, 0, 0, 1, 2, 3], size).unwrap();
    let replayed = load(&file).unwrap();
    assert_eq!(replayed.fids.len(), 1);
    let journal = Journal::start(file.try_clone().unwrap(), &replayed).unwrap();
    journal.set_fid(2, &record("two", OpenRecord::Flags(0)));
    let replayed = load(&file).unwrap();
    assert_eq!(replayed.fids.len(), 2);
    assert_eq!(replayed.fids[&2].path, PathBuf::from("two"));
}

#[test]
fn compaction_keeps_the_table_and_frees_the_log() {
    let file = new_journal().unwrap();
    let journal = Journal::start(file.try_clone().unwrap(), &versioned()).unwrap();
    let path = "d/".repeat(60) + "file";
    for round in 0..20_000u32 {
        journal.set_fid(round % 50, &record(&path, OpenRecord::None));
        if round % 3 == 0 {
            journal.clunk(round % 50);
        }
    }
    let replayed = load(&file).unwrap();
    let expected = (0..50u32)
        .filter(|fid| {
            let last = (0..20_000u32).rev().find(|r| r % 50 == *fid).unwrap();
            last % 3 != 0
        })
        .count();
    assert_eq!(replayed.fids.len(), expected);
    let inner = journal.inner.lock().unwrap();
    assert!(inner.generation > 2, "never compacted");
    assert!(inner.tail - inner.start < 2 * COMPACT_AT);
    // The old generations' pages were given back: far less memory than was written.
    // SAFETY: fstat writes only into the struct passed.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(file.as_raw_fd(), &mut st) }, 0);
    assert!(
        (st.st_blocks as u64) * 512 < 4 * COMPACT_AT,
        "{} blocks",
        st.st_blocks
    );
}

/// Writes a generation-1 journal whose log is `payloads`, as a hostile worker could.
fn forged(payloads: &[Vec<u8>]) -> File {
    let file = new_journal().unwrap();
    file.write_all_at(&encode_header(1, PAGE), HEADER_SLOT)
        .unwrap();
    let mut log = Vec::new();
    push_record(&mut log, 1, &version_payload(8192));
    for payload in payloads {
        push_record(&mut log, 1, payload);
    }
    file.write_all_at(&log, PAGE).unwrap();
    file
}

fn fid_with_path(path: &[u8]) -> Vec<u8> {
    let mut payload = fid_payload(3, &record("x", OpenRecord::None)).unwrap();
    payload.truncate(payload.len() - 1);
    payload.extend_from_slice(path);
    payload
}

#[test]
fn hostile_records_are_refused() {
    assert_eq!(
        load(&forged(&[fid_with_path(b"fine/name")]))
            .unwrap()
            .fids
            .len(),
        1
    );
    for path in [
        &b"../etc"[..],
        b"a/../../b",
        b"/etc/passwd",
        b"a/./b",
        b".",
        b"a//b",
        b"a/",
        b"nul\0byte",
    ] {
        let error = load(&forged(&[fid_with_path(path)])).unwrap_err();
        assert!(
            matches!(error, JournalError::BadRecord { .. }),
            "{:?}: {error}",
            String::from_utf8_lossy(path)
        );
    }
    let mut bad_open = fid_payload(3, &record("x", OpenRecord::None)).unwrap();
    bad_open[9] = 9;
    let mut short = fid_payload(3, &record("", OpenRecord::None)).unwrap();
    short.truncate(10);
    for payload in [bad_open, short, vec![99, 1, 2], vec![KIND_CLUNK, 1]] {
        assert!(matches!(
            load(&forged(&[payload])),
            Err(JournalError::BadRecord { .. })
        ));
    }
    // A fid before any Tversion.
    let file = new_journal().unwrap();
    file.write_all_at(&encode_header(1, PAGE), 0).unwrap();
    let mut log = Vec::new();
    push_record(&mut log, 1, &fid_with_path(b"x"));
    file.write_all_at(&log, PAGE).unwrap();
    assert!(load(&file).is_err());
    // No header at all, or a header pointing nowhere sensible.
    let file = new_journal().unwrap();
    file.write_all_at(b"garbage", 0).unwrap();
    assert!(matches!(load(&file), Err(JournalError::NoHeader)));
    let file = new_journal().unwrap();
    let mut header = encode_header(1, 17);
    header[27] ^= 0;
    file.write_all_at(&header, 0).unwrap();
    assert!(matches!(load(&file), Err(JournalError::NoHeader)));
}

#[test]
fn a_journal_that_names_too_many_fids_is_refused() {
    let payloads: Vec<Vec<u8>> = (0..=MAX_FIDS as u32)
        .map(|fid| fid_payload(fid, &record("f", OpenRecord::None)).unwrap())
        .collect();
    assert!(matches!(
        load(&forged(&payloads)),
        Err(JournalError::BadRecord { .. })
    ));
}

#[test]
fn a_fid_too_deep_to_record_is_forgotten_not_left_as_it_was() {
    let file = new_journal().unwrap();
    let journal = Journal::start(file.try_clone().unwrap(), &versioned()).unwrap();
    journal.set_fid(1, &record("short", OpenRecord::None));
    let deep = "d/".repeat(MAX_PATH_LEN / 2) + "f";
    journal.set_fid(1, &record(&deep, OpenRecord::None));
    assert!(load(&file).unwrap().fids.is_empty());
}

#[test]
fn a_journal_claiming_to_be_huge_costs_no_memory_and_is_bounded() {
    // Valid records, then sparse zeros to 256 MiB: read a window at a time.
    let file = forged(&[fid_with_path(b"kept")]);
    file.set_len(256 << 20).unwrap();
    assert_eq!(load(&file).unwrap().fids.len(), 1);
    file.set_len(PAGE + MAX_GENERATION_BYTES + 1).unwrap();
    assert!(matches!(load(&file), Err(JournalError::TooLarge { .. })));
}
