//! The building blocks every forward shares: a linear layer, and the hook through which each
//! linear is computed. Calibration implements [`LinearHook`] to see every linear's input (and to
//! substitute quantized weights); a plain forward uses [`Plain`].

use crate::device::Device;
use ndarray::{Array1, Array2, ArrayView2};

/// A linear layer's float weights: `y = x · weightᵀ + bias`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Array2<f32>,
    /// `[out]`.
    pub bias: Option<Array1<f32>>,
}

impl Linear {
    pub fn out_features(&self) -> usize {
        self.weight.nrows()
    }
    pub fn in_features(&self) -> usize {
        self.weight.ncols()
    }
    /// The float product, on `device`.
    pub fn forward(&self, device: &dyn Device, x: ArrayView2<f32>) -> Array2<f32> {
        device.linear_bias(x, self.weight.view(), self.bias.as_ref().map(|b| b.view()))
    }
}

/// How a forward computes each linear layer.
pub trait LinearHook {
    /// `name` is the module's name relative to its unit (`self_attn.q_proj`,
    /// `mlp.experts.3.up_proj`, `attn.qkv`); `x` is `[tokens, in]`.
    fn linear(&mut self, device: &dyn Device, name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32>;

    /// What attention module `module` (`self_attn`) puts in its KV cache for one sequence: the
    /// keys as cached (after their norm and RoPE) `[tokens, kv_heads · head_dim]` and the values
    /// `[tokens, kv_heads · v_head_dim]`. Calibration observes them (KV-cache quantization); a
    /// forward that simulates a quantized cache changes them in place. Default: nothing.
    fn kv_cache(&mut self, _module: &str, _k: &mut Array2<f32>, _v: &mut Array2<f32>) {}

    /// Offered the routed experts of MoE module `module` (`mlp.experts`) when the layer was built
    /// without them: `x` is the experts' input `[tokens, hidden]`, `routes[e]` the tokens routed to
    /// expert `e` with their weights. A hook that returns true takes the work over (calibration
    /// records it and adds the experts' weighted sum itself, streaming the experts in groups); the
    /// layer then adds nothing for them. Default: false (the layer fails: its experts are missing).
    fn defer_experts(&mut self, _module: &str, _x: ArrayView2<f32>, _routes: &[Vec<(usize, f32)>]) -> bool {
        false
    }

    /// Whether the hook needs nothing more from the current forward (a calibration pass that has
    /// already observed every input it gathers). A forward may then skip its remaining work, such
    /// as the attention scores, and return values of the right shape that mean nothing.
    /// Default: never.
    fn finished(&self) -> bool {
        false
    }
}

/// The float forward.
pub struct Plain;

impl LinearHook for Plain {
    fn linear(&mut self, device: &dyn Device, _name: &str, layer: &Linear, x: ArrayView2<f32>) -> Array2<f32> {
        layer.forward(device, x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Cpu;
    use ndarray::array;

    #[test]
    fn linear_adds_bias() {
        let l = Linear { weight: array![[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]], bias: Some(array![0.5, 0.0, -1.0]) };
        let y = Plain.linear(&Cpu, "x", &l, array![[1.0f32, 1.0]].view());
        assert_eq!(y, array![[3.5, -1.0, 2.5]]);
    }
}
