//! Qwen2-VL's vision tower: a 3D-convolution patch embedding, blocks with LayerNorm, fused-qkv
//! attention under a 2D rotary embedding (each frame attends to itself) and a quick-GELU MLP,
//! then a merger that concatenates each 2×2 group of patches into one token for the language
//! model.

use super::ops::Activation;
use super::patch_tower::PatchTower;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::nn::LinearHook;
use crate::model::weights::Weights;
use anyhow::Result;
use serde_json::Value;

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Config {
    /// What the 3D-patch towers share (`vision_config`'s depth, width, heads, patches, activation, rotary).
    pub tower: PatchTower,
}

impl Config {
    pub fn from_json(config: &Value) -> Result<Config> {
        let v = vision_view(config).ok_or_else(|| anyhow::anyhow!("config.json has no vision_config"))?;
        Ok(Config { tower: PatchTower::from_view(&v, &["embed_dim"], "quick_gelu")? })
    }

    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        let hidden = self.tower.embed_patches(device, w, input)?;
        let grids = input.image_grid_thw.clone();
        let rotary = self.tower.rotary(&grids);
        let mut state = VisionState::new(hidden, super::frame_spans(&grids), grids);
        state.rotary = Some(rotary);
        Ok(state)
    }

    pub fn block(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: &mut VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<()> {
        let h = super::layer_norm(w, "norm1", &state.hidden, NORM_EPS)?;
        let attn =
            super::fused_qkv_attention(device, w, &h, self.tower.num_heads, state.rotary.as_ref(), &state.spans, hook)?;
        super::residual(&mut state.hidden, attn);

        let h = super::layer_norm(w, "norm2", &state.hidden, NORM_EPS)?;
        let mut m = super::linear(device, w, "mlp.fc1", &h, hook)?;
        self.tower.hidden_act.apply_all(&mut m);
        let m = super::linear(device, w, "mlp.fc2", &m, hook)?;
        super::residual(&mut state.hidden, m);
        Ok(())
    }

    /// `merger`: LayerNorm per patch, concatenate each merge group, `mlp.0`, GELU, `mlp.2`.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let x = super::layer_norm(w, "merger.ln_q", &state.hidden, NORM_EPS)?;
        let x = super::ops::group_rows(x, self.tower.merge_unit())?;
        let mut x = super::linear(device, w, "merger.mlp.0", &x, hook)?;
        Activation::Gelu.apply_all(&mut x);
        let embeds = super::linear(device, w, "merger.mlp.2", &x, hook)?;
        Ok(VisionOutput { embeds, deepstack: Vec::new() })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn parity_with_transformers() {
        super::super::parity::check_tower("qwen2_vl");
    }

    #[test]
    fn images_are_independent() {
        super::super::parity::check_images_are_independent("qwen2_vl", &[[1, 4, 6], [2, 6, 4]]);
    }
}
