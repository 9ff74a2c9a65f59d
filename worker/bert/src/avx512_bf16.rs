//! Matrix products on AVX512_BF16 (`vdpbf16ps`): bf16 multiplies, f32
//! accumulation, on CPUs without AMX tiles (AMD Zen 4 and 5, Intel Cooper
//! Lake; Sapphire Rapids and later have it too).
//!
//! One `vdpbf16ps` multiplies 16 pairs of bf16 and adds each pair's sum to
//! one of 16 f32 lanes: twice the multiplies of an f32 FMA of the same
//! width. The arithmetic is that of [`Matmul::AmxBf16`](crate::Matmul):
//! both operands rounded to bf16 (nearest even), products summed in f32,
//! so it is held to the same accuracy bound.
//!
//! The weight `[k, n]` is packed once at load: for each 16-column block, for
//! each pair of inner rows `(2p, 2p + 1)`, 16 lanes each holding that
//! column's two bf16 values, the operand `vdpbf16ps` reads. Activations are
//! packed per call into blocks of [`ROWS`] rows, each row's pair `p` one
//! 32-bit word, so the kernel broadcasts it from memory. The kernel holds a
//! [`ROWS`] x 48 block of `out` in 24 registers for the whole inner
//! dimension.

use std::arch::x86_64::{
    __m512, __m512bh, _mm512_dpbf16_ps, _mm512_loadu_ps, _mm512_set1_epi32, _mm512_setzero_ps,
    _mm512_storeu_ps,
};
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

/// Rows of activations per kernel call.
const ROWS: usize = 8;
/// f32 lanes of one register: the width of one column block.
const LANES: usize = 16;
/// Column blocks per kernel call (48 columns): with [`ROWS`], 24
/// accumulators and 3 weight registers of the 32.
const BLOCKS: usize = 3;

/// Whether this CPU runs the code of this module: it is compiled for
/// `avx512f` and `avx512bf16`, so both are checked. Asked once per process.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    })
}

/// A weight matrix `[k, n]` packed as `vdpbf16ps` operands: `n / 16` column
/// blocks, each `k / 2` words of 16 lanes (pair `p` of column `c` in lane
/// `c`: row `2p` in the low half, row `2p + 1` in the high half).
pub(crate) struct PackedWeight {
    words: Vec<u32>,
    k: usize,
    n: usize,
}

impl PackedWeight {
    /// Whether a `[k, n]` product can run here: `k` even (whole pairs), `n`
    /// a multiple of 16 (whole registers).
    pub(crate) fn fits(k: usize, n: usize) -> bool {
        k.is_multiple_of(2) && n.is_multiple_of(LANES) && k > 0 && n > 0
    }

    /// Packs a row-major `[k, n]` f32 matrix.
    pub(crate) fn new(weight: &[f32], k: usize, n: usize) -> Self {
        assert!(Self::fits(k, n), "[{k}, {n}] does not fit 16-lane pairs");
        assert_eq!(weight.len(), k * n);
        let pairs = k / 2;
        let mut words = Vec::with_capacity(pairs * n);
        for block in 0..n / LANES {
            for p in 0..pairs {
                for lane in 0..LANES {
                    let col = block * LANES + lane;
                    words.push(pair(weight[2 * p * n + col], weight[(2 * p + 1) * n + col]));
                }
            }
        }
        Self { words, k, n }
    }

    /// `out += f(x) W` for `rows` rows of row-major `x` (`[rows, k]`) and
    /// `out` (`[rows, n]`), where `f` is `activation` applied to each row as
    /// it is packed (identity when `None`). Call only when [`available`].
    pub(crate) fn accumulate(
        &self,
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        activation: Option<fn(&mut [f32])>,
    ) {
        assert_eq!(x.len(), rows * self.k);
        assert_eq!(out.len(), rows * self.n);
        assert!(
            available(),
            "AVX512_BF16 products called without AVX512_BF16"
        );
        if rows == 0 {
            return;
        }
        PACKED.with_borrow_mut(|packed| {
            let a = pack_rows(x, rows, self.k, activation, packed);
            let out = Out(out.as_mut_ptr());
            let blocks = self.n / LANES;
            let threads = rayon::current_num_threads().clamp(1, blocks);
            (0..threads).into_par_iter().for_each(|t| {
                let columns = (blocks * t / threads)..(blocks * (t + 1) / threads);
                // SAFETY: AVX512_BF16 is available (asserted above); each
                // task writes only its own column blocks of `out`, which has
                // `rows x n` elements; `a` holds `rows` rounded up to ROWS
                // rows of `k / 2` words.
                unsafe { self.columns(a, rows, out, columns) }
            });
        });
    }

    /// The product for column blocks `columns` (16 wide), all rows.
    ///
    /// # Safety
    /// AVX512_BF16 must be available; `out` must point at `rows x n` f32
    /// that no other thread writes in these columns; `a` must hold `rows`
    /// rounded up to [`ROWS`] rows of `k / 2` words, packed by [`pack_rows`].
    unsafe fn columns(&self, a: &[u32], rows: usize, out: Out, columns: std::ops::Range<usize>) {
        let pairs = self.k / 2;
        let mut tail = [0f32; ROWS * BLOCKS * LANES];
        let mut block = columns.start;
        while block < columns.end {
            let width = (columns.end - block).min(BLOCKS);
            let b = self.words.as_ptr().add(block * pairs * LANES);
            for (group, a) in a.chunks_exact(ROWS * pairs).enumerate() {
                let m = group * ROWS;
                let live = (rows - m).min(ROWS);
                let first = out.0.add(m * self.n + block * LANES);
                // A whole block of rows straight in `out`; the last, partial
                // one through `tail`, so the kernel always runs ROWS rows.
                let (c, stride) = if live == ROWS {
                    (first, self.n)
                } else {
                    tail.fill(0.0);
                    for r in 0..live {
                        tail[r * BLOCKS * LANES..][..width * LANES].copy_from_slice(
                            std::slice::from_raw_parts(first.add(r * self.n), width * LANES),
                        );
                    }
                    (tail.as_mut_ptr(), BLOCKS * LANES)
                };
                match width {
                    3 => tile::<3>(a, b, pairs, c, stride),
                    2 => tile::<2>(a, b, pairs, c, stride),
                    _ => tile::<1>(a, b, pairs, c, stride),
                }
                if live < ROWS {
                    for r in 0..live {
                        std::slice::from_raw_parts_mut(first.add(r * self.n), width * LANES)
                            .copy_from_slice(&tail[r * BLOCKS * LANES..][..width * LANES]);
                    }
                }
            }
            block += width;
        }
    }
}

thread_local! {
    /// The caller's packed activations, kept between calls.
    static PACKED: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
}

/// Packs `activation(x)` (`x`: `[rows, k]` f32) as bf16 pairs in blocks of
/// [`ROWS`] rows: block `g`, pair `p`, row `r` at `(g * pairs + p) * ROWS +
/// r`, so the kernel reads one block's words in order. Rows past `rows`
/// are zero.
fn pack_rows<'a>(
    x: &[f32],
    rows: usize,
    k: usize,
    activation: Option<fn(&mut [f32])>,
    packed: &'a mut Vec<u32>,
) -> &'a [u32] {
    let pairs = k / 2;
    let padded = rows.div_ceil(ROWS) * ROWS;
    packed.resize(padded * pairs, 0);
    let packed = &mut packed[..padded * pairs];
    packed
        .par_chunks_mut(ROWS * pairs)
        .enumerate()
        .for_each_init(Vec::new, |activated: &mut Vec<f32>, (group, words)| {
            for r in 0..ROWS {
                let row = group * ROWS + r;
                if row >= rows {
                    for p in 0..pairs {
                        words[p * ROWS + r] = 0;
                    }
                    continue;
                }
                let mut values = &x[row * k..][..k];
                if let Some(activation) = activation {
                    activated.clear();
                    activated.extend_from_slice(values);
                    activation(activated);
                    values = activated;
                }
                for (p, two) in values.chunks_exact(2).enumerate() {
                    words[p * ROWS + r] = pair(two[0], two[1]);
                }
            }
        });
    packed
}

/// Two f32 as one word of bf16 (nearest even; inputs are finite): `lo` in
/// the low half, the order `vdpbf16ps` pairs them in.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16(lo) as u32 | (bf16(hi) as u32) << 16
}

#[inline(always)]
fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// The output pointer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: tasks write disjoint column blocks, see `PackedWeight::accumulate`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// `C += A B` for one block of [`ROWS`] rows and `W` column blocks: `a` the
/// block's packed words (`pairs x ROWS`), `b` the first column block's
/// `pairs` words of 16 lanes, the next ones `pairs x 16` words apart; `c`
/// the block's first element, row stride `stride` f32.
///
/// # Safety
/// AVX512_BF16 must be available; `b` must cover `W` column blocks; `c` must
/// cover [`ROWS`] rows of `W x 16` f32 at stride `stride`.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const W: usize>(a: &[u32], b: *const u32, pairs: usize, c: *mut f32, stride: usize) {
    debug_assert_eq!(a.len(), pairs * ROWS);
    let mut acc: [[__m512; W]; ROWS] = [[_mm512_setzero_ps(); W]; ROWS];
    for (r, row) in acc.iter_mut().enumerate() {
        for (j, lane) in row.iter_mut().enumerate() {
            // SAFETY: row `r < ROWS` of `c` covers `W x 16` f32.
            *lane = unsafe { _mm512_loadu_ps(c.add(r * stride + j * LANES)) };
        }
    }
    let block_stride = pairs * LANES;
    for (p, words) in a.chunks_exact(ROWS).enumerate() {
        let mut w: [__m512bh; W] = [unsafe { std::mem::zeroed() }; W];
        for (j, w) in w.iter_mut().enumerate() {
            // SAFETY: column block `j < W`, pair `p < pairs`: 16 words
            // within `b`'s extent. Unaligned reads of plain integers.
            *w = unsafe {
                std::ptr::read_unaligned(b.add(j * block_stride + p * LANES).cast::<__m512bh>())
            };
        }
        for (row, &word) in acc.iter_mut().zip(words) {
            // SAFETY: any bit pattern is a valid `__m512bh`.
            let x: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(word as i32)) };
            for (lane, w) in row.iter_mut().zip(&w) {
                *lane = _mm512_dpbf16_ps(*lane, x, *w);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (j, lane) in row.iter().enumerate() {
            // SAFETY: as the loads above.
            unsafe { _mm512_storeu_ps(c.add(r * stride + j * LANES), *lane) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &[f32], w: &[f32], rows: usize, k: usize, n: usize) -> Vec<f64> {
        let mut out = vec![0f64; rows * n];
        for r in 0..rows {
            for i in 0..k {
                for c in 0..n {
                    out[r * n + c] += x[r * k + i] as f64 * w[i * n + c] as f64;
                }
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// Skips (saying so) where the CPU lacks the feature, unless
    /// `JETINFER_REQUIRE_AVX512_BF16=1` says this machine must have it.
    fn runs_here() -> bool {
        if available() {
            return true;
        }
        assert!(
            std::env::var("JETINFER_REQUIRE_AVX512_BF16").as_deref() != Ok("1"),
            "JETINFER_REQUIRE_AVX512_BF16=1 but this CPU offers no AVX512_BF16"
        );
        eprintln!("skipped: this CPU offers no AVX512_BF16");
        false
    }

    #[test]
    fn dot_products_match_f64_products_at_every_row_and_column_remainder() {
        if !runs_here() {
            return;
        }
        // 16 x 7 columns: blocks of three, then a remainder of one (and of
        // two for a thread's share when split).
        let (k, n) = (96, 112);
        for rows in [1, 7, 8, 9, 17, 45] {
            let x = pseudo_random(rows * k, 1 + rows as u32);
            let w = pseudo_random(k * n, 99);
            let bias = pseudo_random(rows * n, 7);
            let expected: Vec<f64> = reference(&x, &w, rows, k, n)
                .iter()
                .zip(&bias)
                .map(|(p, b)| p + *b as f64)
                .collect();
            let packed = PackedWeight::new(&w, k, n);
            let mut out = bias.clone();
            packed.accumulate(&x, &mut out, rows, None);
            let worst = out
                .iter()
                .zip(&expected)
                .map(|(o, e)| (*o as f64 - e).abs())
                .fold(0.0, f64::max);
            // The tolerance of the AMX bf16 tiles' test, same shapes' scale.
            assert!(worst < 5e-2, "{rows} rows: worst error {worst}");
        }
    }

    #[test]
    fn activation_is_applied_to_the_input_as_it_is_packed() {
        if !runs_here() {
            return;
        }
        let (rows, k, n) = (5, 32, 16);
        let x = pseudo_random(rows * k, 3);
        let w = pseudo_random(k * n, 4);
        let relu: fn(&mut [f32]) = |xs| xs.iter_mut().for_each(|v| *v = v.max(0.0));
        let packed = PackedWeight::new(&w, k, n);
        let mut with = vec![0.0; rows * n];
        packed.accumulate(&x, &mut with, rows, Some(relu));
        let mut activated = x.clone();
        relu(&mut activated);
        let mut after = vec![0.0; rows * n];
        packed.accumulate(&activated, &mut after, rows, None);
        assert_eq!(with, after);
        assert_ne!(with, {
            let mut plain = vec![0.0; rows * n];
            packed.accumulate(&x, &mut plain, rows, None);
            plain
        });
    }

    #[test]
    fn widths_must_be_whole_pairs_and_whole_registers() {
        assert!(PackedWeight::fits(384, 1152));
        assert!(PackedWeight::fits(48, 96));
        assert!(!PackedWeight::fits(47, 96));
        assert!(!PackedWeight::fits(48, 40));
        assert!(!PackedWeight::fits(0, 16));
    }
}
