//! ULIDs (github.com/ulid/spec): 48 bits of Unix milliseconds then 80 random bits, written as
//! 26 characters of Crockford base32. Sortable by time, unique without coordination: the
//! alert id consumers deduplicate on.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Makes ULIDs that sort in the order they were made: a new millisecond gets fresh random
/// bits; within the same millisecond (or when the clock steps back) the previous ULID plus
/// one is used, as the spec's monotonic mode does.
#[derive(Debug, Clone)]
pub struct UlidGenerator {
    rng: fastrand::Rng,
    last: Option<Ulid>,
}

impl UlidGenerator {
    /// Random bits seeded from the operating system (per process, not per pid).
    pub fn new() -> Self {
        UlidGenerator {
            rng: fastrand::Rng::new(),
            last: None,
        }
    }

    /// Reproducible ids, for tests.
    pub fn with_seed(seed: u64) -> Self {
        UlidGenerator {
            rng: fastrand::Rng::with_seed(seed),
            last: None,
        }
    }

    /// The next id at wall-clock time `wall`.
    pub fn next(&mut self, wall: SystemTime) -> Ulid {
        let fresh = Ulid::from_parts(wall, self.rng.u128(..));
        let id = match self.last {
            Some(last) if fresh.timestamp_ms() <= last.timestamp_ms() => {
                Ulid(last.0.saturating_add(1))
            }
            _ => fresh,
        };
        self.last = Some(id);
        id
    }
}

impl Default for UlidGenerator {
    fn default() -> Self {
        Self::new()
    }
}

/// A ULID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ulid(pub u128);

impl Ulid {
    /// From a wall-clock time and 80 (or more; the rest is ignored) random bits.
    pub fn from_parts(time: SystemTime, random: u128) -> Self {
        let ms = time
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0)
            & ((1u128 << 48) - 1);
        Ulid((ms << 80) | (random & ((1u128 << 80) - 1)))
    }

    /// Milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        (self.0 >> 80) as u64
    }

    /// Parses the 26-character form (case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        if s.len() != 26 {
            return None;
        }
        let mut v: u128 = 0;
        for (i, c) in s.bytes().enumerate() {
            let d = ALPHABET.iter().position(|a| *a == c.to_ascii_uppercase())? as u128;
            if i == 0 && d > 7 {
                return None; // would overflow 128 bits
            }
            v = (v << 5) | d;
        }
        Some(Ulid(v))
    }
}

impl fmt::Display for Ulid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; 26];
        for (i, o) in out.iter_mut().enumerate() {
            let shift = 5 * (25 - i);
            *o = ALPHABET[((self.0 >> shift) & 31) as usize];
        }
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

impl serde::Serialize for Ulid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trips_and_sorts_by_time() {
        let t = UNIX_EPOCH + Duration::from_millis(1_469_918_176_385);
        let a = Ulid::from_parts(t, 0x0123_4567_89ab_cdef_0123);
        let s = a.to_string();
        assert_eq!(s.len(), 26);
        // The spec's example timestamp encodes to these 10 characters.
        assert_eq!(&s[..10], "01ARYZ6S41");
        assert_eq!(Ulid::parse(&s), Some(a));
        assert_eq!(Ulid::parse(&s.to_lowercase()), Some(a));
        assert_eq!(a.timestamp_ms(), 1_469_918_176_385);
        let later = Ulid::from_parts(t + Duration::from_millis(1), 0);
        assert!(later > a);
        assert_eq!(Ulid::parse("8ZZZZZZZZZZZZZZZZZZZZZZZZZ"), None);
        assert_eq!(Ulid::parse("short"), None);
    }

    #[test]
    fn generated_ids_are_strictly_increasing_within_a_millisecond_and_backwards_steps() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_000);
        let mut g = UlidGenerator::with_seed(7);
        let a = g.next(t);
        let b = g.next(t);
        let c = g.next(t - Duration::from_secs(1));
        assert_eq!(b.0, a.0 + 1);
        assert_eq!(c.0, b.0 + 1);
        let d = g.next(t + Duration::from_millis(1));
        assert!(d > c);
        assert_eq!(d.timestamp_ms(), 1_700_000_000_001);
        // Two generators seeded alike repeat each other; the OS-seeded ones do not.
        assert_eq!(UlidGenerator::with_seed(7).next(t), a);
        assert_ne!(UlidGenerator::new().next(t), UlidGenerator::new().next(t));
    }
}
