//! M-RoPE position ids for mixed text and image sequences, as the Qwen VL models compute them
//! (`get_rope_index`): text tokens count up on all three axes; the tokens of an image (or video)
//! take (temporal, row, column) ids on its merged grid, offset by the position where it starts;
//! the text after it resumes at one past the largest id so far.

use crate::model::layout::Family;
use crate::model::Model;
use anyhow::{bail, Context, Result};
use ndarray::Array2;

/// How a family numbers the temporal axis of a video.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TemporalIds {
    /// Qwen2-VL: the frame's index.
    FrameIndex,
    /// Qwen2.5-VL: the frame's time, `index · second_per_grid_t · tokens_per_second`, truncated.
    Seconds { tokens_per_second: f64 },
    /// Qwen3-VL: every frame is its own grid of one frame (timestamps are text tokens).
    PerFrame,
}

#[derive(Debug, Clone)]
pub struct RopeIndex {
    pub temporal: TemporalIds,
    pub spatial_merge_size: usize,
    pub image_token_id: i64,
    pub video_token_id: Option<i64>,
    pub vision_start_token_id: i64,
}

impl RopeIndex {
    pub fn from_model(model: &Model) -> Result<RopeIndex> {
        let c = &model.config;
        let id = |k: &str| c.get(k).or_else(|| c.get("text_config").and_then(|t| t.get(k))).and_then(|v| v.as_i64());
        let vision = crate::model::config::vision_view(c).context("config.json has no vision_config")?;
        let temporal = match model.family {
            Family::Qwen2Vl => TemporalIds::FrameIndex,
            Family::Qwen25Vl => {
                TemporalIds::Seconds { tokens_per_second: vision.f64(&["tokens_per_second"])?.unwrap_or(4.0) }
            }
            // GLM-4.1V: frames are images of their own, separated by timestamp text.
            Family::Qwen3Vl | Family::Qwen3VlMoe | Family::Glm4v | Family::Glm4vMoe => TemporalIds::PerFrame,
            other => bail!("{} has no M-RoPE position ids", other.model_type()),
        };
        Ok(RopeIndex {
            temporal,
            spatial_merge_size: vision.opt_usize(&["spatial_merge_size"])?.unwrap_or(2),
            image_token_id: id("image_token_id").context("config.json has no image_token_id")?,
            video_token_id: id("video_token_id"),
            // GLM-4.1V opens an image with `<|begin_of_image|>` (image_start_token_id).
            vision_start_token_id: id("vision_start_token_id")
                .or_else(|| id("image_start_token_id"))
                .context("config.json has neither vision_start_token_id nor image_start_token_id")?,
        })
    }

    /// Position ids `[3, tokens]` for one sequence (no padding) and the rope delta
    /// (`max + 1 - tokens`). `second_per_grid_ts` (Qwen2.5-VL videos) defaults to 1 per video.
    pub fn get_rope_index(
        &self,
        input_ids: &[i64],
        image_grid_thw: &[[usize; 3]],
        video_grid_thw: &[[usize; 3]],
        second_per_grid_ts: &[f64],
    ) -> Result<(Array2<i64>, i64)> {
        let n = input_ids.len();
        let mut videos: Vec<([usize; 3], f64)> = video_grid_thw
            .iter()
            .enumerate()
            .map(|(i, &g)| (g, second_per_grid_ts.get(i).copied().unwrap_or(1.0)))
            .collect();
        if self.temporal == TemporalIds::PerFrame {
            videos = videos.into_iter().flat_map(|([t, h, w], s)| std::iter::repeat_n(([1, h, w], s), t)).collect();
        }
        let is_video = |t: i64| Some(t) == self.video_token_id;
        // Vision items are counted by the token after each vision-start token.
        let (mut images_left, mut videos_left) = (0usize, 0usize);
        for (i, &t) in input_ids.iter().enumerate() {
            if t == self.vision_start_token_id {
                match input_ids.get(i + 1) {
                    Some(&next) if next == self.image_token_id => images_left += 1,
                    Some(&next) if is_video(next) => videos_left += 1,
                    _ => {}
                }
            }
        }
        if images_left > image_grid_thw.len() || videos_left > videos.len() {
            bail!(
                "the sequence has {images_left} images and {videos_left} videos, image_grid_thw describes {} and video_grid_thw {}",
                image_grid_thw.len(),
                videos.len()
            );
        }

        let mut ids: [Vec<i64>; 3] = Default::default();
        let mut next = 0i64; // one past the largest id so far
        let push_text = |ids: &mut [Vec<i64>; 3], next: &mut i64, len: usize| {
            for axis in ids.iter_mut() {
                axis.extend((0..len as i64).map(|k| *next + k));
            }
            *next += len as i64;
        };
        let find =
            |token: i64, from: usize| input_ids[from.min(n)..].iter().position(|&t| t == token).map(|p| p + from);
        let (mut image, mut video, mut st) = (0, 0, 0);
        for _ in 0..images_left + videos_left {
            let ed_image = if images_left > 0 { find(self.image_token_id, st) } else { None };
            let ed_video = match self.video_token_id {
                Some(v) if videos_left > 0 => find(v, st),
                _ => None,
            };
            let (ed, [t, h, w], seconds) = match (ed_image, ed_video) {
                (Some(i), v) if v.is_none_or(|v| i < v) => {
                    image += 1;
                    images_left -= 1;
                    (i, image_grid_thw[image - 1], 0.0)
                }
                (_, Some(v)) => {
                    video += 1;
                    videos_left -= 1;
                    (v, videos[video - 1].0, videos[video - 1].1)
                }
                _ => {
                    bail!("a vision-start token at or after position {st} is not followed by its image or video tokens")
                }
            };
            let m = self.spatial_merge_size;
            let (gt, gh, gw) = (t, h / m, w / m);
            let token = input_ids[ed];
            if input_ids.get(ed..ed + gt * gh * gw).is_none_or(|run| run.iter().any(|&x| x != token)) {
                bail!(
                    "the grid {:?} needs {} tokens {token} from position {ed}, the sequence has fewer: the image tokens do not match the grids",
                    [t, h, w],
                    gt * gh * gw
                );
            }
            push_text(&mut ids, &mut next, ed - st);
            let base = next;
            let mut largest = base;
            for f in 0..gt {
                let tid = match self.temporal {
                    TemporalIds::Seconds { tokens_per_second } => (f as f64 * seconds * tokens_per_second) as i64,
                    TemporalIds::FrameIndex | TemporalIds::PerFrame => f as i64,
                };
                for r in 0..gh {
                    for c in 0..gw {
                        let p = [base + tid, base + r as i64, base + c as i64];
                        for (axis, v) in ids.iter_mut().zip(p) {
                            axis.push(v);
                            largest = largest.max(v);
                        }
                    }
                }
            }
            next = largest + 1;
            st = ed + gt * gh * gw;
        }
        if st < n {
            push_text(&mut ids, &mut next, n - st);
        }
        if ids[0].len() != n {
            bail!(
                "the image grids cover {} positions but the sequence has {n} tokens: the image tokens do not match image_grid_thw",
                ids[0].len()
            );
        }
        let delta = next - n as i64;
        let flat: Vec<i64> = ids.concat();
        Ok((Array2::from_shape_vec((3, n), flat)?, delta))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn index(temporal: TemporalIds) -> RopeIndex {
        RopeIndex {
            temporal,
            spatial_merge_size: 2,
            image_token_id: 9,
            video_token_id: Some(8),
            vision_start_token_id: 7,
        }
    }

    #[test]
    fn text_only_counts_up() {
        let (p, d) = index(TemporalIds::FrameIndex).get_rope_index(&[1, 2, 3], &[], &[], &[]).unwrap();
        assert_eq!(p, array![[0, 1, 2], [0, 1, 2], [0, 1, 2]]);
        assert_eq!(d, 0);
    }

    #[test]
    fn image_between_text_by_hand() {
        // t t <start> [2×2 merged grid] <end> t: the image starts at 3; text resumes at 3 + 2.
        let ids = [1, 1, 7, 9, 9, 9, 9, 6, 1];
        let (p, d) = index(TemporalIds::FrameIndex).get_rope_index(&ids, &[[1, 4, 4]], &[], &[]).unwrap();
        assert_eq!(p, array![[0, 1, 2, 3, 3, 3, 3, 5, 6], [0, 1, 2, 3, 3, 4, 4, 5, 6], [0, 1, 2, 3, 4, 3, 4, 5, 6]]);
        assert_eq!(d, 7 - 9);
        assert!(index(TemporalIds::FrameIndex).get_rope_index(&ids, &[[1, 4, 6]], &[], &[]).is_err());
        assert!(index(TemporalIds::FrameIndex).get_rope_index(&ids, &[], &[], &[]).is_err());
    }

    #[test]
    fn qwen2_5_video_times_follow_the_docstring_example() {
        // transformers' docstring: 3 temporal patches of 2×2 merged patches, 25 tokens per second
        // and 2 s per grid step give temporal ids 0, 50, 100 and text from 101.
        let mut ids = vec![7];
        ids.extend([8; 12]);
        ids.extend([6, 1]);
        let (p, _) = index(TemporalIds::Seconds { tokens_per_second: 25.0 })
            .get_rope_index(&ids, &[], &[[3, 4, 4]], &[2.0])
            .unwrap();
        let t: Vec<i64> = p.row(0).iter().map(|&v| v - 1).collect();
        assert_eq!(&t[1..13], &[0, 0, 0, 0, 50, 50, 50, 50, 100, 100, 100, 100]);
        assert_eq!(p.row(1).iter().skip(1).take(4).copied().collect::<Vec<_>>(), vec![1, 1, 2, 2]);
        assert_eq!(p.column(13).to_vec(), vec![102, 102, 102]);
    }

    #[test]
    fn qwen3_splits_videos_into_frames() {
        // Two frames, each its own <start> grid <end>; the second frame's ids restart at 0 in
        // time and follow the first frame's end.
        let ids = [7, 8, 6, 7, 8, 6];
        let (p, _) = index(TemporalIds::PerFrame).get_rope_index(&ids, &[], &[[2, 2, 2]], &[]).unwrap();
        assert_eq!(p, array![[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]);
        let (p, _) = index(TemporalIds::FrameIndex).get_rope_index(&[7, 8, 8, 6], &[], &[[2, 2, 2]], &[]).unwrap();
        assert_eq!(p.row(0).to_vec(), vec![0, 1, 2, 3]);
    }
}
