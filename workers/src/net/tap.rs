//! The host end: a TAP device carrying whole Ethernet frames, each preceded by a 12-byte
//! `virtio_net_hdr_v1`, the same header the guest puts in front of its frames. The kernel
//! does the offload work the header asks for (segmenting a TSO frame, finishing a partial
//! checksum), so frames pass between guest and TAP without the worker touching them.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use thiserror::Error;

use crate::fd::set_nonblocking;

/// `struct virtio_net_hdr_v1`: the header before every frame, both ways. 12 bytes: with
/// VIRTIO_F_VERSION_1 `num_buffers` is always there, mergeable buffers or not.
pub const VNET_HDR_LEN: usize = 12;

// From <linux/if_tun.h>; the libc crate has none of them.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// Also in the net worker's seccomp policy, the one TUN ioctl allowed after setup.
pub const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

pub const TUN_F_CSUM: u32 = 0x01;
pub const TUN_F_TSO4: u32 = 0x02;
pub const TUN_F_TSO6: u32 = 0x04;
pub const TUN_F_TSO_ECN: u32 = 0x08;
pub const TUN_F_UFO: u32 = 0x10;

#[derive(Debug, Error)]
pub enum TapError {
    #[error("TAP interface name {0:?} is empty, longer than 15 bytes or has a NUL or '/'")]
    BadName(String),
    #[error("/dev/net/tun does not exist (no tun module, or no device node in this container)")]
    NoTunDevice,
    #[error("no permission to open /dev/net/tun or create TAP {name:?} (needs CAP_NET_ADMIN, or a persistent TAP owned by this user)")]
    Permission { name: String },
    #[error("TAP {name:?} is busy: another process has it open (and it is not multiqueue)")]
    Busy { name: String },
    #[error("{name:?} exists and is not a TAP device with the flags asked for (or its multi_queue flag does not match: multi_queue exactly when queues > 1)")]
    WrongDevice { name: String },
    #[error("cannot set up TAP {name:?}: {source}")]
    Setup { name: String, source: io::Error },
    #[error("descriptor {fd} is not a TAP opened with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR")]
    NotAVnetTap { fd: RawFd },
    #[error("cannot set up the TAP descriptor {fd}: {source}")]
    SetupFd { fd: RawFd, source: io::Error },
}

/// `struct ifreq` as TUNSETIFF/TUNGETIFF use it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    // The rest of the kernel's union, so the kernel writes into memory we own.
    _pad: [u8; 22],
}

/// One queue of a TAP device, set up for virtio-net.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
}

impl Tap {
    /// Opens /dev/net/tun and attaches to (or creates) TAP `name`, with vnet headers,
    /// non-blocking. `multi_queue` attaches one more queue of a multiqueue TAP.
    pub fn open(name: &str, multi_queue: bool) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.bytes().any(|b| b == 0 || b == b'/')
        {
            return Err(TapError::BadName(name.to_owned()));
        }
        let file: File = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open("/dev/net/tun")
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
                    TapError::NoTunDevice
                }
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
                    name: name.to_owned(),
                },
                _ => TapError::Setup {
                    name: name.to_owned(),
                    source: e,
                },
            })?;
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        if multi_queue {
            request.flags |= IFF_MULTI_QUEUE;
        }
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `request` is (with
        // the union's full size), on a descriptor we own.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        if ret < 0 {
            let error = io::Error::last_os_error();
            let name = name.to_owned();
            return Err(match error.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy { name },
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name },
                Some(libc::EINVAL) => TapError::WrongDevice { name },
                _ => TapError::Setup {
                    name,
                    source: error,
                },
            });
        }
        // The kernel writes back the device's name: a `%d` in `name` is now a number.
        let tap = Tap {
            fd: file.into(),
            name: name_of(&request),
        };
        tap.set_vnet_hdr_len().map_err(|source| TapError::Setup {
            name: tap.name.clone(),
            source,
        })?;
        Ok(tap)
    }

    /// Takes a TAP descriptor the VMM opened: checks its flags, sets the header size and
    /// non-blocking mode.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes one `struct ifreq` into `request`; on a descriptor that
        // is not a TUN/TAP it fails (EBADFD/ENOTTY/EINVAL) and writes nothing.
        let ret = unsafe { libc::ioctl(raw, TUNGETIFF, &mut request) };
        let wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if ret < 0 || request.flags & wanted != wanted {
            return Err(TapError::NotAVnetTap { fd: raw });
        }
        let tap = Tap {
            fd,
            name: name_of(&request),
        };
        tap.set_vnet_hdr_len()
            .and_then(|()| set_nonblocking(&tap.fd))
            .map_err(|source| TapError::SetupFd { fd: raw, source })?;
        Ok(tap)
    }

    fn set_vnet_hdr_len(&self) -> io::Result<()> {
        let len: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETVNETHDRSZ, &len) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloaded frames the kernel may hand us (TUN_F_* bits): what the guest said
    /// it can take.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (vnet header first); `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame (vnet header first); `WouldBlock` when the TAP's queue is full.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: `frame` is valid for `frame.len()` bytes of reads.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl Tap {
    /// Writes one frame gathered from `iov` (vnet header first).
    ///
    /// # Safety
    ///
    /// Every iovec must point to memory valid for reads of its length for the whole call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees the iovecs; the kernel only reads through them.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// The VMM opens the TAP and hands the worker only its descriptor.
impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> OwnedFd {
        tap.fd
    }
}

fn name_of(request: &IfReq) -> String {
    let len = request
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(request.name.len());
    String::from_utf8_lossy(&request.name[..len]).into_owned()
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for name in ["", "a/b", "0123456789abcdef", "a\0b"] {
            assert!(matches!(Tap::open(name, false), Err(TapError::BadName(_))));
        }
    }

    #[test]
    fn a_descriptor_that_is_no_tap_is_refused() {
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(file.into()),
            Err(TapError::NotAVnetTap { .. })
        ));
    }
}
