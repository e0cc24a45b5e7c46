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
