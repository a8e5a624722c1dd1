//! KV-cache C8: int8 K and V caches with one static scale and offset per KV channel
//! (`num_key_value_heads × head_dim` of them), calibrated on what the cache really holds.
//!
//! What the cache holds, read from the loaders: vLLM's attention layer receives the keys after the
//! model applied its per-head norm (Qwen3's `k_norm`) and RoPE, and vLLM-Ascend's C8 backend
//! (`attention/attention_v1.py`, `AscendC8AttentionBackendImpl._quantize_kv_to_int8`) quantizes
//! exactly those: `q = clamp(round(x / scale + offset), -128, 127)`, per channel. msModelSlim
//! calibrates at the same point (`processor/quant/attention.py` hooks `DynamicCache.update`, which
//! receives `key_states` after norm and RoPE). The values are the `v_proj` output as is.
//!
//! The convention is msModelSlim's per-channel min-max ([`act_range::minmax_range`] per channel):
//! symmetric `scale = max|x| / 127`, `offset = 0`; asymmetric `scale = (max - min) / 255`,
//! `offset = round(-min / scale) - 128`. vLLM-Ascend's decode dequantizes with the scale alone
//! ("Scale-only dequant"), so only symmetric C8 loads there; MindIE reads the offsets too.
//!
//! A forward that simulates C8 ([`KvCacheQuant::apply`]) rounds every cached key and value to its
//! int8 grid and back, `x̂ = (q - offset) · scale`: what decoding reads from the cache. (vLLM-Ascend
//! runs a fresh prompt's prefill attention on the float K and V and only later tokens on the int8
//! cache, so simulating every position is the pessimistic, decode-time view.)

use super::act_range;
use super::observer::ChannelStats;
use super::ActRange;
use ndarray::Array2;

/// One cache's (K's or V's) per-channel quantizers.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelQuant {
    pub scale: Vec<f32>,
    pub offset: Vec<f32>,
}

impl ChannelQuant {
    /// msModelSlim's min-max quantizer of every channel of `stats`; a channel never seen gets scale ε.
    pub fn from_stats(stats: &ChannelStats, symmetric: bool) -> ChannelQuant {
        let (scale, offset) = stats
            .min
            .iter()
            .zip(&stats.max)
            .map(|(&lo, &hi)| {
                let (lo, hi) = if lo > hi { (0.0, 0.0) } else { (lo, hi) };
                let r = act_range::minmax_range(lo, hi, symmetric);
                (r.scale, r.offset)
            })
            .unzip();
        ChannelQuant { scale, offset }
    }

    pub fn channels(&self) -> usize {
        self.scale.len()
    }

    /// Rounds every row of `x [tokens, channels]` to the int8 grid and back.
    pub fn apply(&self, x: &mut Array2<f32>) {
        assert_eq!(
            x.ncols(),
            self.channels(),
            "C8: the cache has {} channels, the scales {}",
            x.ncols(),
            self.channels()
        );
        for mut row in x.rows_mut() {
            for (j, v) in row.iter_mut().enumerate() {
                let r = ActRange { scale: self.scale[j], offset: self.offset[j] };
                *v = act_range::fake_quantize(*v, r);
            }
        }
    }
}

/// An attention layer's C8 quantizers.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheQuant {
    pub k: ChannelQuant,
    pub v: ChannelQuant,
}

impl KvCacheQuant {
    pub fn apply(&self, k: &mut Array2<f32>, v: &mut Array2<f32>) {
        self.k.apply(k);
        self.v.apply(v);
    }
}

/// Per-channel ranges of what an attention layer caches, over every calibration sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheStats {
    pub k: ChannelStats,
    pub v: ChannelStats,
}

impl KvCacheStats {
    pub fn new(k_channels: usize, v_channels: usize) -> KvCacheStats {
        KvCacheStats { k: ChannelStats::new(k_channels), v: ChannelStats::new(v_channels) }
    }

    pub fn update(&mut self, k: &Array2<f32>, v: &Array2<f32>) {
        self.k.update(k.view());
        self.v.update(v.view());
    }

    pub fn quantizer(&self, symmetric: bool) -> KvCacheQuant {
        KvCacheQuant {
            k: ChannelQuant::from_stats(&self.k, symmetric),
            v: ChannelQuant::from_stats(&self.v, symmetric),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn symmetric_scales_are_the_channel_absmax_over_127_and_round_trip_within_half_a_step() {
        let mut st = KvCacheStats::new(3, 2);
        let k = array![[1.0f32, -4.0, 0.5], [-2.54, 2.0, 0.25]];
        let v = array![[0.0f32, 3.0], [0.0, -1.0]];
        st.update(&k, &v);
        let q = st.quantizer(true);
        let want = [2.54f32 / 127.0, 4.0 / 127.0, 0.5 / 127.0];
        for (s, w) in q.k.scale.iter().zip(want) {
            assert!((s - w).abs() <= w * 1e-6, "{s} vs {w}");
        }
        assert_eq!(q.k.offset, vec![0.0; 3]);
        // A channel that only ever held 0 gets the smallest scale, and stays 0.
        assert_eq!(q.v.scale[0], f32::EPSILON);
        let (mut k2, mut v2) = (k.clone(), v.clone());
        q.apply(&mut k2, &mut v2);
        for ((a, b), j) in k.iter().zip(k2.iter()).zip([0, 1, 2, 0, 1, 2]) {
            assert!((a - b).abs() <= q.k.scale[j] / 2.0 + 1e-7, "{a} -> {b}");
            // The grid: an integer number of steps.
            let steps = b / q.k.scale[j];
            assert!((steps - steps.round()).abs() < 1e-3);
        }
        assert_eq!(v2[[0, 0]], 0.0);
        // The extremes are exact: ±127 steps.
        assert!((k2[[1, 0]] + 2.54).abs() < 1e-6 && (k2[[0, 1]] + 4.0).abs() < 1e-6);
    }

    #[test]
    fn asymmetric_scales_follow_msmodelslim_and_clip_outside_the_range() {
        let mut st = KvCacheStats::new(1, 1);
        st.update(&array![[1.0f32], [3.0]], &array![[-2.0f32], [-1.0]]);
        let q = st.quantizer(false);
        // min is clamped to 0 first: scale = (3 - 0) / 255, offset = round(0 / scale) - 128.
        assert!((q.k.scale[0] - 3.0 / 255.0).abs() < 1e-9);
        assert_eq!(q.k.offset[0], -128.0);
        // max clamped to 0: scale = 2 / 255, offset = round(2 / scale) - 128 = 127.
        assert!((q.v.scale[0] - 2.0 / 255.0).abs() < 1e-9);
        assert_eq!(q.v.offset[0], 127.0);
        // q = clamp(round(x / s + o), -128, 127), x̂ = (q - o) s: a value beyond the range clips to max.
        let mut k = array![[10.0f32], [1.5]];
        q.k.apply(&mut k);
        assert!((k[[0, 0]] - 3.0).abs() < 1e-5);
        assert!((k[[1, 0]] - 1.5).abs() <= q.k.scale[0] / 2.0 + 1e-6);
    }
}
