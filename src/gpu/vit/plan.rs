//! One arena per batch size, planned once. A forward is recorded (every operation's reads and
//! writes, by [`Act`]); each activation's live ranges run from a write to the last read of
//! that value; two activations may share memory when none of their live ranges meet. Offsets
//! are placed first-fit, largest first, aligned to [`ALIGN`] slots. Offsets and lengths of the
//! arena count 2-byte slots (an fp32 value takes two).

use std::collections::BTreeMap;

use super::ops::{Buf, GemmSpec, Ops};
use super::{Act, EngineError, VitShape, VitWeights, forward};

/// Offsets are multiples of this many 2-byte slots (256 bytes).
pub const ALIGN: usize = 128;

/// Where each activation lives in the arena of one batch size.
#[derive(Debug, Clone)]
pub struct Plan {
    pub batch: usize,
    bufs: BTreeMap<Act, Buf>,
    /// Arena length in 2-byte slots.
    pub len: usize,
    /// Live ranges (operation indices, inclusive) per activation, as recorded.
    pub live: BTreeMap<Act, Vec<(usize, usize)>>,
    /// Operations in one forward.
    pub ops: usize,
}

impl Plan {
    /// The planned buffer of `act`.
    pub fn buf(&self, act: Act) -> Buf {
        self.bufs[&act]
    }

    /// Every planned buffer.
    pub fn bufs(&self) -> impl Iterator<Item = Buf> + '_ {
        self.bufs.values().copied()
    }

    /// Sum of the activations' sizes in slots: the arena without sharing.
    pub fn unshared_len(&self) -> usize {
        self.bufs.values().map(|b| b.slots()).sum()
    }

    /// Arena size in bytes.
    pub fn bytes(&self) -> usize {
        self.len * 2
    }

    /// Whether two activations are ever live at the same operation.
    pub fn conflict(&self, a: Act, b: Act) -> bool {
        let (Some(x), Some(y)) = (self.live.get(&a), self.live.get(&b)) else {
            return false;
        };
        x.iter()
            .any(|&(s0, e0)| y.iter().any(|&(s1, e1)| s0 <= e1 && s1 <= e0))
    }

    /// Plans the arena of `batch` crops for `shape`.
    pub fn new(shape: &VitShape, batch: usize) -> Result<Plan, EngineError> {
        let mut rec = Recorder::default();
        let weights = VitWeights::load(&mut rec, &ZeroSource, shape)?;
        // Recording uses a plan where every activation has its own range, so the recorder can
        // name what each operation touches.
        let mut unshared = BTreeMap::new();
        let mut off = 0usize;
        for act in Act::ALL {
            let b = Buf {
                act,
                offset: off,
                len: shape.len(act, batch),
            };
            unshared.insert(act, b);
            off = b.end().div_ceil(ALIGN) * ALIGN;
        }
        let draft = Plan {
            batch,
            bufs: unshared,
            len: off,
            live: BTreeMap::new(),
            ops: 0,
        };
        forward(&mut rec, &weights, shape, &draft, batch, None)?;
        let live = rec.live_ranges()?;
        let mut order: Vec<Act> = Act::ALL.to_vec();
        order.sort_by_key(|a| std::cmp::Reverse(shape.len(*a, batch) * a.dtype().slots()));
        let mut placed: Vec<Buf> = Vec::new();
        let mut with_live = Plan {
            batch,
            bufs: BTreeMap::new(),
            len: 0,
            live,
            ops: rec.ops.len(),
        };
        for act in order {
            let len = shape.len(act, batch);
            let mut candidates: Vec<usize> = vec![0];
            candidates.extend(
                placed
                    .iter()
                    .filter(|p| with_live.conflict(act, p.act))
                    .map(|p| p.end().div_ceil(ALIGN) * ALIGN),
            );
            candidates.sort_unstable();
            let offset = candidates
                .into_iter()
                .find(|&o| {
                    let b = Buf {
                        act,
                        offset: o,
                        len,
                    };
                    placed
                        .iter()
                        .all(|p| !with_live.conflict(act, p.act) || !b.overlaps(p))
                })
                .expect("the end of the last conflicting buffer is always free");
            let b = Buf { act, offset, len };
            with_live.len = with_live.len.max(b.end());
            placed.push(b);
            with_live.bufs.insert(act, b);
        }
        Ok(with_live)
    }
}

/// Zero-valued tensors of the right shapes, for recording.
struct ZeroSource;

impl super::TensorSource for ZeroSource {
    fn tensor(&self, _: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        Ok(vec![0.0; shape.iter().product()])
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// An [`Ops`] that only records which activations each operation reads and writes.
#[derive(Default)]
struct Recorder {
    weights: Vec<usize>,
    ops: Vec<Vec<(Act, Access)>>,
}

impl Recorder {
    fn op(&mut self, reads: &[Buf], writes: &[Buf]) -> Result<(), EngineError> {
        let mut v: Vec<(Act, Access)> = reads.iter().map(|b| (b.act, Access::Read)).collect();
        v.extend(writes.iter().map(|b| (b.act, Access::Write)));
        self.ops.push(v);
        Ok(())
    }

    /// Live ranges per activation: from the operation that writes a value (without reading
    /// the old one) to the last operation that reads it.
    fn live_ranges(&self) -> Result<BTreeMap<Act, Vec<(usize, usize)>>, EngineError> {
        let mut live: BTreeMap<Act, Vec<(usize, usize)>> = BTreeMap::new();
        // Crops are written by the caller before operation 0.
        live.insert(Act::Crops, vec![(0, 0)]);
        for (i, accesses) in self.ops.iter().enumerate() {
            for &(act, how) in accesses {
                let reads_too = accesses.contains(&(act, Access::Read));
                let ranges = live.entry(act).or_default();
                match (how, ranges.last_mut()) {
                    (Access::Write, _) if !reads_too => ranges.push((i, i)),
                    (_, Some(r)) => r.1 = i,
                    (Access::Read, None) => {
                        return Err(EngineError::Layout(format!(
                            "operation {i} reads {act:?} before anything wrote it"
                        )));
                    }
                    (Access::Write, None) => ranges.push((i, i)),
                }
            }
        }
        // The output is read by the caller after the last operation.
        let end = self.ops.len();
        if let Some(r) = live.get_mut(&Act::Embedding).and_then(|v| v.last_mut()) {
            r.1 = end;
        }
        Ok(live)
    }
}

impl Ops for Recorder {
    type Weight = usize;

    fn upload(&mut self, _: &str, values: &[f32]) -> Result<usize, EngineError> {
        self.weights.push(values.len());
        Ok(self.weights.len() - 1)
    }
    fn weight_len(&self, w: usize) -> usize {
        self.weights[w]
    }
    fn patchify(
        &mut self,
        c: Buf,
        o: Buf,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), EngineError> {
        self.op(&[c], &[o])
    }
    fn gemm(&mut self, _: &GemmSpec, _: usize, a: Buf, c: Buf) -> Result<(), EngineError> {
        self.op(&[a], &[c])
    }
    fn embed_tokens(
        &mut self,
        p: Buf,
        _: usize,
        _: usize,
        o: Buf,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), EngineError> {
        self.op(&[p], &[o])
    }
    fn add_layernorm(
        &mut self,
        x: Buf,
        residual: Option<Buf>,
        sum_out: Option<Buf>,
        norm_out: Buf,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), EngineError> {
        let mut reads = vec![x];
        reads.extend(residual);
        let mut writes = vec![norm_out];
        writes.extend(sum_out);
        self.op(&reads, &writes)
    }
    fn add_bias(&mut self, x: Buf, _: usize, _: usize, _: usize) -> Result<(), EngineError> {
        self.op(&[x], &[x])
    }
    fn bias_quick_gelu(&mut self, x: Buf, _: usize, _: usize, _: usize) -> Result<(), EngineError> {
        self.op(&[x], &[x])
    }
    fn attention(
        &mut self,
        q: Buf,
        o: Buf,
        _: usize,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), EngineError> {
        self.op(&[q], &[o])
    }
    fn take_rows(
        &mut self,
        s: Buf,
        d: Buf,
        _: usize,
        _: usize,
        _: usize,
    ) -> Result<(), EngineError> {
        self.op(&[s], &[d])
    }
}
