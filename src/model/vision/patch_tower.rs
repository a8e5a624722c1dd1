//! What the 3D-patch towers read alike: Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4.1V keep the same
//! `vision_config` fields (depth, width, heads, patch and merge sizes, activation, rotary base), embed
//! `pixel_values` `[patches, C·T·P·P]` through a 3D convolution (`patch_embed.proj`, computed as a
//! linear), and turn a 2D rotary embedding over each frame's patch grid. Each family's file keeps
//! only what differs (windows, position tables, deepstack, norms).

use super::ops::{Activation, Rotary};
use super::VisionInput;
use crate::device::Device;
use crate::model::config::ConfigView;
use crate::model::weights::Weights;
use anyhow::{bail, ensure, Result};
use ndarray::Array2;

#[derive(Debug, Clone)]
pub struct PatchTower {
    pub depth: usize,
    /// The blocks' width.
    pub dim: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub in_channels: usize,
    pub spatial_merge_size: usize,
    pub hidden_act: Activation,
    pub rope_theta: f64,
}

impl PatchTower {
    /// Reads `vision_config`. `dim_keys` name the blocks' width, which the families keep under
    /// different keys (Qwen2-VL's `hidden_size` is its merger's output, so it reads `embed_dim`
    /// only); `default_act` is the family's activation when `hidden_act` is absent.
    pub fn from_view(v: &ConfigView, dim_keys: &[&str], default_act: &str) -> Result<PatchTower> {
        let t = PatchTower {
            depth: v.usize(&["depth", "num_hidden_layers"])?,
            dim: v.usize(dim_keys)?,
            num_heads: v.usize(&["num_heads", "num_attention_heads"])?,
            patch_size: v.usize(&["patch_size", "spatial_patch_size"])?,
            temporal_patch_size: v.opt_usize(&["temporal_patch_size"])?.unwrap_or(2),
            in_channels: v.opt_usize(&["in_channels", "in_chans"])?.unwrap_or(3),
            spatial_merge_size: v.opt_usize(&["spatial_merge_size"])?.unwrap_or(2),
            hidden_act: Activation::from_name(v.str(&["hidden_act"]).unwrap_or(default_act))?,
            rope_theta: vision_rope_theta(v)?,
        };
        ensure!(
            t.patch_size > 0 && t.temporal_patch_size > 0 && t.spatial_merge_size > 0,
            "vision_config: patch_size, temporal_patch_size and spatial_merge_size must be positive"
        );
        ensure!(
            t.num_heads > 0 && t.dim % t.num_heads == 0 && (t.dim / t.num_heads) % 4 == 0,
            "vision_config: width {} over {} heads does not give a head width divisible by 4 (the 2D rotary needs one)",
            t.dim,
            t.num_heads
        );
        Ok(t)
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// Patches merged into one language-model token.
    pub fn merge_unit(&self) -> usize {
        self.spatial_merge_size * self.spatial_merge_size
    }

    /// Features of one flattened patch, `C·T·P·P`.
    pub fn patch_features(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// `pixel_values` checked against `image_grid_thw` and the merge size, through
    /// `patch_embed.proj`: `[patches, dim]`, one row per patch in the processor's order.
    pub fn embed_patches(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<Array2<f32>> {
        let features = self.patch_features();
        let patches = super::qwen_patches(input, features)?;
        super::check_grids(&input.image_grid_thw, self.spatial_merge_size)?;
        let conv = super::conv_as_linear(w, "patch_embed.proj")?;
        ensure!(
            conv.in_features() == features,
            "patch_embed.proj takes {} features, a {}×{}×{}×{} patch has {features}",
            conv.in_features(),
            self.in_channels,
            self.temporal_patch_size,
            self.patch_size,
            self.patch_size
        );
        Ok(conv.forward(device, patches.view()))
    }

    /// The 2D rotary embedding over the patch grids (rows and columns in merge-window order).
    pub fn rotary(&self, grid_thw: &[[usize; 3]]) -> Rotary {
        Rotary::vision_2d(grid_thw, self.spatial_merge_size, self.head_dim(), self.rope_theta)
    }
}

/// The vision `rope_theta` (`rope_parameters` / `rope_scaling` of `vision_config`), 10000 if absent.
fn vision_rope_theta(v: &ConfigView) -> Result<f64> {
    let theta = match v.sub(&["rope_parameters", "rope_scaling"]) {
        Some(s) => s.f64(&["rope_theta"])?,
        None => None,
    }
    .or(v.f64(&["rope_theta"])?)
    .unwrap_or(10000.0);
    if !(theta.is_finite() && theta > 0.0) {
        bail!("vision_config: rope_theta {theta} is not a positive number");
    }
    Ok(theta)
}
