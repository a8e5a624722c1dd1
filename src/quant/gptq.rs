//! GPTQ (Frantar et al. 2022): round a linear's weight column by column, pushing each column's
//! rounding error onto the columns not yet rounded so that the layer's output on the calibration
//! inputs, `X Wᵀ`, moves as little as possible. The second-order information is the Hessian of
//! that output error, `H = 2/n Σ xᵀx` (`observer::Hessian::matrix`).
//!
//! As in the reference implementations (AutoGPTQ, llm-compressor, msModelSlim):
//! - dead inputs (`H_jj = 0`, a channel that was always zero) get `H_jj = 1` and a zero weight
//!   column;
//! - damping: `H += 1% · mean(diag H) · I`;
//! - `U` = the upper Cholesky factor of `H⁻¹`; column `i`'s error `(w_i - q_i) / U_ii` is pushed
//!   onto the following columns with row `i` of `U`, lazily: inside a block of 128 columns at
//!   once, onto the rest of the matrix with one product per block;
//! - scales are min-max (symmetric, or asymmetric with a zero point, [`rtn::asymmetric_grid`]):
//!   per output channel from the original weight, or per group computed from the updated weights
//!   when the sweep reaches the group's first column (so error pushed into a group is reflected in
//!   its scale). Blocks are aligned to groups (a multiple of the group length, or one group when
//!   groups are longer than a block), so at that moment every earlier column's error has reached
//!   the whole group, exactly as in the unblocked algorithm;
//! - act-order (`desc_act`): the columns are swept in decreasing order of `H_jj`, so the inputs
//!   with the most energy are rounded first and the rest absorb their error. The group scales are
//!   then fixed before the sweep from the original weight's contiguous groups (AutoGPTQ's
//!   `static_groups`, llm-compressor's `actorder: weight`): the output keeps the ordinary per-group
//!   layout, with no group index (`g_idx`) for a loader to honour;
//! - W8A8S rows use their lowbit scale ([`rtn::lowbit_scale`]), fixed before the sweep.
//!
//! `U` is computed without forming `H⁻¹`: with `J` the index reversal, if `J H J = L Lᵀ` then
//! `H = R Rᵀ` with `R = J L J` upper triangular, and `H⁻¹ = R⁻ᵀ R⁻¹`, so `U = R⁻¹ = J L⁻¹ J`
//! (one Cholesky factorisation and one triangular inverse).

use super::rtn::{self, symmetric_scale, QuantizedWeight};
use super::spec::QuantSpec;
use crate::device::Device;
use anyhow::{bail, ensure, Result};
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::{Mat, Par};
use ndarray::{s, Array2, ArrayView2};
use rayon::prelude::*;

/// GPTQ's knobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Columns per lazy-update block.
    pub block_size: usize,
    /// Damping as a fraction of the mean Hessian diagonal.
    pub damp_percent: f32,
}

impl Default for GptqConfig {
    fn default() -> GptqConfig {
        GptqConfig { block_size: 128, damp_percent: 0.01 }
    }
}

/// What happened while quantizing one linear.
#[derive(Debug, Clone, PartialEq)]
pub struct GptqReport {
    /// Input channels with a zero Hessian diagonal (their weights were zeroed).
    pub dead_columns: usize,
    /// The damping fraction finally used (raised ×10 up to three times if the factorisation fails).
    pub damp_percent: f32,
    /// The factorisation failed even then and the weight was rounded to nearest instead.
    pub fell_back_to_rtn: bool,
    /// GPTQ's proxy loss `Σ (w - ŵ)² / U_ii² / 2`, the estimated increase of the output error.
    pub loss: f64,
}

/// The part of GPTQ that depends only on the input: dead channels and the upper Cholesky factor
/// of the damped inverse Hessian. Linears that read the same input (q/k/v; gate/up; every MoE
/// expert's gate/up, which all see every token during calibration) share one.
#[derive(Debug, Clone)]
pub struct HessianFactor {
    n: usize,
    dead: Vec<bool>,
    damp_percent: f32,
    /// The sweep order: step `i` rounds input column `order[i]` (activation order), or `None`
    /// for the natural order.
    order: Option<Vec<usize>>,
    /// Row-major `n × n`, of the Hessian permuted into the sweep order; `None` when even the most
    /// damped factorisation failed.
    u: Option<Vec<f32>>,
}

impl HessianFactor {
    /// Factors `hessian [in, in]` (`observer::Hessian::matrix`) for the natural column order.
    pub fn new(hessian: ArrayView2<f32>, cfg: &GptqConfig) -> Result<HessianFactor> {
        HessianFactor::with_order(hessian, cfg, false)
    }

    /// Factors `hessian` for the sweep order GPTQ will use: decreasing `H_jj` when `act_order`
    /// (ties keep their column order; dead columns come last), else the natural order.
    pub fn with_order(hessian: ArrayView2<f32>, cfg: &GptqConfig, act_order: bool) -> Result<HessianFactor> {
        let n = hessian.nrows();
        ensure!(hessian.ncols() == n, "the Hessian is not square ({:?})", hessian.dim());
        ensure!(cfg.damp_percent > 0.0, "GPTQ damping must be positive (the Hessian is often singular)");
        if let Some(v) = hessian.iter().find(|v| !v.is_finite()) {
            bail!("the Hessian holds a non-finite value ({v}): the calibration activations overflowed");
        }
        let mut h: Vec<f32> = hessian.iter().copied().collect();
        let mut dead = vec![false; n];
        for (j, d) in dead.iter_mut().enumerate() {
            if h[j * n + j] == 0.0 {
                *d = true;
                h[j * n + j] = 1.0;
            }
        }
        let mean_diag = (0..n).map(|j| h[j * n + j] as f64).sum::<f64>() / n.max(1) as f64;
        let order = act_order.then(|| {
            let key = |j: usize| if dead[j] { f32::NEG_INFINITY } else { h[j * n + j] };
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
            order
        });
        if let Some(p) = &order {
            let mut permuted = vec![0f32; n * n];
            for (i, &pi) in p.iter().enumerate() {
                for (j, &pj) in p.iter().enumerate() {
                    permuted[i * n + j] = h[pi * n + pj];
                }
            }
            h = permuted;
        }
        let mut damp_percent = cfg.damp_percent;
        for attempt in 0..4 {
            if attempt > 0 {
                damp_percent *= 10.0;
            }
            let damp = (damp_percent as f64 * mean_diag) as f32;
            if let Some(u) = inverse_upper_cholesky(&h, n, damp) {
                return Ok(HessianFactor { n, dead, damp_percent, order, u: Some(u) });
            }
        }
        Ok(HessianFactor { n, dead, damp_percent, order, u: None })
    }

    /// Whether this factor sweeps in activation order.
    pub fn act_order(&self) -> bool {
        self.order.is_some()
    }

    pub fn channels(&self) -> usize {
        self.n
    }
}

/// Quantizes `weight [out, in]` with GPTQ, given `hessian [in, in]` of its input: int8 / int4,
/// symmetric or asymmetric, per output channel or per group, in natural or activation order as
/// `spec` says; the result is the same [`QuantizedWeight`] the round-to-nearest path produces.
pub fn quantize(
    device: &dyn Device,
    weight: ArrayView2<f32>,
    hessian: ArrayView2<f32>,
    spec: &QuantSpec,
    cfg: &GptqConfig,
) -> Result<(QuantizedWeight, GptqReport)> {
    quantize_with(device, weight, &HessianFactor::with_order(hessian, cfg, spec.act_order)?, spec, cfg)
}

/// [`quantize`] with a factor already computed for this input (in the order `spec` asks for).
pub fn quantize_with(
    device: &dyn Device,
    weight: ArrayView2<f32>,
    factor: &HessianFactor,
    spec: &QuantSpec,
    cfg: &GptqConfig,
) -> Result<(QuantizedWeight, GptqReport)> {
    let (rows, cols) = weight.dim();
    ensure!(factor.n == cols, "the Hessian has {} channels, the weight {cols} input channels", factor.n);
    ensure!(
        factor.act_order() == spec.act_order,
        "the Hessian was factored for {} order, the spec asks for the other",
        if factor.act_order() { "activation" } else { "natural" }
    );
    ensure!(cfg.block_size > 0, "GPTQ block size must be positive");
    if let Some(v) = weight.iter().find(|v| !v.is_finite()) {
        bail!("the weight holds a non-finite value ({v})");
    }
    let (qmin, qmax) = spec.q_range();
    let group = spec.group_len(cols);
    let groups = cols.div_ceil(group);
    let dead_columns = factor.dead.iter().filter(|&&d| d).count();
    let original: Vec<f32> = weight.iter().copied().collect();
    let Some(u) = &factor.u else {
        let q = rtn::quantize(&original, rows, cols, spec);
        let report =
            GptqReport { dead_columns, damp_percent: factor.damp_percent, fell_back_to_rtn: true, loss: f64::NAN };
        return Ok((q, report));
    };

    // Grids fixed before the sweep (per channel, activation order, W8A8S), else found per group as
    // the sweep reaches it.
    let fixed = groups == 1 || spec.act_order || spec.lowbit.is_some();
    let (mut scale, mut zero) = if fixed {
        rtn::grids(&original, rows, cols, spec)
    } else {
        (vec![0f32; rows * groups], vec![0f32; rows * groups])
    };
    // The working copy, its columns in sweep order, dead columns zeroed.
    let order: Vec<usize> = factor.order.clone().unwrap_or_else(|| (0..cols).collect());
    let mut w = vec![0f32; rows * cols];
    for r in 0..rows {
        for (i, &c) in order.iter().enumerate() {
            w[r * cols + i] = if factor.dead[c] { 0.0 } else { original[r * cols + c] };
        }
    }

    let block = match groups {
        _ if fixed => cfg.block_size,
        _ if group <= cfg.block_size => cfg.block_size / group * group,
        _ => group,
    };
    let mut q = vec![0i8; rows * cols];
    let mut loss = 0f64;
    let u_view = ArrayView2::from_shape((cols, cols), &u[..]).expect("U is cols × cols");
    for i1 in (0..cols).step_by(block) {
        let i2 = (i1 + block).min(cols);
        let width = i2 - i1;
        let mut err = vec![0f32; rows * width];
        // Inside the block every output row is independent.
        loss += w
            .par_chunks_mut(cols)
            .zip(q.par_chunks_mut(cols))
            .zip(scale.par_chunks_mut(groups))
            .zip(zero.par_chunks_mut(groups))
            .zip(err.par_chunks_mut(width))
            .map(|((((wr, qr), sr), zr), er)| {
                let mut row_loss = 0f64;
                for i in i1..i2 {
                    let c = order[i];
                    if !fixed && i % group == 0 {
                        let g = &wr[i..(i + group).min(cols)];
                        (sr[i / group], zr[i / group]) = if spec.weight_symmetric {
                            (symmetric_scale(g, qmax), 0.0)
                        } else {
                            rtn::asymmetric_grid(g, qmin, qmax)
                        };
                    }
                    let (s, z) = (sr[c / group], zr[c / group]);
                    let qi = rtn::quantize_affine(wr[i], s, z, qmin, qmax);
                    qr[c] = qi;
                    let d = u[i * cols + i];
                    let e = (wr[i] - (qi as f32 - z) * s) / d;
                    row_loss += (e as f64) * (e as f64) / 2.0;
                    er[i - i1] = e;
                    let urow = &u[i * cols + i + 1..i * cols + i2];
                    for (wj, &uij) in wr[i + 1..i2].iter_mut().zip(urow) {
                        *wj -= e * uij;
                    }
                }
                row_loss
            })
            .sum::<f64>();
        if i2 < cols {
            let e = ArrayView2::from_shape((rows, width), &err).expect("block errors are rows × width");
            let update: Array2<f32> = device.matmul(e, u_view.slice(s![i1..i2, i2..]));
            let update = update.as_standard_layout();
            let update = update.as_slice().expect("standard layout");
            w.par_chunks_mut(cols).zip(update.par_chunks(cols - i2)).for_each(|(wr, ur)| {
                for (wj, &d) in wr[i2..].iter_mut().zip(ur) {
                    *wj -= d;
                }
            });
        }
    }
    let report = GptqReport { dead_columns, damp_percent: factor.damp_percent, fell_back_to_rtn: false, loss };
    let offset = (!spec.weight_symmetric).then_some(zero);
    Ok((QuantizedWeight { rows, cols, group, q, scale, offset }, report))
}

/// The upper Cholesky factor `U` of `(H + damp·I)⁻¹` (`H` row-major `n × n`, symmetric),
/// row-major, or `None` when `H + damp·I` is not positive definite in f32.
fn inverse_upper_cholesky(h: &[f32], n: usize, damp: f32) -> Option<Vec<f32>> {
    let par = Par::rayon(0);
    let l_inv = {
        // J (H + damp I) J, lower Cholesky in place.
        let mut a = Mat::<f32>::from_fn(n, n, |i, j| {
            let v = h[(n - 1 - i) * n + (n - 1 - j)];
            if i == j {
                v + damp
            } else {
                v
            }
        });
        let mut buf = MemBuffer::new(cholesky_in_place_scratch::<f32>(n, par, Default::default()));
        cholesky_in_place(a.as_mut(), Default::default(), par, MemStack::new(&mut buf), Default::default()).ok()?;
        let mut l_inv = Mat::<f32>::zeros(n, n);
        faer::linalg::triangular_inverse::invert_lower_triangular(l_inv.as_mut(), a.as_ref(), par);
        crate::device::after_simd_kernels(par);
        l_inv
    };
    let mut u = vec![0f32; n * n];
    for i in 0..n {
        for j in i..n {
            u[i * n + j] = l_inv[(n - 1 - i, n - 1 - j)];
        }
    }
    u.iter().all(|v| v.is_finite()).then_some(u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use crate::quant::observer::Hessian;
    use crate::quant::testutil::Rng;

    fn spec(name: &str) -> QuantSpec {
        QuantSpec::preset(name).unwrap()
    }

    /// Activations with strongly correlated channels: x = z·M for a random mixing M.
    fn correlated_inputs(rng: &mut Rng, tokens: usize, cols: usize) -> Array2<f32> {
        let z = rng.normal_matrix(tokens, cols / 4, 1.0);
        let m = rng.normal_matrix(cols / 4, cols, 1.0);
        let noise = rng.normal_matrix(tokens, cols, 0.05);
        z.dot(&m) + noise
    }

    fn output_error(x: &Array2<f32>, w: &Array2<f32>, qw: &QuantizedWeight) -> f64 {
        let wq = Array2::from_shape_vec((qw.rows, qw.cols), qw.dequantize()).unwrap();
        let d = x.dot(&(w - &wq).t());
        d.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
    }

    #[test]
    fn diagonal_hessian_gives_exactly_round_to_nearest() {
        // H diagonal ⇒ H⁻¹ and its Cholesky factor are diagonal ⇒ no error is propagated, and the
        // scales (original rows, or untouched groups) are RTN's.
        let mut rng = Rng::new(31);
        let (rows, cols) = (24, 300);
        let w = rng.normal_matrix(rows, cols, 0.05);
        let diag = Array2::from_shape_fn((cols, cols), |(i, j)| if i == j { 0.5 + rng.uniform() as f32 } else { 0.0 });
        for name in ["w8a16", "w4a16", "w4a8_dynamic"] {
            let cfg = GptqConfig { block_size: 64, ..Default::default() };
            let (qw, rep) = quantize(&Cpu, w.view(), diag.view(), &spec(name), &cfg).unwrap();
            let rtn = rtn::quantize(w.as_slice().unwrap(), rows, cols, &spec(name));
            assert_eq!(qw, rtn, "{name}");
            assert!(!rep.fell_back_to_rtn && rep.dead_columns == 0);
        }
    }

    /// GPTQ as first written (optimal brain surgeon with a fixed order), in f64 with an explicit
    /// inverse: quantize column i, move the other columns by -(w_i - q_i)/[H⁻¹]_ii · [H⁻¹]_i,: and
    /// remove i from the inverse by one Gaussian elimination step. No Cholesky, no blocks.
    /// A group's grid written out from the definitions: symmetric `max|w| / qmax`, or asymmetric
    /// over `[min(w, 0), max(w, 0)]` with 16 / 256 levels and an integer zero point.
    fn textbook_grid(g: &[f64], sp: &QuantSpec) -> (f64, f64) {
        let qmax = sp.qmax() as f64;
        if sp.weight_symmetric {
            let m = g.iter().fold(0f64, |m, v| m.max(v.abs()));
            return (if m > 0.0 { m / qmax } else { 1.0 }, 0.0);
        }
        let qmin = -qmax - 1.0;
        let lo = g.iter().fold(0f64, |m, &v| m.min(v));
        let hi = g.iter().fold(0f64, |m, &v| m.max(v));
        if hi <= lo {
            return (1.0, 0.0);
        }
        let s = (hi - lo) / (qmax - qmin);
        (s, (qmin - lo / s).round_ties_even().clamp(qmin, qmax))
    }

    /// GPTQ as first written (optimal brain surgeon with a fixed order), in f64 with an explicit
    /// inverse: quantize column i, move the other columns by -(w_i - q_i)/[H⁻¹]_ii · [H⁻¹]_i,: and
    /// remove i from the inverse by one Gaussian elimination step. No Cholesky, no blocks. With
    /// `act_order`, the columns go in decreasing order of `H_jj` and every group's grid is taken
    /// from the original weight first.
    fn textbook_obs(w: &Array2<f32>, h: &Array2<f32>, damp_percent: f64, sp: &QuantSpec) -> Vec<i8> {
        let (rows, n) = w.dim();
        let group = sp.group_len(n);
        let mut order: Vec<usize> = (0..n).collect();
        if sp.act_order {
            order.sort_by(|&a, &b| h[(b, b)].total_cmp(&h[(a, a)]).then(a.cmp(&b)));
        }
        let mean = (0..n).map(|i| h[(i, i)] as f64).sum::<f64>() / n as f64;
        let mut a: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| h[(order[i], order[j])] as f64 + if i == j { damp_percent * mean } else { 0.0 })
                    .collect()
            })
            .collect();
        // Gauss-Jordan inverse.
        let mut inv: Vec<Vec<f64>> = (0..n).map(|i| (0..n).map(|j| (i == j) as u8 as f64).collect()).collect();
        for c in 0..n {
            let p = a[c][c];
            for j in 0..n {
                a[c][j] /= p;
                inv[c][j] /= p;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r][c];
                    for j in 0..n {
                        a[r][j] -= f * a[c][j];
                        inv[r][j] -= f * inv[c][j];
                    }
                }
            }
        }
        let orig: Vec<Vec<f64>> = (0..rows).map(|r| (0..n).map(|c| w[(r, c)] as f64).collect()).collect();
        let mut w: Vec<Vec<f64>> = (0..rows).map(|r| order.iter().map(|&c| orig[r][c]).collect()).collect();
        let fixed = group == n || sp.act_order;
        // grids[r][g] by original group.
        let mut grids: Vec<Vec<(f64, f64)>> = (0..rows)
            .map(|r| orig[r].chunks(group).map(|g| if fixed { textbook_grid(g, sp) } else { (1.0, 0.0) }).collect())
            .collect();
        let (qmin, qmax) = sp.q_range();
        let mut q = vec![0i8; rows * n];
        for i in 0..n {
            let c = order[i];
            for r in 0..rows {
                if !fixed && i % group == 0 {
                    grids[r][i / group] = textbook_grid(&w[r][i..(i + group).min(n)], sp);
                }
                let (s, z) = grids[r][c / group];
                let qi = ((w[r][i] / s).round_ties_even() + z).clamp(qmin as f64, qmax as f64);
                q[r * n + c] = qi as i8;
                let e = (w[r][i] - (qi - z) * s) / inv[i][i];
                for j in i + 1..n {
                    w[r][j] -= e * inv[i][j];
                }
            }
            let pivot = inv[i][i];
            let row_i = inv[i].clone();
            for inv_r in inv.iter_mut() {
                let f = inv_r[i] / pivot;
                for (v, &p) in inv_r.iter_mut().zip(&row_i) {
                    *v -= f * p;
                }
            }
        }
        q
    }

    #[test]
    fn matches_the_textbook_algorithm() {
        let mut rng = Rng::new(32);
        let (rows, cols) = (10, 40);
        let x = correlated_inputs(&mut rng, 200, cols);
        let w = rng.normal_matrix(rows, cols, 0.1);
        let mut hs = Hessian::new(cols);
        hs.update(&Cpu, x.view());
        let h = hs.matrix();
        let cases = [
            ("w8a16", cols, true, false),
            ("w4a8_dynamic", cols, true, false),
            ("w4a16", 8, true, false),
            ("w4a16", 8, false, false),
            ("w4a16", 8, true, true),
            ("w4a16", 8, false, true),
            ("w8a16", cols, false, true),
        ];
        for (name, group, symmetric, act_order) in cases {
            let mut sp = spec(name);
            sp.group_size = (group < cols).then_some(group);
            sp.weight_symmetric = symmetric;
            sp.act_order = act_order;
            let name = format!("{name} g{group} symmetric={symmetric} act_order={act_order}");
            // Blocks smaller than the matrix and not aligned with the groups exercise the lazy updates.
            let cfg = GptqConfig { block_size: 12, damp_percent: 0.01 };
            let (qw, _) = quantize(&Cpu, w.view(), h.view(), &sp, &cfg).unwrap();
            assert_eq!(qw.offset.is_some(), !symmetric, "{name}");
            let want = textbook_obs(&w, &h, 0.01, &sp);
            let same = qw.q.iter().zip(&want).filter(|(a, b)| a == b).count();
            // f32 Cholesky against an f64 inverse: a tie may round the other way, rarely.
            assert!(same as f64 >= 0.99 * want.len() as f64, "{name}: {same} of {} agree", want.len());
        }
    }

    #[test]
    fn beats_round_to_nearest_on_correlated_inputs() {
        let mut rng = Rng::new(33);
        let (rows, cols) = (64, 256);
        let x = correlated_inputs(&mut rng, 1024, cols);
        let w = rng.normal_matrix(rows, cols, 0.05);
        let mut hs = Hessian::new(cols);
        hs.update(&Cpu, x.view());
        for name in ["w8a16", "w4a16", "w4a8_dynamic"] {
            let (qw, rep) = quantize(&Cpu, w.view(), hs.matrix().view(), &spec(name), &GptqConfig::default()).unwrap();
            let rtn = rtn::quantize(w.as_slice().unwrap(), rows, cols, &spec(name));
            let (e_gptq, e_rtn) = (output_error(&x, &w, &qw), output_error(&x, &w, &rtn));
            assert!(e_gptq < 0.7 * e_rtn, "{name}: GPTQ {e_gptq} vs RTN {e_rtn}");
            assert!(qw.q.iter().all(|&v| (v as i32).abs() <= spec(name).qmax()));
            assert!(rep.loss.is_finite() && !rep.fell_back_to_rtn);
        }
    }

    /// Per-channel int4 (W4A8_DYNAMIC) when one token per sequence carries a massive activation in
    /// one channel, as the first position does at SmolLM2-135M's `down_proj` of layer 11 (99.8% of
    /// that Hessian's trace, benches/ALGORITHMS.md). GPTQ does what its objective says, with the
    /// textbook's integers: the error summed over every token is below round-to-nearest's, and it
    /// is bought on the massive tokens, the ordinary tokens' error rising well above
    /// round-to-nearest's. This is why W4A8 GPTQ loses to RTN on that model: a property of the
    /// algorithm on such Hessians, not of this implementation.
    #[test]
    fn a_massive_token_dominates_the_objective_as_in_the_textbook() {
        let mut rng = Rng::new(35);
        let (rows, cols, tokens, seq) = (16, 64, 512, 64);
        let mut x = rng.normal_matrix(tokens, cols, 4.0);
        for t in (0..tokens).step_by(seq) {
            x[(t, 3)] = 3000.0;
        }
        let w = rng.normal_matrix(rows, cols, 0.1);
        let mut hs = Hessian::new(cols);
        hs.update(&Cpu, x.view());
        let h = hs.matrix();
        let sp = spec("w4a8_dynamic");
        let (qw, _) = quantize(&Cpu, w.view(), h.view(), &sp, &GptqConfig::default()).unwrap();
        // The same integers as the textbook algorithm (f64, explicit inverse), on the same grid.
        let want = textbook_obs(&w, &h, 0.01, &sp);
        let same = qw.q.iter().zip(&want).filter(|(a, b)| a == b).count();
        assert!(same as f64 >= 0.98 * want.len() as f64, "{same} of {} agree", want.len());
        for r in 0..rows {
            let row: Vec<f64> = w.row(r).iter().map(|&v| v as f64).collect();
            let (s, _) = textbook_grid(&row, &sp);
            assert!((qw.scale[r] as f64 - s).abs() <= 1e-6 * s, "row {r}: scale {} vs {s}", qw.scale[r]);
        }
        let rtn = rtn::quantize(w.as_slice().unwrap(), rows, cols, &sp);
        let ordinary_rows: Vec<usize> = (0..tokens).filter(|t| t % seq != 0).collect();
        let ordinary = x.select(ndarray::Axis(0), &ordinary_rows);
        let (all_gptq, all_rtn) = (output_error(&x, &w, &qw), output_error(&x, &w, &rtn));
        let (ord_gptq, ord_rtn) = (output_error(&ordinary, &w, &qw), output_error(&ordinary, &w, &rtn));
        assert!(all_gptq < all_rtn, "all tokens: GPTQ {all_gptq} vs RTN {all_rtn}");
        assert!(ord_gptq > 1.2 * ord_rtn, "ordinary tokens: GPTQ {ord_gptq} vs RTN {ord_rtn}");
    }

    #[test]
    fn dead_columns_are_zeroed_and_the_rest_still_works() {
        let mut rng = Rng::new(34);
        let (rows, cols) = (8, 64);
        let mut x = correlated_inputs(&mut rng, 256, cols);
        x.column_mut(5).fill(0.0);
        x.column_mut(40).fill(0.0);
        let w = rng.normal_matrix(rows, cols, 0.1);
        let mut hs = Hessian::new(cols);
        hs.update(&Cpu, x.view());
        let (qw, rep) = quantize(&Cpu, w.view(), hs.matrix().view(), &spec("w8a16"), &GptqConfig::default()).unwrap();
        assert_eq!(rep.dead_columns, 2);
        for r in 0..rows {
            assert_eq!((qw.q[r * cols + 5], qw.q[r * cols + 40]), (0, 0));
        }
        let rtn = rtn::quantize(w.as_slice().unwrap(), rows, cols, &spec("w8a16"));
        assert!(output_error(&x, &w, &qw) < output_error(&x, &w, &rtn));
    }

    #[test]
    fn bad_inputs_are_refused() {
        let w = Array2::<f32>::ones((2, 4));
        let h = Array2::<f32>::eye(4);
        assert!(quantize(&Cpu, w.view(), Array2::<f32>::eye(3).view(), &spec("w8a16"), &GptqConfig::default()).is_err());
        let mut bad = h.clone();
        bad[(1, 1)] = f32::NAN;
        assert!(quantize(&Cpu, w.view(), bad.view(), &spec("w8a16"), &GptqConfig::default()).is_err());
        // An indefinite "Hessian" (not from real data): damping retries, then round-to-nearest.
        let mut neg = Array2::<f32>::eye(4);
        neg[(0, 0)] = -1e6;
        let (q, rep) = quantize(&Cpu, w.view(), neg.view(), &spec("w8a16"), &GptqConfig::default()).unwrap();
        assert!(rep.fell_back_to_rtn);
        assert_eq!(q, rtn::quantize(w.as_slice().unwrap(), 2, 4, &spec("w8a16")));
    }
}
