//! GLM-4 (`glm4`, the `-hf` releases of GLM-4-9B-0414 and GLM-4-32B-0414, and the language model
//! of GLM-4.1V): a pre-norm decoder whose attention and MLP outputs are normalized again before
//! they join the residual stream ("sandwich" norms).
//!
//! ```text
//! x ─ input_layernorm ─ q,k,v (+bias) ─ RoPE (adjacent pairs, partial) ─ GQA ─ o ─ post_self_attn_layernorm ─ + ─┐
//! └──────────────────────────────────────────────────────────────────────────────────────────────────────────┘ │
//! h ─ post_attention_layernorm ─ gate, up ─ silu(gate)·up ─ down ─ post_mlp_layernorm ────────────────────── + ─ out
//! ```
//!
//! - RoPE rotates the first `partial_rotary_factor · head_dim` dims of each head in adjacent
//!   pairs (`x[2i]`, `x[2i+1]`), as transformers' GLM `rotate_half` and vLLM's
//!   `is_neox_style=False` do; the frequencies are the usual ones over the rotated width.
//! - The checkpoint fuses the MLP's first projection (`mlp.gate_up_proj`, gate's rows then up's);
//!   the layout splits it ([`crate::model::layout::row_splits`]), so this layer sees, and the
//!   output holds, `mlp.gate_proj` and `mlp.up_proj` as vLLM packs them.
//! - Because o_proj and down_proj feed a norm rather than the residual, they are not residual
//!   writers in the graph ([`LayerGraph::post_norms`]); smoothing v→o and up→down is still exact
//!   (it leaves both projections' product unchanged).

use super::parts::{check_input, require_silu, Attention, Heads, Norm, SwiGlu, Take};
use super::{Carry, DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::TextConfig;
use crate::model::nn::LinearHook;
use crate::model::rope::{Positions, Rope};
use crate::model::weights::Weights;
use anyhow::{ensure, Result};
use ndarray::{Array2, ArrayView2};

/// One GLM-4 decoder layer's weights, ready to run.
#[derive(Debug, Clone)]
pub struct Layer {
    pub index: usize,
    input_layernorm: Norm,
    post_self_attn_layernorm: Norm,
    post_attention_layernorm: Norm,
    post_mlp_layernorm: Norm,
    attn: Attention,
    mlp: SwiGlu,
    rope: Rope,
    eps: f32,
}

impl Layer {
    /// Builds layer `index` from its weights (names relative to the layer), taking them over;
    /// a tensor the layer does not use is an error.
    pub fn new(cfg: &TextConfig, index: usize, weights: Weights) -> Result<Layer> {
        require_silu(cfg, "GLM-4")?;
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let mut w = Take::new(weights);
        let heads = Heads::of(cfg);
        let eps = cfg.rms_norm_eps as f32;
        let layer = Layer {
            index,
            input_layernorm: w.norm("input_layernorm", hidden)?,
            post_self_attn_layernorm: w.norm("post_self_attn_layernorm", hidden)?,
            post_attention_layernorm: w.norm("post_attention_layernorm", hidden)?,
            post_mlp_layernorm: w.norm("post_mlp_layernorm", hidden)?,
            attn: Attention::take(&mut w, hidden, heads, ("q_norm", "k_norm"), eps)?,
            mlp: w.swiglu("mlp", hidden, cfg.intermediate_size)?,
            rope: Rope::new(&cfg.rope, hd)?.with_adjacent_pairs(),
            eps,
        };
        w.finish()?;
        Ok(layer)
    }

    /// How a GLM-4 layer connects its linears (the same for every layer).
    pub fn graph(_cfg: &TextConfig, _index: usize) -> LayerGraph {
        let qkv: Vec<String> = ["q", "k", "v"].iter().map(|p| format!("self_attn.{p}_proj")).collect();
        let gate_up = vec!["mlp.gate_proj".to_string(), "mlp.up_proj".to_string()];
        LayerGraph {
            norm_linears: vec![
                NormLinears { norm: "input_layernorm".into(), consumers: qkv.clone() },
                NormLinears { norm: "post_attention_layernorm".into(), consumers: gate_up.clone() },
            ],
            linear_linears: vec![
                ("self_attn.v_proj".into(), "self_attn.o_proj".into(), LinearPath::ValueOutput),
                ("mlp.up_proj".into(), "mlp.down_proj".into(), LinearPath::GatedProduct),
            ],
            residual_writers: vec![],
            post_norms: vec![
                ("self_attn.o_proj".into(), "post_self_attn_layernorm".into()),
                ("mlp.down_proj".into(), "post_mlp_layernorm".into()),
            ],
            fused: vec![qkv, gate_up],
            kv_cache: vec!["self_attn".into()],
        }
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
        _opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        check_input(self.index, self.input_layernorm.len(), x, positions)?;
        let rope = self.rope.angles(positions)?;
        let h = self.input_layernorm.forward(x, self.eps);
        let a = self.attn.forward(device, h.view(), &rope, hook)?;
        ensure!(a.dim() == x.dim(), "layer {}: self_attn.o_proj returned shape {:?}", self.index, a.dim());
        let mut out = self.post_self_attn_layernorm.forward(a.view(), self.eps);
        out += &x;
        let h = self.post_attention_layernorm.forward(out.view(), self.eps);
        let m = self.mlp.forward(device, h.view(), hook)?;
        ensure!(m.dim() == x.dim(), "layer {}: mlp.down_proj returned shape {:?}", self.index, m.dim());
        out += &self.post_mlp_layernorm.forward(m.view(), self.eps);
        Ok(out)
    }
}
