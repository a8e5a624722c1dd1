//! GLM-4.1V's vision tower (`glm4v`; GLM-4.5V / 4.6V's `glm4v_moe` has the same one), as transformers'
//! `Glm4vVisionModel` computes it:
//!
//! ```text
//! patches ─ patch_embed (3D conv = linear) ─ post_conv_layernorm (RMS) ─ + interpolated position embedding
//!   ─ blocks: x + attn(norm1 x) with 2D RoPE, x + down(silu(gate)·up)(norm2 x)     (RMSNorm, per-frame attention)
//!   ─ post_layernorm (RMS) ─ downsample (conv m×m, stride m, over each merge window)
//!   ─ merger: proj ─ LayerNorm ─ GELU ─ down(silu(gate)·up)
//! ```
//!
//! - Tokens are in merge-window order (for each frame: merged rows, merged columns, then the
//!   `m × m` patches inside), as the processor flattens them; the rotary table is the Qwen towers'
//!   ([`Rotary::vision_2d`]: a quarter of the head's frequencies turn with the patch row, a quarter
//!   with its column, halves repeated).
//! - The position embedding is a square table of `image_size / patch_size` a side, resampled to
//!   each image's patch grid by `F.grid_sample(mode="bicubic", align_corners=False,
//!   padding_mode="border")` at the patch centres ([`interpolate_positions`]), then added to the
//!   patch embeddings after `post_conv_layernorm`.
//! - The downsample convolution is computed as a linear over each merge window's `dim × m × m`
//!   features (channel-major, as `view(-1, m, m, dim).permute(0, 3, 1, 2)` lays them out); like the
//!   patch embedding, it is a convolution, not a 2D linear, and no recipe quantizes it.
//! - The block MLP's width is `out_hidden_size` and the merger's `intermediate_size` (transformers'
//!   `Glm4VisionMlp` and `Glm4vVisionPatchMerger`); both are read from the weights.

use super::ops::Activation;
use super::patch_tower::PatchTower;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::nn::LinearHook;
use crate::model::weights::Weights;
use anyhow::{bail, ensure, Context, Result};
use ndarray::{Array2, ArrayView2};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Config {
    /// What the 3D-patch towers share (`vision_config`'s depth, width, heads, patches, activation, rotary).
    pub tower: PatchTower,
    /// The RMSNorms' epsilon (`rms_norm_eps`).
    pub eps: f64,
}

/// `nn.LayerNorm`'s default epsilon (the merger's `post_projection_norm`).
const LAYER_NORM_EPS: f64 = 1e-5;

impl Config {
    pub fn from_json(config: &Value) -> Result<Config> {
        let v = vision_view(config).context("config.json has no vision_config")?;
        let c = Config {
            tower: PatchTower::from_view(&v, &["hidden_size"], "silu")?,
            eps: v.f64(&["rms_norm_eps"])?.unwrap_or(1e-5),
        };
        Ok(c)
    }

    /// Patch embedding, `post_conv_layernorm`, the interpolated position embedding; the rotary
    /// table and per-frame attention spans.
    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        let hidden = self.tower.embed_patches(device, w, input)?;
        let grids = input.image_grid_thw.clone();
        let mut hidden = super::rms_norm(w, "post_conv_layernorm", &hidden, self.eps)?;
        let table = w.matrix("embeddings.position_embedding.weight")?;
        ensure!(
            table.ncols() == hidden.ncols(),
            "embeddings.position_embedding has width {}, the patch embeddings {}",
            table.ncols(),
            hidden.ncols()
        );
        let positions = interpolate_positions(table.view(), &grids, self.tower.spatial_merge_size)?;
        super::residual(&mut hidden, positions);
        let rotary = self.tower.rotary(&grids);
        let mut state = VisionState::new(hidden, super::frame_spans(&grids), grids);
        state.rotary = Some(rotary);
        Ok(state)
    }

    pub fn block(
        &self,
        device: &dyn Device,
        _i: usize,
        w: &Weights,
        state: &mut VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<()> {
        let h = super::rms_norm(w, "norm1", &state.hidden, self.eps)?;
        let attn =
            super::fused_qkv_attention(device, w, &h, self.tower.num_heads, state.rotary.as_ref(), &state.spans, hook)?;
        super::residual(&mut state.hidden, attn);

        let h = super::rms_norm(w, "norm2", &state.hidden, self.eps)?;
        let m = swiglu(device, w, "mlp", &h, self.tower.hidden_act, hook)?;
        super::residual(&mut state.hidden, m);
        Ok(())
    }

    /// `post_layernorm`, the downsample convolution over each merge window, the merger.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let x = super::rms_norm(w, "post_layernorm", &state.hidden, self.eps)?;
        let windows = channel_major_windows(x.view(), self.tower.merge_unit())?;
        let conv = super::conv_as_linear(w, "downsample")?;
        ensure!(
            conv.in_features() == windows.ncols(),
            "downsample takes {} features, a merge window of {} patches of width {} has {}",
            conv.in_features(),
            self.tower.merge_unit(),
            x.ncols(),
            windows.ncols()
        );
        let x = conv.forward(device, windows.view());
        let x = super::linear(device, w, "merger.proj", &x, hook)?;
        let mut x = super::layer_norm(w, "merger.post_projection_norm", &x, LAYER_NORM_EPS)?;
        Activation::Gelu.apply_all(&mut x);
        let embeds = swiglu(device, w, "merger", &x, self.tower.hidden_act, hook)?;
        Ok(VisionOutput { embeds, deepstack: Vec::new() })
    }
}

/// `down(act(gate(x)) · up(x))` with the linears `{module}.gate_proj`, `up_proj`, `down_proj`.
fn swiglu(
    device: &dyn Device,
    w: &Weights,
    module: &str,
    x: &Array2<f32>,
    act: Activation,
    hook: &mut dyn LinearHook,
) -> Result<Array2<f32>> {
    let mut gate = super::linear(device, w, &format!("{module}.gate_proj"), x, hook)?;
    let up = super::linear(device, w, &format!("{module}.up_proj"), x, hook)?;
    ensure!(gate.dim() == up.dim(), "{module}.gate_proj and {module}.up_proj give different shapes");
    act.apply_all(&mut gate);
    gate *= &up;
    super::linear(device, w, &format!("{module}.down_proj"), &gate, hook)
}

/// Each group of `n` consecutive tokens (one merge window) as one row whose features are ordered
/// channel first, then token: `out[g][c·n + t] = x[g·n + t][c]`, the layout of a `[dim, m, m]`
/// convolution input flattened.
fn channel_major_windows(x: ArrayView2<f32>, n: usize) -> Result<Array2<f32>> {
    let (tokens, dim) = x.dim();
    if n == 0 || tokens % n != 0 {
        bail!("{tokens} patches cannot be downsampled in merge windows of {n}");
    }
    Ok(Array2::from_shape_fn((tokens / n, dim * n), |(g, f)| x[[g * n + f % n, f / n]]))
}

/// The position embedding of every token (merge-window order, frame by frame): the square
/// `table` (`side²` rows) resampled at each patch centre of its frame's `h × w` grid, as
/// `F.grid_sample(table as [1, dim, side, side], grid, mode="bicubic", align_corners=False,
/// padding_mode="border")` with `grid = ((col + 0.5)/w·2 − 1, (row + 0.5)/h·2 − 1)`.
pub fn interpolate_positions(table: ArrayView2<f32>, grids: &[[usize; 3]], merge: usize) -> Result<Array2<f32>> {
    let (n, dim) = table.dim();
    let side = (n as f64).sqrt().round() as usize;
    ensure!(side * side == n && n > 0, "embeddings.position_embedding has {n} rows, not a square grid of positions");
    let tokens: usize = grids.iter().map(|g| g[0] * g[1] * g[2]).sum();
    let mut out = Array2::<f32>::zeros((tokens, dim));
    let mut row = 0;
    for &[t, h, w] in grids {
        for _ in 0..t {
            for (r, c) in super::ops::merge_window_order(h, w, merge) {
                // grid_sample's unnormalised source coordinates (align_corners=False).
                let x = source_coordinate(c, w, side);
                let y = source_coordinate(r, h, side);
                let (wx, ix) = cubic_taps(x, side);
                let (wy, iy) = cubic_taps(y, side);
                let mut acc = vec![0f64; dim];
                for (a, &yi) in wy.iter().zip(&iy) {
                    for (b, &xi) in wx.iter().zip(&ix) {
                        let weight = a * b;
                        let src = table.row(yi * side + xi);
                        acc.iter_mut().zip(src.iter()).for_each(|(o, &v)| *o += weight * v as f64);
                    }
                }
                out.row_mut(row).iter_mut().zip(&acc).for_each(|(o, &v)| *o = v as f32);
                row += 1;
            }
        }
    }
    Ok(out)
}

/// The source coordinate of patch `i` of `n` in a table of `side` entries: the normalised
/// `(i + 0.5)/n·2 − 1`, unnormalised as `((g + 1)·side − 1)/2`; computed in f32 as transformers does.
fn source_coordinate(i: usize, n: usize, side: usize) -> f64 {
    let g = ((i as f32 + 0.5) / n as f32) * 2.0 - 1.0;
    (((g + 1.0) * side as f32 - 1.0) / 2.0) as f64
}

/// PyTorch's bicubic weights (`A = −0.75`) of the four taps around `x`, and the taps' indices
/// clamped to the table (`padding_mode="border"`).
fn cubic_taps(x: f64, side: usize) -> ([f64; 4], [usize; 4]) {
    const A: f64 = -0.75;
    let near = |t: f64| ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
    let far = |t: f64| ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A;
    let floor = x.floor();
    let t = x - floor;
    let weights = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
    let clamp = |i: f64| i.clamp(0.0, (side - 1) as f64) as usize;
    let index = [clamp(floor - 1.0), clamp(floor), clamp(floor + 1.0), clamp(floor + 2.0)];
    (weights, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the table's own size every patch centre falls on a table entry: the identity.
    #[test]
    fn interpolation_at_the_table_size_is_the_table() {
        let table = Array2::from_shape_fn((16, 3), |(r, c)| (r * 7 + c) as f32 * 0.25 - 3.0);
        let out = interpolate_positions(table.view(), &[[1, 4, 4]], 1).unwrap();
        for (a, b) in out.iter().zip(table.iter()) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    /// Bicubic weights sum to one; halfway between entries they are Keys' kernel with A = −0.75
    /// at distances 1.5, 0.5, 0.5, 1.5 (−0.09375, 0.59375, 0.59375, −0.09375); the border clamps
    /// the taps beyond the table.
    #[test]
    fn bicubic_weights_by_formula() {
        for x in [0.0, 0.3, 1.5, 2.75] {
            let (w, _) = cubic_taps(x, 8);
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let (w, i) = cubic_taps(2.5, 8);
        assert_eq!(w, [-0.09375, 0.59375, 0.59375, -0.09375]);
        assert_eq!(i, [1, 2, 3, 4]);
        let (w, _) = cubic_taps(3.0, 8);
        assert_eq!(w, [0.0, 1.0, 0.0, 0.0]);
        let (_, i) = cubic_taps(-0.25, 4);
        assert_eq!(i, [0, 0, 0, 1]);
        let (_, i) = cubic_taps(3.25, 4);
        assert_eq!(i, [2, 3, 3, 3]);
    }

    #[test]
    fn windows_are_channel_major() {
        let x = Array2::from_shape_fn((8, 3), |(t, c)| (t * 10 + c) as f32);
        let w = channel_major_windows(x.view(), 4).unwrap();
        assert_eq!(w.dim(), (2, 12));
        // Window 1, channel 2, token 3 of the window: x[7][2].
        assert_eq!(w[[1, 2 * 4 + 3]], 72.0);
        assert!(channel_major_windows(x.view(), 3).is_err());
    }

    #[test]
    fn parity_with_transformers() {
        super::super::parity::check_tower("glm4v");
        // Two images of 6×10 and 8×4 patches: the 4×4 position table interpolated.
        super::super::parity::check_tower("glm4v_wide");
        // GLM-4.5V (glm4v_moe): the same tower, 6×8 patches (tests/fixtures/gen/glm4v_moe.py).
        super::super::parity::check_tower("glm4v_moe");
    }

    #[test]
    fn images_are_independent() {
        super::super::parity::check_images_are_independent("glm4v", &[[1, 6, 10], [1, 4, 4], [1, 8, 2]]);
    }
}
