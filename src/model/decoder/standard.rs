//! The standard pre-norm decoder layer: Llama, Qwen2, Qwen3, Qwen3-MoE, InternLM2, Qwen (1), and
//! the language models of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, LLaVA, InternVL and
//! Qwen-VL.
//!
//! ```text
//! x ─ RMSNorm ─ q,k,v (+bias) ─ [q/k RMSNorm] ─ RoPE ─ [logn] ─ causal GQA attention ─ o ─ + ─┐
//! └───────────────────────────────────────────────────────────────────────────────────────┘  │
//! h ─ RMSNorm ─ SwiGLU MLP, or MoE (router softmax, top-k, experts) ──────────────────────── + ─ out
//! ```
//!
//! The families differ only in names ([`DecoderNames`]) and in how the query, key and value
//! projections are stored: three linears, or one fused linear whose output rows are all queries,
//! keys, values (Qwen's `c_attn`) or grouped per key/value head (InternLM2's `wqkv`). A fused
//! projection runs as the one linear it is stored as (so calibration observes, quantizes and writes
//! it under its own name, as the servers load it) and its output columns are split into q, k, v.
//! Qwen (1)'s logn attention scaling and the dynamic NTK rotary scalings only act beyond the
//! trained length; both are implemented exactly.

use super::parts::{causal_attention, project, rms_norm_in_place, Heads, Norm, Routing, SparseMoe, SwiGlu, Take};
use super::{DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::TextConfig;
use crate::model::layout::{DecoderNames, FusedQkv, QkvNames};
use crate::model::nn::{Linear, LinearHook};
use crate::model::rope::{Positions, Rope, RopeAngles};
use crate::model::weights::Weights;
use anyhow::{bail, ensure, Result};
use ndarray::{s, Array1, Array2, ArrayView2};

/// One decoder layer's weights, ready to run.
#[derive(Debug, Clone)]
pub struct Layer {
    pub index: usize,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    attn: Attention,
    mlp: Mlp,
    rope: Rope,
    eps: f32,
}

#[derive(Debug, Clone)]
struct Attention {
    /// The attention module's name (`self_attn`), for the KV-cache hook.
    name: &'static str,
    qkv: Qkv,
    o_name: &'static str,
    o_proj: Linear,
    /// Qwen3's per-head RMSNorms on queries and keys, before RoPE.
    q_norm: Option<Array1<f32>>,
    k_norm: Option<Array1<f32>>,
    heads: Heads,
    eps: f32,
    /// Qwen (1)'s logn scaling: `seq_length`.
    logn: Option<usize>,
}

/// The query, key and value projections as stored.
#[derive(Debug, Clone)]
enum Qkv {
    Separate { names: [&'static str; 3], q: Box<Linear>, k: Box<Linear>, v: Box<Linear> },
    Fused { name: &'static str, linear: Linear, rows: FusedQkv },
}

#[derive(Debug, Clone)]
enum Mlp {
    Dense(Box<SwiGlu>),
    Moe(Box<SparseMoe>),
}

impl Layer {
    /// Builds layer `index` from its weights (names relative to the layer, as `names` spells
    /// them), taking them over. Every tensor of the layer must be used: a tensor this forward does
    /// not know (a shared expert, an extra norm) is an error rather than a silently different model.
    pub fn new(cfg: &TextConfig, names: &DecoderNames, index: usize, weights: Weights) -> Result<Layer> {
        if !matches!(cfg.hidden_act.as_str(), "silu" | "swish") {
            bail!("hidden_act {:?} is not supported by lamina's text forward (only silu)", cfg.hidden_act);
        }
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let mut w = Take::new(weights);
        let qkv = match names.qkv {
            QkvNames::Separate { q, k, v } => Qkv::Separate {
                names: [q, k, v],
                q: Box::new(w.linear(q, nh * hd, hidden)?),
                k: Box::new(w.linear(k, nkv * hd, hidden)?),
                v: Box::new(w.linear(v, nkv * hd, hidden)?),
            },
            QkvNames::Fused { module, rows } => {
                Qkv::Fused { name: module, linear: w.linear(module, (nh + 2 * nkv) * hd, hidden)?, rows }
            }
        };
        let attn = Attention {
            name: names.attn,
            qkv,
            o_name: names.o_proj,
            o_proj: w.linear(names.o_proj, hidden, nh * hd)?,
            q_norm: w.optional_vector(&format!("{}.weight", names.q_norm), hd)?,
            k_norm: w.optional_vector(&format!("{}.weight", names.k_norm), hd)?,
            heads: Heads { num_heads: nh, num_kv_heads: nkv, qk_dim: hd, v_dim: hd },
            eps: cfg.rms_norm_eps as f32,
            logn: cfg.logn_attention,
        };
        let mlp = match &cfg.moe {
            Some(moe) if moe.is_moe_layer(index) => {
                let inter = moe.moe_intermediate_size;
                let root = names.moe;
                let experts = (0..moe.num_experts)
                    .map(|j| w.swiglu(&format!("{root}.experts.{j}"), hidden, inter))
                    .collect::<Result<Vec<_>>>()?;
                ensure!(
                    (1..=moe.num_experts).contains(&moe.top_k),
                    "num_experts_per_tok {} does not fit {} experts",
                    moe.top_k,
                    moe.num_experts
                );
                Mlp::Moe(Box::new(SparseMoe {
                    router_name: format!("{root}.gate"),
                    router: w.linear(&format!("{root}.gate"), moe.num_experts, hidden)?,
                    correction_bias: None,
                    experts,
                    routing: Routing::from_config(moe),
                    shared: None,
                }))
            }
            _ => Mlp::Dense(Box::new(w.swiglu_named(
                [names.gate, names.up, names.down],
                hidden,
                cfg.intermediate_size,
            )?)),
        };
        let layer = Layer {
            index,
            input_layernorm: w.norm(names.attn_norm, hidden)?,
            post_attention_layernorm: w.norm(names.mlp_norm, hidden)?,
            attn,
            mlp,
            rope: Rope::new(&cfg.rope, hd)?,
            eps: cfg.rms_norm_eps as f32,
        };
        w.finish()?;
        Ok(layer)
    }

    /// How this family's layer `index` connects its linears.
    ///
    /// A fused query/key/value projection has no separate value projection, so no v → o pair is
    /// listed for it (smoothing cannot scale the value rows alone).
    pub fn graph(cfg: &TextConfig, names: &DecoderNames, index: usize) -> LayerGraph {
        let qkv = names.qkv_modules();
        let mut g = LayerGraph {
            norm_linears: vec![NormLinears { norm: names.attn_norm.into(), consumers: qkv.clone() }],
            linear_linears: Vec::new(),
            residual_writers: vec![names.o_proj.into()],
            fused: vec![qkv],
            kv_cache: vec![names.attn.into()],
        };
        if let QkvNames::Separate { v, .. } = names.qkv {
            g.linear_linears.push((v.into(), names.o_proj.into(), LinearPath::ValueOutput));
        }
        match &cfg.moe {
            Some(m) if m.is_moe_layer(index) => {
                let root = names.moe;
                let expert = |j: usize, p: &str| format!("{root}.experts.{j}.{p}");
                let mut consumers = vec![format!("{root}.gate")];
                let mut experts = Vec::new();
                for j in 0..m.num_experts {
                    consumers.extend([expert(j, "gate_proj"), expert(j, "up_proj")]);
                    experts.extend([expert(j, "gate_proj"), expert(j, "up_proj"), expert(j, "down_proj")]);
                    g.linear_linears.push((expert(j, "up_proj"), expert(j, "down_proj"), LinearPath::GatedProduct));
                    g.residual_writers.push(expert(j, "down_proj"));
                }
                g.norm_linears.push(NormLinears { norm: names.mlp_norm.into(), consumers });
                g.fused.push(experts);
            }
            _ => {
                let gate_up = vec![names.gate.to_string(), names.up.to_string()];
                g.norm_linears.push(NormLinears { norm: names.mlp_norm.into(), consumers: gate_up.clone() });
                g.linear_linears.push((names.up.into(), names.down.into(), LinearPath::GatedProduct));
                g.residual_writers.push(names.down.into());
                g.fused.push(gate_up);
            }
        }
        g
    }
}

impl DecoderBlock for Layer {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        positions: &Positions,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        let hidden = self.input_layernorm.len();
        ensure!(
            x.ncols() == hidden,
            "layer {} got hidden states of width {}, expected {hidden}",
            self.index,
            x.ncols()
        );
        ensure!(
            positions.len() == x.nrows(),
            "layer {}: {} positions given for {} tokens",
            self.index,
            positions.len(),
            x.nrows()
        );
        let rope = self.rope.angles(positions)?;
        let h = self.input_layernorm.forward(x, self.eps);
        let mut out = self.attn.forward(device, h.view(), &rope, hook)?;
        ensure!(out.dim() == x.dim(), "layer {}: {} returned shape {:?}", self.index, self.attn.o_name, out.dim());
        out += &x;
        let h = self.post_attention_layernorm.forward(out.view(), self.eps);
        let m = match &self.mlp {
            Mlp::Dense(mlp) => mlp.forward(device, h.view(), hook)?,
            Mlp::Moe(moe) => moe.forward(device, h.view(), hook, opts)?,
        };
        ensure!(m.dim() == x.dim(), "layer {}: the MLP returned shape {:?}", self.index, m.dim());
        out += &m;
        Ok(out)
    }
}

impl Attention {
    fn forward(
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
        self.norm_and_rotate(&mut q, self.q_norm.as_ref(), rope);
        self.norm_and_rotate(&mut k, self.k_norm.as_ref(), rope);
        if let Some(seq_length) = self.logn {
            logn_scale(&mut q, seq_length);
        }
        hook.kv_cache(self.name, &mut k, &mut v);
        let scale = (self.heads.qk_dim as f32).powf(-0.5);
        let context = causal_attention(device, q.view(), k.view(), v.view(), self.heads, scale);
        Ok(hook.linear(device, self.o_name, &self.o_proj, context.view()))
    }

    /// Applies the optional per-head RMSNorm, then RoPE, to every head of every token of `m`
    /// (`[seq, heads · head_dim]`, standard layout).
    fn norm_and_rotate(&self, m: &mut Array2<f32>, norm: Option<&Array1<f32>>, rope: &RopeAngles) {
        let (hd, width) = (self.heads.qk_dim, m.ncols());
        let rows = m.as_slice_mut().expect("projections are in standard layout");
        rows.chunks_mut(width).enumerate().for_each(|(t, row)| {
            for head in row.chunks_mut(hd) {
                if let Some(w) = norm {
                    rms_norm_in_place(head, w.view(), self.eps);
                }
                rope.rotate(t, head);
            }
        });
    }
}

/// The query, key and value columns of a fused projection's output `[seq, (heads + 2·kv_heads)·d]`.
fn split_fused(y: Array2<f32>, rows: FusedQkv, heads: Heads) -> (Array2<f32>, Array2<f32>, Array2<f32>) {
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
fn logn_scale(q: &mut Array2<f32>, seq_length: usize) {
    for (t, mut row) in q.rows_mut().into_iter().enumerate() {
        let i = t + 1;
        if i > seq_length {
            row *= ((i as f64).ln() / (seq_length as f64).ln()) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_rows_split_as_the_modeling_files_do() {
        // Two kv heads of two query heads each, head_dim 1: InternLM2's wqkv rows are
        // [q0 q1 k0 v0 | q2 q3 k1 v1]; Qwen's c_attn rows are [q0..q3 | k0 k1 | v0 v1].
        let heads = Heads { num_heads: 4, num_kv_heads: 2, qk_dim: 1, v_dim: 1 };
        let y = Array2::from_shape_vec((1, 8), (0..8).map(|v| v as f32).collect()).unwrap();
        let (q, k, v) = split_fused(y.clone(), FusedQkv::PerKvHead, heads);
        assert_eq!(
            (q.row(0).to_vec(), k.row(0).to_vec(), v.row(0).to_vec()),
            (vec![0.0, 1.0, 4.0, 5.0], vec![2.0, 6.0], vec![3.0, 7.0])
        );
        let (q, k, v) = split_fused(y, FusedQkv::Concatenated, heads);
        assert_eq!(
            (q.row(0).to_vec(), k.row(0).to_vec(), v.row(0).to_vec()),
            (vec![0.0, 1.0, 2.0, 3.0], vec![4.0, 5.0], vec![6.0, 7.0])
        );
    }

    #[test]
    fn logn_scales_only_beyond_the_trained_length() {
        let mut q = Array2::<f32>::ones((6, 2));
        logn_scale(&mut q, 4);
        assert_eq!(q.column(0).to_vec()[..4], [1.0; 4]);
        // Positions 5 and 6 (1-based): log 5 / log 4 and log 6 / log 4.
        assert!((q[[4, 1]] - 1.160_964_1).abs() < 1e-6 && (q[[5, 0]] - 1.292_481_2).abs() < 1e-6, "{q:?}");
    }
}
