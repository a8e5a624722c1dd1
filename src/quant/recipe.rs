//! Recipes: YAML files in the shape of msModelSlim's v1 pipelines (`apiversion`, `spec.process`
//! steps with `include` / `exclude` globs, `spec.save` with `part_file_size`).
//!
//! The bundled best practices live in `pipelines/` and are compiled into the binary, so the tool
//! works from any folder; `--config_path` reads a user's file instead.

use super::glob::glob_match;
use super::spec::{QConfig, QuantSpec};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::Path;

/// The bundled recipes: (file name, text).
pub const BUNDLED: &[(&str, &str)] = &[
    ("default-w8a16.yaml", include_str!("../../pipelines/default-w8a16.yaml")),
    ("default-w8a8_dynamic.yaml", include_str!("../../pipelines/default-w8a8_dynamic.yaml")),
    ("default-w4a8_dynamic.yaml", include_str!("../../pipelines/default-w4a8_dynamic.yaml")),
    ("default-w4a16.yaml", include_str!("../../pipelines/default-w4a16.yaml")),
];

/// One step of `spec.process`.
#[derive(Debug, Clone)]
pub struct Step {
    /// `linear_quant`, or an algorithm step (`iter_smooth`, `smooth_quant`, `gptq`, …).
    pub kind: String,
    pub include: Vec<String>,
    pub exclude: Vec<String>,
    /// For `linear_quant`.
    pub spec: Option<QuantSpec>,
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
        })
    }

    pub fn from_file(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read recipe {}", path.display()))?;
        Recipe::parse(&text, &path.display().to_string())
    }

    /// The bundled best practice for a model type and quant type: a recipe naming the model
    /// type, else the default recipe of the quant type.
    pub fn bundled(model_type: &str, quant_type: &str) -> Result<Recipe> {
        let mut fallback = None;
        for (file, text) in BUNDLED {
            let r = Recipe::parse(text, file)?;
            if r.quant_type.as_deref() != Some(quant_type) {
                continue;
            }
            if r.model_types.iter().any(|m| m == model_type) {
                return Ok(r);
            }
            if r.model_types.is_empty() {
                fallback = Some(r);
            }
        }
        let known: Vec<_> = BUNDLED
            .iter()
            .filter_map(|(f, t)| Recipe::parse(t, f).ok()?.quant_type)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        fallback
            .with_context(|| format!("no bundled recipe for --quant_type {quant_type} (known: {})", known.join(", ")))
    }

    /// How a linear is quantized: the first `linear_quant` step that matches it, if any.
    pub fn linear_spec(&self, module: &str) -> Option<QuantSpec> {
        self.steps.iter().filter(|s| s.kind == "linear_quant").find(|s| s.matches(module)).and_then(|s| s.spec)
    }

    /// The algorithm steps (everything but `linear_quant`).
    pub fn algorithm_steps(&self) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(|s| s.kind != "linear_quant")
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
    let mut params = map.clone();
    for k in ["type", "include", "exclude", "qconfig"] {
        params.remove(k);
    }
    out.push(Step { kind, include: globs("include")?, exclude: globs("exclude")?, spec, params });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_recipes_parse_and_keep_the_defaults_float() {
        for (f, t) in BUNDLED {
            Recipe::parse(t, f).unwrap();
        }
        let r = Recipe::bundled("qwen3_vl_moe", "w8a8_dynamic").unwrap();
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
        assert!(Recipe::bundled("llama", "w9a9").unwrap_err().to_string().contains("w8a16"));
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
