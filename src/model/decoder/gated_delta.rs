//! Gated DeltaNet linear attention (Qwen3-Next's `linear_attn`), computed exactly by its
//! recurrence, one token at a time.
//!
//! ```text
//! x ─ in_proj_qkvz ─ q, k, v, z        x ─ in_proj_ba ─ b, a
//!     [q | k | v] ─ causal depthwise conv1d (kernel K, no bias) ─ silu ─ q, k, v
//!     q, k ─ L2 norm per head; q · dk^-½;  β = σ(b);  g = −exp(A_log) · softplus(a + dt_bias)
//!     per value head h, state S [dk, dv] from 0:
//!         S ← exp(g_t) · S;   S ← S + k_t ⊗ β_t (v_t − Sᵀk_t);   o_t = Sᵀ q_t
//!     o ─ RMSNorm over dv (weight, not zero-centred) · silu(z) ─ out_proj
//! ```
//!
//! - `in_proj_qkvz` is laid out per key head: for each of the `nk` key heads, its query
//!   (`dk`), its key (`dk`), then the values and gates (`z`) of the `nv / nk` value heads that
//!   share it (`dv` each). `in_proj_ba` likewise: per key head, the `nv / nk` b's then the a's.
//!   (transformers' `fix_query_key_value_ordering`; vLLM-Ascend splits the same way.)
//! - Value head `h` reads key head `h / (nv / nk)` (transformers' `repeat_interleave`).
//! - transformers computes the prefill with the chunked form of the same rule (chunks of 64,
//!   a triangular solve per chunk); both are the delta rule, equal up to rounding.
//! - A calibration forward needs no cache: every sample is one whole sequence, so the conv state
//!   is the zero left padding and the recurrent state starts at 0, as in transformers' prefill.

use super::parts::{project, Take};
use crate::device::Device;
use crate::model::config::LinearAttnConfig;
use crate::model::nn::{Linear, LinearHook};
use anyhow::{ensure, Result};
use ndarray::{Array1, Array2, ArrayView2};

/// One layer's Gated DeltaNet (`linear_attn.*`).
#[derive(Debug, Clone)]
pub struct GatedDeltaNet {
    pub in_proj_qkvz: Linear,
    pub in_proj_ba: Linear,
    /// `conv1d.weight` as `[channels, kernel]` (stored `[channels, 1, kernel]`).
    pub conv: Array2<f32>,
    /// `-exp(A_log)` per value head.
    pub neg_a: Array1<f32>,
    pub dt_bias: Array1<f32>,
    /// The gated RMSNorm's weight over one value head (`norm.weight`, `[dv]`).
    pub norm: Array1<f32>,
    pub out_proj: Linear,
    pub cfg: LinearAttnConfig,
    pub eps: f32,
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn softplus(x: f32) -> f32 {
    // torch.nn.functional.softplus (beta 1, threshold 20).
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// `x / sqrt(Σx² + eps)` (the FLA library's and transformers' `l2norm`, eps 1e-6).
fn l2_normalize(x: &mut [f32]) {
    let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() + 1e-6).sqrt();
    x.iter_mut().for_each(|v| *v *= inv);
}

impl GatedDeltaNet {
    /// Takes `linear_attn.*` from a layer's weights.
    pub fn take(w: &mut Take, hidden: usize, cfg: &LinearAttnConfig, eps: f32) -> Result<GatedDeltaNet> {
        let LinearAttnConfig { num_k_heads: nk, num_v_heads: nv, k_head_dim: dk, v_head_dim: dv, conv_kernel, .. } =
            *cfg;
        let channels = 2 * nk * dk + nv * dv;
        let conv = w.tensor("linear_attn.conv1d.weight")?;
        ensure!(
            conv.shape() == [channels, 1, conv_kernel],
            "tensor {}linear_attn.conv1d.weight has shape {:?}, expected [{channels}, 1, {conv_kernel}] from config.json",
            w.weights.prefix,
            conv.shape()
        );
        let conv = conv.into_shape_with_order((channels, conv_kernel))?;
        let a_log = w.vector("linear_attn.A_log", nv)?;
        Ok(GatedDeltaNet {
            in_proj_qkvz: w.linear("linear_attn.in_proj_qkvz", 2 * nk * dk + 2 * nv * dv, hidden)?,
            in_proj_ba: w.linear("linear_attn.in_proj_ba", 2 * nv, hidden)?,
            conv,
            neg_a: a_log.mapv(|v| -v.exp()),
            dt_bias: w.vector("linear_attn.dt_bias", nv)?,
            norm: w.vector("linear_attn.norm.weight", dv)?,
            out_proj: w.linear("linear_attn.out_proj", hidden, nv * dv)?,
            cfg: cfg.clone(),
            eps,
        })
    }

    pub fn forward(&self, device: &dyn Device, x: ArrayView2<f32>, hook: &mut dyn LinearHook) -> Result<Array2<f32>> {
        let LinearAttnConfig { num_k_heads: nk, num_v_heads: nv, k_head_dim: dk, v_head_dim: dv, conv_kernel, .. } =
            self.cfg;
        let (seq, per) = (x.nrows(), nv / nk);
        let qkvz = project(device, hook, "linear_attn.in_proj_qkvz", &self.in_proj_qkvz, x)?;
        let ba = project(device, hook, "linear_attn.in_proj_ba", &self.in_proj_ba, x)?;

        // Regroup per token into [q (nk·dk) | k (nk·dk) | v (nv·dv)] for the conv, and z, b, a.
        let channels = 2 * nk * dk + nv * dv;
        let mut mixed = Array2::<f32>::zeros((seq, channels));
        let mut z = Array2::<f32>::zeros((seq, nv * dv));
        let (mut b, mut a) = (Array2::<f32>::zeros((seq, nv)), Array2::<f32>::zeros((seq, nv)));
        let group = 2 * dk + 2 * per * dv;
        for t in 0..seq {
            let (row, m) = (qkvz.row(t), mixed.row_mut(t));
            let m = m.into_slice().expect("fresh arrays are contiguous");
            let row = row.as_slice().expect("projections are in standard layout");
            let zt = z.row_mut(t).into_slice().unwrap();
            for g in 0..nk {
                let src = &row[g * group..(g + 1) * group];
                m[g * dk..(g + 1) * dk].copy_from_slice(&src[..dk]);
                m[nk * dk + g * dk..nk * dk + (g + 1) * dk].copy_from_slice(&src[dk..2 * dk]);
                let vz = per * dv;
                m[2 * nk * dk + g * vz..2 * nk * dk + (g + 1) * vz].copy_from_slice(&src[2 * dk..2 * dk + vz]);
                zt[g * vz..(g + 1) * vz].copy_from_slice(&src[2 * dk + vz..]);
                for j in 0..per {
                    b[[t, g * per + j]] = ba[[t, g * 2 * per + j]];
                    a[[t, g * per + j]] = ba[[t, g * 2 * per + per + j]];
                }
            }
        }

        // Causal depthwise conv over time (zero left padding), then silu.
        let mut conv = Array2::<f32>::zeros((seq, channels));
        for t in 0..seq {
            for c in 0..channels {
                let mut acc = 0.0f32;
                for j in 0..conv_kernel {
                    // Tap j reads token t − (K − 1) + j.
                    if let Some(s) = (t + j).checked_sub(conv_kernel - 1) {
                        acc += self.conv[[c, j]] * mixed[[s, c]];
                    }
                }
                conv[[t, c]] = silu(acc);
            }
        }

        // The delta rule, per value head.
        let scale = (dk as f32).powf(-0.5);
        let mut out = Array2::<f32>::zeros((seq, nv * dv));
        let mut state = vec![0.0f32; dk * dv];
        let (mut q, mut k) = (vec![0.0f32; dk], vec![0.0f32; dk]);
        let mut delta = vec![0.0f32; dv];
        for h in 0..nv {
            let kh = h / per;
            state.fill(0.0);
            for t in 0..seq {
                let row = conv.row(t);
                let row = row.as_slice().unwrap();
                q.copy_from_slice(&row[kh * dk..(kh + 1) * dk]);
                k.copy_from_slice(&row[nk * dk + kh * dk..nk * dk + (kh + 1) * dk]);
                let v = &row[2 * nk * dk + h * dv..2 * nk * dk + (h + 1) * dv];
                l2_normalize(&mut q);
                l2_normalize(&mut k);
                q.iter_mut().for_each(|x| *x *= scale);
                let beta = 1.0 / (1.0 + (-b[[t, h]]).exp());
                let decay = (self.neg_a[h] * softplus(a[[t, h]] + self.dt_bias[h])).exp();
                state.iter_mut().for_each(|s| *s *= decay);
                // delta = β (v − Sᵀk)
                delta.copy_from_slice(v);
                for (i, &ki) in k.iter().enumerate() {
                    for (d, s) in delta.iter_mut().zip(&state[i * dv..(i + 1) * dv]) {
                        *d -= ki * s;
                    }
                }
                delta.iter_mut().for_each(|d| *d *= beta);
                // S += k ⊗ delta;  o = Sᵀ q
                let o = &mut out.row_mut(t).into_slice().unwrap()[h * dv..(h + 1) * dv];
                for i in 0..dk {
                    let srow = &mut state[i * dv..(i + 1) * dv];
                    for ((s, &d), o) in srow.iter_mut().zip(&delta).zip(o.iter_mut()) {
                        *s += k[i] * d;
                        *o += q[i] * *s;
                    }
                }
            }
        }

        // Gated RMSNorm per (token, value head): norm(o) · weight · silu(z).
        for t in 0..seq {
            let o = out.row_mut(t).into_slice().unwrap();
            let zt = z.row(t);
            let zt = zt.as_slice().unwrap();
            for h in 0..nv {
                let head = &mut o[h * dv..(h + 1) * dv];
                let mean = head.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / dv as f64;
                let inv = 1.0 / (mean as f32 + self.eps).sqrt();
                for ((v, w), &g) in head.iter_mut().zip(&self.norm).zip(&zt[h * dv..(h + 1) * dv]) {
                    *v = w * (*v * inv) * silu(g);
                }
            }
        }
        project(device, hook, "linear_attn.out_proj", &self.out_proj, out.view())
    }
}

#[cfg(test)]
mod tests {
    /// The chunked form transformers runs (`torch_chunk_gated_delta_rule`: within a chunk,
    /// a unit-lower-triangular solve; across chunks, the state) written out for one head with
    /// chunks of 2, against the token-by-token recurrence above, on random inputs.
    #[test]
    fn recurrence_equals_the_chunked_form() {
        let (seq, dk, dv, chunk) = (6usize, 3usize, 2usize, 2usize);
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let q: Vec<Vec<f32>> = (0..seq).map(|_| (0..dk).map(|_| rnd()).collect()).collect();
        let k: Vec<Vec<f32>> = (0..seq).map(|_| (0..dk).map(|_| rnd()).collect()).collect();
        let v: Vec<Vec<f32>> = (0..seq).map(|_| (0..dv).map(|_| rnd()).collect()).collect();
        let beta: Vec<f32> = (0..seq).map(|_| 0.5 + rnd()).collect();
        let g: Vec<f32> = (0..seq).map(|_| -0.3 + 0.2 * rnd()).collect();
        // Recurrent.
        let mut s = vec![vec![0.0f32; dv]; dk];
        let mut rec = vec![vec![0.0f32; dv]; seq];
        for t in 0..seq {
            for row in s.iter_mut() {
                row.iter_mut().for_each(|x| *x *= g[t].exp());
            }
            let mut d: Vec<f32> = (0..dv).map(|j| v[t][j] - (0..dk).map(|i| s[i][j] * k[t][i]).sum::<f32>()).collect();
            d.iter_mut().for_each(|x| *x *= beta[t]);
            for i in 0..dk {
                for j in 0..dv {
                    s[i][j] += k[t][i] * d[j];
                }
            }
            rec[t] = (0..dv).map(|j| (0..dk).map(|i| s[i][j] * q[t][i]).sum()).collect();
        }
        // Chunked (WY / UT transform), as transformers' torch_chunk_gated_delta_rule.
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let mut state = vec![vec![0.0f32; dv]; dk];
        let mut chunked = vec![vec![0.0f32; dv]; seq];
        for c0 in (0..seq).step_by(chunk) {
            let idx: Vec<usize> = (c0..c0 + chunk).collect();
            let mut cum = vec![0.0f32; chunk];
            let mut acc = 0.0;
            for (p, &t) in idx.iter().enumerate() {
                acc += g[t];
                cum[p] = acc;
            }
            let decay = |i: usize, j: usize| if j <= i { (cum[i] - cum[j]).exp() } else { 0.0 };
            // T = (I + strictly-lower(diag(β) K Kᵀ ⊙ decay))⁻¹ applied by forward substitution.
            let solve = |rhs: Vec<Vec<f32>>| -> Vec<Vec<f32>> {
                let mut x = rhs;
                for i in 0..chunk {
                    for j in 0..i {
                        let a = beta[idx[i]] * dot(&k[idx[i]], &k[idx[j]]) * decay(i, j);
                        let xj = x[j].clone();
                        x[i].iter_mut().zip(&xj).for_each(|(xi, xj)| *xi -= a * xj);
                    }
                }
                x
            };
            let u = solve(idx.iter().map(|&t| v[t].iter().map(|x| x * beta[t]).collect()).collect());
            let w = solve(
                idx.iter()
                    .enumerate()
                    .map(|(p, &t)| k[t].iter().map(|x| x * beta[t] * cum[p].exp()).collect())
                    .collect(),
            );
            let vnew: Vec<Vec<f32>> = (0..chunk)
                .map(|p| (0..dv).map(|j| u[p][j] - (0..dk).map(|i| w[p][i] * state[i][j]).sum::<f32>()).collect())
                .collect();
            for (p, &t) in idx.iter().enumerate() {
                chunked[t] = (0..dv)
                    .map(|j| {
                        let inter: f32 = (0..dk).map(|i| q[t][i] * cum[p].exp() * state[i][j]).sum();
                        let intra: f32 = (0..=p).map(|r| dot(&q[t], &k[idx[r]]) * decay(p, r) * vnew[r][j]).sum();
                        inter + intra
                    })
                    .collect();
            }
            let last = cum[chunk - 1];
            for i in 0..dk {
                for j in 0..dv {
                    state[i][j] = state[i][j] * last.exp()
                        + (0..chunk).map(|r| k[idx[r]][i] * (last - cum[r]).exp() * vnew[r][j]).sum::<f32>();
                }
            }
        }
        for t in 0..seq {
            for j in 0..dv {
                assert!((rec[t][j] - chunked[t][j]).abs() < 1e-5, "t {t} j {j}: {} vs {}", rec[t][j], chunked[t][j]);
            }
        }
    }
}
