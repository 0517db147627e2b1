//! ULIDs (github.com/ulid/spec): 48 bits of Unix milliseconds then 80 random bits, written as
//! 26 characters of Crockford base32. Sortable by time, unique without coordination: the
//! alert id consumers deduplicate on.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Random bits for ULIDs: splitmix64 seeded from the clock, the process id and an address.
/// Not cryptographic; ULIDs need uniqueness, not secrecy.
#[derive(Debug, Clone)]
pub struct Entropy(u64);

impl Entropy {
    pub fn new() -> Self {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let local = 0u8;
        let addr = &local as *const u8 as u64;
        Entropy(t ^ (u64::from(std::process::id()) << 32) ^ addr.rotate_left(17))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// 128 random bits (a ULID uses the low 80).
    pub fn next_u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }
}

impl Default for Entropy {
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
}
