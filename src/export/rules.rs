//! What the servers load: the rules an Ascend-format output (msModelSlim's `quant_model_description.json` and
//! `quant_model_weights*.safetensors`) must follow for vLLM-Ascend or MindIE to load it, as tables.
//!
//! One engine checks them, on two inputs: an output folder on disk (`lamina check`, which accepts
//! msModelSlim's outputs too) and the tensors `lamina quant` plans to write, before it writes anything.
//! lamina's own Ascend layout ([`linear_layout`]) is generated from the same [`TYPES`] table, so what is
//! written and what is checked cannot drift apart.
//!
//! Every rule cites the loader file it comes from (vLLM-Ascend main, `vllm_ascend/quantization/`):
//! - `modelslim_config.py`: `get_linear_quant_type` looks a layer's type up as `quant_description[prefix +
//!   ".weight"]`; a fused layer (`packed_modules_model_mapping`, or the vLLM model class's
//!   `packed_modules_mapping`) takes its type from every member and raises when they differ
//!   ("Not all shards of … are quantized with same quant type"); `is_layer_skipped_ascend` raises when
//!   some members are FLOAT and others not. A fused MoE layer is `…mlp.experts` and its members are
//!   `experts.0.{gate,up,down}_proj`: every expert of the layer is loaded into the one scheme typed from
//!   expert 0. `kv_cache_type == "C8"` enables the C8 KV cache, on the layers whose
//!   `….k_proj.kv_cache_scale` the description lists.
//! - `methods/registry.py` and the `@register_scheme(type, layer_type)` of `methods/*.py`: which type
//!   loads on which layer kind ([`TYPES`]).
//! - `methods/w8a8_static.py`, `w8a16.py`, `w8a8_dynamic.py`, `w4a8.py`, `w4a16.py`,
//!   `w4a4_laos_dynamic.py`, `w8a8_pdmix.py`: the parameters each scheme creates (names, dtypes, shapes).
//! - `methods/kv_c8.py` and `attention/attention_v1.py` (`AscendC8AttentionBackendImpl`): the C8 scales.
//!
//! MindIE's loader is not public; its column of the tables follows msModelSlim's documentation of what
//! MindIE reads (per-group W8A16/W8A8_DYNAMIC scales, dense W4A8_DYNAMIC and W4A16 linears), and otherwise
//! asks what vLLM-Ascend asks.

use crate::export::{OutMeta, FLOAT};
use crate::tensor::{DType, TensorMeta};
use anyhow::{bail, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The server an output is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    VllmAscend,
    MindIe,
}

impl Target {
    pub const ALL: [Target; 2] = [Target::VllmAscend, Target::MindIe];

    /// The spelling of `--target`.
    pub fn name(self) -> &'static str {
        match self {
            Target::VllmAscend => "vllm-ascend",
            Target::MindIe => "mindie",
        }
    }

    /// The server's own name, for messages.
    pub fn server(self) -> &'static str {
        match self {
            Target::VllmAscend => "vLLM-Ascend",
            Target::MindIe => "MindIE",
        }
    }

    pub fn parse(s: &str) -> Result<Target> {
        let s = s.to_ascii_lowercase().replace('_', "-");
        match s.as_str() {
            "vllm-ascend" | "vllm" => Ok(Target::VllmAscend),
            "mindie" => Ok(Target::MindIe),
            _ => bail!("unknown --target {s:?} (vllm-ascend, mindie)"),
        }
    }
}

/// How a server computes a linear: vLLM's `layer_type` of `@register_scheme`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerKind {
    /// A `LinearBase`: attention projections, dense MLPs, shared experts, vision-tower linears.
    Linear,
    /// A routed MoE expert (`…experts.J.gate_proj`): vLLM fuses all experts of a layer into one
    /// `FusedMoE` layer (`layer_type` "moe").
    Expert,
}

impl LayerKind {
    /// Routed experts are saved split, `….experts.J.name` (msModelSlim's naming, and lamina's).
    pub fn of(module: &str) -> LayerKind {
        let parts: Vec<&str> = module.split('.').collect();
        let routed = parts.windows(2).any(|w| w[0] == "experts" && w[1].parse::<usize>().is_ok());
        if routed {
            LayerKind::Expert
        } else {
            LayerKind::Linear
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            LayerKind::Linear => "linear layer",
            LayerKind::Expert => "routed MoE expert",
        }
    }

    /// vLLM's `layer_type`.
    pub fn vllm(self) -> &'static str {
        match self {
            LayerKind::Linear => "linear",
            LayerKind::Expert => "moe",
        }
    }
}

/// A dimension of a tensor, in terms of its linear's `out × in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dim {
    Out,
    In,
    /// Two int4 of adjacent output rows per byte (W4A8_DYNAMIC).
    HalfOut,
    /// Eight int4 per int32 along the input (W4A16).
    InPerWord,
    /// Scale columns: 1 per output channel, `in / group_size` per group.
    Groups,
    /// W4A8_DYNAMIC's `scale_bias` columns: [`TP_SLICES`] for row-parallel linears, else 1.
    ScaleBias,
    One,
    Two,
}

/// The dtype a tensor must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeRule {
    Is(DType),
    /// A float scale: lamina writes f32 (as msModelSlim does); the loaders copy any float dtype into
    /// their parameters.
    Float,
    /// `deq_scale`: f32 when served in bfloat16, the f32 bit pattern in int64 when served in float16
    /// (`w8a8_static.py` `get_perchannel_param`).
    DeqScale,
}

/// One tensor of a quantized linear `X`: `X.suffix`.
#[derive(Debug, Clone, Copy)]
pub struct TensorRule {
    pub suffix: &'static str,
    pub dtype: DTypeRule,
    pub shape: &'static [Dim],
    /// Written by lamina and needed by the loader; optional tensors are read when present
    /// (msModelSlim's older saver writes them).
    pub required: bool,
}

const fn t(suffix: &'static str, dtype: DTypeRule, shape: &'static [Dim], required: bool) -> TensorRule {
    TensorRule { suffix, dtype, shape, required }
}

/// How weight scales may be grouped along the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grouping {
    /// No weight scale (static W8A8 keeps its scale inside `deq_scale`).
    NoScale,
    /// `[out, 1]`; per group `[out, in/g]` only where the target reads it (MindIE).
    PerChannel,
    /// `[out, in/g]`, `g` the description's `group_size`, dividing the input.
    PerGroup,
}

/// One description type.
#[derive(Debug, Clone, Copy)]
pub struct TypeRule {
    pub name: &'static str,
    /// Where vLLM-Ascend defines it.
    pub source: &'static str,
    /// The layer kinds vLLM-Ascend registers it for.
    pub vllm_ascend: &'static [LayerKind],
    /// The layer kinds MindIE reads it for.
    pub mindie: &'static [LayerKind],
    /// The tensors of a linear of this type, the weight first.
    pub tensors: &'static [TensorRule],
    pub grouping: Grouping,
    /// lamina writes this type (the others are checked in msModelSlim's outputs).
    pub lamina_writes: bool,
}

impl TypeRule {
    pub fn loads(&self, target: Target, kind: LayerKind) -> bool {
        self.kinds(target).contains(&kind)
    }
    fn kinds(&self, target: Target) -> &'static [LayerKind] {
        match target {
            Target::VllmAscend => self.vllm_ascend,
            Target::MindIe => self.mindie,
        }
    }
    pub fn weight(&self) -> &'static TensorRule {
        &self.tensors[0]
    }
}

use DTypeRule::{DeqScale, Float, Is};
use Dim::*;
use LayerKind::{Expert, Linear};

const W8_SCALES: [TensorRule; 3] = [
    t("weight", Is(DType::I8), &[Out, In], true),
    t("weight_scale", Float, &[Out, Groups], true),
    t("weight_offset", Float, &[Out, Groups], true),
];

/// Every type the rules know, from weakest to strongest in msModelSlim's `QUANT_TYPE_PRIORITY`.
pub const TYPES: &[TypeRule] = &[
    TypeRule {
        name: "W8A16",
        source: "methods/w8a16.py: AscendW8A16LinearMethod, registered for \"linear\" only",
        vllm_ascend: &[Linear],
        mindie: &[Linear],
        tensors: &W8_SCALES,
        grouping: Grouping::PerChannel,
        lamina_writes: true,
    },
    TypeRule {
        name: "W8A8_DYNAMIC",
        source: "methods/w8a8_dynamic.py: AscendW8A8DynamicLinearMethod, AscendW8A8DynamicFusedMoEMethod",
        vllm_ascend: &[Linear, Expert],
        mindie: &[Linear, Expert],
        tensors: &W8_SCALES,
        grouping: Grouping::PerChannel,
        lamina_writes: true,
    },
    TypeRule {
        name: "W8A8_MIX",
        source: "methods/w8a8_pdmix.py: AscendW8A8PDMixLinearMethod, registered for \"linear\" only",
        vllm_ascend: &[Linear],
        mindie: &[Linear],
        tensors: &[
            t("weight", Is(DType::I8), &[Out, In], true),
            t("quant_bias", Is(DType::I32), &[Out], true),
            t("input_scale", Float, &[One], true),
            t("input_offset", Float, &[One], true),
            t("deq_scale", DeqScale, &[Out], true),
            t("weight_scale", Float, &[Out, One], true),
            t("weight_offset", Float, &[Out, One], true),
        ],
        grouping: Grouping::PerChannel,
        lamina_writes: false,
    },
    TypeRule {
        name: "W8A8",
        source: "methods/w8a8_static.py: AscendW8A8LinearMethod, registered for \"linear\" only",
        vllm_ascend: &[Linear],
        mindie: &[Linear],
        tensors: &[
            t("weight", Is(DType::I8), &[Out, In], true),
            t("quant_bias", Is(DType::I32), &[Out], true),
            t("input_scale", Float, &[One], true),
            t("input_offset", Float, &[One], true),
            t("deq_scale", DeqScale, &[Out], true),
            // msModelSlim's v0 saver also writes these; the v1 saver and lamina do not.
            t("weight_scale", Float, &[Out, One], false),
            t("weight_offset", Float, &[Out, One], false),
        ],
        grouping: Grouping::NoScale,
        lamina_writes: true,
    },
    TypeRule {
        // msModelSlim's sparse quantization: the tensors of static W8A8 (its `complex_quantifier.py` yields
        // them for W8A8S), the int8 weights mostly within ±7. Only the 310P registry has the scheme, and it
        // creates `deq_scale` as int64 whatever the model dtype (310P serves float16).
        name: "W8A8S",
        source: "_310p/quantization/methods/w8a8s.py: AscendW8A8SLinearMethod310, registered for \"linear\" only, Atlas 300I (310P) only",
        vllm_ascend: &[Linear],
        mindie: &[Linear],
        tensors: &[
            t("weight", Is(DType::I8), &[Out, In], true),
            t("quant_bias", Is(DType::I32), &[Out], true),
            t("input_scale", Float, &[One], true),
            t("input_offset", Float, &[One], true),
            t("deq_scale", Is(DType::I64), &[Out], true),
        ],
        grouping: Grouping::NoScale,
        lamina_writes: true,
    },
    TypeRule {
        name: "W4A16",
        source: "methods/w4a16.py: AscendW4A16FusedMoEMethod, registered for \"moe\" only",
        vllm_ascend: &[Expert],
        mindie: &[Linear, Expert],
        tensors: &[
            t("weight_packed", Is(DType::I32), &[Out, InPerWord], true),
            t("weight_scale", Float, &[Out, Groups], true),
            t("weight_shape", Is(DType::I32), &[Two], true),
            t("weight_offset", Float, &[Out, Groups], false),
        ],
        grouping: Grouping::PerGroup,
        lamina_writes: true,
    },
    TypeRule {
        name: "W4A8_DYNAMIC",
        source: "methods/w4a8.py: AscendW4A8DynamicFusedMoEMethod, registered for \"moe\" only",
        vllm_ascend: &[Expert],
        mindie: &[Linear, Expert],
        tensors: &[
            t("weight", Is(DType::I8), &[HalfOut, In], true),
            t("weight_scale", Float, &[Out, One], true),
            t("weight_offset", Float, &[Out, One], true),
            t("scale_bias", Float, &[Out, ScaleBias], true),
        ],
        grouping: Grouping::PerChannel,
        lamina_writes: true,
    },
    TypeRule {
        name: "W4A4_DYNAMIC",
        source: "methods/w4a4_laos_dynamic.py: AscendW4A4LaosDynamicLinearMethod, registered for \"linear\" only",
        vllm_ascend: &[Linear],
        mindie: &[Linear],
        tensors: &[
            t("weight", Is(DType::I8), &[Out, In], true),
            t("weight_scale", Float, &[Out, One], true),
            // Created and loaded, never read by `apply`: lamina writes zeros (symmetric weights).
            t("weight_offset", Float, &[Out, One], true),
        ],
        grouping: Grouping::PerChannel,
        lamina_writes: true,
    },
];

/// msModelSlim's `QUANT_TYPE_PRIORITY` (save/ascendv1.py), weakest first: `model_quant_type` is the
/// strongest type present. W4A8_DYNAMIC is absent ("hidden": a W4A8 MoE model is described by its other
/// linears); W4A16, which the v1 saver does not write, ranks where the v0 saver put it. W8A8S, absent from the
/// v1 list (the v0 saver describes sparse models as W8A8S), ranks above W8A8: its weights carry fewer bits.
pub const PRIORITY: [&str; 8] =
    ["FLOAT", "W8A16", "W8A8_DYNAMIC", "W8A8_MIX", "W8A8", "W8A8S", "W4A16", "W4A4_DYNAMIC"];

/// The type rule of a description type.
pub fn rule(name: &str) -> Option<&'static TypeRule> {
    TYPES.iter().find(|r| r.name == name)
}

/// The README's table of types × layer kinds × targets, rendered from [`TYPES`] (a test keeps the README's
/// copy equal to it).
pub fn markdown_table() -> String {
    let cell = |r: &TypeRule, k: LayerKind| -> &'static str {
        match (r.loads(Target::VllmAscend, k), r.loads(Target::MindIe, k)) {
            (true, true) => "vLLM-Ascend, MindIE",
            (false, true) => "MindIE only",
            (true, false) => "vLLM-Ascend only",
            (false, false) => "no",
        }
    };
    let mut s = String::from(
        "| type | linear layer (attention, dense MLP, shared expert, vision) | routed MoE expert | tensors of a linear `X` | vLLM-Ascend source |\n|---|---|---|---|---|\n",
    );
    for r in TYPES {
        let tensors: Vec<String> = r
            .tensors
            .iter()
            .map(|t| {
                let dtype = match t.dtype {
                    Is(d) => d.name(),
                    Float => "F32",
                    DeqScale => "F32 / I64",
                };
                let dims: Vec<&str> = t
                    .shape
                    .iter()
                    .map(|d| match d {
                        Out => "out",
                        In => "in",
                        HalfOut => "out/2",
                        InPerWord => "in/8",
                        Groups => "groups",
                        ScaleBias => "1 or 16",
                        One => "1",
                        Two => "2",
                    })
                    .collect();
                format!("`{}`{} {dtype} [{}]", t.suffix, if t.required { "" } else { " (optional)" }, dims.join(", "))
            })
            .collect();
        s.push_str(&format!(
            "| {}{} | {} | {} | {} | `{}` |\n",
            r.name,
            if r.lamina_writes { "" } else { " (checked, not written)" },
            cell(r, LayerKind::Linear),
            cell(r, LayerKind::Expert),
            tensors.join("; "),
            r.source.split(':').next().unwrap_or("")
        ));
    }
    s
}

/// Tensor-parallel slices msModelSlim prepares row-parallel W4A8 layers for (`process_scale(…, tp_num=16)`);
/// vLLM-Ascend's `w2_scale_bias` is `[E, hidden, 16 // tp_size]` (`methods/w4a8.py`).
pub const TP_SLICES: usize = 16;

/// Row-parallel linears (input split across ranks): msModelSlim's `process_scale` recognises them by name.
pub fn is_row_parallel(module: &str) -> bool {
    matches!(module.rsplit('.').next().unwrap_or(module), "o_proj" | "down_proj" | "w2")
}

fn dim(d: Dim, module: &str, out: usize, inp: usize, groups: usize) -> usize {
    match d {
        Out => out,
        In => inp,
        HalfOut => out / 2,
        InPerWord => inp / 8,
        Groups => groups,
        ScaleBias => {
            if is_row_parallel(module) {
                TP_SLICES
            } else {
                1
            }
        }
        One => 1,
        Two => 2,
    }
}

/// The serving dtype's `deq_scale` dtype, `None` where the loader creates none (float32 serving).
pub fn deq_scale_dtype(serving: DType) -> Option<DType> {
    match serving {
        DType::BF16 => Some(DType::F32),
        DType::F16 => Some(DType::I64),
        _ => None,
    }
}

/// The dtype lamina writes for a tensor of this rule, served in `serving`.
pub fn written_dtype(rule: DTypeRule, serving: DType) -> DType {
    match rule {
        Is(d) => d,
        Float => DType::F32,
        DeqScale => deq_scale_dtype(serving).unwrap_or(DType::F32),
    }
}

/// The tensors lamina writes for a linear `module` (`out × in`) of description type `kind`, with `groups`
/// scale columns, served in `serving`: the required tensors of the type's rule and the optional ones named in
/// `optional` (in the rule's order), then `X.bias` (f32, FLOAT) when `optional` names `bias` (the linear has
/// one). The exporter fills them ([`crate::export::ascend`]).
pub fn linear_layout(
    kind: &'static str,
    module: &str,
    out: usize,
    inp: usize,
    groups: usize,
    serving: DType,
    optional: &[&str],
) -> Vec<OutMeta> {
    let r = rule(kind).unwrap_or_else(|| panic!("no rule for type {kind}"));
    let mut v: Vec<OutMeta> = r
        .tensors
        .iter()
        .filter(|t| t.required || optional.contains(&t.suffix))
        .map(|t| {
            let dtype = written_dtype(t.dtype, serving);
            let shape: Vec<usize> = t.shape.iter().map(|&d| dim(d, module, out, inp, groups)).collect();
            OutMeta { meta: TensorMeta::new(format!("{module}.{}", t.suffix), dtype, &shape), kind: r.name }
        })
        .collect();
    if optional.contains(&"bias") {
        v.push(OutMeta { meta: TensorMeta::new(format!("{module}.bias"), DType::F32, &[out]), kind: FLOAT });
    }
    v
}

/// The description kind msModelSlim gives the C8 tensors (`save/ascendv1.py` `on_dynamic_cache`).
pub const C8: &str = "C8";

/// The four C8 tensors of an attention module `ATTN`, named `ATTN.{k,v}_proj.kv_cache_{scale,offset}` as
/// msModelSlim writes them and vLLM-Ascend maps them (`get_cache_scale_mapper`: `.k_proj.kv_cache_scale` →
/// `.attn.k_cache_scale`, …): (suffix, which cache).
pub const C8_TENSORS: [(&str, KvSide); 4] = [
    ("k_proj.kv_cache_scale", KvSide::K),
    ("k_proj.kv_cache_offset", KvSide::K),
    ("v_proj.kv_cache_scale", KvSide::V),
    ("v_proj.kv_cache_offset", KvSide::V),
];

/// Whether a tensor is one of an attention's C8 tensors (by name).
pub fn is_c8_tensor(name: &str) -> bool {
    C8_TENSORS.iter().any(|(sfx, _)| name.strip_suffix(sfx).is_some_and(|m| m.ends_with('.')))
}

/// The key or the value cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSide {
    K,
    V,
}

/// The C8 tensors lamina writes for attention module `module`: F32, one value per cached channel (the loader
/// squeezes them and casts to the serving dtype, `kv_c8.py` `_c8_kv_scale_weight_loader`).
pub fn kv_cache_layout(module: &str, k_channels: usize, v_channels: usize) -> Vec<OutMeta> {
    C8_TENSORS
        .iter()
        .map(|(sfx, side)| {
            let n = if *side == KvSide::K { k_channels } else { v_channels };
            OutMeta { meta: TensorMeta::new(format!("{module}.{sfx}"), DType::F32, &[n]), kind: C8 }
        })
        .collect()
}

/// Why C8 cannot load for attention with heads of `head_dim` channels on `target`, if it cannot: vLLM-Ascend's
/// C8 decode views each cached head in the NZ layout of 32-channel blocks (`attention_v1.py` `_nz_5d_view`:
/// `head_size // 32`), so the head size must divide by 32.
pub fn c8_head_limit(target: Target, head_dim: usize) -> Option<String> {
    (target == Target::VllmAscend && head_dim % 32 != 0).then(|| {
        format!(
            "head_dim {head_dim} does not divide by 32: vLLM-Ascend's C8 decode views every cached head as blocks of 32 channels (attention_v1.py _nz_5d_view); MindIE (--target mindie) has no such limit"
        )
    })
}

/// A shape a type cannot hold for this linear on this target (the loader's assertion, or the packing),
/// `group` being the description's group size.
pub fn shape_limit(r: &TypeRule, target: Target, module: &str, out: usize, inp: usize, group: usize) -> Option<String> {
    let kind = LayerKind::of(module);
    match r.name {
        "W4A8_DYNAMIC" => {
            if out % 2 != 0 {
                return Some(format!("W4A8_DYNAMIC packs pairs of output rows, but it has {out} outputs"));
            }
            if is_row_parallel(module) && inp % TP_SLICES != 0 {
                return Some(format!(
                    "W4A8_DYNAMIC keeps {TP_SLICES} partial sums of a row-parallel linear's inputs (scale_bias; methods/w4a8.py reads [out, 16 // tp_size]), but it has {inp} inputs"
                ));
            }
            None
        }
        "W4A16" => {
            if inp % 8 != 0 || (kind == Expert && out % 8 != 0) {
                return Some(format!(
                    "W4A16 packs 8 int4 per int32 word and methods/w4a16.py asserts hidden and intermediate sizes divisible by 8, but it is {out} × {inp}"
                ));
            }
            if group == 0 {
                return Some("W4A16 needs the description's group_size (methods/w4a16.py reads it, default 32)".into());
            }
            // The MoE loader asserts both hidden and intermediate sizes divisible by group_size: an
            // expert's in and out are those two sizes.
            let bad = if kind == Expert { inp % group != 0 || out % group != 0 } else { inp % group != 0 };
            bad.then(|| {
                format!(
                    "{} {} divisible by group_size {group}, but it is {out} × {inp}",
                    if target == Target::VllmAscend {
                        "methods/w4a16.py asserts"
                    } else {
                        "MindIE's per-group W4A16 needs"
                    },
                    if kind == Expert { "hidden and intermediate sizes" } else { "the input size" }
                )
            })
        }
        _ => None,
    }
}

/// The types that load for a linear of `kind` with this shape on `target`, with the group size lamina
/// would use for per-group types (128).
pub fn loadable_types(target: Target, module: &str, out: usize, inp: usize) -> Vec<&'static str> {
    let kind = LayerKind::of(module);
    TYPES
        .iter()
        .filter(|r| r.lamina_writes && r.loads(target, kind))
        .filter(|r| shape_limit(r, target, module, out, inp, 128).is_none())
        .map(|r| r.name)
        .collect()
}

/// Fused modules by `model_type`: vLLM-Ascend's `packed_modules_model_mapping` (`modelslim_config.py`),
/// which overrides the vLLM model class's own `packed_modules_mapping`; `experts` says whether the family's
/// entry lists `experts` (without it, a quantized MoE layer's type lookup `…mlp.experts.weight` fails).
pub struct FamilyRule {
    pub model_type: &'static str,
    pub packed: &'static [(&'static str, &'static [&'static str])],
    pub experts: bool,
}

const QKV_GATE_UP: &[(&str, &[&str])] =
    &[("qkv_proj", &["q_proj", "k_proj", "v_proj"]), ("gate_up_proj", &["gate_proj", "up_proj"])];
const MLA: &[(&str, &[&str])] =
    &[("gate_up_proj", &["gate_proj", "up_proj"]), ("fused_qkv_a_proj", &["q_a_proj", "kv_a_proj_with_mqa"])];

/// The families vLLM-Ascend's table names (a family that adds fused modules adds a row here).
pub const FAMILIES: &[FamilyRule] = &[
    FamilyRule { model_type: "qwen3_moe", packed: QKV_GATE_UP, experts: true },
    FamilyRule { model_type: "qwen3_vl_moe", packed: QKV_GATE_UP, experts: true },
    FamilyRule { model_type: "qwen2_5_vl", packed: QKV_GATE_UP, experts: false },
    FamilyRule { model_type: "glm4_moe", packed: QKV_GATE_UP, experts: true },
    FamilyRule { model_type: "glm4v_moe", packed: QKV_GATE_UP, experts: true },
    // The table also packs "in_proj": [in_proj_qkvz, in_proj_ba], but no Qwen3-Next layer is called
    // `in_proj`: vLLM-Ascend's Gated DeltaNet (ops/gdn.py) runs in_proj_qkvz and in_proj_ba as two
    // layers, each typed on its own (msModelSlim's Qwen3-Next practice quantizes qkvz, not ba).
    FamilyRule { model_type: "qwen3_next", packed: QKV_GATE_UP, experts: true },
    // vLLM's remote-code decoders keep their stored attention projection as one layer and fuse the
    // SwiGLU halves: internlm2.py {"wqkv": ["wqkv"], "gate_up_proj": ["w1", "w3"]}, qwen.py
    // {"c_attn": ["c_attn"], "gate_up_proj": ["w2", "w1"]}.
    FamilyRule {
        model_type: "internlm2",
        packed: &[("wqkv", &["wqkv"]), ("gate_up_proj", &["w1", "w3"])],
        experts: false,
    },
    FamilyRule {
        model_type: "qwen",
        packed: &[("c_attn", &["c_attn"]), ("gate_up_proj", &["w2", "w1"])],
        experts: false,
    },
    FamilyRule { model_type: "deepseek_v2", packed: MLA, experts: true },
    FamilyRule { model_type: "deepseek_v3", packed: MLA, experts: true },
    FamilyRule { model_type: "kimi_k2", packed: MLA, experts: true },
];

/// MoE families lamina reads that vLLM-Ascend's table does not name: their fused MoE layer's type lookup
/// (`….mlp.experts.weight`) fails on an Ascend description with quantized experts, so for
/// `--target vllm-ascend` their experts can only stay FLOAT ([`check`]'s "fused" rule). HunYuan-A13B:
/// vLLM's `hunyuan_v1.py` packs only `qkv_proj` and `gate_up_proj`. Hunyuan-Large (`hunyuan`) has no
/// row either (and vLLM registers no model class for its architecture: the quantize pipeline refuses
/// that target for it outright).
pub const MOE_WITHOUT_EXPERTS_ENTRY: &[&str] = &["hunyuan_v1_moe", "hunyuan"];

/// Families vLLM-Ascend's table does not name use their vLLM model class's mapping, which for the
/// decoders and VL models lamina reads (llama, qwen2, qwen3, qwen2_vl, qwen3_vl, llava) fuses q/k/v
/// and gate/up, and has no `experts` entry.
pub const DEFAULT_FAMILY: FamilyRule = FamilyRule { model_type: "", packed: QKV_GATE_UP, experts: false };

pub fn family(model_type: &str) -> &'static FamilyRule {
    FAMILIES.iter().find(|f| f.model_type == model_type).unwrap_or(&DEFAULT_FAMILY)
}

/// The description keys (module names) vLLM-Ascend looks a stored linear's type up under besides
/// its own name, for families whose vLLM modules are named differently from the checkpoint:
///
/// - GLM-4.1V / 4.5V / 4.6V (`glm4_1v.py`): the vision attention's fused `attn.qkv` is built as
///   `QKVParallelLinear` with the prefix `attn.qkv_proj` whenever a quantization config is given
///   ("to align with GLM-4.5V-FP8"), so its type is looked up from the packed members
///   `attn.q_proj`, `attn.k_proj`, `attn.v_proj` (`get_linear_quant_type`, `is_layer_skipped_ascend`:
///   a missing member is a KeyError).
/// - GLM-4.1V (`glm4v`, not in vLLM-Ascend's `packed_modules_model_mapping`): the model class packs
///   `"gate_up_proj": ["gate_up_proj"]`, so every SwiGLU (the text MLP, the vision blocks' and the
///   merger's `gate_up_proj` merged from `gate_proj` and `up_proj`) is looked up as `gate_up_proj`.
///   GLM-4.5V's entry in the table packs `gate_proj` + `up_proj` and needs no alias.
pub fn lookup_aliases(model_type: &str, module: &str) -> Vec<String> {
    if !matches!(model_type, "glm4v" | "glm4v_moe") {
        return Vec::new();
    }
    let (parent, leaf) = module.rsplit_once('.').unwrap_or(("", module));
    let mut out = Vec::new();
    if leaf == "qkv" && parent.ends_with(".attn") && module.contains("visual.") {
        out.extend(["q_proj", "k_proj", "v_proj"].map(|l| format!("{parent}.{l}")));
    }
    if model_type == "glm4v" && matches!(leaf, "gate_proj" | "up_proj") {
        out.push(format!("{parent}.gate_up_proj"));
    }
    out
}

/// The alias entries ([`lookup_aliases`]) a description of these `(tensor, type)` entries needs:
/// `(alias.weight, the type of the linear it stands for)`. Two linears that one alias stands for
/// must have one type (vLLM serves them as one layer).
pub fn lookup_alias_entries<'a>(
    model_type: &str,
    types: impl Iterator<Item = (&'a str, &'a str)>,
) -> Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, (String, String)> = BTreeMap::new();
    for (name, kind) in types {
        let Some(module) = name.strip_suffix(".weight") else { continue };
        for alias in lookup_aliases(model_type, module) {
            let key = format!("{alias}.weight");
            match out.get(&key) {
                Some((k, other)) if k != kind => bail!(
                    "{module} ({kind}) and {other} ({k}) are served by vLLM as one layer {alias} and need one type"
                ),
                Some(_) => {}
                None => {
                    out.insert(key, (kind.to_string(), module.to_string()));
                }
            }
        }
    }
    Ok(out.into_iter().map(|(k, (kind, _))| (k, kind)).collect())
}

/// Modules a family's vLLM model class builds without a quantization method, so vLLM-Ascend cannot
/// load them quantized whatever the description says (their extra scale tensors have no parameter to
/// load into): checkpoint-name prefixes per `model_type`, with the reason.
pub struct FloatOnly {
    pub model_type: &'static str,
    pub prefixes: &'static [&'static str],
    pub why: &'static str,
}

/// - `internvl` (transformers' `-hf` InternVL, `InternVLForConditionalGeneration`): vLLM's registry
///   serves it with `interns1.py`'s `InternS1ForConditionalGeneration`, whose `InternS1VisionModel`
///   (`interns1_vit.py`) builds `InternS1VisionEncoder` without `quant_config` (the layers' `mlp.fc1` /
///   `fc2` get `quant_config=None`) and the attention's `q_proj` / `k_proj` / `v_proj` /
///   `projection_layer` as `nn.Linear`; its `InternS1MultiModalProjector` is `nn.Linear` too.
///
/// The description keys of this layout are the checkpoint's own names (`model.language_model.…`,
/// `lm_head`), as the weights: vLLM calls `quant_config.apply_vllm_mapper(hf_to_vllm_mapper)`
/// (`model_loader/utils.py` `configure_quant_config`), and vLLM-Ascend's
/// `AscendModelSlimConfig.apply_vllm_mapper` (`modelslim_config.py`) rewrites the description's keys
/// with the model's mapper (`model.language_model.` → `language_model.model.`, `lm_head.` →
/// `language_model.lm_head.`, `model.vision_tower.` → `vision_tower.`) before every lookup by the
/// vLLM module's prefix — the same mapping `load_weights` applies to the tensor names.
pub const FLOAT_ONLY: &[FloatOnly] = &[FloatOnly {
    model_type: "internvl",
    prefixes: &["model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector."],
    why: "vLLM serves transformers' InternVL layout with InternS1ForConditionalGeneration, whose vision tower \
          (interns1_vit.py: nn.Linear attention, an encoder built without quant_config) and projector \
          (nn.Linear) load float weights only",
}];

/// The modules of `model_type` that must stay FLOAT for vLLM-Ascend, if any ([`FLOAT_ONLY`]).
pub fn float_only(model_type: &str, module: &str) -> Option<&'static FloatOnly> {
    FLOAT_ONLY.iter().find(|f| f.model_type == model_type && f.prefixes.iter().any(|p| module.starts_with(p)))
}

mod checks;
pub use checks::*;

#[cfg(test)]
mod tests;
