//! The spool's record format, and reading it back past damage.
//!
//! A record is `[len u32][crc32 u32][seq u64][kind u8][key len u16][key][payload]`,
//! little-endian; `len` counts from `seq` to the end, the CRC covers the same bytes. Put
//! records written by this version start their payload with the wall-clock time of the put
//! (u64 milliseconds since the Unix epoch), so an age cap survives restarts.

/// The record kinds.
pub const PUT_LEGACY: u8 = 1;
pub const ACK: u8 = 2;
pub const PUT_UPDATE_LEGACY: u8 = 3;
pub const PUT_NEW: u8 = 4;
pub const PUT_UPDATE: u8 = 5;
pub const PUT_END: u8 = 6;
/// One sink (the key names it) has its copy; the entry stays for the others.
pub const SINK_ACK: u8 = 7;

/// `len` + `crc` + `seq` + `kind` + `key len`.
pub const HEADER: usize = 4 + 4 + 8 + 1 + 2;
/// Largest record accepted: a payload is one MQTT packet (1 MiB) plus headroom. A corrupt
/// length must neither allocate nor checksum gigabytes.
pub const MAX_RECORD: usize = (1 << 20) + 4096;
/// Longest key (an alert id is 26 characters).
pub const MAX_KEY: usize = 128;

use crate::types::AlertChange;

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Put {
        seq: u64,
        kind: AlertChange,
        key: String,
        /// Wall-clock milliseconds of the put (`None` for records of earlier versions).
        at_ms: Option<u64>,
        payload: Vec<u8>,
    },
    Ack {
        seq: u64,
    },
    /// Sink `sink` acknowledged `seq`; other sinks may still owe it.
    SinkAck {
        seq: u64,
        sink: String,
    },
}

/// CRC-32 (IEEE) over the parts in order.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

fn write(out: &mut Vec<u8>, seq: u64, kind: u8, key: &str, prefix: &[u8], payload: &[u8]) {
    let key = &key.as_bytes()[..key.len().min(MAX_KEY)];
    let body_len = 8 + 1 + 2 + key.len() + prefix.len() + payload.len();
    let seq_b = seq.to_le_bytes();
    let klen = (key.len() as u16).to_le_bytes();
    let crc = crc32(&[&seq_b, &[kind], &klen, key, prefix, payload]);
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&seq_b);
    out.push(kind);
    out.extend_from_slice(&klen);
    out.extend_from_slice(key);
    out.extend_from_slice(prefix);
    out.extend_from_slice(payload);
}

/// Appends a put record.
pub fn encode_put(
    out: &mut Vec<u8>,
    seq: u64,
    kind: AlertChange,
    key: &str,
    at_ms: u64,
    payload: &[u8],
) {
    let k = match kind {
        AlertChange::New => PUT_NEW,
        AlertChange::Update => PUT_UPDATE,
        AlertChange::End => PUT_END,
    };
    write(out, seq, k, key, &at_ms.to_le_bytes(), payload);
}

/// Appends an ack record.
pub fn encode_ack(out: &mut Vec<u8>, seq: u64) {
    write(out, seq, ACK, "", &[], &[]);
}

/// Appends a sink's ack record (`sink` is 1 to [`MAX_KEY`] bytes).
pub fn encode_sink_ack(out: &mut Vec<u8>, seq: u64, sink: &str) {
    write(out, seq, SINK_ACK, sink, &[], &[]);
}

/// The record starting at `pos`, and where the next one starts, if a whole valid one is
/// there. Cheap checks (length, kind, key length) come before the checksum, so scanning
/// garbage byte by byte stays linear in practice.
fn parse_at(data: &[u8], pos: usize) -> Option<(Record, usize)> {
    let rest = data.get(pos..)?;
    if rest.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().ok()?) as usize;
    if !(11..=MAX_RECORD).contains(&len) || rest.len() - 8 < len {
        return None;
    }
    let kind = rest[16];
    let klen = u16::from_le_bytes([rest[17], rest[18]]) as usize;
    let timed = matches!(kind, PUT_NEW | PUT_UPDATE | PUT_END);
    let plausible = match kind {
        ACK => len == 11 && klen == 0,
        SINK_ACK => (1..=MAX_KEY).contains(&klen) && len == 11 + klen,
        PUT_LEGACY | PUT_UPDATE_LEGACY => klen <= MAX_KEY && 11 + klen <= len,
        PUT_NEW | PUT_UPDATE | PUT_END => klen <= MAX_KEY && 11 + klen + 8 <= len,
        _ => false,
    };
    if !plausible {
        return None;
    }
    let crc = u32::from_le_bytes(rest[4..8].try_into().ok()?);
    let body = &rest[8..8 + len];
    if crc32(&[body]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(body[..8].try_into().ok()?);
    let key = String::from_utf8_lossy(&body[11..11 + klen]).into_owned();
    let mut payload = &body[11 + klen..];
    let record = if kind == ACK {
        Record::Ack { seq }
    } else if kind == SINK_ACK {
        Record::SinkAck { seq, sink: key }
    } else {
        let at_ms = if timed {
            let t = u64::from_le_bytes(payload[..8].try_into().ok()?);
            payload = &payload[8..];
            Some(t)
        } else {
            None
        };
        Record::Put {
            seq,
            kind: match kind {
                PUT_UPDATE | PUT_UPDATE_LEGACY => AlertChange::Update,
                PUT_END => AlertChange::End,
                // Legacy puts did not say new from end: kept as long as a new would be.
                _ => AlertChange::New,
            },
            key,
            at_ms,
            payload: payload.to_vec(),
        }
    };
    Some((record, pos + 8 + len))
}

/// Everything read back from a log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub records: Vec<Record>,
    /// Damaged ranges that valid records follow (skipped by resynchronising).
    pub skipped: Vec<(usize, usize)>,
    /// Where the last valid record ends: what follows is a torn or damaged tail.
    pub valid_end: usize,
}

impl Decoded {
    pub fn skipped_bytes(&self) -> usize {
        self.skipped.iter().map(|(a, b)| b - a).sum()
    }
}

/// Reads every valid record of `data`. A damaged record does not end the read: the scan
/// moves on byte by byte to the next valid record, so one flipped byte costs one record.
pub fn decode(data: &[u8]) -> Decoded {
    let mut out = Decoded::default();
    let mut pos = 0;
    while pos + HEADER <= data.len() {
        match parse_at(data, pos) {
            Some((record, next)) => {
                if pos > out.valid_end {
                    out.skipped.push((out.valid_end, pos));
                }
                out.records.push(record);
                out.valid_end = next;
                pos = next;
            }
            None => pos += 1,
        }
    }
    out
}
