//! Qwen3-VL's (and Qwen3-VL-MoE's) vision tower: a biased 3D-convolution patch embedding plus
//! learned position embeddings (a square table, bilinearly interpolated to each image's grid),
//! blocks with LayerNorm, fused-qkv attention under a 2D rotary embedding and a tanh-GELU MLP,
//! then a merger. DeepStack: the outputs of the blocks in `deepstack_visual_indexes` go through
//! mergers of their own (normalized over the merged width) and are added to the language model's
//! hidden states after its first layers (see [`super::splice::add_deepstack`]).

use super::ops::{merge_window_order, Activation};
use super::patch_tower::PatchTower;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::nn::LinearHook;
use crate::model::weights::Weights;
use anyhow::{bail, Result};
use ndarray::Array2;
use serde_json::Value;

const NORM_EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Config {
    /// What the 3D-patch towers share (`vision_config`'s depth, width, heads, patches, activation, rotary).
    pub tower: PatchTower,
    /// Rows of `pos_embed`, a square grid.
    pub num_position_embeddings: usize,
    pub deepstack_visual_indexes: Vec<usize>,
}

impl Config {
    pub fn from_json(config: &Value) -> Result<Config> {
        let v = vision_view(config).ok_or_else(|| anyhow::anyhow!("config.json has no vision_config"))?;
        let c = Config {
            tower: PatchTower::from_view(&v, &["hidden_size", "embed_dim"], "gelu_pytorch_tanh")?,
            num_position_embeddings: v.usize(&["num_position_embeddings"])?,
            deepstack_visual_indexes: v.usize_list(&["deepstack_visual_indexes"])?.unwrap_or_default(),
        };
        if let Some(&i) = c.deepstack_visual_indexes.iter().find(|&&i| i >= c.tower.depth) {
            bail!("config.json: deepstack_visual_indexes names block {i}, the tower has {}", c.tower.depth);
        }
        Ok(c)
    }

    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        let mut hidden = self.tower.embed_patches(device, w, input)?;
        let grids = input.image_grid_thw.clone();
        let table = w.matrix("pos_embed.weight")?;
        super::ops::add_into(&mut hidden, &self.position_embeddings(&table, &grids)?);
        let rotary = self.tower.rotary(&grids);
        let mut state = VisionState::new(hidden, super::frame_spans(&grids), grids);
        state.rotary = Some(rotary);
        Ok(state)
    }

    /// transformers' `fast_pos_embed_interpolate`: the `n × n` table sampled bilinearly at
    /// `linspace(0, n-1, h) × linspace(0, n-1, w)`, in merge-window order, repeated per frame.
    pub fn position_embeddings(&self, table: &Array2<f32>, grid_thw: &[[usize; 3]]) -> Result<Array2<f32>> {
        let n = (self.num_position_embeddings as f64).sqrt().round() as usize;
        if n * n != table.nrows() || table.ncols() != self.tower.dim {
            bail!(
                "pos_embed.weight has shape {:?}, expected [{}, {}] (a square grid)",
                table.dim(),
                self.num_position_embeddings,
                self.tower.dim
            );
        }
        let tokens: usize = grid_thw.iter().map(|g| g[0] * g[1] * g[2]).sum();
        let mut out = Array2::<f32>::zeros((tokens, self.tower.dim));
        let mut row = 0;
        for &[t, h, w] in grid_thw {
            let (hs, ws) = (sample_points(n, h), sample_points(n, w));
            for _ in 0..t {
                for (r, c) in merge_window_order(h, w, self.tower.spatial_merge_size) {
                    let ((h0, h1, dh), (w0, w1, dw)) = (hs[r], ws[c]);
                    let corners = [
                        (h0 * n + w0, (1.0 - dh) * (1.0 - dw)),
                        (h0 * n + w1, (1.0 - dh) * dw),
                        (h1 * n + w0, dh * (1.0 - dw)),
                        (h1 * n + w1, dh * dw),
                    ];
                    let mut dst = out.row_mut(row);
                    for (idx, weight) in corners {
                        dst.scaled_add(weight, &table.row(idx));
                    }
                    row += 1;
                }
            }
        }
        Ok(out)
    }

    pub fn block(
        &self,
        device: &dyn Device,
        i: usize,
        w: &Weights,
        state: &mut VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<()> {
        let h = super::layer_norm(w, "norm1", &state.hidden, NORM_EPS)?;
        let attn =
            super::fused_qkv_attention(device, w, &h, self.tower.num_heads, state.rotary.as_ref(), &state.spans, hook)?;
        super::residual(&mut state.hidden, attn);

        let h = super::layer_norm(w, "norm2", &state.hidden, NORM_EPS)?;
        let mut m = super::linear(device, w, "mlp.linear_fc1", &h, hook)?;
        self.tower.hidden_act.apply_all(&mut m);
        let m = super::linear(device, w, "mlp.linear_fc2", &m, hook)?;
        super::residual(&mut state.hidden, m);

        if self.deepstack_visual_indexes.contains(&i) {
            state.kept.push((i + 1, state.hidden.clone()));
        }
        Ok(())
    }

    /// `merger` on the last block's output, `deepstack_merger_list.K` on the kept block outputs.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let x = super::layer_norm(w, "merger.norm", &state.hidden, NORM_EPS)?;
        let x = super::ops::group_rows(x, self.tower.merge_unit())?;
        let embeds = self.merger_mlp(device, w, "merger", x, hook)?;

        let mut deepstack = Vec::with_capacity(self.deepstack_visual_indexes.len());
        for (k, &block) in self.deepstack_visual_indexes.iter().enumerate() {
            let module = format!("deepstack_merger_list.{k}");
            let x = super::ops::group_rows(state.kept(block + 1)?.clone(), self.tower.merge_unit())?;
            let x = super::layer_norm(w, &format!("{module}.norm"), &x, NORM_EPS)?;
            deepstack.push(self.merger_mlp(device, w, &module, x, hook)?);
        }
        Ok(VisionOutput { embeds, deepstack })
    }

    /// `linear_fc1`, GELU, `linear_fc2` of a merger.
    fn merger_mlp(
        &self,
        device: &dyn Device,
        w: &Weights,
        module: &str,
        x: Array2<f32>,
        hook: &mut dyn LinearHook,
    ) -> Result<Array2<f32>> {
        let mut x = super::linear(device, w, &format!("{module}.linear_fc1"), &x, hook)?;
        Activation::Gelu.apply_all(&mut x);
        super::linear(device, w, &format!("{module}.linear_fc2"), &x, hook)
    }
}

/// For `steps` points spread evenly over `0..=n-1` (torch's `linspace` in f32): the table rows
/// below and above each point and the weight of the one above.
fn sample_points(n: usize, steps: usize) -> Vec<(usize, usize, f32)> {
    let end = (n - 1) as f32;
    let step = if steps > 1 { end / (steps - 1) as f32 } else { 0.0 };
    (0..steps)
        .map(|i| {
            // torch fills the first half from the start and the second half from the end.
            let x = if steps == 1 {
                0.0
            } else if i < steps / 2 {
                i as f32 * step
            } else {
                end - (steps - 1 - i) as f32 * step
            };
            let lo = x as usize;
            (lo.min(n - 1), (lo + 1).min(n - 1), x - lo as f32)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_points_span_the_table() {
        // linspace(0, 7, 6) = 0, 1.4, 2.8, 4.2, 5.6, 7
        let p = sample_points(8, 6);
        assert_eq!((p[0].0, p[0].1), (0, 1));
        assert_eq!((p[2].0, p[2].1), (2, 3));
        assert!((p[2].2 - 0.8).abs() < 1e-6);
        assert_eq!((p[5].0, p[5].1, p[5].2), (7, 7, 0.0));
        assert_eq!(sample_points(8, 1), vec![(0, 1, 0.0)]);
    }

    #[test]
    fn parity_with_transformers() {
        super::super::parity::check_tower("qwen3_vl");
    }

    #[test]
    fn images_are_independent() {
        super::super::parity::check_images_are_independent("qwen3_vl", &[[1, 10, 6], [1, 4, 4]]);
    }

    #[test]
    fn parity_with_transformers_moe() {
        super::super::parity::check_tower("qwen3_vl_moe");
    }

    #[test]
    fn parity_with_transformers_real_vocabulary() {
        super::super::parity::check_tower("qwen3_vl_realvocab");
    }
}
