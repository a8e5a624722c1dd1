//! InternVL's vision side (InternVL 2 / 2.5 / 3 / 3.5 as released, remote code `internvl_chat`):
//! InternViT, then a pixel shuffle and the `mlp1` projector.
//!
//! ```text
//! tiles [n, 3, S, S] ─ patch conv (+bias) ─ [class token; patches] + position embedding
//! block: x += ls1 · attn.proj(attention(attn.qkv(norm1(x)) [, q_norm / k_norm]))
//!        x += ls2 · mlp.fc2(gelu(mlp.fc1(norm2(x))))
//! features: hidden state `select_layer` (-1: the last block's output; no final norm), class
//!           token dropped, pixel shuffle by `downsample_ratio` (a 2×2 block of patches becomes one
//!           token of 4·D features), mlp1: LayerNorm(4·D) → Linear → GELU → Linear
//! ```
//!
//! The norms are LayerNorms (InternViT-300M) or RMSNorms (InternViT-6B, `norm_type: rms_norm`),
//! whose blocks also normalise queries and keys over all heads at once (`qk_normalization`). Every
//! tile is an image of its own: attention stays inside a tile.

use super::ops::Activation;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::layout::Layout;
use crate::model::nn::LinearHook;
use crate::model::weights::Weights;
use anyhow::{bail, ensure, Context, Result};
use ndarray::{s, Array2};
use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
pub enum NormType {
    LayerNorm,
    RmsNorm,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub depth: usize,
    pub dim: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub eps: f64,
    pub norm: NormType,
    pub act: Activation,
    /// The hidden-state index the features come from (0 = embeddings, `i + 1` = block `i`).
    pub feature_layer: usize,
    /// `1 / downsample_ratio`: the side of the block of patches one token gathers.
    pub shuffle: usize,
    /// The projector's module name (`mlp1`).
    pub projector: String,
}

impl Config {
    pub fn from_json(config: &Value, layout: &Layout) -> Result<Config> {
        let v = vision_view(config).context("config.json has no vision_config")?;
        let depth = v.usize(&["num_hidden_layers"])?;
        let select = config.get("select_layer").and_then(Value::as_i64).unwrap_or(-1);
        let count = depth as i64 + 1;
        let feature_layer = if select < 0 { select + count } else { select };
        ensure!(
            (0..count).contains(&feature_layer),
            "config.json: select_layer {select} is outside the {count} hidden states of a {depth}-block tower"
        );
        let ratio = config.get("downsample_ratio").and_then(Value::as_f64).unwrap_or(0.5);
        let shuffle = (1.0 / ratio).round() as usize;
        ensure!(
            shuffle >= 1 && ((1.0 / shuffle as f64) - ratio).abs() < 1e-9,
            "config.json: downsample_ratio {ratio} is not 1/k for a whole k (lamina's pixel shuffle needs one)"
        );
        match config.get("ps_version").and_then(Value::as_str) {
            None | Some("v2") => {}
            Some(other) => bail!(
                "config.json: ps_version {other:?}: only InternVL's v2 pixel shuffle is implemented (every release since InternVL 1.5 uses it)"
            ),
        }
        let norm = match v.str(&["norm_type"]).unwrap_or("layer_norm") {
            "layer_norm" => NormType::LayerNorm,
            "rms_norm" => NormType::RmsNorm,
            other => bail!("vision_config.norm_type {other:?} is not layer_norm or rms_norm"),
        };
        Ok(Config {
            depth,
            dim: v.usize(&["hidden_size"])?,
            num_heads: v.usize(&["num_attention_heads"])?,
            patch_size: v.usize(&["patch_size"])?,
            eps: v.f64(&["layer_norm_eps"])?.unwrap_or(1e-6),
            norm,
            act: Activation::from_name(v.str(&["hidden_act"]).unwrap_or("gelu"))?,
            feature_layer: feature_layer as usize,
            shuffle,
            projector: layout.projector.clone().context("the InternVL layout has no mlp1 projector")?,
        })
    }

    fn norm(&self, w: &Weights, module: &str, x: &Array2<f32>) -> Result<Array2<f32>> {
        match self.norm {
            NormType::LayerNorm => super::layer_norm(w, module, x, self.eps),
            NormType::RmsNorm => super::rms_norm(w, module, x, self.eps),
        }
    }

    /// Class token and patches plus the position embedding, per tile.
    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        let p = self.patch_size;
        let super::ImagePatches { patches, images: tiles, grid: (gh, gw) } = super::image_patches(input, p)?;
        let conv = super::conv_as_linear(w, "embeddings.patch_embedding")?;
        ensure!(
            conv.in_features() == patches.ncols(),
            "the patch convolution takes {} features, a {p}×{p} patch of the tiles gives {}",
            conv.in_features(),
            patches.ncols()
        );
        let positions = w.get("embeddings.position_embedding")?;
        let seq = gh * gw + 1;
        ensure!(
            positions.len() == seq * self.dim,
            "a tile of {gh}×{gw} patches makes {seq} tokens, the position embedding holds {} (tiles must have the model's image size)",
            positions.len() / self.dim.max(1)
        );
        let positions = positions.to_shape((seq, self.dim))?.to_owned();
        let class = w.get("embeddings.class_embedding")?;
        ensure!(class.len() == self.dim, "embeddings.class_embedding holds {} values, not {}", class.len(), self.dim);
        let class = class.to_shape(self.dim)?.to_owned();
        let patch_embeds = conv.forward(device, patches.view());
        let mut hidden = Array2::<f32>::zeros((tiles * seq, self.dim));
        for b in 0..tiles {
            let mut rows = hidden.slice_mut(s![b * seq..(b + 1) * seq, ..]);
            rows.row_mut(0).assign(&class);
            rows.slice_mut(s![1.., ..]).assign(&patch_embeds.slice(s![b * gh * gw..(b + 1) * gh * gw, ..]));
            rows += &positions;
        }
        let spans = (0..=tiles).map(|b| b * seq).collect();
        let mut state = VisionState::new(hidden, spans, Vec::new());
        if self.feature_layer == 0 {
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
        let h = self.norm(w, "norm1", &state.hidden)?;
        let qkv = super::linear(device, w, "attn.qkv", &h, hook)?;
        ensure!(qkv.ncols() == 3 * self.dim, "attn.qkv gives {} features, not 3 × {}", qkv.ncols(), self.dim);
        let (q, k, v) = super::ops::split_qkv(&qkv);
        let o = if w.has("attn.q_norm.weight") {
            // InternViT-6B: RMSNorm over all heads' queries (and keys) at once.
            let q = super::rms_norm(w, "attn.q_norm", &q.to_owned(), self.eps)?;
            let k = super::rms_norm(w, "attn.k_norm", &k.to_owned(), self.eps)?;
            super::ops::span_attention(device, q.view(), k.view(), v, self.num_heads, None, &state.spans)
        } else {
            super::ops::span_attention(device, q, k, v, self.num_heads, None, &state.spans)
        };
        let o = super::linear(device, w, "attn.proj", &o, hook)?;
        let ls1 = w.vector("ls1")?;
        super::check_width("ls1", ls1.len(), o.ncols())?;
        super::ops::add_scaled_into(&mut state.hidden, &o, &ls1);

        let h = self.norm(w, "norm2", &state.hidden)?;
        let mut m = super::linear(device, w, "mlp.fc1", &h, hook)?;
        self.act.apply_all(&mut m);
        let m = super::linear(device, w, "mlp.fc2", &m, hook)?;
        let ls2 = w.vector("ls2")?;
        super::check_width("ls2", ls2.len(), m.ncols())?;
        super::ops::add_scaled_into(&mut state.hidden, &m, &ls2);

        if self.feature_layer == i + 1 {
            state.kept.push((i + 1, state.hidden.clone()));
        }
        Ok(())
    }

    /// The selected hidden state without class tokens, pixel-shuffled, through `mlp1`.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let hidden = if self.feature_layer == self.depth { &state.hidden } else { state.kept(self.feature_layer)? };
        let seq = state.spans.get(1).copied().unwrap_or(0);
        let tiles = state.spans.len().saturating_sub(1);
        let side = (seq.saturating_sub(1) as f64).sqrt() as usize;
        ensure!(side * side + 1 == seq, "{seq} tokens per tile are not a class token and a square of patches");
        let features = pixel_shuffle(hidden, tiles, side, self.shuffle)?;

        let name = |n: &str| {
            let full = format!("{}.{n}", self.projector);
            full.strip_prefix(&w.prefix).map(str::to_string).unwrap_or(full)
        };
        let x = super::layer_norm(w, &name("0"), &features, 1e-5)?;
        let mut x = super::linear(device, w, &name("1"), &x, hook)?;
        Activation::Gelu.apply_all(&mut x);
        let embeds = super::linear(device, w, &name("3"), &x, hook)?;
        Ok(VisionOutput { embeds, deepstack: Vec::new() })
    }
}

/// InternVL's `pixel_shuffle` (ps_version v2) on each tile's `side × side` patches (class token
/// first, dropped): token `(i, j)` of the `side/f × side/f` output gathers the patches
/// `(f·i + a, f·j + b)` for `a, b < f`, features ordered `[a][b][channel]` — what the remote code's
/// view / permute / view / permute does.
pub fn pixel_shuffle(hidden: &Array2<f32>, tiles: usize, side: usize, f: usize) -> Result<Array2<f32>> {
    ensure!(side % f == 0, "a tile of {side}×{side} patches cannot be shuffled in blocks of {f}×{f}");
    let (dim, seq, out_side) = (hidden.ncols(), side * side + 1, side / f);
    ensure!(hidden.nrows() == tiles * seq, "{} hidden states for {tiles} tiles of {seq} tokens", hidden.nrows());
    let mut out = Array2::<f32>::zeros((tiles * out_side * out_side, f * f * dim));
    for t in 0..tiles {
        for i in 0..out_side {
            for j in 0..out_side {
                let mut row = out.row_mut(t * out_side * out_side + i * out_side + j);
                for a in 0..f {
                    for b in 0..f {
                        let src = t * seq + 1 + (f * i + a) * side + (f * j + b);
                        let at = (a * f + b) * dim;
                        row.slice_mut(s![at..at + dim]).assign(&hidden.row(src));
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The remote code's reshapes, written out with numpy-like index arithmetic on a 4×4 grid:
    /// `x.view(n, w, h*s, c/s).permute(0,2,1,3).view(n, h*s, w*s, c/s²).permute(0,2,1,3)`.
    #[test]
    fn pixel_shuffle_matches_the_remote_code_reshapes() {
        let (side, dim, f) = (4usize, 3usize, 2usize);
        let hidden = Array2::from_shape_fn((side * side + 1, dim), |(r, c)| (r * 10 + c) as f32);
        let out = pixel_shuffle(&hidden, 1, side, f).unwrap();
        // The reference: X[a][b][c] (a = row, b = column) as a flat array; follow the views.
        let x = |a: usize, b: usize, c: usize| hidden[[1 + a * side + b, c]];
        // view(n, W=4, H*s=2, C/s=6): X1[a][j][c'] = X[a][2j + c'/3][c'%3]
        let x1 = |a: usize, j: usize, c: usize| x(a, 2 * j + c / dim, c % dim);
        // permute → X2[j][a][c'] = X1[a][j][c']; view(2, 2, 12): X3[j][i][c''] = X2[j][2i + c''/6][c''%6]
        let x3 = |j: usize, i: usize, c: usize| x1(2 * i + c / (2 * dim), j, c % (2 * dim));
        // permute → X4[i][j][c''] = X3[j][i][c'']; tokens in (i, j) order.
        for i in 0..2 {
            for j in 0..2 {
                for c in 0..4 * dim {
                    assert_eq!(out[[i * 2 + j, c]], x3(j, i, c), "token ({i}, {j}) feature {c}");
                }
            }
        }
        assert!(pixel_shuffle(&hidden, 1, 3, 2).is_err());
    }

    #[test]
    fn parity_with_transformers() {
        super::super::parity::check_tower("internvl_chat");
        super::super::parity::check_tower("internvl_chat_6b");
    }

    #[test]
    fn tiles_are_independent() {
        super::super::parity::check_images_are_independent("internvl_chat", &[[0; 3]; 2]);
    }
}
