//! Matrix products on the `gemm` crate (the kernels candle itself uses, here
//! with their AVX-512 variants enabled), called on raw row-major buffers so
//! that bias and residual are accumulated in place and nothing is copied; or,
//! where `model.matmul` asks for bf16, on a weight packed for AMX tiles
//! ([`amx`]) or for `vdpbf16ps` ([`avx512_bf16`]).

use gemm::Parallelism;

#[cfg(target_arch = "x86_64")]
use crate::{amx, avx512_bf16};
use crate::{kernels, LoadError, Matmul, ROWS_PER_TASK};
use rayon::prelude::*;

/// A linear layer with its weight stored transposed once at load, `[in, out]`
/// row-major, so the product streams through contiguous rows.
pub(crate) struct Linear {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
    /// The weight packed for the bf16 products, when they run.
    packed: Packed,
}

/// The weight in the layout of the products that read it.
enum Packed {
    /// f32 products on `gemm`: `Linear::weight` as it is.
    None,
    #[cfg(target_arch = "x86_64")]
    Tiles(amx::PackedWeight),
    #[cfg(target_arch = "x86_64")]
    Dot(avx512_bf16::PackedWeight),
}

impl Linear {
    /// From a PyTorch-layout weight `[out, in]` and its bias.
    pub(crate) fn from_torch(
        weight: &[f32],
        bias: Vec<f32>,
        outputs: usize,
        inputs: usize,
    ) -> Self {
        assert_eq!(weight.len(), outputs * inputs);
        assert_eq!(bias.len(), outputs);
        let mut transposed = vec![0.0; inputs * outputs];
        for o in 0..outputs {
            for i in 0..inputs {
                transposed[i * outputs + o] = weight[o * inputs + i];
            }
        }
        Self {
            weight: transposed,
            bias,
            inputs,
            outputs,
            packed: Packed::None,
        }
    }

    /// Concatenates layers that read the same input into one wider layer
    /// (query, key and value into one QKV projection).
    pub(crate) fn concat(parts: &[Linear]) -> Self {
        let inputs = parts[0].inputs;
        let outputs: usize = parts.iter().map(|p| p.outputs).sum();
        let mut weight = Vec::with_capacity(inputs * outputs);
        for i in 0..inputs {
            for part in parts {
                assert_eq!(part.inputs, inputs);
                weight.extend_from_slice(&part.weight[i * part.outputs..(i + 1) * part.outputs]);
            }
        }
        let bias = parts.iter().flat_map(|p| p.bias.iter().copied()).collect();
        Self {
            weight,
            bias,
            inputs,
            outputs,
            packed: Packed::None,
        }
    }

    /// Prepares the products `matmul` asks for (already resolved from
    /// `Auto`): packs the weight for them when they are bf16 ones.
    pub(crate) fn prepare(&mut self, matmul: Matmul) -> Result<(), LoadError> {
        match matmul {
            Matmul::Auto | Matmul::F32 => return Ok(()),
            #[cfg(target_arch = "x86_64")]
            Matmul::AmxBf16x3 => self.pack_for_tiles(amx::Split::Three)?,
            #[cfg(target_arch = "x86_64")]
            Matmul::AmxBf16 => self.pack_for_tiles(amx::Split::One)?,
            #[cfg(target_arch = "x86_64")]
            Matmul::Avx512Bf16 => {
                if !avx512_bf16::PackedWeight::fits(self.inputs, self.outputs) {
                    return Err(LoadError::Unsupported(format!(
                        "AVX512_BF16 products of [{}, {}] (inputs must be even, outputs a multiple of 16)",
                        self.inputs, self.outputs
                    )));
                }
                self.packed = Packed::Dot(avx512_bf16::PackedWeight::new(
                    &self.weight,
                    self.inputs,
                    self.outputs,
                ));
            }
            #[cfg(not(target_arch = "x86_64"))]
            Matmul::AmxBf16x3 | Matmul::AmxBf16 | Matmul::Avx512Bf16 => {
                return Err(LoadError::Unsupported(format!(
                    "{matmul:?} products exist on x86-64 only"
                )))
            }
        }
        // The f32 copy is no longer read.
        self.weight = Vec::new();
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    fn pack_for_tiles(&mut self, split: amx::Split) -> Result<(), LoadError> {
        if !amx::PackedWeight::fits(self.inputs, self.outputs) {
            return Err(LoadError::Unsupported(format!(
                "AMX products of [{}, {}] (both must be multiples of 32)",
                self.inputs, self.outputs
            )));
        }
        self.packed = Packed::Tiles(amx::PackedWeight::new(
            &self.weight,
            self.inputs,
            self.outputs,
            split,
        ));
        Ok(())
    }

    /// `out += activation(x) W` on the packed weight, if there is one;
    /// `false` when the f32 products must run instead.
    fn accumulate_packed(
        &self,
        x: &[f32],
        out: &mut [f32],
        rows: usize,
        activation: Option<fn(&mut [f32])>,
    ) -> bool {
        match &self.packed {
            Packed::None => {
                let _ = (x, out, rows, activation);
                false
            }
            #[cfg(target_arch = "x86_64")]
            Packed::Tiles(tiles) => {
                tiles.accumulate(x, out, rows, activation);
                true
            }
            #[cfg(target_arch = "x86_64")]
            Packed::Dot(dot) => {
                dot.accumulate(x, out, rows, activation);
                true
            }
        }
    }

    /// `out = x W + b` for `rows` rows (`out` is overwritten).
    pub(crate) fn forward(&self, x: &[f32], out: &mut [f32], rows: usize) {
        for row in out.chunks_exact_mut(self.outputs) {
            row.copy_from_slice(&self.bias);
        }
        self.accumulate(x, out, rows);
    }

    /// `out += x W + b`: the residual connection is already in `out`.
    pub(crate) fn forward_residual(&self, x: &[f32], out: &mut [f32], rows: usize) {
        self.add_bias(out);
        self.accumulate(x, out, rows);
    }

    /// `out += gelu(x) W + b`, the residual already in `out`; `x` may be
    /// overwritten. With bf16 products GELU runs as `x` is packed, with no
    /// pass of its own.
    pub(crate) fn forward_residual_gelu(&self, x: &mut [f32], out: &mut [f32], rows: usize) {
        self.add_bias(out);
        if self.accumulate_packed(x, out, rows, Some(kernels::gelu)) {
            return;
        }
        x.par_chunks_mut(self.inputs * ROWS_PER_TASK)
            .for_each(kernels::gelu);
        self.accumulate(x, out, rows);
    }

    fn add_bias(&self, out: &mut [f32]) {
        for row in out.chunks_exact_mut(self.outputs) {
            for (o, b) in row.iter_mut().zip(&self.bias) {
                *o += b;
            }
        }
    }

    fn accumulate(&self, x: &[f32], out: &mut [f32], rows: usize) {
        assert_eq!(x.len(), rows * self.inputs);
        assert_eq!(out.len(), rows * self.outputs);
        if self.accumulate_packed(x, out, rows, None) {
            return;
        }
        // SAFETY: the three buffers are row-major with the extents asserted
        // above, and `out` does not alias the inputs (distinct borrows).
        unsafe {
            gemm::gemm(
                rows,
                self.outputs,
                self.inputs,
                out.as_mut_ptr(),
                1,
                self.outputs as isize,
                true,
                x.as_ptr(),
                1,
                self.inputs as isize,
                self.weight.as_ptr(),
                1,
                self.outputs as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism(),
            );
        }
    }
}

/// All of rayon's threads for the large products: the caller is the
/// inference thread, so the pool is otherwise idle.
fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}
