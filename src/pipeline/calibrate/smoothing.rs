//! Which outlier-suppression subgraphs a recipe applies to a decoder layer, decided the same way
//! at plan time (to know which tensors appear, such as a norm's new bias) and at run time.

use crate::model::decoder::{LayerGraph, LinearPath};
use crate::quant::smooth::SmoothConfig;
use crate::quant::{ActQuant, Recipe};
use anyhow::{bail, Result};

/// The smoothing step of a recipe.
#[derive(Debug, Clone)]
pub struct Smoothing {
    pub cfg: SmoothConfig,
    pub norm_linear: bool,
    pub ov: bool,
    pub up_down: bool,
    step: crate::quant::recipe::Step,
}

/// Algorithm step types lamina runs. (`linear_quant` carries the scheme itself, GPTQ and the
/// activation range method are `qconfig` settings.)
const SMOOTHING_STEPS: [&str; 3] = ["smooth_quant", "iter_smooth", "m2"];

impl Smoothing {
    /// The recipe's smoothing step, if any; unknown algorithm steps are refused.
    pub fn from_recipe(recipe: &Recipe) -> Result<Option<Smoothing>> {
        let mut found = None;
        for step in recipe.algorithm_steps() {
            if !SMOOTHING_STEPS.contains(&step.kind.as_str()) {
                bail!(
                    "recipe {}: step type {:?} is not supported (lamina runs linear_quant and the smoothing steps {})",
                    recipe.name,
                    step.kind,
                    SMOOTHING_STEPS.join(", ")
                );
            }
            if found.is_some() {
                bail!("recipe {}: only one smoothing step is supported", recipe.name);
            }
            let p = &step.params;
            let num = |k: &str| p.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
            let mut cfg = match step.kind.as_str() {
                "smooth_quant" => SmoothConfig::smooth_quant(num("alpha").unwrap_or(0.5)),
                "iter_smooth" => {
                    let symmetric = p.get("symmetric").and_then(|v| v.as_bool()).unwrap_or(true);
                    let mut c = SmoothConfig::iter_smooth(symmetric);
                    c.alpha = num("alpha").unwrap_or(c.alpha);
                    c
                }
                _ => SmoothConfig::m2(num("alpha").unwrap_or(0.5)),
            };
            cfg.scale_min = num("scale_min").unwrap_or(cfg.scale_min);
            if !(cfg.alpha > 0.0 && cfg.alpha <= 1.0) {
                bail!("recipe {}: {} alpha must be in (0, 1], not {}", recipe.name, step.kind, cfg.alpha);
            }
            let kinds: Vec<String> = match p.get("enable_subgraph_type") {
                Some(v) => serde_yaml::from_value(v.clone())?,
                None => vec!["norm-linear".into(), "ov".into(), "up-down".into()],
            };
            for k in &kinds {
                if !matches!(k.as_str(), "norm-linear" | "ov" | "up-down" | "linear-linear") {
                    bail!(
                        "recipe {}: subgraph type {k:?} is not supported (norm-linear, ov, up-down, linear-linear)",
                        recipe.name
                    );
                }
            }
            let has = |k: &str| kinds.iter().any(|x| x == k);
            found = Some(Smoothing {
                cfg,
                norm_linear: has("norm-linear"),
                ov: has("ov"),
                // msModelSlim's linear-linear on these models is the up → down pair.
                up_down: has("up-down") || has("linear-linear"),
                step: step.clone(),
            });
        }
        Ok(found)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    /// A norm feeding `consumers`.
    NormLinear { norm: String },
    /// `producer` (v_proj) feeding `consumers[0]` (o_proj) through attention.
    Ov { producer: String },
    /// `producer` (up_proj) feeding `consumers[0]` (down_proj) through the SwiGLU product.
    UpDown { producer: String },
}

/// One subgraph of one layer, names relative to the layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Subgraph {
    pub kind: Kind,
    pub consumers: Vec<String>,
    /// Whether the norm-linear map subtracts a shift.
    pub shift: bool,
}

/// The subgraphs `smoothing` applies to a decoder layer whose linears connect as `graph` says
/// (names relative to the layer). `full` turns a relative name into the tensor's full module name
/// (for the recipe's globs), `has_bias` tells whether a linear had a bias in the checkpoint.
pub fn layer_subgraphs(
    s: &Smoothing,
    graph: &LayerGraph,
    recipe: &Recipe,
    full: &dyn Fn(&str) -> String,
    has_bias: &dyn Fn(&str) -> bool,
) -> Vec<Subgraph> {
    let mut out = Vec::new();
    let selected = |consumers: &[String]| consumers.iter().any(|c| s.step.matches(&full(c)));
    // A shift adds `W·z` to every consumer's bias: fine where that bias folds into a static
    // scheme's quant_bias or the linear has a bias anyway; elsewhere (dynamic, float routers) a
    // new bias tensor would not load, so those subgraphs are only scaled.
    let shift_ok = |consumers: &[String]| {
        consumers.iter().all(|c| {
            has_bias(c)
                || matches!(recipe.linear_spec(&full(c)).map(|sp| sp.act), Some(ActQuant::PerTensorStatic { .. }))
        })
    };
    if s.norm_linear {
        for nl in &graph.norm_linears {
            if selected(&nl.consumers) {
                let shift = s.cfg.shift && shift_ok(&nl.consumers);
                let kind = Kind::NormLinear { norm: nl.norm.clone() };
                out.push(Subgraph { kind, consumers: nl.consumers.clone(), shift });
            }
        }
    }
    // v → o subgraphs first, then up → down, each in the graph's order.
    for path in [LinearPath::ValueOutput, LinearPath::GatedProduct] {
        let wanted = match path {
            LinearPath::ValueOutput => s.ov,
            LinearPath::GatedProduct => s.up_down,
            LinearPath::LatentValueOutput => false,
        };
        for (producer, consumer, _) in graph.linear_linears.iter().filter(|(_, _, p)| *p == path && wanted) {
            let c = vec![consumer.clone()];
            if selected(&c) {
                let kind = match path {
                    LinearPath::ValueOutput => Kind::Ov { producer: producer.clone() },
                    _ => Kind::UpDown { producer: producer.clone() },
                };
                out.push(Subgraph { kind, consumers: c, shift: false });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::TextConfig;
    use crate::model::decoder::standard::Layer;

    #[test]
    fn shifts_only_where_the_bias_can_go() {
        let y = |act: &str| {
            format!(
                "apiversion: modelslim_v1\nspec:\n  process:\n    - type: m2\n      alpha: 0.5\n    - type: linear_quant\n      qconfig:\n        act: {{scope: {act}, dtype: int8}}\n        weight: {{scope: per_channel, dtype: int8}}\n      include: ['*']\n      exclude: ['*mlp.gate']\n"
            )
        };
        let cfg = TextConfig::from_json(&serde_json::json!({"hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "vocab_size": 10}))
        .unwrap();
        let full = |r: &str| format!("model.layers.0.{r}");
        for (act, shift) in [("per_tensor", true), ("per_token", false)] {
            let r = Recipe::parse(&y(act), "t").unwrap();
            let s = Smoothing::from_recipe(&r).unwrap().unwrap();
            let names = crate::model::layout::DecoderNames::STANDARD;
            let g = layer_subgraphs(&s, &Layer::graph(&cfg, &names, 0), &r, &full, &|_| false);
            assert_eq!(g.len(), 4);
            assert!(g.iter().filter(|x| matches!(x.kind, Kind::NormLinear { .. })).all(|x| x.shift == shift));
        }
        let bad = Recipe::parse(
            "apiversion: modelslim_v1\nspec:\n  process:\n    - type: quarot\n    - type: linear_quant\n      qconfig: {weight: {scope: per_channel, dtype: int8}}\n",
            "t",
        )
        .unwrap();
        assert!(Smoothing::from_recipe(&bad).unwrap_err().to_string().contains("quarot"));
    }
}
