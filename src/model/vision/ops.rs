//! The arithmetic every vision tower shares: norms, activations, the 2D vision rotary table, and
//! attention restricted to spans of tokens (one span per image, frame or window).
//!
//! The element-wise work runs in parallel over rows or chunks (rayon), and `exp` is a branch-free
//! f32 version so those loops vectorize; the attention runs query tiles of every span in parallel,
//! each tile's products on one thread ([`Device::matmul_serial`]).

use crate::device::Device;
use anyhow::{bail, Result};
use ndarray::{s, Array1, Array2, ArrayView2, ArrayViewMut2, Axis, Zip};
use rayon::prelude::*;

/// `widest_simd!(fn name(args) -> R = body)` defines `name`, which calls the `#[inline(always)]`
/// function `body` from a copy compiled for AVX-512 or AVX2 when the CPU has them, so that the
/// loops inlined into it vectorize over 16 or 8 lanes instead of SSE2's 4. The arithmetic is the
/// same on every path (Rust does not fuse multiplies and adds), so results do not depend on it.
macro_rules! widest_simd {
    (fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:path) => {
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis.
pub fn layer_norm(x: ArrayView2<f32>, weight: &Array1<f32>, bias: Option<&Array1<f32>>, eps: f64) -> Array2<f32> {
    map_rows(x, |row| {
        let n = row.len() as f64;
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (j, v) in row.iter_mut().enumerate() {
            let b = bias.map_or(0.0, |b| b[j]);
            *v = ((*v as f64 - mean) * inv) as f32 * weight[j] + b;
        }
    })
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last axis.
pub fn rms_norm(x: ArrayView2<f32>, weight: &Array1<f32>, eps: f64) -> Array2<f32> {
    map_rows(x, |row| {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / row.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v as f64 * inv) as f32 * weight[j];
        }
    })
}

/// A copy of `x` with `f` applied to each row in place, rows in parallel.
fn map_rows(x: ArrayView2<f32>, f: impl Fn(&mut [f32]) + Sync + Send) -> Array2<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let width = out.ncols().max(1);
    out.as_slice_mut().expect("standard layout").par_chunks_mut(width).with_min_len(16).for_each(f);
    out
}

/// An activation function by its transformers name (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x · σ(1.702 x)`.
    QuickGelu,
    /// The exact GELU, `x · Φ(x)` (`gelu`, torch's `nn.GELU()`).
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    /// `x · σ(x)` (`silu`, `swish`).
    Silu,
}

impl Activation {
    pub fn from_name(name: &str) -> Result<Activation> {
        Ok(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "silu" | "swish" => Activation::Silu,
            other => bail!("activation {other:?} is not supported (quick_gelu, gelu, gelu_pytorch_tanh, silu are)"),
        })
    }

    #[inline(always)]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::QuickGelu => x / (1.0 + exp(-1.702 * x)),
            Activation::Gelu => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            // 0.5·x·(1 + tanh(u)) = x·σ(2u), which needs one exp and no tanh.
            Activation::GeluTanh => {
                const C: f32 = 2.0 * 0.797_884_6; // 2·√(2/π)
                x / (1.0 + exp(-C * (x + 0.044715 * x * x * x)))
            }
            Activation::Silu => x / (1.0 + exp(-x)),
        }
    }

    pub fn apply_all(self, x: &mut Array2<f32>) {
        match x.as_slice_memory_order_mut() {
            Some(values) => values.par_chunks_mut(1 << 14).for_each(|c| activate(self, c)),
            None => x.mapv_inplace(|v| self.apply(v)),
        }
    }

    /// [`Activation::apply`] on every value: one loop per activation rather than a match per
    /// element, so that each vectorizes.
    #[inline(always)]
    fn apply_slice(self, values: &mut [f32]) {
        match self {
            Activation::QuickGelu => values.iter_mut().for_each(|v| *v = Activation::QuickGelu.apply(*v)),
            Activation::Gelu => values.iter_mut().for_each(|v| *v = Activation::Gelu.apply(*v)),
            Activation::GeluTanh => values.iter_mut().for_each(|v| *v = Activation::GeluTanh.apply(*v)),
            Activation::Silu => values.iter_mut().for_each(|v| *v = Activation::Silu.apply(*v)),
        }
    }
}

widest_simd!(fn activate(act: Activation, values: &mut [f32]) -> () = Activation::apply_slice);

/// The error function, by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, about an f32
/// rounding; std has no `erf`).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * exp(-z * z)).copysign(x)
}

/// `eˣ` in f32 to about one ulp (Cephes' `expf`: `x = n·ln 2 + r`, a minimax polynomial for `eʳ`
/// on |r| ≤ ln 2 / 2, then `2ⁿ` put into the exponent bits). Branch-free, so loops over slices
/// vectorize, which std's `exp` (a libm call) prevents. Below -87.3 it gives about 1e-38 instead
/// of smaller values, above 88.3 about 2e38 instead of infinity; the activations and the softmax
/// (arguments ≤ 0) do not notice.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // ln 2 in two parts, so that n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    // The integer n sits in the low bits of `shifted`; reading it there (rather than `n as i32`,
    // a saturating conversion) keeps the loop vectorized.
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(n_int.wrapping_add(127) << 23)
}

/// Per-token rotary cosines and sines, `[tokens, head_dim]`, the same for every head.
#[derive(Debug, Clone)]
pub struct Rotary {
    pub cos: Array2<f32>,
    pub sin: Array2<f32>,
}

impl Rotary {
    /// The 2D vision rotary table of the Qwen towers, tokens in merge-window order (for each
    /// frame: merged rows, merged columns, then the `merge × merge` patches inside). A quarter of
    /// `head_dim` frequencies rotate by the patch row, a quarter by its column; the halves repeat.
    pub fn vision_2d(grid_thw: &[[usize; 3]], merge: usize, head_dim: usize, theta: f64) -> Rotary {
        let quarter = head_dim / 4;
        let inv_freq: Vec<f64> =
            (0..quarter).map(|i| 1.0 / theta.powf((2 * i) as f64 / (head_dim / 2) as f64)).collect();
        let tokens: usize = grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let mut cos = Array2::<f32>::zeros((tokens, head_dim));
        let mut sin = Array2::<f32>::zeros((tokens, head_dim));
        let mut row = 0;
        for &[t, h, w] in grid_thw {
            for _ in 0..t {
                for (r, c) in merge_window_order(h, w, merge) {
                    for (half, pos) in [(0, r), (1, c)] {
                        for (i, f) in inv_freq.iter().enumerate() {
                            let angle = (pos as f64 * f) as f32;
                            for base in [0, head_dim / 2] {
                                cos[[row, base + half * quarter + i]] = angle.cos();
                                sin[[row, base + half * quarter + i]] = angle.sin();
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
        Rotary { cos, sin }
    }

    /// Reorders the tokens (`order[k]` is the old index of the new `k`-th token).
    pub fn select(&self, order: &[usize]) -> Rotary {
        Rotary { cos: self.cos.select(Axis(0), order), sin: self.sin.select(Axis(0), order) }
    }

    /// `x · cos + rotate_half(x) · sin` for every head of `x [tokens, heads·head_dim]`, as a new
    /// array; rows in parallel.
    pub fn rotate(&self, x: ArrayView2<f32>, heads: usize) -> Array2<f32> {
        let (tokens, width) = x.dim();
        let hd = width / heads;
        let half = hd / 2;
        assert_eq!((tokens, hd), self.cos.dim(), "rotary table does not fit the tokens and head_dim");
        let mut out = Array2::<f32>::zeros((tokens, width));
        let rows = out.as_slice_mut().expect("fresh array");
        rows.par_chunks_mut(width.max(1)).with_min_len(16).enumerate().for_each(|(t, o)| {
            let (x, cos, sin) = (x.row(t), self.cos.row(t), self.sin.row(t));
            for h in 0..heads {
                let b = h * hd;
                for j in 0..half {
                    let (x1, x2) = (x[b + j], x[b + j + half]);
                    o[b + j] = x1 * cos[j] + -x2 * sin[j];
                    o[b + j + half] = x2 * cos[j + half] + x1 * sin[j + half];
                }
            }
        });
        out
    }
}

/// The (row, column) of every patch of an `h × w` grid, in merge-window order.
pub fn merge_window_order(h: usize, w: usize, merge: usize) -> impl Iterator<Item = (usize, usize)> {
    let (bh, bw) = (h / merge, w / merge);
    (0..bh).flat_map(move |br| {
        (0..bw).flat_map(move |bc| {
            (0..merge).flat_map(move |ir| (0..merge).map(move |ic| (br * merge + ir, bc * merge + ic)))
        })
    })
}

/// Boundaries of the spans within which tokens attend to each other: `[0, n₁, n₁+n₂, …]`.
pub type Spans = [usize];

/// Multi-head attention without a mask inside each span. `q`, `k`, `v` are `[tokens, heads·head_dim]`;
/// `rotary` (if any) is applied to `q` and `k` per head. Returns `[tokens, heads·head_dim]`.
///
/// Each span is cut into tiles of query rows; the tiles run in parallel, each computing for every
/// head `softmax(q·kᵀ/√d)·v` over its span, so the scores held at once are a tile's rows per
/// thread rather than a whole span's square.
pub fn span_attention(
    device: &dyn Device,
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    heads: usize,
    rotary: Option<&Rotary>,
    spans: &Spans,
) -> Array2<f32> {
    let (tokens, width) = q.dim();
    let hd = width / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let rotated = rotary.map(|r| (r.rotate(q, heads), r.rotate(k, heads)));
    let (q, k) = match &rotated {
        Some((q, k)) => (q.view(), k.view()),
        None => (q, k),
    };

    // Query tiles in row order, and the output rows each one writes.
    let mut tiles = Vec::new();
    for w in spans.windows(2) {
        let (a, b) = (w[0], w[1].min(tokens));
        let rows = query_tile_rows(b.saturating_sub(a), rayon::current_num_threads());
        tiles.extend((a..b).step_by(rows.max(1)).map(|r| (a..b, r..(r + rows).min(b))));
    }
    let mut out = Array2::<f32>::zeros((tokens, width));
    let mut rest = out.view_mut();
    let mut at = 0;
    let mut targets: Vec<ArrayViewMut2<f32>> = Vec::with_capacity(tiles.len());
    for (_, rows) in &tiles {
        let (_, tail) = rest.split_at(Axis(0), rows.start - at);
        let (target, tail) = tail.split_at(Axis(0), rows.len());
        targets.push(target);
        rest = tail;
        at = rows.end;
    }

    tiles.into_par_iter().zip(targets).for_each(|((span, rows), mut target)| {
        for h in 0..heads {
            let cols = h * hd..(h + 1) * hd;
            let mut scores = device
                .matmul_serial(q.slice(s![rows.clone(), cols.clone()]), k.slice(s![span.clone(), cols.clone()]).t());
            let scores_rows = scores.as_slice_mut().expect("fresh array");
            let sums = softmax_numerators_rows(scores_rows, span.len(), scale);
            let o = device.matmul_serial(scores.view(), v.slice(s![span.clone(), cols.clone()]));
            // Dividing the `hd`-wide output rows is cheaper than the `span`-wide weights.
            Zip::from(target.slice_mut(s![.., cols]).rows_mut()).and(o.rows()).and(&sums[..]).for_each(
                |mut t, o, &sum| {
                    let inv = 1.0 / sum;
                    Zip::from(&mut t).and(&o).for_each(|t, &o| *t = o * inv);
                },
            );
        }
    });
    out
}

/// The query rows of a span's tiles: at most 256 (a tile's scores are `rows × span` floats, and
/// larger tiles repack each head's keys and values less often), in a number of tiles that keeps
/// every thread busy.
fn query_tile_rows(span: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let tiles = span.div_ceil(256).div_ceil(threads) * threads;
    span.div_ceil(tiles.max(1))
}

widest_simd!(fn softmax_numerators_rows(x: &mut [f32], width: usize, scale: f32) -> Vec<f32> = softmax_rows);

/// [`softmax_numerators`] of each row of a `[rows, width]` matrix; returns the rows' sums.
#[inline(always)]
fn softmax_rows(x: &mut [f32], width: usize, scale: f32) -> Vec<f32> {
    // A plain loop: iterator adapters are functions of their own, which would not be compiled for
    // the wider instructions.
    let mut sums = Vec::with_capacity(x.len() / width.max(1));
    for row in x.chunks_exact_mut(width) {
        sums.push(softmax_numerators(row, scale));
    }
    sums
}

/// The numerators of `softmax(x · scale)` in place, `exp((x - max) · scale)`; returns their sum
/// (the denominator).
#[inline(always)]
fn softmax_numerators(x: &mut [f32], scale: f32) -> f32 {
    // In lanes, so that both loops vectorize.
    const LANES: usize = 16;
    let mut max = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            max[i] = if c[i] > max[i] { c[i] } else { max[i] };
        }
    }
    let max = chunks.remainder().iter().chain(&max).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    let mut sum = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            c[i] = exp((c[i] - max) * scale);
            sum[i] += c[i];
        }
    }
    let mut total: f32 = sum.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp((*v - max) * scale);
        total += *v;
    }
    total
}

/// Multi-head attention of `q [queries, heads·head_dim]` over `k`, `v [keys, heads·head_dim]`
/// without a mask: `softmax(q·kᵀ/√d)·v` per head (the cross attention of a resampler's queries
/// over an image's tokens). Returns `[queries, heads·head_dim]`.
pub fn cross_attention(
    device: &dyn Device,
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    heads: usize,
) -> Array2<f32> {
    let (queries, width) = q.dim();
    let hd = width / heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = Array2::<f32>::zeros((queries, width));
    for h in 0..heads {
        let cols = h * hd..(h + 1) * hd;
        let mut scores = device.matmul(q.slice(s![.., cols.clone()]), k.slice(s![.., cols.clone()]).t());
        let keys = scores.ncols();
        let sums = softmax_numerators_rows(scores.as_slice_mut().expect("fresh array"), keys, scale);
        let o = device.matmul(scores.view(), v.slice(s![.., cols.clone()]));
        Zip::from(out.slice_mut(s![.., cols]).rows_mut()).and(o.rows()).and(&sums[..]).for_each(|mut t, o, &sum| {
            Zip::from(&mut t).and(&o).for_each(|t, &o| *t = o / sum);
        });
    }
    out
}

/// Splits a fused `[tokens, 3·dim]` qkv product into its three `[tokens, dim]` views.
pub fn split_qkv(qkv: &Array2<f32>) -> (ArrayView2<'_, f32>, ArrayView2<'_, f32>, ArrayView2<'_, f32>) {
    let d = qkv.ncols() / 3;
    (qkv.slice(s![.., 0..d]), qkv.slice(s![.., d..2 * d]), qkv.slice(s![.., 2 * d..3 * d]))
}

/// `a += b`, elementwise; rows in parallel.
pub fn add_into(a: &mut Array2<f32>, b: &Array2<f32>) {
    add_rows(a, b, |x, y, _| x + y);
}

/// `a += b · scale`, elementwise with `scale [columns]` (InternViT's layer scales); rows in parallel.
pub fn add_scaled_into(a: &mut Array2<f32>, b: &Array2<f32>, scale: &Array1<f32>) {
    assert_eq!(scale.len(), b.ncols(), "a scale of {} for {} columns", scale.len(), b.ncols());
    let scale = scale.as_slice().expect("a fresh vector");
    add_rows(a, b, |x, y, j| x + y * scale[j]);
}

/// `a[i, j] = f(a[i, j], b[i, j], j)`, rows in parallel when both are row-major.
fn add_rows(a: &mut Array2<f32>, b: &Array2<f32>, f: impl Fn(f32, f32, usize) -> f32 + Sync) {
    assert_eq!(a.dim(), b.dim(), "adding arrays of different shapes");
    let width = a.ncols().max(1);
    match (a.as_slice_mut(), b.as_slice()) {
        (Some(a), Some(b)) => a.par_chunks_mut(width).zip(b.par_chunks(width)).with_min_len(16).for_each(|(x, y)| {
            for (j, (x, &y)) in x.iter_mut().zip(y).enumerate() {
                *x = f(*x, y, j);
            }
        }),
        _ => Zip::indexed(a).and(b).for_each(|(_, j), x, &y| *x = f(*x, y, j)),
    }
}

/// Concatenates each group of `n` consecutive rows into one row: `[tokens, d] → [tokens/n, n·d]`.
pub fn group_rows(x: Array2<f32>, n: usize) -> Result<Array2<f32>> {
    let (t, d) = x.dim();
    if n == 0 || t % n != 0 {
        bail!("{t} patches cannot be merged in groups of {n}");
    }
    let x = x.as_standard_layout().into_owned();
    Ok(x.into_shape_with_order((t / n, n * d))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use ndarray::array;

    #[test]
    fn erf_matches_tabulated_values() {
        // Abramowitz & Stegun, table 7.1.
        for (x, want) in [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.4, 0.999_311_486_103_354_9),
            (2.6, 0.999_763_965_583_470_1),
            (3.0, 0.999_977_909_503_001_4),
            (5.0, 0.999_999_999_998_462_5),
        ] {
            // The approximation's 1.5e-7 plus f32 rounding.
            let (got, neg) = (erf(x as f32) as f64, erf(-x as f32) as f64);
            assert!((got - want).abs() < 2.5e-7, "erf({x}) = {got} not {want}");
            assert!((neg + want).abs() < 2.5e-7);
        }
    }

    #[test]
    fn exp_is_within_two_ulps_of_std() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp(x) as f64 - want) / want).abs());
        }
        assert!(worst < 2.0 * f32::EPSILON as f64, "relative error {worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37 && exp(1000.0).is_finite());
        // The softmax's argument is never positive: its largest weight is exactly 1.
        assert_eq!(exp((3.5f32 - 3.5) * 0.1), 1.0);
    }

    #[test]
    fn activations_match_their_textbook_formulas() {
        let tanh_gelu =
            |x: f64| 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        for i in 0..=4000 {
            let x = -20.0 + 40.0 * i as f32 / 4000.0;
            let xd = x as f64;
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 4e-7 * want.abs().max(1.0);
            assert!(close(Activation::GeluTanh.apply(x), tanh_gelu(xd)), "gelu_tanh({x})");
            assert!(close(Activation::QuickGelu.apply(x), xd * sigmoid(1.702 * xd)), "quick_gelu({x})");
            assert!(close(Activation::Silu.apply(x), xd * sigmoid(xd)), "silu({x})");
        }
        // apply_all is apply on every element, contiguous or not.
        let x = Array2::from_shape_fn((37, 53), |(i, j)| (i as f32 - 18.0) * 0.3 + j as f32 * 0.01);
        for act in [Activation::GeluTanh, Activation::Gelu, Activation::QuickGelu, Activation::Silu] {
            let mut all = x.clone();
            act.apply_all(&mut all);
            let mut strided = x.t().to_owned().reversed_axes();
            act.apply_all(&mut strided);
            assert_eq!(all, x.mapv(|v| act.apply(v)));
            assert_eq!(strided, all);
        }
    }

    #[test]
    fn activations_at_known_points() {
        // gelu(1) = Φ(1) = 0.8413447460685429; quick_gelu(1) = σ(1.702); silu(1) = σ(1).
        assert!((Activation::Gelu.apply(1.0) as f64 - 0.841_344_746_068_542_9).abs() < 1e-7);
        assert!((Activation::QuickGelu.apply(1.0) - 1.0 / (1.0 + (-1.702f32).exp())).abs() < 1e-7);
        assert!((Activation::Silu.apply(1.0) - 0.731_058_6).abs() < 1e-7);
        assert!((Activation::GeluTanh.apply(1.0) - 0.841_192).abs() < 1e-6);
        assert!(Activation::from_name("relu6").is_err());
    }

    #[test]
    fn norms_match_formulas() {
        let x = array![[1.0f32, 2.0, 3.0, 6.0]];
        let w = array![1.0f32, 2.0, 1.0, 1.0];
        // mean 3, var 3.5
        let ln = layer_norm(x.view(), &w, Some(&array![0.0, 0.0, 1.0, 0.0]), 0.0);
        let sd = 3.5f32.sqrt();
        assert!((ln[[0, 1]] - 2.0 * (-1.0 / sd)).abs() < 1e-6 && (ln[[0, 2]] - 1.0).abs() < 1e-6);
        // mean square 12.5
        let rn = rms_norm(x.view(), &w, 0.0);
        assert!((rn[[0, 3]] - 6.0 / 12.5f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn attention_stays_inside_spans() {
        // Two spans of one token each: each token only sees itself, so the output is v.
        let q = array![[1.0f32, 0.0], [0.0, 1.0]];
        let v = array![[5.0f32, 6.0], [7.0, 8.0]];
        let o = span_attention(&Cpu, q.view(), q.view(), v.view(), 1, None, &[0, 1, 2]);
        assert_eq!(o, v);
        // One span: the first token's weights are softmax(q₀·k / √2) = softmax([1/√2, 0]).
        let o = span_attention(&Cpu, q.view(), q.view(), v.view(), 1, None, &[0, 2]);
        let a = (0.5f32.sqrt()).exp();
        let p = a / (a + 1.0);
        assert!((o[[0, 0]] - (p * 5.0 + (1.0 - p) * 7.0)).abs() < 1e-5);
    }

    /// Attention by its definition, one query at a time in f64, rotary from its formula.
    fn naive_attention(
        q: &Array2<f32>,
        k: &Array2<f32>,
        v: &Array2<f32>,
        heads: usize,
        rot: Option<&Rotary>,
        spans: &[usize],
    ) -> Array2<f64> {
        let (tokens, width) = q.dim();
        let hd = width / heads;
        let rotate = |x: &Array2<f32>, t: usize, h: usize| -> Vec<f64> {
            let x: Vec<f64> = (0..hd).map(|j| x[[t, h * hd + j]] as f64).collect();
            let Some(r) = rot else { return x };
            (0..hd)
                .map(|j| {
                    let half = if j < hd / 2 { -x[j + hd / 2] } else { x[j - hd / 2] };
                    x[j] * r.cos[[t, j]] as f64 + half * r.sin[[t, j]] as f64
                })
                .collect()
        };
        let mut out = Array2::<f64>::zeros((tokens, width));
        for w in spans.windows(2) {
            for h in 0..heads {
                for i in w[0]..w[1] {
                    let qi = rotate(q, i, h);
                    let logits: Vec<f64> = (w[0]..w[1])
                        .map(|j| rotate(k, j, h).iter().zip(&qi).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt())
                        .collect();
                    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                    for (jj, l) in logits.iter().enumerate() {
                        for d in 0..hd {
                            out[[i, h * hd + d]] += (l - max).exp() / z * v[[w[0] + jj, h * hd + d]] as f64;
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn attention_matches_its_definition_over_tiles_spans_and_heads() {
        // Spans longer than a query tile, a short one, an empty one; three heads of 8 with rotary.
        let (tokens, heads, hd) = (170, 3, 8);
        let spans = [0, 130, 130, 137, 170];
        let f = |seed: usize| {
            Array2::from_shape_fn((tokens, heads * hd), |(t, c)| {
                (((t * 31 + c * 17 + seed * 7) % 23) as f32 - 11.0) / 9.0
            })
        };
        let (q, k, v) = (f(1), f(2), f(3));
        let grid = [[1, 10, 13], [1, 1, 7], [1, 3, 11]];
        let rot = Rotary::vision_2d(&grid, 1, hd, 10000.0);
        for r in [None, Some(&rot)] {
            let ours = span_attention(&Cpu, q.view(), k.view(), v.view(), heads, r, &spans);
            let want = naive_attention(&q, &k, &v, heads, r, &spans);
            let err = ours.iter().zip(want.iter()).fold(0f64, |m, (a, b)| m.max((*a as f64 - b).abs()));
            assert!(err < 1e-5, "max abs error {err:e} (rotary: {})", r.is_some());
        }
    }

    #[test]
    fn cross_attention_matches_its_definition() {
        // 5 queries over 9 keys, two heads of 4.
        let (queries, keys, heads, hd) = (5, 9, 2, 4);
        let f = |rows: usize, seed: usize| {
            Array2::from_shape_fn((rows, heads * hd), |(t, c)| (((t * 13 + c * 7 + seed * 5) % 17) as f32 - 8.0) / 5.0)
        };
        let (q, k, v) = (f(queries, 1), f(keys, 2), f(keys, 3));
        let ours = cross_attention(&Cpu, q.view(), k.view(), v.view(), heads);
        for i in 0..queries {
            for h in 0..heads {
                let logits: Vec<f64> = (0..keys)
                    .map(|j| (0..hd).map(|d| (q[[i, h * hd + d]] * k[[j, h * hd + d]]) as f64).sum::<f64>() / 2.0)
                    .collect();
                let z: f64 = logits.iter().map(|l| l.exp()).sum();
                for d in 0..hd {
                    let want: f64 = (0..keys).map(|j| logits[j].exp() / z * v[[j, h * hd + d]] as f64).sum();
                    assert!((ours[[i, h * hd + d]] as f64 - want).abs() < 1e-5, "query {i} head {h}");
                }
            }
        }
    }

    #[test]
    fn wide_simd_paths_give_the_plain_paths_bits() {
        // What this CPU dispatches to (AVX-512 here) against the same code compiled for SSE2.
        let x: Vec<f32> = (0..16 * 37 + 5).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 13.0).collect();
        let (mut wide, mut plain) = (x.clone(), x.clone());
        assert_eq!(softmax_numerators_rows(&mut wide, 37, 0.3), softmax_rows(&mut plain, 37, 0.3));
        assert_eq!(wide, plain);
        for act in [Activation::GeluTanh, Activation::Gelu, Activation::QuickGelu, Activation::Silu] {
            let (mut wide, mut plain) = (x.clone(), x.clone());
            activate(act, &mut wide);
            act.apply_slice(&mut plain);
            assert_eq!(wide, plain, "{act:?}");
        }
    }

    #[test]
    fn query_tiles_share_spans_evenly() {
        assert_eq!(query_tile_rows(784, 2), 196); // 4 tiles
        assert_eq!(query_tile_rows(1764, 2), 221); // 8 tiles
        assert_eq!(query_tile_rows(64, 2), 32);
        assert_eq!(query_tile_rows(1, 2), 1);
        assert_eq!(query_tile_rows(0, 2), 0);
        assert_eq!(query_tile_rows(600, 1), 200);
    }

    #[test]
    fn merge_window_order_walks_blocks() {
        let order: Vec<_> = merge_window_order(2, 4, 2).collect();
        assert_eq!(order, vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    }
}
