//! Which outlier-suppression subgraphs a recipe applies to a decoder layer, decided the same way
//! at plan time (to know which tensors appear, such as a norm's new bias) and at run time.

use super::quarot::QuaRotStep;
use crate::model::decoder::{LayerGraph, LinearPath};
use crate::quant::awq::AwqConfig;
use crate::quant::smooth::SmoothConfig;
use crate::quant::{ActQuant, Recipe};
use anyhow::{bail, Context, Result};

/// The algorithm steps of a recipe, in the order lamina runs them on every unit: QuaRot's
/// rotation (folded before anything is observed), then one scaling step (SmoothQuant, m2,
/// iter_smooth or AWQ), then the rounding each `linear_quant` qconfig asks for.
#[derive(Debug, Clone, Default)]
pub struct Algorithms {
    pub quarot: Option<QuaRotStep>,
    pub smoothing: Option<Smoothing>,
}

/// Algorithm step types lamina runs. (`linear_quant` carries the scheme itself; GPTQ and the
/// activation range method are `qconfig` settings.)
pub const ALGORITHM_STEPS: [&str; 5] = ["quarot", "smooth_quant", "iter_smooth", "m2", "awq"];

impl Algorithms {
    /// The recipe's algorithm steps; unknown steps, two scaling steps, or a rotation after a
    /// scaling step are refused.
    pub fn from_recipe(recipe: &Recipe) -> Result<Algorithms> {
        let mut found = Algorithms::default();
        for step in recipe.algorithm_steps() {
            if !ALGORITHM_STEPS.contains(&step.kind.as_str()) {
                bail!(
                    "recipe {}: step type {:?} is not supported (lamina runs linear_quant and the steps {})",
                    recipe.name,
                    step.kind,
                    ALGORITHM_STEPS.join(", ")
                );
            }
            if step.kind == "quarot" {
                if found.quarot.is_some() {
                    bail!("recipe {}: only one quarot step is supported", recipe.name);
                }
                if found.smoothing.is_some() {
                    bail!(
                        "recipe {}: quarot must come before the smoothing step (it rotates what smoothing measures)",
                        recipe.name
                    );
                }
                found.quarot = Some(QuaRotStep::from_step(step).with_context(|| format!("recipe {}", recipe.name))?);
                continue;
            }
            if found.smoothing.is_some() {
                bail!(
                    "recipe {}: only one smoothing step (smooth_quant, iter_smooth, m2 or awq) is supported",
                    recipe.name
                );
            }
            found.smoothing = Some(Smoothing::from_step(&recipe.name, step)?);
        }
        Ok(found)
    }

    /// Whether any step needs data to flow through the model.
    pub fn any(&self) -> bool {
        self.quarot.is_some() || self.smoothing.is_some()
    }
}

/// The smoothing (or AWQ) step of a recipe.
#[derive(Debug, Clone)]
pub struct Smoothing {
    pub cfg: SmoothConfig,
    /// Set for an `awq` step: the scales come from AWQ's search instead of SmoothQuant's formula.
    pub awq: Option<AwqStep>,
    pub norm_linear: bool,
    pub ov: bool,
    pub up_down: bool,
    step: crate::quant::recipe::Step,
}

/// An `awq` step's settings (AutoAWQ's defaults): `n_grid`, `duo_scaling`, `clip` (the clip
/// search, default on), `max_shrink`, `clip_exclude` (globs of linears whose clip is not searched:
/// AutoAWQ skips query and key projections, "due to qk bmm, it is hard to clip precisely").
#[derive(Debug, Clone)]
pub struct AwqStep {
    pub cfg: AwqConfig,
    pub clip: bool,
    pub clip_exclude: Vec<String>,
}

impl AwqStep {
    /// The query and key projections of the families lamina reads, which AutoAWQ does not clip.
    pub const DEFAULT_CLIP_EXCLUDE: [&'static str; 6] =
        ["*q_proj", "*k_proj", "*q_a_proj", "*q_b_proj", "*kv_a_proj_with_mqa", "*qkv*"];

    pub fn clips(&self, module: &str) -> bool {
        self.clip && !self.clip_exclude.iter().any(|p| crate::quant::glob::glob_match(p, module))
    }
}

impl Smoothing {
    fn from_step(recipe: &str, step: &crate::quant::recipe::Step) -> Result<Smoothing> {
        let p = &step.params;
        let num = |k: &str| p.get(k).and_then(|v| v.as_f64()).map(|v| v as f32);
        let mut awq = None;
        let mut cfg = match step.kind.as_str() {
            "smooth_quant" => SmoothConfig::smooth_quant(num("alpha").unwrap_or(0.5)),
            "iter_smooth" => {
                let symmetric = p.get("symmetric").and_then(|v| v.as_bool()).unwrap_or(true);
                let mut c = SmoothConfig::iter_smooth(symmetric);
                c.alpha = num("alpha").unwrap_or(c.alpha);
                c
            }
            "awq" => {
                let d = AwqConfig::default();
                let cfg = AwqConfig {
                    grid: p.get("n_grid").and_then(|v| v.as_u64()).map_or(d.grid, |v| v as usize),
                    duo_scaling: p.get("duo_scaling").and_then(|v| v.as_bool()).unwrap_or(d.duo_scaling),
                    clip_grid: d.clip_grid,
                    max_shrink: num("max_shrink").unwrap_or(d.max_shrink),
                };
                if cfg.grid == 0 || !(0.0..1.0).contains(&cfg.max_shrink) {
                    bail!("recipe {recipe}: awq needs n_grid > 0 and max_shrink in [0, 1)");
                }
                let clip_exclude: Vec<String> = match p.get("clip_exclude") {
                    Some(v) => {
                        serde_yaml::from_value(v.clone()).context("`clip_exclude` must be a list of patterns")?
                    }
                    None => AwqStep::DEFAULT_CLIP_EXCLUDE.iter().map(|s| s.to_string()).collect(),
                };
                let clip = p.get("clip").and_then(|v| v.as_bool()).unwrap_or(true);
                awq = Some(AwqStep { cfg, clip, clip_exclude });
                // The scales come from the search; nothing is shifted.
                SmoothConfig::smooth_quant(0.5)
            }
            _ => SmoothConfig::m2(num("alpha").unwrap_or(0.5)),
        };
        cfg.scale_min = num("scale_min").unwrap_or(cfg.scale_min);
        if !(cfg.alpha > 0.0 && cfg.alpha <= 1.0) {
            bail!("recipe {recipe}: {} alpha must be in (0, 1], not {}", step.kind, cfg.alpha);
        }
        let kinds: Vec<String> = match p.get("enable_subgraph_type") {
            Some(v) => serde_yaml::from_value(v.clone())?,
            None => vec!["norm-linear".into(), "ov".into(), "up-down".into()],
        };
        for k in &kinds {
            if !matches!(k.as_str(), "norm-linear" | "ov" | "up-down" | "linear-linear") {
                bail!(
                    "recipe {recipe}: subgraph type {k:?} is not supported (norm-linear, ov, up-down, linear-linear)"
                );
            }
        }
        let has = |k: &str| kinds.iter().any(|x| x == k);
        Ok(Smoothing {
            cfg,
            awq,
            norm_linear: has("norm-linear"),
            ov: has("ov"),
            // msModelSlim's `linear-linear` is a linear feeding another with nothing between
            // (`LinearLinearSubgraph`: `y = linear2(linear1(x))`); its model adapters declare one
            // only for DeepSeek-V4's `attn.wo_a → attn.wo_b`, a family lamina does not open, so
            // here it selects nothing. up → down through the gated product is `up-down`.
            up_down: has("up-down"),
            step: step.clone(),
        })
    }

    /// The recipe's smoothing step, if any (see [`Algorithms::from_recipe`]).
    pub fn from_recipe(recipe: &Recipe) -> Result<Option<Smoothing>> {
        Ok(Algorithms::from_recipe(recipe)?.smoothing)
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
        // `linear-linear` is not up → down (msModelSlim's adapters use it for DeepSeek-V4's
        // wo_a → wo_b only); the step's exclude keeps subgraphs out as msModelSlim's
        // qwen3_vl_moe adapter does for its MoE layers (attention subgraphs only).
        let kinds = |sub: &str, exclude: &str| {
            let r = Recipe::parse(
                &format!("apiversion: modelslim_v1\nspec:\n  process:\n    - type: iter_smooth\n      enable_subgraph_type: [{sub}]\n{exclude}    - type: linear_quant\n      qconfig:\n        act: {{scope: per_tensor, dtype: int8}}\n        weight: {{scope: per_channel, dtype: int8}}\n"),
                "t",
            )
            .unwrap();
            let s = Smoothing::from_recipe(&r).unwrap().unwrap();
            let names = crate::model::layout::DecoderNames::STANDARD;
            let g = layer_subgraphs(&s, &Layer::graph(&cfg, &names, 0), &r, &full, &|_| false);
            g.into_iter()
                .map(|x| match x.kind {
                    Kind::NormLinear { norm } => norm,
                    Kind::Ov { .. } => "ov".to_string(),
                    Kind::UpDown { .. } => "up-down".to_string(),
                })
                .collect::<Vec<_>>()
        };
        assert!(kinds("linear-linear", "").is_empty());
        assert_eq!(kinds("linear-linear, up-down", ""), ["up-down"]);
        assert_eq!(
            kinds("norm-linear, linear-linear, ov, up-down", "      exclude: ['*mlp.*']\n"),
            ["input_layernorm", "ov"]
        );
        let recipe = |steps: &str| {
            Recipe::parse(
                &format!("apiversion: modelslim_v1\nspec:\n  process:\n{steps}    - type: linear_quant\n      qconfig: {{weight: {{scope: per_channel, dtype: int8}}}}\n"),
                "t",
            )
            .unwrap()
        };
        let err = |steps: &str| format!("{:#}", Algorithms::from_recipe(&recipe(steps)).unwrap_err());
        assert!(err("    - type: flex_smooth\n").contains("flex_smooth"));
        assert!(err("    - type: m2\n    - type: quarot\n").contains("before"));
        assert!(err("    - type: m2\n    - type: awq\n").contains("only one"));
        assert!(err("    - type: quarot\n      online: true\n").contains("online"));
        let a =
            Algorithms::from_recipe(&recipe("    - type: quarot\n      block_size: 32\n    - type: awq\n")).unwrap();
        assert_eq!(a.quarot.unwrap().block_size, Some(32));
        let awq = a.smoothing.unwrap().awq.unwrap();
        assert!(awq.clips("model.layers.0.mlp.down_proj") && !awq.clips("model.layers.0.self_attn.k_proj"));
    }
}
