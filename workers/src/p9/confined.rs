//! Every host file system access the 9p server makes, relative to descriptors beneath the
//! shared directory: never a path that starts at `/`, never a symlink followed.
//!
//! Paths are resolved with openat2(2) and `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_SYMLINKS`: the kernel refuses any component that would leave the starting
//! directory, any `/proc` magic link and any symlink, atomically with the lookup - so a
//! symlink swapped in while a walk runs fails the walk instead of redirecting it. Other
//! calls (`mkdirat`, `renameat`, ...) take one directory descriptor and one name that the
//! server has checked holds no `/`, which cannot leave that directory.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How every lookup is resolved.
const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_SYMLINKS;

/// openat2(2) reports EAGAIN when a rename raced the lookup; a retry normally succeeds.
const EAGAIN_RETRIES: usize = 16;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `bytes` as a C string; a NUL inside is EINVAL (the server checks names earlier).
pub fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// openat2(dirfd, path, flags, mode) confined beneath `dirfd`, with close-on-exec.
pub fn open_beneath(
    dirfd: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    // SAFETY: an all-zero open_how is valid (and the struct is non-exhaustive in libc).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64;
    if flags & libc::O_CREAT != 0 {
        how.mode = u64::from(mode);
    }
    how.resolve = RESOLVE;
    for _ in 0..EAGAIN_RETRIES {
        // SAFETY: `path` is NUL-terminated and `how` a fully initialised open_how whose size
        // is passed; the kernel only reads both. The result is checked before it is owned.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: a descriptor the kernel just returned, owned by nothing else. It
            // fits in c_int because descriptors do.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EAGAIN) {
            return Err(error);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// An `O_PATH` descriptor for `path` (relative, `.` for `dirfd` itself) beneath `dirfd`.
/// A final symlink is opened as the link itself.
pub fn open_path(dirfd: BorrowedFd<'_>, path: &Path) -> io::Result<OwnedFd> {
    let path = if path.as_os_str().is_empty() {
        Path::new(".")
    } else {
        path
    };
    open_beneath(
        dirfd,
        &cstring(path.as_os_str().as_bytes())?,
        libc::O_PATH,
        0,
    )
}

/// The shared directory: an `O_PATH` descriptor every lookup starts from.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
}

impl Root {
    /// Opens the directory the operator named (this is the one path resolved normally).
    pub fn open(dir: &Path) -> io::Result<Root> {
        let path = cstring(dir.as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path; the result is checked before it is owned.
        let fd = cvt(unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        })?;
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        Self::from_fd(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Serves beneath an already open directory descriptor (as the VMM passes one).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Root> {
        let st = stat(fd.as_fd())?;
        if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
        }
        Ok(Root { fd })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// fstatat(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW): works on `O_PATH` descriptors.
pub fn stat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: "" is NUL-terminated and `st` is writable memory of the right type.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

pub fn statfs(fd: BorrowedFd<'_>) -> io::Result<libc::statfs64> {
    // SAFETY: an all-zero statfs64 is a valid value of this plain C struct.
    let mut st: libc::statfs64 = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is writable memory of the right type.
    cvt(unsafe { libc::fstatfs64(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

pub fn mkdirat(dirfd: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
    // SAFETY: a NUL-terminated name; no memory is written.
    cvt(unsafe { libc::mkdirat(dirfd.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dirfd: BorrowedFd<'_>, name: &CStr, mode: u32, dev: u64) -> io::Result<()> {
    // SAFETY: a NUL-terminated name; no memory is written.
    cvt(unsafe { libc::mknodat(dirfd.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

/// A symlink called `name` in `dirfd` holding `target`. The target is only text: it is
/// never resolved by this server (lookups refuse symlinks).
pub fn symlinkat(target: &CStr, dirfd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: NUL-terminated strings; no memory is written.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dirfd.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// A hard link: flags 0, so a symlink is linked as itself, never followed.
pub fn linkat(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
) -> io::Result<()> {
    // SAFETY: NUL-terminated names; no memory is written.
    cvt(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn renameat(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
) -> io::Result<()> {
    // SAFETY: NUL-terminated names; no memory is written.
    cvt(unsafe {
        libc::renameat(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
        )
    })
    .map(drop)
}

pub fn unlinkat(dirfd: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: a NUL-terminated name; no memory is written.
    cvt(unsafe { libc::unlinkat(dirfd.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// The text of the symlink `fd` (an `O_PATH` descriptor of the link itself).
pub fn readlink(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: "" is NUL-terminated; the kernel writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// chown of exactly the file `fd` refers to (an `O_PATH` descriptor is fine).
pub fn chown(fd: BorrowedFd<'_>, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    // (uid_t)-1 leaves that id unchanged.
    let uid = uid.unwrap_or(u32::MAX);
    let gid = gid.unwrap_or(u32::MAX);
    // SAFETY: "" is NUL-terminated; no memory is written.
    cvt(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// chmod of exactly the file `fd` refers to, through fchmodat2's AT_EMPTY_PATH (Linux 6.6).
/// ENOSYS or EINVAL from an older kernel is returned for the caller to fall back.
pub fn chmod_path_fd(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: "" is NUL-terminated; no memory is written.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fchmodat2,
            fd.as_raw_fd(),
            c"".as_ptr(),
            mode,
            libc::AT_EMPTY_PATH,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn fchmod(file: &File, mode: u32) -> io::Result<()> {
    // SAFETY: no memory is passed.
    cvt(unsafe { libc::fchmod(file.as_raw_fd(), mode) }).map(drop)
}

/// Sets the times of exactly the file `fd` refers to (an `O_PATH` descriptor is fine);
/// UTIME_OMIT leaves one unchanged.
pub fn set_times(
    fd: BorrowedFd<'_>,
    atime: libc::timespec,
    mtime: libc::timespec,
) -> io::Result<()> {
    let times = [atime, mtime];
    // SAFETY: "" is NUL-terminated and `times` two valid timespecs the kernel only reads.
    cvt(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// Sets the times of an open file (futimens).
pub fn futimens(file: &File, atime: libc::timespec, mtime: libc::timespec) -> io::Result<()> {
    let times = [atime, mtime];
    // SAFETY: `times` are two valid timespecs the kernel only reads.
    cvt(unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub fn fsync(file: &File, datasync: bool) -> io::Result<()> {
    if datasync {
        file.sync_data()
    } else {
        file.sync_all()
    }
}

/// One directory entry as getdents64(2) gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    /// The position just after this entry, to resume from.
    pub next: u64,
    pub kind: u8,
    pub name: Vec<u8>,
}

/// One getdents64(2) batch from the directory `file` at its current position; empty at
/// the end.
pub fn read_dir_batch(file: &File, buf: &mut [u8]) -> io::Result<Vec<DirEntry>> {
    // SAFETY: the kernel writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            file.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let filled = &buf[..n as usize];
    let mut entries = Vec::new();
    let mut pos = 0;
    // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
    while pos + 19 <= filled.len() {
        let field = |at: usize, len: usize| &filled[pos + at..pos + at + len];
        let ino = u64::from_ne_bytes(field(0, 8).try_into().unwrap_or_default());
        let off = u64::from_ne_bytes(field(8, 8).try_into().unwrap_or_default());
        let reclen = usize::from(u16::from_ne_bytes(
            field(16, 2).try_into().unwrap_or_default(),
        ));
        let kind = filled[pos + 18];
        if reclen < 19 || pos + reclen > filled.len() {
            break;
        }
        let name_area = &filled[pos + 19..pos + reclen];
        let name_len = name_area
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(name_area.len());
        entries.push(DirEntry {
            ino,
            next: off,
            kind,
            name: name_area[..name_len].to_vec(),
        });
        pos += reclen;
    }
    Ok(entries)
}

pub fn seek(file: &File, offset: u64) -> io::Result<()> {
    // Directory offsets are cookies the kernel gave out; any u64 is passed through.
    // SAFETY: no memory is passed.
    let ret = unsafe { libc::lseek64(file.as_raw_fd(), offset as i64, libc::SEEK_SET) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Extended attributes of an open file: `None` for `name` lists them.
pub fn get_xattr(file: &File, name: Option<&CStr>) -> io::Result<Vec<u8>> {
    // Asks for the size, then reads; a value that grows in between gives ERANGE, retried.
    for _ in 0..4 {
        // SAFETY: a null buffer of size 0 asks only for the size.
        let size = unsafe {
            match name {
                Some(name) => {
                    libc::fgetxattr(file.as_raw_fd(), name.as_ptr(), std::ptr::null_mut(), 0)
                }
                None => libc::flistxattr(file.as_raw_fd(), std::ptr::null_mut(), 0),
            }
        };
        if size < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; size as usize];
        // SAFETY: the kernel writes at most buf.len() bytes into buf.
        let n = unsafe {
            match name {
                Some(name) => libc::fgetxattr(
                    file.as_raw_fd(),
                    name.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                ),
                None => libc::flistxattr(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()),
            }
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) {
            return Err(error);
        }
    }
    Err(io::Error::from_raw_os_error(libc::ERANGE))
}

/// Sets (or, with an empty value and `remove`, removes) an extended attribute.
pub fn set_xattr(file: &File, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    // SAFETY: the kernel reads value.len() bytes from value and the NUL-terminated name.
    cvt(unsafe {
        libc::fsetxattr(
            file.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

pub fn remove_xattr(file: &File, name: &CStr) -> io::Result<()> {
    // SAFETY: a NUL-terminated name; no memory is written.
    cvt(unsafe { libc::fremovexattr(file.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// An open-file-description lock (F_OFD_*): each open fid is its own owner, so two
/// clients of this one process still conflict as two processes would.
pub fn ofd_lock(file: &File, cmd: i32, lock: &mut libc::flock) -> io::Result<()> {
    lock.l_pid = 0;
    // SAFETY: `lock` is a valid flock the kernel may read and (for F_OFD_GETLK) write.
    cvt(unsafe { libc::fcntl(file.as_raw_fd(), cmd, lock as *mut libc::flock) }).map(drop)
}

/// Turns a checked single-component name into a `Path` to join onto a fid's path.
pub fn name_path(name: &[u8]) -> &Path {
    Path::new(OsStr::from_bytes(name))
}
