//! Content-derived ids: endpoint ids from the pod UID, identities from what they
//! stand for (pod identity key, CIDR prefix, Service, a Service's node ports, a pod's
//! host ports, a port claimed twice), a new policy's id from its compiled content.
//! The same cluster state gives the same endpoints and identities whatever order the
//! objects arrived in, so an agent that restarts (or is upgraded) and adopts pinned
//! maps renumbers none of them. Policy ids follow content only when created (an
//! in-place edit keeps its id: `local.rs`); a restart gets them back from the pinned
//! endpoints instead, with the same result: no pinned endpoint entry ever points at
//! another pod's policy, not even between the first apply and re-registering the
//! endpoints.
//!
//! Must not: use a hasher seeded per process (std's `RandomState`), or one whose
//! output may change between Rust releases (`DefaultHasher`).
use std::hash::{Hash, Hasher};

/// How many ids each space spans; a collision probes to the next free id.
const SPAN: u32 = 1 << 30;

/// FNV-1a, 64 bit: fixed, tiny, stable across processes and releases.
struct Fnv1a(u64);

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// The stable hash of `(domain, value)`; the domain keeps the id spaces' inputs apart.
pub(super) fn stable_hash<T: Hash + ?Sized>(domain: &str, value: &T) -> u64 {
    let mut hasher = Fnv1a(0xcbf2_9ce4_8422_2325);
    domain.hash(&mut hasher);
    value.hash(&mut hasher);
    hasher.finish()
}

/// The id for `seed` in `[first, first + SPAN)`: its hash slot, or the next one not
/// `taken` (collisions are rare: spaces hold thousands of ids in a billion slots).
pub(super) fn pick(seed: u64, first: u32, taken: impl Fn(u32) -> bool) -> u32 {
    let mut offset = (seed % u64::from(SPAN)) as u32;
    loop {
        let id = first + offset;
        if !taken(id) {
            return id;
        }
        offset = (offset + 1) % SPAN;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_fixed_values_not_per_process() {
        // FNV-1a over b"endpoint\xffuid-1\xff" (str hashes its bytes, then 0xff).
        // Pinned: a change here renumbers every pinned map on upgrade.
        assert_eq!(stable_hash("endpoint", "uid-1"), 0x1203_6302_fd69_5428);
        assert_ne!(
            stable_hash("endpoint", "uid-1"),
            stable_hash("policy", "uid-1")
        );
    }

    #[test]
    fn pick_probes_past_taken_ids_and_stays_in_range() {
        let seed = stable_hash("policy", &42u32);
        let first = pick(seed, 1, |_| false);
        assert!((1..1 + SPAN).contains(&first));
        let second = pick(seed, 1, |id| id == first);
        assert_ne!(second, first);
        assert!((1..1 + SPAN).contains(&second));
        // Wraps within the span.
        assert_eq!(
            pick(u64::from(SPAN) - 1, 256, |id| id == 256 + SPAN - 1),
            256
        );
    }
}
