//! Matrix products on the `gemm` crate (the kernels candle itself uses, here
//! with their AVX-512 variants enabled), called on raw row-major buffers so
//! that bias and residual are accumulated in place and nothing is copied.

use gemm::Parallelism;

/// A linear layer with its weight stored transposed once at load, `[in, out]`
/// row-major, so the product streams through contiguous rows.
pub(crate) struct Linear {
    pub(crate) weight: Vec<f32>,
    pub(crate) bias: Vec<f32>,
    pub(crate) inputs: usize,
    pub(crate) outputs: usize,
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
        for row in out.chunks_exact_mut(self.outputs) {
            for (o, b) in row.iter_mut().zip(&self.bias) {
                *o += b;
            }
        }
        self.accumulate(x, out, rows);
    }

    fn accumulate(&self, x: &[f32], out: &mut [f32], rows: usize) {
        assert_eq!(x.len(), rows * self.inputs);
        assert_eq!(out.len(), rows * self.outputs);
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
