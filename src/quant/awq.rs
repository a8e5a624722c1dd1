//! AWQ (Lin et al. 2023, "Activation-aware Weight Quantization"), as AutoAWQ runs it: for each
//! group of linears that read one input (a norm's consumers, v → o, up → down), search a
//! per-input-channel scale `s` that moves quantization precision to the channels the activations
//! use most, then search a clip range for every weight group.
//!
//! **Scale search.** For each ratio `r` of a grid (`0, 1/n, …, (n−1)/n`, n = 20):
//! `s = x̄^r / (w̄^(1−r) + 1e-4)`, clamped to ≥ 1e-4 and normalised by `√(max s · min s)`
//! (AutoAWQ's `duo_scaling`; without it `s = x̄^r`), where `x̄_j = mean |x_j|` over the calibration
//! tokens and `w̄_j` the mean over all the group's rows of `|W_ij| / max |W_i,group(j)|`. The
//! chosen `s` minimises the stated error
//!
//! `L(s) = Σ_linears ‖ X diag(s)⁻¹ Q(W diag(s))ᵀ − X Wᵀ ‖²  =  Σ_linears tr(ΔW H ΔWᵀ)`,
//! `ΔW = Q(W diag(s)) diag(s)⁻¹ − W`, `H = Σ_t x_t x_tᵀ`,
//!
//! the paper's objective summed over the linears sharing the input (a float linear, such as a MoE
//! router, has `ΔW = 0`). The two forms are equal; the Hessian form costs `rows · in²` per candidate
//! instead of `tokens · rows · in`, and needs no activations kept. (AutoAWQ measures the error at
//! the output of the module around the linears — the attention block for q/k/v — which costs a
//! block forward per candidate; lamina scores the linears' own outputs, the paper's definition.)
//! Unlike AutoAWQ, "no scaling" is scored too and kept when no ratio beats it. Under grouped-query
//! attention the v → o scales are averaged over the query heads of each key/value group so they
//! fold into `v_proj` ([`share_over_kv_groups`]).
//!
//! **Clip search.** For every row and group of a scaled weight `W' = W diag(s)` (input
//! `X' = X diag(s)⁻¹`, so `H' = diag(s)⁻¹ H diag(s)⁻¹`): candidates `m_k = m₀ (1 − k/n)` for
//! `k < max_shrink · n` (n = 20, max_shrink 0.5), `m₀` the group's largest magnitude; clamp the
//! group to `±m_k`, quantize it as the scheme does, and keep the `m_k` with the least output error
//! `Δ H'_gg Δᵀ`, `Δ = Q(clamp(W'_g)) − W'_g` (AutoAWQ's `_compute_best_clip`, exactly, on all
//! tokens). The clamp is applied to the weight, so a later min-max rounding sees the clipped range.

use super::rtn;
use super::smooth::{share_over_kv_groups, Subgraph};
use super::spec::QuantSpec;
use crate::device::Device;
use crate::model::nn::Linear;
use anyhow::{ensure, Result};
use ndarray::{s, Array2, ArrayView2};
use rayon::prelude::*;

/// AWQ's knobs (AutoAWQ's defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqConfig {
    /// Ratios tried by the scale search.
    pub grid: usize,
    /// `s = x̄^r / w̄^(1−r)` (true) or `s = x̄^r`.
    pub duo_scaling: bool,
    /// Steps of the clip search.
    pub clip_grid: usize,
    /// The clip search shrinks a group's range by at most this fraction.
    pub max_shrink: f32,
}

impl Default for AwqConfig {
    fn default() -> AwqConfig {
        AwqConfig { grid: 20, duo_scaling: true, clip_grid: 20, max_shrink: 0.5 }
    }
}

/// A linear reading the input whose scale is searched, and how it will be quantized (`None`:
/// it stays float, and scaling it is exact).
#[derive(Debug, Clone, Copy)]
pub struct Consumer<'a> {
    pub linear: &'a Linear,
    pub spec: Option<&'a QuantSpec>,
}

/// The outcome of [`search_scales`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleChoice {
    /// The chosen scales (all 1 when nothing beat no scaling).
    pub scales: Vec<f32>,
    /// The chosen ratio, or `None` when no scaling was best.
    pub ratio: Option<f32>,
    /// `(ratio, L(s))` for every ratio of the grid.
    pub scores: Vec<(f32, f64)>,
    /// `L(1)`.
    pub unscaled_error: f64,
}

/// The candidate scales for `ratio` (see the module docs).
pub fn candidate_scales(x_mean: &[f32], w_mean: &[f32], ratio: f32, duo_scaling: bool) -> Vec<f32> {
    let raw: Vec<f64> = x_mean
        .iter()
        .zip(w_mean)
        .map(|(&x, &w)| {
            let s = if duo_scaling {
                (x as f64).powf(ratio as f64) / ((w as f64).powf(1.0 - ratio as f64) + 1e-4)
            } else {
                (x as f64).powf(ratio as f64)
            };
            let s = s.max(1e-4);
            if s.is_finite() {
                s
            } else {
                1.0
            }
        })
        .collect();
    let max = raw.iter().copied().fold(f64::MIN, f64::max);
    let min = raw.iter().copied().fold(f64::MAX, f64::min);
    let norm = (max * min).sqrt();
    raw.iter().map(|&s| (s / norm) as f32).collect()
}

/// `w̄_j`: the mean over every row of every quantized consumer of `|W_ij|` divided by the largest
/// magnitude of its (row, group) (AutoAWQ's `w_scale.mean(0)`, its groups of the scheme's length).
pub fn weight_mean(consumers: &[Consumer]) -> Vec<f32> {
    let n = consumers[0].linear.in_features();
    let mut sum = vec![0f64; n];
    let mut rows = 0usize;
    for c in consumers.iter().filter(|c| c.spec.is_some()) {
        let group = c.spec.unwrap().group_len(n);
        for row in c.linear.weight.rows() {
            let row = row.as_standard_layout();
            let row = row.as_slice().expect("standard layout");
            for (g, chunk) in row.chunks(group).enumerate() {
                let m = chunk.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 + 1e-6;
                for (k, &v) in chunk.iter().enumerate() {
                    sum[g * group + k] += v.abs() as f64 / m;
                }
            }
            rows += 1;
        }
    }
    sum.iter().map(|&s| (s / rows.max(1) as f64) as f32).collect()
}

/// `Σ tr(ΔW H ΔWᵀ)` over the quantized consumers for input scales `scales` (see the module docs).
pub fn scaled_error(device: &dyn Device, consumers: &[Consumer], scales: &[f32], hessian: ArrayView2<f32>) -> f64 {
    consumers
        .iter()
        .filter_map(|c| c.spec.map(|spec| (c.linear, spec)))
        .map(|(l, spec)| {
            let (rows, cols) = l.weight.dim();
            let scaled: Vec<f32> =
                l.weight.rows().into_iter().flat_map(|r| r.into_iter().zip(scales).map(|(w, s)| w * s)).collect();
            let dq = rtn::quantize(&scaled, rows, cols, spec).dequantize();
            let delta = Array2::from_shape_fn((rows, cols), |(r, j)| dq[r * cols + j] / scales[j] - l.weight[(r, j)]);
            quadratic_form(device, delta.view(), hessian)
        })
        .sum()
}

/// `Σ_r Δ_r H Δ_rᵀ`.
fn quadratic_form(device: &dyn Device, delta: ArrayView2<f32>, hessian: ArrayView2<f32>) -> f64 {
    let dh = device.matmul(delta, hessian);
    dh.iter().zip(delta.iter()).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Searches the scales of one group of linears reading one input (see the module docs).
/// `x_mean` is the input's per-channel mean magnitude, `hessian` its `Σ xxᵀ` (any positive
/// multiple); `kind` says how the scales fold (an [`Subgraph::Ov`] shares them per key/value head).
pub fn search_scales(
    device: &dyn Device,
    kind: Subgraph,
    consumers: &[Consumer],
    x_mean: &[f32],
    hessian: ArrayView2<f32>,
    cfg: &AwqConfig,
) -> Result<ScaleChoice> {
    ensure!(!consumers.is_empty(), "AWQ needs at least one linear reading the scaled input");
    let n = consumers[0].linear.in_features();
    for (i, c) in consumers.iter().enumerate() {
        ensure!(
            c.linear.in_features() == n,
            "linear {i} reads {} channels, linear 0 reads {n}",
            c.linear.in_features()
        );
    }
    ensure!(x_mean.len() == n, "activation statistics for {} channels, the linears read {n}", x_mean.len());
    ensure!(hessian.dim() == (n, n), "the Hessian is {:?}, the linears read {n} channels", hessian.dim());
    ensure!(cfg.grid > 0, "the AWQ grid needs at least one point");
    if let Some((j, v)) = x_mean.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        anyhow::bail!("channel {j}: non-finite activation statistic {v}");
    }
    let identity = vec![1.0; n];
    let unscaled_error = scaled_error(device, consumers, &identity, hessian);
    if consumers.iter().all(|c| c.spec.is_none()) {
        return Ok(ScaleChoice { scales: identity, ratio: None, scores: Vec::new(), unscaled_error });
    }
    let w_mean = weight_mean(consumers);
    let mut scores = Vec::with_capacity(cfg.grid);
    let (mut best, mut best_error, mut best_ratio) = (identity, unscaled_error, None);
    for k in 0..cfg.grid {
        let ratio = k as f32 / cfg.grid as f32;
        let mut scales = candidate_scales(x_mean, &w_mean, ratio, cfg.duo_scaling);
        if let Subgraph::Ov(heads) = kind {
            scales = share_over_kv_groups(&scales, heads)?;
        }
        let e = scaled_error(device, consumers, &scales, hessian);
        scores.push((ratio, e));
        if e < best_error {
            (best, best_error, best_ratio) = (scales, e, Some(ratio));
        }
    }
    Ok(ScaleChoice { scales: best, ratio: best_ratio, scores, unscaled_error })
}

/// What [`search_clip`] did to one weight.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipReport {
    /// The chosen range of every (row, group) as a fraction of its largest magnitude, `[rows, groups]`.
    pub kept: Vec<f32>,
    /// `Σ_r Σ_g Δ H_gg Δᵀ` before and after clipping.
    pub error_before: f64,
    pub error_after: f64,
}

/// Searches and applies the clip range of every (row, group) of `weight` (already scaled; its
/// input's `Σ xxᵀ` is `hessian`), quantized as `spec` says (see the module docs).
pub fn search_clip(
    weight: &mut Array2<f32>,
    spec: &QuantSpec,
    hessian: ArrayView2<f32>,
    cfg: &AwqConfig,
) -> Result<ClipReport> {
    let (rows, cols) = weight.dim();
    ensure!(hessian.dim() == (cols, cols), "the Hessian is {:?}, the weight reads {cols} channels", hessian.dim());
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let steps = ((cfg.max_shrink * cfg.clip_grid as f32) as usize).max(1);
    // The diagonal blocks of H, one per group.
    let blocks: Vec<Array2<f32>> = (0..groups)
        .map(|g| {
            hessian.slice(s![g * group..((g + 1) * group).min(cols), g * group..((g + 1) * group).min(cols)]).to_owned()
        })
        .collect();
    // Quantizes one group as the scheme does, returns the dequantized values.
    let one_group = |vals: &[f32]| -> Vec<f32> {
        let mut one = *spec;
        one.group_size = None;
        rtn::quantize(vals, 1, vals.len(), &one).dequantize()
    };
    let error = |orig: &[f32], q: &[f32], h: &Array2<f32>| -> f64 {
        let d: Vec<f64> = orig.iter().zip(q).map(|(&a, &b)| (b - a) as f64).collect();
        let mut e = 0f64;
        for (i, &di) in d.iter().enumerate() {
            let hr = h.row(i);
            e += di * d.iter().zip(hr.iter()).map(|(&dj, &hij)| dj * hij as f64).sum::<f64>();
        }
        e
    };
    let view = weight.view();
    let results: Vec<(Vec<f32>, Vec<f32>, f64, f64)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let vals: Vec<f32> = view.row(r).iter().copied().collect();
            let mut out = vals.clone();
            let mut kept = Vec::with_capacity(groups);
            let (mut before, mut after) = (0f64, 0f64);
            for (g, chunk) in vals.chunks(group).enumerate() {
                let m0 = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                let e0 = error(chunk, &one_group(chunk), &blocks[g]);
                let (mut best_e, mut best_k) = (e0, 0usize);
                for k in 1..steps {
                    let m = m0 * (1.0 - k as f32 / cfg.clip_grid as f32);
                    let clamped: Vec<f32> = chunk.iter().map(|v| v.clamp(-m, m)).collect();
                    let e = error(chunk, &one_group(&clamped), &blocks[g]);
                    if e < best_e {
                        (best_e, best_k) = (e, k);
                    }
                }
                let m = m0 * (1.0 - best_k as f32 / cfg.clip_grid as f32);
                for (o, v) in out[g * group..g * group + chunk.len()].iter_mut().zip(chunk) {
                    *o = v.clamp(-m, m);
                }
                kept.push(1.0 - best_k as f32 / cfg.clip_grid as f32);
                before += e0;
                after += best_e;
            }
            (kept, out, before, after)
        })
        .collect();
    let mut report = ClipReport { kept: Vec::with_capacity(rows * groups), error_before: 0.0, error_after: 0.0 };
    for (r, (kept, out, before, after)) in results.into_iter().enumerate() {
        weight.row_mut(r).iter_mut().zip(&out).for_each(|(w, &v)| *w = v);
        report.kept.extend(kept);
        report.error_before += before;
        report.error_after += after;
    }
    Ok(report)
}

/// `diag(s)⁻¹ H diag(s)⁻¹`: the input's `Σ xxᵀ` after the input is divided by `s`.
pub fn scaled_hessian(hessian: ArrayView2<f32>, scales: &[f32]) -> Array2<f32> {
    Array2::from_shape_fn(hessian.dim(), |(i, j)| hessian[(i, j)] / (scales[i] * scales[j]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::quant::observer::{ChannelStats, Hessian};
    use crate::quant::smooth::{fold_norm_linears, ConsumerMap, Heads};
    use crate::quant::testutil::Rng;
    use ndarray::Array1;

    fn awq_spec(group: usize) -> QuantSpec {
        let y = format!("weight: {{scope: per_group, dtype: int4, symmetric: false, ext: {{group_size: {group}}}}}");
        QuantSpec::from_qconfig(&serde_yaml::from_str(&y).unwrap()).unwrap()
    }

    /// Activations with a few salient channels (large mean magnitude), as in real LLMs.
    fn activations(rng: &mut Rng, tokens: usize, n: usize) -> Array2<f32> {
        Array2::from_shape_fn((tokens, n), |(_, j)| {
            let big = if j % 11 == 3 { 12.0 } else { 1.0 };
            rng.laplace() * big
        })
    }

    fn stats(x: &Array2<f32>) -> (Vec<f32>, Array2<f32>) {
        let mut st = ChannelStats::new(x.ncols());
        st.update(x.view());
        let mut h = Hessian::new(x.ncols());
        h.update(&Cpu, x.view());
        (st.abs_mean().unwrap(), h.matrix())
    }

    /// `‖ X diag(s)⁻¹ Q(W diag(s))ᵀ − X Wᵀ ‖²` with the activations themselves.
    fn direct_error(x: &Array2<f32>, ls: &[Linear], spec: &QuantSpec, s: &[f32]) -> f64 {
        let xs = Array2::from_shape_fn(x.dim(), |(t, j)| x[(t, j)] / s[j]);
        ls.iter()
            .map(|l| {
                let (rows, cols) = l.weight.dim();
                let scaled: Vec<f32> = (0..rows * cols).map(|i| l.weight[(i / cols, i % cols)] * s[i % cols]).collect();
                let wq = Array2::from_shape_vec((rows, cols), rtn::quantize(&scaled, rows, cols, spec).dequantize())
                    .unwrap();
                let d = xs.dot(&wq.t()) - x.dot(&l.weight.t());
                d.iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
            })
            .sum()
    }

    #[test]
    fn chosen_scales_minimise_the_stated_error_over_the_grid() {
        let mut rng = Rng::new(51);
        let (tokens, n) = (600, 64);
        let x = activations(&mut rng, tokens, n);
        let ls: Vec<Linear> = (0..2).map(|_| Linear { weight: rng.normal_matrix(24, n, 0.1), bias: None }).collect();
        let spec = awq_spec(16);
        let (x_mean, h) = stats(&x);
        let consumers: Vec<Consumer> = ls.iter().map(|l| Consumer { linear: l, spec: Some(&spec) }).collect();
        let cfg = AwqConfig::default();
        let choice = search_scales(&Cpu, Subgraph::NormLinear, &consumers, &x_mean, h.view(), &cfg).unwrap();
        assert_eq!(choice.scores.len(), 20);
        // Every score is the error of quantizing with that ratio's scales, measured on the
        // activations themselves (H = 2/n Σ xxᵀ: the forms differ by that factor).
        let w_mean = weight_mean(&consumers);
        let k = 2.0 / tokens as f64;
        for &(ratio, e) in &choice.scores {
            let s = candidate_scales(&x_mean, &w_mean, ratio, true);
            let want = direct_error(&x, &ls, &spec, &s) * k;
            assert!((e - want).abs() <= 1e-3 * want, "ratio {ratio}: {e} vs {want}");
        }
        let want_none = direct_error(&x, &ls, &spec, &vec![1.0; n]) * k;
        assert!((choice.unscaled_error - want_none).abs() <= 1e-3 * want_none);
        // The choice is the grid's minimum, and salient channels make scaling pay.
        let min = choice.scores.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
        let got = choice.scores.iter().find(|s| Some(s.0) == choice.ratio).expect("a ratio was chosen").1;
        assert_eq!(got, min);
        assert!(min < 0.9 * choice.unscaled_error, "{min} vs {}", choice.unscaled_error);
        // Scales are normalised: √(max·min) = 1.
        let (mx, mn) = choice.scales.iter().fold((0f32, f32::MAX), |(a, b), &s| (a.max(s), b.min(s)));
        assert!(((mx * mn).sqrt() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn folding_the_scales_into_a_norm_keeps_the_float_function() {
        let mut rng = Rng::new(52);
        let n = 32;
        let x = activations(&mut rng, 100, n);
        let mut ls: Vec<Linear> = (0..3).map(|_| Linear { weight: rng.normal_matrix(8, n, 0.2), bias: None }).collect();
        let spec = awq_spec(8);
        let (x_mean, h) = stats(&x);
        let consumers: Vec<Consumer> = ls.iter().map(|l| Consumer { linear: l, spec: Some(&spec) }).collect();
        let choice =
            search_scales(&Cpu, Subgraph::NormLinear, &consumers, &x_mean, h.view(), &AwqConfig::default()).unwrap();
        let g0 = Array1::from_shape_fn(n, |j| 1.0 + j as f32 / n as f32);
        let y0: Vec<Array2<f32>> = ls.iter().map(|l| (&x * &g0).dot(&l.weight.t())).collect();
        let mut g = g0.clone();
        let mut refs: Vec<&mut Linear> = ls.iter_mut().collect();
        let map = ConsumerMap { shift: None, scales: choice.scales.clone() };
        fold_norm_linears(&mut g, &mut None, &mut refs, &map).unwrap();
        for (l, want) in ls.iter().zip(&y0) {
            let y = (&x * &g).dot(&l.weight.t());
            let err = (&y - want).iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(err <= 1e-4 * want.iter().fold(0f32, |m, v| m.max(v.abs())), "{err}");
        }
    }

    #[test]
    fn float_consumers_add_no_error_and_gqa_scales_are_shared() {
        let mut rng = Rng::new(53);
        let x = activations(&mut rng, 200, 16);
        let (x_mean, h) = stats(&x);
        let router = Linear { weight: rng.normal_matrix(4, 16, 0.3), bias: None };
        let only_float = [Consumer { linear: &router, spec: None }];
        let c =
            search_scales(&Cpu, Subgraph::NormLinear, &only_float, &x_mean, h.view(), &AwqConfig::default()).unwrap();
        assert_eq!((c.unscaled_error, c.ratio), (0.0, None));
        assert!(c.scales.iter().all(|&s| s == 1.0));
        // o_proj reading 4 heads of 4 channels, 2 key/value heads: heads 0,1 and 2,3 share scales.
        let o = Linear { weight: rng.normal_matrix(8, 16, 0.3), bias: None };
        let spec = awq_spec(8);
        let heads = Heads { num_heads: 4, num_kv_heads: 2 };
        let c = search_scales(
            &Cpu,
            Subgraph::Ov(heads),
            &[Consumer { linear: &o, spec: Some(&spec) }],
            &x_mean,
            h.view(),
            &AwqConfig::default(),
        )
        .unwrap();
        for i in 0..4 {
            assert_eq!(c.scales[i], c.scales[4 + i]);
            assert_eq!(c.scales[8 + i], c.scales[12 + i]);
        }
    }

    #[test]
    fn clipping_picks_the_least_output_error_per_group() {
        let mut rng = Rng::new(54);
        let (tokens, n) = (400, 32);
        let x = activations(&mut rng, tokens, n);
        let (_, h) = stats(&x);
        // Heavy-tailed weights: clipping the rare large values helps most groups.
        let w0 = Array2::from_shape_fn((6, n), |_| rng.laplace() * 0.05);
        let spec = awq_spec(16);
        let mut w = w0.clone();
        let cfg = AwqConfig::default();
        let rep = search_clip(&mut w, &spec, h.view(), &cfg).unwrap();
        assert!(rep.error_after <= rep.error_before);
        assert!(rep.kept.iter().any(|&k| k < 1.0), "some group clipped");
        // Brute force on one (row, group): every candidate's error with the activations.
        for (r, g) in [(0usize, 0usize), (3, 1), (5, 1)] {
            let cols = g * 16..(g + 1) * 16;
            let orig: Vec<f32> = w0.row(r).slice(s![cols.clone()]).to_vec();
            let xg = x.slice(s![.., cols.clone()]);
            let err_of = |m: f32| {
                let c: Vec<f32> = orig.iter().map(|v| v.clamp(-m, m)).collect();
                let mut one = spec;
                one.group_size = None;
                let q = rtn::quantize(&c, 1, 16, &one).dequantize();
                let d: Vec<f32> = q.iter().zip(&orig).map(|(a, b)| a - b).collect();
                xg.dot(&Array1::from_vec(d)).iter().map(|v| (*v as f64).powi(2)).sum::<f64>()
            };
            let m0 = orig.iter().fold(0f32, |m, v| m.max(v.abs()));
            let best =
                (0..10).map(|k| (k, err_of(m0 * (1.0 - k as f32 / 20.0)))).min_by(|a, b| a.1.total_cmp(&b.1)).unwrap();
            let kept = rep.kept[r * 2 + g];
            assert!(
                (kept - (1.0 - best.0 as f32 / 20.0)).abs() < 1e-6,
                "row {r} group {g}: kept {kept}, best {best:?}"
            );
            let m = m0 * kept;
            for (j, c) in cols.enumerate() {
                assert_eq!(w[(r, c)], orig[j].clamp(-m, m));
            }
        }
    }

    #[test]
    fn awq_beats_round_to_nearest_on_salient_channels() {
        let mut rng = Rng::new(55);
        let (tokens, n) = (800, 128);
        let x = activations(&mut rng, tokens, n);
        let (x_mean, h) = stats(&x);
        let l = Linear { weight: rng.normal_matrix(64, n, 0.05), bias: None };
        let spec = awq_spec(32);
        let c = [Consumer { linear: &l, spec: Some(&spec) }];
        let choice = search_scales(&Cpu, Subgraph::NormLinear, &c, &x_mean, h.view(), &AwqConfig::default()).unwrap();
        let mut scaled = Array2::from_shape_fn(l.weight.dim(), |(r, j)| l.weight[(r, j)] * choice.scales[j]);
        let hs = scaled_hessian(h.view(), &choice.scales);
        search_clip(&mut scaled, &spec, hs.view(), &AwqConfig::default()).unwrap();
        // The whole AWQ: quantize the clipped scaled weight, undo the scales.
        let (rows, cols) = scaled.dim();
        let dq = rtn::quantize(scaled.as_slice().unwrap(), rows, cols, &spec).dequantize();
        let awq = Array2::from_shape_fn((rows, cols), |(r, j)| dq[r * cols + j] / choice.scales[j]);
        let rtn_w = Array2::from_shape_vec(
            (rows, cols),
            rtn::quantize(l.weight.as_slice().unwrap(), rows, cols, &spec).dequantize(),
        )
        .unwrap();
        let err =
            |wq: &Array2<f32>| (x.dot(&wq.t()) - x.dot(&l.weight.t())).iter().map(|v| (*v as f64).powi(2)).sum::<f64>();
        assert!(err(&awq) < 0.8 * err(&rtn_w), "AWQ {} vs RTN {}", err(&awq), err(&rtn_w));
    }
}
