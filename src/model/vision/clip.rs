//! LLaVA's vision side: a CLIP ViT (patch convolution, class token, learned position embeddings,
//! `pre_layrnorm`, pre-norm encoder layers with quick-GELU MLPs), whose hidden states at
//! `vision_feature_layer` (for example -2: the input of the last layer) are the image features;
//! `vision_feature_select_strategy` "default" drops the class token. The
//! `multi_modal_projector` (`linear_1`, GELU, `linear_2`) maps them to the language model's width.

use super::ops::Activation;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::layout::Layout;
use crate::model::nn::LinearHook;
use crate::model::weights::Weights;
use anyhow::{bail, Context, Result};
use ndarray::{concatenate, s, Array2, Axis};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Config {
    pub depth: usize,
    pub dim: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
    /// Hidden-state indices (0 = embeddings, `i + 1` = layer `i`'s output), negatives resolved.
    pub feature_layers: Vec<usize>,
    /// `default` drops the class token, `full` keeps it.
    pub drop_class_token: bool,
    pub projector_act: Activation,
    /// The projector's module name (`multi_modal_projector`).
    pub projector: String,
}

impl Config {
    pub fn from_json(config: &Value, layout: &Layout) -> Result<Config> {
        let v = vision_view(config).context("config.json has no vision_config")?;
        let depth = v.usize(&["num_hidden_layers"])?;
        let layers: Vec<i64> = match config.get("vision_feature_layer") {
            None => vec![-2],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_i64().context("vision_feature_layer holds a non-integer"))
                .collect::<Result<_>>()?,
            Some(x) => vec![x.as_i64().with_context(|| format!("vision_feature_layer is {x}, not an integer"))?],
        };
        // transformers indexes the tuple of depth + 1 hidden states, negatives from its end.
        let count = depth as i64 + 1;
        let feature_layers = layers
            .iter()
            .map(|&l| {
                let i = if l < 0 { l + count } else { l };
                if !(0..count).contains(&i) {
                    bail!("vision_feature_layer {l} is outside the {count} hidden states of a {depth}-layer tower");
                }
                Ok(i as usize)
            })
            .collect::<Result<Vec<_>>>()?;
        let drop_class_token = match config.get("vision_feature_select_strategy").and_then(|s| s.as_str()) {
            None | Some("default") => true,
            Some("full") => false,
            Some(other) => bail!("vision_feature_select_strategy {other:?} is not supported (default, full are)"),
        };
        let dim = v.usize(&["hidden_size"])?;
        Ok(Config {
            depth,
            dim,
            num_heads: v.usize(&["num_attention_heads"])?,
            patch_size: v.usize(&["patch_size"])?,
            layer_norm_eps: v.f64(&["layer_norm_eps"])?.unwrap_or(1e-5),
            hidden_act: Activation::from_name(v.str(&["hidden_act"]).unwrap_or("quick_gelu"))?,
            feature_layers,
            drop_class_token,
            projector_act: Activation::from_name(
                config.get("projector_hidden_act").and_then(|s| s.as_str()).unwrap_or("gelu"),
            )?,
            projector: layout.projector.clone().context("the LLaVA layout has no multi_modal_projector")?,
        })
    }

    /// Class token and patches, plus position embeddings, then `pre_layrnorm`.
    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        let p = self.patch_size;
        let super::ImagePatches { patches, images, grid: (gh, gw) } = super::image_patches(input, p)?;
        let conv = super::conv_as_linear(w, "embeddings.patch_embedding")?;
        if conv.in_features() != patches.ncols() {
            bail!(
                "the patch convolution takes {} features, a {p}×{p} patch of the images gives {}",
                conv.in_features(),
                patches.ncols()
            );
        }
        let positions = w.matrix("embeddings.position_embedding.weight")?;
        let seq = gh * gw + 1;
        if positions.nrows() != seq {
            bail!(
                "an image of {gh}×{gw} patches makes {seq} tokens, the position embedding holds {} (image_size must match)",
                positions.nrows()
            );
        }
        let patch_embeds = conv.forward(device, patches.view());
        let class = w.vector("embeddings.class_embedding")?;
        let mut hidden = Array2::<f32>::zeros((images * seq, self.dim));
        for b in 0..images {
            let mut rows = hidden.slice_mut(s![b * seq..(b + 1) * seq, ..]);
            rows.row_mut(0).assign(&class);
            rows.slice_mut(s![1.., ..]).assign(&patch_embeds.slice(s![b * gh * gw..(b + 1) * gh * gw, ..]));
            rows += &positions;
        }
        let hidden = super::layer_norm(w, "pre_layrnorm", &hidden, self.layer_norm_eps)?;
        let spans = (0..=images).map(|b| b * seq).collect();
        let mut state = VisionState::new(hidden, spans, Vec::new());
        if self.feature_layers.contains(&0) {
            state.kept.push((0, state.hidden.clone()));
        }
        Ok(state)
    }

    pub fn block(
        &self,
        device: &dyn Device,
        i: usize,
        w: &Weights,
        state: &mut VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<()> {
        let h = super::layer_norm(w, "layer_norm1", &state.hidden, self.layer_norm_eps)?;
        let q = super::linear(device, w, "self_attn.q_proj", &h, hook)?;
        let k = super::linear(device, w, "self_attn.k_proj", &h, hook)?;
        let v = super::linear(device, w, "self_attn.v_proj", &h, hook)?;
        let o = super::ops::span_attention(device, q.view(), k.view(), v.view(), self.num_heads, None, &state.spans);
        let o = super::linear(device, w, "self_attn.out_proj", &o, hook)?;
        super::residual(&mut state.hidden, o);

        let h = super::layer_norm(w, "layer_norm2", &state.hidden, self.layer_norm_eps)?;
        let mut m = super::linear(device, w, "mlp.fc1", &h, hook)?;
        self.hidden_act.apply_all(&mut m);
        let m = super::linear(device, w, "mlp.fc2", &m, hook)?;
        super::residual(&mut state.hidden, m);

        if self.feature_layers.contains(&(i + 1)) {
            state.kept.push((i + 1, state.hidden.clone()));
        }
        Ok(())
    }

    /// The selected hidden states (without class tokens), side by side, through the projector.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let seq = state.spans.get(1).copied().unwrap_or(0);
        let images = state.spans.len().saturating_sub(1);
        let skip = usize::from(self.drop_class_token);
        let rows: Vec<usize> = (0..images).flat_map(|b| b * seq + skip..(b + 1) * seq).collect();
        let mut parts = Vec::with_capacity(self.feature_layers.len());
        for &l in &self.feature_layers {
            parts.push(state.kept(l)?.select(Axis(0), &rows));
        }
        let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
        let features = concatenate(Axis(1), &views)?;

        let name = |n: &str| {
            let full = format!("{}.{n}", self.projector);
            full.strip_prefix(&w.prefix).map(str::to_string).unwrap_or(full)
        };
        let mut x = super::linear(device, w, &name("linear_1"), &features, hook)?;
        self.projector_act.apply_all(&mut x);
        let embeds = super::linear(device, w, &name("linear_2"), &x, hook)?;
        Ok(VisionOutput { embeds, deepstack: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn feature_layers_resolve_like_python_indices() {
        let layout =
            Layout::resolve(crate::model::layout::Family::Llava, crate::model::layout::Family::Llava, &[]).unwrap();
        let mut c = json!({"vision_config": {"num_hidden_layers": 3, "hidden_size": 8, "num_attention_heads": 2,
            "patch_size": 4}, "vision_feature_layer": -2});
        assert_eq!(Config::from_json(&c, &layout).unwrap().feature_layers, vec![2]);
        c["vision_feature_layer"] = json!([-1, 0]);
        assert_eq!(Config::from_json(&c, &layout).unwrap().feature_layers, vec![3, 0]);
        c["vision_feature_layer"] = json!(-5);
        assert!(Config::from_json(&c, &layout).is_err());
        c["vision_feature_layer"] = json!(1);
        c["vision_feature_select_strategy"] = json!("crop");
        assert!(Config::from_json(&c, &layout).is_err());
    }

    #[test]
    fn parity_with_transformers() {
        super::super::parity::check_tower("llava");
    }

    #[test]
    fn images_are_independent() {
        // CLIP images all have the tower's size: the grids only count them.
        super::super::parity::check_images_are_independent("llava", &[[0; 3]; 2]);
    }
}
