//! HunYuan (`hunyuan_v1_moe`: Hunyuan-A13B, `HunYuanMoEV1ForCausalLM`): a pre-norm decoder whose
//! per-head query and key RMSNorms act on the *rotated* heads, and whose every layer is a mixture of
//! experts beside a shared MLP.
//!
//! ```text
//! x ─ input_layernorm ─ q,k,v ─ RoPE (NTK-alpha base) ─ query_layernorm / key_layernorm ─ GQA ─ o ─ + ─┐
//! └─────────────────────────────────────────────────────────────────────────────────────────────┘   │
//! h ─ post_attention_layernorm ─┬─ mlp.gate.wg ─ softmax ─ top-k, renormalised ─ Σ wⱼ·expertⱼ ─┐     │
//!                               └─ mlp.shared_mlp (SwiGLU, every token) ──────────────────── + ─ + ─ out
//! ```
//!
//! - The order is the family's own: transformers' `HunYuanMoEV1Attention` and vLLM's `hunyuan_v1.py`
//!   both apply `apply_rotary_pos_emb` first and `query_layernorm` / `key_layernorm` after it (Qwen3
//!   and GLM-4.5 normalise before RoPE). Normalising a rotated head is not the same function: the
//!   norm's per-channel weights do not commute with the rotation.
//! - The rotary base is HunYuan's NTK-alpha, `rope_theta · alpha^(d/(d−2))`
//!   ([`crate::model::rope`]).
//! - The router `mlp.gate.wg` scores the experts with a softmax; each token takes its top-k, whose
//!   weights are renormalised to sum to 1 (`HunYuanMoEV1Gate`, vLLM's `renormalize=top_k > 1`). The
//!   shared MLP `mlp.shared_mlp` (`num_shared_expert · intermediate_size` wide, ungated) is added for
//!   every token. The routed experts are `mlp.experts.J.{gate,up,down}_proj` in the release.
//! - Cross-layer attention (`use_cla`, Hunyuan-Large's K/V shared by pairs of layers) is refused when
//!   the config is read: the second layer of a pair has no `k_proj` / `v_proj` and needs the first
//!   layer's keys and values, which a layer-at-a-time forward does not carry yet.

use super::parts::{check_input, ffn_graph, residual, Attention, Ffn, Heads, Norm, Take};
use super::{DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::TextConfig;
use crate::model::layout::DecoderNames;
use crate::model::nn::LinearHook;
use crate::model::rope::{Positions, Rope};
use crate::model::weights::Weights;
use anyhow::{bail, Result};
use ndarray::{Array2, ArrayView2};

const NAMES: DecoderNames = DecoderNames::HUNYUAN;

/// One HunYuan decoder layer's weights, ready to run.
#[derive(Debug, Clone)]
pub struct Layer {
    pub index: usize,
    input_layernorm: Norm,
    post_attention_layernorm: Norm,
    attn: Attention,
    mlp: Ffn,
    rope: Rope,
    eps: f32,
}

impl Layer {
    /// Builds layer `index` from its weights (names relative to the layer), taking them over; a
    /// tensor the layer does not use is an error.
    pub fn new(cfg: &TextConfig, index: usize, weights: Weights) -> Result<Layer> {
        if !matches!(cfg.hidden_act.as_str(), "silu" | "swish") {
            bail!("hidden_act {:?} is not supported by lamina's HunYuan forward (only silu)", cfg.hidden_act);
        }
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let mut w = Take::new(weights);
        let heads = Heads { num_heads: cfg.num_heads, num_kv_heads: cfg.num_kv_heads, qk_dim: hd, v_dim: hd };
        let eps = cfg.rms_norm_eps as f32;
        let mut attn = Attention::take_named(&mut w, &NAMES, hidden, heads, eps, None)?;
        attn.norm_after_rope = true;
        let layer = Layer {
            index,
            input_layernorm: w.norm(NAMES.attn_norm, hidden)?,
            post_attention_layernorm: w.norm(NAMES.mlp_norm, hidden)?,
            attn,
            mlp: w.ffn(cfg, index, NAMES.router)?,
            rope: Rope::new(&cfg.rope, hd)?,
            eps,
        };
        w.finish()?;
        Ok(layer)
    }

    /// How a HunYuan layer connects its linears: q/k/v read the input norm and are fused by the
    /// servers (vLLM's `qkv_proj`), v feeds o; the router, every expert and the shared MLP read the
    /// post-attention norm ([`ffn_graph`]).
    pub fn graph(cfg: &TextConfig, index: usize) -> LayerGraph {
        let qkv = NAMES.qkv_modules();
        let mut g = LayerGraph {
            norm_linears: vec![NormLinears { norm: NAMES.attn_norm.into(), consumers: qkv.clone() }],
            linear_linears: vec![("self_attn.v_proj".into(), NAMES.o_proj.into(), LinearPath::ValueOutput)],
            residual_writers: vec![NAMES.o_proj.into()],
            fused: vec![qkv],
            kv_cache: vec![NAMES.attn.into()],
            ..LayerGraph::default()
        };
        ffn_graph(cfg, index, NAMES.mlp_norm, NAMES.router, &mut g);
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
        check_input(self.index, self.input_layernorm.len(), x, positions)?;
        let rope = self.rope.angles(positions)?;
        let out = residual(self.index, x, &self.input_layernorm, self.eps, "self_attn.o_proj", |h| {
            self.attn.forward(device, h, &rope, hook)
        })?;
        residual(self.index, out.view(), &self.post_attention_layernorm, self.eps, "the MoE block", |h| {
            self.mlp.forward(device, h, hook, opts)
        })
    }
}
