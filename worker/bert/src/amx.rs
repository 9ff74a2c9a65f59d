//! Matrix products on Intel AMX tiles (Sapphire Rapids and later): bf16
//! multiplies, f32 accumulation, about eight times the multiply rate of the
//! AVX-512 f32 units on the same core.
//!
//! bf16 keeps 8 bits of mantissa, too few on its own for embeddings that
//! must match the f32 model (cosine >= 0.9999). [`Split::Three`] keeps f32
//! accuracy with the classic split: each f32 value `x` is `hi + lo`, both
//! bf16, and `x w ~ hi_x hi_w + lo_x hi_w + hi_x lo_w` (the dropped
//! `lo_x lo_w` is about 2^-18 of the product). Both operands are packed as
//! `hi` tiles then `lo` tiles, and the kernel runs the three products of a
//! step on tiles it already holds where it can (9 tile loads for 12 tile
//! products). [`Split::One`] is plain bf16, the reduced-precision option.
//!
//! Tile loads, not multiplies, bound these kernels, so each step holds a 2 x 2 block of output tiles and orders loads to overlap
//! the products that do not need them.
//!
//! Linux hands out AMX state only to processes that ask for it
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); [`available`] asks once.

use std::arch::asm;
use std::cell::RefCell;
use std::sync::OnceLock;

use rayon::prelude::*;

/// How many bf16 parts each f32 operand is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Split {
    /// `hi` only: plain bf16 products.
    One,
    /// `hi + lo`, three products: f32 accuracy.
    Three,
}

impl Split {
    /// bf16 parts stored per f32 value.
    fn parts(self) -> usize {
        match self {
            Split::One => 1,
            Split::Three => 2,
        }
    }
}

/// Rows and columns of one tile product step, and of one output block
/// (2 x 2 tiles of 16 x 16 f32).
const TILE_ROWS: usize = 16;
const TILE_K: usize = 32;
const BLOCK: usize = 32;

/// Whether this CPU has AMX with bf16 and the kernel lets this process use
/// it. Asked once per process.
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        let has_amx = leaf.edx & (1 << 22) != 0 && leaf.edx & (1 << 24) != 0;
        has_amx && request_permission()
    })
}

/// Asks Linux for the AMX tile data state for this process.
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes this process's
    // permitted extended-state set; it reads and writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// A weight matrix `[k, n]` packed for the tile unit: for each 16-column
/// block, for each 32-row step of the (split) inner dimension, one 16 x 64
/// byte tile in the pair-interleaved layout `tdpbf16ps` reads.
pub(crate) struct PackedWeight {
    tiles: Vec<u16>,
    split: Split,
    /// Inner dimension after the split (`parts x k`): `hi` steps then `lo`.
    k: usize,
    n: usize,
}

impl PackedWeight {
    /// Whether a `[k, n]` product can run on tiles: both multiples of 32.
    pub(crate) fn fits(k: usize, n: usize) -> bool {
        k.is_multiple_of(TILE_K) && n.is_multiple_of(BLOCK)
    }

    /// Packs a row-major `[k, n]` f32 matrix.
    pub(crate) fn new(weight: &[f32], k: usize, n: usize, split: Split) -> Self {
        assert!(Self::fits(k, n), "[{k}, {n}] does not fit the tiles");
        assert_eq!(weight.len(), k * n);
        // The split inner dimension: the rows of `hi`, then those of `lo`.
        let part = |row: usize, col: usize| -> u16 {
            let w = weight[(row % k) * n + col];
            let hi = bf16(w);
            if row < k {
                hi
            } else {
                bf16(w - f32_of(hi))
            }
        };
        let kk = split.parts() * k;
        let mut tiles = vec![0u16; kk * n];
        let mut i = 0;
        for nb in 0..n / TILE_ROWS {
            for kb in 0..kk / TILE_K {
                for pair in 0..TILE_K / 2 {
                    for col in 0..TILE_ROWS {
                        for j in 0..2 {
                            tiles[i] = part(kb * TILE_K + 2 * pair + j, nb * TILE_ROWS + col);
                            i += 1;
                        }
                    }
                }
            }
        }
        Self {
            tiles,
            split,
            k: kk,
            n,
        }
    }

    /// `out += f(x) W` for `rows` rows of row-major `x` (`[rows, k]`) and
    /// `out` (`[rows, n]`), where `f` is `activation` applied to each row as
    /// it is packed (identity when `None`): an element-wise activation costs
    /// no pass of its own. Call only when [`available`].
    pub(crate) fn accumulate(
        &self,
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        activation: Option<fn(&mut [f32])>,
    ) {
        let k = self.k / self.split.parts();
        assert_eq!(x.len(), rows * k);
        assert_eq!(out.len(), rows * self.n);
        assert!(available(), "AMX products called without AMX");
        PACKED.with_borrow_mut(|packed| {
            let a = pack_rows(x, rows, k, self.split, activation, packed);
            let out = Out(out.as_mut_ptr());
            let blocks = self.n / BLOCK;
            let threads = rayon::current_num_threads().clamp(1, blocks);
            (0..threads).into_par_iter().for_each(|t| {
                let columns = (blocks * t / threads)..(blocks * (t + 1) / threads);
                // SAFETY: AMX is available (asserted above); each task writes
                // only its own column blocks of `out`, which has `rows x n`
                // elements; `a` has `rows` rounded up to 32 rows of `self.k`.
                unsafe { self.columns(a, rows, out, columns) }
            });
        });
    }

    /// The product for output column blocks `columns` (32 wide), all rows.
    ///
    /// # Safety
    /// AMX must be available; `out` must point at `rows x n` f32 that no other
    /// thread writes in these columns; `a` must hold `rows` rounded up to 32
    /// rows of `k` bf16.
    unsafe fn columns(&self, a: &[u16], rows: usize, out: Out, columns: std::ops::Range<usize>) {
        let k_steps = self.k / TILE_K;
        let out_stride = self.n * 4;
        let mut tail = [0f32; BLOCK * BLOCK];
        load_config();
        for m in (0..rows).step_by(BLOCK) {
            let full = rows - m >= BLOCK;
            for nb in columns.clone() {
                let col = nb * BLOCK;
                // The output block: straight from `out`, or through `tail`
                // for the last, partial block of rows.
                let (c, c_stride) = if full {
                    (out.0.add(m * self.n + col), out_stride)
                } else {
                    tail.fill(0.0);
                    for r in 0..rows - m {
                        let src = out.0.add((m + r) * self.n + col);
                        tail[r * BLOCK..][..BLOCK]
                            .copy_from_slice(std::slice::from_raw_parts(src, BLOCK));
                    }
                    (tail.as_mut_ptr(), BLOCK * 4)
                };
                let a0 = a.as_ptr().add(m * self.k);
                let a1 = a0.add(TILE_ROWS * self.k);
                let b0 = self.tiles.as_ptr().add(2 * nb * self.k * TILE_ROWS);
                let b1 = b0.add(self.k * TILE_ROWS);
                let a = [a0, a1];
                let b = [b0, b1];
                match self.split {
                    Split::One => block(a, b, k_steps, c, c_stride),
                    Split::Three => split_block(a, b, k_steps / 2, c, c_stride),
                }
                if !full {
                    for r in 0..rows - m {
                        let dst = out.0.add((m + r) * self.n + col);
                        std::slice::from_raw_parts_mut(dst, BLOCK)
                            .copy_from_slice(&tail[r * BLOCK..][..BLOCK]);
                    }
                }
            }
        }
        // SAFETY: releases this thread's tile state (cheaper context switches).
        asm!("tilerelease", options(nostack, nomem));
    }
}

thread_local! {
    /// The caller's packed activations, kept between calls.
    static PACKED: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Packs `activation(x)` (`x`: `[rows, k]` f32) as bf16 tiles of the split
/// inner dimension: for each 16 rows, for each 32-column step, one
/// contiguous 16 x 32 tile, so every tile load reads 1 KiB in a row. Rows
/// are rounded up to a whole block with zeros.
fn pack_rows<'a>(
    x: &[f32],
    rows: usize,
    k: usize,
    split: Split,
    activation: Option<fn(&mut [f32])>,
    packed: &'a mut Vec<u16>,
) -> &'a [u16] {
    let kk = split.parts() * k;
    let steps = kk / TILE_K;
    let steps_per_part = k / TILE_K;
    let padded = rows.div_ceil(BLOCK) * BLOCK;
    packed.resize(padded * kk, 0);
    let packed = &mut packed[..padded * kk];
    packed
        .par_chunks_mut(TILE_ROWS * kk)
        .enumerate()
        .for_each_init(Vec::new, |activated: &mut Vec<f32>, (group, tiles)| {
            for r in 0..TILE_ROWS {
                let row = group * TILE_ROWS + r;
                let mut values: &[f32] = &[];
                if row < rows {
                    values = &x[row * k..][..k];
                    if let Some(activation) = activation {
                        activated.clear();
                        activated.extend_from_slice(values);
                        activation(activated);
                        values = activated;
                    }
                }
                for step in 0..steps {
                    let dst = &mut tiles[step * TILE_ROWS * TILE_K + r * TILE_K..][..TILE_K];
                    if row >= rows {
                        dst.fill(0);
                        continue;
                    }
                    let src = &values[(step % steps_per_part) * TILE_K..][..TILE_K];
                    match (split, step / steps_per_part) {
                        (Split::Three, 1) => {
                            for (d, &v) in dst.iter_mut().zip(src) {
                                *d = bf16(v - f32_of(bf16(v)));
                            }
                        }
                        _ => {
                            for (d, &v) in dst.iter_mut().zip(src) {
                                *d = bf16(v);
                            }
                        }
                    }
                }
            }
        });
    packed
}

/// f32 to bf16, rounded to nearest even (inputs are finite).
#[inline(always)]
fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

#[inline(always)]
fn f32_of(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// The output pointer, shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);

// SAFETY: tasks write disjoint column blocks, see `PackedWeight::accumulate`.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Palette 1, every tile 16 rows of 64 bytes: tmm0-3 the 2 x 2 output tiles
/// (f32), tmm4-5 two row tiles of activations, tmm6-7 two column tiles of
/// weights (bf16).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

static CONFIG: TileConfig = {
    let mut bytes_per_row = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        bytes_per_row[t] = 64;
        rows[t] = TILE_ROWS as u8;
        t += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        bytes_per_row,
        rows,
    }
};

/// # Safety
/// AMX must be available.
unsafe fn load_config() {
    asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly));
}

/// One step's tile: 16 x 32 bf16, 1 KiB, contiguous.
const TILE: usize = TILE_ROWS * TILE_K;

/// Loads the 2 x 2 output tiles of the 32 x 32 block at `c` (row stride
/// `c_stride` bytes) into tmm0-3.
///
/// # Safety
/// The tile configuration must be loaded; `c` must cover the block.
#[inline(always)]
unsafe fn load_output(c: *mut f32, c_stride: usize) {
    asm!(
        "tileloadd tmm0, [{c0} + {cs}]",
        "tileloadd tmm1, [{c1} + {cs}]",
        "tileloadd tmm2, [{c2} + {cs}]",
        "tileloadd tmm3, [{c3} + {cs}]",
        c0 = in(reg) c,
        c1 = in(reg) c.add(TILE_ROWS),
        c2 = in(reg) c.byte_add(TILE_ROWS * c_stride),
        c3 = in(reg) c.byte_add(TILE_ROWS * c_stride).add(TILE_ROWS),
        cs = in(reg) c_stride,
        options(nostack, readonly),
    );
}

/// Stores tmm0-3 back to the block [`load_output`] read.
///
/// # Safety
/// As [`load_output`].
#[inline(always)]
unsafe fn store_output(c: *mut f32, c_stride: usize) {
    asm!(
        "tilestored [{c0} + {cs}], tmm0",
        "tilestored [{c1} + {cs}], tmm1",
        "tilestored [{c2} + {cs}], tmm2",
        "tilestored [{c3} + {cs}], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(TILE_ROWS),
        c2 = in(reg) c.byte_add(TILE_ROWS * c_stride),
        c3 = in(reg) c.byte_add(TILE_ROWS * c_stride).add(TILE_ROWS),
        cs = in(reg) c_stride,
        options(nostack),
    );
}

/// `C += A B` for one 32 x 32 output block, plain bf16: `a` the two 16-row
/// halves of A and `b` the two 16-column halves of B, each a run of `steps`
/// packed tiles; C f32 with row stride `c_stride` bytes.
///
/// # Safety
/// The tile configuration must be loaded on this thread; every pointer must
/// cover `steps` tiles.
#[inline(always)]
unsafe fn block(
    a: [*const u16; 2],
    b: [*const u16; 2],
    steps: usize,
    c: *mut f32,
    c_stride: usize,
) {
    load_output(c, c_stride);
    for step in 0..steps {
        // Each load comes just before the first product that needs it, so
        // it overlaps the products before.
        asm!(
            "tileloadd tmm4, [{a0} + {s}]",
            "tileloadd tmm6, [{b0} + {s}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s}]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a[0].add(step * TILE),
            a1 = in(reg) a[1].add(step * TILE),
            b0 = in(reg) b[0].add(step * TILE),
            b1 = in(reg) b[1].add(step * TILE),
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    store_output(c, c_stride);
}

/// [`block`] for split operands: `steps` steps of `hi` tiles, each followed
/// `steps` tiles later by its `lo` tiles, in both A and B. Per step,
/// `hi hi + hi lo + lo hi` in 12 tile products and 9 tile loads.
///
/// # Safety
/// As [`block`], with every pointer covering `2 x steps` tiles.
#[inline(always)]
unsafe fn split_block(
    a: [*const u16; 2],
    b: [*const u16; 2],
    steps: usize,
    c: *mut f32,
    c_stride: usize,
) {
    let lo = steps * TILE;
    load_output(c, c_stride);
    for step in 0..steps {
        let (a0, a1) = (a[0].add(step * TILE), a[1].add(step * TILE));
        let (b0, b1) = (b[0].add(step * TILE), b[1].add(step * TILE));
        asm!(
            // hi x hi
            "tileloadd tmm4, [{a0} + {s}]",
            "tileloadd tmm6, [{b0} + {s}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s}]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // hi x lo: the A tiles stay, B's lo tiles take tmm7 in turn
            "tileloadd tmm7, [{b0l} + {s}]",
            "tdpbf16ps tmm0, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm7",
            "tileloadd tmm7, [{b1l} + {s}]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            // lo x hi: B's first hi tile is still in tmm6
            "tileloadd tmm4, [{a0l} + {s}]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm5, [{a1l} + {s}]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm7, [{b1} + {s}]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            a0l = in(reg) a0.add(lo),
            a1l = in(reg) a1.add(lo),
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            b0l = in(reg) b0.add(lo),
            b1l = in(reg) b1.add(lo),
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }
    store_output(c, c_stride);
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

    #[test]
    fn tile_products_match_f64_products() {
        if !available() {
            eprintln!("skipped: this CPU or kernel offers no AMX");
            return;
        }
        let (k, n) = (96, 64);
        for rows in [1, 17, 32, 45, 70] {
            let x = pseudo_random(rows * k, 1 + rows as u32);
            let w = pseudo_random(k * n, 99);
            let bias = pseudo_random(rows * n, 7);
            let expected: Vec<f64> = reference(&x, &w, rows, k, n)
                .iter()
                .zip(&bias)
                .map(|(p, b)| p + *b as f64)
                .collect();
            for (split, tolerance) in [(Split::Three, 1e-4), (Split::One, 5e-2)] {
                let packed = PackedWeight::new(&w, k, n, split);
                let mut out = bias.clone();
                packed.accumulate(&x, &mut out, rows, None);
                let worst = out
                    .iter()
                    .zip(&expected)
                    .map(|(o, e)| (*o as f64 - e).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst < tolerance,
                    "{split:?}, {rows} rows: worst error {worst}"
                );
            }
        }
    }
}
