//! The 9P2000.L server: one [`Export`] (the shared directory and its options) and one
//! [`Session`] per client connection, holding that client's fids and negotiated msize.
//!
//! A request is a byte buffer in and a reply is a byte buffer out
//! ([`Session::handle`]); framing and delivery belong to the transport - the Unix socket
//! debug transport today, a virtio queue tomorrow - so the same handler serves both.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use thiserror::Error;

use super::confined::{self, cstring, name_path, open_beneath, open_path, Root};
use super::journal::{self, FidRecord, Journal, OpenRecord, Replayed};
use super::messages::{
    self, lock, parse, push_dirent, setattr, Attr, Lock, ParseError, Reply, Request, SetAttr,
    StatFs, IO_HEADER_LEN, MAXWELEM, NOTAG,
};
use super::wire::{Qid, QT_DIR, QT_FILE, QT_SYMLINK};

/// Largest msize the server agrees to.
pub const MAX_MSIZE: u32 = 512 * 1024;
/// Smallest msize it accepts: every reply but Rread/Rreaddir data fits well within.
pub const MIN_MSIZE: u32 = 4096;
/// Frames a client may send before Tversion: enough for Tversion itself.
const PRE_VERSION_MSIZE: u32 = 8192;
/// The only protocol spoken.
pub const VERSION: &str = "9P2000.L";
/// Largest extended attribute value accepted (the kernel's XATTR_SIZE_MAX).
const XATTR_MAX: u64 = 64 * 1024;
/// Longest a Tflush waits for the request it names before replying anyway.
const FLUSH_WAIT: Duration = Duration::from_secs(10);
/// Most fids one session may hold: each holds a descriptor, and one client must not take
/// them all.
const MAX_FIDS: usize = 64 * 1024;
/// Rgetattr's valid mask: the basic fields (mode through blocks and the three times).
const GETATTR_BASIC: u64 = 0x7ff;

/// 9P2000.L open flags (Linux's generic values; translated, not assumed equal).
mod dotl {
    pub const ACCMODE: u32 = 0o3;
    pub const CREATE: u32 = 0o100;
    pub const EXCL: u32 = 0o200;
    pub const TRUNC: u32 = 0o1000;
    pub const APPEND: u32 = 0o2000;
    pub const NONBLOCK: u32 = 0o4000;
    pub const DSYNC: u32 = 0o10000;
    pub const DIRECTORY: u32 = 0o200000;
    pub const NOATIME: u32 = 0o1000000;
    pub const SYNC: u32 = 0o4000000;
}

/// An errno to send back in Rlerror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("errno {0}")]
pub struct Errno(pub i32);

impl From<io::Error> for Errno {
    fn from(error: io::Error) -> Self {
        Errno(error.raw_os_error().unwrap_or(libc::EIO))
    }
}

type Result<T> = std::result::Result<T, Errno>;

fn err<T>(errno: i32) -> Result<T> {
    Err(Errno(errno))
}

/// What a frame handed to the server could not be answered because of.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a 9P message: {0}")]
    Garbage(#[from] super::wire::WireError),
}

/// The shared directory and how it is shared; one per worker, shared by every session.
#[derive(Debug)]
pub struct Export {
    root: Root,
    root_dev: libc::dev_t,
    read_only: bool,
    /// Running as root: pass the client's uid, gid and modes through. Otherwise every
    /// file belongs to the running user and ownership changes are accepted and ignored.
    as_root: bool,
}

impl Export {
    pub fn new(root: Root, read_only: bool) -> Self {
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        // A root that cannot be stat'ed fails every request anyway; 0 only disables the
        // mixing of device numbers into qids.
        let root_dev = confined::stat(root.fd()).map_or(0, |st| st.st_dev);
        Export {
            root,
            root_dev,
            read_only,
            as_root,
        }
    }

    /// Drops ownership pass-through: every file belongs to the running user and
    /// ownership changes are accepted and ignored, as for an ordinary user. For a worker
    /// that sandboxes itself: the sandbox drops CAP_CHOWN (and every other capability),
    /// so even as root it could not give files away.
    pub fn without_ownership(mut self) -> Self {
        self.as_root = false;
        self
    }

    /// The qid of a file: its inode number, made distinct for files on other file
    /// systems mounted inside the share (their numbers would otherwise collide with the
    /// share's own, and the client takes qid paths for inode identity).
    fn qid(&self, st: &libc::stat) -> Qid {
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => QT_DIR,
            libc::S_IFLNK => QT_SYMLINK,
            _ => QT_FILE,
        };
        let path = if st.st_dev == self.root_dev {
            st.st_ino
        } else {
            // The top bit keeps these apart from the share's own inode numbers (which
            // real file systems keep far below it); the device spreads the rest.
            (st.st_ino ^ st.st_dev.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | (1 << 63)
        };
        Qid {
            kind,
            version: 0,
            path,
        }
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            err(libc::EROFS)
        } else {
            Ok(())
        }
    }
}

/// What an open fid reads and writes.
#[derive(Debug, Clone)]
enum Open {
    /// Not opened: only walks, getattr and other path operations.
    None,
    File(Arc<File>),
    /// A directory; its mutex keeps seek-then-getdents atomic.
    Dir(Arc<Mutex<File>>),
    /// The value (or list) a Txattrwalk read, served by Tread.
    XattrRead(Arc<Vec<u8>>),
    /// A Txattrcreate in progress: Twrites fill it, Tclunk sets it.
    XattrWrite(Arc<Mutex<XattrWrite>>),
}

#[derive(Debug)]
struct XattrWrite {
    file: File,
    name: CString,
    size: u64,
    flags: i32,
    value: Vec<u8>,
}

/// A fid: a file the client named, beneath the root.
#[derive(Debug)]
struct Fid {
    /// `O_PATH` (or, after Tlcreate, an open) descriptor: stat, chown, utimes and walks
    /// start here.
    fd: Arc<OwnedFd>,
    qid: Qid,
    /// Relative to the root; for `..`, reopening, and the parent of rename/remove/link.
    path: PathBuf,
    /// The attaching user, for the owner of files it creates when running as root.
    uid: u32,
    open: Open,
    /// How it was opened, as the journal records it for a replacement worker.
    reopen: OpenRecord,
}

impl Fid {
    fn record(&self) -> FidRecord {
        FidRecord {
            uid: self.uid,
            open: self.reopen,
            qid_path: self.qid.path,
            path: self.path.clone(),
        }
    }
}

type FidRef = Arc<Mutex<Fid>>;

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere left the data as consistent as any error path would.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One client's state: its fids, negotiated msize and the requests it has in flight.
#[derive(Debug)]
pub struct Session {
    export: Arc<Export>,
    msize: AtomicU32,
    versioned: AtomicBool,
    fids: Mutex<HashMap<u32, FidRef>>,
    /// Fids a replacement worker could not rebuild (their file is gone, or they were
    /// xattr fids): every request on them but Tclunk answers ESTALE.
    stale: Mutex<HashSet<u32>>,
    /// Where the fids are recorded for a replacement worker, if anywhere.
    journal: Option<Arc<Journal>>,
    in_flight: Mutex<HashMap<u16, usize>>,
    finished: Condvar,
}

/// A request accepted by a session, its tag counted in flight until this is dropped (so
/// a Tflush for it waits for the reply instead of overtaking it).
#[derive(Debug)]
pub struct Pending {
    session: Arc<Session>,
    frame: Vec<u8>,
    tag: Option<u16>,
}

impl Pending {
    /// True for a Tflush: answering it waits until the request it names is answered, so
    /// a transport must not let it hold up the handling of the requests before it.
    pub fn waits_for_others(&self) -> bool {
        messages::parse_header(&self.frame).is_ok_and(|h| h.kind == messages::kind::TFLUSH)
    }

    /// Handles the request and returns the reply frame, or an error when the frame is not
    /// 9P at all (the transport should then drop the connection). The request stays in
    /// flight until this `Pending` is dropped: drop it once the reply is on its way, so
    /// that a Tflush for it cannot overtake the reply.
    pub fn handle(&self) -> std::result::Result<Vec<u8>, FrameError> {
        self.session.dispatch(&self.frame)
    }

    fn complete(&mut self) {
        if let Some(tag) = self.tag.take() {
            let mut in_flight = lock_ignoring_poison(&self.session.in_flight);
            if let Some(count) = in_flight.get_mut(&tag) {
                *count -= 1;
                if *count == 0 {
                    in_flight.remove(&tag);
                }
            }
            self.session.finished.notify_all();
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.complete();
    }
}

impl Session {
    pub fn new(export: Arc<Export>) -> Arc<Self> {
        Arc::new(Self::unversioned(export, None))
    }

    fn unversioned(export: Arc<Export>, journal: Option<Arc<Journal>>) -> Self {
        Session {
            export,
            msize: AtomicU32::new(PRE_VERSION_MSIZE),
            versioned: AtomicBool::new(false),
            fids: Mutex::new(HashMap::new()),
            stale: Mutex::new(HashSet::new()),
            journal,
            in_flight: Mutex::new(HashMap::new()),
            finished: Condvar::new(),
        }
    }

    /// A session recorded in `journal` (which another session may have recorded in
    /// before: a device reset starts afresh, as a Tversion does).
    pub fn journaled(export: Arc<Export>, journal: Arc<Journal>) -> Arc<Self> {
        journal.version(None);
        Arc::new(Self::unversioned(export, Some(journal)))
    }

    /// The session a previous worker recorded in `file`, rebuilt: its msize, and every
    /// fid reopened beneath the root as it was (a fid whose file is gone, or another
    /// file now, is stale). A journal that does not check is logged and ignored: the
    /// session then starts afresh, as without one. Returns the journal, recording from
    /// now on, for later sessions of the same device.
    pub fn restore(export: Arc<Export>, file: File) -> (Arc<Self>, Option<Arc<Journal>>) {
        let mut replayed = journal::load(&file).unwrap_or_else(|e| {
            tracing::warn!("{e}; the guest's fids are not rebuilt");
            Replayed::default()
        });
        let mut session = Self::unversioned(export, None);
        match replayed.msize {
            Some(msize) if (MIN_MSIZE..=MAX_MSIZE).contains(&msize) => {
                session.msize.store(msize, Ordering::Relaxed);
                session.versioned.store(true, Ordering::Release);
            }
            Some(msize) => {
                tracing::warn!("session journal: msize {msize} out of range; not rebuilt");
                replayed = Replayed::default();
            }
            None => {}
        }
        let mut stale = 0;
        for (&number, record) in &replayed.fids {
            match session.rebuild(record) {
                Ok(fid) => {
                    lock_ignoring_poison(&session.fids).insert(number, Arc::new(Mutex::new(fid)));
                }
                Err(Errno(errno)) => {
                    tracing::debug!(
                        "fid {number} ({}): stale, errno {errno}",
                        record.path.display()
                    );
                    stale += 1;
                    lock_ignoring_poison(&session.stale).insert(number);
                }
            }
        }
        if replayed.msize.is_some() {
            tracing::info!(
                "session rebuilt from its journal: {} fids, {stale} of them stale",
                replayed.fids.len()
            );
        }
        let journal = match Journal::start(file, &replayed) {
            Ok(journal) => Some(Arc::new(journal)),
            Err(e) => {
                tracing::warn!("session journal: {e}; this session is not recorded");
                None
            }
        };
        session.journal = journal.clone();
        (Arc::new(session), journal)
    }

    /// A fid as a journal recorded it, reopened by the confined lookups from the root.
    fn rebuild(&self, record: &FidRecord) -> Result<Fid> {
        if record.open == OpenRecord::Xattr {
            return err(libc::ESTALE);
        }
        let fd = open_path(self.export.root.fd(), &record.path)?;
        let st = confined::stat(fd.as_fd())?;
        let qid = self.export.qid(&st);
        if qid.path != record.qid_path {
            return err(libc::ESTALE);
        }
        let open = match record.open {
            OpenRecord::Flags(flags) => match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => Open::Dir(Arc::new(Mutex::new(self.reopen(
                    &record.path,
                    &st,
                    libc::O_RDONLY | libc::O_DIRECTORY,
                )?))),
                libc::S_IFREG => {
                    // Created and truncated already: opening again must do neither.
                    let flags = flags & !(dotl::CREATE | dotl::EXCL | dotl::TRUNC);
                    if flags & dotl::ACCMODE != 0 {
                        self.export.writable()?;
                    }
                    Open::File(Arc::new(self.reopen(
                        &record.path,
                        &st,
                        open_flags(flags),
                    )?))
                }
                _ => return err(libc::ESTALE),
            },
            _ => Open::None,
        };
        Ok(Fid {
            fd: Arc::new(fd),
            qid,
            path: record.path.clone(),
            uid: record.uid,
            open,
            reopen: record.open,
        })
    }

    fn journal_fid(&self, number: u32, fid: &Fid) {
        if let Some(journal) = &self.journal {
            journal.set_fid(number, &fid.record());
        }
    }

    /// The largest frame the client may send now (and the server will send).
    pub fn msize(&self) -> u32 {
        self.msize.load(Ordering::Relaxed)
    }

    /// Accepts a frame for handling, possibly on another thread.
    pub fn receive(self: &Arc<Self>, frame: Vec<u8>) -> Pending {
        let tag = messages::parse_header(&frame)
            .ok()
            .filter(|h| h.kind != messages::kind::TFLUSH)
            .map(|h| h.tag);
        if let Some(tag) = tag {
            *lock_ignoring_poison(&self.in_flight)
                .entry(tag)
                .or_insert(0) += 1;
        }
        Pending {
            session: self.clone(),
            frame,
            tag,
        }
    }

    /// Handles one request frame now and returns its reply frame.
    pub fn handle(self: &Arc<Self>, frame: &[u8]) -> std::result::Result<Vec<u8>, FrameError> {
        self.receive(frame.to_vec()).handle()
        // The Pending is dropped here, after the reply exists; the caller sends it.
    }

    fn dispatch(&self, frame: &[u8]) -> std::result::Result<Vec<u8>, FrameError> {
        let tagged = match parse(frame) {
            Ok(tagged) => tagged,
            Err(ParseError::NoHeader(e)) => return Err(FrameError::Garbage(e)),
            Err(ParseError::Body { tag, error }) => {
                tracing::debug!("malformed request (tag {tag}): {error}");
                return Ok(Reply::Lerror(libc::EPROTO as u32).encode(tag));
            }
            Err(ParseError::Unknown { tag, kind }) => {
                tracing::debug!("unsupported request type {kind} (tag {tag})");
                return Ok(Reply::Lerror(libc::EOPNOTSUPP as u32).encode(tag));
            }
        };
        let tag = tagged.tag;
        let reply = if frame.len() > self.msize() as usize {
            Err(Errno(libc::EMSGSIZE))
        } else if !self.versioned.load(Ordering::Acquire)
            && !matches!(tagged.request, Request::Version { .. })
        {
            Err(Errno(libc::EPROTO))
        } else {
            self.serve(tagged.request)
        };
        let reply = reply.unwrap_or_else(|Errno(errno)| {
            tracing::trace!("tag {tag}: errno {errno}");
            Reply::Lerror(errno as u32)
        });
        Ok(reply.encode(tag))
    }

    fn fid(&self, fid: u32) -> Result<FidRef> {
        let found = lock_ignoring_poison(&self.fids).get(&fid).cloned();
        found.ok_or_else(|| self.missing(fid))
    }

    /// The errno for a fid the table lacks: ESTALE for one a restart could not rebuild.
    fn missing(&self, fid: u32) -> Errno {
        if lock_ignoring_poison(&self.stale).contains(&fid) {
            Errno(libc::ESTALE)
        } else {
            Errno(libc::EBADF)
        }
    }

    /// A copy of the fid's fields that path operations need, without holding its lock.
    fn node(&self, fid: u32) -> Result<(Arc<OwnedFd>, Qid, PathBuf, u32)> {
        let fid = self.fid(fid)?;
        let fid = lock_ignoring_poison(&fid);
        Ok((fid.fd.clone(), fid.qid, fid.path.clone(), fid.uid))
    }

    fn dir_node(&self, fid: u32) -> Result<(Arc<OwnedFd>, PathBuf, u32)> {
        let (fd, qid, path, uid) = self.node(fid)?;
        if !qid.is_dir() {
            return err(libc::ENOTDIR);
        }
        Ok((fd, path, uid))
    }

    fn open_of(&self, fid: u32) -> Result<Open> {
        let fid = self.fid(fid)?;
        let open = lock_ignoring_poison(&fid).open.clone();
        Ok(open)
    }

    /// Adds `fid`; fails when the number is taken (unless `replace`).
    fn insert(&self, number: u32, fid: Fid, replace: bool) -> Result<()> {
        let record = self.journal.is_some().then(|| fid.record());
        {
            let mut fids = lock_ignoring_poison(&self.fids);
            if !replace
                && (fids.contains_key(&number)
                    || lock_ignoring_poison(&self.stale).contains(&number))
            {
                return err(libc::EBADF);
            }
            if fids.len() >= MAX_FIDS && !fids.contains_key(&number) {
                return err(libc::EMFILE);
            }
            fids.insert(number, Arc::new(Mutex::new(fid)));
        }
        if let (Some(journal), Some(record)) = (&self.journal, record) {
            journal.set_fid(number, &record);
        }
        Ok(())
    }

    fn io_limit(&self) -> u32 {
        self.msize() - IO_HEADER_LEN
    }

    fn serve(&self, request: Request) -> Result<Reply> {
        match request {
            Request::Version { msize, version } => self.version(msize, &version),
            // No authentication: ENOENT is what clients read as "none required".
            Request::Auth { .. } => err(libc::ENOENT),
            Request::Attach {
                fid,
                uname,
                aname,
                n_uname,
                ..
            } => self.attach(fid, &uname, &aname, n_uname),
            Request::Flush { oldtag } => {
                self.flush(oldtag);
                Ok(Reply::Flush)
            }
            Request::Walk { fid, newfid, names } => self.walk(fid, newfid, &names),
            Request::Read { fid, offset, count } => self.read(fid, offset, count),
            Request::Write { fid, offset, data } => self.write(fid, offset, &data),
            Request::Clunk { fid } => self.clunk(fid).map(|()| Reply::Clunk),
            Request::Remove { fid } => self.remove(fid).map(|()| Reply::Remove),
            Request::Statfs { fid } => self.statfs(fid),
            Request::Lopen { fid, flags } => self.lopen(fid, flags),
            Request::Lcreate {
                fid,
                name,
                flags,
                mode,
                gid,
            } => self.lcreate(fid, &name, flags, mode, gid),
            Request::Symlink {
                fid,
                name,
                target,
                gid,
            } => self.symlink(fid, &name, &target, gid),
            Request::Mknod {
                dfid,
                name,
                mode,
                major,
                minor,
                gid,
            } => self.mknod(dfid, &name, mode, major, minor, gid),
            Request::Rename { fid, dfid, name } => {
                self.rename(fid, dfid, &name).map(|()| Reply::Rename)
            }
            Request::Readlink { fid } => self.readlink(fid),
            Request::Getattr { fid, .. } => self.getattr(fid),
            Request::Setattr { fid, attr } => self.setattr(fid, &attr).map(|()| Reply::Setattr),
            Request::XattrWalk { fid, newfid, name } => self.xattr_walk(fid, newfid, &name),
            Request::XattrCreate {
                fid,
                name,
                size,
                flags,
            } => self.xattr_create(fid, &name, size, flags),
            Request::Readdir { fid, offset, count } => self.readdir(fid, offset, count),
            Request::Fsync { fid, datasync } => self.fsync(fid, datasync),
            Request::Lock { fid, lock } => self.lock(fid, &lock),
            Request::GetLock { fid, lock } => self.getlock(fid, lock),
            Request::Link { dfid, fid, name } => self.link(dfid, fid, &name),
            Request::Mkdir {
                dfid,
                name,
                mode,
                gid,
            } => self.mkdir(dfid, &name, mode, gid),
            Request::Renameat {
                olddirfid,
                oldname,
                newdirfid,
                newname,
            } => self
                .renameat(olddirfid, &oldname, newdirfid, &newname)
                .map(|()| Reply::Renameat),
            Request::Unlinkat {
                dirfid,
                name,
                flags,
            } => self.unlinkat(dirfid, &name, flags),
        }
    }

    fn version(&self, msize: u32, version: &str) -> Result<Reply> {
        if msize < MIN_MSIZE {
            return err(libc::EINVAL);
        }
        let msize = msize.min(MAX_MSIZE);
        // A Tversion starts a new session: every fid of the old one goes.
        lock_ignoring_poison(&self.fids).clear();
        lock_ignoring_poison(&self.stale).clear();
        if !version.starts_with(VERSION) {
            if let Some(journal) = &self.journal {
                journal.version(None);
            }
            self.versioned.store(false, Ordering::Release);
            return Ok(Reply::Version {
                msize,
                version: "unknown".into(),
            });
        }
        if let Some(journal) = &self.journal {
            journal.version(Some(msize));
        }
        self.msize.store(msize, Ordering::Relaxed);
        self.versioned.store(true, Ordering::Release);
        Ok(Reply::Version {
            msize,
            version: VERSION.into(),
        })
    }

    fn attach(&self, fid: u32, uname: &str, aname: &str, n_uname: u32) -> Result<Reply> {
        // One share per export: the aname only names it for humans (diod's tools send
        // "ctl" unless told otherwise), so any is accepted.
        tracing::debug!("attach fid {fid} uname {uname:?} n_uname {n_uname} aname {aname:?}");
        let fd = open_path(self.export.root.fd(), Path::new(""))?;
        let qid = self.export.qid(&confined::stat(fd.as_fd())?);
        self.insert(
            fid,
            Fid {
                fd: Arc::new(fd),
                qid,
                path: PathBuf::new(),
                uid: n_uname,
                open: Open::None,
                reopen: OpenRecord::None,
            },
            false,
        )?;
        Ok(Reply::Attach(qid))
    }

    fn flush(&self, oldtag: u16) {
        if oldtag == NOTAG {
            return;
        }
        let deadline = Instant::now() + FLUSH_WAIT;
        let mut in_flight = lock_ignoring_poison(&self.in_flight);
        while in_flight.contains_key(&oldtag) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("Tflush: tag {oldtag} still running after {FLUSH_WAIT:?}");
                return;
            }
            in_flight = self
                .finished
                .wait_timeout(in_flight, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    fn walk(&self, fid: u32, newfid: u32, names: &[Vec<u8>]) -> Result<Reply> {
        if names.len() > MAXWELEM {
            return err(libc::EINVAL);
        }
        for name in names {
            check_walk_name(name)?;
        }
        let (fd, qid, path, uid) = self.node(fid)?;
        if newfid != fid && lock_ignoring_poison(&self.fids).contains_key(&newfid) {
            return err(libc::EBADF);
        }
        if !names.is_empty() && !qid.is_dir() {
            return err(libc::ENOTDIR);
        }
        let root = self.export.root.fd();
        let mut current = (fd, qid, path);
        let mut qids = Vec::with_capacity(names.len());
        for name in names {
            match self.walk_one(root, &current, name) {
                Ok(next) => {
                    qids.push(next.1);
                    current = next;
                }
                Err(e) if qids.is_empty() => return Err(e),
                // A partial walk: the qids so far, and newfid is not created.
                Err(_) => return Ok(Reply::Walk(qids)),
            }
        }
        let (fd, qid, path) = current;
        let fd = if names.is_empty() {
            // A clone gets its own descriptor, independent of the original's lifetime.
            Arc::new(fd.try_clone()?)
        } else {
            fd
        };
        self.insert(
            newfid,
            Fid {
                fd,
                qid,
                path,
                uid,
                open: Open::None,
                reopen: OpenRecord::None,
            },
            newfid == fid,
        )?;
        Ok(Reply::Walk(qids))
    }

    fn walk_one(
        &self,
        root: BorrowedFd<'_>,
        (fd, qid, path): &(Arc<OwnedFd>, Qid, PathBuf),
        name: &[u8],
    ) -> Result<(Arc<OwnedFd>, Qid, PathBuf)> {
        if !qid.is_dir() {
            return err(libc::ENOTDIR);
        }
        let (next_fd, next_path) = match name {
            b"." => (fd.try_clone()?, path.clone()),
            b".." => {
                // `..` of the root is the root; elsewhere the parent is looked up from
                // the root again (openat2 would refuse `..` from the directory itself).
                let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
                (open_path(root, &parent)?, parent)
            }
            _ => {
                let next = open_beneath(fd.as_fd(), &cstring(name)?, libc::O_PATH, 0)?;
                (next, path.join(name_path(name)))
            }
        };
        let qid = self.export.qid(&confined::stat(next_fd.as_fd())?);
        Ok((Arc::new(next_fd), qid, next_path))
    }

    fn read(&self, fid: u32, offset: u64, count: u32) -> Result<Reply> {
        let count = count.min(self.io_limit()) as usize;
        match self.open_of(fid)? {
            Open::File(file) => {
                let mut buf = vec![0u8; count];
                let n = read_at(&file, &mut buf, offset)?;
                buf.truncate(n);
                Ok(Reply::Read(buf))
            }
            Open::XattrRead(value) => {
                let start = usize::try_from(offset)
                    .unwrap_or(usize::MAX)
                    .min(value.len());
                let end = start.saturating_add(count).min(value.len());
                Ok(Reply::Read(value[start..end].to_vec()))
            }
            Open::Dir(_) => err(libc::EISDIR),
            Open::None | Open::XattrWrite(_) => err(libc::EBADF),
        }
    }

    fn write(&self, fid: u32, offset: u64, data: &[u8]) -> Result<Reply> {
        match self.open_of(fid)? {
            Open::File(file) => {
                let n = file.write_at(data, offset)?;
                Ok(Reply::Write(n as u32))
            }
            Open::XattrWrite(pending) => {
                let mut pending = lock_ignoring_poison(&pending);
                if offset != pending.value.len() as u64 {
                    return err(libc::EINVAL);
                }
                if pending.value.len() as u64 + data.len() as u64 > pending.size {
                    return err(libc::ENOSPC);
                }
                pending.value.extend_from_slice(data);
                Ok(Reply::Write(data.len() as u32))
            }
            Open::Dir(_) => err(libc::EISDIR),
            Open::None | Open::XattrRead(_) => err(libc::EBADF),
        }
    }

    fn clunk(&self, fid: u32) -> Result<()> {
        let removed = lock_ignoring_poison(&self.fids).remove(&fid);
        let removed = match removed {
            Some(removed) => removed,
            None => {
                // A stale fid is the client's until it clunks it.
                if !lock_ignoring_poison(&self.stale).remove(&fid) {
                    return err(libc::EBADF);
                }
                if let Some(journal) = &self.journal {
                    journal.clunk(fid);
                }
                return Ok(());
            }
        };
        if let Some(journal) = &self.journal {
            journal.clunk(fid);
        }
        let open = lock_ignoring_poison(&removed).open.clone();
        if let Open::XattrWrite(pending) = open {
            let pending = lock_ignoring_poison(&pending);
            if pending.value.len() as u64 != pending.size {
                return err(libc::EINVAL);
            }
            // An empty value is how the Linux client removes an attribute.
            if pending.size == 0 {
                confined::remove_xattr(&pending.file, &pending.name)?;
            } else {
                confined::set_xattr(&pending.file, &pending.name, &pending.value, pending.flags)?;
            }
        }
        Ok(())
    }

    fn remove(&self, fid: u32) -> Result<()> {
        // Tremove clunks the fid whether or not the removal succeeds.
        let node = self.node(fid);
        let _ = self.clunk(fid);
        let (_, qid, path, _) = node?;
        self.export.writable()?;
        let (parent, name) = self.parent_of(&path)?;
        let flags = if qid.is_dir() { libc::AT_REMOVEDIR } else { 0 };
        confined::unlinkat(parent.as_fd(), &name, flags)?;
        Ok(())
    }

    /// The parent directory of `path` (opened beneath the root) and its last name.
    fn parent_of(&self, path: &Path) -> Result<(OwnedFd, CString)> {
        let name = path.file_name().ok_or(Errno(libc::EBUSY))?;
        let parent = path.parent().unwrap_or(Path::new(""));
        let fd = open_path(self.export.root.fd(), parent)?;
        Ok((fd, cstring(name.as_bytes())?))
    }

    fn statfs(&self, fid: u32) -> Result<Reply> {
        let (fd, ..) = self.node(fid)?;
        let s = confined::statfs(fd.as_fd())?;
        // SAFETY: fsid_t is two plain ints; reading them through a same-sized array is
        // what the libc accessor would do.
        let fsid: [i32; 2] = unsafe { std::mem::transmute(s.f_fsid) };
        Ok(Reply::Statfs(StatFs {
            kind: s.f_type as u32,
            bsize: s.f_bsize as u32,
            blocks: s.f_blocks,
            bfree: s.f_bfree,
            bavail: s.f_bavail,
            files: s.f_files,
            ffree: s.f_ffree,
            fsid: u64::from(fsid[0] as u32) | (u64::from(fsid[1] as u32) << 32),
            namelen: s.f_namelen as u32,
        }))
    }

    fn lopen(&self, fid: u32, flags: u32) -> Result<Reply> {
        let fid_ref = self.fid(fid)?;
        let (fd, qid, path) = {
            let fid = lock_ignoring_poison(&fid_ref);
            if !matches!(fid.open, Open::None) {
                return err(libc::EBADF);
            }
            (fid.fd.clone(), fid.qid, fid.path.clone())
        };
        let st = confined::stat(fd.as_fd())?;
        let file_type = st.st_mode & libc::S_IFMT;
        let writes = flags & dotl::ACCMODE != 0 || flags & dotl::TRUNC != 0;
        if writes {
            self.export.writable()?;
        }
        let open = match file_type {
            libc::S_IFDIR => {
                if flags & dotl::ACCMODE != 0 {
                    return err(libc::EISDIR);
                }
                let file = self.reopen(&path, &st, libc::O_RDONLY | libc::O_DIRECTORY)?;
                Open::Dir(Arc::new(Mutex::new(file)))
            }
            libc::S_IFREG => {
                if flags & dotl::DIRECTORY != 0 {
                    return err(libc::ENOTDIR);
                }
                Open::File(Arc::new(self.reopen(&path, &st, open_flags(flags))?))
            }
            libc::S_IFLNK => return err(libc::ELOOP),
            // Devices, FIFOs and sockets are the client's to handle (the Linux client
            // never opens them here); opening a device node on the host would hand the
            // guest that host device.
            _ => return err(libc::EOPNOTSUPP),
        };
        let mut fid_state = lock_ignoring_poison(&fid_ref);
        if !matches!(fid_state.open, Open::None) {
            return err(libc::EBADF);
        }
        fid_state.open = open;
        fid_state.reopen = OpenRecord::Flags(flags);
        self.journal_fid(fid, &fid_state);
        Ok(Reply::Lopen { qid, iounit: 0 })
    }

    /// Opens `path` again for I/O beneath the root, and checks it is still the file the
    /// fid named (a rename on the host since would otherwise switch files under it).
    fn reopen(&self, path: &Path, expected: &libc::stat, flags: i32) -> Result<File> {
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        // O_NONBLOCK: should a FIFO have taken the file's place on the host, opening it
        // must not block (it is then refused as another file); regular files and
        // directories ignore the flag.
        let fd = open_beneath(
            self.export.root.fd(),
            &cstring(path.as_os_str().as_bytes())?,
            flags | libc::O_NONBLOCK,
            0,
        )?;
        let st = confined::stat(fd.as_fd())?;
        if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino) {
            return err(libc::ESTALE);
        }
        Ok(File::from(fd))
    }

    fn lcreate(&self, fid: u32, name: &[u8], flags: u32, mode: u32, gid: u32) -> Result<Reply> {
        self.export.writable()?;
        let name = check_name(name)?;
        let fid_ref = self.fid(fid)?;
        let (dir, path, uid) = {
            let fid = lock_ignoring_poison(&fid_ref);
            if !fid.qid.is_dir() {
                return err(libc::ENOTDIR);
            }
            if !matches!(fid.open, Open::None) {
                return err(libc::EBADF);
            }
            (fid.fd.clone(), fid.path.clone(), fid.uid)
        };
        let flags_requested = flags;
        let flags = open_flags(flags) & !libc::O_DIRECTORY;
        // Created here (O_EXCL), or, unless the client asked for O_EXCL, the file that
        // already has that name opened as it is: only a new file gets the client's owner.
        let created = open_beneath(
            dir.as_fd(),
            &name,
            flags | libc::O_CREAT | libc::O_EXCL,
            mode & 0o7777,
        );
        let fd = match created {
            Ok(fd) => {
                if self.export.as_root {
                    confined::chown(fd.as_fd(), Some(uid), Some(gid))?;
                }
                fd
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                // O_NONBLOCK: a FIFO by that name must not block the open (it is
                // refused below); regular files ignore the flag.
                let fd = open_beneath(dir.as_fd(), &name, flags | libc::O_NONBLOCK, 0)?;
                if confined::stat(fd.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return err(libc::EEXIST);
                }
                fd
            }
            Err(e) => return Err(e.into()),
        };
        let qid = self.export.qid(&confined::stat(fd.as_fd())?);
        let file = File::from(fd);
        let node = file.try_clone()?;
        let mut fid_state = lock_ignoring_poison(&fid_ref);
        fid_state.fd = Arc::new(OwnedFd::from(node));
        fid_state.qid = qid;
        fid_state.path = path.join(name_path(name.as_bytes()));
        fid_state.open = Open::File(Arc::new(file));
        fid_state.reopen = OpenRecord::Flags(flags_requested);
        self.journal_fid(fid, &fid_state);
        Ok(Reply::Lcreate { qid, iounit: 0 })
    }

    /// After creating `name` in `dir`: its owner when running as root, and its qid.
    fn created(&self, dir: &OwnedFd, name: &CString, uid: u32, gid: u32) -> Result<Qid> {
        let fd = open_beneath(dir.as_fd(), name, libc::O_PATH, 0)?;
        if self.export.as_root {
            confined::chown(fd.as_fd(), Some(uid), Some(gid))?;
        }
        Ok(self.export.qid(&confined::stat(fd.as_fd())?))
    }

    fn symlink(&self, fid: u32, name: &[u8], target: &[u8], gid: u32) -> Result<Reply> {
        self.export.writable()?;
        let name = check_name(name)?;
        if target.is_empty() {
            return err(libc::ENOENT);
        }
        let (dir, _, uid) = self.dir_node(fid)?;
        confined::symlinkat(&cstring(target)?, dir.as_fd(), &name)?;
        Ok(Reply::Symlink(self.created(&dir, &name, uid, gid)?))
    }

    fn mknod(
        &self,
        dfid: u32,
        name: &[u8],
        mode: u32,
        major: u32,
        minor: u32,
        gid: u32,
    ) -> Result<Reply> {
        self.export.writable()?;
        let name = check_name(name)?;
        let (dir, _, uid) = self.dir_node(dfid)?;
        match mode & libc::S_IFMT {
            libc::S_IFREG | libc::S_IFIFO | libc::S_IFSOCK => {}
            libc::S_IFCHR | libc::S_IFBLK if self.export.as_root => {}
            libc::S_IFCHR | libc::S_IFBLK => return err(libc::EPERM),
            _ => return err(libc::EINVAL),
        }
        let dev = libc::makedev(major, minor);
        confined::mknodat(dir.as_fd(), &name, mode & (libc::S_IFMT | 0o7777), dev)?;
        Ok(Reply::Mknod(self.created(&dir, &name, uid, gid)?))
    }

    fn mkdir(&self, dfid: u32, name: &[u8], mode: u32, gid: u32) -> Result<Reply> {
        self.export.writable()?;
        let name = check_name(name)?;
        let (dir, _, uid) = self.dir_node(dfid)?;
        confined::mkdirat(dir.as_fd(), &name, mode & 0o7777)?;
        Ok(Reply::Mkdir(self.created(&dir, &name, uid, gid)?))
    }

    fn link(&self, dfid: u32, fid: u32, name: &[u8]) -> Result<Reply> {
        self.export.writable()?;
        let name = check_name(name)?;
        let (dir, ..) = self.dir_node(dfid)?;
        let (_, qid, path, _) = self.node(fid)?;
        if qid.is_dir() {
            return err(libc::EPERM);
        }
        let (old_dir, old_name) = self.parent_of(&path)?;
        confined::linkat(old_dir.as_fd(), &old_name, dir.as_fd(), &name)?;
        Ok(Reply::Link)
    }

    fn rename(&self, fid: u32, dfid: u32, name: &[u8]) -> Result<()> {
        self.export.writable()?;
        let name = check_name(name)?;
        let (_, _, path, _) = self.node(fid)?;
        let (new_dir, new_dir_path, _) = self.dir_node(dfid)?;
        let (old_dir, old_name) = self.parent_of(&path)?;
        confined::renameat(old_dir.as_fd(), &old_name, new_dir.as_fd(), &name)?;
        self.renamed(&path, &new_dir_path.join(name_path(name.as_bytes())));
        Ok(())
    }

    fn renameat(
        &self,
        olddirfid: u32,
        oldname: &[u8],
        newdirfid: u32,
        newname: &[u8],
    ) -> Result<()> {
        self.export.writable()?;
        let oldname = check_name(oldname)?;
        let newname = check_name(newname)?;
        let (old_dir, old_dir_path, _) = self.dir_node(olddirfid)?;
        let (new_dir, new_dir_path, _) = self.dir_node(newdirfid)?;
        confined::renameat(old_dir.as_fd(), &oldname, new_dir.as_fd(), &newname)?;
        self.renamed(
            &old_dir_path.join(name_path(oldname.as_bytes())),
            &new_dir_path.join(name_path(newname.as_bytes())),
        );
        Ok(())
    }

    /// Moves every fid at or below `from` to the same place below `to`, so that later
    /// reopens and `..` walks find the renamed files.
    fn renamed(&self, from: &Path, to: &Path) {
        let fids: Vec<(u32, FidRef)> = lock_ignoring_poison(&self.fids)
            .iter()
            .map(|(&number, fid)| (number, fid.clone()))
            .collect();
        for (number, fid) in fids {
            let mut fid = lock_ignoring_poison(&fid);
            if let Ok(rest) = fid.path.strip_prefix(from) {
                fid.path = if rest.as_os_str().is_empty() {
                    to.to_path_buf()
                } else {
                    to.join(rest)
                };
                self.journal_fid(number, &fid);
            }
        }
    }

    fn unlinkat(&self, dirfid: u32, name: &[u8], flags: u32) -> Result<Reply> {
        self.export.writable()?;
        let name = check_name(name)?;
        let (dir, ..) = self.dir_node(dirfid)?;
        let flags = if flags & libc::AT_REMOVEDIR as u32 != 0 {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        confined::unlinkat(dir.as_fd(), &name, flags)?;
        Ok(Reply::Unlinkat)
    }

    fn readlink(&self, fid: u32) -> Result<Reply> {
        let (fd, qid, ..) = self.node(fid)?;
        if !qid.is_symlink() {
            return err(libc::EINVAL);
        }
        Ok(Reply::Readlink(confined::readlink(fd.as_fd())?))
    }

    fn getattr(&self, fid: u32) -> Result<Reply> {
        let (fd, ..) = self.node(fid)?;
        let st = confined::stat(fd.as_fd())?;
        Ok(Reply::Getattr(Attr {
            valid: GETATTR_BASIC,
            qid: self.export.qid(&st),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            nlink: st.st_nlink,
            rdev: st.st_rdev,
            size: st.st_size as u64,
            blksize: st.st_blksize as u64,
            blocks: st.st_blocks as u64,
            atime: (st.st_atime as u64, st.st_atime_nsec as u64),
            mtime: (st.st_mtime as u64, st.st_mtime_nsec as u64),
            ctime: (st.st_ctime as u64, st.st_ctime_nsec as u64),
        }))
    }

    fn setattr(&self, fid: u32, attr: &SetAttr) -> Result<()> {
        self.export.writable()?;
        let (fd, qid, path, _) = self.node(fid)?;
        let open = self.open_of(fid)?;
        let valid = attr.valid;
        if valid & setattr::MODE != 0 && !qid.is_symlink() {
            self.chmod(&fd, &path, &open, attr.mode & 0o7777)?;
        }
        if valid & (setattr::UID | setattr::GID) != 0 && self.export.as_root {
            let uid = (valid & setattr::UID != 0).then_some(attr.uid);
            let gid = (valid & setattr::GID != 0).then_some(attr.gid);
            confined::chown(fd.as_fd(), uid, gid)?;
        }
        if valid & setattr::SIZE != 0 {
            let size = i64::try_from(attr.size).map_err(|_| Errno(libc::EFBIG))?;
            if qid.is_dir() {
                return err(libc::EISDIR);
            }
            let file = match open {
                Open::File(ref file) => file.clone(),
                _ => {
                    let st = confined::stat(fd.as_fd())?;
                    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                        return err(libc::EINVAL);
                    }
                    Arc::new(self.reopen(&path, &st, libc::O_WRONLY)?)
                }
            };
            // SAFETY: no memory is passed.
            if unsafe { libc::ftruncate64(std::os::fd::AsRawFd::as_raw_fd(&*file), size) } < 0 {
                return Err(io::Error::last_os_error().into());
            }
        }
        if valid & (setattr::ATIME | setattr::MTIME | setattr::CTIME) != 0 {
            let time = |set: u32, explicit: u32, (sec, nsec): (u64, u64)| {
                if valid & set == 0 {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_OMIT,
                    }
                } else if valid & explicit != 0 {
                    libc::timespec {
                        tv_sec: sec as libc::time_t,
                        tv_nsec: (nsec % 1_000_000_000) as libc::c_long,
                    }
                } else {
                    libc::timespec {
                        tv_sec: 0,
                        tv_nsec: libc::UTIME_NOW,
                    }
                }
            };
            let atime = time(setattr::ATIME, setattr::ATIME_SET, attr.atime);
            let mtime = time(setattr::MTIME, setattr::MTIME_SET, attr.mtime);
            // CTIME alone: both times omitted still updates ctime, as the client asked.
            self.set_times(&fd, &path, &open, atime, mtime)?;
        }
        Ok(())
    }

    /// chmod of the fid's file: fchmodat2 on its `O_PATH` descriptor where the kernel
    /// has it (6.6), otherwise through an open descriptor.
    fn chmod(&self, fd: &OwnedFd, path: &Path, open: &Open, mode: u32) -> Result<()> {
        match confined::chmod_path_fd(fd.as_fd(), mode) {
            Err(e) if lacks_empty_path(&e) => Ok(confined::fchmod(
                &self.open_for_attr(fd, path, open)?,
                mode,
            )?),
            other => Ok(other?),
        }
    }

    /// Sets times on the fid's file: utimensat's AT_EMPTY_PATH on its `O_PATH`
    /// descriptor, otherwise through an open descriptor.
    fn set_times(
        &self,
        fd: &OwnedFd,
        path: &Path,
        open: &Open,
        atime: libc::timespec,
        mtime: libc::timespec,
    ) -> Result<()> {
        match confined::set_times(fd.as_fd(), atime, mtime) {
            Err(e) if lacks_empty_path(&e) => {
                let file = self.open_for_attr(fd, path, open)?;
                Ok(confined::futimens(&file, atime, mtime)?)
            }
            other => Ok(other?),
        }
    }

    /// An open descriptor of the fid's file for calls that refuse `O_PATH`: the fid's own
    /// when it is open, otherwise the file reopened (read-only, or write-only when only
    /// that is allowed). Symlinks and special files have none.
    fn open_for_attr(&self, fd: &OwnedFd, path: &Path, open: &Open) -> Result<File> {
        match open {
            Open::File(file) => return Ok(file.try_clone()?),
            Open::Dir(dir) => return Ok(lock_ignoring_poison(dir).try_clone()?),
            _ => {}
        }
        let st = confined::stat(fd.as_fd())?;
        let flags = match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => libc::O_RDONLY | libc::O_DIRECTORY,
            libc::S_IFREG => libc::O_RDONLY,
            _ => return err(libc::EOPNOTSUPP),
        };
        match self.reopen(path, &st, flags) {
            Err(Errno(libc::EACCES)) if st.st_mode & libc::S_IFMT == libc::S_IFREG => {
                self.reopen(path, &st, libc::O_WRONLY)
            }
            other => other,
        }
    }

    fn readdir(&self, fid: u32, offset: u64, count: u32) -> Result<Reply> {
        let Open::Dir(dir) = self.open_of(fid)? else {
            return err(libc::EBADF);
        };
        let limit = count.min(self.io_limit()) as usize;
        let dir = lock_ignoring_poison(&dir);
        confined::seek(&dir, offset)?;
        let mut buf = vec![0u8; limit.clamp(512, 64 * 1024)];
        let mut out = Vec::with_capacity(limit);
        'batches: loop {
            let entries = confined::read_dir_batch(&dir, &mut buf)?;
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                let qid_kind = match entry.kind {
                    libc::DT_DIR => QT_DIR,
                    libc::DT_LNK => QT_SYMLINK,
                    _ => QT_FILE,
                };
                let qid = Qid {
                    kind: qid_kind,
                    version: 0,
                    path: entry.ino,
                };
                if !push_dirent(&mut out, limit, &qid, entry.next, entry.kind, &entry.name) {
                    if out.is_empty() {
                        // Not even one entry fits the client's count.
                        return err(libc::EINVAL);
                    }
                    break 'batches;
                }
            }
        }
        Ok(Reply::Readdir(out))
    }

    fn fsync(&self, fid: u32, datasync: bool) -> Result<Reply> {
        match self.open_of(fid)? {
            Open::File(file) => confined::fsync(&file, datasync)?,
            Open::Dir(dir) => confined::fsync(&lock_ignoring_poison(&dir), datasync)?,
            _ => return err(libc::EBADF),
        }
        Ok(Reply::Fsync)
    }

    fn lock(&self, fid: u32, request: &Lock) -> Result<Reply> {
        let Open::File(file) = self.open_of(fid)? else {
            return err(libc::EBADF);
        };
        let mut fl = flock_of(request)?;
        match confined::ofd_lock(&file, libc::F_OFD_SETLK, &mut fl) {
            Ok(()) => Ok(Reply::Lock(lock::SUCCESS)),
            // Never block a server thread: the client polls again (as Linux does).
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
                Ok(Reply::Lock(lock::BLOCKED))
            }
            Err(e) => {
                tracing::debug!("Tlock: {e}");
                Ok(Reply::Lock(lock::ERROR))
            }
        }
    }

    fn getlock(&self, fid: u32, mut request: Lock) -> Result<Reply> {
        let Open::File(file) = self.open_of(fid)? else {
            return err(libc::EBADF);
        };
        let mut fl = flock_of(&request)?;
        confined::ofd_lock(&file, libc::F_OFD_GETLK, &mut fl)?;
        request.kind = match i32::from(fl.l_type) {
            libc::F_RDLCK => lock::RDLCK,
            libc::F_WRLCK => lock::WRLCK,
            _ => lock::UNLCK,
        };
        if request.kind != lock::UNLCK {
            request.start = fl.l_start as u64;
            request.length = fl.l_len as u64;
        }
        Ok(Reply::GetLock(request))
    }

    fn xattr_walk(&self, fid: u32, newfid: u32, name: &[u8]) -> Result<Reply> {
        let (fd, qid, path, uid) = self.node(fid)?;
        if newfid != fid && lock_ignoring_poison(&self.fids).contains_key(&newfid) {
            return err(libc::EBADF);
        }
        let file = self.open_for_attr(&fd, &path, &self.open_of(fid)?)?;
        let value = if name.is_empty() {
            confined::get_xattr(&file, None)?
        } else {
            confined::get_xattr(&file, Some(&cstring(name)?))?
        };
        let size = value.len() as u64;
        self.insert(
            newfid,
            Fid {
                fd: Arc::new(fd.try_clone()?),
                qid,
                path,
                uid,
                open: Open::XattrRead(Arc::new(value)),
                reopen: OpenRecord::Xattr,
            },
            newfid == fid,
        )?;
        Ok(Reply::XattrWalk(size))
    }

    fn xattr_create(&self, fid: u32, name: &[u8], size: u64, flags: u32) -> Result<Reply> {
        self.export.writable()?;
        // Only the user namespace: trusted.* and security.* (capabilities, SELinux labels)
        // set by a guest would mean something to the host.
        if !name.starts_with(b"user.") || name.len() == b"user.".len() {
            return err(libc::EOPNOTSUPP);
        }
        if size > XATTR_MAX {
            return err(libc::E2BIG);
        }
        let flags = match flags {
            0 => 0,
            1 => libc::XATTR_CREATE,
            2 => libc::XATTR_REPLACE,
            _ => return err(libc::EINVAL),
        };
        let fid_ref = self.fid(fid)?;
        let (fd, path, open) = {
            let fid = lock_ignoring_poison(&fid_ref);
            (fid.fd.clone(), fid.path.clone(), fid.open.clone())
        };
        let file = self.open_for_attr(&fd, &path, &open)?;
        let pending = XattrWrite {
            file,
            name: cstring(name)?,
            size,
            flags,
            value: Vec::new(),
        };
        let mut fid_state = lock_ignoring_poison(&fid_ref);
        fid_state.open = Open::XattrWrite(Arc::new(Mutex::new(pending)));
        fid_state.reopen = OpenRecord::Xattr;
        self.journal_fid(fid, &fid_state);
        Ok(Reply::XattrCreate)
    }
}

/// The error of an AT_EMPTY_PATH call on a kernel that does not take it there.
fn lacks_empty_path(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

/// pread that fills as much of `buf` as the file has (short reads are retried).
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if done > 0 => {
                tracing::debug!("short read: {e}");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn flock_of(request: &Lock) -> Result<libc::flock> {
    let l_type = match request.kind {
        lock::RDLCK => libc::F_RDLCK,
        lock::WRLCK => libc::F_WRLCK,
        lock::UNLCK => libc::F_UNLCK,
        _ => return err(libc::EINVAL),
    };
    let start = i64::try_from(request.start).map_err(|_| Errno(libc::EINVAL))?;
    let len = i64::try_from(request.length).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = l_type as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start;
    fl.l_len = len;
    Ok(fl)
}

/// Host open flags for 9P2000.L `flags`: access mode and the flags that make sense for a
/// server-side descriptor. O_CREAT is Tlcreate's to add (O_EXCL means nothing without
/// it); O_NOFOLLOW and O_CLOEXEC the server always adds; O_DIRECT (alignment the client
/// cannot know), O_ASYNC, O_NOCTTY and O_LARGEFILE (always on here) are dropped.
fn open_flags(flags: u32) -> i32 {
    let mut out = match flags & dotl::ACCMODE {
        0 => libc::O_RDONLY,
        1 => libc::O_WRONLY,
        _ => libc::O_RDWR,
    };
    for (bit, host) in [
        (dotl::TRUNC, libc::O_TRUNC),
        (dotl::APPEND, libc::O_APPEND),
        (dotl::NONBLOCK, libc::O_NONBLOCK),
        (dotl::DSYNC, libc::O_DSYNC),
        (dotl::DIRECTORY, libc::O_DIRECTORY),
        (dotl::NOATIME, libc::O_NOATIME),
        (dotl::SYNC, libc::O_SYNC),
        (dotl::EXCL, libc::O_EXCL),
        // Tlcreate adds O_CREAT itself; from Tlopen it is ignored.
        (dotl::CREATE, 0),
    ] {
        if flags & bit != 0 {
            out |= host;
        }
    }
    out
}

/// A name for a new or existing entry of a directory: one component, nothing special.
fn check_name(name: &[u8]) -> Result<CString> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return err(libc::EINVAL);
    }
    if name.len() > 255 {
        return err(libc::ENAMETOOLONG);
    }
    cstring(name).map_err(Errno::from)
}

/// A Twalk element: like [`check_name`] but `.` and `..` are allowed.
fn check_walk_name(name: &[u8]) -> Result<()> {
    if name == b"." || name == b".." {
        return Ok(());
    }
    check_name(name).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::p9::messages::kind;
    use crate::p9::wire::{Reader, Writer, HEADER_LEN};

    /// A directory under the system's temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("p9-unit-{tag}-{}-{n}", std::process::id()));
            std::fs::create_dir(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn session(dir: &Path, read_only: bool) -> Arc<Session> {
        Session::new(Arc::new(Export::new(Root::open(dir).unwrap(), read_only)))
    }

    /// Sends one request and returns (reply type, body).
    fn call(session: &Arc<Session>, kind: u8, build: impl FnOnce(&mut Writer)) -> (u8, Vec<u8>) {
        let mut w = Writer::new(kind, 1);
        build(&mut w);
        let reply = session.handle(&w.finish()).unwrap();
        (reply[4], reply[HEADER_LEN..].to_vec())
    }

    fn errno_of((kind, body): (u8, Vec<u8>)) -> Option<u32> {
        (kind == kind::RLERROR).then(|| Reader::new(&body).u32().unwrap())
    }

    fn mount(session: &Arc<Session>) {
        let (kind, _) = call(session, kind::TVERSION, |w| {
            w.u32(MAX_MSIZE * 2).str_bytes(VERSION.as_bytes());
        });
        assert_eq!(kind, kind::TVERSION + 1);
        assert_eq!(session.msize(), MAX_MSIZE);
        let (kind, _) = call(session, kind::TATTACH, |w| {
            w.u32(0)
                .u32(messages::NOFID)
                .str_bytes(b"")
                .str_bytes(b"")
                .u32(0);
        });
        assert_eq!(kind, kind::TATTACH + 1);
    }

    #[test]
    fn a_request_frame_in_a_reply_frame_out() {
        let dir = TempDir::new("io");
        std::fs::write(dir.0.join("f"), b"hello").unwrap();
        let s = session(&dir.0, false);
        mount(&s);
        let (kind, body) = call(&s, kind::TWALK, |w| {
            w.u32(0).u32(1).u16(1).str_bytes(b"f");
        });
        assert_eq!(kind, kind::TWALK + 1);
        assert_eq!(Reader::new(&body).u16(), Ok(1));
        call(&s, kind::TLOPEN, |w| {
            w.u32(1).u32(2); // O_RDWR
        });
        let (kind, body) = call(&s, kind::TREAD, |w| {
            w.u32(1).u64(1).u32(u32::MAX);
        });
        assert_eq!(kind, kind::TREAD + 1);
        assert_eq!(&body[4..], b"ello");
        call(&s, kind::TWRITE, |w| {
            w.u32(1).u64(5).u32(6).bytes(b" world");
        });
        assert_eq!(std::fs::read(dir.0.join("f")).unwrap(), b"hello world");
    }

    #[test]
    fn bad_frames_and_fids() {
        let dir = TempDir::new("bad");
        let s = session(&dir.0, false);
        // Before Tversion, nothing else.
        assert_eq!(
            errno_of(call(&s, kind::TCLUNK, |w| {
                w.u32(0);
            })),
            Some(libc::EPROTO as u32)
        );
        mount(&s);
        assert!(matches!(s.handle(&[1, 2, 3]), Err(FrameError::Garbage(_))));
        assert_eq!(
            errno_of(call(&s, kind::TCLUNK, |w| {
                w.u32(77);
            })),
            Some(libc::EBADF as u32)
        );
        assert_eq!(
            errno_of(call(&s, kind::TWALK, |w| {
                w.u32(0).u32(1).u16(1).str_bytes(b"a/b");
            })),
            Some(libc::EINVAL as u32)
        );
        assert_eq!(
            errno_of(call(&s, 99, |_| {})),
            Some(libc::EOPNOTSUPP as u32)
        );
    }

    #[test]
    fn read_only_export_refuses_changes() {
        let dir = TempDir::new("ro");
        let s = session(&dir.0, true);
        mount(&s);
        assert_eq!(
            errno_of(call(&s, kind::TMKDIR, |w| {
                w.u32(0).str_bytes(b"d").u32(0o755).u32(0);
            })),
            Some(libc::EROFS as u32)
        );
        assert!(!dir.0.join("d").exists());
    }

    /// The fallbacks for kernels without AT_EMPTY_PATH in fchmodat2 (before 6.6) or
    /// utimensat: through a reopened descriptor, for an unopened fid.
    #[test]
    fn attributes_through_a_reopened_descriptor() {
        let dir = TempDir::new("attr");
        std::fs::create_dir(dir.0.join("sub")).unwrap();
        std::fs::write(dir.0.join("sub/f"), b"x").unwrap();
        let s = session(&dir.0, false);
        mount(&s);
        call(&s, kind::TWALK, |w| {
            w.u32(0).u32(1).u16(2).str_bytes(b"sub").str_bytes(b"f");
        });
        let (fd, _, path, _) = s.node(1).unwrap();
        assert_eq!(path, Path::new("sub/f"));
        let file = s.open_for_attr(&fd, &path, &Open::None).unwrap();
        confined::fchmod(&file, 0o604).unwrap();
        let t = |sec| libc::timespec {
            tv_sec: sec,
            tv_nsec: 0,
        };
        confined::futimens(&file, t(1000), t(2000)).unwrap();
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.0.join("sub/f")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o604);
        assert_eq!((meta.atime(), meta.mtime()), (1000, 2000));
        // A file replaced on the host since the walk is not reopened in its place.
        std::fs::remove_file(dir.0.join("sub/f")).unwrap();
        std::fs::write(dir.0.join("sub/f"), b"new").unwrap();
        assert_eq!(
            s.open_for_attr(&fd, &path, &Open::None).unwrap_err(),
            Errno(libc::ESTALE)
        );
    }

    /// Random requests shaped like real ones - plausible fids, names good and bad,
    /// random flags, modes and counts, now and then cut short or padded - against a
    /// scratch directory: every one gets a reply, none panics or hangs, and nothing
    /// appears outside the directory.
    #[test]
    fn random_requests_get_replies() {
        let outer = TempDir::new("fuzz");
        let dir = outer.0.join("share");
        std::fs::create_dir(&dir).unwrap();
        std::fs::create_dir(dir.join("d")).unwrap();
        std::fs::write(dir.join("d/f"), b"data").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
        let s = session(&dir, false);
        let names: [&[u8]; 12] = [
            b"d",
            b"f",
            b"..",
            b".",
            b"etc",
            b"new",
            b"x/y",
            b"",
            b"a\0b",
            b"passwd",
            b"user.a",
            b"trusted.x",
        ];
        // Field shapes: F fid, S name, N u32, Q u64, B u8, H u16, D count and data.
        let shapes: [(u8, &str); 26] = [
            (kind::TWALK, "FFH"),
            (kind::TLOPEN, "FN"),
            (kind::TLCREATE, "FSNNN"),
            (kind::TREAD, "FQN"),
            (kind::TWRITE, "FQD"),
            (kind::TCLUNK, "F"),
            (kind::TREMOVE, "F"),
            (kind::TGETATTR, "FQ"),
            (kind::TSETATTR, "FNNNNQQQQQ"),
            (kind::TREADDIR, "FQN"),
            (kind::TMKDIR, "FSNN"),
            (kind::TSYMLINK, "FSSN"),
            (kind::TMKNOD, "FSNNNN"),
            (kind::TLINK, "FFS"),
            (kind::TRENAME, "FFS"),
            (kind::TRENAMEAT, "FSFS"),
            (kind::TUNLINKAT, "FSN"),
            (kind::TREADLINK, "F"),
            (kind::TSTATFS, "F"),
            (kind::TFSYNC, "FN"),
            (kind::TLOCK, "FBNQQNS"),
            (kind::TGETLOCK, "FBQQNS"),
            (kind::TXATTRWALK, "FFS"),
            (kind::TXATTRCREATE, "FSQN"),
            (kind::TFLUSH, "H"),
            (kind::TATTACH, "FFSSN"),
        ];
        let numbers = [
            0u32, 1, 2, 3, 0o100, 0o200, 0o1000, 0o200000, 0x200, 0o100644, 0o40755, 0o10644,
            0o20644, 0x1ff,
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut answered, mut errors) = (0, std::collections::BTreeMap::new());
        for round in 0..30_000u32 {
            if round % 300 == 0 {
                mount_fresh(&s);
            }
            let (kind, shape) = shapes[(next() % shapes.len() as u64) as usize];
            let mut w = Writer::new(kind, (round % 60_000) as u16);
            for field in shape.chars() {
                let pick = next();
                match field {
                    'F' => {
                        w.u32(if pick % 20 == 0 {
                            pick as u32
                        } else {
                            (pick % 6) as u32
                        });
                    }
                    'S' => {
                        w.str_bytes(names[(pick % names.len() as u64) as usize]);
                    }
                    'N' => {
                        w.u32(if pick % 5 == 0 {
                            (pick >> 8) as u32
                        } else {
                            numbers[(pick % numbers.len() as u64) as usize]
                        });
                    }
                    'Q' => {
                        w.u64(if pick % 5 == 0 { pick } else { pick % 5000 });
                    }
                    'B' => {
                        w.u8((pick % 4) as u8);
                    }
                    'H' => {
                        let count = (pick % 4) as u16;
                        w.u16(count);
                        if kind == kind::TWALK {
                            for _ in 0..count {
                                w.str_bytes(names[(next() % names.len() as u64) as usize]);
                            }
                        }
                    }
                    _ => {
                        let len = (pick % 100) as usize;
                        w.u32(len as u32).bytes(&vec![b'z'; len]);
                    }
                }
            }
            let mut frame = w.finish();
            match next() % 20 {
                // Cut short or padded: the size field is fixed up, the body is wrong.
                0 => frame.truncate(
                    HEADER_LEN
                        + (next() as usize % frame.len().max(1)).min(frame.len() - HEADER_LEN),
                ),
                1 => frame.extend_from_slice(&[7, 7, 7]),
                _ => {}
            }
            let size = frame.len() as u32;
            frame[..4].copy_from_slice(&size.to_le_bytes());
            let reply = s.handle(&frame).unwrap();
            assert!(reply.len() >= HEADER_LEN && reply.len() <= MAX_MSIZE as usize);
            if reply[4] == kind::RLERROR {
                *errors
                    .entry(Reader::new(&reply[HEADER_LEN..]).u32().unwrap())
                    .or_insert(0u32) += 1;
            } else {
                answered += 1;
            }
        }
        eprintln!("{answered} answered; Rlerrors by errno: {errors:?}");
        assert!(
            answered > 3000,
            "too few requests got past the checks to mean much"
        );
        let outside: Vec<_> = std::fs::read_dir(&outer.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside, vec![std::ffi::OsString::from("share")]);
    }

    fn mount_fresh(session: &Arc<Session>) {
        call(session, kind::TVERSION, |w| {
            w.u32(65536).str_bytes(VERSION.as_bytes());
        });
        call(session, kind::TATTACH, |w| {
            w.u32(0)
                .u32(messages::NOFID)
                .str_bytes(b"")
                .str_bytes(b"")
                .u32(0);
        });
        call(session, kind::TWALK, |w| {
            w.u32(0).u32(1).u16(1).str_bytes(b"d");
        });
        call(session, kind::TWALK, |w| {
            w.u32(1).u32(2).u16(1).str_bytes(b"f");
        });
    }

    /// Rflush waits until the request it names is dropped (its reply sent), and only
    /// that long.
    #[test]
    fn flush_waits_for_the_pending_request() {
        let dir = TempDir::new("flush");
        let s = session(&dir.0, false);
        mount(&s);
        let mut w = Writer::new(kind::TGETATTR, 5);
        w.u32(0).u64(0x7ff);
        let pending = s.receive(w.finish());
        assert!(!pending.waits_for_others());
        let reply = pending.handle().unwrap();
        assert_eq!(reply[4], kind::TGETATTR + 1);

        let mut w = Writer::new(kind::TFLUSH, 6);
        w.u16(5);
        let flush = s.receive(w.finish());
        assert!(flush.waits_for_others());
        let (done, finished) = std::sync::mpsc::channel();
        let flusher = std::thread::spawn(move || {
            let reply = flush.handle().unwrap();
            done.send(reply).unwrap();
        });
        assert!(
            finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "Rflush before the reply was sent"
        );
        drop(pending);
        let reply = finished.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((reply[4], reply[5]), (kind::TFLUSH + 1, 6));
        flusher.join().unwrap();
    }

    #[test]
    fn qids_of_other_file_systems_stay_apart() {
        let dir = TempDir::new("qid");
        let export = Export::new(Root::open(&dir.0).unwrap(), false);
        let mut st = confined::stat(export.root.fd()).unwrap();
        let own = export.qid(&st);
        assert_eq!(own.path, st.st_ino);
        assert!(own.is_dir());
        st.st_dev ^= 1;
        let other = export.qid(&st);
        assert_ne!(other.path, own.path);
        assert!(other.path >= 1 << 63);
    }

    #[test]
    fn open_flags_translate() {
        assert_eq!(open_flags(0), libc::O_RDONLY);
        assert_eq!(open_flags(2 | dotl::TRUNC), libc::O_RDWR | libc::O_TRUNC);
        // O_CREAT never comes from Tlopen's flags; O_LARGEFILE (0o100000) is dropped.
        assert_eq!(open_flags(1 | dotl::CREATE | 0o100000), libc::O_WRONLY);
    }

    /// Walks to `sub/file` and clunks, `rounds` times; the time per pair.
    fn walk_and_clunk(session: &Arc<Session>, rounds: u32) -> Duration {
        let start = Instant::now();
        for _ in 0..rounds {
            let (kind, _) = call(session, kind::TWALK, |w| {
                w.u32(0).u32(1).u16(2).str_bytes(b"sub").str_bytes(b"file");
            });
            assert_eq!(kind, kind::TWALK + 1);
            assert_eq!(
                errno_of(call(session, kind::TCLUNK, |w| {
                    w.u32(1);
                })),
                None
            );
        }
        start.elapsed() / rounds
    }

    /// What the journal adds to the hottest pair of requests, walk and clunk: run with
    /// `cargo test --release -p bulkhead-workers --lib journal_cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a check"]
    fn journal_cost_of_walk_and_clunk() {
        let dir = TempDir::new("journal-cost");
        std::fs::create_dir(dir.0.join("sub")).unwrap();
        std::fs::write(dir.0.join("sub/file"), "x").unwrap();
        let export = Arc::new(Export::new(Root::open(&dir.0).unwrap(), false));
        let plain = Session::new(export.clone());
        let (journaled, _) = Session::restore(export, journal::new_journal().unwrap());
        mount(&plain);
        mount(&journaled);
        for round in 0..3 {
            let without = walk_and_clunk(&plain, 50_000);
            let with = walk_and_clunk(&journaled, 50_000);
            eprintln!("round {round}: walk+clunk {without:?} without a journal, {with:?} with");
        }
    }

    /// A session rebuilt from its journal in the same process: fids, their open files
    /// and paths after a rename come back; a removed file's fid is stale.
    #[test]
    fn a_session_is_rebuilt_from_its_journal() {
        let dir = TempDir::new("journal-rebuild");
        std::fs::write(dir.0.join("f"), "data").unwrap();
        std::fs::write(dir.0.join("gone"), "").unwrap();
        let export = Arc::new(Export::new(Root::open(&dir.0).unwrap(), false));
        let file = journal::new_journal().unwrap();
        let (first, _) = Session::restore(export.clone(), file.try_clone().unwrap());
        mount(&first);
        for (fid, name) in [(1u32, &b"f"[..]), (2, b"gone")] {
            call(&first, kind::TWALK, |w| {
                w.u32(0).u32(fid).u16(1).str_bytes(name);
            });
            let (kind, _) = call(&first, kind::TLOPEN, |w| {
                w.u32(fid).u32(dotl::ACCMODE & 2);
            });
            assert_eq!(kind, kind::TLOPEN + 1);
        }
        let (kind, _) = call(&first, kind::TRENAMEAT, |w| {
            w.u32(0).str_bytes(b"f").u32(0).str_bytes(b"g");
        });
        assert_eq!(kind, kind::TRENAMEAT + 1);
        drop(first);
        std::fs::remove_file(dir.0.join("gone")).unwrap();

        let (second, _) = Session::restore(export, file);
        assert_eq!(second.msize(), MAX_MSIZE);
        let (kind, body) = call(&second, kind::TREAD, |w| {
            w.u32(1).u64(0).u32(100);
        });
        assert_eq!(kind, kind::TREAD + 1);
        assert_eq!(&body[4..], b"data");
        assert_eq!(
            lock_ignoring_poison(&second.fid(1).unwrap()).path,
            PathBuf::from("g")
        );
        let stale = call(&second, kind::TREAD, |w| {
            w.u32(2).u64(0).u32(100);
        });
        assert_eq!(errno_of(stale), Some(libc::ESTALE as u32));
    }
}
