//! A small 9P2000.L client for tests: every message the server handles, written
//! independently of the server's own encoder, plus raw frames for abuse tests; and
//! [`P9Server`], a `bulkhead-worker p9` serving a scratch directory over its debug transport.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use thiserror::Error;

use crate::micro::ScratchDir;
use crate::vhost::worker_process::{worker_bin, WorkerError, WorkerProcess};

/// How long a test waits for any one reply before calling the server hung.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
pub const NOFID: u32 = 0xffff_ffff;
pub const NOTAG: u16 = 0xffff;

/// Message types.
pub mod t {
    pub const RLERROR: u8 = 7;
    pub const STATFS: u8 = 8;
    pub const LOPEN: u8 = 12;
    pub const LCREATE: u8 = 14;
    pub const SYMLINK: u8 = 16;
    pub const MKNOD: u8 = 18;
    pub const RENAME: u8 = 20;
    pub const READLINK: u8 = 22;
    pub const GETATTR: u8 = 24;
    pub const SETATTR: u8 = 26;
    pub const XATTRWALK: u8 = 30;
    pub const XATTRCREATE: u8 = 32;
    pub const READDIR: u8 = 40;
    pub const FSYNC: u8 = 50;
    pub const LOCK: u8 = 52;
    pub const GETLOCK: u8 = 54;
    pub const LINK: u8 = 70;
    pub const MKDIR: u8 = 72;
    pub const RENAMEAT: u8 = 74;
    pub const UNLINKAT: u8 = 76;
    pub const VERSION: u8 = 100;
    pub const AUTH: u8 = 102;
    pub const ATTACH: u8 = 104;
    pub const FLUSH: u8 = 108;
    pub const WALK: u8 = 110;
    pub const OPEN: u8 = 112;
    pub const READ: u8 = 116;
    pub const WRITE: u8 = 118;
    pub const CLUNK: u8 = 120;
    pub const REMOVE: u8 = 122;
    pub const STAT: u8 = 124;
}

#[derive(Debug, Error)]
pub enum P9Error {
    #[error("Rlerror {0} ({msg})", msg = io::Error::from_raw_os_error(*.0 as i32))]
    Lerror(u32),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

impl P9Error {
    /// The errno of an Rlerror, None for anything else.
    pub fn errno(&self) -> Option<i32> {
        match self {
            P9Error::Lerror(errno) => Some(*errno as i32),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, P9Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Qid {
    pub kind: u8,
    pub version: u32,
    pub path: u64,
}

impl Qid {
    pub fn is_dir(&self) -> bool {
        self.kind & 0x80 != 0
    }
    pub fn is_symlink(&self) -> bool {
        self.kind & 0x02 != 0
    }
}

/// Rgetattr's fields that tests look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub qid: Qid,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub size: u64,
    pub atime: (u64, u64),
    pub mtime: (u64, u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub qid: Qid,
    pub offset: u64,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// A message body under construction.
#[derive(Debug, Default, Clone)]
pub struct Body(pub Vec<u8>);

impl Body {
    pub fn new() -> Self {
        Body(Vec::new())
    }
    pub fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn str(self, v: impl AsRef<[u8]>) -> Self {
        let v = v.as_ref();
        let mut body = self.u16(v.len() as u16);
        body.0.extend_from_slice(v);
        body
    }
    pub fn bytes(mut self, v: &[u8]) -> Self {
        self.0.extend_from_slice(v);
        self
    }
}

/// A frame: `size[4] type[1] tag[2]` and the body.
pub fn frame(kind: u8, tag: u16, body: &[u8]) -> Vec<u8> {
    let size = (7 + body.len()) as u32;
    let mut out = size.to_le_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(&tag.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Reads a reply's fields.
pub struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    pub fn new(body: &'a [u8]) -> Self {
        Fields(body)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(P9Error::Protocol(format!(
                "reply too short for {n} more bytes"
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn str(&mut self) -> Result<Vec<u8>> {
        let len = self.u16()? as usize;
        Ok(self.take(len)?.to_vec())
    }
    pub fn qid(&mut self) -> Result<Qid> {
        Ok(Qid {
            kind: self.u8()?,
            version: self.u32()?,
            path: self.u64()?,
        })
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// A received message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub tag: u16,
    pub body: Vec<u8>,
}

/// What carries 9P messages between the test client and a server: a Unix socket
/// (the debug transport) or a virtqueue ([`crate::p9_virtio::VirtioP9`]).
pub trait Transport: Send {
    /// Sends one whole message.
    fn send(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Receives one whole message; Ok(None) when the server is gone. `msize` bounds it.
    fn recv(&mut self, msize: u32) -> Result<Option<Vec<u8>>>;
}

impl Transport for UnixStream {
    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.write_all(bytes)
    }

    fn recv(&mut self, msize: u32) -> Result<Option<Vec<u8>>> {
        let mut size = [0u8; 4];
        match self.read_exact(&mut size) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = u32::from_le_bytes(size) as usize;
        if len < 7 || len > msize.max(8192) as usize {
            return Err(P9Error::Protocol(format!("reply size {len}")));
        }
        let mut frame = vec![0u8; len];
        frame[..4].copy_from_slice(&size);
        self.read_exact(&mut frame[4..])?;
        Ok(Some(frame))
    }
}

/// One connection to a 9P server.
pub struct Client {
    stream: Box<dyn Transport>,
    pub msize: u32,
    next_tag: u16,
}

/// Tsetattr's valid bits.
pub mod setattr {
    pub const MODE: u32 = 0x1;
    pub const UID: u32 = 0x2;
    pub const GID: u32 = 0x4;
    pub const SIZE: u32 = 0x8;
    pub const ATIME: u32 = 0x10;
    pub const MTIME: u32 = 0x20;
    pub const ATIME_SET: u32 = 0x80;
    pub const MTIME_SET: u32 = 0x100;
}

/// Tlopen/Tlcreate flags used by tests.
pub mod flags {
    pub const RDONLY: u32 = 0;
    pub const WRONLY: u32 = 1;
    pub const RDWR: u32 = 2;
    pub const CREATE: u32 = 0o100;
    pub const EXCL: u32 = 0o200;
    pub const TRUNC: u32 = 0o1000;
    pub const DIRECTORY: u32 = 0o200000;
}

impl Client {
    /// Connects without sending anything.
    pub fn connect(path: &Path) -> Result<Self> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT))?;
        Ok(Self::over(Box::new(stream)))
    }

    /// A client on any transport, without sending anything.
    pub fn over(transport: Box<dyn Transport>) -> Self {
        Client {
            stream: transport,
            msize: 8192,
            next_tag: 1,
        }
    }

    /// Connects, negotiates `msize` and attaches fid 0 to the share's root.
    pub fn mount(path: &Path, msize: u32) -> Result<Self> {
        let mut client = Self::connect(path)?;
        client.version(msize, "9P2000.L")?;
        client.attach(0, 0)?;
        Ok(client)
    }

    /// Sends bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.stream.send(bytes)?;
        Ok(())
    }

    /// Receives one message; Ok(None) at EOF.
    pub fn recv(&mut self) -> Result<Option<Message>> {
        let Some(frame) = self.stream.recv(self.msize)? else {
            return Ok(None);
        };
        if frame.len() < 7 {
            return Err(P9Error::Protocol(format!("reply of {} bytes", frame.len())));
        }
        Ok(Some(Message {
            kind: frame[4],
            tag: u16::from_le_bytes([frame[5], frame[6]]),
            body: frame[7..].to_vec(),
        }))
    }

    /// True when the server has closed this connection (EOF on the next read).
    pub fn is_closed(&mut self) -> bool {
        matches!(self.recv(), Ok(None))
    }

    pub fn tag(&mut self) -> u16 {
        let tag = self.next_tag;
        self.next_tag = if self.next_tag >= 0xfff0 {
            1
        } else {
            self.next_tag + 1
        };
        tag
    }

    /// Sends request `kind` and waits for its reply body; Rlerror becomes an error.
    pub fn rpc(&mut self, kind: u8, body: Body) -> Result<Vec<u8>> {
        let tag = if kind == t::VERSION {
            NOTAG
        } else {
            self.tag()
        };
        self.send_raw(&frame(kind, tag, &body.0))?;
        let reply = self
            .recv()?
            .ok_or_else(|| P9Error::Protocol("the server closed the connection".into()))?;
        if reply.tag != tag {
            return Err(P9Error::Protocol(format!(
                "reply tag {} for {tag}",
                reply.tag
            )));
        }
        if reply.kind == t::RLERROR {
            return Err(P9Error::Lerror(Fields::new(&reply.body).u32()?));
        }
        if reply.kind != kind + 1 {
            return Err(P9Error::Protocol(format!(
                "reply type {} to {kind}",
                reply.kind
            )));
        }
        Ok(reply.body)
    }

    pub fn version(&mut self, msize: u32, version: &str) -> Result<(u32, String)> {
        let body = self.rpc(t::VERSION, Body::new().u32(msize).str(version))?;
        let mut f = Fields::new(&body);
        let msize = f.u32()?;
        let version = String::from_utf8_lossy(&f.str()?).into_owned();
        if version == "9P2000.L" {
            self.msize = msize;
        }
        Ok((msize, version))
    }

    pub fn attach(&mut self, fid: u32, uid: u32) -> Result<Qid> {
        let body = self.rpc(
            t::ATTACH,
            Body::new().u32(fid).u32(NOFID).str("test").str("").u32(uid),
        )?;
        Fields::new(&body).qid()
    }

    pub fn walk<N: AsRef<[u8]>>(&mut self, fid: u32, newfid: u32, names: &[N]) -> Result<Vec<Qid>> {
        let mut body = Body::new().u32(fid).u32(newfid).u16(names.len() as u16);
        for name in names {
            body = body.str(name);
        }
        let body = self.rpc(t::WALK, body)?;
        let mut f = Fields::new(&body);
        let count = f.u16()?;
        (0..count).map(|_| f.qid()).collect()
    }

    /// Walks by a `/`-separated path (client-side split, as real clients do).
    pub fn walk_path(&mut self, fid: u32, newfid: u32, path: &str) -> Result<Vec<Qid>> {
        let names: Vec<&str> = path.split('/').filter(|n| !n.is_empty()).collect();
        let qids = self.walk(fid, newfid, &names)?;
        if qids.len() != names.len() {
            return Err(P9Error::Protocol(format!(
                "partial walk: {} of {}",
                qids.len(),
                names.len()
            )));
        }
        Ok(qids)
    }

    pub fn lopen(&mut self, fid: u32, flags: u32) -> Result<Qid> {
        let body = self.rpc(t::LOPEN, Body::new().u32(fid).u32(flags))?;
        Fields::new(&body).qid()
    }

    pub fn lcreate(
        &mut self,
        fid: u32,
        name: impl AsRef<[u8]>,
        flags: u32,
        mode: u32,
        gid: u32,
    ) -> Result<Qid> {
        let body = self.rpc(
            t::LCREATE,
            Body::new().u32(fid).str(name).u32(flags).u32(mode).u32(gid),
        )?;
        Fields::new(&body).qid()
    }

    pub fn read(&mut self, fid: u32, offset: u64, count: u32) -> Result<Vec<u8>> {
        let body = self.rpc(t::READ, Body::new().u32(fid).u64(offset).u32(count))?;
        let mut f = Fields::new(&body);
        let count = f.u32()? as usize;
        let data = f.rest();
        if data.len() != count {
            return Err(P9Error::Protocol(format!(
                "Rread count {count} with {} bytes",
                data.len()
            )));
        }
        Ok(data.to_vec())
    }

    /// Reads the whole file from offset 0 in msize-sized requests.
    pub fn read_all(&mut self, fid: u32) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read(fid, out.len() as u64, self.msize - 11)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    pub fn write(&mut self, fid: u32, offset: u64, data: &[u8]) -> Result<u32> {
        let body = self.rpc(
            t::WRITE,
            Body::new()
                .u32(fid)
                .u64(offset)
                .u32(data.len() as u32)
                .bytes(data),
        )?;
        Fields::new(&body).u32()
    }

    pub fn clunk(&mut self, fid: u32) -> Result<()> {
        self.rpc(t::CLUNK, Body::new().u32(fid)).map(drop)
    }

    pub fn remove(&mut self, fid: u32) -> Result<()> {
        self.rpc(t::REMOVE, Body::new().u32(fid)).map(drop)
    }

    pub fn getattr(&mut self, fid: u32) -> Result<Attr> {
        let body = self.rpc(t::GETATTR, Body::new().u32(fid).u64(0x3fff))?;
        let mut f = Fields::new(&body);
        let _valid = f.u64()?;
        let qid = f.qid()?;
        let mode = f.u32()?;
        let uid = f.u32()?;
        let gid = f.u32()?;
        let nlink = f.u64()?;
        let _rdev = f.u64()?;
        let size = f.u64()?;
        let _blksize = f.u64()?;
        let _blocks = f.u64()?;
        let atime = (f.u64()?, f.u64()?);
        let mtime = (f.u64()?, f.u64()?);
        Ok(Attr {
            qid,
            mode,
            uid,
            gid,
            nlink,
            size,
            atime,
            mtime,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &mut self,
        fid: u32,
        valid: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        size: u64,
        atime: (u64, u64),
        mtime: (u64, u64),
    ) -> Result<()> {
        self.rpc(
            t::SETATTR,
            Body::new()
                .u32(fid)
                .u32(valid)
                .u32(mode)
                .u32(uid)
                .u32(gid)
                .u64(size)
                .u64(atime.0)
                .u64(atime.1)
                .u64(mtime.0)
                .u64(mtime.1),
        )
        .map(drop)
    }

    pub fn readdir(&mut self, fid: u32, offset: u64, count: u32) -> Result<Vec<DirEntry>> {
        let body = self.rpc(t::READDIR, Body::new().u32(fid).u64(offset).u32(count))?;
        let mut f = Fields::new(&body);
        let count = f.u32()? as usize;
        let data = f.rest();
        if data.len() != count {
            return Err(P9Error::Protocol("Rreaddir count".into()));
        }
        let mut f = Fields::new(data);
        let mut entries = Vec::new();
        while !f.0.is_empty() {
            entries.push(DirEntry {
                qid: f.qid()?,
                offset: f.u64()?,
                kind: f.u8()?,
                name: f.str()?,
            });
        }
        Ok(entries)
    }

    /// Every entry of the open directory `fid`, `count` bytes per request.
    pub fn readdir_all(&mut self, fid: u32, count: u32) -> Result<Vec<DirEntry>> {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let batch = self.readdir(fid, offset, count)?;
            let Some(last) = batch.last() else {
                return Ok(all);
            };
            offset = last.offset;
            all.extend(batch);
        }
    }

    pub fn mkdir(&mut self, dfid: u32, name: impl AsRef<[u8]>, mode: u32) -> Result<Qid> {
        let body = self.rpc(t::MKDIR, Body::new().u32(dfid).str(name).u32(mode).u32(0))?;
        Fields::new(&body).qid()
    }

    pub fn symlink(
        &mut self,
        dfid: u32,
        name: impl AsRef<[u8]>,
        target: impl AsRef<[u8]>,
    ) -> Result<Qid> {
        let body = self.rpc(
            t::SYMLINK,
            Body::new().u32(dfid).str(name).str(target).u32(0),
        )?;
        Fields::new(&body).qid()
    }

    pub fn mknod(
        &mut self,
        dfid: u32,
        name: impl AsRef<[u8]>,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<Qid> {
        let body = self.rpc(
            t::MKNOD,
            Body::new()
                .u32(dfid)
                .str(name)
                .u32(mode)
                .u32(major)
                .u32(minor)
                .u32(0),
        )?;
        Fields::new(&body).qid()
    }

    pub fn link(&mut self, dfid: u32, fid: u32, name: impl AsRef<[u8]>) -> Result<()> {
        self.rpc(t::LINK, Body::new().u32(dfid).u32(fid).str(name))
            .map(drop)
    }

    pub fn rename(&mut self, fid: u32, dfid: u32, name: impl AsRef<[u8]>) -> Result<()> {
        self.rpc(t::RENAME, Body::new().u32(fid).u32(dfid).str(name))
            .map(drop)
    }

    pub fn renameat(
        &mut self,
        olddir: u32,
        oldname: impl AsRef<[u8]>,
        newdir: u32,
        newname: impl AsRef<[u8]>,
    ) -> Result<()> {
        self.rpc(
            t::RENAMEAT,
            Body::new()
                .u32(olddir)
                .str(oldname)
                .u32(newdir)
                .str(newname),
        )
        .map(drop)
    }

    pub fn unlinkat(&mut self, dfid: u32, name: impl AsRef<[u8]>, flags: u32) -> Result<()> {
        self.rpc(t::UNLINKAT, Body::new().u32(dfid).str(name).u32(flags))
            .map(drop)
    }

    pub fn readlink(&mut self, fid: u32) -> Result<Vec<u8>> {
        let body = self.rpc(t::READLINK, Body::new().u32(fid))?;
        Fields::new(&body).str()
    }

    /// (bsize, blocks, namelen)
    pub fn statfs(&mut self, fid: u32) -> Result<(u32, u64, u32)> {
        let body = self.rpc(t::STATFS, Body::new().u32(fid))?;
        let mut f = Fields::new(&body);
        let _kind = f.u32()?;
        let bsize = f.u32()?;
        let blocks = f.u64()?;
        for _ in 0..5 {
            f.u64()?;
        }
        Ok((bsize, blocks, f.u32()?))
    }

    pub fn fsync(&mut self, fid: u32) -> Result<()> {
        self.rpc(t::FSYNC, Body::new().u32(fid).u32(0)).map(drop)
    }

    /// Tlock; returns the status (0 success, 1 blocked, 2 error).
    pub fn lock(&mut self, fid: u32, kind: u8, start: u64, length: u64) -> Result<u8> {
        let body = self.rpc(
            t::LOCK,
            Body::new()
                .u32(fid)
                .u8(kind)
                .u32(0)
                .u64(start)
                .u64(length)
                .u32(1)
                .str("test"),
        )?;
        Fields::new(&body).u8()
    }

    /// Tgetlock; returns the conflicting lock's type, start and length.
    pub fn getlock(
        &mut self,
        fid: u32,
        kind: u8,
        start: u64,
        length: u64,
    ) -> Result<(u8, u64, u64)> {
        let body = self.rpc(
            t::GETLOCK,
            Body::new()
                .u32(fid)
                .u8(kind)
                .u64(start)
                .u64(length)
                .u32(1)
                .str("test"),
        )?;
        let mut f = Fields::new(&body);
        Ok((f.u8()?, f.u64()?, f.u64()?))
    }

    pub fn xattrwalk(&mut self, fid: u32, newfid: u32, name: &str) -> Result<u64> {
        let body = self.rpc(t::XATTRWALK, Body::new().u32(fid).u32(newfid).str(name))?;
        Fields::new(&body).u64()
    }

    pub fn xattrcreate(&mut self, fid: u32, name: &str, size: u64, flags: u32) -> Result<()> {
        self.rpc(
            t::XATTRCREATE,
            Body::new().u32(fid).str(name).u64(size).u32(flags),
        )
        .map(drop)
    }

    pub fn flush(&mut self, oldtag: u16) -> Result<()> {
        self.rpc(t::FLUSH, Body::new().u16(oldtag)).map(drop)
    }
}

/// `bulkhead-worker p9` serving a fresh scratch directory (`share`) on a socket.
pub struct P9Server {
    pub worker: WorkerProcess,
    /// The share itself: `<scratch>/share`; `<scratch>` (the parent) is outside it.
    pub share: PathBuf,
    pub socket: PathBuf,
    scratch: ScratchDir,
}

impl P9Server {
    pub fn start(read_only: bool) -> std::result::Result<Self, WorkerError> {
        let scratch = ScratchDir::new("p9").map_err(WorkerError::Setup)?;
        let share = scratch.path().join("share");
        std::fs::create_dir(&share).map_err(WorkerError::Setup)?;
        Self::serve(scratch, share, read_only)
    }

    /// A server running as `uid`:`gid` (the caller must be root), its scratch directory
    /// and share owned by that user.
    pub fn start_as(uid: u32, gid: u32) -> std::result::Result<Self, WorkerError> {
        let scratch = ScratchDir::new("p9user").map_err(WorkerError::Setup)?;
        let share = scratch.path().join("share");
        std::fs::create_dir(&share).map_err(WorkerError::Setup)?;
        for dir in [scratch.path(), share.as_path()] {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid)).map_err(WorkerError::Setup)?;
        }
        let socket = scratch.path().join("p9.sock");
        let mut command = Command::new(worker_bin());
        command
            .arg("p9")
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--dir")
            .arg(&share)
            .uid(uid)
            // std drops root's supplementary groups along with the uid.
            .gid(gid);
        let worker = WorkerProcess::listening_command(command, socket.clone())?;
        Ok(P9Server {
            worker,
            share,
            socket,
            scratch,
        })
    }

    /// Serves `share` of an existing scratch directory (set up before the server starts).
    pub fn serve(
        scratch: ScratchDir,
        share: PathBuf,
        read_only: bool,
    ) -> std::result::Result<Self, WorkerError> {
        let socket = scratch.path().join("p9.sock");
        let listen = format!("unix:{}", socket.display());
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("p9"),
            OsStr::new("--listen"),
            OsStr::new(&listen),
            OsStr::new("--dir"),
            share.as_os_str(),
        ];
        if read_only {
            args.push(OsStr::new("--ro"));
        }
        let worker = WorkerProcess::listening(&args, socket.clone())?;
        Ok(P9Server {
            worker,
            share,
            socket,
            scratch,
        })
    }

    /// The scratch directory holding the share: what lies outside it.
    pub fn outside(&self) -> &Path {
        self.scratch.path()
    }

    pub fn mount(&self) -> Result<Client> {
        Client::mount(&self.socket, 64 * 1024)
    }

    /// `-s PATH` for diod's clients.
    pub fn socket_arg(&self) -> String {
        self.socket.display().to_string()
    }
}
