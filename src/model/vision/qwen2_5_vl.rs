//! Qwen2.5-VL's vision tower: Qwen2-VL's with RMSNorm, a SwiGLU MLP, and window attention.
//!
//! Most blocks attend only inside windows of `window_size` pixels (`vit_merger_window_size`
//! merged patches a side); the blocks in `fullatt_block_indexes` attend over each whole frame.
//! To make windows contiguous, the patches are reordered once before the first block, a merge
//! group (2×2 patches) at a time, window after window: every block's input and output, as
//! transformers' block hooks see them, are in this window order. The merger works on merge
//! groups, so the order is undone only on its output (`reverse_indices = argsort(window_index)`).

use super::ops::Activation;
use super::patch_tower::PatchTower;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::nn::LinearHook;
use crate::model::weights::Weights;
use anyhow::{bail, Result};
use ndarray::{Array2, Axis};
use serde_json::Value;

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Config {
    /// What the 3D-patch towers share (`vision_config`'s depth, width, heads, patches, activation, rotary).
    pub tower: PatchTower,
    /// In pixels.
    pub window_size: usize,
    pub fullatt_block_indexes: Vec<usize>,
}

impl Config {
    pub fn from_json(config: &Value) -> Result<Config> {
        let v = vision_view(config).ok_or_else(|| anyhow::anyhow!("config.json has no vision_config"))?;
        Ok(Config {
            tower: PatchTower::from_view(&v, &["hidden_size", "embed_dim"], "silu")?,
            window_size: v.usize(&["window_size"])?,
            fullatt_block_indexes: v.usize_list(&["fullatt_block_indexes"])?.unwrap_or_default(),
        })
    }

    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        let hidden = self.tower.embed_patches(device, w, input)?;
        let grids = input.image_grid_thw.clone();
        let rotary = self.tower.rotary(&grids);

        let (window_index, window_spans) = self.window_index(&grids)?;
        let mu = self.tower.merge_unit();
        let order: Vec<usize> = window_index.iter().flat_map(|&g| g * mu..(g + 1) * mu).collect();
        let mut state = VisionState::new(hidden.select(Axis(0), &order), super::frame_spans(&grids), grids);
        state.rotary = Some(rotary.select(&order));
        state.window_spans = Some(window_spans);
        state.window_index = Some(window_index);
        Ok(state)
    }

    /// transformers' `get_window_index`: the merge groups in window order (frame by frame,
    /// windows row-major, groups row-major inside a window), and the window boundaries in patches.
    pub fn window_index(&self, grid_thw: &[[usize; 3]]) -> Result<(Vec<usize>, Vec<usize>)> {
        let m = self.tower.spatial_merge_size;
        let win = self.window_size / m / self.tower.patch_size;
        if win == 0 {
            bail!(
                "window_size {} is smaller than a merged patch ({} pixels)",
                self.window_size,
                m * self.tower.patch_size
            );
        }
        let mut index = Vec::new();
        let mut spans = vec![0];
        let mut offset = 0;
        for &[t, h, w] in grid_thw {
            let (gh, gw) = (h / m, w / m);
            for frame in 0..t {
                for wr in 0..gh.div_ceil(win) {
                    for wc in 0..gw.div_ceil(win) {
                        let before = index.len();
                        for r in wr * win..((wr + 1) * win).min(gh) {
                            for c in wc * win..((wc + 1) * win).min(gw) {
                                index.push(offset + frame * gh * gw + r * gw + c);
                            }
                        }
                        spans.push(spans.last().unwrap() + (index.len() - before) * self.tower.merge_unit());
                    }
                }
            }
            offset += t * gh * gw;
        }
        Ok((index, spans))
    }

    pub fn block(
        &self,
        device: &dyn Device,
        i: usize,
        w: &Weights,
        state: &mut VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<()> {
        let spans = match &state.window_spans {
            Some(windows) if !self.fullatt_block_indexes.contains(&i) => windows.clone(),
            _ => state.spans.clone(),
        };
        let h = super::rms_norm(w, "norm1", &state.hidden, NORM_EPS)?;
        let attn =
            super::fused_qkv_attention(device, w, &h, self.tower.num_heads, state.rotary.as_ref(), &spans, hook)?;
        super::residual(&mut state.hidden, attn);

        let h = super::rms_norm(w, "norm2", &state.hidden, NORM_EPS)?;
        let mut gate = super::linear(device, w, "mlp.gate_proj", &h, hook)?;
        let up = super::linear(device, w, "mlp.up_proj", &h, hook)?;
        self.tower.hidden_act.apply_all(&mut gate);
        gate *= &up;
        let m = super::linear(device, w, "mlp.down_proj", &gate, hook)?;
        super::residual(&mut state.hidden, m);
        Ok(())
    }

    /// `merger` (RMSNorm per patch, merge groups, `mlp.0`, GELU, `mlp.2`), then back to image order.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let x = super::rms_norm(w, "merger.ln_q", &state.hidden, NORM_EPS)?;
        let x = super::ops::group_rows(x, self.tower.merge_unit())?;
        let mut x = super::linear(device, w, "merger.mlp.0", &x, hook)?;
        Activation::Gelu.apply_all(&mut x);
        let merged = super::linear(device, w, "merger.mlp.2", &x, hook)?;
        let embeds = match &state.window_index {
            Some(index) => unwindow(&merged, index)?,
            None => merged,
        };
        Ok(VisionOutput { embeds, deepstack: Vec::new() })
    }
}

/// Row `index[k]` of the result is row `k` of `x`.
fn unwindow(x: &Array2<f32>, index: &[usize]) -> Result<Array2<f32>> {
    if index.len() != x.nrows() {
        bail!("the window index has {} merge groups, the merger gave {}", index.len(), x.nrows());
    }
    let mut out = Array2::zeros(x.dim());
    for (k, &g) in index.iter().enumerate() {
        out.row_mut(g).assign(&x.row(k));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(window_size: usize) -> Config {
        let tower = PatchTower {
            depth: 1,
            dim: 8,
            num_heads: 1,
            patch_size: 14,
            temporal_patch_size: 2,
            in_channels: 3,
            spatial_merge_size: 2,
            hidden_act: Activation::Silu,
            rope_theta: 1e4,
        };
        Config { tower, window_size, fullatt_block_indexes: vec![] }
    }

    #[test]
    fn window_index_by_hand() {
        // A 6×4 patch grid is 3×2 merge groups (numbered row-major 0..6); windows of 2×2 groups:
        // the first window holds rows 0-1 (groups 0,1,2,3), the second row 2 (groups 4,5).
        let (index, spans) = config(56).window_index(&[[1, 6, 4]]).unwrap();
        assert_eq!(index, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(spans, vec![0, 16, 24]);
        // 4×6 patches = 2×3 groups; windows: columns 0-1 (groups 0,1,3,4), column 2 (groups 2,5).
        // A second image follows with its own offset.
        let (index, spans) = config(56).window_index(&[[1, 4, 6], [1, 2, 2]]).unwrap();
        assert_eq!(index, vec![0, 1, 3, 4, 2, 5, 6]);
        assert_eq!(spans, vec![0, 16, 24, 28]);
        assert!(config(20).window_index(&[[1, 4, 4]]).is_err());
    }

    #[test]
    fn unwindow_inverts_the_order() {
        let x = Array2::from_shape_fn((3, 2), |(r, c)| (10 * r + c) as f32);
        let y = unwindow(&x, &[2, 0, 1]).unwrap();
        assert_eq!(y.row(2), x.row(0));
        assert_eq!(y.row(0), x.row(1));
    }

    #[test]
    fn parity_with_transformers() {
        super::super::parity::check_tower("qwen2_5_vl");
    }

    #[test]
    fn images_are_independent() {
        super::super::parity::check_images_are_independent("qwen2_5_vl", &[[1, 6, 10], [1, 4, 4], [2, 10, 6]]);
    }
}
