//! Recipes: YAML files in the shape of msModelSlim's v1 pipelines (`apiversion`, `spec.process`
//! steps with `include` / `exclude` globs, `spec.save` with `part_file_size`).
//!
//! The bundled best practices live in `pipelines/` and are compiled into the binary, so the tool
//! works from any folder. `--quant_type Q` picks the bundled recipe of quant type Q whose
//! `metadata.model_types` names the model's family, else the one naming none (`default-Q`); among
//! those, one whose `metadata.targets` names the server comes first: the `--target` (`mindie-w4a16` for
//! MindIE, which reads dense 4-bit linears that vLLM-Ascend does not), or `compressed-tensors` for that
//! `--save_format` (`smoothquant-w8a8`: no m2 shift, whose biases the format cannot hold).
//! `--config_path` reads a user's file, or a bundled recipe by name (`w8a8-fast`): named
//! variants carry no `quant_type`, so `--quant_type` never picks them.

use super::glob::glob_match;
use super::spec::{QConfig, QuantSpec, TensorQConfig};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The bundled recipes: (file name, text).
pub const BUNDLED: &[(&str, &str)] = &[
    ("default-w8a16.yaml", include_str!("../../pipelines/default-w8a16.yaml")),
    ("default-w8a8_dynamic.yaml", include_str!("../../pipelines/default-w8a8_dynamic.yaml")),
    ("default-w4a8_dynamic.yaml", include_str!("../../pipelines/default-w4a8_dynamic.yaml")),
    ("default-w4a16.yaml", include_str!("../../pipelines/default-w4a16.yaml")),
    ("dense-w4a8_dynamic.yaml", include_str!("../../pipelines/dense-w4a8_dynamic.yaml")),
    ("mindie-w4a16.yaml", include_str!("../../pipelines/mindie-w4a16.yaml")),
    ("dense-w4a16.yaml", include_str!("../../pipelines/dense-w4a16.yaml")),
    ("smoothquant-w8a8.yaml", include_str!("../../pipelines/smoothquant-w8a8.yaml")),
    ("default-w8a8.yaml", include_str!("../../pipelines/default-w8a8.yaml")),
    ("qwen3_moe-w8a8.yaml", include_str!("../../pipelines/qwen3_moe-w8a8.yaml")),
    ("qwen3_next-w8a8.yaml", include_str!("../../pipelines/qwen3_next-w8a8.yaml")),
    ("qwen3_next-w8a8_dynamic.yaml", include_str!("../../pipelines/qwen3_next-w8a8_dynamic.yaml")),
    ("qwen3_vl-w8a8.yaml", include_str!("../../pipelines/qwen3_vl-w8a8.yaml")),
    ("qwen3_vl_moe-w8a8.yaml", include_str!("../../pipelines/qwen3_vl_moe-w8a8.yaml")),
    ("qwen2_5_vl-w8a8.yaml", include_str!("../../pipelines/qwen2_5_vl-w8a8.yaml")),
    ("qwen2_vl-w8a8.yaml", include_str!("../../pipelines/qwen2_vl-w8a8.yaml")),
    ("llava-w8a8.yaml", include_str!("../../pipelines/llava-w8a8.yaml")),
    ("deepseek_v3-w8a8.yaml", include_str!("../../pipelines/deepseek_v3-w8a8.yaml")),
    ("hunyuan-w8a8.yaml", include_str!("../../pipelines/hunyuan-w8a8.yaml")),
    ("deepseek_v3-w4a8_dynamic.yaml", include_str!("../../pipelines/deepseek_v3-w4a8_dynamic.yaml")),
    ("internlm2-w8a8.yaml", include_str!("../../pipelines/internlm2-w8a8.yaml")),
    ("qwen-w8a8.yaml", include_str!("../../pipelines/qwen-w8a8.yaml")),
    ("qwen_vl-w8a8.yaml", include_str!("../../pipelines/qwen_vl-w8a8.yaml")),
    ("internvl_chat-w8a8.yaml", include_str!("../../pipelines/internvl_chat-w8a8.yaml")),
    ("internvl-w8a8.yaml", include_str!("../../pipelines/internvl-w8a8.yaml")),
    ("glm4v-w8a8.yaml", include_str!("../../pipelines/glm4v-w8a8.yaml")),
    ("glm4v_moe-w8a8.yaml", include_str!("../../pipelines/glm4v_moe-w8a8.yaml")),
    ("w8a8-fast.yaml", include_str!("../../pipelines/w8a8-fast.yaml")),
    ("w8a8-all-static.yaml", include_str!("../../pipelines/w8a8-all-static.yaml")),
    ("w8a8-quarot.yaml", include_str!("../../pipelines/w8a8-quarot.yaml")),
    ("w4a16-awq.yaml", include_str!("../../pipelines/w4a16-awq.yaml")),
    ("w4a16-gptq.yaml", include_str!("../../pipelines/w4a16-gptq.yaml")),
    ("w4a8-quarot.yaml", include_str!("../../pipelines/w4a8-quarot.yaml")),
    ("w4a4-quarot.yaml", include_str!("../../pipelines/w4a4-quarot.yaml")),
    ("w8a8s.yaml", include_str!("../../pipelines/w8a8s.yaml")),
    ("qwen3_vl_moe-w8a8-quarot.yaml", include_str!("../../pipelines/qwen3_vl_moe-w8a8-quarot.yaml")),
];

/// The `--quant_type` values, each with a bundled default recipe; the `…c8` ones are their base type's
/// recipe with the KV cache quantized ([`Recipe::with_c8`]).
pub const QUANT_TYPES: [&str; 7] = ["w8a8", "w8a8_dynamic", "w8a16", "w4a8_dynamic", "w4a16", "w8a8c8", "w4a8c8"];

/// The base quant type of a `…c8` quant type (msModelSlim's w8a8c8 and w4a8c8 rows).
pub fn c8_base(quant_type: &str) -> Option<&'static str> {
    match quant_type {
        "w8a8c8" => Some("w8a8"),
        "w4a8c8" | "w4a8_dynamicc8" | "w4a8_dynamic_c8" => Some("w4a8_dynamic"),
        _ => None,
    }
}

/// The step type of KV-cache quantization (msModelSlim v1's `DynamicCacheProcessorConfig`).
pub const KV_CACHE_STEP: &str = "dynamic_cache";

/// What [`Recipe::with_c8`] appends to the recipe's text (part of a run's fingerprint).
const C8_STEP_TEXT: &str = "
# added by --quant_type ...c8: the KV cache of every attention layer int8 per channel (C8)
# - type: dynamic_cache
#   qconfig: {scope: per_channel, dtype: int8, symmetric: true, method: minmax}
#   include: [\"*\"]
";

/// A `dynamic_cache` step's scheme: int8 per KV channel, min-max over the calibration data (the only form
/// msModelSlim's DynamicCacheQuantProcessor and the Ascend servers' C8 take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KvCacheSpec {
    /// Offsets 0 (vLLM-Ascend reads only symmetric C8), else msModelSlim's asymmetric min-max (MindIE).
    pub symmetric: bool,
}

/// One step of `spec.process`.
#[derive(Debug, Clone)]
pub struct Step {
    /// `linear_quant`, or an algorithm step (`iter_smooth`, `smooth_quant`, `gptq`, …).
    pub kind: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// For `linear_quant`.
    pub spec: Option<QuantSpec>,
    /// For `dynamic_cache`.
    pub kv_cache: Option<KvCacheSpec>,
    /// The step's other settings, as written.
    pub params: serde_yaml::Mapping,
}

impl Step {
    pub fn matches(&self, module: &str) -> bool {
        let inc = self.include.is_empty() || self.include.iter().any(|p| glob_match(p, module));
        inc && !self.exclude.iter().any(|p| glob_match(p, module))
    }
}

#[derive(Debug, Clone)]
pub struct Recipe {
    /// `metadata.config_id`, or where the recipe came from.
    pub name: String,
    /// The YAML text, part of a run's fingerprint.
    pub text: String,
    pub steps: Vec<Step>,
    pub part_file_size: Option<f64>,
    /// Calibration settings for vision-language recipes.
    pub dataset: Option<String>,
    pub default_text: Option<String>,
    /// `metadata.quant_type` and `metadata.model_types` select bundled recipes.
    pub quant_type: Option<String>,
    pub model_types: Vec<String>,
    /// `metadata.targets`: the servers (`--target` names) this recipe is the best practice for; empty for
    /// every server.
    pub targets: Vec<String>,
}

#[derive(Deserialize)]
struct RawRecipe {
    apiversion: String,
    #[serde(default)]
    metadata: Option<RawMetadata>,
    spec: RawSpec,
}

#[derive(Deserialize, Default)]
struct RawMetadata {
    #[serde(default)]
    config_id: Option<String>,
    #[serde(default)]
    quant_type: Option<String>,
    #[serde(default)]
    model_types: Vec<String>,
    #[serde(default)]
    targets: Vec<String>,
}

#[derive(Deserialize)]
struct RawSpec {
    process: Vec<serde_yaml::Value>,
    #[serde(default)]
    save: Vec<RawSave>,
    #[serde(default)]
    dataset: Option<String>,
    #[serde(default)]
    default_text: Option<String>,
}

#[derive(Deserialize)]
struct RawSave {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    part_file_size: Option<f64>,
}

impl Recipe {
    pub fn parse(text: &str, origin: &str) -> Result<Recipe> {
        let raw: RawRecipe =
            serde_yaml::from_str(text).with_context(|| format!("recipe {origin} is not a valid pipeline YAML"))?;
        if !raw.apiversion.contains("modelslim_v1") && raw.apiversion != "lamina_v1" {
            bail!(
                "recipe {origin}: apiversion {:?} is not supported (modelslim_v1, multimodal_vlm_modelslim_v1)",
                raw.apiversion
            );
        }
        let mut steps = Vec::new();
        for (i, v) in raw.spec.process.iter().enumerate() {
            parse_step(v, &mut steps).with_context(|| format!("recipe {origin}: spec.process[{i}]"))?;
        }
        let mut part_file_size = None;
        for s in &raw.spec.save {
            if s.kind != "ascendv1_saver" {
                bail!("recipe {origin}: saver {:?} is not supported (ascendv1_saver)", s.kind);
            }
            part_file_size = s.part_file_size.or(part_file_size);
        }
        let meta = raw.metadata.unwrap_or_default();
        Ok(Recipe {
            name: meta.config_id.unwrap_or_else(|| origin.to_string()),
            text: text.to_string(),
            steps,
            part_file_size,
            dataset: raw.spec.dataset,
            default_text: raw.spec.default_text,
            quant_type: meta.quant_type,
            model_types: meta.model_types,
            targets: meta.targets,
        })
    }

    /// A recipe file, or when no such file exists, the bundled recipe of that name (`w8a8-fast`
    /// or `w8a8-fast.yaml`).
    pub fn from_file(path: &Path) -> Result<Recipe> {
        if !path.exists() {
            if let Some(r) = path.to_str().and_then(Recipe::named) {
                return r;
            }
        }
        let text = std::fs::read_to_string(path).with_context(|| {
            let names: Vec<&str> = BUNDLED.iter().map(|(f, _)| f.trim_end_matches(".yaml")).collect();
            format!("cannot read recipe {} (bundled recipes: {})", path.display(), names.join(", "))
        })?;
        Recipe::parse(&text, &path.display().to_string())
    }

    /// The bundled recipe with this file name, with or without `.yaml`.
    pub fn named(name: &str) -> Option<Result<Recipe>> {
        let file = if name.ends_with(".yaml") { name.to_string() } else { format!("{name}.yaml") };
        BUNDLED.iter().find(|(f, _)| *f == file).map(|(f, t)| Recipe::parse(t, f))
    }

    /// The bundled best practice for a model type, quant type and target server: a recipe naming the
    /// model type beats one naming none, and then one naming the target beats one naming none.
    pub fn bundled(model_type: &str, quant_type: &str, target: &str) -> Result<Recipe> {
        if let Some(base) = c8_base(quant_type) {
            return Ok(Recipe::bundled(model_type, base, target)?.with_c8());
        }
        let mut best: Option<(u8, Recipe)> = None;
        for (file, text) in BUNDLED {
            let r = Recipe::parse(text, file)?;
            if r.quant_type.as_deref() != Some(quant_type) {
                continue;
            }
            let model = if r.model_types.is_empty() {
                0
            } else if r.model_types.iter().any(|m| m == model_type) {
                2
            } else {
                continue;
            };
            let server = if r.targets.is_empty() {
                0
            } else if r.targets.iter().any(|t| t == target) {
                1
            } else {
                continue;
            };
            let rank = model + server;
            if best.as_ref().is_none_or(|(b, _)| rank > *b) {
                best = Some((rank, r));
            }
        }
        best.map(|(_, r)| r).with_context(|| {
            format!("no bundled recipe for --quant_type {quant_type} (known: {})", QUANT_TYPES.join(", "))
        })
    }

    /// How a linear is quantized: the first `linear_quant` step that matches it, if any.
    pub fn linear_spec(&self, module: &str) -> Option<QuantSpec> {
        self.steps.iter().filter(|s| s.kind == "linear_quant").find(|s| s.matches(module)).and_then(|s| s.spec)
    }

    /// The algorithm steps (everything but `linear_quant` and `dynamic_cache`).
    pub fn algorithm_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.kind != "linear_quant" && s.kind != KV_CACHE_STEP)
    }

    /// How the KV cache of attention module `module` (`model.layers.0.self_attn`) is quantized: the first
    /// `dynamic_cache` step that matches it, if any.
    pub fn kv_cache(&self, module: &str) -> Option<KvCacheSpec> {
        self.steps.iter().filter(|s| s.kind == KV_CACHE_STEP).find(|s| s.matches(module)).and_then(|s| s.kv_cache)
    }

    /// Whether any step quantizes a KV cache.
    pub fn has_kv_cache(&self) -> bool {
        self.steps.iter().any(|s| s.kind == KV_CACHE_STEP)
    }

    /// This recipe with the KV cache of every attention layer quantized C8 (int8 per channel, symmetric,
    /// min-max): what `--quant_type w8a8c8` / `w4a8c8` add to the family's `w8a8` / `w4a8_dynamic` recipe.
    pub fn with_c8(mut self) -> Recipe {
        self.steps.push(Step {
            kind: KV_CACHE_STEP.to_string(),
            include: vec!["*".into()],
            exclude: Vec::new(),
            spec: None,
            kv_cache: Some(KvCacheSpec { symmetric: true }),
            params: serde_yaml::Mapping::new(),
        });
        self.text.push_str(C8_STEP_TEXT);
        self.name.push_str("+c8");
        if let Some(q) = &mut self.quant_type {
            let base = q.trim_end_matches("_dynamic").to_string();
            *q = format!("{base}c8");
        }
        self
    }
}

fn parse_step(v: &serde_yaml::Value, out: &mut Vec<Step>) -> Result<()> {
    let map = v.as_mapping().context("a step must be a mapping")?;
    let kind = map.get("type").and_then(|t| t.as_str()).context("a step needs a `type`")?.to_string();
    if kind == "group" {
        let configs = map.get("configs").and_then(|c| c.as_sequence()).context("a `group` step needs `configs`")?;
        for c in configs {
            parse_step(c, out)?;
        }
        return Ok(());
    }
    let globs = |key: &str| -> Result<Vec<String>> {
        match map.get(key) {
            None => Ok(Vec::new()),
            Some(v) => serde_yaml::from_value(v.clone()).with_context(|| format!("`{key}` must be a list of patterns")),
        }
    };
    let spec = if kind == "linear_quant" {
        let q: QConfig =
            serde_yaml::from_value(map.get("qconfig").cloned().context("`linear_quant` needs a `qconfig`")?)
                .context("unreadable qconfig")?;
        Some(QuantSpec::from_qconfig(&q)?)
    } else {
        None
    };
    let kv_cache = if kind == KV_CACHE_STEP {
        let q: TensorQConfig =
            serde_yaml::from_value(map.get("qconfig").cloned().context("`dynamic_cache` needs a `qconfig`")?)
                .context("unreadable dynamic_cache qconfig")?;
        Some(kv_cache_spec(&q)?)
    } else {
        None
    };
    let mut params = map.clone();
    for k in ["type", "include", "exclude", "qconfig"] {
        params.remove(k);
    }
    out.push(Step { kind, include: globs("include")?, exclude: globs("exclude")?, spec, kv_cache, params });
    Ok(())
}

/// A `dynamic_cache` qconfig: int8, per channel, min-max (msModelSlim's processor refuses other scopes; the
/// Ascend servers read one scale and offset per KV channel).
fn kv_cache_spec(q: &TensorQConfig) -> Result<KvCacheSpec> {
    if q.scope != "per_channel" {
        bail!(
            "dynamic_cache: scope {:?} is not supported (per_channel: one scale per KV channel, as C8 stores it)",
            q.scope
        );
    }
    if q.dtype != "int8" {
        bail!("dynamic_cache: dtype {:?} is not supported (int8: C8)", q.dtype);
    }
    if let Some(m) = q.method.as_deref().filter(|m| *m != "minmax") {
        bail!("dynamic_cache: method {m:?} is not supported (minmax)");
    }
    Ok(KvCacheSpec { symmetric: q.symmetric.unwrap_or(true) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_cache_steps_parse_as_msmodelslim_writes_them() {
        let yaml = |q: &str| {
            format!(
                "apiversion: modelslim_v1\nspec:\n  process:\n    - type: dynamic_cache\n      qconfig: {q}\n      include: [\"*layers.1.*\"]\n"
            )
        };
        let r =
            Recipe::parse(&yaml("{scope: per_channel, dtype: int8, symmetric: false, method: minmax}"), "t").unwrap();
        assert_eq!(r.kv_cache("model.layers.1.self_attn"), Some(KvCacheSpec { symmetric: false }));
        assert_eq!(r.kv_cache("model.layers.0.self_attn"), None);
        assert!(r.algorithm_steps().next().is_none());
        for (bad, why) in [
            ("{scope: per_tensor, dtype: int8}", "per_channel"),
            ("{scope: per_channel, dtype: int4}", "int8"),
            ("{scope: per_channel, dtype: int8, method: histogram}", "minmax"),
        ] {
            let e = format!("{:#}", Recipe::parse(&yaml(bad), "t").unwrap_err());
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn bundled_recipes_parse_and_keep_the_defaults_float() {
        for (f, t) in BUNDLED {
            Recipe::parse(t, f).unwrap();
        }
        let r = Recipe::bundled("qwen3_vl_moe", "w8a8_dynamic", "vllm-ascend").unwrap();
        assert!(r.linear_spec("model.language_model.layers.0.self_attn.q_proj").is_some());
        assert!(r.linear_spec("model.language_model.layers.0.mlp.experts.3.down_proj").is_some());
        for float in [
            "lm_head",
            "language_model.lm_head",
            "model.language_model.layers.0.mlp.gate",
            "model.visual.blocks.0.mlp.linear_fc2",
            "model.visual.merger.linear_fc1",
            "model.visual.deepstack_merger_list.1.linear_fc2",
        ] {
            assert!(r.linear_spec(float).is_none(), "{float}");
        }
        assert!(Recipe::bundled("llama", "w9a9", "vllm-ascend").unwrap_err().to_string().contains("w8a16"));
    }

    #[test]
    fn one_default_per_quant_type_one_recipe_per_family_and_named_variants() {
        let all: Vec<Recipe> = BUNDLED.iter().map(|(f, t)| Recipe::parse(t, f).unwrap()).collect();
        let mut seen = std::collections::BTreeSet::new();
        for r in all.iter().filter(|r| r.quant_type.is_some()) {
            let q = r.quant_type.clone().unwrap();
            let keys: Vec<String> = if r.model_types.is_empty() { vec![String::new()] } else { r.model_types.clone() };
            let targets: Vec<String> = if r.targets.is_empty() { vec![String::new()] } else { r.targets.clone() };
            for m in &keys {
                for t in &targets {
                    assert!(seen.insert((q.clone(), m.clone(), t.clone())), "two bundled {q} recipes for {m:?} {t:?}");
                }
            }
            // Named after what selects it: the model type, else (for server-specific recipes) what they are.
            match (r.model_types.first(), r.targets.is_empty()) {
                (Some(m), _) => assert_eq!(r.name, format!("{m}-{q}")),
                (None, true) => assert_eq!(r.name, format!("default-{q}")),
                (None, false) => {
                    assert!(r.name.ends_with(&format!("-{q}")) && !r.name.starts_with("default"), "{}", r.name)
                }
            }
        }
        for q in QUANT_TYPES {
            let base = c8_base(q).unwrap_or(q);
            assert!(seen.contains(&(base.to_string(), String::new(), String::new())), "no default recipe for {q}");
        }
        // The c8 types: the family's recipe of the base type, plus a dynamic_cache step on every attention.
        let r = Recipe::bundled("qwen3_vl_moe", "w8a8c8", "vllm-ascend").unwrap();
        assert_eq!((r.name.as_str(), r.quant_type.as_deref()), ("qwen3_vl_moe-w8a8+c8", Some("w8a8c8")));
        assert_eq!(r.kv_cache("model.language_model.layers.3.self_attn"), Some(KvCacheSpec { symmetric: true }));
        assert!(Recipe::bundled("qwen3_vl_moe", "w8a8", "vllm-ascend")
            .unwrap()
            .kv_cache("model.layers.0.self_attn")
            .is_none());
        let r = Recipe::bundled("qwen3_moe", "w4a8c8", "vllm-ascend").unwrap();
        assert_eq!(r.name, "default-w4a8_dynamic+c8");
        assert!(r.text.contains("dynamic_cache") && r.has_kv_cache() && r.algorithm_steps().next().is_none());
        // MindIE reads dense 4-bit linears: its own recipes for those; the others are shared.
        for (q, want) in [("w4a16", "mindie-w4a16"), ("w4a8_dynamic", "dense-w4a8_dynamic"), ("w8a16", "default-w8a16")]
        {
            assert_eq!(Recipe::bundled("llama", q, "mindie").unwrap().name, want);
            assert_eq!(Recipe::bundled("llama", q, "vllm-ascend").unwrap().name, format!("default-{q}"));
        }
        assert_eq!(Recipe::bundled("qwen3_moe", "w8a8", "mindie").unwrap().name, "qwen3_moe-w8a8");
        // compressed-tensors: the recipes without m2's shift.
        for (model, q, want) in [
            ("llama", "w8a8", "smoothquant-w8a8"),
            ("qwen2_vl", "w8a8", "qwen2_vl-w8a8"),
            ("qwen3", "w4a16", "dense-w4a16"),
            ("qwen3", "w8a8_dynamic", "default-w8a8_dynamic"),
        ] {
            assert_eq!(Recipe::bundled(model, q, "compressed-tensors").unwrap().name, want);
        }
        // Every file in pipelines/ is compiled in.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut files: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        files.sort();
        let mut bundled: Vec<String> = BUNDLED.iter().map(|(f, _)| f.to_string()).collect();
        bundled.sort();
        assert_eq!(files, bundled);

        assert_eq!(Recipe::bundled("llama", "w8a8", "vllm-ascend").unwrap().name, "default-w8a8");
        assert_eq!(Recipe::bundled("qwen3_vl_moe", "w8a8", "vllm-ascend").unwrap().name, "qwen3_vl_moe-w8a8");
        for variant in ["w8a8-fast", "w8a8-all-static"] {
            let r = Recipe::from_file(Path::new(variant)).unwrap();
            assert_eq!((r.name.as_str(), r.quant_type.as_deref()), (variant, None));
            assert_eq!(Recipe::named(&format!("{variant}.yaml")).unwrap().unwrap().text, r.text);
        }
        let gptq =
            |r: &Recipe, m: &str| r.linear_spec(m).map(|s| s.weight_method == crate::quant::spec::WeightMethod::Gptq);
        let (default, fast) =
            (Recipe::bundled("qwen3", "w8a8", "vllm-ascend").unwrap(), Recipe::named("w8a8-fast").unwrap().unwrap());
        for m in ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"] {
            assert_eq!(default.linear_spec(m).map(|s| s.ascend_type()), fast.linear_spec(m).map(|s| s.ascend_type()));
            assert_eq!((gptq(&default, m), gptq(&fast, m)), (Some(true), Some(false)), "{m}");
        }
        let all_static = Recipe::named("w8a8-all-static").unwrap().unwrap();
        assert_eq!(all_static.linear_spec("model.layers.0.mlp.down_proj").unwrap().ascend_type(), "W8A8");
        let err = Recipe::from_file(Path::new("no-such-recipe")).unwrap_err();
        assert!(format!("{err:#}").contains("w8a8-fast"), "{err:#}");
    }

    /// The scheme each family's `--quant_type w8a8` recipe means to give a linear, stated from the
    /// linear's role rather than from the recipes' globs.
    fn intended_w8a8(module: &str) -> Option<&'static str> {
        let leaf = module.rsplit('.').next().unwrap();
        if matches!(leaf, "lm_head" | "output") || module.ends_with("mlp.gate") || module.ends_with("mlp.gate.wg") {
            return None;
        }
        if module.contains(".mlp.experts.") {
            return Some("W8A8_DYNAMIC");
        }
        let vision = ["visual.", "vision_tower.", "multi_modal_projector."].iter().any(|v| module.contains(v));
        if vision {
            // Vision blocks are static W8A8 except their second MLP projection; mergers and the
            // projector stay float.
            let float = module.contains("merger")
                || module.contains("multi_modal_projector")
                || matches!(leaf, "fc2" | "linear_fc2" | "down_proj");
            return (!float).then_some("W8A8");
        }
        // The down projection: down_proj, InternLM2's feed_forward.w2, Qwen's mlp.c_proj.
        let down = leaf == "down_proj" || module.ends_with("feed_forward.w2") || module.ends_with("mlp.c_proj");
        Some(if down { "W8A16" } else { "W8A8" })
    }

    #[test]
    fn w8a8_recipes_give_every_fixture_linear_its_intended_scheme() {
        use crate::io::checkpoint::Checkpoint;
        use crate::model::{build_units, Model};
        let fixtures = [
            ("llama", "default-w8a8"),
            ("qwen2", "default-w8a8"),
            ("qwen3", "default-w8a8"),
            ("qwen3_moe", "qwen3_moe-w8a8"),
            ("qwen2_vl", "qwen2_vl-w8a8"),
            ("qwen2_5_vl", "qwen2_5_vl-w8a8"),
            ("qwen3_vl", "qwen3_vl-w8a8"),
            ("qwen3_vl_moe", "qwen3_vl_moe-w8a8"),
            ("llava", "llava-w8a8"),
            ("internlm2", "internlm2-w8a8"),
            ("qwen1", "qwen-w8a8"),
            ("hunyuan_v1_moe", "default-w8a8"),
        ];
        for (fixture, recipe_name) in fixtures {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(fixture);
            let ckpt = Checkpoint::open(&dir).unwrap();
            let names: Vec<&str> = ckpt.names().collect();
            let model = Model::new(&ckpt.config, None, &names).unwrap();
            let inventory: Vec<_> = names.iter().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
            let recipe = Recipe::bundled(model.family.model_type(), "w8a8", "vllm-ascend").unwrap();
            assert_eq!(recipe.name, recipe_name, "{fixture}");
            let mut got = std::collections::BTreeMap::new();
            for unit in build_units(&model, &inventory).unwrap() {
                for m in unit.tensors.iter().filter_map(|t| t.linear_module()) {
                    let scheme = recipe.linear_spec(m).map(|s| s.ascend_type());
                    assert_eq!(scheme, intended_w8a8(m), "{fixture}: {m} under {recipe_name}");
                    got.insert(m.to_string(), scheme);
                }
            }
            let has = |m: &str, want: Option<&str>| {
                assert_eq!(got.get(m).copied(), Some(want), "{fixture}: {m} (is it a linear of the fixture?)")
            };
            let vision = model.family.is_vision_language();
            match fixture {
                "qwen3_vl_moe" => {
                    has("model.language_model.layers.0.self_attn.q_proj", Some("W8A8"));
                    has("model.language_model.layers.1.mlp.experts.3.down_proj", Some("W8A8_DYNAMIC"));
                    has("model.language_model.layers.0.mlp.gate", None);
                    has("model.visual.blocks.0.attn.qkv", Some("W8A8"));
                    has("model.visual.blocks.0.mlp.linear_fc1", Some("W8A8"));
                    has("model.visual.blocks.0.mlp.linear_fc2", None);
                    has("model.visual.merger.linear_fc1", None);
                    has("model.visual.deepstack_merger_list.0.linear_fc1", None);
                    has("lm_head", None);
                }
                "qwen3_moe" => {
                    has("model.layers.0.mlp.experts.0.gate_proj", Some("W8A8_DYNAMIC"));
                    has("model.layers.0.self_attn.o_proj", Some("W8A8"));
                }
                "qwen2_5_vl" => {
                    has("visual.blocks.0.mlp.gate_proj", Some("W8A8"));
                    has("visual.blocks.0.mlp.down_proj", None);
                    has("model.layers.0.mlp.down_proj", Some("W8A16"));
                }
                "qwen2_vl" => has("visual.blocks.0.mlp.fc2", None),
                "llava" => {
                    has("multi_modal_projector.linear_1", None);
                    has("vision_tower.vision_model.encoder.layers.0.self_attn.out_proj", Some("W8A8"));
                    has("vision_tower.vision_model.encoder.layers.0.mlp.fc2", None);
                    has("language_model.model.layers.1.mlp.down_proj", Some("W8A16"));
                }
                "qwen3_vl" => {
                    has("model.language_model.layers.1.mlp.down_proj", Some("W8A16"));
                    has("model.visual.blocks.1.mlp.linear_fc2", None);
                }
                "internlm2" => {
                    has("model.layers.0.attention.wqkv", Some("W8A8"));
                    has("model.layers.0.feed_forward.w1", Some("W8A8"));
                    has("model.layers.0.feed_forward.w3", Some("W8A8"));
                    has("model.layers.1.feed_forward.w2", Some("W8A16"));
                    has("output", None);
                }
                "qwen1" => {
                    has("transformer.h.0.attn.c_attn", Some("W8A8"));
                    has("transformer.h.0.mlp.w2", Some("W8A8"));
                    has("transformer.h.1.mlp.c_proj", Some("W8A16"));
                    has("lm_head", None);
                }
                "hunyuan_v1_moe" => {
                    has("model.layers.1.mlp.gate.wg", None);
                    has("model.layers.1.mlp.experts.3.down_proj", Some("W8A8_DYNAMIC"));
                    has("model.layers.1.mlp.shared_mlp.up_proj", Some("W8A8"));
                    has("model.layers.1.mlp.shared_mlp.down_proj", Some("W8A16"));
                    has("model.layers.0.self_attn.v_proj", Some("W8A8"));
                }
                _ => has("model.layers.1.mlp.down_proj", Some("W8A16")),
            }
            if vision {
                let tower = |want: Option<&str>| {
                    got.iter().any(|(m, s)| (m.contains("visual.") || m.contains("vision_tower.")) && *s == want)
                };
                assert!(tower(Some("W8A8")) && tower(None), "{fixture}: the tower has static and float linears");
            }
        }
        // The layouts transformers 5 saves, which the fixtures do not use.
        let t5 = [
            ("qwen2_vl", "model.visual.blocks.3.mlp.fc2"),
            ("qwen2_vl", "model.visual.blocks.3.attn.qkv"),
            ("qwen2_vl", "model.language_model.layers.7.mlp.down_proj"),
            ("qwen2_5_vl", "model.visual.blocks.3.mlp.down_proj"),
            ("qwen2_5_vl", "model.visual.merger.mlp.2"),
            ("qwen2_5_vl", "model.language_model.layers.7.mlp.down_proj"),
            ("qwen3_vl_moe", "model.layers.2.mlp.experts.5.up_proj"),
            ("qwen3_vl_moe", "visual.deepstack_merger_list.2.linear_fc2"),
            ("llava", "model.language_model.layers.7.mlp.down_proj"),
            ("llava", "model.vision_tower.vision_model.encoder.layers.3.mlp.fc2"),
            ("llava", "model.vision_tower.vision_model.encoder.layers.3.mlp.fc1"),
            ("llava", "model.multi_modal_projector.linear_2"),
            ("llava", "lm_head"),
        ];
        for (family, m) in t5 {
            let scheme =
                Recipe::bundled(family, "w8a8", "vllm-ascend").unwrap().linear_spec(m).map(|s| s.ascend_type());
            assert_eq!(scheme, intended_w8a8(m), "{family}: {m}");
        }
    }

    /// `--quant_type w4a16 --target mindie` is the best measured 4-bit recipe (benches/ALGORITHMS.md):
    /// the scheme of `benches/recipes/w4a16-awq-g64.yaml` (AWQ, asymmetric int4) with the loaders'
    /// groups of 128 on every text linear; the vision tower stays data-free W8A16. vLLM-Ascend reads
    /// W4A16 for MoE experts only and builds zero offsets itself: its recipe keeps symmetric
    /// round-to-nearest experts and needs no calibration.
    #[test]
    fn w4a16_is_the_best_measured_4bit_recipe_where_it_loads() {
        let bench =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/recipes/w4a16-awq-g64.yaml"))
                .unwrap();
        let measured = Recipe::parse(&bench, "w4a16-awq-g64.yaml").unwrap();
        let mindie = Recipe::bundled("qwen3_vl_moe", "w4a16", "mindie").unwrap();
        assert_eq!(mindie.name, "mindie-w4a16");
        let kinds = |r: &Recipe| r.algorithm_steps().map(|s| s.kind.clone()).collect::<Vec<_>>();
        assert_eq!(kinds(&mindie), kinds(&measured));
        for m in [
            "model.language_model.layers.0.self_attn.q_proj",
            "model.language_model.layers.0.self_attn.o_proj",
            "model.language_model.layers.0.mlp.experts.3.down_proj",
            "model.layers.1.mlp.up_proj",
        ] {
            let mut want = measured.linear_spec(m).unwrap();
            assert_eq!(want.group_size, Some(64), "the bench recipe's groups");
            want.group_size = Some(128);
            let got = mindie.linear_spec(m).unwrap();
            assert_eq!(got, want, "{m}");
            assert!(!got.weight_symmetric && got.ascend_type() == "W4A16", "{m}");
        }
        let vision = mindie.linear_spec("model.visual.blocks.0.attn.qkv").unwrap();
        assert_eq!((vision.ascend_type(), vision.needs_calibration()), ("W8A16", false));
        assert!(mindie.linear_spec("lm_head").is_none());
        let vllm = Recipe::bundled("qwen3_vl_moe", "w4a16", "vllm-ascend").unwrap();
        let expert = vllm.linear_spec("model.language_model.layers.0.mlp.experts.3.down_proj").unwrap();
        assert_eq!(vllm.name, "default-w4a16");
        assert!(expert.weight_symmetric && !expert.needs_calibration(), "{expert:?}");
        assert!(vllm.algorithm_steps().next().is_none());
    }

    #[test]
    fn first_matching_step_wins_and_groups_flatten() {
        let y = r#"
apiversion: modelslim_v1
spec:
  process:
    - type: group
      configs:
        - type: linear_quant
          qconfig: {weight: {scope: per_channel, dtype: int8}, act: {scope: per_token, dtype: int8}}
          include: ["*experts*"]
        - type: linear_quant
          qconfig: {weight: {scope: per_channel, dtype: int8}}
          include: ["*"]
          exclude: ["*down_proj"]
  save:
    - type: ascendv1_saver
      part_file_size: 0.5
"#;
        let r = Recipe::parse(y, "t").unwrap();
        assert_eq!(r.linear_spec("a.mlp.experts.1.down_proj").unwrap().ascend_type(), "W8A8_DYNAMIC");
        assert_eq!(r.linear_spec("a.mlp.up_proj").unwrap().ascend_type(), "W8A16");
        assert!(r.linear_spec("a.mlp.down_proj").is_none());
        assert_eq!(r.part_file_size, Some(0.5));
    }
}
