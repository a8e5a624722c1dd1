//! The standard pre-norm decoder layer: Llama, Qwen2, Qwen3, Qwen3-MoE, InternLM2, Qwen (1), and
//! the language models of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and LLaVA.
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

use super::parts::{check_input, ffn_graph, require_silu, residual, Attention, Ffn, Heads, Norm, Take};
use super::{Carry, DecoderBlock, ForwardOptions, LayerGraph, LinearPath, NormLinears};
use crate::device::Device;
use crate::model::config::TextConfig;
use crate::model::layout::{DecoderNames, QkvNames};
use crate::model::nn::LinearHook;
use crate::model::rope::{Positions, Rope};
use crate::model::weights::Weights;
use anyhow::Result;
use ndarray::{Array2, ArrayView2};

/// One decoder layer's weights, ready to run.
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
    /// Builds layer `index` from its weights (names relative to the layer, as `names` spells
    /// them), taking them over. Every tensor of the layer must be used: a tensor this forward does
    /// not know (a shared expert, an extra norm) is an error rather than a silently different model.
    pub fn new(cfg: &TextConfig, names: &DecoderNames, index: usize, weights: Weights) -> Result<Layer> {
        require_silu(cfg, "text")?;
        let (hidden, hd) = (cfg.hidden_size, cfg.head_dim);
        let mut w = Take::new(weights);
        let heads = Heads::of(cfg);
        let attn = Attention::take_named(&mut w, names, hidden, heads, cfg.rms_norm_eps as f32, cfg.logn_attention)?;
        // MoE layers are named as every MoE family lamina reads names them (`mlp.gate`, `mlp.experts.J.*`).
        let mlp = match &cfg.moe {
            Some(m) if m.is_moe_layer(index) => w.ffn(cfg, index, names.router)?,
            _ => Ffn::Dense(Box::new(w.swiglu_named(
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
            ..LayerGraph::default()
        };
        if let QkvNames::Separate { v, .. } = names.qkv {
            g.linear_linears.push((v.into(), names.o_proj.into(), LinearPath::ValueOutput));
        }
        match &cfg.moe {
            Some(m) if m.is_moe_layer(index) => ffn_graph(cfg, index, names.mlp_norm, names.router, &mut g),
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
        _carry: &mut Carry,
        hook: &mut dyn LinearHook,
        opts: ForwardOptions,
    ) -> Result<Array2<f32>> {
        check_input(self.index, self.input_layernorm.len(), x, positions)?;
        let rope = self.rope.angles(positions)?;
        let out = residual(self.index, x, &self.input_layernorm, self.eps, self.attn.o_name, |h| {
            self.attn.forward(device, h, &rope, hook)
        })?;
        residual(self.index, out.view(), &self.post_attention_layernorm, self.eps, "the MLP", |h| {
            self.mlp.forward(device, h, hook, opts)
        })
    }
}
