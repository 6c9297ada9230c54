//! The bpf filesystem pins live on. [`ensure_mounted`] checks that a directory is
//! (or, once created, will be) on one, and mounts one at the usual place,
//! `/sys/fs/bpf`, when the node has none there (as Cilium does; a fresh machine
//! often has no bpffs mounted). The agent calls it before pinning; the demo and the
//! test fixtures call it before they make their directories under `/sys/fs/bpf`.
//!
//! It never unmounts anything, and mounts nowhere but `/sys/fs/bpf`: any other
//! place is the caller's to mount.
use std::fs::File;
use std::os::fd::AsRawFd as _;
use std::path::Path;

use super::{DatapathError, paths};

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Whether `path` (which must exist) is on a bpf filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool, DatapathError> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| DatapathError::io("checking", path, std::io::Error::other(e)))?;
    // SAFETY: a zeroed statfs is a valid out-buffer; the path is NUL-terminated.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return Err(DatapathError::io(
            "checking",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    Ok(stat.f_type as i64 == BPF_FS_MAGIC)
}

/// Makes sure `dir` (which need not exist yet) is on a bpf filesystem: its
/// nearest existing ancestor must be on one, or be `/sys/fs/bpf` itself, where one
/// is mounted if it is not there yet.
pub fn ensure_mounted(dir: &Path) -> Result<(), DatapathError> {
    let Some(existing) = dir.ancestors().find(|path| path.exists()) else {
        return Err(DatapathError::NotBpffs {
            path: dir.to_owned(),
        });
    };
    if is_bpffs(existing)? {
        return Ok(());
    }
    if existing != Path::new(paths::BPFFS_MOUNT) {
        return Err(DatapathError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    mount_standard()
}

/// Mounts a bpffs at `/sys/fs/bpf` unless one is there.
///
/// Processes started side by side (agents in the tests, a demo next to them) would
/// each see no bpffs and each mount one, the later hiding what the earlier pinned.
/// An exclusive flock on the mount point orders them, and the check is repeated
/// under it: the directory a waiting process locked is the one under the new mount,
/// and the path now leads to the mount, so it finds the bpffs and leaves it.
fn mount_standard() -> Result<(), DatapathError> {
    let standard = Path::new(paths::BPFFS_MOUNT);
    let lock =
        File::open(standard).map_err(|source| DatapathError::io("opening", standard, source))?;
    // SAFETY: flock on a file descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(DatapathError::io(
            "locking",
            standard,
            std::io::Error::last_os_error(),
        ));
    }
    if is_bpffs(standard)? {
        return Ok(());
    }
    // SAFETY: NUL-terminated literals; mounting a fresh bpffs instance.
    let rc = unsafe {
        libc::mount(
            c"bpffs".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DatapathError::io(
            "mounting bpffs on",
            standard,
            std::io::Error::last_os_error(),
        ));
    }
    tracing::info!(path = %standard.display(), "mounted the bpf filesystem");
    Ok(())
}
