//! The naming rules of every supported family, in one place: where the text decoder layers,
//! vision blocks, embeddings, norms and heads live in a checkpoint, in the release layout and in
//! the layout transformers 5 writes. Everything else in lamina asks this module, never a string
//! of its own.

use super::config::TextConfig;
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    /// InternLM2 (remote code): fused `attention.wqkv` grouped per KV head, `feed_forward.w1/w3/w2`.
    InternLm2,
    /// Qwen (1) (remote code): `transformer.h.N`, fused `attn.c_attn`, `mlp.w2` (gate) / `w1` (up).
    Qwen,
    /// Qwen-VL / Qwen-VL-Chat (remote code, config.json's `model_type` is `qwen` with a `visual`
    /// section): the ViT with its attention-pooling resampler under `transformer.visual.*` beside
    /// the Qwen (1) decoder. lamina names the family `qwen_vl` (its recipes' key).
    QwenVl,
    Qwen2Vl,
    Qwen25Vl,
    Qwen3Vl,
    Qwen3VlMoe,
    Llava,
    /// InternVL 2 / 2.5 / 3 / 3.5 as released (remote code `internvl_chat`, `InternVLChatModel`):
    /// InternViT (`vision_model.*`), the `mlp1` projector, and the language model its `llm_config`
    /// names (Qwen2, Qwen3, LLaMA or InternLM2), in that model's own names under `language_model.`.
    InternVlChat,
    /// InternVL as transformers converts it (the `-hf` checkpoints, `model_type: internvl`,
    /// `InternVLForConditionalGeneration`): the same InternViT and projector math under
    /// transformers' names (`model.vision_tower.*` with separate q/k/v, `model.multi_modal_projector.*`,
    /// see [`InternVitNames::HF`]) and the language model its `text_config` names under
    /// `model.language_model.`.
    InternVl,
    /// GLM-4.1V (`Glm4vForConditionalGeneration`): the GLM-4.1V vision tower (`model.visual.*`) and a
    /// GLM-4 language model (`model.language_model.*`, sandwich norms) with M-RoPE positions.
    Glm4v,
    /// GLM-4.5V / GLM-4.6V (`Glm4vMoeForConditionalGeneration`): GLM-4.1V's vision tower and a GLM-4.5
    /// MoE language model (`model.language_model.*`, per-expert linears in the release) with M-RoPE
    /// positions over a partial rotary (`rotate_half`, not GLM-4.1V's adjacent pairs).
    Glm4vMoe,
    /// GLM-4 (`-hf` releases, `Glm4ForCausalLM`): sandwich norms, fused `mlp.gate_up_proj`.
    Glm4,
    /// DeepSeek-V2, V2-Lite, Coder-V2 (MLA, softmax router).
    DeepseekV2,
    /// DeepSeek-V3, R1, V3.1 and Kimi-K2 (MLA, sigmoid router, FP8 releases, an MTP layer).
    DeepseekV3,
    /// GLM-4.5 / 4.6 (`Glm4MoeForCausalLM`): first layers dense, then sigmoid-routed experts with a
    /// correction bias beside shared experts; a multi-token-prediction layer after the last.
    Glm4Moe,
    /// Qwen3-Next (`Qwen3NextForCausalLM`): Gated DeltaNet and gated full attention layers,
    /// zero-centred norms, MoE with a gated shared expert, an MTP block under `mtp.`.
    Qwen3Next,
    /// Hunyuan-A13B (`HunYuanMoEV1ForCausalLM`, transformers-native): q/k norms after RoPE
    /// (`query_layernorm` / `key_layernorm`), NTK-alpha rope, every layer routed experts under the
    /// router `mlp.gate.wg` beside an ungated `mlp.shared_mlp`.
    HunyuanV1Moe,
    /// Hunyuan-Large (`HunYuanForCausalLM`, remote code `hunyuan`; Hunyuan-A52B): HunYuan's layer
    /// with cross-layer attention (`use_cla`: the layers between two `cla_share_factor` multiples
    /// have no `k_proj` / `v_proj` and attend to the keys and values of the layer before them) and
    /// top-1 routing without renormalisation.
    Hunyuan,
    /// Any other decoder-only model whose layers are named `*.layers.N.*`.
    Generic,
}

impl Family {
    pub const ALL: [Family; 23] = [
        Family::Llama,
        Family::Qwen2,
        Family::Qwen3,
        Family::Qwen3Moe,
        Family::InternLm2,
        Family::Qwen,
        Family::QwenVl,
        Family::Qwen2Vl,
        Family::Qwen25Vl,
        Family::Qwen3Vl,
        Family::Qwen3VlMoe,
        Family::Llava,
        Family::InternVlChat,
        Family::InternVl,
        Family::Glm4v,
        Family::Glm4vMoe,
        Family::Glm4,
        Family::DeepseekV2,
        Family::DeepseekV3,
        Family::Glm4Moe,
        Family::Qwen3Next,
        Family::HunyuanV1Moe,
        Family::Hunyuan,
    ];

    /// The `model_type` of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Qwen3Moe => "qwen3_moe",
            Family::InternLm2 => "internlm2",
            Family::Qwen => "qwen",
            Family::QwenVl => "qwen_vl",
            Family::Qwen2Vl => "qwen2_vl",
            Family::Qwen25Vl => "qwen2_5_vl",
            Family::Qwen3Vl => "qwen3_vl",
            Family::Qwen3VlMoe => "qwen3_vl_moe",
            Family::Llava => "llava",
            Family::InternVlChat => "internvl_chat",
            Family::InternVl => "internvl",
            Family::Glm4v => "glm4v",
            Family::Glm4vMoe => "glm4v_moe",
            Family::Glm4 => "glm4",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::Glm4Moe => "glm4_moe",
            Family::Qwen3Next => "qwen3_next",
            Family::HunyuanV1Moe => "hunyuan_v1_moe",
            Family::Hunyuan => "hunyuan",
            Family::Generic => "generic",
        }
    }

    pub fn from_model_type(t: &str) -> Option<Family> {
        Family::ALL.into_iter().find(|f| f.model_type() == t)
    }

    pub fn is_vision_language(self) -> bool {
        matches!(
            self,
            Family::QwenVl
                | Family::Qwen2Vl
                | Family::Qwen25Vl
                | Family::Qwen3Vl
                | Family::Qwen3VlMoe
                | Family::Llava
                | Family::InternVlChat
                | Family::InternVl
                | Family::Glm4v
                | Family::Glm4vMoe
        )
    }

    /// Reads `model_type` (or `architectures`) from config.json. Unknown types fall back to
    /// [`Family::Generic`] when the caller allows it (tensor names decide later). A `qwen` config
    /// with a `visual` section is Qwen-VL.
    pub fn detect(config: &Value) -> Option<Family> {
        let family = match config.get("model_type").and_then(|v| v.as_str()).and_then(Family::from_model_type) {
            Some(f) => f,
            None => {
                let arch = config.get("architectures")?.as_array()?.first()?.as_str()?;
                Family::from_architecture(arch)?
            }
        };
        Some(if family == Family::Qwen && has_visual(config) { Family::QwenVl } else { family })
    }

    fn from_architecture(arch: &str) -> Option<Family> {
        let by_arch = [
            ("LlamaForCausalLM", Family::Llama),
            ("Qwen2ForCausalLM", Family::Qwen2),
            ("Qwen3ForCausalLM", Family::Qwen3),
            ("Qwen3MoeForCausalLM", Family::Qwen3Moe),
            ("InternLM2ForCausalLM", Family::InternLm2),
            ("QWenLMHeadModel", Family::Qwen),
            ("Qwen2VLForConditionalGeneration", Family::Qwen2Vl),
            ("Qwen2_5_VLForConditionalGeneration", Family::Qwen25Vl),
            ("Qwen3VLForConditionalGeneration", Family::Qwen3Vl),
            ("Qwen3VLMoeForConditionalGeneration", Family::Qwen3VlMoe),
            ("LlavaForConditionalGeneration", Family::Llava),
            ("InternVLChatModel", Family::InternVlChat),
            ("InternVLForConditionalGeneration", Family::InternVl),
            ("Glm4vForConditionalGeneration", Family::Glm4v),
            ("Glm4vMoeForConditionalGeneration", Family::Glm4vMoe),
            ("Glm4ForCausalLM", Family::Glm4),
            ("DeepseekV2ForCausalLM", Family::DeepseekV2),
            ("DeepseekV3ForCausalLM", Family::DeepseekV3),
            ("Glm4MoeForCausalLM", Family::Glm4Moe),
            ("Qwen3NextForCausalLM", Family::Qwen3Next),
            ("HunYuanMoEV1ForCausalLM", Family::HunyuanV1Moe),
            ("HunYuanForCausalLM", Family::Hunyuan),
        ];
        by_arch.iter().find(|(a, _)| *a == arch).map(|&(_, f)| f)
    }

    /// The family whose decoder (and naming inside the text model) the language model uses: the
    /// family itself, or for InternVL the family of its `llm_config` (remote code) or `text_config`
    /// (`-hf`), by `model_type`, else `architectures`. A "qwen" config with a `visual` section is
    /// Qwen-VL, whose vision tower lamina does not read: refused rather than quantized as text.
    pub fn text_family(self, config: &Value) -> Result<Family> {
        if let Some(key) = match self {
            Family::InternVlChat => Some("llm_config"),
            Family::InternVl => Some("text_config"),
            _ => None,
        } {
            let llm = config
                .get(key)
                .filter(|v| v.is_object())
                .with_context(|| format!("config.json of {} has no {key}", self.model_type()))?;
            let arch = llm.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str);
            let family = llm
                .get("model_type")
                .and_then(Value::as_str)
                .and_then(Family::from_model_type)
                .or_else(|| arch.and_then(Family::from_architecture));
            return match family {
                Some(f @ (Family::Llama | Family::Qwen2 | Family::Qwen3 | Family::Qwen3Moe | Family::InternLm2)) => {
                    Ok(f)
                }
                _ => bail!(
                    "the language model of this InternVL checkpoint ({}) is not one lamina computes \
                     (InternLM2, Qwen2, Qwen3, Qwen3-MoE and LLaMA are)",
                    arch.or(llm.get("model_type").and_then(Value::as_str)).unwrap_or("unnamed")
                ),
            };
        }
        // GLM-4.1V's language model is GLM-4 (glm4.rs) under its own names, with M-RoPE positions
        // (`text_config.rope_parameters.mrope_section`).
        // GLM-4.5V / 4.6V's is GLM-4.5's MoE decoder (decoder/standard.rs with moe.rs), likewise.
        match self {
            Family::Glm4v => return Ok(Family::Glm4),
            Family::Glm4vMoe => return Ok(Family::Glm4Moe),
            _ => {}
        }
        if self == Family::QwenVl {
            return Ok(Family::Qwen);
        }
        if self == Family::Qwen && has_visual(config) {
            bail!(
                "config.json describes Qwen-VL (model_type \"qwen\" with a `visual` section), which lamina reads \
                 as qwen_vl (its vision tower and the Qwen (1) decoder), not as the text-only qwen"
            );
        }
        Ok(self)
    }
}

/// Whether a config has Qwen-VL's `visual` section.
fn has_visual(config: &Value) -> bool {
    config.get("visual").is_some_and(|v| v.is_object())
}

/// Which vision tower a family carries; the vision forward dispatches on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisionKind {
    Qwen2Vl,
    Qwen25Vl,
    Qwen3Vl,
    Clip,
    /// InternViT with InternVL's pixel shuffle and `mlp1` (see `vision::internvit`).
    InternVit,
    /// GLM-4.1V / 4.5V / 4.6V's tower (see `vision::glm4v`).
    Glm4v,
    /// Qwen-VL's ViT and attention-pooling resampler (see `vision::qwen_vl`).
    QwenVl,
}

impl VisionKind {
    /// Whether the language model takes M-RoPE positions from `get_rope_index` for image prompts
    /// (the Qwen VL towers); the others use 1D positions.
    pub fn uses_mrope(self) -> bool {
        matches!(self, VisionKind::Qwen2Vl | VisionKind::Qwen25Vl | VisionKind::Qwen3Vl | VisionKind::Glm4v)
    }
}

/// InternViT and its projector under the two names InternVL is published in: the remote code's
/// (`internvl_chat`: modeling_intern_vit.py, `mlp1`) and transformers' (`internvl`, the `-hf`
/// conversions: modeling_internvl.py, `multi_modal_projector`). The math is one
/// (`vision::internvit`); only the names and the config keys differ. Module names are relative to
/// the vision root (embeddings), to a block, or to the projector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InternVitNames {
    pub class: &'static str,
    pub patch: &'static str,
    pub position: &'static str,
    pub norm1: &'static str,
    pub norm2: &'static str,
    /// The remote code's fused `attn.qkv` (query rows, then key rows, then value rows), or
    /// transformers' three projections.
    pub qkv: QkvNames,
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    pub proj: &'static str,
    pub fc1: &'static str,
    pub fc2: &'static str,
    /// The layer scales of the attention and MLP branches.
    pub ls1: &'static str,
    pub ls2: &'static str,
    /// The tower's final norm (`use_mean_pooling: false`, on the last hidden state only); the remote
    /// code has none.
    pub final_norm: Option<&'static str>,
    /// The projector's LayerNorm, first linear and second linear.
    pub projector: [&'static str; 3],
    /// config.json keys: the hidden state the features come from, the q/k/v bias flag, the q/k norm flag.
    pub feature_layer_key: &'static str,
    pub qkv_bias_key: &'static str,
    pub qk_norm_key: &'static str,
    /// The q/k norms' epsilon when it is not the config's `layer_norm_eps`: transformers builds
    /// `InternVLVisionRMSNorm(embed_dim)` with its default 1e-6.
    pub qk_norm_eps: Option<f64>,
}

impl InternVitNames {
    /// modeling_intern_vit.py (`InternVisionModel`) and `InternVLChatModel.mlp1`.
    pub const REMOTE: InternVitNames = InternVitNames {
        class: "embeddings.class_embedding",
        patch: "embeddings.patch_embedding",
        position: "embeddings.position_embedding",
        norm1: "norm1",
        norm2: "norm2",
        qkv: QkvNames::Fused { module: "attn.qkv", rows: FusedQkv::Concatenated },
        q_norm: "attn.q_norm",
        k_norm: "attn.k_norm",
        proj: "attn.proj",
        fc1: "mlp.fc1",
        fc2: "mlp.fc2",
        ls1: "ls1",
        ls2: "ls2",
        final_norm: None,
        projector: ["0", "1", "3"],
        feature_layer_key: "select_layer",
        qkv_bias_key: "qkv_bias",
        qk_norm_key: "qk_normalization",
        qk_norm_eps: None,
    };
    /// transformers' modeling_internvl.py (`InternVLVisionModel`, `InternVLMultiModalProjector`).
    pub const HF: InternVitNames = InternVitNames {
        class: "embeddings.cls_token",
        patch: "embeddings.patch_embeddings.projection",
        position: "embeddings.position_embeddings",
        norm1: "layernorm_before",
        norm2: "layernorm_after",
        qkv: QkvNames::Separate { q: "attention.q_proj", k: "attention.k_proj", v: "attention.v_proj" },
        q_norm: "attention.q_norm",
        k_norm: "attention.k_norm",
        proj: "attention.projection_layer",
        fc1: "mlp.fc1",
        fc2: "mlp.fc2",
        ls1: "lambda_1",
        ls2: "lambda_2",
        final_norm: Some("layernorm"),
        projector: ["layer_norm", "linear_1", "linear_2"],
        feature_layer_key: "vision_feature_layer",
        qkv_bias_key: "attention_bias",
        qk_norm_key: "use_qk_norm",
        qk_norm_eps: Some(1e-6),
    };

    pub fn of(family: Family) -> &'static InternVitNames {
        if family == Family::InternVl {
            &InternVitNames::HF
        } else {
            &InternVitNames::REMOTE
        }
    }
}

/// How the language model names the modules inside a decoder layer, relative to the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderNames {
    /// The norm before attention, and the one before the MLP.
    pub attn_norm: &'static str,
    pub mlp_norm: &'static str,
    /// The attention module (its KV cache is keyed by this name).
    pub attn: &'static str,
    pub qkv: QkvNames,
    pub o_proj: &'static str,
    /// Qwen3's per-head q/k RMSNorms (optional tensors).
    pub q_norm: &'static str,
    pub k_norm: &'static str,
    /// The dense SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    /// A MoE layer's router (`mlp.gate`; HunYuan's `mlp.gate.wg`). Its experts are
    /// `mlp.experts.J.{gate,up,down}_proj` in every family lamina reads.
    pub router: &'static str,
}

/// The query, key and value projections: three linears, or one fused linear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkvNames {
    Separate { q: &'static str, k: &'static str, v: &'static str },
    Fused { module: &'static str, rows: FusedQkv },
}

/// The order of the output rows of a fused query/key/value projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedQkv {
    /// All query rows, then all key rows, then all value rows (Qwen's `c_attn`).
    Concatenated,
    /// For each key/value head: its group of query heads, then its key head, then its value head
    /// (InternLM2's `wqkv`, which its modeling file splits with
    /// `rearrange("b q (h gs d) -> b q h gs d", gs=2 + groups)`).
    PerKvHead,
}

impl DecoderNames {
    /// Llama, Qwen2/3 and the Qwen2/2.5/3-VL and LLaVA language models.
    pub const STANDARD: DecoderNames = DecoderNames {
        attn_norm: "input_layernorm",
        mlp_norm: "post_attention_layernorm",
        attn: "self_attn",
        qkv: QkvNames::Separate { q: "self_attn.q_proj", k: "self_attn.k_proj", v: "self_attn.v_proj" },
        o_proj: "self_attn.o_proj",
        q_norm: "self_attn.q_norm",
        k_norm: "self_attn.k_norm",
        gate: "mlp.gate_proj",
        up: "mlp.up_proj",
        down: "mlp.down_proj",
        router: "mlp.gate",
    };
    /// Hunyuan-A13B (`HunYuanMoEV1DecoderLayer`; vLLM's hunyuan_v1.py reads the same names and drops
    /// the router's `.wg` when it loads).
    pub const HUNYUAN: DecoderNames = DecoderNames {
        q_norm: "self_attn.query_layernorm",
        k_norm: "self_attn.key_layernorm",
        router: "mlp.gate.wg",
        ..DecoderNames::STANDARD
    };
    /// InternLM2's modeling file (`InternLM2DecoderLayer`).
    pub const INTERNLM2: DecoderNames = DecoderNames {
        attn_norm: "attention_norm",
        mlp_norm: "ffn_norm",
        attn: "attention",
        qkv: QkvNames::Fused { module: "attention.wqkv", rows: FusedQkv::PerKvHead },
        o_proj: "attention.wo",
        q_norm: "attention.q_norm",
        k_norm: "attention.k_norm",
        gate: "feed_forward.w1",
        up: "feed_forward.w3",
        down: "feed_forward.w2",
        router: "mlp.gate",
    };
    /// Qwen (1)'s modeling file (`QWenBlock`): its MLP computes `c_proj(w1(x) · silu(w2(x)))`, so
    /// `w2` is the gate and `w1` the up projection.
    pub const QWEN: DecoderNames = DecoderNames {
        attn_norm: "ln_1",
        mlp_norm: "ln_2",
        attn: "attn",
        qkv: QkvNames::Fused { module: "attn.c_attn", rows: FusedQkv::Concatenated },
        o_proj: "attn.c_proj",
        q_norm: "attn.q_norm",
        k_norm: "attn.k_norm",
        gate: "mlp.w2",
        up: "mlp.w1",
        down: "mlp.c_proj",
        router: "mlp.gate",
    };

    /// The linears reading the attention norm, in order.
    pub fn qkv_modules(&self) -> Vec<String> {
        match self.qkv {
            QkvNames::Separate { q, k, v } => vec![q.into(), k.into(), v.into()],
            QkvNames::Fused { module, .. } => vec![module.into()],
        }
    }
}

/// How a language model names its text model's parts: the layer container, the token embedding,
/// the final norm and the output projection (relative to the text root / head prefix), and the
/// modules inside a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextNames {
    pub layers: &'static str,
    pub embed: &'static str,
    pub norm: &'static str,
    pub head: &'static str,
    pub decoder: DecoderNames,
}

impl TextNames {
    pub fn of(text_family: Family) -> TextNames {
        match text_family {
            Family::InternLm2 => TextNames {
                layers: "layers",
                embed: "tok_embeddings",
                norm: "norm",
                head: "output",
                decoder: DecoderNames::INTERNLM2,
            },
            Family::Qwen => {
                TextNames { layers: "h", embed: "wte", norm: "ln_f", head: "lm_head", decoder: DecoderNames::QWEN }
            }
            Family::HunyuanV1Moe | Family::Hunyuan => TextNames {
                layers: "layers",
                embed: "embed_tokens",
                norm: "norm",
                head: "lm_head",
                decoder: DecoderNames::HUNYUAN,
            },
            _ => TextNames {
                layers: "layers",
                embed: "embed_tokens",
                norm: "norm",
                head: "lm_head",
                decoder: DecoderNames::STANDARD,
            },
        }
    }
}

/// Candidate prefixes of one family: the first is the release layout, later ones are the
/// layouts other savers (transformers 5) use. The checkpoint's tensor names pick one.
struct Rules {
    text: &'static [&'static str],
    vision: &'static [&'static str],
    /// Relative to the vision root: the blocks, the modules before them, the modules after them.
    vision_blocks: &'static str,
    vision_pre: &'static [&'static str],
    vision_post: &'static [&'static str],
    /// Modules outside the vision root that belong to the vision side (LLaVA's projector).
    projector: &'static [&'static str],
    /// What goes before the output projection's name (`language_model.` in LLaVA's release).
    head_prefix: &'static [&'static str],
}

const DECODER: Rules = Rules {
    text: &["model"],
    vision: &[],
    vision_blocks: "",
    vision_pre: &[],
    vision_post: &[],
    projector: &[],
    head_prefix: &[""],
};

fn rules(family: Family) -> Rules {
    match family {
        Family::Llama
        | Family::Qwen2
        | Family::Qwen3
        | Family::Qwen3Moe
        | Family::InternLm2
        | Family::Glm4
        | Family::DeepseekV2
        | Family::DeepseekV3
        | Family::Glm4Moe
        | Family::Qwen3Next
        | Family::HunyuanV1Moe
        | Family::Hunyuan
        | Family::Generic => DECODER,
        Family::Qwen => Rules { text: &["transformer"], ..DECODER },
        // visual.py's VisionTransformer under QWenModel (`transformer.visual`).
        Family::QwenVl => Rules {
            text: &["transformer"],
            vision: &["transformer.visual"],
            vision_blocks: "transformer.resblocks",
            vision_pre: &["conv1", "positional_embedding", "ln_pre"],
            vision_post: &["attn_pool", "ln_post", "proj"],
            projector: &[],
            head_prefix: &[""],
        },
        Family::Qwen2Vl | Family::Qwen25Vl => Rules {
            text: &["model", "model.language_model"],
            vision: &["visual", "model.visual"],
            vision_blocks: "blocks",
            vision_pre: &["patch_embed"],
            vision_post: &["merger"],
            projector: &[],
            head_prefix: &[""],
        },
        Family::Qwen3Vl | Family::Qwen3VlMoe => Rules {
            text: &["model.language_model", "model"],
            vision: &["model.visual", "visual"],
            vision_blocks: "blocks",
            vision_pre: &["patch_embed", "pos_embed"],
            vision_post: &["merger", "deepstack_merger_list"],
            projector: &[],
            head_prefix: &[""],
        },
        Family::Llava => Rules {
            text: &["language_model.model", "model.language_model"],
            vision: &["vision_tower.vision_model", "model.vision_tower.vision_model"],
            vision_blocks: "encoder.layers",
            vision_pre: &["embeddings", "pre_layrnorm"],
            vision_post: &["post_layernorm"],
            projector: &["multi_modal_projector", "model.multi_modal_projector"],
            head_prefix: &["language_model.", ""],
        },
        // The release layout; the language model's own names follow (`TextNames`).
        // GLM-4.1V, 4.5V and 4.6V releases (transformers 4.53+ layout), and the older saver's names.
        Family::Glm4v | Family::Glm4vMoe => Rules {
            text: &["model.language_model", "model"],
            vision: &["model.visual", "visual"],
            vision_blocks: "blocks",
            vision_pre: &["patch_embed", "embeddings", "post_conv_layernorm"],
            vision_post: &["post_layernorm", "downsample", "merger"],
            projector: &[],
            head_prefix: &[""],
        },
        Family::InternVlChat => Rules {
            text: &["language_model.model"],
            vision: &["vision_model"],
            vision_blocks: "encoder.layers",
            vision_pre: &["embeddings"],
            vision_post: &[],
            projector: &["mlp1"],
            head_prefix: &["language_model."],
        },
        // transformers' InternVLForConditionalGeneration (the `-hf` conversions; `InternVitNames::HF`),
        // and the layout transformers 4 saved LLaVA-like models in.
        Family::InternVl => Rules {
            text: &["model.language_model", "language_model.model"],
            vision: &["model.vision_tower", "vision_tower"],
            vision_blocks: "encoder.layer",
            vision_pre: &["embeddings"],
            vision_post: &["layernorm"],
            projector: &["model.multi_modal_projector", "multi_modal_projector"],
            head_prefix: &["", "language_model."],
        },
    }
}

/// Linears a family stores fused by rows that the loaders expect split, names relative to a text
/// layer: (fused module, its parts in row order, each an equal share of the rows). The output is
/// written under the parts' names. GLM-4's `mlp.gate_up_proj` holds gate's rows then up's
/// (transformers' `chunk(2)`); vLLM serves it as `gate_up_proj` packed from `gate_proj` and
/// `up_proj` (its `packed_modules_mapping`), so vLLM-Ascend looks the parts' quantization up by
/// those names.
pub fn row_splits(family: Family) -> &'static [(&'static str, &'static [&'static str])] {
    match family {
        Family::Glm4 => &[("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"])],
        _ => &[],
    }
}

/// Where a family keeps its multi-token-prediction (MTP) layers, which the decoder's forward does not
/// run: each is a unit of its own ([`UnitKind::Mtp`]), processed after the head and written with the
/// rest; their linears stay float (the plan types them so: vLLM-Ascend loads the MTP draft unquantized).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MtpLayout {
    /// DeepSeek-V3: `{text}.layers.{first + k}.*`, after the `first` decoder layers
    /// (`num_hidden_layers`): enorm, hnorm, eh_proj, a full decoder layer, shared_head, embed_tokens.
    AfterDecoder { first: usize },
    /// Everything under one prefix (Qwen3-Next's `mtp.*`), one unit.
    Prefix(String),
}

impl MtpLayout {
    /// The MTP layers of a family, given its config.
    pub fn of(family: Family, text: &TextConfig) -> Option<MtpLayout> {
        match family {
            // Any layer past num_hidden_layers is an MTP layer, whether or not the config counts it.
            Family::DeepseekV2 | Family::DeepseekV3 | Family::Glm4Moe => {
                Some(MtpLayout::AfterDecoder { first: text.num_layers })
            }
            Family::Qwen3Next => Some(MtpLayout::Prefix("mtp".into())),
            _ => None,
        }
    }
}

/// Module names that hold embedding tables: 2D `.weight` tensors that are not linears.
const EMBEDDING_MODULES: [&str; 8] = [
    "embed_tokens",
    "tok_embeddings",
    "pos_embed",
    "position_embedding",
    "wte",
    "wpe",
    "word_embeddings",
    "class_embedding",
];

/// Where the parts of one checkpoint live.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub family: Family,
    /// The family whose decoder the language model is (see [`Family::text_family`]).
    pub text_family: Family,
    /// The text model's root: `{text}.{layers}.N`, `{text}.{embed}`, `{text}.{norm}`.
    pub text: String,
    pub names: TextNames,
    /// The output projection's module (`lm_head`, `language_model.output`).
    pub lm_head: String,
    pub vision: Option<String>,
    pub vision_kind: Option<VisionKind>,
    vision_blocks: String,
    vision_pre: Vec<String>,
    vision_post: Vec<String>,
    pub projector: Option<String>,
    /// Where the MTP layers are, for families that have them ([`Layout::with_mtp`]).
    pub mtp: Option<MtpLayout>,
}

impl Layout {
    /// Picks the layout variant whose names the checkpoint holds; with no names (a config alone)
    /// the release layout is used. `text_family` is [`Family::text_family`] of the config.
    pub fn resolve(family: Family, text_family: Family, names: &[&str]) -> Result<Layout> {
        let r = rules(family);
        let tn = TextNames::of(text_family);
        let has_prefix = |p: &str| names.iter().any(|n| n.starts_with(p));
        let pick = |cands: &[&str], probe: &dyn Fn(&str) -> String| -> Option<String> {
            if cands.is_empty() {
                return None;
            }
            Some(cands.iter().find(|c| has_prefix(&probe(c))).unwrap_or(&cands[0]).to_string())
        };
        let text = if family == Family::Generic {
            generic_text_root(names)?
        } else {
            pick(r.text, &|c| format!("{c}.{}.", tn.layers)).unwrap()
        };
        let vision = pick(r.vision, &|c| format!("{c}.{}.", r.vision_blocks));
        let projector = pick(r.projector, &|c| format!("{c}."));
        let head_prefix = pick(r.head_prefix, &|c| format!("{c}{}.", tn.head)).unwrap_or_default();
        let vision_kind = match family {
            Family::Qwen2Vl => Some(VisionKind::Qwen2Vl),
            Family::Qwen25Vl => Some(VisionKind::Qwen25Vl),
            Family::Qwen3Vl | Family::Qwen3VlMoe => Some(VisionKind::Qwen3Vl),
            Family::Llava => Some(VisionKind::Clip),
            Family::InternVlChat | Family::InternVl => Some(VisionKind::InternVit),
            Family::Glm4v | Family::Glm4vMoe => Some(VisionKind::Glm4v),
            Family::QwenVl => Some(VisionKind::QwenVl),
            _ => None,
        };
        Ok(Layout {
            family,
            text_family,
            text,
            names: tn,
            lm_head: format!("{head_prefix}{}", tn.head),
            vision,
            vision_kind,
            vision_blocks: r.vision_blocks.to_string(),
            vision_pre: r.vision_pre.iter().map(|s| s.to_string()).collect(),
            vision_post: r.vision_post.iter().map(|s| s.to_string()).collect(),
            projector,
            mtp: None,
        })
    }

    /// The layout of a model whose config is `config` (for a text-only family, the family's own).
    pub fn for_config(family: Family, config: &Value, names: &[&str]) -> Result<Layout> {
        Layout::resolve(family, family.text_family(config)?, names)
    }

    /// The same layout with the family's MTP layers placed.
    pub fn with_mtp(mut self, mtp: Option<MtpLayout>) -> Layout {
        self.mtp = mtp;
        self
    }

    /// The roots of this checkpoint's names (the text model, the vision tower, the projector, the head),
    /// each with every spelling the family's layouts give it (the release layout's and transformers 5's,
    /// `model` and `model.language_model`): formats that name modules by pattern match them all.
    pub fn roots(&self) -> Vec<(String, Vec<String>)> {
        let r = rules(self.family);
        let spell = |resolved: &str, cands: &[&str]| {
            let mut v: Vec<String> = cands.iter().map(|s| s.to_string()).collect();
            if !v.iter().any(|c| c == resolved) {
                v.push(resolved.to_string());
            }
            (resolved.to_string(), v)
        };
        let head = TextNames::of(self.text_family).head;
        let heads: Vec<String> = r.head_prefix.iter().map(|p| format!("{p}{head}")).collect();
        let heads: Vec<&str> = heads.iter().map(String::as_str).collect();
        let mut out = vec![spell(&self.text, r.text), spell(&self.lm_head, &heads)];
        if let Some(v) = &self.vision {
            out.push(spell(v, r.vision));
        }
        if let Some(p) = &self.projector {
            out.push(spell(p, r.projector));
        }
        out
    }

    pub fn text_layer(&self, i: usize) -> String {
        format!("{}.{}.{i}", self.text, self.names.layers)
    }
    pub fn embed_tokens(&self) -> String {
        format!("{}.{}.weight", self.text, self.names.embed)
    }
    pub fn final_norm(&self) -> String {
        format!("{}.{}.weight", self.text, self.names.norm)
    }
    pub fn lm_head_weight(&self) -> String {
        format!("{}.weight", self.lm_head)
    }
    pub fn vision_block(&self, i: usize) -> Option<String> {
        self.vision.as_ref().map(|v| format!("{v}.{}.{i}", self.vision_blocks))
    }
    /// A module of the vision tower by its name relative to the vision root.
    pub fn vision_module(&self, rel: &str) -> Option<String> {
        self.vision.as_ref().map(|v| format!("{v}.{rel}"))
    }

    /// The prefix a unit's tensor names lose when its weights are loaded, so forwards use names
    /// relative to the unit (`attn.qkv` in `visual.blocks.3`, `merger.mlp.0` in the vision
    /// root). Units whose tensors have no common root keep whole names (empty prefix): LLaVA's
    /// projector lives outside the vision root, so its post unit does.
    pub fn unit_prefix(&self, kind: UnitKind) -> String {
        let vision_root = || self.vision.as_ref().map(|v| format!("{v}.")).unwrap_or_default();
        match kind {
            UnitKind::TextLayer(i) => format!("{}.", self.text_layer(i)),
            UnitKind::Mtp(k) => match &self.mtp {
                Some(MtpLayout::AfterDecoder { first }) => format!("{}.", self.text_layer(first + k)),
                Some(MtpLayout::Prefix(p)) => format!("{p}."),
                None => String::new(),
            },
            UnitKind::VisionBlock(i) => self.vision_block(i).map(|b| format!("{b}.")).unwrap_or_default(),
            UnitKind::VisionPre => vision_root(),
            UnitKind::VisionPost if self.projector.is_none() => vision_root(),
            UnitKind::VisionPost | UnitKind::Embed | UnitKind::Head | UnitKind::Other => String::new(),
        }
    }

    /// Whether `module` (a full module name) is a vision linear whose output enters the text
    /// model's hidden states: the merger's last projection (Qwen2-VL / Qwen2.5-VL `merger.mlp.2`,
    /// Qwen3-VL `merger.linear_fc2`), Qwen3-VL's deepstack mergers' (`deepstack_merger_list.N.linear_fc2`),
    /// LLaVA's projector's (`multi_modal_projector.linear_2`). A rotation of the text stream
    /// rotates their outputs too.
    pub fn is_vision_output(&self, module: &str) -> bool {
        let under = |root: &Option<String>, rel: &str| {
            root.as_ref().and_then(|r| module.strip_prefix(&format!("{r}."))).is_some_and(|m| m == rel)
        };
        match self.family {
            Family::Qwen2Vl | Family::Qwen25Vl => under(&self.vision, "merger.mlp.2"),
            Family::Qwen3Vl | Family::Qwen3VlMoe => {
                under(&self.vision, "merger.linear_fc2")
                    || self
                        .vision
                        .as_ref()
                        .and_then(|v| module.strip_prefix(&format!("{v}.deepstack_merger_list.")))
                        .is_some_and(|rest| {
                            rest.split_once('.').is_some_and(|(k, m)| k.parse::<usize>().is_ok() && m == "linear_fc2")
                        })
            }
            Family::Llava | Family::InternVl => under(&self.projector, "linear_2"),
            Family::Glm4v | Family::Glm4vMoe => under(&self.vision, "merger.down_proj"),
            _ => false,
        }
    }

    /// Which unit a tensor belongs to.
    pub fn classify(&self, name: &str) -> UnitKind {
        if let Some(i) = layer_index(name, &format!("{}.{}.", self.text, self.names.layers)) {
            return match self.mtp {
                Some(MtpLayout::AfterDecoder { first }) if i >= first => UnitKind::Mtp(i - first),
                _ => UnitKind::TextLayer(i),
            };
        }
        if let Some(MtpLayout::Prefix(p)) = &self.mtp {
            if name.starts_with(&format!("{p}.")) {
                return UnitKind::Mtp(0);
            }
        }
        if name == self.embed_tokens() {
            return UnitKind::Embed;
        }
        if name.starts_with(&format!("{}.{}.", self.text, self.names.norm))
            || name.starts_with(&format!("{}.", self.lm_head))
        {
            return UnitKind::Head;
        }
        if let Some(v) = &self.vision {
            if let Some(i) = layer_index(name, &format!("{v}.{}.", self.vision_blocks)) {
                return UnitKind::VisionBlock(i);
            }
            if let Some(rel) = name.strip_prefix(&format!("{v}.")) {
                let module = |p: &String| rel == p || rel.starts_with(&format!("{p}."));
                if self.vision_pre.iter().any(module) {
                    return UnitKind::VisionPre;
                }
                return UnitKind::VisionPost;
            }
        }
        if let Some(p) = &self.projector {
            if name.starts_with(&format!("{p}.")) {
                return UnitKind::VisionPost;
            }
        }
        UnitKind::Other
    }

    /// The unit's name as it appears in the progress bar, the journal and `plan`.
    pub fn unit_name(&self, kind: UnitKind) -> String {
        let vision = self.vision.clone().unwrap_or_else(|| "vision".into());
        match kind {
            UnitKind::VisionPre => format!("{vision} (embeddings)"),
            UnitKind::VisionBlock(i) => self.vision_block(i).unwrap_or_default(),
            UnitKind::VisionPost => format!("{vision} (mergers, projector)"),
            UnitKind::Embed => self.embed_tokens().trim_end_matches(".weight").to_string(),
            UnitKind::TextLayer(i) => self.text_layer(i),
            UnitKind::Head => format!("{}.{}, {}", self.text, self.names.norm, self.lm_head),
            UnitKind::Mtp(k) => format!("{} (MTP)", self.unit_prefix(UnitKind::Mtp(k)).trim_end_matches('.')),
            UnitKind::Other => "other tensors".into(),
        }
    }
}

/// A checkpoint is processed in units, in this order: the vision tower's embeddings, its blocks,
/// its mergers and projector, the token embeddings, the text layers, the final norm and head,
/// the multi-token-prediction layers, then anything unclaimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum UnitKind {
    VisionPre,
    VisionBlock(usize),
    VisionPost,
    Embed,
    TextLayer(usize),
    Head,
    /// MTP layer `k` (see [`MtpLayout`]).
    Mtp(usize),
    Other,
}

/// `N` if `name` is `{prefix}N.…`.
pub fn layer_index(name: &str, prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    let (num, _) = rest.split_once('.')?;
    num.parse().ok()
}

/// The text root of an unknown decoder-only model: the most common `X` in `X.layers.N.…`.
fn generic_text_root(names: &[&str]) -> Result<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for n in names {
        let mut search = 0;
        while let Some(pos) = n[search..].find(".layers.") {
            let at = search + pos;
            if layer_index(&n[at + 1..], "layers.").is_some() {
                *counts.entry(&n[..at]).or_default() += 1;
                break;
            }
            search = at + 1;
        }
        if let Some(rest) = n.strip_prefix("layers.") {
            if layer_index(rest, "").is_some() || rest.split('.').next().is_some_and(|x| x.parse::<usize>().is_ok()) {
                *counts.entry("").or_default() += 1;
            }
        }
    }
    match counts.into_iter().max_by_key(|&(_, c)| c) {
        Some((root, _)) => Ok(root.to_string()),
        None => bail!("no tensor is named like `*.layers.N.*`, so lamina cannot find the decoder layers"),
    }
}

/// Whether a tensor is the weight of a linear layer: a 2D `.weight` that is not an embedding table.
pub fn is_linear_weight(name: &str, shape: &[usize]) -> bool {
    let Some(module) = name.strip_suffix(".weight") else {
        return false;
    };
    let last = module.rsplit('.').next().unwrap_or(module);
    shape.len() == 2 && !EMBEDDING_MODULES.contains(&last)
}

/// The tensor names and shapes a checkpoint of this family and config holds, in the release
/// layout (bf16). Used to plan on paper from a config alone and to build synthetic checkpoints
/// of real shapes for benchmarks.
pub fn synthesize_inventory(family: Family, config: &Value) -> Result<Vec<(String, Vec<usize>)>> {
    let t = TextConfig::from_json(config)?;
    let layout = Layout::for_config(family, config, &[])?;
    let h = t.hidden_size;
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    out.push((layout.embed_tokens(), vec![t.vocab_size, h]));
    for i in 0..t.num_layers {
        let linear = t.linear_attn.as_ref().is_some_and(|la| la.is_linear(i));
        synthesize_layer(&layout, &t, &layout.text_layer(i), i, linear, &mut out);
    }
    // Qwen3-Next's MTP block: the projection of [embedding; hidden], its norms, and full-attention
    // MoE decoder layers (`mtp_num_hidden_layers`, 1 in the releases).
    if family == Family::Qwen3Next {
        let layers = config.get("mtp_num_hidden_layers").and_then(|v| v.as_u64()).unwrap_or(1) as usize;
        out.push(("mtp.fc.weight".into(), vec![h, 2 * h]));
        for n in ["pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"] {
            out.push((format!("mtp.{n}.weight"), vec![h]));
        }
        for k in 0..layers {
            synthesize_layer(&layout, &t, &format!("mtp.layers.{k}"), t.num_layers - 1, false, &mut out);
        }
    }
    // Multi-token-prediction layers after the last (GLM-4.5's `num_nextn_predict_layers`): a
    // decoder layer with the projection of [embedding; hidden] and its norms.
    let nextn = config.get("num_nextn_predict_layers").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    for k in 0..nextn {
        let l = layout.text_layer(t.num_layers + k);
        synthesize_layer(&layout, &t, &l, t.num_layers + k, false, &mut out);
        out.push((format!("{l}.eh_proj.weight"), vec![h, 2 * h]));
        for n in ["enorm", "hnorm", "shared_head.norm"] {
            out.push((format!("{l}.{n}.weight"), vec![h]));
        }
    }
    out.push((layout.final_norm(), vec![h]));
    if !t.tie_word_embeddings {
        out.push((layout.lm_head_weight(), vec![t.vocab_size, h]));
    }
    if let Some(v) = super::config::vision_view(config) {
        // InternVL's pixel shuffle gathers a `1/downsample_ratio`-sided square of patches.
        let ratio = config.get("downsample_ratio").and_then(Value::as_f64).unwrap_or(0.5);
        let shuffle = (1.0 / ratio).round() as usize;
        synthesize_vision(family, &layout, config, &v, h, shuffle, &mut out)?;
    }
    // GLM-4.5's q/k norms are optional (`use_qk_norm`: GLM-4.6 has them, GLM-4.5V does not).
    let text = config.get("text_config").filter(|t| t.is_object()).unwrap_or(config);
    if layout.text_family == Family::Glm4Moe && text.get("use_qk_norm").and_then(Value::as_bool) == Some(false) {
        let (q, k) =
            (format!(".{}.weight", layout.names.decoder.q_norm), format!(".{}.weight", layout.names.decoder.k_norm));
        out.retain(|(n, _)| !n.ends_with(&q) && !n.ends_with(&k));
    }
    Ok(out)
}

/// Decoder layer `i` (at `l`) of a family's release layout; `linear`: a Gated DeltaNet layer
/// (Qwen3-Next) rather than an attention one.
fn synthesize_layer(
    layout: &Layout,
    t: &TextConfig,
    l: &str,
    i: usize,
    linear: bool,
    out: &mut Vec<(String, Vec<usize>)>,
) {
    let (h, hd) = (t.hidden_size, t.head_dim);
    let mut push = |n: String, s: &[usize]| out.push((n, s.to_vec()));
    let family = layout.text_family;
    let d = layout.names.decoder;
    let next = family == Family::Qwen3Next;
    if let (true, Some(la)) = (linear, &t.linear_attn) {
        let (nk, nv, dk, dv) = (la.num_k_heads, la.num_v_heads, la.k_head_dim, la.v_head_dim);
        push(format!("{l}.linear_attn.in_proj_qkvz.weight"), &[2 * nk * dk + 2 * nv * dv, h]);
        push(format!("{l}.linear_attn.in_proj_ba.weight"), &[2 * nv, h]);
        push(format!("{l}.linear_attn.conv1d.weight"), &[2 * nk * dk + nv * dv, 1, la.conv_kernel]);
        push(format!("{l}.linear_attn.A_log"), &[nv]);
        push(format!("{l}.linear_attn.dt_bias"), &[nv]);
        push(format!("{l}.linear_attn.norm.weight"), &[dv]);
        push(format!("{l}.linear_attn.out_proj.weight"), &[h, nv * dv]);
    }
    let bias = matches!(family, Family::Qwen2 | Family::Qwen2Vl | Family::Qwen25Vl | Family::Qwen)
        || t.attention_bias == Some(true);
    let glm4 = family == Family::Glm4;
    let qk_norm = matches!(
        family,
        Family::Qwen3
            | Family::Qwen3Moe
            | Family::Qwen3Vl
            | Family::Qwen3VlMoe
            | Family::Glm4Moe
            | Family::Qwen3Next
            | Family::HunyuanV1Moe
            | Family::Hunyuan
    );
    let fused_experts = family == Family::Qwen3VlMoe;
    push(format!("{l}.{}.weight", d.attn_norm), &[h]);
    push(format!("{l}.{}.weight", d.mlp_norm), &[h]);
    if glm4 {
        push(format!("{l}.post_self_attn_layernorm.weight"), &[h]);
        push(format!("{l}.post_mlp_layernorm.weight"), &[h]);
    }
    if let Some(m) = &t.mla {
        // DeepSeek's MLA (decoder/mla.rs): low-rank queries, a shared latent for keys and values.
        let nh = t.num_heads;
        match m.q_lora_rank {
            Some(r) => {
                push(format!("{l}.self_attn.q_a_proj.weight"), &[r, h]);
                push(format!("{l}.self_attn.q_a_layernorm.weight"), &[r]);
                push(format!("{l}.self_attn.q_b_proj.weight"), &[nh * m.qk_head_dim(), r]);
            }
            None => push(format!("{l}.self_attn.q_proj.weight"), &[nh * m.qk_head_dim(), h]),
        }
        push(format!("{l}.self_attn.kv_a_proj_with_mqa.weight"), &[m.kv_lora_rank + m.qk_rope_head_dim, h]);
        push(format!("{l}.self_attn.kv_a_layernorm.weight"), &[m.kv_lora_rank]);
        push(format!("{l}.self_attn.kv_b_proj.weight"), &[nh * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank]);
        push(format!("{l}.self_attn.o_proj.weight"), &[h, nh * m.v_head_dim]);
    } else if !linear {
        // Qwen3-Next's q_proj also yields the attention's output gate.
        let q_rows = if next { 2 * t.num_heads * hd } else { t.num_heads * hd };
        let kv_rows = t.num_kv_heads * hd;
        let projections: Vec<(&str, usize)> = match d.qkv {
            // A cross-layer attention layer (Hunyuan-Large) has its queries only.
            QkvNames::Separate { q, .. } if !t.owns_kv(i) => vec![(q, q_rows)],
            QkvNames::Separate { q, k, v } => vec![(q, q_rows), (k, kv_rows), (v, kv_rows)],
            QkvNames::Fused { module, .. } => vec![(module, q_rows + 2 * kv_rows)],
        };
        for (p, rows) in projections {
            push(format!("{l}.{p}.weight"), &[rows, h]);
            if bias {
                push(format!("{l}.{p}.bias"), &[rows]);
            }
        }
        push(format!("{l}.{}.weight", d.o_proj), &[h, t.num_heads * hd]);
    }
    if qk_norm && !linear {
        push(format!("{l}.{}.weight", d.q_norm), &[hd]);
        push(format!("{l}.{}.weight", d.k_norm), &[hd]);
    }
    let mlp = "mlp";
    match &t.moe {
        Some(m) if m.is_moe_layer(i) => {
            let inter = m.moe_intermediate_size;
            push(format!("{l}.{}.weight", d.router), &[m.num_experts, h]);
            if matches!(family, Family::Glm4Moe | Family::DeepseekV3) {
                push(format!("{l}.{mlp}.gate.e_score_correction_bias"), &[m.num_experts]);
            }
            if fused_experts {
                push(format!("{l}.{mlp}.experts.gate_up_proj"), &[m.num_experts, h, 2 * inter]);
                push(format!("{l}.{mlp}.experts.down_proj"), &[m.num_experts, inter, h]);
            } else {
                for j in 0..m.num_experts {
                    push(format!("{l}.{mlp}.experts.{j}.gate_proj.weight"), &[inter, h]);
                    push(format!("{l}.{mlp}.experts.{j}.up_proj.weight"), &[inter, h]);
                    push(format!("{l}.{mlp}.experts.{j}.down_proj.weight"), &[h, inter]);
                }
            }
            // The shared MLP as the decoder takes it (`Take::ffn`, `SharedMlpConfig`).
            if let Some(s) = &m.shared {
                push(format!("{l}.{}.gate_proj.weight", s.module), &[s.width, h]);
                push(format!("{l}.{}.up_proj.weight", s.module), &[s.width, h]);
                push(format!("{l}.{}.down_proj.weight", s.module), &[h, s.width]);
                if let Some(g) = s.gate_module() {
                    push(format!("{l}.{g}.weight"), &[1, h]);
                }
            }
        }
        _ => {
            let inter = t.intermediate_size;
            if glm4 {
                push(format!("{l}.mlp.gate_up_proj.weight"), &[2 * inter, h]);
            } else {
                push(format!("{l}.{}.weight", d.gate), &[inter, h]);
                push(format!("{l}.{}.weight", d.up), &[inter, h]);
            }
            push(format!("{l}.{}.weight", d.down), &[h, inter]);
        }
    }
}

fn synthesize_vision(
    family: Family,
    layout: &Layout,
    config: &Value,
    v: &super::config::ConfigView,
    text_hidden: usize,
    shuffle: usize,
    out: &mut Vec<(String, Vec<usize>)>,
) -> Result<()> {
    let m = |rel: &str| layout.vision_module(rel).unwrap();
    let mut push = |n: String, s: &[usize]| out.push((n, s.to_vec()));
    let linear = |push: &mut dyn FnMut(String, &[usize]), name: String, o: usize, i: usize| {
        push(format!("{name}.weight"), &[o, i]);
        push(format!("{name}.bias"), &[o]);
    };
    let depth = v.usize(&["depth", "num_hidden_layers", "layers"])?;
    match family {
        Family::Qwen2Vl | Family::Qwen25Vl | Family::Qwen3Vl | Family::Qwen3VlMoe => {
            let t = match family {
                Family::Qwen2Vl => super::vision::qwen2_vl::Config::from_json(config)?.tower,
                Family::Qwen25Vl => super::vision::qwen2_5_vl::Config::from_json(config)?.tower,
                _ => super::vision::qwen3_vl::Config::from_json(config)?.tower,
            };
            let (dim, patch, tps, cin, merge) =
                (t.dim, t.patch_size, t.temporal_patch_size, t.in_channels, t.spatial_merge_size);
            let inter = if family == Family::Qwen2Vl {
                dim * v.usize(&["mlp_ratio"]).unwrap_or(4)
            } else {
                v.usize(&["intermediate_size"])?
            };
            let out_h = v.opt_usize(&["out_hidden_size", "hidden_size"])?.unwrap_or(text_hidden);
            let out_h = if family == Family::Qwen2Vl { text_hidden.max(out_h) } else { out_h };
            let qwen3 = matches!(family, Family::Qwen3Vl | Family::Qwen3VlMoe);
            push(m("patch_embed.proj.weight"), &[dim, cin, tps, patch, patch]);
            if qwen3 {
                push(m("patch_embed.proj.bias"), &[dim]);
                push(m("pos_embed.weight"), &[v.usize(&["num_position_embeddings"])?, dim]);
            }
            for b in 0..depth {
                let blk = layout.vision_block(b).unwrap();
                let norm_bias = family != Family::Qwen25Vl;
                for n in ["norm1", "norm2"] {
                    push(format!("{blk}.{n}.weight"), &[dim]);
                    if norm_bias {
                        push(format!("{blk}.{n}.bias"), &[dim]);
                    }
                }
                linear(&mut push, format!("{blk}.attn.qkv"), 3 * dim, dim);
                linear(&mut push, format!("{blk}.attn.proj"), dim, dim);
                match family {
                    Family::Qwen2Vl => {
                        linear(&mut push, format!("{blk}.mlp.fc1"), inter, dim);
                        linear(&mut push, format!("{blk}.mlp.fc2"), dim, inter);
                    }
                    Family::Qwen25Vl => {
                        linear(&mut push, format!("{blk}.mlp.gate_proj"), inter, dim);
                        linear(&mut push, format!("{blk}.mlp.up_proj"), inter, dim);
                        linear(&mut push, format!("{blk}.mlp.down_proj"), dim, inter);
                    }
                    _ => {
                        linear(&mut push, format!("{blk}.mlp.linear_fc1"), inter, dim);
                        linear(&mut push, format!("{blk}.mlp.linear_fc2"), dim, inter);
                    }
                }
            }
            let merged = dim * merge * merge;
            if qwen3 {
                push(m("merger.norm.weight"), &[dim]);
                push(m("merger.norm.bias"), &[dim]);
                linear(&mut push, m("merger.linear_fc1"), merged, merged);
                linear(&mut push, m("merger.linear_fc2"), out_h, merged);
                let deepstack = v.usize_list(&["deepstack_visual_indexes"])?.unwrap_or_default();
                for k in 0..deepstack.len() {
                    push(m(&format!("deepstack_merger_list.{k}.norm.weight")), &[merged]);
                    push(m(&format!("deepstack_merger_list.{k}.norm.bias")), &[merged]);
                    linear(&mut push, m(&format!("deepstack_merger_list.{k}.linear_fc1")), merged, merged);
                    linear(&mut push, m(&format!("deepstack_merger_list.{k}.linear_fc2")), out_h, merged);
                }
            } else {
                push(m("merger.ln_q.weight"), &[dim]);
                if family == Family::Qwen2Vl {
                    push(m("merger.ln_q.bias"), &[dim]);
                }
                linear(&mut push, m("merger.mlp.0"), merged, merged);
                linear(&mut push, m("merger.mlp.2"), out_h, merged);
            }
        }
        Family::Glm4v | Family::Glm4vMoe => {
            // vision/glm4v.rs: the block MLP is out_hidden_size wide, the merger intermediate_size.
            let t = super::vision::glm4v::Config::from_json(config)?.tower;
            let (dim, patch, tps, cin, merge) =
                (t.dim, t.patch_size, t.temporal_patch_size, t.in_channels, t.spatial_merge_size);
            let out_h = v.opt_usize(&["out_hidden_size"])?.unwrap_or(text_hidden);
            let inter = v.usize(&["intermediate_size"])?;
            let side = v.usize(&["image_size"])? / patch;
            let qkv_bias = v.bool(&["attention_bias"]).unwrap_or(false);
            push(m("patch_embed.proj.weight"), &[dim, cin, tps, patch, patch]);
            push(m("patch_embed.proj.bias"), &[dim]);
            push(m("embeddings.position_embedding.weight"), &[side * side, dim]);
            push(m("post_conv_layernorm.weight"), &[dim]);
            for b in 0..depth {
                let blk = layout.vision_block(b).unwrap();
                push(format!("{blk}.norm1.weight"), &[dim]);
                push(format!("{blk}.norm2.weight"), &[dim]);
                push(format!("{blk}.attn.qkv.weight"), &[3 * dim, dim]);
                if qkv_bias {
                    push(format!("{blk}.attn.qkv.bias"), &[3 * dim]);
                }
                push(format!("{blk}.attn.proj.weight"), &[dim, dim]);
                push(format!("{blk}.mlp.gate_proj.weight"), &[out_h, dim]);
                push(format!("{blk}.mlp.up_proj.weight"), &[out_h, dim]);
                push(format!("{blk}.mlp.down_proj.weight"), &[dim, out_h]);
            }
            push(m("post_layernorm.weight"), &[dim]);
            push(m("downsample.weight"), &[out_h, dim, merge, merge]);
            push(m("downsample.bias"), &[out_h]);
            push(m("merger.proj.weight"), &[out_h, out_h]);
            push(m("merger.post_projection_norm.weight"), &[out_h]);
            push(m("merger.post_projection_norm.bias"), &[out_h]);
            push(m("merger.gate_proj.weight"), &[inter, out_h]);
            push(m("merger.up_proj.weight"), &[inter, out_h]);
            push(m("merger.down_proj.weight"), &[out_h, inter]);
        }
        Family::QwenVl => {
            // visual.py's VisionTransformer: mlp width int(width · mlp_ratio), a 256-row position
            // table, the resampler in output_dim with kv_proj only when the widths differ.
            let width = v.usize(&["width"])?;
            let patch = v.usize(&["patch_size"])?;
            let e = v.usize(&["output_dim"])?;
            let queries = v.opt_usize(&["n_queries"])?.unwrap_or(256);
            let mlp = (width as f64 * v.f64(&["mlp_ratio"])?.unwrap_or(4.0)).floor() as usize;
            let norm = |push: &mut dyn FnMut(String, &[usize]), name: String, d: usize| {
                push(format!("{name}.weight"), &[d]);
                push(format!("{name}.bias"), &[d]);
            };
            push(m("conv1.weight"), &[width, 3, patch, patch]);
            push(m("positional_embedding"), &[256, width]);
            norm(&mut push, m("ln_pre"), width);
            for b in 0..depth {
                let blk = layout.vision_block(b).unwrap();
                norm(&mut push, format!("{blk}.ln_1"), width);
                linear(&mut push, format!("{blk}.attn.in_proj"), 3 * width, width);
                linear(&mut push, format!("{blk}.attn.out_proj"), width, width);
                norm(&mut push, format!("{blk}.ln_2"), width);
                linear(&mut push, format!("{blk}.mlp.c_fc"), mlp, width);
                linear(&mut push, format!("{blk}.mlp.c_proj"), width, mlp);
            }
            push(m("attn_pool.query"), &[queries, e]);
            push(m("attn_pool.pos_embed"), &[queries, e]);
            if width != e {
                push(m("attn_pool.kv_proj.weight"), &[e, width]);
            }
            push(m("attn_pool.attn.in_proj_weight"), &[3 * e, e]);
            push(m("attn_pool.attn.in_proj_bias"), &[3 * e]);
            linear(&mut push, m("attn_pool.attn.out_proj"), e, e);
            norm(&mut push, m("attn_pool.ln_q"), e);
            norm(&mut push, m("attn_pool.ln_kv"), e);
            norm(&mut push, m("ln_post"), e);
            push(m("proj"), &[e, e]);
        }
        Family::InternVlChat | Family::InternVl => {
            // vision/internvit.rs: InternViT (LayerNorm or RMSNorm, optional qkv bias and q/k norms,
            // layer scales), then the projector on the pixel-shuffled features; the names per layout.
            let n = InternVitNames::of(family);
            let dim = v.usize(&["hidden_size"])?;
            let inter = v.usize(&["intermediate_size"])?;
            let patch = v.square(&["patch_size"])?;
            let side = v.square(&["image_size"])? / patch.max(1);
            let cin = v.opt_usize(&["num_channels"])?.unwrap_or(3);
            let rms = v.str(&["norm_type"]) == Some("rms_norm");
            // InternVisionConfig's defaults: qkv_bias false, qk_normalization false;
            // InternVLVisionConfig's: attention_bias false, use_qk_norm false, use_mean_pooling true.
            let (qkv_bias, qk_norm) =
                (v.bool(&[n.qkv_bias_key]).unwrap_or(false), v.bool(&[n.qk_norm_key]).unwrap_or(false));
            let norm = |push: &mut dyn FnMut(String, &[usize]), name: String, width: usize, bias: bool| {
                push(format!("{name}.weight"), &[width]);
                if bias {
                    push(format!("{name}.bias"), &[width]);
                }
            };
            push(m(n.class), &[1, 1, dim]);
            push(m(&format!("{}.weight", n.patch)), &[dim, cin, patch, patch]);
            push(m(&format!("{}.bias", n.patch)), &[dim]);
            if v.bool(&["use_absolute_position_embeddings"]).unwrap_or(true) {
                push(m(n.position), &[1, side * side + 1, dim]);
            }
            for b in 0..depth {
                let blk = layout.vision_block(b).unwrap();
                norm(&mut push, format!("{blk}.{}", n.norm1), dim, !rms);
                norm(&mut push, format!("{blk}.{}", n.norm2), dim, !rms);
                let projections: Vec<(&str, usize)> = match n.qkv {
                    QkvNames::Fused { module, .. } => vec![(module, 3 * dim)],
                    QkvNames::Separate { q, k, v } => vec![(q, dim), (k, dim), (v, dim)],
                };
                for (p, rows) in projections {
                    push(format!("{blk}.{p}.weight"), &[rows, dim]);
                    if qkv_bias {
                        push(format!("{blk}.{p}.bias"), &[rows]);
                    }
                }
                if qk_norm {
                    push(format!("{blk}.{}.weight", n.q_norm), &[dim]);
                    push(format!("{blk}.{}.weight", n.k_norm), &[dim]);
                }
                linear(&mut push, format!("{blk}.{}", n.proj), dim, dim);
                linear(&mut push, format!("{blk}.{}", n.fc1), inter, dim);
                linear(&mut push, format!("{blk}.{}", n.fc2), dim, inter);
                push(format!("{blk}.{}", n.ls1), &[dim]);
                push(format!("{blk}.{}", n.ls2), &[dim]);
            }
            if let (Some(f), false) = (n.final_norm, v.bool(&["use_mean_pooling"]).unwrap_or(true)) {
                norm(&mut push, m(f), dim, true);
            }
            // The projector: LayerNorm(f²·dim), Linear(f²·dim → text), GELU, Linear(text → text);
            // f = 1 / downsample_ratio.
            let p = layout.projector.clone().context("the InternVL layout has no projector")?;
            let shuffled = dim * shuffle * shuffle;
            norm(&mut push, format!("{p}.{}", n.projector[0]), shuffled, true);
            linear(&mut push, format!("{p}.{}", n.projector[1]), text_hidden, shuffled);
            linear(&mut push, format!("{p}.{}", n.projector[2]), text_hidden, text_hidden);
        }
        Family::Llava => {
            bail!("planning LLaVA from a config alone is not supported; point --model_path at the checkpoint")
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hunyuan-Large's real config on paper: keys and values in every other layer only (cross-layer
    /// attention), every layer its q/k norms, 16 experts and a shared MLP; about 389 B parameters,
    /// as Tencent publishes.
    #[test]
    fn hunyuan_large_on_paper() {
        let config: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/configs/hunyuan-large/config.json")).unwrap();
        let inv = synthesize_inventory(Family::Hunyuan, &config).unwrap();
        let has = |n: &str| inv.iter().any(|(m, _)| m == n);
        let count = |suffix: &str| inv.iter().filter(|(m, _)| m.ends_with(suffix)).count();
        assert_eq!((count("self_attn.k_proj.weight"), count("self_attn.v_proj.weight")), (32, 32));
        assert_eq!((count("self_attn.q_proj.weight"), count("self_attn.key_layernorm.weight")), (64, 64));
        assert!(has("model.layers.62.self_attn.k_proj.weight") && !has("model.layers.63.self_attn.k_proj.weight"));
        assert_eq!(count("mlp.gate.wg.weight"), 64);
        assert_eq!(count("down_proj.weight"), 64 * 17);
        let params: usize = inv.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert!((params as f64 / 389e9 - 1.0).abs() < 0.01, "{params} parameters");
    }

    #[test]
    fn release_and_transformers5_layouts_resolve() {
        let old = ["model.layers.0.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.weight"];
        let l = Layout::resolve(Family::Qwen2Vl, Family::Qwen2Vl, &old).unwrap();
        assert_eq!(l.text, "model");
        assert_eq!(l.vision.as_deref(), Some("visual"));
        let new = ["model.language_model.layers.0.mlp.up_proj.weight", "model.visual.blocks.0.attn.qkv.weight"];
        let l = Layout::resolve(Family::Qwen2Vl, Family::Qwen2Vl, &new).unwrap();
        assert_eq!(l.text, "model.language_model");
        assert_eq!(l.vision.as_deref(), Some("model.visual"));
        assert_eq!(l.classify("model.visual.blocks.3.norm1.weight"), UnitKind::VisionBlock(3));
        assert_eq!(l.classify("model.visual.patch_embed.proj.weight"), UnitKind::VisionPre);
        assert_eq!(l.classify("model.visual.merger.mlp.0.weight"), UnitKind::VisionPost);
        assert_eq!(l.classify("model.language_model.embed_tokens.weight"), UnitKind::Embed);
        assert_eq!(l.classify("model.language_model.norm.weight"), UnitKind::Head);
        assert_eq!(l.classify("lm_head.weight"), UnitKind::Head);
    }

    #[test]
    fn llava_names() {
        let names = ["language_model.model.layers.0.mlp.up_proj.weight", "language_model.lm_head.weight"];
        let l = Layout::resolve(Family::Llava, Family::Llava, &names).unwrap();
        assert_eq!(l.classify("language_model.model.layers.1.self_attn.q_proj.weight"), UnitKind::TextLayer(1));
        assert_eq!(l.classify("language_model.lm_head.weight"), UnitKind::Head);
        assert_eq!(l.classify("vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"), UnitKind::VisionBlock(2));
        assert_eq!(l.classify("vision_tower.vision_model.embeddings.class_embedding"), UnitKind::VisionPre);
        assert_eq!(l.classify("multi_modal_projector.linear_1.weight"), UnitKind::VisionPost);
    }

    #[test]
    fn vision_outputs_are_the_projections_into_the_text_stream() {
        let q = Layout::resolve(Family::Qwen3VlMoe, Family::Qwen3VlMoe, &["model.visual.blocks.0.attn.qkv.weight"])
            .unwrap();
        assert!(q.is_vision_output("model.visual.merger.linear_fc2"));
        assert!(q.is_vision_output("model.visual.deepstack_merger_list.2.linear_fc2"));
        assert!(!q.is_vision_output("model.visual.merger.linear_fc1"));
        assert!(!q.is_vision_output("model.visual.blocks.1.mlp.linear_fc2"));
        let q2 = Layout::resolve(Family::Qwen2Vl, Family::Qwen2Vl, &["visual.blocks.0.attn.qkv.weight"]).unwrap();
        assert!(q2.is_vision_output("visual.merger.mlp.2") && !q2.is_vision_output("visual.merger.mlp.0"));
        let l = Layout::resolve(Family::Llava, Family::Llava, &["multi_modal_projector.linear_1.weight"]).unwrap();
        assert!(
            l.is_vision_output("multi_modal_projector.linear_2")
                && !l.is_vision_output("multi_modal_projector.linear_1")
        );
        assert!(!Layout::resolve(Family::Llama, Family::Llama, &[]).unwrap().is_vision_output("lm_head"));
    }

    #[test]
    fn unit_prefixes_make_names_relative() {
        let q = Layout::resolve(Family::Qwen3Vl, Family::Qwen3Vl, &["model.visual.blocks.0.attn.qkv.weight"]).unwrap();
        assert_eq!(q.unit_prefix(UnitKind::VisionBlock(2)), "model.visual.blocks.2.");
        assert_eq!(q.unit_prefix(UnitKind::VisionPre), "model.visual.");
        assert_eq!(q.unit_prefix(UnitKind::VisionPost), "model.visual.");
        assert_eq!(q.unit_prefix(UnitKind::TextLayer(1)), "model.language_model.layers.1.");
        // LLaVA's projector lives outside the vision root: its post unit keeps whole names.
        let l = Layout::resolve(Family::Llava, Family::Llava, &[]).unwrap();
        assert_eq!(l.unit_prefix(UnitKind::VisionBlock(0)), "vision_tower.vision_model.encoder.layers.0.");
        assert_eq!(l.unit_prefix(UnitKind::VisionPost), "");
    }

    #[test]
    fn generic_finds_its_layers() {
        let names = [
            "transformer.h.0.x",
            "backbone.layers.0.mixer.weight",
            "backbone.layers.1.mixer.weight",
            "backbone.embed.weight",
        ];
        let l = Layout::resolve(Family::Generic, Family::Generic, &names).unwrap();
        assert_eq!(l.text, "backbone");
        assert_eq!(l.classify("backbone.layers.1.mixer.weight"), UnitKind::TextLayer(1));
        assert!(Layout::resolve(Family::Generic, Family::Generic, &["a.b.weight"]).is_err());
    }

    /// GLM-4.1V: the tower's units by its release names, the merger's last projection feeds the
    /// text stream, and the GLM-4 decoder's names. GLM-4.5V (glm4v_moe): the same tower and roots,
    /// GLM-4.5's MoE decoder by its release names (per-expert linears, the router's correction bias).
    #[test]
    fn glm4v_names() {
        let l = Layout::resolve(Family::Glm4v, Family::Glm4, &["model.visual.blocks.0.attn.qkv.weight"]).unwrap();
        assert_eq!(l.classify("model.visual.embeddings.position_embedding.weight"), UnitKind::VisionPre);
        assert_eq!(l.classify("model.visual.post_conv_layernorm.weight"), UnitKind::VisionPre);
        assert_eq!(l.classify("model.visual.blocks.3.mlp.up_proj.weight"), UnitKind::VisionBlock(3));
        assert_eq!(l.classify("model.visual.downsample.weight"), UnitKind::VisionPost);
        assert_eq!(l.classify("model.language_model.layers.2.mlp.gate_up_proj.weight"), UnitKind::TextLayer(2));
        assert!(l.is_vision_output("model.visual.merger.down_proj"));
        assert!(!l.is_vision_output("model.visual.blocks.0.mlp.down_proj"));
        assert_eq!(Family::Glm4v.text_family(&Value::Null).unwrap(), Family::Glm4);

        let config = serde_json::json!({"model_type": "glm4v_moe", "text_config": {
            "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 2, "vocab_size": 10,
            "intermediate_size": 16, "moe_intermediate_size": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
            "first_k_dense_replace": 1, "n_shared_experts": 1}});
        let names =
            ["model.language_model.layers.1.mlp.experts.3.down_proj.weight", "model.visual.blocks.0.norm1.weight"];
        let m = crate::model::Model::new(&config, None, &names).unwrap();
        assert_eq!((m.family, m.layout.text_family), (Family::Glm4vMoe, Family::Glm4Moe));
        let l = &m.layout;
        assert_eq!(l.vision_kind, Some(VisionKind::Glm4v));
        assert_eq!(l.classify(names[0]), UnitKind::TextLayer(1));
        assert_eq!(
            l.classify("model.language_model.layers.1.mlp.gate.e_score_correction_bias"),
            UnitKind::TextLayer(1)
        );
        assert_eq!(l.classify(names[1]), UnitKind::VisionBlock(0));
        assert_eq!(l.classify("model.visual.merger.gate_proj.weight"), UnitKind::VisionPost);
        assert_eq!(l.lm_head_weight(), "lm_head.weight");
        assert!(l.is_vision_output("model.visual.merger.down_proj"));
        let moe = m.text.moe.as_ref().unwrap();
        assert_eq!(moe.scoring, super::super::config::Scoring::Sigmoid, "GLM-4.5V routes by a sigmoid");
        assert!(!moe.is_moe_layer(0) && moe.is_moe_layer(1));
    }

    /// Qwen-VL: a `qwen` config with `visual` is its own family; the tower's units by visual.py's
    /// names; the text model is Qwen (1)'s; the inventory from the config is the fixture's.
    #[test]
    fn qwen_vl_names() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen_vl");
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(Family::detect(&config), Some(Family::QwenVl));
        let l = Layout::for_config(Family::QwenVl, &config, &[]).unwrap();
        assert_eq!(l.text_family, Family::Qwen);
        assert_eq!(l.classify("transformer.visual.conv1.weight"), UnitKind::VisionPre);
        assert_eq!(l.classify("transformer.visual.positional_embedding"), UnitKind::VisionPre);
        assert_eq!(
            l.classify("transformer.visual.transformer.resblocks.1.attn.in_proj.weight"),
            UnitKind::VisionBlock(1)
        );
        assert_eq!(l.classify("transformer.visual.attn_pool.attn.in_proj_weight"), UnitKind::VisionPost);
        assert_eq!(l.classify("transformer.visual.proj"), UnitKind::VisionPost);
        assert_eq!(l.classify("transformer.h.1.attn.c_attn.weight"), UnitKind::TextLayer(1));
        assert_eq!(l.classify("transformer.wte.weight"), UnitKind::Embed);
        assert!(Family::Qwen.text_family(&config).is_err());
        let ckpt = crate::io::checkpoint::Checkpoint::open(&dir).unwrap();
        let mut stored: Vec<(String, Vec<usize>)> =
            ckpt.names().map(|n| (n.to_string(), ckpt.entry(n).unwrap().1.meta().shape)).collect();
        let mut planned = synthesize_inventory(Family::QwenVl, &config).unwrap();
        // The fixture's position table is 4×4 (the remote code's is 16×16 = 256 rows).
        stored.retain(|(n, _)| n != "transformer.visual.positional_embedding");
        planned.retain(|(n, _)| n != "transformer.visual.positional_embedding");
        stored.sort();
        planned.sort();
        assert_eq!(planned, stored);
    }

    /// InternVL: the vision tensors planned from the config are the fixtures' (InternViT-300M's
    /// LayerNorms and qkv bias; InternViT-6B's RMSNorms and q/k norms; transformers' `-hf` names
    /// with separate q/k/v and list-valued sizes), names and shapes.
    #[test]
    fn internvl_vision_inventory_is_the_fixtures() {
        for fixture in ["internvl_chat", "internvl_chat_6b", "internvl_hf"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            let family = Family::detect(&config).unwrap();
            let l = Layout::for_config(family, &config, &[]).unwrap();
            let vision = |n: &str| {
                matches!(l.classify(n), UnitKind::VisionPre | UnitKind::VisionBlock(_) | UnitKind::VisionPost)
            };
            let ckpt = crate::io::checkpoint::Checkpoint::open(&dir).unwrap();
            let mut stored: Vec<(String, Vec<usize>)> = ckpt
                .names()
                .filter(|n| vision(n))
                .map(|n| (n.to_string(), ckpt.entry(n).unwrap().1.meta().shape))
                .collect();
            let mut planned: Vec<_> =
                synthesize_inventory(family, &config).unwrap().into_iter().filter(|(n, _)| vision(n)).collect();
            stored.sort();
            planned.sort();
            assert!(planned.iter().any(|(n, _)| n.ends_with(".1.ls2") || n.ends_with(".1.lambda_2")), "{fixture}");
            assert_eq!(planned, stored, "{fixture}");
        }
    }

    /// transformers' `-hf` InternVL: its own family (by model_type and by architecture), the text
    /// family from `text_config`, the units by modeling_internvl.py's names.
    #[test]
    fn internvl_hf_names() {
        let config = serde_json::json!({"model_type": "internvl", "text_config": {"model_type": "qwen2"}});
        assert_eq!(Family::detect(&config), Some(Family::InternVl));
        let by_arch = serde_json::json!({"architectures": ["InternVLForConditionalGeneration"]});
        assert_eq!(Family::detect(&by_arch), Some(Family::InternVl));
        let l = Layout::for_config(Family::InternVl, &config, &[]).unwrap();
        assert_eq!((l.text_family, l.vision_kind), (Family::Qwen2, Some(VisionKind::InternVit)));
        assert_eq!(l.classify("model.vision_tower.embeddings.cls_token"), UnitKind::VisionPre);
        assert_eq!(l.classify("model.vision_tower.encoder.layer.3.attention.q_proj.weight"), UnitKind::VisionBlock(3));
        assert_eq!(l.classify("model.vision_tower.layernorm.weight"), UnitKind::VisionPost);
        assert_eq!(l.classify("model.multi_modal_projector.linear_1.weight"), UnitKind::VisionPost);
        assert_eq!(l.classify("model.language_model.layers.1.mlp.up_proj.weight"), UnitKind::TextLayer(1));
        assert_eq!(l.classify("lm_head.weight"), UnitKind::Head);
        assert!(l.is_vision_output("model.multi_modal_projector.linear_2"));
        let e = Family::InternVl.text_family(&serde_json::json!({"model_type": "internvl"})).unwrap_err();
        assert!(e.to_string().contains("text_config"), "{e}");
    }

    #[test]
    fn linears_are_2d_non_embeddings() {
        assert!(is_linear_weight("model.layers.0.mlp.gate.weight", &[4, 64]));
        assert!(!is_linear_weight("model.embed_tokens.weight", &[10, 4]));
        assert!(!is_linear_weight("model.layers.0.input_layernorm.weight", &[64]));
        assert!(!is_linear_weight("model.visual.patch_embed.proj.weight", &[4, 3, 2, 16, 16]));
        assert!(!is_linear_weight("x.mlp.experts.gate_up_proj", &[4, 64, 96]));
    }
}
