//! How long a run will take, for `lamina plan`: the arithmetic the run does, at the speed this
//! machine's GEMM and rounding reach now with the run's threads, and the bytes it reads.
//!
//! A data-free run reads every input byte once and rounds every quantized weight once; the reader
//! runs ahead of the work, so the slower of the two decides. A calibrated run adds, per decoder
//! layer, the forwards over every calibration token (observing the float layer, then the quantized
//! one, experts as routed; every expert in the first forward where the experts are held), attention,
//! the GPTQ Hessians and their solves; about half of its time is outside the GEMMs (attention's
//! softmax, norms, observers: measured on SmolLM2-135M), so its arithmetic is counted twice.

use super::plan::{Job, Plan};
use crate::device::Device;
use crate::model::layout::UnitKind;
use crate::quant::spec::WeightMethod;
use ndarray::Array2;
use std::time::Instant;

/// The read speed assumed for the checkpoint's disk.
pub const READ_BYTES_PER_S: f64 = 500e6;

#[derive(Debug, Clone)]
pub struct Estimate {
    pub seconds: f64,
    /// Floating-point operations of the forwards and GPTQ.
    pub flops: f64,
    /// GEMM speed measured now.
    pub gemm_flops_per_s: f64,
    /// Weights rounded a second, measured now.
    pub rounding_per_s: f64,
    pub compute_seconds: f64,
    pub read_seconds: f64,
    pub threads: usize,
}

/// Times `device`'s GEMM and the rounding for about a twentieth of a second each.
fn measure(device: &dyn Device) -> (f64, f64) {
    let n = 384;
    let a = Array2::from_shape_fn((n, n), |(i, j)| ((i * 7 + j * 3) % 13) as f32 - 6.0);
    let (mut runs, started) = (0u32, Instant::now());
    while runs < 2 || started.elapsed().as_secs_f64() < 0.05 {
        std::hint::black_box(device.matmul(a.view(), a.view()));
        runs += 1;
    }
    let gemm = runs as f64 * 2.0 * (n * n * n) as f64 / started.elapsed().as_secs_f64();
    let spec = crate::quant::QuantSpec::preset("w8a8_dynamic").expect("a preset");
    let w: Vec<f32> = a.iter().copied().cycle().take(1024 * 1024).collect();
    let (mut runs, started) = (0u32, Instant::now());
    while runs < 2 || started.elapsed().as_secs_f64() < 0.05 {
        std::hint::black_box(crate::quant::rtn::quantize(&w, 1024, 1024, &spec));
        runs += 1;
    }
    let rounding = runs as f64 * w.len() as f64 / started.elapsed().as_secs_f64();
    (gemm, rounding)
}

/// The estimate for `plan`; `calibration` is `(samples, tokens per sample)` for a calibrated run, and
/// `streamed(i)` says whether unit `i`'s experts stream (observing then skips them).
pub fn estimate(
    plan: &Plan,
    calibration: Option<(usize, usize)>,
    streamed: &dyn Fn(usize) -> bool,
    device: &dyn Device,
) -> Estimate {
    let (gemm, rounding) = measure(device);
    let mut rounded = 0f64;
    let mut flops = 0f64;
    let t = &plan.model.text;
    for (i, u) in plan.units.iter().enumerate() {
        let mut all = 0f64; // multiply-adds a token costs through every linear
        let mut routed = 0f64; // ... through the linears a token actually passes
        let mut experts = 0f64; // ... through every routed expert
        let mut gptq = 0f64;
        let top_k = t.moe.as_ref().map_or(1.0, |m| m.top_k as f64 / m.num_experts.max(1) as f64);
        for j in &u.jobs {
            if let Job::Quantize { weight, spec, .. } = j {
                let (rows, cols) = (weight.meta.shape[0] as f64, weight.meta.shape[1] as f64);
                rounded += rows * cols;
                let expert = weight.name().contains(".mlp.experts.");
                all += rows * cols;
                experts += if expert { rows * cols } else { 0.0 };
                routed += rows * cols * if expert { top_k } else { 1.0 };
                if spec.weight_method == WeightMethod::Gptq {
                    // Error propagation over the columns, and the Hessian's factorization.
                    gptq += 2.0 * rows * cols * cols + cols * cols * cols;
                }
            }
        }
        let Some((samples, seq)) = calibration else { continue };
        let tokens = (samples * seq) as f64;
        flops += match u.unit.kind {
            UnitKind::TextLayer(_) => {
                // Observing runs every expert on every token, or none where they stream.
                let first = if streamed(i) { all - experts } else { all };
                let attention = 4.0 * (seq * seq) as f64 * (t.num_heads * t.head_dim) as f64 * samples as f64;
                // Hessians: one Gram product per distinct input; counted for every GPTQ linear.
                2.0 * tokens * (first + routed) + 2.0 * attention + gptq
            }
            UnitKind::VisionBlock(_) | UnitKind::VisionPost => {
                // About 1024 patches an image, as the memory plan counts them.
                2.0 * 2.0 * 1024.0 * samples as f64 * all + gptq
            }
            _ => 0.0,
        };
    }
    let non_gemm = if calibration.is_some() { 2.0 } else { 1.0 };
    let compute_seconds = non_gemm * flops / gemm + rounded / rounding;
    let read_seconds = plan.bytes_in() as f64 / READ_BYTES_PER_S;
    Estimate {
        seconds: compute_seconds.max(read_seconds),
        flops,
        gemm_flops_per_s: gemm,
        rounding_per_s: rounding,
        compute_seconds,
        read_seconds,
        threads: crate::device::threads(),
    }
}

/// `1 h 05 min`, `12 min`, `40 s`.
pub fn duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..=119 => format!("{s} s"),
        120..=3599 => format!("{} min", (s + 30) / 60),
        _ => format!("{} h {:02} min", s / 3600, (s % 3600 + 30) / 60),
    }
}

impl Estimate {
    /// The plan's line.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "about {} on {} thread{} (arithmetic {}",
            duration(self.seconds),
            self.threads,
            if self.threads == 1 { "" } else { "s" },
            duration(self.compute_seconds)
        );
        if self.flops > 0.0 {
            s.push_str(&format!(
                ": {:.1} TFLOP at {:.0} GFLOP/s measured now, counted twice for the work outside the GEMMs",
                self.flops / 1e12,
                self.gemm_flops_per_s / 1e9
            ));
        } else {
            s.push_str(&format!(": rounding {:.0} M weights/s measured now", self.rounding_per_s / 1e6));
        }
        s.push_str(&format!(
            "; reading the checkpoint {} at {:.0} MB/s; the slower decides)",
            duration(self.read_seconds),
            READ_BYTES_PER_S / 1e6
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_naturally() {
        assert_eq!(super::duration(40.4), "40 s");
        assert_eq!(super::duration(725.0), "12 min");
        assert_eq!(super::duration(3900.0), "1 h 05 min");
    }
}
