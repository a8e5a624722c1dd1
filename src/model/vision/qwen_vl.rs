//! Qwen-VL's vision side (Qwen-VL / Qwen-VL-Chat, remote code `visual.py`): a ViT (OpenCLIP
//! ViT-bigG in the releases) whose patch grid an attention-pooling resampler compresses to a fixed
//! number of queries (256), projected into the language model's width.
//!
//! ```text
//! images [n, 3, S, S] ─ conv1 (no bias) ─ + get_abs_pos(positional_embedding) ─ ln_pre
//! block: x += attn.out_proj(attention(attn.in_proj(ln_1(x))))     in_proj rows per head: [q | k | v]
//!        x += mlp.c_proj(gelu(mlp.c_fc(ln_2(x))))
//! attn_pool: kv = ln_kv(kv_proj(x)); q = ln_q(query)
//!            MultiheadAttention(q + pos_embed, kv + get_abs_pos(pos_embed), kv)
//! ln_post, `@ proj`  →  [n · n_queries, output_dim]
//! ```
//!
//! `get_abs_pos` resizes a square position table to the image's grid with bicubic interpolation
//! (the releases' 16 × 16 tables to the 32 × 32 patches of a 448 image); `pos_embed` is the
//! resampler's 2D sin-cos table over its `√n_queries` grid, stored in the checkpoint. The fused
//! `attn.in_proj` is split per head (`view(…, heads, 3 · head_dim)`), not in thirds as the other
//! towers' `qkv`. The resampler's own attention is torch's `nn.MultiheadAttention` with
//! `output_dim / 128` heads: its `in_proj_weight` (q, k and v rows of different inputs) is not a
//! linear module and stays float with the rest of the resampler; `kv_proj` and `attn.out_proj`
//! are computed through the hook. Every norm is a LayerNorm with eps 1e-6.

use super::ops::Activation;
use super::{VisionInput, VisionOutput, VisionState};
use crate::device::Device;
use crate::model::config::vision_view;
use crate::model::nn::{Linear, LinearHook};
use crate::model::weights::Weights;
use anyhow::{ensure, Context, Result};
use ndarray::{s, Array2, ArrayView2, Axis};
use serde_json::Value;

const EPS: f64 = 1e-6;

#[derive(Debug, Clone)]
pub struct Config {
    pub depth: usize,
    pub width: usize,
    pub heads: usize,
    pub patch_size: usize,
    pub image_size: usize,
    /// The resampler's queries (visual.py's default 256; a perfect square).
    pub n_queries: usize,
    /// The language model's width, which the resampler works in.
    pub output_dim: usize,
}

impl Config {
    pub fn from_json(config: &Value) -> Result<Config> {
        let v = vision_view(config).context("config.json has no `visual` section")?;
        let c = Config {
            depth: v.usize(&["layers"])?,
            width: v.usize(&["width"])?,
            heads: v.usize(&["heads"])?,
            patch_size: v.usize(&["patch_size"])?,
            image_size: v.usize(&["image_size"])?,
            n_queries: v.opt_usize(&["n_queries"])?.unwrap_or(256),
            output_dim: v.usize(&["output_dim"])?,
        };
        let side = (c.n_queries as f64).sqrt().round() as usize;
        ensure!(side * side == c.n_queries, "config.json: visual.n_queries {} is not a perfect square", c.n_queries);
        ensure!(
            c.output_dim >= 128 && c.output_dim % 128 == 0,
            "config.json: visual.output_dim {} does not make whole resampler heads of 128 (visual.py uses output_dim // 128)",
            c.output_dim
        );
        ensure!(
            c.heads > 0 && c.width % c.heads == 0,
            "config.json: visual.width {} is not {} whole heads",
            c.width,
            c.heads
        );
        Ok(c)
    }

    /// The resampler's heads (`output_dim // 128` in visual.py).
    pub fn pool_heads(&self) -> usize {
        self.output_dim / 128
    }

    /// Patches through conv1, plus the position table resized to the grid, then `ln_pre`.
    pub fn embed(&self, device: &dyn Device, w: &Weights, input: &VisionInput) -> Result<VisionState> {
        let p = super::image_patches(input, self.patch_size)?;
        ensure!(
            p.grid.0 == p.grid.1,
            "Qwen-VL takes square images ({0}×{0} as its processor resizes them), got a grid of {1}×{2} patches",
            self.image_size,
            p.grid.0,
            p.grid.1
        );
        let conv = super::conv_as_linear(w, "conv1")?;
        ensure!(
            conv.in_features() == p.patches.ncols(),
            "conv1 takes {} features, a {1}×{1} patch of the images gives {2}",
            conv.in_features(),
            self.patch_size,
            p.patches.ncols()
        );
        let tokens = p.grid.0 * p.grid.1;
        let table = w.matrix("positional_embedding")?;
        let positions =
            resize_square_table(table.view(), p.grid.0).context("transformer.visual.positional_embedding")?;
        let mut hidden = conv.forward(device, p.patches.view());
        for mut image in hidden.axis_chunks_iter_mut(Axis(0), tokens) {
            image += &positions;
        }
        let hidden = super::layer_norm(w, "ln_pre", &hidden, EPS)?;
        let spans = (0..=p.images).map(|b| b * tokens).collect();
        Ok(VisionState::new(hidden, spans, Vec::new()))
    }

    pub fn block(
        &self,
        device: &dyn Device,
        _i: usize,
        w: &Weights,
        state: &mut VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<()> {
        let h = super::layer_norm(w, "ln_1", &state.hidden, EPS)?;
        let qkv = super::linear(device, w, "attn.in_proj", &h, hook)?;
        ensure!(qkv.ncols() == 3 * self.width, "attn.in_proj gives {} features, not 3 × {}", qkv.ncols(), self.width);
        let qkv = per_head_to_thirds(&qkv, self.heads);
        let (q, k, v) = super::ops::split_qkv(&qkv);
        let o = super::ops::span_attention(device, q, k, v, self.heads, None, &state.spans);
        let o = super::linear(device, w, "attn.out_proj", &o, hook)?;
        super::residual(&mut state.hidden, o);

        let h = super::layer_norm(w, "ln_2", &state.hidden, EPS)?;
        let mut m = super::linear(device, w, "mlp.c_fc", &h, hook)?;
        Activation::Gelu.apply_all(&mut m);
        let m = super::linear(device, w, "mlp.c_proj", &m, hook)?;
        super::residual(&mut state.hidden, m);
        Ok(())
    }

    /// The resampler on each image's tokens, `ln_post`, `@ proj`.
    pub fn finish(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<VisionOutput> {
        let e = self.output_dim;
        let pooled = self.resample(device, w, &state, hook)?;
        let x = super::layer_norm(w, "ln_post", &pooled, EPS)?;
        let proj = w.matrix("proj")?;
        ensure!(proj.dim() == (e, e), "proj has shape {:?}, not [{e}, {e}]", proj.dim());
        Ok(VisionOutput { embeds: device.matmul(x.view(), proj.view()), deepstack: Vec::new() })
    }

    /// `attn_pool` (the Resampler) on each image's tokens: `[images · n_queries, output_dim]`.
    pub fn resample(
        &self,
        device: &dyn Device,
        w: &Weights,
        state: &VisionState,
        hook: &mut dyn LinearHook,
    ) -> Result<Array2<f32>> {
        let e = self.output_dim;
        let pos_embed = w.matrix("attn_pool.pos_embed")?;
        ensure!(
            pos_embed.dim() == (self.n_queries, e),
            "attn_pool.pos_embed has shape {:?}, not [n_queries {}, output_dim {e}]",
            pos_embed.dim(),
            self.n_queries
        );
        let query = w.matrix("attn_pool.query")?;
        ensure!(query.dim() == (self.n_queries, e), "attn_pool.query has shape {:?}", query.dim());
        let in_proj = w.matrix("attn_pool.attn.in_proj_weight")?;
        ensure!(in_proj.dim() == (3 * e, e), "attn_pool.attn.in_proj_weight has shape {:?}", in_proj.dim());
        let in_bias =
            if w.has("attn_pool.attn.in_proj_bias") { Some(w.vector("attn_pool.attn.in_proj_bias")?) } else { None };
        // nn.MultiheadAttention's packed projection: rows 0..E act on the query, E..2E on the key,
        // 2E..3E on the value.
        let part = |k: usize| Linear {
            weight: in_proj.slice(s![k * e..(k + 1) * e, ..]).to_owned(),
            bias: in_bias.as_ref().map(|b| b.slice(s![k * e..(k + 1) * e]).to_owned()),
        };
        let (wq, wk, wv) = (part(0), part(1), part(2));

        let q_in = super::layer_norm(w, "attn_pool.ln_q", &query, EPS)? + &pos_embed;
        let q = wq.forward(device, q_in.view());
        let images = state.spans.len().saturating_sub(1);
        let mut pooled = Array2::<f32>::zeros((images * self.n_queries, e));
        for b in 0..images {
            let x = state.hidden.slice(s![state.spans[b]..state.spans[b + 1], ..]).to_owned();
            let side = (x.nrows() as f64).sqrt().round() as usize;
            ensure!(side * side == x.nrows(), "{} tokens of an image are not a square grid", x.nrows());
            let kv = super::linear(device, w, "attn_pool.kv_proj", &x, hook)?;
            let kv = super::layer_norm(w, "attn_pool.ln_kv", &kv, EPS)?;
            let key_pos = resize_square_table(pos_embed.view(), side).context("attn_pool.pos_embed")?;
            let k = wk.forward(device, (&kv + &key_pos).view());
            let v = wv.forward(device, kv.view());
            let o = super::ops::cross_attention(device, q.view(), k.view(), v.view(), self.pool_heads());
            pooled.slice_mut(s![b * self.n_queries..(b + 1) * self.n_queries, ..]).assign(&o);
        }
        super::linear(device, w, "attn_pool.attn.out_proj", &pooled, hook)
    }
}

/// VisualAttention's split of the fused `in_proj` output: viewed as `[tokens, heads, 3 · head_dim]`
/// and split into q, k, v per head. Returns the columns reordered to `[q (all heads) | k | v]`.
fn per_head_to_thirds(qkv: &Array2<f32>, heads: usize) -> Array2<f32> {
    let hd = qkv.ncols() / (3 * heads);
    let order: Vec<usize> = (0..3)
        .flat_map(|part| (0..heads).flat_map(move |h| (0..hd).map(move |j| h * 3 * hd + part * hd + j)))
        .collect();
    qkv.select(Axis(1), &order)
}

/// visual.py's `get_abs_pos`: a square `[src², dim]` table resized to `side × side` rows by
/// `F.interpolate(mode="bicubic", align_corners=False)`; the table itself when the sizes agree.
pub fn resize_square_table(table: ArrayView2<f32>, side: usize) -> Result<Array2<f32>> {
    let src = (table.nrows() as f64).sqrt().round() as usize;
    ensure!(src * src == table.nrows() && src > 0, "a position table of {} rows is not a square grid", table.nrows());
    if src == side {
        return Ok(table.to_owned());
    }
    let (wy, wx) = (cubic_taps(src, side), cubic_taps(src, side));
    let dim = table.ncols();
    let mut out = Array2::<f32>::zeros((side * side, dim));
    for (oy, (ys, wys)) in wy.iter().enumerate() {
        for (ox, (xs, wxs)) in wx.iter().enumerate() {
            let mut row = out.row_mut(oy * side + ox);
            for c in 0..dim {
                let mut acc = 0f64;
                for (&y, &a) in ys.iter().zip(wys) {
                    let mut line = 0f64;
                    for (&x, &b) in xs.iter().zip(wxs) {
                        line += table[[y * src + x, c]] as f64 * b;
                    }
                    acc += line * a;
                }
                row[c] = acc as f32;
            }
        }
    }
    Ok(out)
}

/// For each output index of a `src → dst` bicubic resize (PyTorch's `upsample_bicubic2d`,
/// align_corners=False, A = -0.75, no antialiasing): its four source indices (clamped to the
/// edges) and weights.
fn cubic_taps(src: usize, dst: usize) -> Vec<([usize; 4], [f64; 4])> {
    const A: f64 = -0.75;
    let near = |t: f64| ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0; // |t| <= 1
    let far = |t: f64| ((A * t - 5.0 * A) * t + 8.0 * A) * t - 4.0 * A; // 1 < |t| < 2
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|i| {
            let real = (i as f64 + 0.5) * scale - 0.5;
            let x0 = real.floor();
            let t = real - x0;
            let idx = |k: i64| (x0 as i64 + k).clamp(0, src as i64 - 1) as usize;
            ([idx(-1), idx(0), idx(1), idx(2)], [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bicubic weights sum to one; a ramp resized 4 → 8 gives PyTorch's values
    /// (`F.interpolate(torch.arange(4.).repeat(4, 1)[None, None], size=(8, 8), mode="bicubic",
    /// align_corners=False)`, one row, printed by torch 2.14); the table's own size is the table.
    #[test]
    fn bicubic_resize_is_torchs() {
        for (src, dst) in [(4, 8), (16, 32), (16, 8), (5, 7)] {
            for (_, w) in cubic_taps(src, dst) {
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
        let table = Array2::from_shape_fn((16, 1), |(r, _)| (r % 4) as f32);
        let out = resize_square_table(table.view(), 8).unwrap();
        let torch = [-0.1055, 0.1914, 0.6680, 1.2969, 1.7031, 2.3320, 2.8086, 3.1055];
        for (i, want) in torch.iter().enumerate() {
            assert!((out[[3 * 8 + i, 0]] - want).abs() < 1e-4, "{i}: {}", out[[3 * 8 + i, 0]]);
        }
        let same = resize_square_table(table.view(), 4).unwrap();
        assert_eq!(same, table);
        assert!(resize_square_table(Array2::<f32>::zeros((15, 2)).view(), 4).is_err());
    }

    #[test]
    fn in_proj_is_split_per_head() {
        // 2 heads of 2: columns [q0 q0 k0 k0 v0 v0 q1 q1 k1 k1 v1 v1].
        let qkv = Array2::from_shape_fn((1, 12), |(_, c)| c as f32);
        let t = per_head_to_thirds(&qkv, 2);
        assert_eq!(t.row(0).to_vec(), vec![0., 1., 6., 7., 2., 3., 8., 9., 4., 5., 10., 11.]);
    }

    #[test]
    fn parity_with_the_remote_code() {
        super::super::parity::check_tower("qwen_vl");
    }

    /// The resampler alone, from the reference's last block output, against the remote code's
    /// `attn_pool` output (tests/fixtures/gen/qwen_vl.py: torch's nn.MultiheadAttention).
    #[test]
    fn resampler_matches_the_remote_code() {
        use crate::io::{checkpoint::Checkpoint, safetensors::load_all};
        use crate::model::{build_units, layout::UnitKind, nn::Plain, Model};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/qwen_vl");
        let ckpt = Checkpoint::open(&dir).unwrap();
        let names: Vec<&str> = ckpt.names().collect();
        let model = Model::new(&ckpt.config, None, &names).unwrap();
        let inventory: Vec<_> = ckpt.names().map(|n| ckpt.entry(n).unwrap().1.meta()).collect();
        let units = build_units(&model, &inventory).unwrap();
        let post = units.iter().find(|u| u.kind == UnitKind::VisionPost).unwrap();
        let w = super::super::load_unit(&ckpt, &model.layout, post).unwrap();
        let reference = load_all(&dir.join("reference.safetensors")).unwrap();
        let matrix = |key: &str| {
            let t = &reference[key];
            let cols = *t.shape.last().unwrap();
            Array2::from_shape_vec((t.numel() / cols, cols), t.to_f32().unwrap()).unwrap()
        };
        let cfg = Config::from_json(&model.config).unwrap();
        let hidden = matrix("transformer.visual.transformer.resblocks.1.out");
        let state = VisionState::new(hidden, vec![0, 64], Vec::new());
        let ours = cfg.resample(&crate::device::Cpu, &w, &state, &mut Plain).unwrap();
        let want = matrix("transformer.visual.attn_pool.out");
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = ours.iter().zip(want.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
        println!("qwen_vl resampler: relative error {err:.2e}");
        assert!(err <= 1e-4, "{err}");
    }

    #[test]
    fn images_are_independent() {
        super::super::parity::check_images_are_independent("qwen_vl", &[[0; 3]; 2]);
    }

    #[test]
    fn config_is_checked() {
        let c = serde_json::json!({"visual": {"layers": 2, "width": 32, "heads": 4, "patch_size": 14,
            "image_size": 112, "output_dim": 256, "n_queries": 16}});
        let cfg = Config::from_json(&c).unwrap();
        assert_eq!((cfg.pool_heads(), cfg.n_queries), (2, 16));
        let mut bad = c.clone();
        bad["visual"]["n_queries"] = 15.into();
        assert!(Config::from_json(&bad).is_err());
        let mut bad = c;
        bad["visual"]["output_dim"] = 64.into();
        assert!(format!("{:#}", Config::from_json(&bad).unwrap_err()).contains("128"));
    }
}
