//! Outlier suppression that leaves the float model's function unchanged: divide the activations
//! entering some linears by a per-channel scale `s` (after subtracting a per-channel shift `z`,
//! for m2 / asymmetric iter_smooth), and fold the inverse into the weights around them.
//!
//! Scales (SmoothQuant; msModelSlim's iter_smooth and smooth_quant use the same formula):
//! `s_j = max(a_j^α / max(w_j, 1e-5)^(1-α), scale_min)` where `a_j` is the channel's activation
//! absmax (`max|x_j - z_j| = (max_j - min_j)/2` when shifting) and `w_j` the largest `|W[:, j]|`
//! over all the consuming linears. A channel never active (`a_j = 0`) keeps `s_j = 1`.
//!
//! Subgraphs (msModelSlim's names):
//! - norm-linear ([`smooth_norm_linears`]): a norm feeding linears that share its output
//!   (input_layernorm → q, k, v; post_attention_layernorm → gate, up; for MoE also the router and
//!   every expert). The only one that takes a shift.
//! - up-down ([`smooth_linear_linear`]): up_proj → down_proj (SwiGLU multiplies up's output
//!   by `act(gate)` channel-wise, so scaling commutes with it; a shift would not).
//! - ov ([`smooth_ov`]): v_proj → o_proj under grouped-query attention.
//!
//! Every function returns a [`SmoothReport`] whose `scales`/`shift` describe the consumer-side
//! input map `x'_j = (x_j - shift_j) / scales_j`, ready for `ChannelStats::smoothed` and
//! `Hessian::smoothed`.

use super::observer::ChannelStats;
use crate::model::nn::Linear;
use anyhow::{bail, ensure, Result};
use ndarray::{Array1, Axis};

/// How the scales are computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothConfig {
    /// Migration strength: 0 leaves activations alone, 1 moves all their range into the weights.
    pub alpha: f32,
    /// The smallest scale.
    pub scale_min: f32,
    /// Subtract the channel centres `(max+min)/2` first (norm-linear subgraphs only).
    pub shift: bool,
}

impl SmoothConfig {
    /// SmoothQuant (msModelSlim `smooth_quant`, anti_method m1): no shift.
    pub fn smooth_quant(alpha: f32) -> SmoothConfig {
        SmoothConfig { alpha, scale_min: 1e-5, shift: false }
    }
    /// msModelSlim `iter_smooth` defaults: alpha 0.9, scale_min 1e-5; asymmetric mode shifts the
    /// norm-linear subgraphs.
    pub fn iter_smooth(symmetric: bool) -> SmoothConfig {
        SmoothConfig { alpha: 0.9, scale_min: 1e-5, shift: !symmetric }
    }
    /// m2 (Outlier Suppression+ style): shift the norm's output channels to their centres, then
    /// scale the remaining half-ranges. msModelSlim's own m2 searches its scales in closed-source
    /// code; here the scales follow the open formula above on the shifted ranges.
    pub fn m2(alpha: f32) -> SmoothConfig {
        SmoothConfig { alpha, scale_min: 1e-5, shift: true }
    }
}

/// What a smoothing did, in terms of the consumers' inputs: `x'_j = (x_j - shift_j) / scales_j`.
#[derive(Debug, Clone, PartialEq)]
pub struct SmoothReport {
    /// `[consumer in]`.
    pub scales: Vec<f32>,
    /// `[consumer in]`, when shifted.
    pub shift: Option<Vec<f32>>,
    /// The norm had no bias and now has one (norm-linear with a shift): a new tensor
    /// `<norm>.bias` to write.
    pub norm_bias_added: bool,
    /// Indices of the linears (consumers) that had no bias and now have one (norm-linear with a
    /// shift): a static-int8 linear folds it into `quant_bias`; a float one (a router) must write
    /// `<linear>.bias`.
    pub biases_added: Vec<usize>,
    /// `max_j a_j / mean_j a_j` of the consumers' per-channel activation absmax, before and after.
    pub spread_before: f32,
    pub spread_after: f32,
}

/// Smooths a norm and the linears reading its output.
///
/// The norm computes `y = n(x) ⊙ g + b` (`n` = RMS or layer normalisation, `b` = `norm_bias`,
/// absent for RMSNorm), and each linear `Wᵢ y + cᵢ`. With scales `s` and shift `z`
/// (zero without a shift), let `y' = (y - z) / s`. Then
/// - `y' = n(x) ⊙ (g / s) + (b - z) / s`: the norm weight becomes `g / s` and its bias
///   `(b - z) / s` (created when the norm had none and `z ≠ 0`);
/// - `Wᵢ y + cᵢ = Wᵢ (s ⊙ y' + z) + cᵢ = (Wᵢ diag(s)) y' + (cᵢ + Wᵢ z)`: each weight's columns
///   are multiplied by `s` and each bias gains `Wᵢ z`, computed with the original `Wᵢ`.
///
/// `stats` are the norm output's (any consumer's input) channel statistics.
pub fn smooth_norm_linears(
    norm_weight: &mut Array1<f32>,
    norm_bias: &mut Option<Array1<f32>>,
    linears: &mut [&mut Linear],
    stats: &ChannelStats,
    cfg: &SmoothConfig,
) -> Result<SmoothReport> {
    let n = norm_weight.len();
    ensure!(!linears.is_empty(), "smoothing a norm needs at least one linear reading it");
    for (i, l) in linears.iter().enumerate() {
        ensure!(l.in_features() == n, "linear {i} reads {} channels, the norm has {n}", l.in_features());
    }
    let consumers: Vec<&Linear> = linears.iter().map(|l| &**l).collect();
    let map = consumer_map(Subgraph::NormLinear, &consumers, stats, cfg)?;
    let (norm_bias_added, biases_added) = fold_norm_linears(norm_weight, norm_bias, linears, &map)?;
    Ok(report(stats, map.scales, map.shift, norm_bias_added, biases_added))
}

/// Folds a consumer-side input map `x' = (x − shift) / scales` into a norm and the linears reading
/// it (the algebra of [`smooth_norm_linears`]), whatever chose the map (SmoothQuant's formula,
/// AWQ's search). Returns whether the norm gained a bias and which linears did.
pub fn fold_norm_linears(
    norm_weight: &mut Array1<f32>,
    norm_bias: &mut Option<Array1<f32>>,
    linears: &mut [&mut Linear],
    map: &ConsumerMap,
) -> Result<(bool, Vec<usize>)> {
    let n = norm_weight.len();
    ensure!(map.scales.len() == n, "{} scales for a norm of {n} channels", map.scales.len());
    if let Some(b) = norm_bias {
        ensure!(b.len() == n, "norm bias has {} entries, its weight {n}", b.len());
    }
    for (i, l) in linears.iter().enumerate() {
        ensure!(l.in_features() == n, "linear {i} reads {} channels, the norm has {n}", l.in_features());
    }
    let scales = &map.scales;
    let mut biases_added = Vec::new();
    let mut norm_bias_added = false;
    if let Some(z) = &map.shift {
        let z = Array1::from_vec(z.clone());
        for (i, l) in linears.iter_mut().enumerate() {
            let wz = l.weight.dot(&z);
            match &mut l.bias {
                Some(c) => *c += &wz,
                None => {
                    l.bias = Some(wz);
                    biases_added.push(i);
                }
            }
        }
        if norm_bias.is_none() {
            *norm_bias = Some(Array1::zeros(n));
            norm_bias_added = true;
        }
        if let Some(b) = norm_bias {
            *b -= &z;
        }
    }
    for (j, &s) in scales.iter().enumerate() {
        norm_weight[j] /= s;
        if let Some(b) = norm_bias {
            b[j] /= s;
        }
    }
    for l in linears.iter_mut() {
        scale_columns(l, scales);
    }
    Ok((norm_bias_added, biases_added))
}

/// Smooths `prev → next` where `next`'s input channel `j` is `prev`'s output channel `j` up to a
/// channel-wise factor that commutes with scaling (up_proj → down_proj in SwiGLU:
/// `down(act(gate) ⊙ up)`): `prev`'s row `j` and bias entry are divided by `s_j`, `next`'s column
/// `j` multiplied by it. `stats` are `next`'s input statistics. No shift (ignored if configured).
pub fn smooth_linear_linear(
    prev: &mut Linear,
    next: &mut Linear,
    stats: &ChannelStats,
    cfg: &SmoothConfig,
) -> Result<SmoothReport> {
    let n = next.in_features();
    ensure!(prev.out_features() == n, "the first linear writes {} channels, the second reads {n}", prev.out_features());
    let ConsumerMap { scales, .. } = consumer_map(Subgraph::LinearLinear, &[next], stats, cfg)?;
    fold_linear_linear(prev, next, &scales)?;
    Ok(report(stats, scales, None, false, Vec::new()))
}

/// Folds scales on `next`'s input into `prev`'s rows (the algebra of [`smooth_linear_linear`]).
pub fn fold_linear_linear(prev: &mut Linear, next: &mut Linear, scales: &[f32]) -> Result<()> {
    let n = next.in_features();
    ensure!(prev.out_features() == n, "the first linear writes {} channels, the second reads {n}", prev.out_features());
    ensure!(scales.len() == n, "{} scales for {n} channels", scales.len());
    divide_rows(prev, scales);
    scale_columns(next, scales);
    Ok(())
}

/// Attention head counts, for [`smooth_ov`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
}

/// Smooths `v_proj → o_proj` under grouped-query attention.
///
/// `o`'s input channel `h·d + i` (query head `h`, `d` = head_dim) is a convex combination
/// (softmax weights) of `v`'s output channel `g·d + i` with `g = h / (num_heads / num_kv_heads)`
/// (transformers' `repeat_kv` order). A scale on that `v` channel therefore reaches every query
/// head of group `g`, so the scales are computed per `o` input channel and averaged over the
/// query heads of each group (msModelSlim's iter_smooth "mean" reduction): `v`'s row `g·d + i`
/// and bias are divided by `s̄[g, i]`, `o`'s column `h·d + i` multiplied by `s̄[h / ratio, i]`.
/// `stats` are `o`'s input statistics. No shift (ignored if configured).
pub fn smooth_ov(
    v: &mut Linear,
    o: &mut Linear,
    stats: &ChannelStats,
    heads: Heads,
    cfg: &SmoothConfig,
) -> Result<SmoothReport> {
    let ConsumerMap { scales, .. } = consumer_map(Subgraph::Ov(heads), &[o], stats, cfg)?;
    fold_ov(v, o, &scales, heads)?;
    Ok(report(stats, scales, None, false, Vec::new()))
}

/// Folds scales on `o`'s input (equal across the query heads of a key/value group, as
/// [`share_over_kv_groups`] makes them) into `v`'s rows (the algebra of [`smooth_ov`]).
pub fn fold_ov(v: &mut Linear, o: &mut Linear, scales: &[f32], heads: Heads) -> Result<()> {
    ensure!(heads.num_heads > 0 && o.in_features() % heads.num_heads == 0, "o_proj reads {} channels", o.in_features());
    ensure!(scales.len() == o.in_features(), "{} scales for o_proj's {} inputs", scales.len(), o.in_features());
    let (head_dim, ratio) = (o.in_features() / heads.num_heads, heads.num_heads / heads.num_kv_heads);
    ensure!(
        v.out_features() == heads.num_kv_heads * head_dim,
        "v_proj writes {} channels, expected {} kv heads × head_dim {head_dim}",
        v.out_features(),
        heads.num_kv_heads
    );
    // v's channel g·d + i is o's channel h·d + i for the group's first query head h = g·ratio.
    let kv_scales: Vec<f32> =
        (0..v.out_features()).map(|c| scales[(c / head_dim) * ratio * head_dim + c % head_dim]).collect();
    divide_rows(v, &kv_scales);
    scale_columns(o, scales);
    Ok(())
}

/// Averages per-channel scales on `o`'s input over the query heads that share a key/value head
/// (msModelSlim's iter_smooth "mean" reduction), so that one scale per value channel can be
/// folded into `v_proj`.
pub fn share_over_kv_groups(scales: &[f32], heads: Heads) -> Result<Vec<f32>> {
    let Heads { num_heads, num_kv_heads } = heads;
    let n = scales.len();
    ensure!(num_heads > 0 && num_kv_heads > 0, "head counts must be positive");
    if num_heads % num_kv_heads != 0 {
        bail!("{num_heads} attention heads are not a multiple of {num_kv_heads} key/value heads");
    }
    ensure!(n % num_heads == 0, "o_proj reads {n} channels, not a multiple of {num_heads} heads");
    let (head_dim, ratio) = (n / num_heads, num_heads / num_kv_heads);
    let mut kv = vec![0f32; num_kv_heads * head_dim];
    for (c, &s) in scales.iter().enumerate() {
        kv[(c / head_dim / ratio) * head_dim + c % head_dim] += s / ratio as f32;
    }
    Ok((0..n).map(|c| kv[(c / head_dim / ratio) * head_dim + c % head_dim]).collect())
}

/// Which kind of subgraph a smoothing folds into: decides whether a shift applies and how the
/// scales are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subgraph {
    NormLinear,
    LinearLinear,
    Ov(Heads),
}

/// The consumer-side input map `x'_j = (x_j - shift_j) / scales_j` of a smoothing.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerMap {
    pub shift: Option<Vec<f32>>,
    pub scales: Vec<f32>,
}

/// The map a smoothing of `kind` with `cfg` applies to the input of `consumers` (the linears
/// reading the smoothed activations: q/k/v, gate/up, down, or o), from their weights and their
/// input statistics. A shift applies to norm-linear subgraphs only.
pub fn consumer_map(
    kind: Subgraph,
    consumers: &[&Linear],
    stats: &ChannelStats,
    cfg: &SmoothConfig,
) -> Result<ConsumerMap> {
    ensure!(!consumers.is_empty(), "a smoothing needs at least one linear reading the smoothed activations");
    let n = consumers[0].in_features();
    for (i, l) in consumers.iter().enumerate() {
        ensure!(l.in_features() == n, "linear {i} reads {} channels, linear 0 reads {n}", l.in_features());
    }
    check_stats(stats, n, "the smoothed activations")?;
    let shift = (cfg.shift && kind == Subgraph::NormLinear).then(|| stats.shift());
    let act = if shift.is_some() { stats.half_range() } else { stats.absmax() };
    let mut wmax = vec![0f32; n];
    for l in consumers {
        column_absmax_into(l, &mut wmax);
    }
    let mut scales = smooth_scales(&act, &wmax, cfg)?;
    if let Subgraph::Ov(heads) = kind {
        scales = share_over_kv_groups(&scales, heads)?;
    }
    Ok(ConsumerMap { shift, scales })
}

/// `s_j = max(a_j^α / max(w_j, 1e-5)^(1-α), scale_min)`, 1 where `a_j = 0`.
pub fn smooth_scales(act: &[f32], wmax: &[f32], cfg: &SmoothConfig) -> Result<Vec<f32>> {
    ensure!((0.0..=1.0).contains(&cfg.alpha), "smoothing alpha {} is outside [0, 1]", cfg.alpha);
    ensure!(cfg.scale_min > 0.0, "smoothing scale_min must be positive");
    act.iter()
        .zip(wmax)
        .enumerate()
        .map(|(j, (&a, &w))| {
            ensure!(a.is_finite() && w.is_finite(), "channel {j}: non-finite statistics (activation {a}, weight {w})");
            if a == 0.0 {
                return Ok(1.0);
            }
            let s = (a as f64).powf(cfg.alpha as f64) / (w.max(1e-5) as f64).powf(1.0 - cfg.alpha as f64);
            Ok((s as f32).max(cfg.scale_min))
        })
        .collect()
}

fn check_stats(stats: &ChannelStats, channels: usize, what: &str) -> Result<()> {
    ensure!(stats.channels() == channels, "{what}: statistics for {} channels, expected {channels}", stats.channels());
    ensure!(stats.tokens > 0, "{what}: no calibration tokens were observed");
    ensure!(stats.nonfinite == 0, "{what}: {} NaN or infinite activations were observed", stats.nonfinite);
    Ok(())
}

/// `wmax[j] = max(wmax[j], max_r |W[r, j]|)`.
fn column_absmax_into(l: &Linear, wmax: &mut [f32]) {
    for row in l.weight.rows() {
        for (m, &w) in wmax.iter_mut().zip(row.iter()) {
            *m = m.max(w.abs());
        }
    }
}

fn scale_columns(l: &mut Linear, s: &[f32]) {
    for mut row in l.weight.rows_mut() {
        for (w, &f) in row.iter_mut().zip(s) {
            *w *= f;
        }
    }
}

fn divide_rows(l: &mut Linear, s: &[f32]) {
    for (mut row, &f) in l.weight.axis_iter_mut(Axis(0)).zip(s) {
        row.mapv_inplace(|w| w / f);
    }
    if let Some(b) = &mut l.bias {
        for (v, &f) in b.iter_mut().zip(s) {
            *v /= f;
        }
    }
}

fn spread(absmax: &[f32]) -> f32 {
    let mean = absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64;
    let max = absmax.iter().copied().fold(0f32, f32::max);
    if mean > 0.0 {
        (max as f64 / mean) as f32
    } else {
        1.0
    }
}

fn report(
    stats: &ChannelStats,
    scales: Vec<f32>,
    shift: Option<Vec<f32>>,
    norm_bias_added: bool,
    biases_added: Vec<usize>,
) -> SmoothReport {
    let after = stats.smoothed(shift.as_deref(), &scales);
    SmoothReport {
        spread_before: spread(&stats.absmax()),
        spread_after: spread(&after.absmax()),
        scales,
        shift,
        norm_bias_added,
        biases_added,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::Rng;
    use ndarray::{s, Array2, ArrayView2};

    fn linear(rng: &mut Rng, out: usize, inp: usize, bias: bool) -> Linear {
        Linear {
            weight: rng.normal_matrix(out, inp, 0.2),
            bias: bias.then(|| Array1::from_shape_fn(out, |_| rng.normal() * 0.1)),
        }
    }

    fn apply(l: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        let mut y = x.dot(&l.weight.t());
        if let Some(b) = &l.bias {
            y += b;
        }
        y
    }

    /// RMSNorm (`layer_norm = false`) or LayerNorm, with weight `g` and optional bias.
    fn norm(x: &Array2<f32>, g: &Array1<f32>, b: &Option<Array1<f32>>, layer_norm: bool) -> Array2<f32> {
        let mut y = x.clone();
        for mut row in y.rows_mut() {
            let n = row.len() as f32;
            let mean = if layer_norm { row.sum() / n } else { 0.0 };
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + 1e-6).sqrt();
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - mean) * inv * g[j] + b.as_ref().map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    /// Hidden states whose norm output has outlier channels: norm weights with a few huge entries,
    /// and (for the shift) a few channels with a large mean.
    fn outlier_setup(rng: &mut Rng, tokens: usize, hidden: usize) -> (Array2<f32>, Array1<f32>) {
        let x = Array2::from_shape_fn((tokens, hidden), |(_, j)| rng.normal() + if j % 7 == 3 { 4.0 } else { 0.0 });
        let g = Array1::from_shape_fn(hidden, |j| if j == 5 || j == 17 { 40.0 } else { 1.0 + 0.1 * rng.normal() });
        (x, g)
    }

    fn max_rel_diff(a: &Array2<f32>, b: &Array2<f32>) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        a.iter().zip(b.iter()).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
    }

    fn channel_absmax(y: &Array2<f32>) -> Vec<f32> {
        let mut st = ChannelStats::new(y.ncols());
        st.update(y.view());
        st.absmax()
    }

    fn check_norm_linears(cfg: SmoothConfig, layer_norm: bool, norm_has_bias: bool, linear_bias: bool) {
        let mut rng = Rng::new(21);
        let (tokens, hidden) = (64, 24);
        let (x, mut g) = outlier_setup(&mut rng, tokens, hidden);
        let mut b = norm_has_bias.then(|| Array1::from_shape_fn(hidden, |_| rng.normal()));
        let mut ls: Vec<Linear> = (0..3).map(|i| linear(&mut rng, 8 + 4 * i, hidden, linear_bias && i != 1)).collect();
        let y0 = norm(&x, &g, &b, layer_norm);
        let before: Vec<Array2<f32>> = ls.iter().map(|l| apply(l, y0.view())).collect();
        let mut st = ChannelStats::new(hidden);
        st.update(y0.view());

        let mut refs: Vec<&mut Linear> = ls.iter_mut().collect();
        let rep = smooth_norm_linears(&mut g, &mut b, &mut refs, &st, &cfg).unwrap();

        let y1 = norm(&x, &g, &b, layer_norm);
        for (l, want) in ls.iter().zip(&before) {
            let got = apply(l, y1.view());
            assert!(max_rel_diff(&got, want) < 1e-5, "{cfg:?}: {}", max_rel_diff(&got, want));
        }
        // The smoothed activations are what the report says they are…
        let z = rep.shift.clone().unwrap_or_else(|| vec![0.0; hidden]);
        for t in 0..tokens {
            for j in 0..hidden {
                let want = (y0[(t, j)] - z[j]) / rep.scales[j];
                assert!((y1[(t, j)] - want).abs() <= 1e-4 * want.abs().max(1.0));
            }
        }
        // …and their per-channel ranges are flatter.
        let (a0, a1) = (channel_absmax(&y0), channel_absmax(&y1));
        assert!(spread(&a1) < 0.5 * spread(&a0), "spread {} -> {}", spread(&a0), spread(&a1));
        assert!((rep.spread_after - spread(&a1)).abs() <= 1e-3 * spread(&a1));
        assert_eq!(rep.norm_bias_added, cfg.shift && !norm_has_bias);
        assert_eq!(b.is_some(), cfg.shift || norm_has_bias);
        let expect_added: Vec<usize> =
            if cfg.shift { (0..3).filter(|&i| !(linear_bias && i != 1)).collect() } else { vec![] };
        assert_eq!(rep.biases_added, expect_added);
    }

    #[test]
    fn norm_linear_smoothing_preserves_the_function() {
        for cfg in [SmoothConfig::smooth_quant(0.5), SmoothConfig::smooth_quant(0.8), SmoothConfig::iter_smooth(true)] {
            check_norm_linears(cfg, false, false, false);
        }
        // m2 / asymmetric iter_smooth on RMSNorm (a bias appears) and on LayerNorm with biases.
        for cfg in [SmoothConfig::m2(0.5), SmoothConfig::iter_smooth(false)] {
            check_norm_linears(cfg, false, false, false);
            check_norm_linears(cfg, false, false, true);
            check_norm_linears(cfg, true, true, true);
        }
    }

    #[test]
    fn scales_follow_the_smoothquant_formula() {
        let cfg = SmoothConfig::smooth_quant(0.5);
        let s = smooth_scales(&[16.0, 1.0, 0.0, 1e-12], &[4.0, 0.0, 1.0, 1.0], &cfg).unwrap();
        assert!((s[0] - 2.0).abs() < 1e-6); // √16 / √4
        assert!((s[1] - 1.0 / 1e-5f32.sqrt()).abs() < 1e-2 * s[1]); // weight clamped at 1e-5
        assert_eq!(s[2], 1.0); // silent channel left alone
        assert_eq!(s[3], 1e-5); // scale_min
        assert!(smooth_scales(&[1.0], &[1.0], &SmoothConfig::smooth_quant(1.5)).is_err());
        assert!(smooth_scales(&[f32::NAN], &[1.0], &cfg).is_err());
    }

    fn silu(v: f32) -> f32 {
        v / (1.0 + (-v).exp())
    }

    #[test]
    fn up_down_smoothing_preserves_the_mlp() {
        let mut rng = Rng::new(22);
        let (tokens, hidden, inter) = (48, 16, 40);
        let x = rng.normal_matrix(tokens, hidden, 1.0);
        let gate = linear(&mut rng, inter, hidden, false);
        let mut up = linear(&mut rng, inter, hidden, true);
        // Plant outlier channels in the intermediate activations.
        for j in [3, 17, 30] {
            up.weight.row_mut(j).mapv_inplace(|w| w * 30.0);
        }
        let mut down = linear(&mut rng, hidden, inter, true);
        let mlp = |up: &Linear, down: &Linear| {
            let g = apply(&gate, x.view()).mapv(silu);
            let h = g * apply(up, x.view());
            (apply(down, h.view()), h)
        };
        let (y0, h0) = mlp(&up, &down);
        let mut st = ChannelStats::new(inter);
        st.update(h0.view());
        let rep = smooth_linear_linear(&mut up, &mut down, &st, &SmoothConfig::iter_smooth(true)).unwrap();
        let (y1, h1) = mlp(&up, &down);
        assert!(max_rel_diff(&y1, &y0) < 1e-5, "{}", max_rel_diff(&y1, &y0));
        assert!(spread(&channel_absmax(&h1)) < 0.5 * spread(&channel_absmax(&h0)));
        assert!(rep.shift.is_none());
    }

    /// Attention with explicit per-query-head probabilities: out[t, h·d+i] = Σ_s p_h[t,s] v[s, g(h)·d+i].
    fn attention_out(p: &[Array2<f32>], v: &Array2<f32>, heads: Heads, head_dim: usize) -> Array2<f32> {
        let ratio = heads.num_heads / heads.num_kv_heads;
        let mut out = Array2::zeros((v.nrows(), heads.num_heads * head_dim));
        for (h, ph) in p.iter().enumerate() {
            let g = h / ratio;
            let vg = v.slice(s![.., g * head_dim..(g + 1) * head_dim]);
            out.slice_mut(s![.., h * head_dim..(h + 1) * head_dim]).assign(&ph.dot(&vg));
        }
        out
    }

    #[test]
    fn ov_smoothing_preserves_grouped_query_attention() {
        for (num_heads, num_kv_heads) in [(4, 2), (6, 2), (4, 4), (4, 1)] {
            let heads = Heads { num_heads, num_kv_heads };
            let mut rng = Rng::new(23 + num_heads as u64 * 10 + num_kv_heads as u64);
            let (tokens, hidden, head_dim) = (20, 24, 4);
            let x = rng.normal_matrix(tokens, hidden, 1.0);
            let mut v = linear(&mut rng, num_kv_heads * head_dim, hidden, true);
            v.weight.row_mut(1).mapv_inplace(|w| w * 25.0); // an outlier channel in kv head 0
            let mut o = linear(&mut rng, hidden, num_heads * head_dim, true);
            // Causal softmax probabilities, different for every query head.
            let p: Vec<Array2<f32>> = (0..num_heads)
                .map(|_| {
                    let mut m =
                        Array2::from_shape_fn((tokens, tokens), |(t, s)| if s <= t { rng.normal().exp() } else { 0.0 });
                    for mut row in m.rows_mut() {
                        let sum = row.sum();
                        row /= sum;
                    }
                    m
                })
                .collect();
            let run = |v: &Linear, o: &Linear| {
                let a = attention_out(&p, &apply(v, x.view()), heads, head_dim);
                (apply(o, a.view()), a)
            };
            let (y0, a0) = run(&v, &o);
            let mut st = ChannelStats::new(num_heads * head_dim);
            st.update(a0.view());
            let rep = smooth_ov(&mut v, &mut o, &st, heads, &SmoothConfig::iter_smooth(true)).unwrap();
            let (y1, a1) = run(&v, &o);
            assert!(max_rel_diff(&y1, &y0) < 1e-5, "{heads:?}: {}", max_rel_diff(&y1, &y0));
            for t in 0..tokens {
                for c in 0..num_heads * head_dim {
                    let want = a0[(t, c)] / rep.scales[c];
                    assert!((a1[(t, c)] - want).abs() <= 1e-4 * want.abs().max(1e-2));
                }
            }
            assert!(spread(&channel_absmax(&a1)) < spread(&channel_absmax(&a0)));
        }
    }

    #[test]
    fn shapes_and_empty_statistics_are_refused() {
        let mut rng = Rng::new(24);
        let mut v = linear(&mut rng, 8, 16, false);
        let mut o = linear(&mut rng, 16, 16, false);
        let mut st = ChannelStats::new(16);
        let cfg = SmoothConfig::smooth_quant(0.5);
        let heads = Heads { num_heads: 4, num_kv_heads: 2 };
        assert!(smooth_ov(&mut v, &mut o, &st, heads, &cfg).unwrap_err().to_string().contains("no calibration tokens"));
        st.update(rng.normal_matrix(4, 16, 1.0).view());
        let bad = Heads { num_heads: 4, num_kv_heads: 3 };
        assert!(smooth_ov(&mut v, &mut o, &st, bad, &cfg).is_err());
        let wrong = Heads { num_heads: 4, num_kv_heads: 4 };
        assert!(smooth_ov(&mut v, &mut o, &st, wrong, &cfg).unwrap_err().to_string().contains("v_proj writes 8"));
        let mut g = Array1::ones(12);
        let mut l = linear(&mut rng, 4, 16, false);
        assert!(smooth_norm_linears(&mut g, &mut None, &mut [&mut l], &st, &cfg).is_err());
    }
}
