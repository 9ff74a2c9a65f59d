//! Matrix products on the `gemm` crate (the kernels candle itself uses, here
//! with their AVX-512 variants enabled), called on raw row-major buffers so
//! that bias and residual are accumulated in place and nothing is copied.

use gemm::Parallelism;

#[cfg(target_arch = "x86_64")]
use crate::amx;
use crate::{kernels, LoadError, Matmul, ROWS_PER_TASK};
use rayon::prelude::*;

/// A linear layer with its weight stored transposed once at load, `[in, out]`
/// row-major, so the product streams through contiguous rows.
pub(crate) struct Linear {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
    /// The weight packed for AMX tiles, when products run there.
    #[cfg(target_arch = "x86_64")]
    tiles: Option<amx::PackedWeight>,
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
            #[cfg(target_arch = "x86_64")]
            tiles: None,
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
            #[cfg(target_arch = "x86_64")]
            tiles: None,
        }
    }

    /// Prepares the products `matmul` asks for (already resolved from
    /// `Auto`): packs the weight for AMX tiles when they are asked for.
    pub(crate) fn prepare(&mut self, matmul: Matmul) -> Result<(), LoadError> {
        match matmul {
            Matmul::Auto | Matmul::F32 => Ok(()),
            #[cfg(target_arch = "x86_64")]
            Matmul::AmxBf16x3 => self.pack_for_tiles(amx::Split::Three),
            #[cfg(target_arch = "x86_64")]
            Matmul::AmxBf16 => self.pack_for_tiles(amx::Split::One),
            #[cfg(not(target_arch = "x86_64"))]
            Matmul::AmxBf16x3 | Matmul::AmxBf16 => Err(LoadError::Unsupported(format!(
                "{matmul:?} products: AMX exists on x86-64 only"
            ))),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn pack_for_tiles(&mut self, split: amx::Split) -> Result<(), LoadError> {
        if !amx::PackedWeight::fits(self.inputs, self.outputs) {
            return Err(LoadError::Unsupported(format!(
                "AMX products of [{}, {}] (both must be multiples of 32)",
                self.inputs, self.outputs
            )));
        }
        self.tiles = Some(amx::PackedWeight::new(
            &self.weight,
            self.inputs,
            self.outputs,
            split,
        ));
        // The f32 copy is no longer read.
        self.weight = Vec::new();
        Ok(())
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
    /// overwritten. On tiles GELU runs as `x` is packed, with no pass of its
    /// own.
    pub(crate) fn forward_residual_gelu(&self, x: &mut [f32], out: &mut [f32], rows: usize) {
        self.add_bias(out);
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = &self.tiles {
            tiles.accumulate(x, out, rows, Some(kernels::gelu));
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
        #[cfg(target_arch = "x86_64")]
        if let Some(tiles) = &self.tiles {
            tiles.accumulate(x, out, rows, None);
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
