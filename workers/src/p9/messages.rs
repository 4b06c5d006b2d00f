//! 9P2000.L messages: the requests a client sends ([`Request`]) parsed out of a frame,
//! and the replies the server sends ([`Reply`]) encoded into one.

use super::wire::{Qid, Reader, WireError, Writer, HEADER_LEN};

/// Message type numbers (9P2000.L and the 9P2000 core it keeps).
pub mod kind {
    pub const RLERROR: u8 = 7;
    pub const TSTATFS: u8 = 8;
    pub const TLOPEN: u8 = 12;
    pub const TLCREATE: u8 = 14;
    pub const TSYMLINK: u8 = 16;
    pub const TMKNOD: u8 = 18;
    pub const TRENAME: u8 = 20;
    pub const TREADLINK: u8 = 22;
    pub const TGETATTR: u8 = 24;
    pub const TSETATTR: u8 = 26;
    pub const TXATTRWALK: u8 = 30;
    pub const TXATTRCREATE: u8 = 32;
    pub const TREADDIR: u8 = 40;
    pub const TFSYNC: u8 = 50;
    pub const TLOCK: u8 = 52;
    pub const TGETLOCK: u8 = 54;
    pub const TLINK: u8 = 70;
    pub const TMKDIR: u8 = 72;
    pub const TRENAMEAT: u8 = 74;
    pub const TUNLINKAT: u8 = 76;
    pub const TVERSION: u8 = 100;
    pub const TAUTH: u8 = 102;
    pub const TATTACH: u8 = 104;
    pub const TFLUSH: u8 = 108;
    pub const TWALK: u8 = 110;
    pub const TREAD: u8 = 116;
    pub const TWRITE: u8 = 118;
    pub const TCLUNK: u8 = 120;
    pub const TREMOVE: u8 = 122;
}

/// The tag of a message that needs none (Tversion).
pub const NOTAG: u16 = 0xffff;
/// "No fid" (Tattach's afid when not authenticating).
pub const NOFID: u32 = 0xffff_ffff;
/// Most names one Twalk may carry.
pub const MAXWELEM: usize = 16;
/// Bytes of a Rread or Rreaddir before its data: the header and a 4-byte count.
pub const IO_HEADER_LEN: u32 = (HEADER_LEN + 4) as u32;

/// A name as the client sent it: bytes, checked by the server before any use.
pub type Name = Vec<u8>;

/// One client request, with the tag it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tagged {
    pub tag: u16,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Version {
        msize: u32,
        version: String,
    },
    Auth {
        afid: u32,
    },
    Attach {
        fid: u32,
        afid: u32,
        uname: String,
        aname: String,
        n_uname: u32,
    },
    Flush {
        oldtag: u16,
    },
    Walk {
        fid: u32,
        newfid: u32,
        names: Vec<Name>,
    },
    Read {
        fid: u32,
        offset: u64,
        count: u32,
    },
    Write {
        fid: u32,
        offset: u64,
        data: Vec<u8>,
    },
    Clunk {
        fid: u32,
    },
    Remove {
        fid: u32,
    },
    Statfs {
        fid: u32,
    },
    Lopen {
        fid: u32,
        flags: u32,
    },
    Lcreate {
        fid: u32,
        name: Name,
        flags: u32,
        mode: u32,
        gid: u32,
    },
    Symlink {
        fid: u32,
        name: Name,
        target: Name,
        gid: u32,
    },
    Mknod {
        dfid: u32,
        name: Name,
        mode: u32,
        major: u32,
        minor: u32,
        gid: u32,
    },
    Rename {
        fid: u32,
        dfid: u32,
        name: Name,
    },
    Readlink {
        fid: u32,
    },
    Getattr {
        fid: u32,
        mask: u64,
    },
    Setattr {
        fid: u32,
        attr: SetAttr,
    },
    XattrWalk {
        fid: u32,
        newfid: u32,
        name: Name,
    },
    XattrCreate {
        fid: u32,
        name: Name,
        size: u64,
        flags: u32,
    },
    Readdir {
        fid: u32,
        offset: u64,
        count: u32,
    },
    Fsync {
        fid: u32,
        datasync: bool,
    },
    Lock {
        fid: u32,
        lock: Lock,
    },
    GetLock {
        fid: u32,
        lock: Lock,
    },
    Link {
        dfid: u32,
        fid: u32,
        name: Name,
    },
    Mkdir {
        dfid: u32,
        name: Name,
        mode: u32,
        gid: u32,
    },
    Renameat {
        olddirfid: u32,
        oldname: Name,
        newdirfid: u32,
        newname: Name,
    },
    Unlinkat {
        dirfid: u32,
        name: Name,
        flags: u32,
    },
}

/// Tsetattr's fields; `valid` says which apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub valid: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub atime: (u64, u64),
    pub mtime: (u64, u64),
}

/// Tsetattr valid bits.
pub mod setattr {
    pub const MODE: u32 = 0x1;
    pub const UID: u32 = 0x2;
    pub const GID: u32 = 0x4;
    pub const SIZE: u32 = 0x8;
    pub const ATIME: u32 = 0x10;
    pub const MTIME: u32 = 0x20;
    pub const CTIME: u32 = 0x40;
    pub const ATIME_SET: u32 = 0x80;
    pub const MTIME_SET: u32 = 0x100;
}

/// A byte-range lock as Tlock, Tgetlock and Rgetlock carry it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Lock {
    pub kind: u8,
    pub flags: u32,
    pub start: u64,
    pub length: u64,
    pub proc_id: u32,
    pub client_id: Vec<u8>,
}

/// Lock types and Rlock statuses.
pub mod lock {
    pub const RDLCK: u8 = 0;
    pub const WRLCK: u8 = 1;
    pub const UNLCK: u8 = 2;
    pub const SUCCESS: u8 = 0;
    pub const BLOCKED: u8 = 1;
    pub const ERROR: u8 = 2;
}

/// Rgetattr's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub valid: u64,
    pub qid: Qid,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u64,
    pub rdev: u64,
    pub size: u64,
    pub blksize: u64,
    pub blocks: u64,
    pub atime: (u64, u64),
    pub mtime: (u64, u64),
    pub ctime: (u64, u64),
}

/// Rstatfs's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatFs {
    pub kind: u32,
    pub bsize: u32,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub fsid: u64,
    pub namelen: u32,
}

/// A frame's header, readable even when its body is not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub size: u32,
    pub kind: u8,
    pub tag: u16,
}

/// Reads the 7-byte header of `frame`.
pub fn parse_header(frame: &[u8]) -> Result<Header, WireError> {
    let mut r = Reader::new(frame);
    Ok(Header {
        size: r.u32()?,
        kind: r.u8()?,
        tag: r.u16()?,
    })
}

/// Why a frame is not a request the server can act on.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not even a header: nothing to reply to.
    NoHeader(WireError),
    /// A header but a bad body: reply to `tag` with EPROTO.
    Body { tag: u16, error: WireError },
    /// A message type this server does not serve: reply to `tag` with EOPNOTSUPP.
    Unknown { tag: u16, kind: u8 },
}

/// Parses one whole frame (size field included).
pub fn parse(frame: &[u8]) -> Result<Tagged, ParseError> {
    let header = parse_header(frame).map_err(ParseError::NoHeader)?;
    if header.size as usize != frame.len() {
        return Err(ParseError::NoHeader(WireError::SizeMismatch {
            declared: header.size,
            actual: frame.len(),
        }));
    }
    let tag = header.tag;
    let mut r = Reader::new(&frame[HEADER_LEN..]);
    let request = match parse_body(header.kind, &mut r) {
        Ok(Some(request)) => request,
        Ok(None) => {
            return Err(ParseError::Unknown {
                tag,
                kind: header.kind,
            })
        }
        Err(error) => return Err(ParseError::Body { tag, error }),
    };
    // Tfsync once had no datasync field: a short one is still accepted (parse_body), but
    // nothing may follow any message.
    r.finish()
        .map_err(|error| ParseError::Body { tag, error })?;
    Ok(Tagged { tag, request })
}

fn lock_body(r: &mut Reader<'_>, with_flags: bool) -> Result<Lock, WireError> {
    let kind = r.u8()?;
    let flags = if with_flags { r.u32()? } else { 0 };
    Ok(Lock {
        kind,
        flags,
        start: r.u64()?,
        length: r.u64()?,
        proc_id: r.u32()?,
        client_id: r.str_bytes()?.to_vec(),
    })
}

fn parse_body(kind: u8, r: &mut Reader<'_>) -> Result<Option<Request>, WireError> {
    use kind::*;
    let name = |r: &mut Reader<'_>| r.str_bytes().map(<[u8]>::to_vec);
    let request = match kind {
        TVERSION => Request::Version {
            msize: r.u32()?,
            version: r.string()?,
        },
        TAUTH => {
            let afid = r.u32()?;
            r.str_bytes()?;
            r.str_bytes()?;
            r.u32()?;
            Request::Auth { afid }
        }
        TATTACH => Request::Attach {
            fid: r.u32()?,
            afid: r.u32()?,
            uname: r.string()?,
            aname: r.string()?,
            n_uname: r.u32()?,
        },
        TFLUSH => Request::Flush { oldtag: r.u16()? },
        TWALK => {
            let fid = r.u32()?;
            let newfid = r.u32()?;
            let count = r.u16()?;
            // More than MAXWELEM is refused by the server, but every name is still read
            // so that the message is checked as a whole.
            let names = (0..count).map(|_| name(r)).collect::<Result<Vec<_>, _>>()?;
            Request::Walk { fid, newfid, names }
        }
        TREAD => Request::Read {
            fid: r.u32()?,
            offset: r.u64()?,
            count: r.u32()?,
        },
        TWRITE => {
            let fid = r.u32()?;
            let offset = r.u64()?;
            let count = r.u32()?;
            let data = r.bytes(count as usize)?.to_vec();
            Request::Write { fid, offset, data }
        }
        TCLUNK => Request::Clunk { fid: r.u32()? },
        TREMOVE => Request::Remove { fid: r.u32()? },
        TSTATFS => Request::Statfs { fid: r.u32()? },
        TLOPEN => Request::Lopen {
            fid: r.u32()?,
            flags: r.u32()?,
        },
        TLCREATE => Request::Lcreate {
            fid: r.u32()?,
            name: name(r)?,
            flags: r.u32()?,
            mode: r.u32()?,
            gid: r.u32()?,
        },
        TSYMLINK => Request::Symlink {
            fid: r.u32()?,
            name: name(r)?,
            target: name(r)?,
            gid: r.u32()?,
        },
        TMKNOD => Request::Mknod {
            dfid: r.u32()?,
            name: name(r)?,
            mode: r.u32()?,
            major: r.u32()?,
            minor: r.u32()?,
            gid: r.u32()?,
        },
        TRENAME => Request::Rename {
            fid: r.u32()?,
            dfid: r.u32()?,
            name: name(r)?,
        },
        TREADLINK => Request::Readlink { fid: r.u32()? },
        TGETATTR => Request::Getattr {
            fid: r.u32()?,
            mask: r.u64()?,
        },
        TSETATTR => Request::Setattr {
            fid: r.u32()?,
            attr: SetAttr {
                valid: r.u32()?,
                mode: r.u32()?,
                uid: r.u32()?,
                gid: r.u32()?,
                size: r.u64()?,
                atime: (r.u64()?, r.u64()?),
                mtime: (r.u64()?, r.u64()?),
            },
        },
        TXATTRWALK => Request::XattrWalk {
            fid: r.u32()?,
            newfid: r.u32()?,
            name: name(r)?,
        },
        TXATTRCREATE => Request::XattrCreate {
            fid: r.u32()?,
            name: name(r)?,
            size: r.u64()?,
            flags: r.u32()?,
        },
        TREADDIR => Request::Readdir {
            fid: r.u32()?,
            offset: r.u64()?,
            count: r.u32()?,
        },
        TFSYNC => {
            let fid = r.u32()?;
            let datasync = if r.remaining() >= 4 {
                r.u32()? != 0
            } else {
                false
            };
            Request::Fsync { fid, datasync }
        }
        TLOCK => Request::Lock {
            fid: r.u32()?,
            lock: lock_body(r, true)?,
        },
        TGETLOCK => Request::GetLock {
            fid: r.u32()?,
            lock: lock_body(r, false)?,
        },
        TLINK => Request::Link {
            dfid: r.u32()?,
            fid: r.u32()?,
            name: name(r)?,
        },
        TMKDIR => Request::Mkdir {
            dfid: r.u32()?,
            name: name(r)?,
            mode: r.u32()?,
            gid: r.u32()?,
        },
        TRENAMEAT => Request::Renameat {
            olddirfid: r.u32()?,
            oldname: name(r)?,
            newdirfid: r.u32()?,
            newname: name(r)?,
        },
        TUNLINKAT => Request::Unlinkat {
            dirfid: r.u32()?,
            name: name(r)?,
            flags: r.u32()?,
        },
        _ => return Ok(None),
    };
    Ok(Some(request))
}

/// A reply, to be encoded with the request's tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Lerror(u32),
    Version {
        msize: u32,
        version: String,
    },
    Attach(Qid),
    Flush,
    Walk(Vec<Qid>),
    /// Data read; the frame is built around it without another copy.
    Read(Vec<u8>),
    Write(u32),
    Clunk,
    Remove,
    Statfs(StatFs),
    Lopen {
        qid: Qid,
        iounit: u32,
    },
    Lcreate {
        qid: Qid,
        iounit: u32,
    },
    Symlink(Qid),
    Mknod(Qid),
    Rename,
    Readlink(Vec<u8>),
    Getattr(Attr),
    Setattr,
    XattrWalk(u64),
    XattrCreate,
    /// Encoded directory entries.
    Readdir(Vec<u8>),
    Fsync,
    Lock(u8),
    GetLock(Lock),
    Link,
    Mkdir(Qid),
    Renameat,
    Unlinkat,
}

impl Reply {
    /// The reply's type: one more than its request's.
    fn kind(&self) -> u8 {
        use kind::*;
        match self {
            Reply::Lerror(_) => RLERROR,
            Reply::Version { .. } => TVERSION + 1,
            Reply::Attach(_) => TATTACH + 1,
            Reply::Flush => TFLUSH + 1,
            Reply::Walk(_) => TWALK + 1,
            Reply::Read(_) => TREAD + 1,
            Reply::Write(_) => TWRITE + 1,
            Reply::Clunk => TCLUNK + 1,
            Reply::Remove => TREMOVE + 1,
            Reply::Statfs(_) => TSTATFS + 1,
            Reply::Lopen { .. } => TLOPEN + 1,
            Reply::Lcreate { .. } => TLCREATE + 1,
            Reply::Symlink(_) => TSYMLINK + 1,
            Reply::Mknod(_) => TMKNOD + 1,
            Reply::Rename => TRENAME + 1,
            Reply::Readlink(_) => TREADLINK + 1,
            Reply::Getattr(_) => TGETATTR + 1,
            Reply::Setattr => TSETATTR + 1,
            Reply::XattrWalk(_) => TXATTRWALK + 1,
            Reply::XattrCreate => TXATTRCREATE + 1,
            Reply::Readdir(_) => TREADDIR + 1,
            Reply::Fsync => TFSYNC + 1,
            Reply::Lock(_) => TLOCK + 1,
            Reply::GetLock(_) => TGETLOCK + 1,
            Reply::Link => TLINK + 1,
            Reply::Mkdir(_) => TMKDIR + 1,
            Reply::Renameat => TRENAMEAT + 1,
            Reply::Unlinkat => TUNLINKAT + 1,
        }
    }

    /// The whole reply frame for `tag`.
    pub fn encode(&self, tag: u16) -> Vec<u8> {
        let extra = match self {
            Reply::Read(data) | Reply::Readdir(data) => data.len(),
            _ => 0,
        };
        let mut w = Writer::with_capacity(self.kind(), tag, 64 + extra);
        match self {
            Reply::Lerror(errno) => {
                w.u32(*errno);
            }
            Reply::Version { msize, version } => {
                w.u32(*msize).str_bytes(version.as_bytes());
            }
            Reply::Attach(qid) | Reply::Symlink(qid) | Reply::Mknod(qid) | Reply::Mkdir(qid) => {
                w.qid(qid);
            }
            Reply::Walk(qids) => {
                // At most MAXWELEM qids: the server never walks further.
                w.u16(qids.len() as u16);
                for qid in qids {
                    w.qid(qid);
                }
            }
            Reply::Read(data) | Reply::Readdir(data) => {
                // Bounded by msize, which is far below u32::MAX.
                w.u32(data.len() as u32).bytes(data);
            }
            Reply::Write(count) => {
                w.u32(*count);
            }
            Reply::Statfs(s) => {
                w.u32(s.kind)
                    .u32(s.bsize)
                    .u64(s.blocks)
                    .u64(s.bfree)
                    .u64(s.bavail)
                    .u64(s.files)
                    .u64(s.ffree)
                    .u64(s.fsid)
                    .u32(s.namelen);
            }
            Reply::Lopen { qid, iounit } | Reply::Lcreate { qid, iounit } => {
                w.qid(qid).u32(*iounit);
            }
            Reply::Readlink(target) => {
                w.str_bytes(target);
            }
            Reply::Getattr(a) => {
                w.u64(a.valid)
                    .qid(&a.qid)
                    .u32(a.mode)
                    .u32(a.uid)
                    .u32(a.gid)
                    .u64(a.nlink)
                    .u64(a.rdev)
                    .u64(a.size)
                    .u64(a.blksize)
                    .u64(a.blocks)
                    .u64(a.atime.0)
                    .u64(a.atime.1)
                    .u64(a.mtime.0)
                    .u64(a.mtime.1)
                    .u64(a.ctime.0)
                    .u64(a.ctime.1)
                    // btime, gen and data_version: not offered (valid says so).
                    .u64(0)
                    .u64(0)
                    .u64(0)
                    .u64(0);
            }
            Reply::XattrWalk(size) => {
                w.u64(*size);
            }
            Reply::Lock(status) => {
                w.u8(*status);
            }
            Reply::GetLock(l) => {
                w.u8(l.kind)
                    .u64(l.start)
                    .u64(l.length)
                    .u32(l.proc_id)
                    .str_bytes(&l.client_id);
            }
            Reply::Flush
            | Reply::Clunk
            | Reply::Remove
            | Reply::Rename
            | Reply::Setattr
            | Reply::XattrCreate
            | Reply::Fsync
            | Reply::Link
            | Reply::Renameat
            | Reply::Unlinkat => {}
        }
        w.finish()
    }
}

/// Appends one Rreaddir entry to `out` unless that would pass `limit` bytes; says whether
/// it did.
pub fn push_dirent(
    out: &mut Vec<u8>,
    limit: usize,
    qid: &Qid,
    offset: u64,
    kind: u8,
    name: &[u8],
) -> bool {
    let len = 13 + 8 + 1 + 2 + name.len();
    if name.len() > usize::from(u16::MAX) || out.len() + len > limit {
        return false;
    }
    out.push(qid.kind);
    out.extend_from_slice(&qid.version.to_le_bytes());
    out.extend_from_slice(&qid.path.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, tag: u16, body: &[u8]) -> Vec<u8> {
        let mut w = Writer::new(kind, tag);
        w.bytes(body);
        w.finish()
    }

    #[test]
    fn parses_a_walk() {
        let mut body = Vec::new();
        body.extend_from_slice(&1u32.to_le_bytes());
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&2u16.to_le_bytes());
        for name in [&b"a"[..], b"bc"] {
            body.extend_from_slice(&(name.len() as u16).to_le_bytes());
            body.extend_from_slice(name);
        }
        let parsed = parse(&frame(kind::TWALK, 5, &body)).unwrap();
        assert_eq!(
            parsed,
            Tagged {
                tag: 5,
                request: Request::Walk {
                    fid: 1,
                    newfid: 2,
                    names: vec![b"a".to_vec(), b"bc".to_vec()]
                }
            }
        );
    }

    #[test]
    fn bad_frames_are_classified() {
        assert!(matches!(parse(&[1, 0]), Err(ParseError::NoHeader(_))));
        // A Tclunk missing two bytes of its fid.
        assert!(matches!(
            parse(&frame(kind::TCLUNK, 3, &[1, 2])),
            Err(ParseError::Body { tag: 3, .. })
        ));
        assert!(matches!(
            parse(&frame(250, 4, &[])),
            Err(ParseError::Unknown { tag: 4, kind: 250 })
        ));
        // Trailing bytes.
        assert!(matches!(
            parse(&frame(kind::TCLUNK, 3, &[1, 2, 3, 4, 5])),
            Err(ParseError::Body { tag: 3, .. })
        ));
        // A Twrite whose count runs past the message.
        let mut body = vec![0; 12];
        body.extend_from_slice(&1000u32.to_le_bytes());
        body.extend_from_slice(b"short");
        assert!(matches!(
            parse(&frame(kind::TWRITE, 9, &body)),
            Err(ParseError::Body { tag: 9, .. })
        ));
    }

    #[test]
    fn replies_carry_their_size_and_tag() {
        let msg = Reply::Lerror(2).encode(7);
        assert_eq!(msg, vec![11, 0, 0, 0, kind::RLERROR, 7, 0, 2, 0, 0, 0]);
        let msg = Reply::Read(vec![1, 2, 3]).encode(1);
        assert_eq!(parse_header(&msg).unwrap().size as usize, msg.len());
        assert_eq!(&msg[7..], &[3, 0, 0, 0, 1, 2, 3]);
    }
}
