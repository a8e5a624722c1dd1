//! InternVL's vision side (InternVL 2 / 2.5 / 3 / 3.5): InternViT, then a pixel shuffle and the
//! projector, in both layouts InternVL is published in — the remote code's (`internvl_chat`:
//! fused `attn.qkv`, `ls1`/`ls2`, `mlp1`) and transformers' `-hf` conversions (`internvl`: separate
//! `attention.{q,k,v}_proj`, `lambda_1`/`lambda_2`, `multi_modal_projector`). The math is one; the
//! names and config keys come from [`InternVitNames`].
//!
//! ```text
//! tiles [n, 3, S, S] ─ patch conv (+bias) ─ [class token; patches] + position embedding
//! block: x += ls1 · proj(attention(q, k, v of norm1(x) [, q_norm / k_norm]))
//!        x += ls2 · mlp.fc2(act(mlp.fc1(norm2(x))))
//! features: hidden state `select_layer` / `vision_feature_layer` (-1: the last block's output,
//!           through the -hf tower's final `layernorm` when it has one), class token dropped,
//!           pixel shuffle by `downsample_ratio` (a 2×2 block of patches becomes one token of 4·D
//!           features), projector: LayerNorm(4·D) → Linear → GELU → Linear
//! ```
//!
//! The norms are LayerNorms (InternViT-300M) or RMSNorms (InternViT-6B, `norm_type: rms_norm`),
//! whose blocks also normalise queries and keys over all heads at once (`qk_normalization` /
//! `use_qk_norm`). Every tile is an image of its own: attention stays inside a tile.
//!
//! transformers' `InternVLModel.pixel_shuffle` is the remote code's `pixel_shuffle` (ps_version v2)
//! line for line (the same view / permute / view / permute on `[n, w, h, c]`), and vLLM's
//! `InternS1ForConditionalGeneration.pixel_shuffle` too: one [`pixel_shuffle`] serves both.

use super::ops::Activation;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::layout::{InternVitNames, Layout, QkvNames};
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
    /// The -hf tower's final norm applies to the features (`vision_feature_layer` -1 and
    /// `use_mean_pooling` false: `last_hidden_state`).
    pub final_norm: bool,
    /// `1 / downsample_ratio`: the side of the block of patches one token gathers.
    pub shuffle: usize,
    /// The class and patch tokens get the position embedding (`use_absolute_position_embeddings`).
    pub positions: bool,
    /// The projector's activation (`projector_hidden_act`; the remote code's `mlp1` is GELU).
    pub projector_act: Activation,
    /// The projector's module name (`mlp1`, `model.multi_modal_projector`).
    pub projector: String,
    /// The tower's root (`vision_model`, `model.vision_tower`).
    pub vision_root: String,
    pub names: &'static InternVitNames,
}

impl Config {
    pub fn from_json(config: &Value, layout: &Layout) -> Result<Config> {
        let names = InternVitNames::of(layout.family);
        let v = vision_view(config).context("config.json has no vision_config")?;
        let depth = v.usize(&["num_hidden_layers"])?;
        let key = names.feature_layer_key;
        let select = match config.get(key) {
            None | Some(Value::Null) => -1,
            Some(x) => x.as_i64().with_context(|| {
                format!(
                    "config.json: {key} is {x}; lamina reads one layer (features of several layers are not InternVL's)"
                )
            })?,
        };
        let count = depth as i64 + 1;
        let feature_layer = if select < 0 { select + count } else { select };
        ensure!(
            (0..count).contains(&feature_layer),
            "config.json: {key} {select} is outside the {count} hidden states of a {depth}-block tower"
        );
        // transformers' get_image_features: "default" drops the class token; "full" keeps it, and
        // then its reshape into a square of patches fails. The remote code always drops it.
        match config.get("vision_feature_select_strategy").and_then(Value::as_str) {
            None | Some("default") => {}
            Some(other) => bail!(
                "config.json: vision_feature_select_strategy {other:?}: InternVL's pixel shuffle needs the class token dropped (\"default\")"
            ),
        }
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
        let final_norm = names.final_norm.is_some() && select == -1 && !v.bool(&["use_mean_pooling"]).unwrap_or(true);
        Ok(Config {
            depth,
            dim: v.usize(&["hidden_size"])?,
            num_heads: v.usize(&["num_attention_heads"])?,
            patch_size: v.square(&["patch_size"])?,
            eps: v.f64(&["layer_norm_eps"])?.unwrap_or(1e-6),
            norm,
            act: Activation::from_name(v.str(&["hidden_act"]).unwrap_or("gelu"))?,
            feature_layer: feature_layer as usize,
            final_norm,
            shuffle,
            positions: v.bool(&["use_absolute_position_embeddings"]).unwrap_or(true),
            projector_act: Activation::from_name(
                config.get("projector_hidden_act").and_then(Value::as_str).unwrap_or("gelu"),
            )?,
            projector: layout.projector.clone().context("the InternVL layout has no projector")?,
            vision_root: layout.vision.clone().context("the InternVL layout has no vision tower")?,
            names,
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
        let n = &self.names;
        let conv = super::conv_as_linear(w, n.patch)?;
        ensure!(
            conv.in_features() == patches.ncols(),
            "the patch convolution takes {} features, a {p}×{p} patch of the tiles gives {}",
            conv.in_features(),
            patches.ncols()
        );
        let seq = gh * gw + 1;
        let positions = if self.positions {
            let positions = w.get(n.position)?;
            ensure!(
                positions.len() == seq * self.dim,
                "a tile of {gh}×{gw} patches makes {seq} tokens, {} holds {} (tiles must have the model's image size)",
                n.position,
                positions.len() / self.dim.max(1)
            );
            Some(positions.to_shape((seq, self.dim))?.to_owned())
        } else {
            None
        };
        let class = w.get(n.class)?;
        ensure!(class.len() == self.dim, "{} holds {} values, not {}", n.class, class.len(), self.dim);
        let class = class.to_shape(self.dim)?.to_owned();
        let patch_embeds = conv.forward(device, patches.view());
        let mut hidden = Array2::<f32>::zeros((tiles * seq, self.dim));
        for b in 0..tiles {
            let mut rows = hidden.slice_mut(s![b * seq..(b + 1) * seq, ..]);
            rows.row_mut(0).assign(&class);
            rows.slice_mut(s![1.., ..]).assign(&patch_embeds.slice(s![b * gh * gw..(b + 1) * gh * gw, ..]));
            if let Some(p) = &positions {
                rows += p;
            }
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
        let n = &self.names;
        let h = self.norm(w, n.norm1, &state.hidden)?;
        let (q, k, v) = match n.qkv {
            QkvNames::Fused { module, .. } => {
                let qkv = super::linear(device, w, module, &h, hook)?;
                ensure!(qkv.ncols() == 3 * self.dim, "{module} gives {} features, not 3 × {}", qkv.ncols(), self.dim);
                let (q, k, v) = super::ops::split_qkv(&qkv);
                (q.to_owned(), k.to_owned(), v.to_owned())
            }
            QkvNames::Separate { q, k, v } => {
                let mut out = Vec::with_capacity(3);
                for m in [q, k, v] {
                    let x = super::linear(device, w, m, &h, hook)?;
                    ensure!(x.ncols() == self.dim, "{m} gives {} features, not {}", x.ncols(), self.dim);
                    out.push(x);
                }
                let v = out.pop().unwrap();
                let k = out.pop().unwrap();
                (out.pop().unwrap(), k, v)
            }
        };
        let (q, k) = if w.has(&format!("{}.weight", n.q_norm)) {
            // InternViT-6B: RMSNorm over all heads' queries (and keys) at once.
            let eps = n.qk_norm_eps.unwrap_or(self.eps);
            (super::rms_norm(w, n.q_norm, &q, eps)?, super::rms_norm(w, n.k_norm, &k, eps)?)
        } else {
            (q, k)
        };
        let o = super::ops::span_attention(device, q.view(), k.view(), v.view(), self.num_heads, None, &state.spans);
        let o = super::linear(device, w, n.proj, &o, hook)?;
        let ls1 = w.vector(n.ls1)?;
        super::check_width(n.ls1, ls1.len(), o.ncols())?;
        super::ops::add_scaled_into(&mut state.hidden, &o, &ls1);

        let h = self.norm(w, n.norm2, &state.hidden)?;
        let mut m = super::linear(device, w, n.fc1, &h, hook)?;
        self.act.apply_all(&mut m);
        let m = super::linear(device, w, n.fc2, &m, hook)?;
        let ls2 = w.vector(n.ls2)?;
        super::check_width(n.ls2, ls2.len(), m.ncols())?;
        super::ops::add_scaled_into(&mut state.hidden, &m, &ls2);

        if self.feature_layer == i + 1 {
            state.kept.push((i + 1, state.hidden.clone()));
        }
        Ok(())
    }

    /// The selected hidden state without class tokens, pixel-shuffled, through the projector.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let hidden = if self.feature_layer == self.depth { &state.hidden } else { state.kept(self.feature_layer)? };
        // The post unit holds the tower's final norm and the projector, under whole names when the
        // projector lives outside the vision root (both layouts).
        let local = |full: String| full.strip_prefix(w.prefix.as_str()).map(str::to_string).unwrap_or(full);
        let name = |n: &str| local(format!("{}.{n}", self.projector));
        let normed;
        let hidden = match (self.final_norm, self.names.final_norm) {
            (true, Some(f)) => {
                normed = super::layer_norm(w, &local(format!("{}.{f}", self.vision_root)), hidden, self.eps)?;
                &normed
            }
            _ => hidden,
        };
        let seq = state.spans.get(1).copied().unwrap_or(0);
        let tiles = state.spans.len().saturating_sub(1);
        let side = (seq.saturating_sub(1) as f64).sqrt() as usize;
        ensure!(side * side + 1 == seq, "{seq} tokens per tile are not a class token and a square of patches");
        let features = pixel_shuffle(hidden, tiles, side, self.shuffle)?;

        let [norm, fc1, fc2] = self.names.projector;
        let x = super::layer_norm(w, &name(norm), &features, 1e-5)?;
        let mut x = super::linear(device, w, &name(fc1), &x, hook)?;
        self.projector_act.apply_all(&mut x);
        let embeds = super::linear(device, w, &name(fc2), &x, hook)?;
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

    /// Every block, the projector and the whole tower against transformers' activations: the remote
    /// code's layout (InternViT-300M-like and -6B-like) and transformers' own `-hf` layout.
    #[test]
    fn parity_with_transformers() {
        super::super::parity::check_tower("internvl_chat");
        super::super::parity::check_tower("internvl_chat_6b");
        super::super::parity::check_tower("internvl_hf");
    }

    #[test]
    fn tiles_are_independent() {
        super::super::parity::check_images_are_independent("internvl_chat", &[[0; 3]; 2]);
        super::super::parity::check_images_are_independent("internvl_hf", &[[0; 3]; 2]);
    }

    /// The -hf config's keys: list-valued sizes, `vision_feature_layer`, the select strategy, the
    /// tower's final norm only on `last_hidden_state` with `use_mean_pooling` false.
    #[test]
    fn hf_config_keys() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/internvl_hf");
        let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let read = |c: &Value| {
            let family = crate::model::layout::Family::detect(c).unwrap();
            Config::from_json(c, &Layout::for_config(family, c, &[]).unwrap())
        };
        let c = read(&config).unwrap();
        assert_eq!((c.patch_size, c.feature_layer, c.final_norm, c.shuffle), (14, 2, false, 2));
        assert_eq!(*c.names, InternVitNames::HF);
        let mut no_pooling = config.clone();
        no_pooling["vision_config"]["use_mean_pooling"] = false.into();
        assert!(read(&no_pooling).unwrap().final_norm);
        no_pooling["vision_feature_layer"] = (-2).into();
        let c = read(&no_pooling).unwrap();
        assert_eq!((c.feature_layer, c.final_norm), (1, false));
        let mut full = config.clone();
        full["vision_feature_select_strategy"] = "full".into();
        assert!(read(&full).unwrap_err().to_string().contains("full"));
        let mut oblong = config.clone();
        oblong["vision_config"]["patch_size"] = serde_json::json!([14, 16]);
        assert!(read(&oblong).unwrap_err().to_string().contains("square"));
        let mut several = config;
        several["vision_feature_layer"] = serde_json::json!([-1, -2]);
        assert!(read(&several).is_err());
    }
}
