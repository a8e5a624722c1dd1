//! Deterministic random data for the calibration algorithms' tests (no rand crate in the tree).

use ndarray::Array2;

/// SplitMix64: tiny, fast, and good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Laplace with unit scale: heavier tails, like real activations.
    pub fn laplace(&mut self) -> f32 {
        let u = self.uniform() - 0.5;
        (-u.signum() * (1.0 - 2.0 * u.abs()).max(1e-300).ln()) as f32
    }

    pub fn normal_matrix(&mut self, rows: usize, cols: usize, std: f32) -> Array2<f32> {
        Array2::from_shape_fn((rows, cols), |_| self.normal() * std)
    }
}
