//! The arithmetic every vision tower shares: norms, activations, the 2D vision rotary table, and
//! attention restricted to spans of tokens (one span per image, frame or window).

use crate::device::Device;
use anyhow::{bail, Result};
use ndarray::{s, Array1, Array2, ArrayView2, Axis, Zip};
use rayon::prelude::*;

/// `(x - mean) / sqrt(var + eps) * weight + bias` over the last axis.
pub fn layer_norm(x: ArrayView2<f32>, weight: &Array1<f32>, bias: Option<&Array1<f32>>, eps: f64) -> Array2<f32> {
    let mut out = x.to_owned();
    let n = x.ncols() as f64;
    for mut row in out.rows_mut() {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps).sqrt();
        for (j, v) in row.iter_mut().enumerate() {
            let b = bias.map_or(0.0, |b| b[j]);
            *v = ((*v as f64 - mean) * inv) as f32 * weight[j] + b;
        }
    }
    out
}

/// `x / sqrt(mean(x²) + eps) * weight` over the last axis.
pub fn rms_norm(x: ArrayView2<f32>, weight: &Array1<f32>, eps: f64) -> Array2<f32> {
    let mut out = x.to_owned();
    let n = x.ncols() as f64;
    for mut row in out.rows_mut() {
        let ms = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (ms + eps).sqrt();
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v as f64 * inv) as f32 * weight[j];
        }
    }
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

    pub fn apply(self, x: f32) -> f32 {
        match self {
            Activation::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Activation::Gelu => (0.5 * x as f64 * (1.0 + erf(x as f64 / std::f64::consts::SQRT_2))) as f32,
            Activation::GeluTanh => {
                const C: f32 = 0.797_884_6; // √(2/π)
                0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
            }
            Activation::Silu => x / (1.0 + (-x).exp()),
        }
    }

    pub fn apply_all(self, x: &mut Array2<f32>) {
        match x.as_slice_memory_order_mut() {
            Some(values) => values.par_chunks_mut(1 << 14).for_each(|c| c.iter_mut().for_each(|v| *v = self.apply(*v))),
            None => x.mapv_inplace(|v| self.apply(v)),
        }
    }
}

/// The error function, by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, about an f32
/// rounding; std has no `erf`).
pub fn erf(x: f64) -> f64 {
    const P: f64 = 0.327_591_1;
    const A: [f64; 5] = [0.254_829_592, -0.284_496_736, 1.421_413_741, -1.453_152_027, 1.061_405_429];
    let z = x.abs();
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - poly * (-z * z).exp()).copysign(x)
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

    /// `x · cos + rotate_half(x) · sin` on one head's slice `[tokens, head_dim]`.
    fn apply(&self, x: &mut Array2<f32>) {
        let half = x.ncols() / 2;
        for (t, mut row) in x.rows_mut().into_iter().enumerate() {
            let orig = row.to_owned();
            for j in 0..row.len() {
                let rotated = if j < half { -orig[j + half] } else { orig[j - half] };
                row[j] = orig[j] * self.cos[[t, j]] + rotated * self.sin[[t, j]];
            }
        }
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
    let mut out = Array2::<f32>::zeros((tokens, width));
    for h in 0..heads {
        let cols = s![.., h * hd..(h + 1) * hd];
        let (mut qh, mut kh) = (q.slice(cols).to_owned(), k.slice(cols).to_owned());
        if let Some(r) = rotary {
            r.apply(&mut qh);
            r.apply(&mut kh);
        }
        for w in spans.windows(2) {
            let (a, b) = (w[0], w[1]);
            if a == b {
                continue;
            }
            let rows = s![a..b, ..];
            let mut scores = device.matmul(qh.slice(rows), kh.slice(rows).t());
            for mut row in scores.rows_mut() {
                let max = row.fold(f32::NEG_INFINITY, |m, &x| m.max(x * scale));
                let mut sum = 0.0f64;
                row.mapv_inplace(|x| {
                    let e = (x * scale - max).exp();
                    sum += e as f64;
                    e
                });
                let inv = (1.0 / sum) as f32;
                row.mapv_inplace(|x| x * inv);
            }
            let o = device.matmul(scores.view(), v.slice(s![a..b, h * hd..(h + 1) * hd]));
            out.slice_mut(s![a..b, h * hd..(h + 1) * hd]).assign(&o);
        }
    }
    out
}

/// Splits a fused `[tokens, 3·dim]` qkv product into its three `[tokens, dim]` views.
pub fn split_qkv(qkv: &Array2<f32>) -> (ArrayView2<'_, f32>, ArrayView2<'_, f32>, ArrayView2<'_, f32>) {
    let d = qkv.ncols() / 3;
    (qkv.slice(s![.., 0..d]), qkv.slice(s![.., d..2 * d]), qkv.slice(s![.., 2 * d..3 * d]))
}

/// `a += b`, elementwise.
pub fn add_into(a: &mut Array2<f32>, b: &Array2<f32>) {
    Zip::from(a).and(b).for_each(|x, &y| *x += y);
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
            assert!((erf(x) - want).abs() < 1.5e-7, "erf({x}) = {} not {want}", erf(x));
            assert!((erf(-x) + want).abs() < 1.5e-7);
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

    #[test]
    fn merge_window_order_walks_blocks() {
        let order: Vec<_> = merge_window_order(2, 4, 2).collect();
        assert_eq!(order, vec![(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]);
    }
}
