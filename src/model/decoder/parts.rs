//! The pieces decoder architectures share: RMSNorm, causal attention over heads, GQA attention
//! with its projections, the SwiGLU MLP, a routed mixture of experts, the embedding lookup, and
//! [`Take`], which hands a layer its tensors by name and refuses the ones no part of the layer used.

use super::{ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::{GroupScore, MoeConfig, Scoring, TextConfig};
use crate::model::layout::{DecoderNames, FusedQkv, QkvNames};
use crate::model::nn::{Linear, LinearHook};
use crate::model::rope::{Positions, RopeAngles};
use crate::model::weights::Weights;
use anyhow::{bail, ensure, Context, Result};
use ndarray::{s, Array1, Array2, ArrayD, ArrayView1, ArrayView2, Axis};
use rayon::prelude::*;

/// An RMSNorm, with the bias that outlier suppression (m2) may fold into it.
#[derive(Debug, Clone)]
pub struct Norm {
    pub weight: Array1<f32>,
    pub bias: Option<Array1<f32>>,
}

impl Norm {
    pub fn forward(&self, x: ArrayView2<f32>, eps: f32) -> Array2<f32> {
        let mut y = rms_norm(x, self.weight.view(), eps);
        if let Some(b) = &self.bias {
            y += &b.view().insert_axis(Axis(0));
        }
        y
    }

    pub fn len(&self) -> usize {
        self.weight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.weight.is_empty()
    }
}

/// `x / sqrt(mean(x²) + eps) · weight`, row by row.
pub fn rms_norm(x: ArrayView2<f32>, weight: ArrayView1<f32>, eps: f32) -> Array2<f32> {
    let mut out = x.as_standard_layout().into_owned();
    let width = out.ncols();
    if width > 0 {
        out.as_slice_mut().unwrap().chunks_mut(width).for_each(|row| rms_norm_in_place(row, weight, eps));
    }
    out
}

/// RMSNorm of one vector in place (a token's head for q/k norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: ArrayView1<f32>, eps: f32) {
    let mean = x.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (mean as f32 + eps).sqrt();
    for (v, w) in x.iter_mut().zip(weight) {
        *v = w * (*v * inv);
    }
}

/// Scales each row of `scores [seq, seq]`, keeps keys `0..=t` for query `t` and takes their
/// softmax; the masked entries become 0.
pub fn causal_softmax(scores: &mut Array2<f32>, scale: f32) {
    causal_softmax_from(scores, scale, 0);
}

/// [`causal_softmax`] of a tile of query rows that starts at query `first`: row `t` of `scores
/// [rows, keys]` is query `first + t`, which keeps keys `0..=first + t`.
fn causal_softmax_from(scores: &mut Array2<f32>, scale: f32, first: usize) {
    let n = scores.ncols();
    let rows = scores.as_slice_mut().expect("matmul output is in standard layout");
    for (t, row) in rows.chunks_mut(n).enumerate() {
        let (keep, masked) = row.split_at_mut((first + t + 1).min(n));
        let mut max = f32::NEG_INFINITY;
        for s in keep.iter_mut() {
            *s *= scale;
            max = max.max(*s);
        }
        let mut sum = 0.0f32;
        for s in keep.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        keep.iter_mut().for_each(|s| *s *= inv);
        masked.fill(0.0);
    }
}

/// The shape of a multi-head attention: query heads share key/value heads in groups (GQA), and
/// the value head may be narrower or wider than the query/key head (MLA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Width of a query and a key head.
    pub qk_dim: usize,
    /// Width of a value head.
    pub v_dim: usize,
}

impl Heads {
    /// The config's query and key/value heads, every head `head_dim` wide (all but MLA).
    pub fn of(cfg: &TextConfig) -> Heads {
        Heads { num_heads: cfg.num_heads, num_kv_heads: cfg.num_kv_heads, qk_dim: cfg.head_dim, v_dim: cfg.head_dim }
    }
}

/// Every decoder lamina runs has a SwiGLU MLP, `down(silu(gate) · up)`: another `hidden_act` is refused by
/// name rather than run as a silently different model. `family` names the forward in the error.
pub fn require_silu(cfg: &TextConfig, family: &str) -> Result<()> {
    if !matches!(cfg.hidden_act.as_str(), "silu" | "swish") {
        bail!("hidden_act {:?} is not supported by lamina's {family} forward (only silu)", cfg.hidden_act);
    }
    Ok(())
}

/// Causal scaled-dot-product attention of one sequence: `q [seq, heads·qk_dim]`,
/// `k [seq, kv_heads·qk_dim]`, `v [seq, kv_heads·v_dim]`; returns `[seq, heads·v_dim]`.
pub fn causal_attention(
    device: &dyn Device,
    q: ArrayView2<f32>,
    k: ArrayView2<f32>,
    v: ArrayView2<f32>,
    heads: Heads,
    scale: f32,
) -> Array2<f32> {
    let Heads { num_heads, num_kv_heads, qk_dim: d, v_dim: dv } = heads;
    let seq = q.nrows();
    let group = num_heads / num_kv_heads;
    // One task per (head, tile of query rows), each on one thread with serial products: a head's
    // products are small, and a parallel GEMM per head spends its time handing work between
    // threads. A tile of queries `r0..r1` reads only keys `0..r1` (the rest is masked), which
    // skips about half of the products.
    let tile = ATTENTION_TILE_ROWS.min(seq.max(1));
    let tasks: Vec<(usize, usize)> = (0..num_heads).flat_map(|h| (0..seq).step_by(tile).map(move |r| (h, r))).collect();
    let outs: Vec<Array2<f32>> = tasks
        .par_iter()
        .map(|&(h, r0)| {
            let (r1, kv) = ((r0 + tile).min(seq), h / group);
            let qh = q.slice(s![r0..r1, h * d..(h + 1) * d]);
            let kh = k.slice(s![..r1, kv * d..(kv + 1) * d]);
            let mut scores = device.matmul_serial(qh, kh.t());
            causal_softmax_from(&mut scores, scale, r0);
            device.matmul_serial(scores.view(), v.slice(s![..r1, kv * dv..(kv + 1) * dv]))
        })
        .collect();
    let mut context = Array2::<f32>::zeros((seq, num_heads * dv));
    for (&(h, r0), out) in tasks.iter().zip(&outs) {
        context.slice_mut(s![r0..r0 + out.nrows(), h * dv..(h + 1) * dv]).assign(out);
    }
    context
}

/// Query rows per attention task ([`causal_attention`]).
const ATTENTION_TILE_ROWS: usize = 128;

/// Grouped-query attention with its projections (`self_attn.{q,k,v,o}_proj` by default, their
/// biases when stored) and optional per-head RMSNorms of queries and keys, applied before RoPE
/// (Qwen3, GLM-4.5). The query, key and value projections may be stored as one fused linear
/// (InternLM2's `attention.wqkv`, Qwen (1)'s `attn.c_attn`): it runs as that one linear, under its
/// own name (so calibration observes, quantizes and writes it as the servers load it), and its
/// output columns are split into q, k and v.
#[derive(Debug, Clone)]
pub struct Attention {
    /// The attention module's name (`self_attn`), for the KV-cache hook.
    pub name: &'static str,
    pub qkv: Qkv,
    pub o_name: &'static str,
    pub o_proj: Linear,
    pub q_norm: Option<Array1<f32>>,
    pub k_norm: Option<Array1<f32>>,
    pub heads: Heads,
    pub eps: f32,
    /// Qwen (1)'s logn scaling of the queries beyond `seq_length` (see [`logn_scale`]).
    pub logn: Option<usize>,
}

/// The query, key and value projections as stored.
#[derive(Debug, Clone)]
pub enum Qkv {
    Separate { names: [&'static str; 3], q: Box<Linear>, k: Box<Linear>, v: Box<Linear> },
    Fused { name: &'static str, linear: Linear, rows: FusedQkv },
}

impl Attention {
    /// Takes `self_attn.*` from a layer's weights; `norms` names the optional q/k norms
    /// (`q_norm`, `k_norm`).
    pub fn take(w: &mut Take, hidden: usize, heads: Heads, norms: (&str, &str), eps: f32) -> Result<Attention> {
        let mut a = Attention::take_named(w, &DecoderNames::STANDARD, hidden, heads, eps, None)?;
        if norms != ("q_norm", "k_norm") {
            a.q_norm = w.optional_vector(&format!("self_attn.{}.weight", norms.0), heads.qk_dim)?;
            a.k_norm = w.optional_vector(&format!("self_attn.{}.weight", norms.1), heads.qk_dim)?;
        }
        Ok(a)
    }

    /// Takes the attention of a layer that names its modules as `names` says.
    pub fn take_named(
        w: &mut Take,
        names: &DecoderNames,
        hidden: usize,
        heads: Heads,
        eps: f32,
        logn: Option<usize>,
    ) -> Result<Attention> {
        let Heads { num_heads: nh, num_kv_heads: nkv, qk_dim: hd, v_dim: vd } = heads;
        let qkv = match names.qkv {
            QkvNames::Separate { q, k, v } => Qkv::Separate {
                names: [q, k, v],
                q: Box::new(w.linear(q, nh * hd, hidden)?),
                k: Box::new(w.linear(k, nkv * hd, hidden)?),
                v: Box::new(w.linear(v, nkv * vd, hidden)?),
            },
            QkvNames::Fused { module, rows } => {
                ensure!(vd == hd, "{module}: a fused q/k/v projection needs value heads as wide as query heads");
                Qkv::Fused { name: module, linear: w.linear(module, (nh + 2 * nkv) * hd, hidden)?, rows }
            }
        };
        Ok(Attention {
            name: names.attn,
            qkv,
            o_name: names.o_proj,
            o_proj: w.linear(names.o_proj, hidden, nh * vd)?,
            q_norm: w.optional_vector(&format!("{}.weight", names.q_norm), hd)?,
            k_norm: w.optional_vector(&format!("{}.weight", names.k_norm), hd)?,
            heads,
            eps,
            logn,
        })
    }

    pub fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        rope: &RopeAngles,
        hook: &mut dyn LinearHook,
    ) -> Result<Array2<f32>> {
        let (mut q, mut k, mut v) = match &self.qkv {
            Qkv::Separate { names: [qn, kn, vn], q, k, v } => {
                (project(device, hook, qn, q, x)?, project(device, hook, kn, k, x)?, project(device, hook, vn, v, x)?)
            }
            Qkv::Fused { name, linear, rows } => {
                split_fused(project(device, hook, name, linear, x)?, *rows, self.heads)
            }
        };
        norm_and_rotate(&mut q, self.heads.qk_dim, self.q_norm.as_ref(), self.eps, rope);
        norm_and_rotate(&mut k, self.heads.qk_dim, self.k_norm.as_ref(), self.eps, rope);
        if let Some(seq_length) = self.logn {
            logn_scale(&mut q, seq_length);
        }
        hook.kv_cache(self.name, &mut k, &mut v);
        if hook.finished() {
            return Ok(Array2::zeros((x.nrows(), self.o_proj.out_features())));
        }
        let scale = (self.heads.qk_dim as f32).powf(-0.5);
        let context = causal_attention(device, q.view(), k.view(), v.view(), self.heads, scale);
        Ok(hook.linear(device, self.o_name, &self.o_proj, context.view()))
    }
}

/// The query, key and value columns of a fused projection's output `[seq, (heads + 2·kv_heads)·d]`.
pub fn split_fused(y: Array2<f32>, rows: FusedQkv, heads: Heads) -> (Array2<f32>, Array2<f32>, Array2<f32>) {
    let Heads { num_heads: nh, num_kv_heads: nkv, qk_dim: d, .. } = heads;
    match rows {
        FusedQkv::Concatenated => (
            y.slice(s![.., ..nh * d]).to_owned(),
            y.slice(s![.., nh * d..(nh + nkv) * d]).to_owned(),
            y.slice(s![.., (nh + nkv) * d..]).to_owned(),
        ),
        FusedQkv::PerKvHead => {
            let group = nh / nkv;
            let seq = y.nrows();
            let (mut q, mut k, mut v) =
                (Array2::zeros((seq, nh * d)), Array2::zeros((seq, nkv * d)), Array2::zeros((seq, nkv * d)));
            // Key/value head `h` owns columns `h·(group + 2)·d ..`: its query heads, its key, its value.
            for h in 0..nkv {
                let base = h * (group + 2) * d;
                q.slice_mut(s![.., h * group * d..(h + 1) * group * d])
                    .assign(&y.slice(s![.., base..base + group * d]));
                let kc = base + group * d;
                k.slice_mut(s![.., h * d..(h + 1) * d]).assign(&y.slice(s![.., kc..kc + d]));
                v.slice_mut(s![.., h * d..(h + 1) * d]).assign(&y.slice(s![.., kc + d..kc + 2 * d]));
            }
            (q, k, v)
        }
    }
}

/// Qwen (1)'s logn attention: the query of the token at 1-based position `i > seq_length` is
/// multiplied by `log(i) / log(seq_length)` (in f64, then rounded to f32 as its `logn_tensor` is).
pub fn logn_scale(q: &mut Array2<f32>, seq_length: usize) {
    for (t, mut row) in q.rows_mut().into_iter().enumerate() {
        let i = t + 1;
        if i > seq_length {
            row *= ((i as f64).ln() / (seq_length as f64).ln()) as f32;
        }
    }
}

/// Applies the optional per-head RMSNorm, then RoPE, to every head (`head_dim` wide) of every
/// token of `m` (`[seq, heads · head_dim]`, standard layout).
pub fn norm_and_rotate(m: &mut Array2<f32>, head_dim: usize, norm: Option<&Array1<f32>>, eps: f32, rope: &RopeAngles) {
    let width = m.ncols();
    let rows = m.as_slice_mut().expect("projections are in standard layout");
    rows.chunks_mut(width).enumerate().for_each(|(t, row)| {
        for head in row.chunks_mut(head_dim) {
            if let Some(w) = norm {
                rms_norm_in_place(head, w.view(), eps);
            }
            rope.rotate(t, head);
        }
    });
}

/// RoPE, then the optional per-head RMSNorm, on every head of every token of `m` (HunYuan's order:
/// normalising a rotated head is not the same function, the norm's weights do not commute with RoPE).
pub fn rotate_and_norm(m: &mut Array2<f32>, head_dim: usize, norm: Option<&Array1<f32>>, eps: f32, rope: &RopeAngles) {
    let width = m.ncols();
    let rows = m.as_slice_mut().expect("projections are in standard layout");
    rows.chunks_mut(width).enumerate().for_each(|(t, row)| {
        for head in row.chunks_mut(head_dim) {
            rope.rotate(t, head);
            if let Some(w) = norm {
                rms_norm_in_place(head, w.view(), eps);
            }
        }
    });
}

/// Runs one projection through the hook and checks its shape; the result is in standard layout.
pub fn project(
    device: &dyn Device,
    hook: &mut dyn LinearHook,
    name: &str,
    layer: &Linear,
    x: ArrayView2<f32>,
) -> Result<Array2<f32>> {
    let y = hook.linear(device, name, layer, x);
    ensure!(
        y.dim() == (x.nrows(), layer.out_features()),
        "{name} returned shape {:?} for {} tokens",
        y.dim(),
        x.nrows()
    );
    Ok(if y.is_standard_layout() { y } else { y.as_standard_layout().into_owned() })
}

/// `down(silu(gate(x)) · up(x))`; `names` are the three linears' module names (`mlp.gate_proj`,
/// `mlp.up_proj`, `mlp.down_proj`; `mlp.experts.3.*`; InternLM2's `feed_forward.w1/w3/w2`).
#[derive(Debug, Clone)]
pub struct SwiGlu {
    /// Gate, up and down, in that order.
    pub names: [String; 3],
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl SwiGlu {
    pub fn forward(&self, device: &dyn Device, x: ArrayView2<f32>, hook: &mut dyn LinearHook) -> Result<Array2<f32>> {
        let [gate_name, up_name, down_name] = &self.names;
        let gate = hook.linear(device, gate_name, &self.gate_proj, x);
        let up = hook.linear(device, up_name, &self.up_proj, x);
        ensure!(gate.dim() == up.dim(), "{gate_name} and {up_name} disagree in shape");
        let mut act = gate;
        act.zip_mut_with(&up, |g, &u| *g = *g / (1.0 + (-*g).exp()) * u);
        Ok(hook.linear(device, down_name, &self.down_proj, act.view()))
    }
}

/// How a router picks each token's experts and weighs them, for every family lamina knows:
/// softmax or sigmoid scores; optionally only the experts of the best `topk_group` of `n_group`
/// groups are eligible; the top-k by score (plus the correction bias, which only steers the
/// choice); weights renormalised to sum 1 when `norm_topk_prob`, then multiplied by
/// `routed_scaling_factor`.
///
/// As transformers computes it (`DeepseekV2TopkRouter`, `DeepseekV3TopkRouter`,
/// `Glm4MoeTopkRouter`, Qwen's softmax routers): groups are ranked on the biased scores, by their
/// best expert (V2's `group_limited_greedy`) or the sum of their two best (`noaux_tc`); experts of
/// the other groups are masked to −∞ before the top-k (V2 masks to 0, which picks the same experts
/// since softmax scores are positive and the config leaves enough eligible experts); the
/// renormalising denominator carries transformers' `+ 1e-20`.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub top_k: usize,
    pub scoring: Scoring,
    pub n_group: usize,
    pub topk_group: usize,
    pub group_score: GroupScore,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
}

impl Routing {
    pub fn from_config(m: &MoeConfig) -> Routing {
        Routing {
            top_k: m.top_k,
            scoring: m.scoring,
            n_group: m.n_group,
            topk_group: m.topk_group,
            group_score: m.group_score,
            norm_topk_prob: m.norm_topk_prob,
            routed_scaling_factor: m.routed_scaling_factor as f32,
        }
    }

    /// For each of `experts`, the tokens routed to it and their weights, from the router's
    /// logits `[tokens, experts]` and the optional correction bias `[experts]`.
    pub fn route(&self, logits: ArrayView2<f32>, correction: Option<&Array1<f32>>) -> Vec<Vec<(usize, f32)>> {
        let experts = logits.ncols();
        let mut routes = vec![Vec::new(); experts];
        for (t, row) in logits.outer_iter().enumerate() {
            let scores: Vec<f32> = match self.scoring {
                Scoring::Softmax => {
                    let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                    let exp: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
                    let sum: f32 = exp.iter().sum();
                    exp.iter().map(|&v| v / sum).collect()
                }
                Scoring::Sigmoid => row.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect(),
            };
            let mut choice: Vec<f32> = match correction {
                Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => scores.clone(),
            };
            if self.n_group > 1 && self.topk_group < self.n_group {
                let per = experts / self.n_group;
                let group_scores: Vec<f32> = choice
                    .chunks(per)
                    .map(|g| match self.group_score {
                        GroupScore::Max => g.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)),
                        GroupScore::SumTop2 => {
                            let mut v = g.to_vec();
                            v.sort_by(|a, b| b.total_cmp(a));
                            v.iter().take(2).sum()
                        }
                    })
                    .collect();
                let keep = top_indices(&group_scores, self.topk_group);
                for (g, chunk) in choice.chunks_mut(per).enumerate() {
                    if !keep.contains(&g) {
                        chunk.fill(f32::NEG_INFINITY);
                    }
                }
            }
            let top = top_indices(&choice, self.top_k);
            let norm = if self.norm_topk_prob { top.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20 } else { 1.0 };
            for &e in &top {
                routes[e].push((t, scores[e] / norm * self.routed_scaling_factor));
            }
        }
        routes
    }
}

/// The indices of the `k` largest values, largest first (ties: lower index first).
fn top_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Experts every token goes through beside the routed ones: DeepSeek's `mlp.shared_experts`,
/// HunYuan's `mlp.shared_mlp`, or Qwen2-MoE's `mlp.shared_expert` scaled by
/// `sigmoid(mlp.shared_expert_gate(x))`.
#[derive(Debug, Clone)]
pub struct SharedExpert {
    pub mlp: SwiGlu,
    /// The gate's module name and its `[1, hidden]` linear.
    pub gate: Option<(String, Linear)>,
}

/// A routed mixture of SwiGLU experts: the router scores the experts, each token goes to its
/// top-k, and their outputs are summed with the routing weights (plus the shared experts').
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// The router's module name (`mlp.gate`) and linear `[experts, hidden]`.
    pub router_name: String,
    pub router: Linear,
    /// DeepSeek-V3's `e_score_correction_bias`: added to the scores to choose the experts, not to
    /// weigh them.
    pub correction_bias: Option<Array1<f32>>,
    pub experts: Vec<SwiGlu>,
    pub routing: Routing,
    pub shared: Option<SharedExpert>,
}

impl SparseMoe {
    pub fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        let logits = hook.linear(device, &self.router_name, &self.router, x);
        ensure!(
            logits.dim() == (x.nrows(), self.router.out_features()),
            "{} returned shape {:?}",
            self.router_name,
            logits.dim()
        );
        let routes = self.routing.route(logits.view(), self.correction_bias.as_ref());
        let mut out = if self.experts.is_empty() {
            // Built without its experts: the hook computes them (calibration streams them in groups).
            let module = "mlp.experts";
            ensure!(hook.defer_experts(module, x, &routes), "the experts of {module} are not loaded");
            Array2::zeros(x.raw_dim())
        } else {
            ensure!(
                self.experts.len() == self.router.out_features(),
                "{} scores {} experts, the layer has {}",
                self.router_name,
                self.router.out_features(),
                self.experts.len()
            );
            run_experts(device, &self.experts, &routes, x, hook, opts)?
        };
        if let Some(shared) = &self.shared {
            let mut y = shared.mlp.forward(device, x, hook)?;
            if let Some((name, gate)) = &shared.gate {
                let g = hook.linear(device, name, gate, x);
                ensure!(g.dim() == (x.nrows(), 1), "{name} returned shape {:?}", g.dim());
                for (mut row, g) in y.rows_mut().into_iter().zip(g.column(0)) {
                    row *= 1.0 / (1.0 + (-g).exp());
                }
            }
            out += &y;
        }
        Ok(out)
    }
}

/// Sums each expert's output over the tokens routed to it, weighted. With
/// `opts.moe_all_experts` every expert runs on every token (so calibration observes all of
/// them), and the result is still the routed one.
pub fn run_experts(
    device: &dyn Device,
    experts: &[SwiGlu],
    routes: &[Vec<(usize, f32)>],
    x: ArrayView2<f32>,
    hook: &mut dyn LinearHook,
    opts: ForwardOptions,
) -> Result<Array2<f32>> {
    let mut out = Array2::<f32>::zeros(x.raw_dim());
    add_experts(device, experts, routes, x, hook, opts, &mut out)?;
    Ok(out)
}

/// [`run_experts`] adding into `out`, expert by expert in order: experts given in groups, one
/// call per group in order, sum exactly as one call on them all.
pub fn add_experts(
    device: &dyn Device,
    experts: &[SwiGlu],
    routes: &[Vec<(usize, f32)>],
    x: ArrayView2<f32>,
    hook: &mut dyn LinearHook,
    opts: ForwardOptions,
    out: &mut Array2<f32>,
) -> Result<()> {
    ensure!(experts.len() == routes.len(), "{} experts for {} routes", experts.len(), routes.len());
    for (expert, chosen) in experts.iter().zip(routes) {
        if opts.moe_all_experts {
            let y = expert.forward(device, x, hook)?;
            for &(t, w) in chosen {
                out.row_mut(t).scaled_add(w, &y.row(t));
            }
        } else if !chosen.is_empty() {
            let tokens: Vec<usize> = chosen.iter().map(|&(t, _)| t).collect();
            let y = expert.forward(device, x.select(Axis(0), &tokens).view(), hook)?;
            for (i, &(t, w)) in chosen.iter().enumerate() {
                out.row_mut(t).scaled_add(w, &y.row(i));
            }
        }
    }
    Ok(())
}

/// A decoder layer's feed-forward block: a SwiGLU MLP, or routed experts.
#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(Box<SwiGlu>),
    Moe(Box<SparseMoe>),
}

impl Ffn {
    pub fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        match self {
            Ffn::Dense(mlp) => mlp.forward(device, x, hook),
            Ffn::Moe(moe) => moe.forward(device, x, hook, opts),
        }
    }
}

/// How layer `index`'s feed-forward block (under `mlp.`, reading `norm`'s output, its router named
/// `router`) connects: the router, every expert's gate/up and the shared experts' read the norm; up feeds down through
/// the gated product in each; every down writes the residual; a server fuses gate/up of the dense
/// MLP and of the shared experts, and all the routed experts into one module.
pub fn ffn_graph(cfg: &TextConfig, index: usize, norm: &str, router: &str, g: &mut LayerGraph) {
    let mut consumers = Vec::new();
    let swiglu = |g: &mut LayerGraph, consumers: &mut Vec<String>, module: &str, fuse_gate_up: bool| {
        let p = |l: &str| format!("{module}.{l}");
        consumers.extend([p("gate_proj"), p("up_proj")]);
        g.linear_linears.push((p("up_proj"), p("down_proj"), LinearPath::GatedProduct));
        g.residual_writers.push(p("down_proj"));
        if fuse_gate_up {
            g.fused.push(vec![p("gate_proj"), p("up_proj")]);
        }
    };
    match &cfg.moe {
        Some(m) if m.is_moe_layer(index) => {
            consumers.push(router.to_string());
            let mut experts = Vec::new();
            for j in 0..m.num_experts {
                let e = format!("mlp.experts.{j}");
                swiglu(g, &mut consumers, &e, false);
                experts.extend(["gate_proj", "up_proj", "down_proj"].map(|p| format!("{e}.{p}")));
            }
            g.fused.push(experts);
            if let Some(shared) = &m.shared {
                swiglu(g, &mut consumers, shared.module, true);
                consumers.extend(shared.gate_module());
            }
        }
        _ => swiglu(g, &mut consumers, "mlp", true),
    }
    g.norm_linears.push(NormLinears { norm: norm.to_string(), consumers });
}

/// Looks token ids up in the embedding table `[vocab, hidden]`.
pub fn embed(table: ArrayView2<f32>, ids: &[i64]) -> Result<Array2<f32>> {
    let vocab = table.nrows();
    let mut out = Array2::zeros((ids.len(), table.ncols()));
    for (t, &id) in ids.iter().enumerate() {
        if id < 0 || id as usize >= vocab {
            bail!("token id {id} at position {t} is outside the vocabulary (0..{vocab}) of the embedding table");
        }
        out.row_mut(t).assign(&table.row(id as usize));
    }
    Ok(out)
}

/// Takes a layer's tensors out of its [`Weights`] by relative name (no copy), checking shapes;
/// whatever is left at the end is a tensor the forward does not know.
pub struct Take {
    pub weights: Weights,
}

impl Take {
    pub fn new(weights: Weights) -> Take {
        Take { weights }
    }

    pub fn has(&self, name: &str) -> bool {
        self.weights.has(name)
    }

    pub fn tensor(&mut self, name: &str) -> Result<ArrayD<f32>> {
        self.weights.map.remove(name).with_context(|| format!("tensor {}{name} is missing", self.weights.prefix))
    }

    /// The linear `module` of `out × inp` (its `.weight`, and its `.bias` when stored).
    pub fn linear(&mut self, module: &str, out: usize, inp: usize) -> Result<Linear> {
        let p = self.weights.prefix.clone();
        let weight = self.tensor(&format!("{module}.weight"))?;
        ensure!(
            weight.shape() == [out, inp],
            "tensor {p}{module}.weight has shape {:?}, expected [{out}, {inp}] from config.json",
            weight.shape()
        );
        let bias = match self.weights.map.remove(&format!("{module}.bias")) {
            Some(b) => {
                ensure!(b.shape() == [out], "tensor {p}{module}.bias has shape {:?}, expected [{out}]", b.shape());
                Some(b.into_dimensionality()?)
            }
            None => None,
        };
        Ok(Linear { weight: weight.into_dimensionality()?, bias })
    }

    /// The `n` routed experts `{module}.J` of a MoE layer; none when the weights hold no tensor
    /// of any of them (calibration builds such a layer and streams the experts through
    /// [`LinearHook::defer_experts`]; a forward without that hook fails naming them).
    pub fn experts(&mut self, module: &str, n: usize, hidden: usize, inter: usize) -> Result<Vec<SwiGlu>> {
        let prefix = format!("{module}.");
        if !self.weights.map.keys().any(|k| k.starts_with(&prefix)) {
            return Ok(Vec::new());
        }
        (0..n).map(|j| self.swiglu(&format!("{module}.{j}"), hidden, inter)).collect()
    }

    /// `{module}.gate_proj`, `{module}.up_proj`, `{module}.down_proj`.
    pub fn swiglu(&mut self, module: &str, hidden: usize, inter: usize) -> Result<SwiGlu> {
        let [g, u, d] = ["gate_proj", "up_proj", "down_proj"].map(|p| format!("{module}.{p}"));
        self.swiglu_named([&g, &u, &d], hidden, inter)
    }

    /// A SwiGLU MLP whose gate, up and down linears have these module names.
    pub fn swiglu_named(&mut self, [gate, up, down]: [&str; 3], hidden: usize, inter: usize) -> Result<SwiGlu> {
        Ok(SwiGlu {
            names: [gate, up, down].map(String::from),
            gate_proj: self.linear(gate, inter, hidden)?,
            up_proj: self.linear(up, inter, hidden)?,
            down_proj: self.linear(down, hidden, inter)?,
        })
    }

    /// Layer `index`'s feed-forward block under `mlp.`: routed experts when the config makes it a
    /// MoE layer (the router `router`, `mlp.gate` in most families, DeepSeek's
    /// `e_score_correction_bias` when stored, and the shared MLP the config declares:
    /// [`crate::model::config::SharedMlpConfig`]), else a SwiGLU MLP.
    pub fn ffn(&mut self, cfg: &TextConfig, index: usize, router: &str) -> Result<Ffn> {
        let hidden = cfg.hidden_size;
        let Some(moe) = cfg.moe.as_ref().filter(|m| m.is_moe_layer(index)) else {
            return Ok(Ffn::Dense(Box::new(self.swiglu("mlp", hidden, cfg.intermediate_size)?)));
        };
        let inter = moe.moe_intermediate_size;
        let experts = self.experts("mlp.experts", moe.num_experts, hidden, inter)?;
        let shared = match &moe.shared {
            Some(s) => {
                let gate = match s.gate_module() {
                    Some(g) => Some((g.clone(), self.linear(&g, 1, hidden)?)),
                    None => None,
                };
                Some(SharedExpert { mlp: self.swiglu(s.module, hidden, s.width)?, gate })
            }
            None => None,
        };
        Ok(Ffn::Moe(Box::new(SparseMoe {
            router_name: router.into(),
            router: self.linear(router, moe.num_experts, hidden)?,
            correction_bias: self.optional_vector("mlp.gate.e_score_correction_bias", moe.num_experts)?,
            experts,
            routing: Routing::from_config(moe),
            shared,
        })))
    }

    pub fn vector(&mut self, name: &str, len: usize) -> Result<Array1<f32>> {
        let v = self.tensor(name)?;
        ensure!(v.shape() == [len], "tensor {}{name} has shape {:?}, expected [{len}]", self.weights.prefix, v.shape());
        Ok(v.into_dimensionality()?)
    }

    /// An RMSNorm `module` with its optional (m2-folded) bias.
    pub fn norm(&mut self, module: &str, len: usize) -> Result<Norm> {
        Ok(Norm {
            weight: self.vector(&format!("{module}.weight"), len)?,
            bias: self.optional_vector(&format!("{module}.bias"), len)?,
        })
    }

    pub fn optional_vector(&mut self, name: &str, len: usize) -> Result<Option<Array1<f32>>> {
        if self.weights.has(name) {
            self.vector(name, len).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Fails on tensors nothing took (old checkpoints' `rotary_emb.inv_freq` buffers excepted).
    pub fn finish(self) -> Result<()> {
        let unknown: Vec<&str> =
            self.weights.map.keys().filter(|k| !k.ends_with("rotary_emb.inv_freq")).map(|k| k.as_str()).collect();
        if !unknown.is_empty() {
            bail!(
                "layer {} holds tensors lamina's forward of this architecture does not know: {}",
                self.weights.prefix.trim_end_matches('.'),
                unknown.join(", ")
            );
        }
        Ok(())
    }
}

/// A pre-norm residual step, `x + f(norm(x))`: the attention (or token mixer) and the MLP of every
/// decoder but GLM-4's sandwich. `what` names `f`'s output in the error when its shape is not `x`'s.
pub fn residual(
    index: usize,
    x: ArrayView2<f32>,
    norm: &Norm,
    eps: f32,
    what: &str,
    f: impl FnOnce(ArrayView2<f32>) -> Result<Array2<f32>>,
) -> Result<Array2<f32>> {
    let mut out = f(norm.forward(x, eps).view())?;
    ensure!(out.dim() == x.dim(), "layer {index}: {what} returned shape {:?}", out.dim());
    out += &x;
    Ok(out)
}

/// A decoder layer's input checks: `x` is `[tokens, hidden]` and there is one position per token.
pub fn check_input(index: usize, hidden: usize, x: ArrayView2<f32>, positions: &Positions) -> Result<()> {
    ensure!(x.ncols() == hidden, "layer {index} got hidden states of width {}, expected {hidden}", x.ncols());
    ensure!(
        positions.len() == x.nrows(),
        "layer {index}: {} positions given for {} tokens",
        positions.len(),
        x.nrows()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;

    fn rel_err(ours: ArrayView2<f32>, reference: ArrayView2<f32>) -> f32 {
        let diff = ours.iter().zip(reference).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        diff / reference.iter().fold(0f32, |m, b| m.max(b.abs()))
    }

    fn routing(scoring: Scoring, top_k: usize) -> Routing {
        Routing {
            top_k,
            scoring,
            n_group: 1,
            topk_group: 1,
            group_score: GroupScore::Max,
            norm_topk_prob: false,
            routed_scaling_factor: 1.0,
        }
    }

    #[test]
    fn softmax_router_picks_top_k_and_renormalises() {
        let mut r = routing(Scoring::Softmax, 2);
        // Logits ln 1, ln 2, ln 5: probabilities 0.125, 0.25, 0.625.
        let logits = ndarray::array![[0f32, 2f32.ln(), 5f32.ln()]];
        let routes = r.route(logits.view(), None);
        assert!(routes[0].is_empty());
        assert!((routes[1][0].1 - 0.25).abs() < 1e-6 && (routes[2][0].1 - 0.625).abs() < 1e-6);
        r.norm_topk_prob = true;
        let routes = r.route(logits.view(), None);
        assert!((routes[1][0].1 - 0.25 / 0.875).abs() < 1e-6 && (routes[2][0].1 - 0.625 / 0.875).abs() < 1e-6);
    }

    /// DeepSeek-V3's rule worked by hand: sigmoid scores, the bias steers the choice only, groups
    /// ranked by the sum of their two best biased scores, weights renormalised then scaled.
    #[test]
    fn sigmoid_router_with_groups_and_correction_bias() {
        let r = Routing {
            top_k: 2,
            scoring: Scoring::Sigmoid,
            n_group: 2,
            topk_group: 1,
            group_score: GroupScore::SumTop2,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        };
        let sig = |p: f32| (p / (1.0 - p)).ln();
        // Scores 0.9, 0.1 | 0.6, 0.5. Without bias group 0 sums 1.0 and group 1 sums 1.1: group 1.
        let logits = ndarray::array![[sig(0.9), sig(0.1), sig(0.6), sig(0.5)]];
        let routes = r.route(logits.view(), None);
        assert!(routes[0].is_empty() && routes[1].is_empty());
        let (w2, w3) = (routes[2][0].1, routes[3][0].1);
        assert!((w2 - 0.6 / 1.1 * 2.5).abs() < 1e-5 && (w3 - 0.5 / 1.1 * 2.5).abs() < 1e-5, "{w2} {w3}");
        // A bias of +0.3 on expert 1 makes group 0 win (1.3 > 1.1) and expert 1 second in it;
        // its weight is still its unbiased score.
        let bias = Array1::from_vec(vec![0.0, 0.3, 0.0, 0.0]);
        let routes = r.route(logits.view(), Some(&bias));
        assert!(routes[2].is_empty() && routes[3].is_empty());
        assert!((routes[0][0].1 - 0.9 / 1.0 * 2.5).abs() < 1e-5);
        assert!((routes[1][0].1 - 0.1 / 1.0 * 2.5).abs() < 1e-5);
        // Group-limited greedy (DeepSeek-V2): groups ranked by their best expert.
        let v2 = Routing { scoring: Scoring::Softmax, group_score: GroupScore::Max, norm_topk_prob: false, ..r };
        let routes = v2.route(ndarray::array![[3.0f32, -5.0, 2.0, 2.5]].view(), None);
        assert_eq!((routes[0].len(), routes[1].len(), routes[2].len(), routes[3].len()), (1, 1, 0, 0));
    }

    #[test]
    fn causal_softmax_masks_the_future() {
        let mut s = ndarray::array![[1.0f32, 9.0, 9.0], [0.0, 2f32.ln() * 2.0, 9.0], [0.0, 0.0, 0.0]];
        causal_softmax(&mut s, 0.5);
        // Row 1 scaled: 0 and ln 2, so softmax 1/3, 2/3.
        let want = ndarray::array![[1.0f32, 0.0, 0.0], [1.0 / 3.0, 2.0 / 3.0, 0.0], [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]];
        assert!(rel_err(s.view(), want.view()) < 1e-6, "{s:?}");
    }

    #[test]
    fn tiled_attention_matches_the_full_masked_product() {
        // More queries than one tile, GQA, a value head narrower than the key head: every (head,
        // tile) task must equal the textbook softmax(q·kᵀ·scale + causal mask)·v, computed whole.
        let (seq, nh, nkv, d, dv) = (2 * ATTENTION_TILE_ROWS + 44, 4, 2, 8, 6);
        let f = |i: usize, salt: usize| (((i * 2654435761 + salt) % 1000) as f32 / 500.0) - 1.0;
        let q = Array2::from_shape_fn((seq, nh * d), |(t, c)| f(t * 131 + c, 1));
        let k = Array2::from_shape_fn((seq, nkv * d), |(t, c)| f(t * 71 + c, 2));
        let v = Array2::from_shape_fn((seq, nkv * dv), |(t, c)| f(t * 37 + c, 3));
        let heads = Heads { num_heads: nh, num_kv_heads: nkv, qk_dim: d, v_dim: dv };
        let got = causal_attention(&Cpu, q.view(), k.view(), v.view(), heads, 0.3);
        for h in 0..nh {
            let kv = h / (nh / nkv);
            let scores = q.slice(s![.., h * d..(h + 1) * d]).dot(&k.slice(s![.., kv * d..(kv + 1) * d]).t());
            for t in [0, 1, ATTENTION_TILE_ROWS - 1, ATTENTION_TILE_ROWS, seq - 1] {
                let row: Vec<f64> = (0..=t).map(|j| (scores[[t, j]] * 0.3) as f64).collect();
                let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = row.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..dv {
                    let want: f64 = (0..=t).map(|j| e[j] / sum * v[[j, kv * dv + c]] as f64).sum();
                    let g = got[[t, h * dv + c]] as f64;
                    assert!((g - want).abs() < 1e-5, "head {h} query {t} column {c}: {g} vs {want}");
                }
            }
        }
    }

    #[test]
    fn attention_with_a_narrower_value_head_matches_the_formula() {
        // One query head over one key/value head, qk_dim 2, v_dim 1, three tokens.
        let q = ndarray::array![[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]];
        let k = ndarray::array![[1.0f32, 0.0], [0.0, 2.0], [1.0, -1.0]];
        let v = ndarray::array![[1.0f32], [2.0], [4.0]];
        let heads = Heads { num_heads: 1, num_kv_heads: 1, qk_dim: 2, v_dim: 1 };
        let out = causal_attention(&Cpu, q.view(), k.view(), v.view(), heads, 1.0);
        // Token 1 attends to keys 0 and 1 with scores 0 and 2.
        let (a, b) = (1.0f32, 2f32.exp());
        assert!((out[[1, 0]] - (a * 1.0 + b * 2.0) / (a + b)).abs() < 1e-5);
        // Token 2: scores 1, 2, 0.
        let (a, b, c) = (1f32.exp(), 2f32.exp(), 1.0);
        assert!((out[[2, 0]] - (a + 2.0 * b + 4.0 * c) / (a + b + c)).abs() < 1e-5);
        assert_eq!(out[[0, 0]], 1.0);
    }

    #[test]
    fn fused_rows_split_as_the_modeling_files_do() {
        // Two kv heads of two query heads each, head_dim 1: InternLM2's wqkv rows are
        // [q0 q1 k0 v0 | q2 q3 k1 v1]; Qwen's c_attn rows are [q0..q3 | k0 k1 | v0 v1].
        let heads = Heads { num_heads: 4, num_kv_heads: 2, qk_dim: 1, v_dim: 1 };
        let y = Array2::from_shape_vec((1, 8), (0..8).map(|v| v as f32).collect()).unwrap();
        let (q, k, v) = split_fused(y.clone(), FusedQkv::PerKvHead, heads);
        let rows =
            |q: Array2<f32>, k: Array2<f32>, v: Array2<f32>| (q.row(0).to_vec(), k.row(0).to_vec(), v.row(0).to_vec());
        assert_eq!(rows(q, k, v), (vec![0.0, 1.0, 4.0, 5.0], vec![2.0, 6.0], vec![3.0, 7.0]));
        let (q, k, v) = split_fused(y, FusedQkv::Concatenated, heads);
        assert_eq!(rows(q, k, v), (vec![0.0, 1.0, 2.0, 3.0], vec![4.0, 5.0], vec![6.0, 7.0]));
    }

    #[test]
    fn logn_scales_only_beyond_the_trained_length() {
        let mut q = Array2::<f32>::ones((6, 2));
        logn_scale(&mut q, 4);
        assert_eq!(q.column(0).to_vec()[..4], [1.0; 4]);
        // Positions 5 and 6 (1-based): log 5 / log 4 and log 6 / log 4.
        assert!((q[[4, 1]] - 1.160_964_1).abs() < 1e-6 && (q[[5, 0]] - 1.292_481_2).abs() < 1e-6, "{q:?}");
    }

    #[test]
    fn ids_beyond_the_vocabulary_are_refused() {
        let table = Array2::<f32>::zeros((10, 4));
        let e = embed(table.view(), &[1, 10]).unwrap_err().to_string();
        assert!(e.contains("10") && e.contains("vocabulary"), "{e}");
        assert!(embed(table.view(), &[-1]).is_err());
    }
}
