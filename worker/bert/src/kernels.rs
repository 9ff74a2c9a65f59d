//! Element-wise kernels of the encoder: LayerNorm, GELU and softmax over rows
//! of `f32`.
//!
//! Each is written once as plain loops that LLVM can vectorise (branch-free,
//! reductions split over [`LANES`] independent accumulators, `exp` and `erf`
//! by polynomials instead of libm calls) and compiled three times: for
//! AVX-512, for AVX2+FMA and for the baseline target. [`simd_level`] picks one
//! at run time, so one binary runs well on every x86-64 machine.

/// Independent accumulators per reduction: wide enough for one AVX-512
/// register, so float sums vectorise without reassociation.
const LANES: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Avx512,
    Avx2,
    Baseline,
}

fn simd_level() -> Level {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // Each level is taken only where the CPU has every feature its
            // code is compiled for (see `multiversion!`): an AVX-512 CPU
            // without FMA or AVX2 would otherwise run instructions it lacks.
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Defines `pub fn $name($args)` that runs `$body` compiled for the best
/// instruction set the CPU has.
macro_rules! multiversion {
    ($(#[$meta:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body

            // Compiled for exactly the features `simd_level` checks for
            // `Level::Avx512`; keep the two lists the same.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx2,fma")]
            fn avx512($($arg: $ty),*) { generic($($arg),*) }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) { generic($($arg),*) }

            match simd_level() {
                // SAFETY: the level was detected on this CPU.
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => unsafe { avx2($($arg),*) },
                _ => generic($($arg),*),
            }
        }
    };
}

#[inline(always)]
fn sum(xs: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, x) in acc.iter_mut().zip(chunk) {
            *a += x;
        }
    }
    acc.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

#[inline(always)]
fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `e^x` to about 2 ulp for x in [-87, 88]; smaller inputs give ~0, larger
/// saturate. Cody-Waite range reduction, degree-6 polynomial.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer
    // without a libm call or SSE4.1.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from the bits: the unit in the last place of `shifted` is 1, so its
    // bits are ROUND's plus n. Integer operations only (no float-to-int
    // conversion), so the loops that call this vectorise.
    let biased = shifted
        .to_bits()
        .wrapping_sub(ROUND.to_bits())
        .wrapping_add(127);
    let scale = f32::from_bits(biased << 23);
    p * scale
}

/// erf(x) with absolute error below 1.5e-7 (Abramowitz and Stegun 7.1.26).
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let a = x.abs();
    let t = 1.0 / (1.0 + P * a);
    let poly = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5))));
    let y = 1.0 - poly * exp(-a * a);
    y.copysign(x)
}

multiversion! {
    /// Exact (erf) GELU in place, as BERT's `hidden_act = "gelu"`.
    pub fn gelu(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            let v = *x;
            *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

multiversion! {
    /// Softmax of each row of `rows` (row length `width`) in place.
    pub fn softmax_rows(rows: &mut [f32], width: usize) {
        for row in rows.chunks_exact_mut(width) {
            let m = max(row);
            for x in row.iter_mut() {
                *x = exp(*x - m);
            }
            let inv = 1.0 / sum(row);
            for x in row.iter_mut() {
                *x *= inv;
            }
        }
    }
}

multiversion! {
    /// LayerNorm of each row of `rows` in place: `(x - mean) / sqrt(var + eps)
    /// * gamma + beta`, with the two-pass variance.
    pub fn layer_norm_rows(rows: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let width = gamma.len();
        for row in rows.chunks_exact_mut(width) {
            let mean = sum(row) / width as f32;
            for x in row.iter_mut() {
                *x -= mean;
            }
            let mut squares = [0.0f32; LANES];
            let chunks = row.chunks_exact(LANES);
            let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
            for chunk in chunks {
                for (s, x) in squares.iter_mut().zip(chunk) {
                    *s += x * x;
                }
            }
            let var = (squares.iter().sum::<f32>() + tail) / width as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
                *x = *x * inv * g + b;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_over_the_range_softmax_uses() {
        let mut worst = 0.0f32;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
        // Out of range: tiny but not NaN below, finite above.
        assert!((0.0..1e-37).contains(&exp(-1000.0)));
        assert!(exp(1000.0).is_finite());
    }

    #[test]
    fn gelu_matches_erf_definition() {
        // Reference erf by its Taylor series in f64, fine for |x| <= 3.
        fn erf64(x: f64) -> f64 {
            let mut term = x;
            let mut total = x;
            for n in 1..80 {
                term *= -x * x / n as f64;
                total += term / (2 * n + 1) as f64;
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        }
        let xs: Vec<f32> = (-400..=400).map(|i| i as f32 / 100.0).collect();
        let mut ys = xs.clone();
        gelu(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            let x64 = *x as f64;
            let want = 0.5 * x64 * (1.0 + erf64(x64 / 2f64.sqrt()));
            assert!(
                (*y as f64 - want).abs() < 1e-6,
                "gelu({x}) = {y}, want {want}"
            );
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_keep_order() {
        let mut rows: Vec<f32> = (0..37 * 3).map(|i| (i % 37) as f32 * 0.3 - 5.0).collect();
        softmax_rows(&mut rows, 37);
        for row in rows.chunks(37) {
            let total: f32 = row.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "row sums to {total}");
            assert!(row.windows(2).all(|w| w[0] < w[1]));
        }
    }

    #[test]
    fn layer_norm_gives_zero_mean_unit_variance_before_affine() {
        let width = 384;
        let mut rows: Vec<f32> = (0..width * 2)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0)
            .collect();
        let gamma = vec![1.0; width];
        let beta = vec![0.0; width];
        layer_norm_rows(&mut rows, &gamma, &beta, 1e-12);
        for row in rows.chunks(width) {
            let mean: f32 = row.iter().sum::<f32>() / width as f32;
            let var: f32 = row.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / width as f32;
            assert!(
                mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
                "mean {mean} var {var}"
            );
        }
    }
}
