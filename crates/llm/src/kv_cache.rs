//! The ragged KV cache: every row (sequence) has its own length and storage.

use candle_core::{Result, Tensor};

/// One layer's cached keys and values of one row `[1, kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
}

/// The cache of one sequence: every layer's keys and values, `len` slots filled.
#[derive(Debug, Clone)]
struct RowKv {
    layers: Vec<Option<LayerKv>>,
    len: usize,
    /// Slots allocated at the first append (see [`KvCache::reserve`]).
    reserve: usize,
}

impl RowKv {
    fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            len: 0,
            reserve: 0,
        }
    }

    /// Allocated slots.
    fn capacity(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .and_then(|l| l.k.dim(2).ok())
            .unwrap_or(0)
    }

    /// A copy of the filled slots that shares no storage with `self` (appends to one never
    /// show in the other); it grows to its reserve at its next append.
    fn deep_copy(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| {
                        Ok::<_, candle_core::Error>(LayerKv {
                            k: l.k.narrow(2, 0, self.len)?.copy()?,
                            v: l.v.narrow(2, 0, self.len)?.copy()?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: self.len,
            reserve: self.reserve,
        })
    }

    /// A row holding the first `len` slots of `self`, copied into storage of `reserve` slots
    /// (at least `len`): a cached prefix handed to a new sequence, one copy on the device.
    fn prefix(&self, len: usize, reserve: usize) -> Result<Self> {
        if len > self.len {
            candle_core::bail!("a prefix of {len} slots from a row of {}", self.len);
        }
        let cap = reserve.max(len);
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .filter(|_| len > 0)
                    .map(|l| {
                        let (b, h, _, d) = l.k.dims4()?;
                        let k = Tensor::zeros((b, h, cap, d), l.k.dtype(), l.k.device())?;
                        let v = Tensor::zeros((b, h, cap, d), l.v.dtype(), l.v.device())?;
                        k.slice_set(&l.k.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                        v.slice_set(&l.v.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                        Ok::<_, candle_core::Error>(LayerKv { k, v })
                    })
                    .transpose()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len,
            reserve: cap,
        })
    }

    /// Bytes of the allocated slots.
    fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Appends `k`, `v` (`[1, h, n, d]`) for layer `li` at slot `self.len` and returns the
    /// filled views `[1, h, len + n, d]`. The first allocation takes the reserved size; growth
    /// beyond it doubles, so appends are amortised O(n).
    fn append(&mut self, li: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(2)?;
        let need = self.len + n;
        let layer = match &mut self.layers[li] {
            Some(layer) if layer.k.dim(2)? >= need => layer,
            slot => {
                let (b, h, _, d) = k.dims4()?;
                let old_cap = slot.as_ref().map_or(0, |l| l.k.dim(2).unwrap_or(0));
                // A reserved row is allocated exactly; an unreserved one grows from 16 slots.
                let floor = if self.reserve > 0 { 0 } else { 16 };
                let cap = need.max(self.reserve).max(2 * old_cap).max(floor);
                let nk = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
                let nv = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
                if let Some(old) = slot.as_ref() {
                    if self.len > 0 {
                        nk.slice_set(&old.k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                        nv.slice_set(&old.v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                    }
                }
                *slot = Some(LayerKv { k: nk, v: nv });
                slot.as_mut().expect("just set")
            }
        };
        layer.k.slice_set(&k.contiguous()?, 2, self.len)?;
        layer.v.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((layer.k.narrow(2, 0, need)?, layer.v.narrow(2, 0, need)?))
    }
}

/// KV cache of a batch of independent sequences ("ragged": each row has its own length and
/// its own storage; nothing is padded).
///
/// Rows of any lengths step together: the linear layers run over all rows at once and each row
/// attends over its own keys, so a batch costs the memory of its rows' real lengths, never
/// rows × the longest. Rows can be selected, repeated or appended between steps without copying
/// the others, which is what a batch scheduler needs.
#[derive(Debug, Clone)]
pub struct KvCache {
    rows: Vec<RowKv>,
    num_layers: usize,
}

impl KvCache {
    /// An empty cache of `rows` sequences.
    pub fn new(num_layers: usize, rows: usize) -> Self {
        Self {
            rows: (0..rows).map(|_| RowKv::new(num_layers)).collect(),
            num_layers,
        }
    }

    /// Rows in the batch.
    pub fn batch_size(&self) -> usize {
        self.rows.len()
    }

    /// Slots filled in row `b` (its next position id).
    pub fn row_len(&self, b: usize) -> usize {
        self.rows.get(b).map_or(0, |r| r.len)
    }

    /// The longest row.
    pub fn max_len(&self) -> usize {
        self.rows.iter().map(|r| r.len).max().unwrap_or(0)
    }

    /// True when no row holds a slot.
    pub fn is_empty(&self) -> bool {
        self.rows.iter().all(|r| r.len == 0)
    }

    /// Slots allocated over all rows (memory of the cache is this × the bytes per slot).
    pub fn allocated_slots(&self) -> usize {
        self.rows.iter().map(RowKv::capacity).sum()
    }

    /// Allocates `slots` slots per row at the next append of a row that has none yet, so a
    /// sequence whose final length is known (prompt + new tokens) is allocated once.
    pub fn reserve(&mut self, slots: usize) {
        for r in &mut self.rows {
            r.reserve = slots;
        }
    }

    /// Keeps rows `rows` (in that order). A row named more than once is copied (deep), so the
    /// copies diverge independently, e.g. to broadcast one prefilled conditional/unconditional
    /// pair to `n` image rows.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for &r in rows {
            if r >= self.rows.len() {
                candle_core::bail!("row {r} out of range for a batch of {}", self.rows.len());
            }
        }
        let mut old: Vec<Option<RowKv>> = std::mem::take(&mut self.rows)
            .into_iter()
            .map(Some)
            .collect();
        let mut out = Vec::with_capacity(rows.len());
        for (i, &r) in rows.iter().enumerate() {
            let again = rows[i + 1..].contains(&r);
            let row = if again {
                old[r]
                    .as_ref()
                    .expect("present until its last use")
                    .deep_copy()?
            } else {
                old[r].take().expect("present until its last use")
            };
            out.push(row);
        }
        self.rows = out;
        Ok(())
    }

    /// A copy sharing no storage with this cache (a cached prefill handed to a request).
    pub fn deep_copy(&self) -> Result<Self> {
        Ok(Self {
            rows: self
                .rows
                .iter()
                .map(RowKv::deep_copy)
                .collect::<Result<Vec<_>>>()?,
            num_layers: self.num_layers,
        })
    }

    /// A one-row cache holding row `b`'s filled slots exactly (no spare capacity), sharing no
    /// storage with this cache: what a finished sequence leaves to the prefix cache.
    pub fn row_copy(&self, b: usize) -> Result<Self> {
        let Some(row) = self.rows.get(b) else {
            candle_core::bail!("row {b} out of range for a batch of {}", self.rows.len());
        };
        Ok(Self {
            rows: vec![row.prefix(row.len, row.len)?],
            num_layers: self.num_layers,
        })
    }

    /// A one-row cache holding the first `len` slots of row `b`, in storage allocated for
    /// `reserve` slots (the new sequence's prompt and new tokens), so its appends up to that
    /// length copy nothing more.
    pub fn prefix_of(&self, b: usize, len: usize, reserve: usize) -> Result<Self> {
        let Some(row) = self.rows.get(b) else {
            candle_core::bail!("row {b} out of range for a batch of {}", self.rows.len());
        };
        Ok(Self {
            rows: vec![row.prefix(len, reserve)?],
            num_layers: self.num_layers,
        })
    }

    /// Bytes of the allocated slots of every row (keys and values, every layer).
    pub fn allocated_bytes(&self) -> usize {
        self.rows.iter().map(RowKv::bytes).sum()
    }

    /// Appends the rows of `other` after this cache's rows, so two batches decode as one.
    /// No data is copied.
    pub fn merge(&mut self, other: KvCache) -> Result<()> {
        if other.rows.is_empty() {
            return Ok(());
        }
        if self.rows.is_empty() {
            *self = other;
            return Ok(());
        }
        if self.num_layers != other.num_layers {
            candle_core::bail!(
                "merging caches of {} and {} layers",
                self.num_layers,
                other.num_layers
            );
        }
        self.rows.extend(other.rows);
        Ok(())
    }

    /// Appends row `row`'s new keys and values `[1, h, n, d]` for layer `li` and returns the
    /// row's filled views `[1, h, len + n, d]` (the row's length moves on at [`Self::advance`]).
    pub(crate) fn append(
        &mut self,
        row: usize,
        li: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.rows[row].append(li, k, v)
    }

    /// Every row's filled slots, in row order (its next position id).
    pub(crate) fn row_lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.rows.iter().map(|r| r.len)
    }

    /// Marks `n` more slots filled in every row, after every layer appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        for r in &mut self.rows {
            r.len += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Slots `[from, from + n)` of a 2-head, 3-dim layer: each value names its slot.
    fn slots(from: usize, n: usize, scale: f32) -> Tensor {
        let data: Vec<f32> = (0..2 * n * 3)
            .map(|i| {
                let (h, rest) = (i / (n * 3), i % (n * 3));
                scale * ((from + rest / 3) as f32 + 0.1 * h as f32)
            })
            .collect();
        Tensor::from_vec(data, (1, 2, n, 3), &Device::Cpu).unwrap()
    }

    fn filled(len: usize) -> KvCache {
        let mut c = KvCache::new(2, 1);
        for li in 0..2 {
            c.append(0, li, &slots(0, len, 1.0), &slots(0, len, -1.0))
                .unwrap();
        }
        c.advance(len);
        c
    }

    fn layer(c: &KvCache, li: usize) -> (Vec<f32>, Vec<f32>) {
        let r = &c.rows[0];
        let l = r.layers[li].as_ref().unwrap();
        let flat = |t: &Tensor| {
            t.narrow(2, 0, r.len)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        (flat(&l.k), flat(&l.v))
    }

    #[test]
    fn a_prefix_copies_its_slots_into_storage_of_the_reserve() {
        let src = filled(10);
        let mut p = src.prefix_of(0, 6, 20).unwrap();
        assert_eq!(p.row_len(0), 6);
        assert_eq!(p.allocated_slots(), 20);
        assert_eq!(p.allocated_bytes(), 2 * 2 * (2 * 20 * 3) * 4);
        for li in 0..2 {
            assert_eq!(layer(&p, li), layer(&filled(6), li));
        }
        // Appends go on from slot 6 and leave the source alone.
        for li in 0..2 {
            p.append(0, li, &slots(6, 2, 7.0), &slots(6, 2, 7.0))
                .unwrap();
        }
        p.advance(2);
        assert_eq!(p.allocated_slots(), 20, "no regrowth within the reserve");
        assert_eq!(layer(&src, 0), layer(&filled(10), 0));
        assert_eq!(p.row_len(0), 8);
    }

    #[test]
    fn a_row_copy_is_exact_and_independent() {
        let src = filled(5);
        let c = src.row_copy(0).unwrap();
        assert_eq!(c.allocated_slots(), 5);
        assert_eq!(layer(&c, 1), layer(&src, 1));
        assert!(src.prefix_of(0, 6, 6).is_err(), "longer than the row");
        assert!(src.row_copy(1).is_err());
        let empty = src.prefix_of(0, 0, 4).unwrap();
        assert_eq!((empty.row_len(0), empty.allocated_slots()), (0, 0));
    }
}
