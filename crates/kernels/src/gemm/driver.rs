//! The blocking loops: A packed once per call (or beforehand), C split into column stripes run
//! as parallel tasks, each packing its stripe's B one k-block at a time (or reading it
//! prepacked) and running the micro-kernel over every A panel, then the bias and activation.

use super::kernel::{as_packed_mut, Kernel};
use super::pack::{pack_a, pack_b, packed_a_len};
use super::{Act, BRef, GemmOpts, MatRef};
use crate::sync::{self, SendPtr};
use half::bf16;
use rayon::prelude::*;

/// k-block: a 12 × 512 f32 A micro-panel (24 KiB) sits in L1 beside the B vectors streaming
/// in. 512 measured 8 % (f32) and 5 % (bf16 products) faster than 256 on one Zen 4 core at the
/// prefill and vision shapes (`gemm_bench`, 3 rounds), and 768 no better.
const KC: usize = 512;
/// Largest stripe of C columns per task: its packed `KC × NC` B block (512 KiB) stays in L2.
const NC_MAX: usize = 256;
/// A panels up to which a prepacked B is walked micro-panel by micro-panel (one sequential
/// pass over the weight; see `run_packed`) rather than k-block by k-block: up to 36 rows (a
/// decode step, or 16 guided images' 32 rows). Against the k-block order on one Zen 5 pair
/// of cores (bf16 products, the Janus-Pro-1B layer shapes), 1.0–1.5× at 1–16 rows, 1.0–1.2×
/// at 24–32 with three panels rather than two.
const SMALL_PANELS: usize = 3;

/// [`sync::with_scratch`] with the buffer viewed as the packed elements of kernel `K`.
fn with_scratch<K: Kernel, R>(len: usize, f: impl FnOnce(&mut [K::P]) -> R) -> R {
    sync::with_scratch(len, |buf| f(as_packed_mut::<K>(buf)))
}

/// The whole product on kernel `K`, A packed here, B packed as it goes or beforehand.
///
/// # Safety
/// The CPU has `K`'s features; shapes as `check` accepted, m, n ≥ 1; a prepacked B was
/// packed by `pack_b::<K>` for a k × n B.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn drive<K: Kernel>(
    a: MatRef<'_, f32>,
    b: BSrc<'_, K::P>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    // A: panel q holds rows q·MR.. as [ksteps][MR] (zero rows past m, zero k past k).
    with_scratch::<K, _>(packed_a_len::<K>(m, k), |ap| {
        pack_a::<K>(a, m, k, K::round_bf16(opts.precision), ap, !opts.serial);
        run_packed::<K>(ap, b, c, ldc, m, n, k, opts)
    })
}

/// Where [`run_packed`] gets B: packed per stripe and k-block as it goes, or prepacked whole
/// by [`PackedB`](super::PackedB) (micro-panel u at u · ⌈k / KP⌉ · NR).
#[derive(Clone, Copy)]
pub(super) enum BSrc<'a, P> {
    Pack(BRef<'a>),
    Packed(&'a [P]),
}

/// Adds the biases to rows `rows` of C's columns `j0..j0 + ncs` and applies the activation.
fn finish_rows<K: Kernel>(
    c: &mut [f32],
    ldc: usize,
    rows: std::ops::Range<usize>,
    j0: usize,
    ncs: usize,
    opts: &GemmOpts<'_>,
) {
    for i in rows {
        let row = &mut c[i * ldc + j0..i * ldc + j0 + ncs];
        let bm = opts.bias_m.map_or(0.0, |v| v[i]);
        match opts.bias_n {
            Some(bn) => row
                .iter_mut()
                .zip(&bn[j0..j0 + ncs])
                .for_each(|(o, &v)| *o += v + bm),
            None if bm != 0.0 => row.iter_mut().for_each(|o| *o += bm),
            None => {}
        }
        K::act(opts.act, row);
    }
}

/// The product from A packed by [`pack_a`] (B packed per stripe and k-block as it goes).
///
/// # Safety
/// As [`drive`]; `ap` holds A packed for `K`, `m × k`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run_packed<K: Kernel>(
    ap: &[K::P],
    b: BSrc<'_, K::P>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    let round = K::round_bf16(opts.precision);
    let (mr, nr, kp) = (K::MR, K::NR, K::KP);
    // Packed k length (steps of KP values), and the k-block in packed steps.
    let ksteps = k.div_ceil(kp);
    let kcs = KC / kp;
    let panels = m.div_ceil(mr);
    // Few rows on a prepacked B: walked micro-panel by micro-panel (see below).
    let sequential = matches!(b, BSrc::Packed(_)) && panels <= SMALL_PANELS;
    // Stripes: at most NC_MAX columns, at least 2 per thread when n allows, multiples of NR.
    let threads = rayon::current_num_threads().max(1);
    let nc = n
        .div_ceil(2 * threads)
        .div_ceil(nr)
        .max(1)
        .saturating_mul(nr)
        .min(NC_MAX.div_ceil(nr) * nr);
    let stripes = n.div_ceil(nc);
    let cp = SendPtr::new(c);
    let run_stripe = |si: usize| {
        let j0 = si * nc;
        let ncs = nc.min(n - j0);
        let micro = ncs.div_ceil(nr);
        // SAFETY: this task reads and writes only columns j0..j0+ncs of rows < m of C (inside
        // `c` per `check`), which no other task touches; `c` outlives the parallel loop.
        let c = unsafe { cp.slice() };
        // C starts at zero (the first k-block's tiles are stored, not added) or keeps its
        // contents when accumulating; biases are added with the activation as each row panel
        // is finished, while it is in cache, not by a pass over cold C first (in the
        // micro-panel order, once the stripe's few rows are done). k = 0 has no k-block: C is
        // set here.
        let zero_start = !opts.accumulate && ksteps > 0;
        let finish = opts.bias_m.is_some() || opts.bias_n.is_some() || opts.act != Act::None;
        if ksteps == 0 {
            // k = 0: C is the bias (or its old value plus the bias) alone, still activated.
            if !opts.accumulate {
                for i in 0..m {
                    c[i * ldc + j0..i * ldc + j0 + ncs].fill(0.0);
                }
            }
            if finish {
                finish_rows::<K>(c, ldc, 0..m, j0, ncs, opts);
            }
        }
        let scratch_len = match b {
            BSrc::Pack(_) => micro * kcs * nr,
            BSrc::Packed(_) => 0,
        };
        with_scratch::<K, _>(scratch_len, |bp| {
            let mut tmp = vec![0f32; mr * nr];
            let nkb = ksteps.div_ceil(kcs);
            // One tile: rows of A panel q times micro-panel u over k-block kb, whose B block
            // starts at `bpan`.
            let mut tile = |c: &mut [f32], kb: usize, q: usize, u: usize, bpan: *const K::P| {
                let (s0, i0) = (kb * kcs, q * mr);
                let steps = kcs.min(ksteps - s0);
                let rows = mr.min(m - i0);
                // SAFETY: panel q's block s0.. holds steps·MR packed elements inside `ap`.
                let apan = unsafe { ap.as_ptr().add(q * ksteps * mr + s0 * mr) };
                let jc = j0 + u * nr;
                let cols = nr.min(j0 + ncs - jc);
                let add = !(zero_start && kb == 0);
                // Whole-width tiles go straight into C: the full kernel, or for the last
                // panel's rows the row-count kernel where the path has one.
                let direct = cols == nr && {
                    // SAFETY: rows i0..i0+rows < m and columns jc..jc+NR ≤ j0+ncs of C are
                    // inside `c` and owned by this task; `bpan` holds the block (callers);
                    // features per `drive`'s contract.
                    unsafe {
                        let cp = c.as_mut_ptr().add(i0 * ldc + jc);
                        if rows == mr {
                            K::kernel(steps, apan, bpan, cp, ldc, add);
                            true
                        } else {
                            K::kernel_rows(rows, steps, apan, bpan, cp, ldc, add)
                        }
                    }
                };
                if !direct {
                    // SAFETY: `tmp` holds MR rows of NR floats.
                    unsafe { K::kernel(steps, apan, bpan, tmp.as_mut_ptr(), nr, false) };
                    for r in 0..rows {
                        let dst = &mut c[(i0 + r) * ldc + jc..(i0 + r) * ldc + jc + cols];
                        let src = &tmp[r * nr..r * nr + cols];
                        if add {
                            dst.iter_mut().zip(src).for_each(|(d, &v)| *d += v);
                        } else {
                            dst.copy_from_slice(src);
                        }
                    }
                }
            };
            match b {
                // Few rows on a prepacked B (decode and batched steps): each micro-panel's
                // k-blocks are one contiguous run and the micro-panels of a stripe follow each
                // other, so walking micro-panel by micro-panel, k-block by k-block, streams
                // the weight from memory in one sequential pass; each B block serves the
                // (at most SMALL_PANELS) A panels from L1 while it is hot, and the C tiles
                // stay in L1 across the k-blocks.
                BSrc::Packed(pb) if sequential => {
                    for u in 0..micro {
                        for kb in 0..nkb {
                            // SAFETY: micro-panel j0/NR + u holds ksteps·NR elements from
                            // (j0/NR + u)·ksteps·NR, inside the prepacked slice for u < micro;
                            // its block kb starts kb·KC/KP steps in.
                            let bpan = unsafe {
                                pb.as_ptr().add((j0 / nr + u) * ksteps * nr + kb * kcs * nr)
                            };
                            for q in 0..panels {
                                tile(c, kb, q, u, bpan);
                            }
                        }
                    }
                }
                _ => {
                    for kb in 0..nkb {
                        let (s0, steps) = (kb * kcs, kcs.min(ksteps - kb * kcs));
                        // B rows s0·KP.. of columns j0..j0+ncs as micro-panels [steps][NR], u
                        // apart: packed now, or the prepacked panels' rows (j0 is a multiple
                        // of NR).
                        let (bbase, ustride): (*const K::P, usize) = match b {
                            BSrc::Pack(BRef::F32(bv)) => {
                                pack_b::<K, f32>(&bv, k, s0, steps, j0, ncs, round, bp);
                                (bp.as_ptr(), steps * nr)
                            }
                            BSrc::Pack(BRef::Bf16(bv)) => {
                                pack_b::<K, bf16>(&bv, k, s0, steps, j0, ncs, round, bp);
                                (bp.as_ptr(), steps * nr)
                            }
                            // SAFETY: panel j0/NR + u holds ksteps·NR elements from
                            // (j0/NR + u)·ksteps·NR, inside the prepacked slice for u < micro.
                            BSrc::Packed(pb) => (
                                unsafe { pb.as_ptr().add((j0 / nr) * ksteps * nr + s0 * nr) },
                                ksteps * nr,
                            ),
                        };
                        for q in 0..panels {
                            for u in 0..micro {
                                // SAFETY: micro-panel u's block spans steps·NR packed elements
                                // from `bbase + u · ustride`, inside `bp` or the prepacked B.
                                tile(c, kb, q, u, unsafe { bbase.add(u * ustride) });
                            }
                            // The panel's rows are complete: bias and activation while they
                            // are in cache.
                            if kb + 1 == nkb && finish {
                                finish_rows::<K>(c, ldc, q * mr..m.min(q * mr + mr), j0, ncs, opts);
                            }
                        }
                    }
                }
            }
        });
        if sequential && ksteps > 0 && finish {
            finish_rows::<K>(c, ldc, 0..m, j0, ncs, opts);
        }
    };
    if opts.serial || stripes == 1 || (m * n * k) < (1 << 18) {
        (0..stripes).for_each(run_stripe);
    } else {
        (0..stripes).into_par_iter().for_each(run_stripe);
    }
}
