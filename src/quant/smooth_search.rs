//! Choosing the smoothing strength by measurement (the idea of msModelSlim's flex_smooth, over
//! alpha only): for each alpha of a grid, apply the smoothing's input map to a sample of real
//! activations, fake-quantize activations and weights exactly as the scheme will, and score the
//! consumers' output error against the float product. The fold itself is then done with the
//! chosen alpha by the `smooth` functions.
//!
//! Only the consumers (the linears reading the smoothed activations) are scored. That is exact
//! for what smoothing changes: the producer is a float norm, or a linear whose rows are divided by
//! the scales, which leaves per-row (and per-group) weight quantization unchanged.

use super::act_range::{dequantize, minmax_range, quantize};
use super::observer::ChannelStats;
use super::rtn;
use super::smooth::{consumer_map, ConsumerMap, SmoothConfig, Subgraph};
use super::spec::{ActQuant, QuantSpec};
use crate::device::Device;
use crate::model::nn::Linear;
use anyhow::{ensure, Result};
use ndarray::{Array1, Array2, ArrayView2, Axis};

/// 0.05, 0.10, …, 0.95.
pub fn default_alpha_grid() -> Vec<f32> {
    (1..20).map(|i| i as f32 * 0.05).collect()
}

/// What to search: the smoothing's other settings (`base.alpha` is ignored) and the alphas to try.
#[derive(Debug, Clone, Copy)]
pub struct AlphaSearch<'a> {
    pub base: SmoothConfig,
    pub grid: &'a [f32],
}

/// The outcome of [`search_alpha`].
#[derive(Debug, Clone, PartialEq)]
pub struct AlphaChoice {
    /// The alpha with the least error, or `None` when no smoothing scored better than none.
    pub best: Option<f32>,
    /// `(alpha, error)` for every alpha of the grid; error = `Σ ‖X̂' Ŵ'ᵀ + W z − X Wᵀ‖²` over consumers.
    pub scores: Vec<(f32, f64)>,
    /// The same error without smoothing.
    pub unsmoothed_error: f64,
}

/// Scores each alpha of `search.grid` (with `search.base`'s other settings) for a smoothing of `kind` whose
/// consumers are `consumers`, on `sample [tokens, in]` (rows of the consumers' unsmoothed input,
/// e.g. an `observer::TokenSample`), quantizing as `spec` says: weights round-to-nearest at its
/// bits and groups; activations per tensor with the min-max range of the full statistics `stats`
/// (static), per token (dynamic), or not at all.
pub fn search_alpha(
    device: &dyn Device,
    kind: Subgraph,
    consumers: &[&Linear],
    sample: ArrayView2<f32>,
    stats: &ChannelStats,
    search: AlphaSearch,
    spec: &QuantSpec,
) -> Result<AlphaChoice> {
    ensure!(sample.nrows() > 0, "no activation sample to score smoothing strengths on");
    ensure!(
        sample.ncols() == stats.channels(),
        "the sample has {} channels, the statistics {}",
        sample.ncols(),
        stats.channels()
    );
    let reference: Vec<Array2<f32>> = consumers.iter().map(|l| device.linear(sample, l.weight.view())).collect();
    let identity = ConsumerMap { shift: None, scales: vec![1.0; stats.channels()] };
    let unsmoothed_error = score(device, consumers, sample, stats, &identity, spec, &reference);
    let mut scores = Vec::with_capacity(search.grid.len());
    for &alpha in search.grid {
        let map = consumer_map(kind, consumers, stats, &SmoothConfig { alpha, ..search.base })?;
        scores.push((alpha, score(device, consumers, sample, stats, &map, spec, &reference)));
    }
    let best = scores
        .iter()
        .filter(|(_, e)| *e < unsmoothed_error)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|&(alpha, _)| alpha);
    Ok(AlphaChoice { best, scores, unsmoothed_error })
}

/// `Σ ‖X̂' Ŵ'ᵀ + W z − X Wᵀ‖²` over the consumers for one input map.
fn score(
    device: &dyn Device,
    consumers: &[&Linear],
    sample: ArrayView2<f32>,
    stats: &ChannelStats,
    map: &ConsumerMap,
    spec: &QuantSpec,
    reference: &[Array2<f32>],
) -> f64 {
    let z = map.shift.clone().unwrap_or_else(|| vec![0.0; stats.channels()]);
    let mut x = sample.to_owned();
    for mut row in x.rows_mut() {
        for ((v, &zj), &sj) in row.iter_mut().zip(&z).zip(&map.scales) {
            *v = (*v - zj) / sj;
        }
    }
    fake_quantize_activations(&mut x, stats, map, spec.act);
    let mut error = 0f64;
    for (l, want) in consumers.iter().zip(reference) {
        let (rows, cols) = l.weight.dim();
        let scaled: Vec<f32> =
            l.weight.rows().into_iter().flat_map(|r| r.into_iter().zip(&map.scales).map(|(w, s)| w * s)).collect();
        let wq = Array2::from_shape_vec((rows, cols), rtn::quantize(&scaled, rows, cols, spec).dequantize())
            .expect("dequantized weight has the weight's shape");
        let mut y = device.linear(x.view(), wq.view());
        if map.shift.is_some() {
            let wz: Array1<f32> = l.weight.dot(&Array1::from_vec(z.clone()));
            y += &wz.insert_axis(Axis(0));
        }
        error += y.iter().zip(want.iter()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    }
    error
}

fn fake_quantize_activations(x: &mut Array2<f32>, stats: &ChannelStats, map: &ConsumerMap, act: ActQuant) {
    match act {
        ActQuant::None => {}
        ActQuant::PerTensorStatic { symmetric } => {
            let (lo, hi) = stats.smoothed(map.shift.as_deref(), &map.scales).tensor_range().unwrap_or((0.0, 0.0));
            let r = minmax_range(lo, hi, symmetric);
            x.mapv_inplace(|v| dequantize(quantize(v, r), r));
        }
        ActQuant::PerToken => {
            for mut row in x.rows_mut() {
                let r = minmax_range(0.0, row.iter().fold(0f32, |m, v| m.max(v.abs())), true);
                row.mapv_inplace(|v| dequantize(quantize(v, r), r));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::quant::smooth::smooth_norm_linears;
    use crate::quant::testutil::Rng;

    /// Norm output with a few outlier channels, and two linears reading it.
    fn setup(seed: u64) -> (Array2<f32>, Vec<Linear>) {
        let mut rng = Rng::new(seed);
        let (tokens, hidden) = (256, 64);
        let y = Array2::from_shape_fn((tokens, hidden), |(_, j)| match j {
            3 | 40 => rng.normal() * 60.0 + 5.0,
            17 => rng.normal() + 25.0,
            _ => rng.normal(),
        });
        let ls = (0..2).map(|_| Linear { weight: rng.normal_matrix(48, hidden, 0.1), bias: None }).collect();
        (y, ls)
    }

    /// The error of the quantized consumers after really folding `cfg` into a copy, computed
    /// with an explicit fake-quantized forward (independent of `score`).
    fn folded_error(y: &Array2<f32>, ls: &[Linear], cfg: Option<SmoothConfig>, spec: &QuantSpec) -> f64 {
        let hidden = y.ncols();
        let mut st = ChannelStats::new(hidden);
        st.update(y.view());
        let mut ls2: Vec<Linear> = ls.to_vec();
        let (mut g, mut b) = (Array1::<f32>::ones(hidden), None::<Array1<f32>>);
        if let Some(cfg) = cfg {
            let mut refs: Vec<&mut Linear> = ls2.iter_mut().collect();
            smooth_norm_linears(&mut g, &mut b, &mut refs, &st, &cfg).unwrap();
        }
        // The norm's new output: y ⊙ g + b (the normalisation itself is unchanged).
        let y2 = Array2::from_shape_fn(y.dim(), |(t, j)| y[(t, j)] * g[j] + b.as_ref().map_or(0.0, |b| b[j]));
        let mut yq = y2.clone();
        if spec.act == ActQuant::PerToken {
            for mut row in yq.rows_mut() {
                let scale = row.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0;
                row.mapv_inplace(|v| (v / scale).round_ties_even().clamp(-128.0, 127.0) * scale);
            }
        } else {
            let mut st2 = ChannelStats::new(hidden);
            st2.update(y2.view());
            let (lo, hi) = st2.tensor_range().unwrap();
            let r = minmax_range(lo, hi, false);
            yq.mapv_inplace(|v| dequantize(quantize(v, r), r));
        }
        let mut err = 0f64;
        for (l0, l) in ls.iter().zip(&ls2) {
            let (rows, cols) = l.weight.dim();
            let wq = rtn::quantize(l.weight.as_slice().unwrap(), rows, cols, spec).dequantize();
            let wq = Array2::from_shape_vec((rows, cols), wq).unwrap();
            let mut out = yq.dot(&wq.t());
            if let Some(c) = &l.bias {
                out += c;
            }
            let want = y.dot(&l0.weight.t());
            err += out.iter().zip(want.iter()).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
        }
        err
    }

    #[test]
    fn scores_equal_the_error_of_the_folded_quantized_layer() {
        let (y, ls) = setup(41);
        let mut st = ChannelStats::new(y.ncols());
        st.update(y.view());
        let consumers: Vec<&Linear> = ls.iter().collect();
        for (base, scheme) in [
            (SmoothConfig::smooth_quant(0.5), "w8a8"),
            (SmoothConfig::m2(0.5), "w8a8"),
            (SmoothConfig::smooth_quant(0.5), "w8a8_dynamic"),
        ] {
            let spec = QuantSpec::preset(scheme).unwrap();
            let grid = [0.3f32, 0.6, 0.9];
            let search = AlphaSearch { base, grid: &grid };
            let choice = search_alpha(&Cpu, Subgraph::NormLinear, &consumers, y.view(), &st, search, &spec).unwrap();
            let none = folded_error(&y, &ls, None, &spec);
            assert!((choice.unsmoothed_error - none).abs() <= 1e-3 * none, "{} vs {none}", choice.unsmoothed_error);
            for &(alpha, e) in &choice.scores {
                let want = folded_error(&y, &ls, Some(SmoothConfig { alpha, ..base }), &spec);
                // After a shift the range is symmetric, which puts the zero point `-min/scale - 128`
                // on a rounding tie (127.5): float noise between the two computations can move the
                // whole grid by half a step, hence 1% rather than 0.1%.
                let tolerance = if base.shift { 1e-2 } else { 1e-3 };
                assert!((e - want).abs() <= tolerance * want, "alpha {alpha}: {e} vs {want}");
            }
            // Outlier channels make smoothing pay off, and the best score is the one chosen.
            let best = choice.best.expect("smoothing helps here");
            let min = choice.scores.iter().map(|s| s.1).fold(f64::INFINITY, f64::min);
            assert_eq!(choice.scores.iter().find(|s| s.0 == best).unwrap().1, min);
            assert!(min < 0.5 * choice.unsmoothed_error, "{min} vs {}", choice.unsmoothed_error);
        }
    }
}
