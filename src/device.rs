//! The compute device boundary: the heavy arithmetic of calibration forwards goes through this
//! one trait, so an accelerator backend can be added without touching the pipeline. Only the CPU
//! exists today; asking for anything else fails with a clear message.

use anyhow::{bail, Result};
use ndarray::{Array2, ArrayView2};

pub trait Device: Send + Sync {
    fn name(&self) -> &'static str;
    /// `a · b` for `a [m, k]` and `b [k, n]` (any strides, so `w.t()` is free).
    fn matmul(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32>;
    /// A linear layer without bias: `x · wᵀ` for activations `x [tokens, in]` and `w [out, in]`.
    fn linear(&self, x: ArrayView2<f32>, w: ArrayView2<f32>) -> Array2<f32> {
        self.matmul(x, w.t())
    }
    /// Adds `xᵀ·x` for `x [tokens, n]` into the row-major `acc [n, n]` (GPTQ's Hessian). Only the
    /// lower triangle (row ≥ column) is guaranteed: the product is symmetric, so a backend may
    /// compute half of it.
    fn add_gram_lower(&self, acc: &mut Array2<f32>, x: ArrayView2<f32>) {
        *acc += &self.matmul(x.t(), x);
    }
    /// `a · b` computed by the calling thread alone, for callers that already run many small
    /// independent products in parallel (attention heads and query tiles). A device without that
    /// distinction computes it as [`Device::matmul`].
    fn matmul_serial(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        self.matmul(a, b)
    }
}

/// The CPU, with faer's multithreaded GEMM (measured here at about twice ndarray's own).
pub struct Cpu;

impl Device for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        faer_matmul(a, b, faer::Par::rayon(0))
    }

    fn add_gram_lower(&self, acc: &mut Array2<f32>, x: ArrayView2<f32>) {
        let (t, n) = x.dim();
        assert_eq!(acc.dim(), (n, n), "add_gram_lower: accumulator is not {n}x{n}");
        assert!(acc.is_standard_layout(), "add_gram_lower: accumulator must be row-major");
        if t == 0 || n == 0 {
            return;
        }
        let sx = x.strides();
        // SAFETY: as in `matmul`; `acc` is uniquely borrowed, row-major and n × n.
        unsafe {
            let fx = faer::MatRef::from_raw_parts(x.as_ptr(), t, n, sx[0], sx[1]);
            let fc = faer::MatMut::from_raw_parts_mut(acc.as_mut_ptr(), n, n, n as isize, 1isize);
            faer::linalg::matmul::triangular::matmul(
                fc,
                faer::linalg::matmul::triangular::BlockStructure::TriangularLower,
                faer::Accum::Add,
                fx.transpose(),
                faer::linalg::matmul::triangular::BlockStructure::Rectangular,
                fx,
                faer::linalg::matmul::triangular::BlockStructure::Rectangular,
                1.0f32,
                faer::Par::rayon(0),
            );
        }
    }

    fn matmul_serial(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        faer_matmul(a, b, faer::Par::Seq)
    }
}

/// `a · b` with faer, on `par` threads.
fn faer_matmul(a: ArrayView2<f32>, b: ArrayView2<f32>, par: faer::Par) -> Array2<f32> {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert_eq!(k, k2, "matmul: inner dimensions differ ({m}x{k} · {k2}x{n})");
    let mut c = Array2::<f32>::zeros((m, n));
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    let (sa, sb) = (a.strides(), b.strides());
    // SAFETY: the views describe valid memory with these shapes and element strides for the
    // duration of the call, and `c` is a fresh, uniquely borrowed row-major array.
    unsafe {
        let fa = faer::MatRef::from_raw_parts(a.as_ptr(), m, k, sa[0], sa[1]);
        let fb = faer::MatRef::from_raw_parts(b.as_ptr(), k, n, sb[0], sb[1]);
        let fc = faer::MatMut::from_raw_parts_mut(c.as_mut_ptr(), m, n, n as isize, 1isize);
        faer::linalg::matmul::matmul(fc, faer::Accum::Replace, fa, fb, 1.0f32, par);
    }
    c
}

/// Sizes the pool of compute threads (rayon's, which faer's GEMM and every parallel loop use) to `n`,
/// or to every core when `n` is 0. Call once, before any parallel work.
pub fn set_threads(n: usize) -> Result<()> {
    let n = if n == 0 { std::thread::available_parallelism().map_or(1, |c| c.get()) } else { n };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow::anyhow!("cannot start {n} compute threads: {e}"))
}

/// Compute threads in use.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// The device named by `--device`.
pub fn open(name: &str) -> Result<Box<dyn Device>> {
    match name.to_ascii_lowercase().as_str() {
        "cpu" => Ok(Box::new(Cpu)),
        other => bail!(
            "--device {other}: lamina has no {other} backend in this build; only `cpu` is available. \
             (Accelerators plug in through the Device trait in src/device.rs.)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn matmul_matches_naive_with_transposed_views() {
        let a = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
        let w = array![[1.0f32, 0.0, -1.0], [2.0, 1.0, 0.5], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0]];
        let y = Cpu.linear(a.view(), w.view());
        let naive = a.dot(&w.t());
        assert_eq!(y, naive);
        let y2 = Cpu.matmul(a.t(), a.view());
        assert_eq!(y2, a.t().dot(&a));
        assert_eq!(Cpu.matmul_serial(a.t(), a.view()), y2);
    }

    #[test]
    fn gram_lower_triangle_accumulates() {
        let x = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
        let mut acc = Array2::<f32>::ones((3, 3));
        Cpu.add_gram_lower(&mut acc, x.view());
        let want = x.t().dot(&x) + 1.0;
        for i in 0..3 {
            for j in 0..=i {
                assert_eq!(acc[(i, j)], want[(i, j)]);
            }
        }
    }

    #[test]
    fn other_devices_fail_clearly() {
        let e = open("npu").err().unwrap().to_string();
        assert!(e.contains("npu") && e.contains("cpu"), "{e}");
        assert!(open("CPU").is_ok());
    }
}
