//! The compute device boundary: the heavy arithmetic of calibration forwards goes through this
//! one trait, so an accelerator backend can be added without touching the pipeline. Only the CPU
//! exists today; asking for anything else fails with a clear message.

use anyhow::{bail, Result};
use ndarray::{Array2, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;

pub trait Device: Send + Sync {
    fn name(&self) -> &'static str;
    /// `a · b` for `a [m, k]` and `b [k, n]` (any strides, so `w.t()` is free).
    fn matmul(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32>;
    /// A linear layer without bias: `x · wᵀ` for activations `x [tokens, in]` and `w [out, in]`.
    fn linear(&self, x: ArrayView2<f32>, w: ArrayView2<f32>) -> Array2<f32> {
        self.matmul(x, w.t())
    }
    /// A linear layer with its optional bias `[out]`: `x · wᵀ + bias`.
    fn linear_bias(&self, x: ArrayView2<f32>, w: ArrayView2<f32>, bias: Option<ArrayView1<f32>>) -> Array2<f32> {
        let mut y = self.linear(x, w);
        if let Some(b) = bias {
            y += &b.insert_axis(Axis(0));
        }
        y
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
    /// This device with every product computed by the calling thread alone ([`Device::matmul`] as
    /// [`Device::matmul_serial`]), for callers that run independent work in parallel themselves:
    /// calibration runs its samples side by side, one per thread, where a small product split
    /// across threads spends much of its time handing work over. The results are the same. A
    /// device without that distinction returns itself.
    fn serial(&self) -> &dyn Device;
}

/// The CPU, with faer's multithreaded GEMM (measured here at about twice ndarray's own).
pub struct Cpu;

/// The CPU computing each product on the calling thread ([`Device::serial`]).
pub struct CpuSerial;

impl Device for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        faer_matmul(a, b, None, faer::Par::rayon(0))
    }

    /// The bias is the product's starting value (every row of the output), so it costs no pass
    /// of its own over the output.
    fn linear_bias(&self, x: ArrayView2<f32>, w: ArrayView2<f32>, bias: Option<ArrayView1<f32>>) -> Array2<f32> {
        faer_matmul(x, w.t(), bias, faer::Par::rayon(0))
    }

    fn add_gram_lower(&self, acc: &mut Array2<f32>, x: ArrayView2<f32>) {
        faer_gram_lower(acc, x, faer::Par::rayon(0))
    }

    fn matmul_serial(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        faer_matmul(a, b, None, faer::Par::Seq)
    }

    fn serial(&self) -> &dyn Device {
        &CpuSerial
    }
}

impl Device for CpuSerial {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn matmul(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
        faer_matmul(a, b, None, faer::Par::Seq)
    }

    fn linear_bias(&self, x: ArrayView2<f32>, w: ArrayView2<f32>, bias: Option<ArrayView1<f32>>) -> Array2<f32> {
        faer_matmul(x, w.t(), bias, faer::Par::Seq)
    }

    fn add_gram_lower(&self, acc: &mut Array2<f32>, x: ArrayView2<f32>) {
        faer_gram_lower(acc, x, faer::Par::Seq)
    }

    fn serial(&self) -> &dyn Device {
        self
    }
}

/// Adds the lower triangle of `xᵀ·x` into the row-major `acc`, on `par` threads.
fn faer_gram_lower(acc: &mut Array2<f32>, x: ArrayView2<f32>, par: faer::Par) {
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
            par,
        );
    }
    after_simd_kernels(par);
}

/// Clears the vector state faer's kernels leave ([`clear_upper_simd_state`]) on every thread
/// that may have run them: the calling thread, and with `par` every thread of the pool.
pub fn after_simd_kernels(par: faer::Par) {
    if !matches!(par, faer::Par::Seq) {
        drop(rayon::broadcast(|_| clear_upper_simd_state()));
    }
    clear_upper_simd_state();
}

/// Ends faer's AVX kernels the way compiled AVX code ends: `vzeroupper`. faer leaves the upper
/// halves of the vector registers dirty, and on these machines every legacy-SSE instruction the
/// same thread runs afterwards (the baseline x86-64 build's norms, SiLU, softmax, `expf`) then
/// pays a transition penalty: measured here 20x slower (132 against 6.7 ns per SiLU element),
/// which made the work between a sample's products cost as much as the products. Results are
/// unchanged (no value lives in the upper halves between calls).
#[inline]
fn clear_upper_simd_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above).
        unsafe { zero_upper() }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn zero_upper() {
    std::arch::x86_64::_mm256_zeroupper();
}

/// `a · b` (plus `bias` on every row) with faer, on `par` threads. The output is not zeroed
/// first: the product overwrites it, or adds to the bias rows written in parallel.
fn faer_matmul(a: ArrayView2<f32>, b: ArrayView2<f32>, bias: Option<ArrayView1<f32>>, par: faer::Par) -> Array2<f32> {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert_eq!(k, k2, "matmul: inner dimensions differ ({m}x{k} · {k2}x{n})");
    if let Some(b) = &bias {
        assert_eq!(b.len(), n, "matmul: a bias of {} for {n} outputs", b.len());
    }
    let mut c = Array2::<f32>::uninit((m, n));
    let accum = match &bias {
        Some(bias) if m > 0 && n > 0 => {
            let rows = c.as_slice_mut().expect("fresh array");
            let fill = |row: &mut [std::mem::MaybeUninit<f32>]| {
                row.iter_mut().zip(bias.iter()).for_each(|(r, &b)| _ = r.write(b));
            };
            if matches!(par, faer::Par::Seq) {
                rows.chunks_mut(n).for_each(fill);
            } else {
                rows.par_chunks_mut(n).with_min_len(64).for_each(fill);
            }
            faer::Accum::Add
        }
        _ => {
            if k == 0 || m == 0 || n == 0 {
                c.fill(std::mem::MaybeUninit::new(0.0));
            }
            faer::Accum::Replace
        }
    };
    if m > 0 && n > 0 && k > 0 {
        let (sa, sb) = (a.strides(), b.strides());
        // SAFETY: the views describe valid memory with these shapes and element strides for the
        // duration of the call; `c` is a fresh, uniquely borrowed row-major array, which
        // `Replace` only writes and `Add` reads after the bias rows were written.
        unsafe {
            let fa = faer::MatRef::from_raw_parts(a.as_ptr(), m, k, sa[0], sa[1]);
            let fb = faer::MatRef::from_raw_parts(b.as_ptr(), k, n, sb[0], sb[1]);
            let fc = faer::MatMut::from_raw_parts_mut(c.as_mut_ptr() as *mut f32, m, n, n as isize, 1isize);
            faer::linalg::matmul::matmul(fc, accum, fa, fb, 1.0f32, par);
        }
        after_simd_kernels(par);
    }
    // SAFETY: every element was written: by the product (`Replace`, m, n, k > 0), by the bias
    // rows, or by the zero fill of an empty product.
    unsafe { c.assume_init() }
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
    use ndarray::{array, Array1};

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
    fn linear_bias_is_the_product_plus_the_bias() {
        let x = Array2::from_shape_fn((37, 19), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.25 - 1.0);
        let w = Array2::from_shape_fn((23, 19), |(i, j)| ((i * 5 + j * 13) % 17) as f32 * 0.125 - 1.0);
        let b = Array1::from_shape_fn(23, |i| i as f32 * 0.5 - 3.0);
        // Small integers and eighths: every sum is exact, whatever the order.
        let want = x.dot(&w.t()) + &b;
        assert_eq!(Cpu.linear_bias(x.view(), w.view(), Some(b.view())), want);
        assert_eq!(Cpu.linear_bias(x.view(), w.view(), None), x.dot(&w.t()));
        // The trait's default (add after the product) agrees.
        struct Plain;
        impl Device for Plain {
            fn name(&self) -> &'static str {
                "plain"
            }
            fn matmul(&self, a: ArrayView2<f32>, b: ArrayView2<f32>) -> Array2<f32> {
                a.dot(&b)
            }
            fn serial(&self) -> &dyn Device {
                self
            }
        }
        assert_eq!(Plain.linear_bias(x.view(), w.view(), Some(b.view())), want);
        // Empty inner dimension: the bias alone; no rows: nothing.
        let e =
            Cpu.linear_bias(Array2::<f32>::zeros((3, 0)).view(), Array2::<f32>::zeros((23, 0)).view(), Some(b.view()));
        assert_eq!(e, Array2::from_shape_fn((3, 23), |(_, j)| b[j]));
        assert_eq!(Cpu.matmul(Array2::<f32>::zeros((0, 4)).view(), Array2::<f32>::zeros((4, 2)).view()).dim(), (0, 2));
        assert_eq!(
            Cpu.matmul(Array2::<f32>::zeros((2, 0)).view(), Array2::<f32>::zeros((0, 2)).view()),
            Array2::<f32>::zeros((2, 2))
        );
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

    /// Calibration runs a sample's products serially or in parallel depending on how many samples
    /// share a wave ([`Device::serial`]); a run must not depend on that, so the two give the same
    /// bits (faer splits the output among threads, never a dot product).
    #[test]
    fn serial_products_are_the_parallel_ones_bit_for_bit() {
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        // Big enough that faer splits them (and a calibration sample's size: 512 tokens).
        let (t, n, o) = (512, 384, 640);
        let x = Array2::from_shape_fn((t, n), |_| next());
        let w = Array2::from_shape_fn((o, n), |_| next());
        let b = Array1::from_shape_fn(o, |_| next());
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let (y, p, g) = pool.install(|| {
            let mut g = Array2::<f32>::zeros((n, n));
            Cpu.add_gram_lower(&mut g, x.view());
            (Cpu.linear_bias(x.view(), w.view(), Some(b.view())), Cpu.matmul(x.view(), w.t()), g)
        });
        let serial = Cpu.serial();
        assert_eq!(serial.linear_bias(x.view(), w.view(), Some(b.view())), y);
        assert_eq!(serial.matmul(x.view(), w.t()), p);
        assert_eq!(Cpu.matmul_serial(x.view(), w.t()), p);
        let mut gs = Array2::<f32>::zeros((n, n));
        serial.add_gram_lower(&mut gs, x.view());
        for i in 0..n {
            for j in 0..=i {
                assert_eq!(gs[(i, j)].to_bits(), g[(i, j)].to_bits(), "({i}, {j})");
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
