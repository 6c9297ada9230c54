//! Unique, short names for everything a fixture creates (namespaces, cgroups,
//! interface tags), so tests in one binary run in parallel and separate test
//! binaries run side by side without colliding.
//!
//! A tag is `<pid base36><counter base36>` (at most 5 + a few characters), short
//! enough to fit in a 15-character interface name with a prefix and an index.
//! This module must not create anything itself.

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    if n == 0 {
        return "0".into();
    }
    let mut out = Vec::new();
    while n > 0 {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
    }
    out.reverse();
    String::from_utf8(out).expect("ascii digits")
}

/// A short tag unique within this machine for the life of this process:
/// base36 pid, `x`, base36 per-process counter (for example `2n9cx3`).
pub fn unique_tag() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}x{}", base36(std::process::id().into()), base36(n.into()))
}

/// A name `rf-<role>-<pid>-<n>` for objects with no length limit (network
/// namespaces, cgroup directories).
pub fn unique_name(role: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("rf-{role}-{}-{n}", std::process::id())
}

/// Every fixture object's name starts with this prefix plus the pid, which is how
/// the self-tests check that nothing of theirs is left behind.
pub fn pid_prefix(role: &str) -> String {
    format!("rf-{role}-{}-", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_short_and_distinct() {
        let a = unique_tag();
        let b = unique_tag();
        assert_ne!(a, b);
        // "rf" + tag + "h" + 2-digit index must fit IFNAMSIZ-1 = 15.
        assert!(a.len() <= 10, "{a}");
    }
}
