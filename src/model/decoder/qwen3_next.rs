//! Qwen3-Next (`qwen3_next`, Qwen3-Next-80B-A3B): a hybrid decoder. Most layers mix tokens with
//! Gated DeltaNet linear attention ([`super::gated_delta`]); every `full_attention_interval`-th
//! (config.json's `layer_types`) with gated full attention. Every layer's MLP is a MoE with a
//! gated shared expert.
//!
//! ```text
//! x ─ RMSNorm(1+w) ─ linear_attn (Gated DeltaNet) ────────────────────────────────────────── + ─┐
//!                  └ or self_attn: q|gate, k, v ─ q/k RMSNorm(1+w) ─ RoPE (partial) ─ GQA ─ · σ(gate) ─ o ─┘
//! h ─ RMSNorm(1+w) ─ router softmax top-k experts + σ(shared_expert_gate) · shared_expert ──── + ─ out
//! ```
//!
//! - The RMSNorms are zero-centred: they compute `x̂ · (1 + w)` (`TextConfig::norm_offset`), the
//!   decoder layers' two, the attention's q/k norms and the final norm; the DeltaNet's gated
//!   norm is not.
//! - `q_proj` yields per head the query then its output gate (`[heads, 2, head_dim]`); the
//!   attention's output is multiplied by `σ(gate)` before `o_proj`.
//! - The multi-token-prediction block (`mtp.*`) is no decoder layer lamina computes: it is a
//!   unit of its own ([`crate::model::layout::MtpLayout`]) and stays float.

use super::gated_delta::GatedDeltaNet;
use super::parts::{
    causal_attention, check_input, ffn_graph, norm_and_rotate, project, require_silu, residual, Ffn, Heads, Norm, Take,
};
use super::{Carry, DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::TextConfig;
use crate::model::layout::DecoderNames;
use crate::model::nn::{Linear, LinearHook};
use crate::model::rope::{Positions, Rope, RopeAngles};
use crate::model::weights::Weights;
use anyhow::{Context, Result};
use ndarray::{s, Array1, Array2, ArrayView2};

/// One Qwen3-Next decoder layer's weights, ready to run.
#[derive(Debug, Clone)]
pub struct Layer {
    pub index: usize,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    mixer: Mixer,
    mlp: Ffn,
    rope: Rope,
    eps: f32,
}

#[derive(Debug, Clone)]
enum Mixer {
    Linear(Box<GatedDeltaNet>),
    Full(Box<GatedAttention>),
}

/// Full attention whose output is gated per channel by a second half of `q_proj`.
#[derive(Debug, Clone)]
struct GatedAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    /// Effective q/k norm weights (`1 + w`).
    q_norm: Array1<f32>,
    k_norm: Array1<f32>,
    heads: Heads,
    eps: f32,
}

/// A zero-centred norm as it computes: `1 + w` (and the bias smoothing may have folded in).
fn offset_norm(w: &mut Take, module: &str, len: usize, offset: f32) -> Result<Norm> {
    let mut n = w.norm(module, len)?;
    n.weight += offset;
    Ok(n)
}

impl Layer {
    /// Builds layer `index` from its weights (names relative to the layer), taking them over; a
    /// tensor the layer does not use is an error.
    pub fn new(cfg: &TextConfig, index: usize, weights: Weights) -> Result<Layer> {
        require_silu(cfg, "Qwen3-Next")?;
        let la = cfg.linear_attn.as_ref().context("config.json gives no linear-attention dimensions")?;
        let (hidden, hd, off, eps) = (cfg.hidden_size, cfg.head_dim, cfg.norm_offset, cfg.rms_norm_eps as f32);
        let mut w = Take::new(weights);
        let mixer = if la.is_linear(index) {
            Mixer::Linear(Box::new(GatedDeltaNet::take(&mut w, hidden, la, eps)?))
        } else {
            let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
            let mut q_norm = w.vector("self_attn.q_norm.weight", hd)?;
            let mut k_norm = w.vector("self_attn.k_norm.weight", hd)?;
            q_norm += off;
            k_norm += off;
            Mixer::Full(Box::new(GatedAttention {
                q_proj: w.linear("self_attn.q_proj", nh * hd * 2, hidden)?,
                k_proj: w.linear("self_attn.k_proj", nkv * hd, hidden)?,
                v_proj: w.linear("self_attn.v_proj", nkv * hd, hidden)?,
                o_proj: w.linear("self_attn.o_proj", hidden, nh * hd)?,
                q_norm,
                k_norm,
                heads: Heads::of(cfg),
                eps,
            }))
        };
        let layer = Layer {
            index,
            input_layernorm: offset_norm(&mut w, "input_layernorm", hidden, off)?,
            post_attention_layernorm: offset_norm(&mut w, "post_attention_layernorm", hidden, off)?,
            mixer,
            mlp: w.ffn(cfg, index, DecoderNames::STANDARD.router)?,
            rope: Rope::new(&cfg.rope, hd)?,
            eps,
        };
        w.finish()?;
        Ok(layer)
    }

    /// How layer `index` connects its linears. A DeltaNet layer's input norm feeds
    /// `in_proj_qkvz` and `in_proj_ba`; its `out_proj` reads the gated norm (no channel path to
    /// move a scale through) and writes the residual. A full-attention layer is the usual one:
    /// v→o stays a channel path because the gate multiplies each channel after attention.
    pub fn graph(cfg: &TextConfig, index: usize) -> LayerGraph {
        let linear = cfg.linear_attn.as_ref().is_some_and(|la| la.is_linear(index));
        let mut g = if linear {
            let inp = vec!["linear_attn.in_proj_qkvz".to_string(), "linear_attn.in_proj_ba".to_string()];
            LayerGraph {
                norm_linears: vec![NormLinears { norm: "input_layernorm".into(), consumers: inp }],
                residual_writers: vec!["linear_attn.out_proj".into()],
                ..LayerGraph::default()
            }
        } else {
            let qkv: Vec<String> = ["q", "k", "v"].iter().map(|p| format!("self_attn.{p}_proj")).collect();
            LayerGraph {
                norm_linears: vec![NormLinears { norm: "input_layernorm".into(), consumers: qkv.clone() }],
                linear_linears: vec![("self_attn.v_proj".into(), "self_attn.o_proj".into(), LinearPath::ValueOutput)],
                residual_writers: vec!["self_attn.o_proj".into()],
                fused: vec![qkv],
                kv_cache: vec!["self_attn".into()],
                ..LayerGraph::default()
            }
        };
        ffn_graph(cfg, index, "post_attention_layernorm", DecoderNames::STANDARD.router, &mut g);
        g
    }
}

impl GatedAttention {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        rope: &RopeAngles,
        hook: &mut dyn LinearHook,
    ) -> Result<Array2<f32>> {
        let (nh, hd) = (self.heads.num_heads, self.heads.qk_dim);
        let qg = project(device, hook, "self_attn.q_proj", &self.q_proj, x)?;
        let (mut q, mut gate) =
            (Array2::<f32>::zeros((x.nrows(), nh * hd)), Array2::<f32>::zeros((x.nrows(), nh * hd)));
        for h in 0..nh {
            q.slice_mut(s![.., h * hd..(h + 1) * hd]).assign(&qg.slice(s![.., 2 * h * hd..(2 * h + 1) * hd]));
            gate.slice_mut(s![.., h * hd..(h + 1) * hd]).assign(&qg.slice(s![.., (2 * h + 1) * hd..(2 * h + 2) * hd]));
        }
        let mut k = project(device, hook, "self_attn.k_proj", &self.k_proj, x)?;
        let mut v = project(device, hook, "self_attn.v_proj", &self.v_proj, x)?;
        norm_and_rotate(&mut q, hd, Some(&self.q_norm), self.eps, rope);
        norm_and_rotate(&mut k, hd, Some(&self.k_norm), self.eps, rope);
        hook.kv_cache("self_attn", &mut k, &mut v);
        let mut context = causal_attention(device, q.view(), k.view(), v.view(), self.heads, (hd as f32).powf(-0.5));
        context.zip_mut_with(&gate, |c, &g| *c /= 1.0 + (-g).exp());
        project(device, hook, "self_attn.o_proj", &self.o_proj, context.view())
    }
}

impl DecoderBlock for Layer {
    fn forward(
        &self,
        device: &dyn Device,
        x: ArrayView2<f32>,
        positions: &Positions,
        _carry: &mut Carry,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        check_input(self.index, self.input_layernorm.len(), x, positions)?;
        let out = residual(self.index, x, &self.input_layernorm, self.eps, "the token mixer", |h| match &self.mixer {
            Mixer::Linear(net) => net.forward(device, h, hook),
            Mixer::Full(attn) => attn.forward(device, h, &self.rope.angles(positions)?, hook),
        })?;
        residual(self.index, out.view(), &self.post_attention_layernorm, self.eps, "the MLP", |h| {
            self.mlp.forward(device, h, hook, opts)
        })
    }
}
