//! `config.json`, read in both spellings that real checkpoints use: the public releases'
//! (`num_experts`, `rope_scaling`, `rope_theta`, flat Qwen2-VL configs) and transformers 5's
//! (`num_local_experts`, `rope_parameters`, nested `text_config`).

use crate::tensor::DType;
use anyhow::{bail, Context, Result};
use serde_json::Value;

/// config.json's `torch_dtype` (transformers 5 spells it `dtype`; a VL model may give it in `text_config`
/// only): the dtype vLLM serves the model in by default.
pub fn torch_dtype(config: &Value) -> Option<DType> {
    let read = |c: &Value| -> Option<DType> {
        DType::from_torch_name(c.get("torch_dtype").or_else(|| c.get("dtype"))?.as_str()?)
    };
    read(config).or_else(|| config.get("text_config").and_then(read))
}

/// A view of a JSON config that looks keys up in a list of objects, first match wins: for the
/// text model that is `text_config`, then the top level.
#[derive(Debug, Clone)]
pub struct ConfigView {
    layers: Vec<Value>,
    what: String,
}

impl ConfigView {
    pub fn new(what: &str, layers: Vec<Value>) -> ConfigView {
        ConfigView { layers, what: what.to_string() }
    }

    /// The first of `keys` found (non-null) in any layer.
    pub fn get(&self, keys: &[&str]) -> Option<&Value> {
        for layer in &self.layers {
            for k in keys {
                if let Some(v) = layer.get(*k).filter(|v| !v.is_null()) {
                    return Some(v);
                }
            }
        }
        None
    }

    pub fn usize(&self, keys: &[&str]) -> Result<usize> {
        self.opt_usize(keys)?.with_context(|| format!("{}: missing {}", self.what, keys.join(" or ")))
    }

    pub fn opt_usize(&self, keys: &[&str]) -> Result<Option<usize>> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .with_context(|| format!("{}: {} is {v}, not a non-negative integer", self.what, keys[0])),
        }
    }

    pub fn f64(&self, keys: &[&str]) -> Result<Option<f64>> {
        match self.get(keys) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).with_context(|| format!("{}: {} is {v}, not a number", self.what, keys[0])),
        }
    }

    pub fn bool(&self, keys: &[&str]) -> Option<bool> {
        self.get(keys).and_then(|v| v.as_bool())
    }

    pub fn str(&self, keys: &[&str]) -> Option<&str> {
        self.get(keys).and_then(|v| v.as_str())
    }

    pub fn usize_list(&self, keys: &[&str]) -> Result<Option<Vec<usize>>> {
        match self.get(keys) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|u| u as usize).with_context(|| format!("{}: {} holds {x}", self.what, keys[0]))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => bail!("{}: {} is {v}, not a list", self.what, keys[0]),
        }
    }

    /// A size given as one number or as `[height, width]` (transformers' InternVL vision config
    /// spells `patch_size` and `image_size` as lists), which must be square.
    pub fn square(&self, keys: &[&str]) -> Result<usize> {
        if let Some(Value::Array(_)) = self.get(keys) {
            let v = self.usize_list(keys)?.unwrap_or_default();
            return match v.as_slice() {
                [h, w] if h == w => Ok(*h),
                _ => bail!("{}: {} is {v:?}; lamina reads square sizes only ([n, n] or n)", self.what, keys[0]),
            };
        }
        self.usize(keys)
    }

    /// A sub-object (for example `rope_scaling`) as a view of its own.
    pub fn sub(&self, keys: &[&str]) -> Option<ConfigView> {
        self.get(keys)
            .filter(|v| v.is_object())
            .map(|v| ConfigView::new(&format!("{}.{}", self.what, keys[0]), vec![v.clone()]))
    }
}

/// Rotary embedding settings of a text decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// `default`, `mrope` or `yarn`; other kinds (llama3, linear, dynamic) are read but only a
    /// forward refuses them.
    pub kind: String,
    /// YaRN's settings when `kind` is `yarn` (DeepSeek-V2/V3 and long-context releases).
    pub yarn: Option<YarnConfig>,
    /// M-RoPE sections (temporal, height, width) in frequency pairs, for Qwen VL models.
    pub mrope_section: Option<Vec<usize>>,
    /// Qwen3-VL interleaves the three sections instead of concatenating them.
    pub mrope_interleaved: bool,
    /// Fraction of head_dim that is rotated (GLM-4 0.5, Qwen3-Next 0.25, Qwen's `rotary_pct`, else 1).
    pub partial_rotary_factor: f64,
    /// HunYuan's NTK-alpha (`rope_scaling: {type: dynamic, alpha}`): a fixed larger base.
    pub alpha: Option<f64>,
    /// Scaling of the rotary base that depends on the sequence's length.
    pub scaling: RopeScaling,
}

/// Rotary scaling that acts only on sequences longer than the model was trained on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// transformers' "dynamic" rope with a `factor`, as InternLM2's
    /// `InternLM2DynamicNTKScalingRotaryEmbedding`: when the largest position + 1 (`len`) exceeds
    /// `max_positions`, the base becomes `base · (factor · len / max_positions − (factor − 1))^(dim / (dim − 2))`.
    DynamicNtk {
        factor: f64,
        max_positions: usize,
    },
    /// Qwen (1)'s `use_dynamic_ntk`: for a sequence of `len` tokens the base becomes
    /// `base · α^(dim / (dim − 2))` with `α = max(2^⌈log2(len / seq_length) + 1⌉ − 1, 1)`, which
    /// is 1 up to `seq_length` tokens.
    QwenNtk {
        seq_length: usize,
    },
}

/// YaRN (`rope_type: yarn`): frequencies interpolated between the original and the `factor`-times
/// longer context (transformers' `_compute_yarn_parameters`), and an attention factor.
#[derive(Debug, Clone, PartialEq)]
pub struct YarnConfig {
    pub factor: f64,
    pub original_max_position_embeddings: f64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// `mscale` and `mscale_all_dim`: the cos/sin scale is `m(factor, mscale) / m(factor,
    /// mscale_all_dim)` and DeepSeek's MLA multiplies its softmax scale by `m(factor, mscale_all_dim)²`,
    /// where `m(s, k) = 0.1·k·ln s + 1` (1 for `s ≤ 1`).
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
    /// An explicit cos/sin scale (`attention_factor`), overriding the mscales.
    pub attention_factor: Option<f64>,
    /// Whether the correction range is rounded outward (transformers' default: true).
    pub truncate: bool,
}

impl YarnConfig {
    /// `0.1·k·ln(s) + 1`, or 1 when `s ≤ 1` (transformers' and DeepSeek's `yarn_get_mscale`).
    pub fn get_mscale(scale: f64, k: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * k * scale.ln() + 1.0
        }
    }

    /// The factor cos and sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        if let Some(a) = self.attention_factor {
            return a;
        }
        match (self.mscale, self.mscale_all_dim) {
            (Some(m), Some(all)) if m != 0.0 && all != 0.0 => {
                Self::get_mscale(self.factor, m) / Self::get_mscale(self.factor, all)
            }
            _ => Self::get_mscale(self.factor, 1.0),
        }
    }

    /// What DeepSeek's MLA multiplies the softmax scale by: `m(factor, mscale_all_dim)²`, or 1.
    pub fn softmax_mscale(&self) -> f64 {
        match self.mscale_all_dim {
            Some(all) if all != 0.0 => Self::get_mscale(self.factor, all).powi(2),
            _ => 1.0,
        }
    }
}

/// Multi-head latent attention (DeepSeek-V2/V3): queries through a low-rank pair (`q_a_proj` →
/// `q_a_layernorm` → `q_b_proj`) or one `q_proj`, keys and values from a shared latent
/// (`kv_a_proj_with_mqa` → `kv_a_layernorm` → `kv_b_proj`) plus one rotated key head.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// `None`: queries come from `q_proj` directly (V2-Lite, Coder-V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// Whether the rotary dims turn in adjacent pairs `(x0, x1), (x2, x3), ...` (DeepSeek's layout:
    /// always in transformers' DeepSeek-V2, unless `rope_interleave` is false in V3) rather than halves.
    pub rope_interleave: bool,
}

impl MlaConfig {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// How a router scores experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scoring {
    /// Softmax over all experts (Qwen, Mixtral, DeepSeek-V2).
    Softmax,
    /// An independent sigmoid per expert (DeepSeek-V3, GLM-4.5).
    Sigmoid,
}

/// How groups of experts are ranked when only the best `topk_group` groups are eligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupScore {
    /// The group's best expert (DeepSeek-V2 `group_limited_greedy`).
    Max,
    /// The sum of the group's two best experts, after the correction bias (DeepSeek-V3 `noaux_tc`).
    SumTop2,
}

/// Mixture-of-experts settings of a text decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is MoE, unless listed in `mlp_only_layers`.
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
    /// DeepSeek / GLM-4.5: layers below `first_k_dense_replace` are dense, then every
    /// `moe_layer_freq`-th is MoE.
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    /// The experts every token goes through beside the routed ones, if any.
    pub shared: Option<SharedMlpConfig>,
    pub scoring: Scoring,
    /// Experts in `n_group` groups, of which the `topk_group` best are eligible (1 and 1: all).
    pub n_group: usize,
    pub topk_group: usize,
    pub group_score: GroupScore,
    /// Multiplies the routing weights (DeepSeek, GLM-4.5); 1 elsewhere.
    pub routed_scaling_factor: f64,
}

/// A MoE layer's shared MLP, as each family names and sizes it (relative to the layer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedMlpConfig {
    /// DeepSeek / GLM-4.5 `mlp.shared_experts` (`n_shared_experts · moe_intermediate_size` wide),
    /// Qwen2-MoE / Qwen3-Next `mlp.shared_expert` (`shared_expert_intermediate_size`), HunYuan
    /// `mlp.shared_mlp` (`num_shared_expert · intermediate_size`).
    pub module: &'static str,
    pub width: usize,
    /// Qwen2-MoE's output gate `sigmoid(mlp.shared_expert_gate(x))`.
    pub gated: bool,
}

impl SharedMlpConfig {
    /// The gate's module name (`mlp.shared_expert_gate`) when the shared MLP is gated.
    pub fn gate_module(&self) -> Option<String> {
        self.gated.then(|| format!("{}_gate", self.module))
    }
}

impl MoeConfig {
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        !self.mlp_only_layers.contains(&layer)
            && layer >= self.first_k_dense_replace
            && self.moe_layer_freq > 0
            && layer % self.moe_layer_freq == 0
            && self.decoder_sparse_step > 0
            && (layer + 1) % self.decoder_sparse_step == 0
    }
}

/// The text decoder's dimensions, normalized across spellings.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub hidden_act: String,
    pub rope: RopeConfig,
    pub moe: Option<MoeConfig>,
    pub attention_bias: Option<bool>,
    /// Qwen (1)'s `use_logn_attn`: queries at 1-based position `i > seq_length` are scaled by
    /// `log(i) / log(seq_length)`. Holds `seq_length`.
    pub logn_attention: Option<usize>,
    /// DeepSeek's multi-head latent attention, when `kv_lora_rank` is set; `head_dim` is then its
    /// query/key head (`qk_nope_head_dim + qk_rope_head_dim`).
    pub mla: Option<MlaConfig>,
    /// Multi-token-prediction layers stored after the decoder layers (`num_nextn_predict_layers`).
    pub mtp_layers: usize,
    /// Qwen3-Next's Gated DeltaNet layers, when the config has them.
    pub linear_attn: Option<LinearAttnConfig>,
    /// What the stored RMSNorm weights are offset by: 1 for zero-centred norms that compute
    /// `x̂ · (1 + w)` (Qwen3-Next), else 0.
    pub norm_offset: f32,
    /// Cross-layer attention (Hunyuan-Large's `use_cla` with `cla_share_factor`): only layers whose
    /// index is a multiple of it compute keys and values; the layers after one reuse its keys
    /// (rotated, before the key norm) and values. 1 without CLA.
    pub cla_share_factor: usize,
}

/// Qwen3-Next's hybrid layout: Gated DeltaNet linear attention (`linear_attn`) in most layers,
/// gated full attention in the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearAttnConfig {
    pub num_k_heads: usize,
    pub num_v_heads: usize,
    pub k_head_dim: usize,
    pub v_head_dim: usize,
    /// The causal depthwise conv1d's kernel (`linear_conv_kernel_dim`).
    pub conv_kernel: usize,
    /// Per decoder layer, whether it is a linear-attention one: config.json's `layer_types`, or
    /// every layer but each `full_attention_interval`-th (the releases' spelling).
    pub linear_layers: Vec<bool>,
}

impl LinearAttnConfig {
    /// Whether decoder layer `i` is a linear-attention one.
    pub fn is_linear(&self, i: usize) -> bool {
        self.linear_layers.get(i).copied().unwrap_or(false)
    }
}

impl TextConfig {
    /// Whether decoder layer `i` computes its own keys and values (with cross-layer attention, only
    /// every `cla_share_factor`-th layer does; the others attend to the keys and values it carries).
    pub fn owns_kv(&self, i: usize) -> bool {
        i % self.cla_share_factor.max(1) == 0
    }

    /// Reads the text decoder's config: `text_config` (or InternVL's `llm_config`) where present,
    /// else the top level.
    pub fn from_json(config: &Value) -> Result<TextConfig> {
        let mut layers = Vec::new();
        for key in ["text_config", "llm_config"] {
            if let Some(t) = config.get(key).filter(|t| t.is_object()) {
                layers.push(t.clone());
            }
        }
        layers.push(config.clone());
        let c = ConfigView::new("config.json", layers);

        let hidden_size = c.usize(&["hidden_size", "n_embd", "d_model"])?;
        let num_heads = c.usize(&["num_attention_heads", "n_head"])?;
        let num_kv_heads = c.opt_usize(&["num_key_value_heads"])?.unwrap_or(num_heads);
        let mla = match c.opt_usize(&["kv_lora_rank"])? {
            Some(kv_lora_rank) => Some(MlaConfig {
                q_lora_rank: c.opt_usize(&["q_lora_rank"])?,
                kv_lora_rank,
                qk_nope_head_dim: c.usize(&["qk_nope_head_dim"])?,
                qk_rope_head_dim: c.usize(&["qk_rope_head_dim"])?,
                v_head_dim: c.usize(&["v_head_dim"])?,
                rope_interleave: c.bool(&["rope_interleave"]).unwrap_or(true)
                    || c.str(&["model_type"]) == Some("deepseek_v2"),
            }),
            None => None,
        };
        // transformers writes head_dim = qk_rope_head_dim into DeepSeek configs; MLA's query/key head
        // is the nope and rope parts together.
        let head_dim = match &mla {
            Some(m) => m.qk_head_dim(),
            None => c
                .opt_usize(&["head_dim", "kv_channels", "attention_head_dim"])?
                .unwrap_or(hidden_size / num_heads.max(1)),
        };
        // Qwen (1)'s `intermediate_size` counts both halves of its MLP (w1 and w2).
        let qwen1 = c.str(&["model_type"]) == Some("qwen");
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            bail!("config.json: {num_heads} attention heads cannot be shared by {num_kv_heads} key/value heads");
        }
        let num_experts = uniform(&c, &["num_experts", "num_local_experts", "n_routed_experts"])?.unwrap_or(0);
        // HunYuan (Hunyuan-A13B `hunyuan_v1_moe`, Hunyuan-Large `hunyuan`) has one FFN per layer: a
        // single "expert" is its dense MLP.
        let large = c.str(&["model_type"]) == Some("hunyuan");
        let hunyuan = large || c.str(&["model_type"]) == Some("hunyuan_v1_moe");
        let cla_share_factor = match c.bool(&["use_cla"]) {
            Some(true) => c.opt_usize(&["cla_share_factor"])?.unwrap_or(1).max(1),
            _ => 1,
        };
        if cla_share_factor > 1 && !hunyuan {
            bail!(
                "config.json: use_cla with cla_share_factor {cla_share_factor}: cross-layer attention is read for \
                 HunYuan (model_type hunyuan, hunyuan_v1_moe) only"
            );
        }
        if hunyuan && c.opt_usize(&["moe_layer_num_skipped"])?.unwrap_or(0) > 0 {
            bail!(
                "config.json: moe_layer_num_skipped > 0 (dense first layers) is not read by lamina's HunYuan decoder"
            );
        }
        let moe = if num_experts > 1 || (num_experts == 1 && !hunyuan) {
            let moe_intermediate_size = match uniform(&c, &["moe_intermediate_size"])? {
                Some(m) => m,
                None => c.usize(&["intermediate_size"])?,
            };
            let model_type = c.str(&["model_type"]).unwrap_or("");
            // DeepSeek-V3, GLM-4.5 and GLM-4.5V score with a sigmoid (their configs may not say so).
            let sigmoid_family =
                ["deepseek_v3", "glm4_moe", "kimi_k2", "glm4v_moe", "glm4v_moe_text"].contains(&model_type);
            let top_k = uniform(&c, &["num_experts_per_tok", "moe_topk", "top_k"])?
                .context("config.json: missing num_experts_per_tok or moe_topk")?;
            let scoring = match c.str(&["scoring_func"]) {
                Some("sigmoid") => Scoring::Sigmoid,
                Some("softmax") => Scoring::Softmax,
                Some(other) => bail!("config.json: scoring_func {other:?} is not supported (softmax, sigmoid)"),
                None if sigmoid_family => Scoring::Sigmoid,
                None => Scoring::Softmax,
            };
            let group_score = match c.str(&["topk_method"]) {
                Some("group_limited_greedy") => GroupScore::Max,
                Some("noaux_tc") => GroupScore::SumTop2,
                Some("greedy") => GroupScore::Max,
                Some(other) => bail!(
                    "config.json: topk_method {other:?} is not supported (greedy, group_limited_greedy, noaux_tc)"
                ),
                None if sigmoid_family => GroupScore::SumTop2,
                None => GroupScore::Max,
            };
            let greedy = c.str(&["topk_method"]) == Some("greedy");
            let n_group = if greedy { 1 } else { c.opt_usize(&["n_group"])?.unwrap_or(1).max(1) };
            let topk_group = if greedy { 1 } else { c.opt_usize(&["topk_group"])?.unwrap_or(n_group).max(1) };
            if num_experts % n_group != 0 || topk_group > n_group {
                bail!(
                    "config.json: {num_experts} experts cannot form {n_group} groups of which {topk_group} are chosen"
                );
            }
            if top_k == 0 || top_k > topk_group * (num_experts / n_group) {
                bail!(
                    "config.json: num_experts_per_tok {top_k} cannot be chosen from the {} experts of {topk_group} \
                     eligible group(s)",
                    topk_group * (num_experts / n_group)
                );
            }
            Some(MoeConfig {
                num_experts,
                top_k,
                moe_intermediate_size,
                // Qwen3-VL-MoE's and Hunyuan-A13B's routers always renormalise their top-k
                // (transformers' Qwen3VLMoeTextTopKRouter, HunYuanMoEV1Gate), whatever the config
                // says; Hunyuan-Large's only when it picks several (its remote code's `top1gating`
                // weighs the one expert by its softmax probability; vLLM's `renormalize=top_k > 1`).
                norm_topk_prob: c.bool(&["norm_topk_prob"]).unwrap_or(false)
                    || model_type.starts_with("qwen3_vl_moe")
                    || (hunyuan && !large)
                    || (large && top_k > 1),
                decoder_sparse_step: c.opt_usize(&["decoder_sparse_step"])?.unwrap_or(1),
                mlp_only_layers: c.usize_list(&["mlp_only_layers"])?.unwrap_or_default(),
                first_k_dense_replace: c.opt_usize(&["first_k_dense_replace"])?.unwrap_or(0),
                moe_layer_freq: c.opt_usize(&["moe_layer_freq"])?.unwrap_or(1),
                shared: shared_mlp(&c, hunyuan, moe_intermediate_size)?,
                scoring,
                n_group,
                topk_group,
                group_score,
                routed_scaling_factor: c.f64(&["routed_scaling_factor"])?.unwrap_or(1.0),
            })
        } else {
            None
        };
        let num_layers = c.usize(&["num_hidden_layers", "n_layer", "num_layers"])?;
        Ok(TextConfig {
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: c
                .opt_usize(&["intermediate_size"])?
                .map(|i| if qwen1 { i / 2 } else { i })
                .unwrap_or(4 * hidden_size),
            vocab_size: c.usize(&["vocab_size"])?,
            rms_norm_eps: c.f64(&["rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"])?.unwrap_or(1e-6),
            tie_word_embeddings: c.bool(&["tie_word_embeddings"]).unwrap_or(false),
            hidden_act: c.str(&["hidden_act"]).unwrap_or("silu").to_string(),
            rope: rope_config(&c)?,
            moe,
            attention_bias: c.bool(&["attention_bias"]),
            logn_attention: match (qwen1, c.bool(&["use_logn_attn"])) {
                (true, Some(true)) => Some(c.usize(&["seq_length"])?),
                _ => None,
            },
            mla,
            mtp_layers: c.opt_usize(&["num_nextn_predict_layers", "num_mtp_layers"])?.unwrap_or(0),
            linear_attn: match c.opt_usize(&["linear_num_value_heads"])? {
                Some(num_v_heads) => {
                    let num_k_heads = c.usize(&["linear_num_key_heads"])?;
                    if num_k_heads == 0 || num_v_heads % num_k_heads != 0 {
                        bail!("config.json: {num_v_heads} linear-attention value heads cannot share {num_k_heads} key heads");
                    }
                    Some(LinearAttnConfig {
                        num_k_heads,
                        num_v_heads,
                        k_head_dim: c.usize(&["linear_key_head_dim"])?,
                        v_head_dim: c.usize(&["linear_value_head_dim"])?,
                        conv_kernel: c.opt_usize(&["linear_conv_kernel_dim"])?.unwrap_or(4).max(1),
                        linear_layers: match c.get(&["layer_types"]).and_then(|t| t.as_array()) {
                            Some(types) => types.iter().map(|t| t.as_str() == Some("linear_attention")).collect(),
                            None => {
                                let interval = c.opt_usize(&["full_attention_interval"])?.unwrap_or(4).max(1);
                                (0..num_layers).map(|i| (i + 1) % interval != 0).collect()
                            }
                        },
                    })
                }
                None => None,
            },
            norm_offset: if c.str(&["model_type"]) == Some("qwen3_next") { 1.0 } else { 0.0 },
            cla_share_factor,
        })
    }
}

/// An integer that HunYuan's configs may give per layer (`moe_topk: [8, 8, ...]`): a number, or a
/// list whose entries are all equal. Lists that differ between layers are refused by name.
fn uniform(c: &ConfigView, keys: &[&str]) -> Result<Option<usize>> {
    match c.get(keys) {
        Some(Value::Array(_)) => {
            let key = keys.iter().find(|k| c.get(&[**k]).is_some()).unwrap_or(&keys[0]);
            let list = c.usize_list(&[key])?.unwrap_or_default();
            match list.first() {
                None => bail!("config.json: {key} is an empty list"),
                Some(&v) if list.iter().all(|&x| x == v) => Ok(Some(v)),
                Some(_) => {
                    bail!(
                        "config.json: {key} differs between layers ({list:?}); lamina reads one value for every layer"
                    )
                }
            }
        }
        _ => c.opt_usize(keys),
    }
}

/// The shared MLP of a MoE layer, from whichever spelling the family's config uses.
fn shared_mlp(c: &ConfigView, hunyuan: bool, moe_intermediate_size: usize) -> Result<Option<SharedMlpConfig>> {
    if hunyuan {
        // vLLM's hunyuan_v1.py: a shared MLP `intermediate_size · num_shared_expert` wide when
        // `use_mixed_mlp_moe`.
        if !c.bool(&["use_mixed_mlp_moe"]).unwrap_or(false) {
            return Ok(None);
        }
        let n = uniform(c, &["num_shared_expert"])?.unwrap_or(1);
        let width = c.usize(&["intermediate_size"])? * n;
        return Ok((n > 0).then_some(SharedMlpConfig { module: "mlp.shared_mlp", width, gated: false }));
    }
    if let Some(n) = c.opt_usize(&["n_shared_experts"])?.filter(|&n| n > 0) {
        return Ok(Some(SharedMlpConfig {
            module: "mlp.shared_experts",
            width: n * moe_intermediate_size,
            gated: false,
        }));
    }
    Ok(c.opt_usize(&["shared_expert_intermediate_size"])?.map(|width| SharedMlpConfig {
        module: "mlp.shared_expert",
        width,
        gated: true,
    }))
}

/// `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (releases); Qwen (1)'s
/// `rotary_emb_base`, `rotary_pct` and `use_dynamic_ntk`.
fn rope_config(c: &ConfigView) -> Result<RopeConfig> {
    let params = c.sub(&["rope_parameters", "rope_scaling"]);
    let theta = params
        .as_ref()
        .map(|p| p.f64(&["rope_theta"]))
        .transpose()?
        .flatten()
        .or(c.f64(&["rope_theta", "rotary_emb_base"])?)
        .unwrap_or(10000.0);
    let (mrope_section, mrope_interleaved) = match &params {
        Some(p) => (p.usize_list(&["mrope_section"])?, p.bool(&["mrope_interleaved"]).unwrap_or(false)),
        None => (None, false),
    };
    let kind = params.as_ref().and_then(|p| p.str(&["rope_type", "type"])).unwrap_or("default").to_string();
    // vLLM and older transformers spell DeepSeek's YaRN `deepseek_yarn`.
    let kind = if kind == "deepseek_yarn" { "yarn".to_string() } else { kind };
    let partial_rotary_factor = match c.f64(&["partial_rotary_factor", "rotary_pct"])? {
        Some(f) => f,
        None => params.as_ref().map(|p| p.f64(&["partial_rotary_factor"])).transpose()?.flatten().unwrap_or(1.0),
    };
    let alpha = params.as_ref().map(|p| p.f64(&["alpha"])).transpose()?.flatten();
    // "dynamic" with an `alpha` is HunYuan's fixed base; with a `factor` it grows with the length.
    let scaling = match (&params, kind.as_str(), alpha) {
        (Some(p), "dynamic", None) => {
            let factor = p.f64(&["factor"])?.context("config.json: the dynamic rope scaling has no factor")?;
            let max_positions = match p.opt_usize(&["original_max_position_embeddings"])? {
                Some(m) => m,
                None => c.usize(&["original_max_position_embeddings", "max_position_embeddings"])?,
            };
            RopeScaling::DynamicNtk { factor, max_positions }
        }
        _ if c.str(&["model_type"]) == Some("qwen") && c.bool(&["use_dynamic_ntk"]) == Some(true) => {
            RopeScaling::QwenNtk { seq_length: c.usize(&["seq_length"])? }
        }
        _ => RopeScaling::None,
    };
    let yarn = match (&params, kind.as_str()) {
        (Some(p), "yarn") => {
            let max_pos = c.f64(&["max_position_embeddings"])?;
            let original = p
                .f64(&["original_max_position_embeddings"])?
                .or(max_pos)
                .context("config.json: yarn rope scaling needs original_max_position_embeddings")?;
            let factor = match p.f64(&["factor"])? {
                Some(f) => f,
                None => max_pos.context("config.json: yarn rope scaling needs factor")? / original,
            };
            Some(YarnConfig {
                factor,
                original_max_position_embeddings: original,
                beta_fast: p.f64(&["beta_fast"])?.filter(|&b| b != 0.0).unwrap_or(32.0),
                beta_slow: p.f64(&["beta_slow"])?.filter(|&b| b != 0.0).unwrap_or(1.0),
                mscale: p.f64(&["mscale"])?,
                mscale_all_dim: p.f64(&["mscale_all_dim"])?,
                attention_factor: p.f64(&["attention_factor"])?,
                truncate: p.bool(&["truncate"]).unwrap_or(true),
            })
        }
        _ => None,
    };
    Ok(RopeConfig { theta, kind, yarn, mrope_section, mrope_interleaved, partial_rotary_factor, alpha, scaling })
}

/// The `vision_config` object (Qwen-VL: `visual`), if the model has one.
pub fn vision_view(config: &Value) -> Option<ConfigView> {
    ["vision_config", "visual"]
        .iter()
        .find_map(|k| config.get(*k))
        .filter(|v| v.is_object())
        .map(|v| ConfigView::new("config.json vision_config", vec![v.clone()]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn both_spellings_of_moe_and_rope() {
        let t5 = json!({"text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "num_local_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": true,
            "rope_parameters": {"mrope_interleaved": true, "mrope_section": [2,3,3], "rope_theta": 5e6, "rope_type": "default"}}});
        let rel = json!({"text_config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1000, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 48, "norm_topk_prob": true, "rope_theta": 5e6,
            "rope_scaling": {"mrope_interleaved": true, "mrope_section": [2,3,3], "rope_type": "default"}}});
        let a = TextConfig::from_json(&t5).unwrap();
        let b = TextConfig::from_json(&rel).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.moe.as_ref().unwrap().num_experts, 4);
        assert_eq!(a.rope.theta, 5e6);
        assert_eq!(a.rope.mrope_section, Some(vec![2, 3, 3]));
        assert!(a.rope.mrope_interleaved);
    }

    #[test]
    fn flat_qwen2_vl_release_config() {
        let c = json!({"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10,
            "rope_theta": 1e6, "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 0]}});
        let t = TextConfig::from_json(&c).unwrap();
        assert_eq!(t.head_dim, 4);
        assert_eq!(t.num_kv_heads, 2);
        assert_eq!(t.rope.mrope_section, Some(vec![1, 1, 0]));
    }

    /// Hunyuan-A13B's release config: per-layer lists read when their entries agree, the shared MLP
    /// `num_shared_expert · intermediate_size` wide (vLLM's hunyuan_v1.py), the router always
    /// renormalised; lists that differ and cross-layer attention refused by name.
    #[test]
    fn hunyuan_per_layer_lists_shared_mlp_and_cla() {
        let base = json!({"model_type": "hunyuan_v1_moe", "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
            "intermediate_size": 48, "num_experts": 4, "moe_topk": [2, 2], "moe_intermediate_size": [32, 32],
            "num_shared_expert": [2, 2], "use_mixed_mlp_moe": true, "use_cla": false, "cla_share_factor": 2,
            "kv_lora_rank": null});
        let m = TextConfig::from_json(&base).unwrap().moe.unwrap();
        assert_eq!((m.num_experts, m.top_k, m.moe_intermediate_size, m.norm_topk_prob), (4, 2, 32, true));
        assert_eq!(m.shared, Some(SharedMlpConfig { module: "mlp.shared_mlp", width: 96, gated: false }));
        let mut differ = base.clone();
        differ["moe_topk"] = json!([2, 1]);
        let e = TextConfig::from_json(&differ).unwrap_err().to_string();
        assert!(e.contains("moe_topk") && e.contains("differs between layers"), "{e}");
        let mut cla = base.clone();
        cla["use_cla"] = json!(true);
        let t = TextConfig::from_json(&cla).unwrap();
        assert_eq!(t.cla_share_factor, 2);
        assert_eq!((0..4).map(|i| t.owns_kv(i)).collect::<Vec<_>>(), [true, false, true, false]);
        assert_eq!(TextConfig::from_json(&base).unwrap().cla_share_factor, 1);
        let mut llama = cla.clone();
        llama["model_type"] = json!("llama");
        let e = TextConfig::from_json(&llama).unwrap_err().to_string();
        assert!(e.contains("cross-layer attention") && e.contains("cla_share_factor 2"), "{e}");
    }

    /// Hunyuan-Large (`hunyuan`) routes each token to one expert weighted by its softmax
    /// probability (no renormalisation at top-1), and renormalises when it picks several.
    #[test]
    fn hunyuan_large_renormalises_only_several_experts() {
        let cfg = |k: usize| {
            json!({"model_type": "hunyuan", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 100, "intermediate_size": 48, "num_experts": 4,
                "moe_topk": k, "use_mixed_mlp_moe": true, "num_shared_expert": 1, "use_cla": true,
                "cla_share_factor": 2})
        };
        let one = TextConfig::from_json(&cfg(1)).unwrap();
        assert_eq!((one.head_dim, one.cla_share_factor), (16, 2));
        assert!(!one.moe.unwrap().norm_topk_prob);
        assert!(TextConfig::from_json(&cfg(2)).unwrap().moe.unwrap().norm_topk_prob);
    }

    #[test]
    fn missing_keys_are_named() {
        let err = TextConfig::from_json(&json!({"hidden_size": 8})).unwrap_err().to_string();
        assert!(err.contains("num_attention_heads"), "{err}");
    }
}
