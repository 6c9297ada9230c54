//! Read-only access to the agent's pinned maps: `BPF_OBJ_GET` with `BPF_F_RDONLY`,
//! so a test can look at what the kernel holds and can write nothing, with plain
//! syscalls (no loader state). Used by [`crate::counters::pinned`] and by tests that
//! read the endpoint entries. Must not: open a map writable.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_F_RDONLY: u32 = 1 << 3;

#[repr(C)]
struct ObjGet {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
struct Elem {
    map_fd: u32,
    _pad: u32,
    key: u64,
    /// `value` (lookup) or `next_key`.
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, correctly laid out bpf_attr prefix of its size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub struct Map(OwnedFd);

impl Map {
    pub fn open(path: &Path) -> io::Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())?;
        let mut attr = ObjGet {
            pathname: c.as_ptr() as u64,
            bpf_fd: 0,
            file_flags: BPF_F_RDONLY,
        };
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: a new fd the kernel just gave us.
        Ok(Map(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }

    /// The value bytes at `key` (`value_len` bytes: per-CPU maps hold one
    /// 8-byte-aligned slot per possible CPU).
    pub fn lookup(&self, key: &[u8], value_len: usize) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; value_len];
        let mut attr = Elem {
            map_fd: self.0.as_raw_fd() as u32,
            _pad: 0,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            flags: 0,
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(_) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every key (`key_len` bytes each).
    pub fn keys(&self, key_len: usize) -> io::Result<Vec<Vec<u8>>> {
        let mut keys: Vec<Vec<u8>> = Vec::new();
        loop {
            let mut next = vec![0u8; key_len];
            let mut attr = Elem {
                map_fd: self.0.as_raw_fd() as u32,
                _pad: 0,
                // NULL: the first key.
                key: keys.last().map_or(0, |k| k.as_ptr() as u64),
                value: next.as_mut_ptr() as u64,
                flags: 0,
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => keys.push(next),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(e) => return Err(e),
            }
        }
    }
}

/// Number of possible CPUs (the per-CPU value count), from
/// `/sys/devices/system/cpu/possible` (`0-3`, `0,2-5`).
pub fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut count = 0;
    for part in text.trim().split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (
            a.parse().map_err(io::Error::other)?,
            b.parse().map_err(io::Error::other)?,
        );
        count += b - a + 1;
    }
    Ok(count)
}

/// Plain `#[repr(C)]` map data (rayfence_common's map types) from its bytes.
pub fn from_bytes<T: aya::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: `T` is `aya::Pod`, plain data: any byte pattern of its size is a value.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}
