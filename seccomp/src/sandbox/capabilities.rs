//! Dropping every Linux capability.
//!
//! Workers usually start without capabilities, but a VMM run as root starts root workers,
//! and root's capabilities would survive everything else the sandbox does: many ioctls and
//! most of the kernel's permission checks look at them. Order matters: the bounding set
//! can only shrink while CAP_SETPCAP is still effective, so it goes first; the three sets
//! of capset(2) go last.

use std::io;

use crate::error::SandboxError;

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets, passed as two 32-bit halves.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// CAP_SETPCAP's bit.
const CAP_SETPCAP: u32 = 8;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn step_error(step: &'static str) -> SandboxError {
    SandboxError::Capabilities {
        step,
        source: io::Error::last_os_error(),
    }
}

/// Empties the bounding (when allowed), ambient, inheritable, permitted and effective sets
/// of the calling thread.
pub fn drop_all() -> Result<(), SandboxError> {
    if effective_has(CAP_SETPCAP)? {
        drop_bounding_set()?;
    }
    // Without CAP_SETPCAP the bounding set stays as it is, which is harmless here: it
    // only limits what an execve could gain, and no_new_privs plus the seccomp filter
    // rule out execve.

    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers and changes only this thread's
    // ambient set.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    // EINVAL: a kernel before 4.3, which has no ambient set to clear.
    if ret != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(step_error("clearing the ambient set"));
    }

    let header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads a version-3 header and the two data structs version 3 expects.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if ret != 0 {
        return Err(step_error("capset to empty sets"));
    }
    Ok(())
}

fn effective_has(capability: u32) -> Result<bool, SandboxError> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget fills the header and two data structs of version 3, which is what we
    // pass.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return Err(step_error("capget"));
    }
    let word = &data[(capability / 32) as usize];
    Ok(word.effective & (1 << (capability % 32)) != 0)
}

fn drop_bounding_set() -> Result<(), SandboxError> {
    // Capabilities are numbered densely from 0 to the kernel's CAP_LAST_CAP; the first
    // number the kernel rejects with EINVAL is one past it.
    for capability in 0..64 as libc::c_ulong {
        // SAFETY: PR_CAPBSET_DROP takes a capability number, no pointers.
        let ret = unsafe {
            libc::prctl(
                libc::PR_CAPBSET_DROP,
                capability,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if ret != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(step_error("dropping the bounding set"));
        }
    }
    Ok(())
}
