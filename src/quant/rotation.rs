//! Rotations for QuaRot (Ashkboos et al. 2024): orthogonal matrices `Q` folded into weights so
//! that the float model is unchanged while activations lose their outlier channels.
//!
//! **Randomized Hadamard matrices.** `Q = D · H / √n` with `D` a diagonal of random signs (seeded,
//! so every unit of a streamed run builds the same `Q`) and `H` a Hadamard matrix (`±1` entries,
//! `H Hᵀ = n I`) of order `n = m · 2^k`: `H = H_m ⊗ H_{2^k}`, `H_{2^k}` Sylvester's
//! (`H_{2j} = [[H_j, H_j], [H_j, −H_j]]`) and `H_m` from Paley's constructions for `m = q + 1`
//! (`q` a prime ≡ 3 mod 4, construction I) or `m = 2(q + 1)` (`q` a prime ≡ 1 mod 4,
//! construction II). That covers the hidden sizes of the families lamina reads (576 = 36·16,
//! 896 = 28·32, 3584 = 28·128, 5120 = 20·256, 7168 = 28·256, powers of two); for an order with no
//! such factorisation lamina says so and uses a random orthogonal matrix (QR of a Gaussian), which
//! QuaRot's analysis also covers, only spreading outliers less evenly.
//!
//! **Block-diagonal rotations** (msModelSlim's `block_size`): one randomized Hadamard of the block's
//! order repeated along the diagonal.
//!
//! **Applying them** costs `O(n log n)` per row, never a dense `n × n` product: `x Q` is the signs,
//! then a fast Walsh–Hadamard transform along the `2^k` axis and a small `m × m` product
//! (`x (A ⊗ B) = vec(Aᵀ X B)` for `x = vec(X)`, `X` of shape `m × 2^k`). A linear reading the rotated
//! residual `x Q` takes `W Q` ([`rotate_input`]); one writing it takes `Qᵀ W`, `Qᵀ b`
//! ([`rotate_output`]).

use crate::model::nn::Linear;
use anyhow::{bail, ensure, Result};
use ndarray::{Array1, Array2, Axis};
use rayon::prelude::*;

/// An orthogonal `n × n` matrix `Q`, stored in factored form.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotation {
    n: usize,
    form: Form,
}

#[derive(Debug, Clone, PartialEq)]
enum Form {
    /// `D (H_m ⊗ H_p) / √(m p)`, repeated `n / (m p)` times along the diagonal.
    Hadamard { signs: Vec<f32>, base: Option<Array2<f32>>, m: usize, p: usize },
    /// A dense orthogonal matrix (no Hadamard matrix of this order is known to lamina).
    Dense(Array2<f32>),
}

/// Which construction a rotation used, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A randomized Hadamard matrix of order `m · 2^k` (block of that order when block-diagonal).
    Hadamard { m: usize, pow2: usize },
    /// A random orthogonal matrix.
    RandomOrthogonal,
}

impl Rotation {
    /// The randomized Hadamard rotation of order `n` (a random orthogonal one when no Hadamard
    /// matrix of that order can be built; see [`Rotation::kind`]).
    pub fn new(n: usize, seed: u64) -> Rotation {
        Rotation::block_diagonal(n, n, seed).expect("a block of the whole order always fits")
    }

    /// `n / block` copies of the randomized Hadamard rotation of order `block` along the diagonal.
    pub fn block_diagonal(n: usize, block: usize, seed: u64) -> Result<Rotation> {
        ensure!(block > 0 && n % block == 0, "a rotation of order {n} cannot be made of blocks of {block}");
        let mut rng = SplitMix(seed);
        let form = match hadamard_factors(block) {
            Some((m, p)) => Form::Hadamard {
                signs: (0..block).map(|_| if rng.next() & 1 == 1 { 1.0 } else { -1.0 }).collect(),
                base: (m > 1).then(|| hadamard_base(m).expect("hadamard_factors only returns buildable orders")),
                m,
                p,
            },
            None => {
                if block != n {
                    bail!("no Hadamard matrix of order {block} is known to lamina; choose another block size");
                }
                Form::Dense(random_orthogonal(n, &mut rng))
            }
        };
        Ok(Rotation { n, form })
    }

    pub fn order(&self) -> usize {
        self.n
    }

    pub fn kind(&self) -> Kind {
        match &self.form {
            Form::Hadamard { m, p, .. } => Kind::Hadamard { m: *m, pow2: *p },
            Form::Dense(_) => Kind::RandomOrthogonal,
        }
    }

    /// `x ← x Q` for every row of `rows` (row-major, `n` columns).
    pub fn apply_rows(&self, rows: &mut [f32]) {
        self.apply(rows, false)
    }

    /// `x ← x Qᵀ` for every row of `rows`.
    pub fn apply_rows_transposed(&self, rows: &mut [f32]) {
        self.apply(rows, true)
    }

    fn apply(&self, rows: &mut [f32], transposed: bool) {
        let n = self.n;
        assert_eq!(rows.len() % n.max(1), 0, "rows of {n} values expected");
        match &self.form {
            Form::Dense(q) => {
                let x = ndarray::ArrayView2::from_shape((rows.len() / n, n), &*rows).expect("row-major rows");
                let y = if transposed { x.dot(&q.t()) } else { x.dot(q) };
                rows.copy_from_slice(y.as_standard_layout().as_slice().expect("standard layout"));
            }
            Form::Hadamard { signs, base, m, p } => {
                let block = m * p;
                let norm = 1.0 / (block as f32).sqrt();
                rows.par_chunks_mut(block).for_each_init(
                    || vec![0f32; block],
                    |tmp, x| {
                        if !transposed {
                            x.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
                        }
                        // X (m × p) ← X H_p: a Walsh–Hadamard transform of every row of X.
                        for r in x.chunks_mut(*p) {
                            fwht(r);
                        }
                        // X ← Aᵀ X (or A X for the transpose, H_p being symmetric).
                        if let Some(a) = base {
                            tmp.fill(0.0);
                            for c in 0..*m {
                                for k in 0..*m {
                                    let coef = if transposed { a[(c, k)] } else { a[(k, c)] };
                                    if coef != 0.0 {
                                        let src = &x[k * p..(k + 1) * p];
                                        for (t, &v) in tmp[c * p..(c + 1) * p].iter_mut().zip(src) {
                                            *t += coef * v;
                                        }
                                    }
                                }
                            }
                            x.copy_from_slice(tmp);
                        }
                        x.iter_mut().for_each(|v| *v *= norm);
                        if transposed {
                            x.iter_mut().zip(signs).for_each(|(v, s)| *v *= s);
                        }
                    },
                );
            }
        }
    }

    /// `Q` as a dense matrix (tests, and the `global_rotation` file loaders read).
    pub fn matrix(&self) -> Array2<f32> {
        let mut q = Array2::<f32>::eye(self.n);
        self.apply_rows(q.as_slice_mut().expect("standard layout"));
        q
    }
}

/// In-place Walsh–Hadamard transform of a power-of-two length: `x ← x H` (Sylvester order).
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for i in (0..n).step_by(2 * h) {
            for j in i..i + h {
                let (a, b) = (x[j], x[j + h]);
                x[j] = a + b;
                x[j + h] = a - b;
            }
        }
        h *= 2;
    }
}

/// `(m, 2^k)` with `m · 2^k = n` and a Hadamard matrix of order `m` buildable, the power of two as
/// large as possible; `None` when there is none.
pub fn hadamard_factors(n: usize) -> Option<(usize, usize)> {
    if n == 0 {
        return None;
    }
    let mut p = 1usize << n.trailing_zeros();
    while p >= 1 {
        let m = n / p;
        if m == 1 || hadamard_base(m).is_some() {
            return Some((m, p));
        }
        p /= 2;
    }
    None
}

/// A Hadamard matrix of order `m` from Paley's constructions, or `None` when `m` is not `q + 1`
/// (`q` prime, ≡ 3 mod 4) nor `2(q + 1)` (`q` prime, ≡ 1 mod 4).
pub fn hadamard_base(m: usize) -> Option<Array2<f32>> {
    if m == 1 {
        return Some(Array2::ones((1, 1)));
    }
    if m == 2 {
        return Some(ndarray::array![[1.0, 1.0], [1.0, -1.0]]);
    }
    if m % 4 != 0 {
        return None;
    }
    let q = m - 1;
    if is_prime(q) && q % 4 == 3 {
        return Some(paley_one(q));
    }
    let q = m / 2 - 1;
    if is_prime(q) && q % 4 == 1 {
        return Some(paley_two(q));
    }
    None
}

fn is_prime(q: usize) -> bool {
    q >= 2 && (2..).take_while(|d| d * d <= q).all(|d| q % d != 0)
}

/// The quadratic character of `GF(q)`, `q` prime: 0, 1 for squares, -1 otherwise.
fn chi(a: usize, q: usize) -> f32 {
    let a = a % q;
    if a == 0 {
        return 0.0;
    }
    if (1..q).any(|x| x * x % q == a) {
        1.0
    } else {
        -1.0
    }
}

/// The Jacobsthal matrix `Q_ij = χ(j − i)`.
fn jacobsthal(q: usize) -> Array2<f32> {
    Array2::from_shape_fn((q, q), |(i, j)| chi(j + q - i, q))
}

/// Paley I, order `q + 1`: `H = I + S`, `S = [[0, 1ᵀ], [−1, Q]]`.
fn paley_one(q: usize) -> Array2<f32> {
    let jq = jacobsthal(q);
    Array2::from_shape_fn((q + 1, q + 1), |(i, j)| {
        let s = match (i, j) {
            (0, 0) => 0.0,
            (0, _) => 1.0,
            (_, 0) => -1.0,
            _ => jq[(i - 1, j - 1)],
        };
        s + if i == j { 1.0 } else { 0.0 }
    })
}

/// Paley II, order `2(q + 1)`: `C = [[0, 1ᵀ], [1, Q]]`, `H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]`.
fn paley_two(q: usize) -> Array2<f32> {
    let jq = jacobsthal(q);
    let c = |i: usize, j: usize| match (i, j) {
        (0, 0) => 0.0,
        (0, _) | (_, 0) => 1.0,
        _ => jq[(i - 1, j - 1)],
    };
    let n = 2 * (q + 1);
    Array2::from_shape_fn((n, n), |(i, j)| {
        let (bi, bj, a, b) = (i / 2, j / 2, i % 2, j % 2);
        let plus = [[1.0, 1.0], [1.0, -1.0]][a][b];
        let diag = if bi == bj { [[1.0, -1.0], [-1.0, -1.0]][a][b] } else { 0.0 };
        c(bi, bj) * plus + diag
    })
}

/// A random orthogonal matrix: Gram–Schmidt (twice, in f64) on Gaussian columns.
fn random_orthogonal(n: usize, rng: &mut SplitMix) -> Array2<f32> {
    let mut cols: Vec<Vec<f64>> = (0..n).map(|_| (0..n).map(|_| rng.normal()).collect()).collect();
    for i in 0..n {
        for _ in 0..2 {
            for j in 0..i {
                let d: f64 = cols[i].iter().zip(&cols[j]).map(|(a, b)| a * b).sum();
                let cj = cols[j].clone();
                cols[i].iter_mut().zip(&cj).for_each(|(a, b)| *a -= d * b);
            }
        }
        let norm = cols[i].iter().map(|a| a * a).sum::<f64>().sqrt();
        cols[i].iter_mut().for_each(|a| *a /= norm);
    }
    Array2::from_shape_fn((n, n), |(i, j)| cols[j][i] as f32)
}

/// SplitMix64: the seeded randomness of the signs.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn normal(&mut self) -> f64 {
        let u1 = ((self.next() >> 11) as f64 / (1u64 << 53) as f64).max(1e-300);
        let u2 = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// A linear that reads the rotated input `x Q`: `W ← W Q`.
pub fn rotate_input(l: &mut Linear, q: &Rotation) -> Result<()> {
    ensure!(
        l.in_features() == q.order(),
        "a linear reading {} channels, a rotation of order {}",
        l.in_features(),
        q.order()
    );
    let w = l.weight.as_slice_mut().expect("weights are in standard layout");
    q.apply_rows(w);
    Ok(())
}

/// A linear whose output becomes `y Q`: `W ← Qᵀ W`, `b ← Qᵀ b`.
pub fn rotate_output(l: &mut Linear, q: &Rotation) -> Result<()> {
    ensure!(
        l.out_features() == q.order(),
        "a linear writing {} channels, a rotation of order {}",
        l.out_features(),
        q.order()
    );
    let mut t = l.weight.t().as_standard_layout().into_owned();
    q.apply_rows(t.as_slice_mut().expect("standard layout"));
    l.weight = t.t().as_standard_layout().into_owned();
    if let Some(b) = &mut l.bias {
        q.apply_rows(b.as_slice_mut().expect("contiguous"));
    }
    Ok(())
}

/// A table whose rows feed the rotated stream (token embeddings): `E ← E Q`.
pub fn rotate_rows(table: &mut Array2<f32>, q: &Rotation) -> Result<()> {
    ensure!(table.ncols() == q.order(), "a table of {} columns, a rotation of order {}", table.ncols(), q.order());
    if !table.is_standard_layout() {
        *table = table.as_standard_layout().into_owned();
    }
    q.apply_rows(table.as_slice_mut().expect("standard layout"));
    Ok(())
}

/// Per-head rotation of attention values: `v_proj`'s output head by head becomes `v_h Q_h`
/// (`W_v ← blockdiag(Q_hᵀ) W_v`), and `o_proj` reads every query head's context through `Q_h`
/// (`W_o ← W_o blockdiag(Q_h)`). Attention mixes value rows with scalar weights, so
/// `softmax(·) (V Q_h) = (softmax(·) V) Q_h` and the product is unchanged, under grouped-query
/// attention too (each query head reads its key/value head's rotated values).
pub fn rotate_heads(v: &mut Linear, o: &mut Linear, q: &Rotation, num_heads: usize, num_kv_heads: usize) -> Result<()> {
    let d = q.order();
    ensure!(
        v.out_features() == num_kv_heads * d,
        "v_proj writes {} channels, not {num_kv_heads} heads of {d}",
        v.out_features()
    );
    ensure!(
        o.in_features() == num_heads * d,
        "o_proj reads {} channels, not {num_heads} heads of {d}",
        o.in_features()
    );
    // v: rows of each head block are rotated as columns: transpose, rotate rows of d, back.
    let mut t = v.weight.t().as_standard_layout().into_owned();
    q.apply_rows(t.as_slice_mut().expect("standard layout"));
    v.weight = t.t().as_standard_layout().into_owned();
    if let Some(b) = &mut v.bias {
        q.apply_rows(b.as_slice_mut().expect("contiguous"));
    }
    // o: each row is num_heads chunks of d inputs.
    q.apply_rows(o.weight.as_slice_mut().expect("weights are in standard layout"));
    Ok(())
}

/// Folds an RMSNorm's weight `g` (and a bias `β`, if any) into the linears reading its output,
/// leaving the norm a plain `x / rms(x)` (weight 1, no bias): `W ← W diag(g)`, `b ← b + W β`. The
/// norm then commutes with any rotation of its input, `n(x Q) = n(x) Q`.
pub fn fuse_norm(
    norm_weight: &mut Array1<f32>,
    norm_bias: &mut Option<Array1<f32>>,
    linears: &mut [&mut Linear],
) -> Result<()> {
    let n = norm_weight.len();
    for (i, l) in linears.iter().enumerate() {
        ensure!(l.in_features() == n, "linear {i} reads {} channels, the norm has {n}", l.in_features());
    }
    for l in linears.iter_mut() {
        if let Some(beta) = norm_bias.as_ref() {
            let wb = l.weight.dot(beta);
            match &mut l.bias {
                Some(b) => *b += &wb,
                None => l.bias = Some(wb),
            }
        }
        for mut row in l.weight.axis_iter_mut(Axis(0)) {
            row.iter_mut().zip(norm_weight.iter()).for_each(|(w, &g)| *w *= g);
        }
    }
    norm_weight.fill(1.0);
    *norm_bias = None;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::testutil::Rng;

    fn max_abs(a: &Array2<f32>) -> f32 {
        a.iter().fold(0f32, |m, v| m.max(v.abs()))
    }

    #[test]
    fn paley_and_sylvester_orders_are_hadamard() {
        // Every order a real hidden size or head needs, and each construction.
        for m in [1usize, 2, 4, 8, 12, 20, 28, 36, 44, 60, 68, 76, 108, 124, 140] {
            let h = hadamard_base(m).or_else(|| (m.is_power_of_two()).then(|| Rotation::new(m, 0).matrix()));
            let h = h.unwrap_or_else(|| panic!("order {m}"));
            if hadamard_base(m).is_some() {
                assert!(h.iter().all(|&v| v == 1.0 || v == -1.0), "order {m}: entries are ±1");
                let hh = h.dot(&h.t());
                assert_eq!(hh, Array2::<f32>::eye(m) * m as f32, "order {m}: H Hᵀ = m I");
            }
        }
        assert!(hadamard_base(52).is_none() && hadamard_base(10).is_none());
        for (n, want) in [
            (576, (36, 16)),
            (896, (28, 32)),
            (3584, (28, 128)),
            (5120, (20, 256)),
            (4096, (1, 4096)),
            (1152, (36, 32)),
        ] {
            assert_eq!(hadamard_factors(n), Some(want), "{n}");
        }
        assert_eq!(hadamard_factors(9), None);
    }

    #[test]
    fn rotations_are_orthogonal_and_fast_products_match_dense_ones() {
        let mut rng = Rng::new(61);
        for (n, block) in [(64, 64), (576, 576), (80, 80), (96, 32), (9, 9), (50, 50)] {
            let q = Rotation::block_diagonal(n, block, 7).unwrap();
            let qm = q.matrix();
            let err = max_abs(&(qm.t().dot(&qm) - Array2::<f32>::eye(n)));
            assert!(err < 1e-5, "order {n} block {block}: QᵀQ − I = {err}");
            let expect_dense = hadamard_factors(block).is_none();
            assert_eq!(q.kind() == Kind::RandomOrthogonal, expect_dense, "{n}");
            let x = rng.normal_matrix(5, n, 1.0);
            let mut y = x.clone();
            q.apply_rows(y.as_slice_mut().unwrap());
            assert!(max_abs(&(&y - &x.dot(&qm))) < 1e-4 * max_abs(&x) * n as f32 / 8.0);
            let mut z = x.clone();
            q.apply_rows_transposed(z.as_slice_mut().unwrap());
            assert!(max_abs(&(&z - &x.dot(&qm.t()))) < 1e-4 * max_abs(&x) * n as f32 / 8.0);
            if block < n {
                // Block-diagonal: zero outside the diagonal blocks, the same block repeated.
                assert_eq!(qm[(0, block)], 0.0);
                assert_eq!(qm[(block, block + 1)], qm[(0, 1)]);
            }
        }
        // The seed decides the signs: the same seed gives the same matrix, another seed another.
        assert_eq!(Rotation::new(64, 3), Rotation::new(64, 3));
        assert_ne!(Rotation::new(64, 3).matrix(), Rotation::new(64, 4).matrix());
        assert!(Rotation::block_diagonal(64, 24, 1).is_err());
    }

    fn rms_norm(x: &Array2<f32>, g: &Array1<f32>) -> Array2<f32> {
        let mut y = x.clone();
        for mut row in y.rows_mut() {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + 1e-6).sqrt();
            row.iter_mut().zip(g).for_each(|(v, &w)| *v *= inv * w);
        }
        y
    }

    fn apply(l: &Linear, x: &Array2<f32>) -> Array2<f32> {
        let mut y = x.dot(&l.weight.t());
        if let Some(b) = &l.bias {
            y += b;
        }
        y
    }

    /// residual x → RMSNorm(g) → W1 (reads) → … → W2 (writes) → x + y: rotating the residual with
    /// the norm fused leaves the block's output the same, rotated.
    #[test]
    fn fused_norm_and_rotation_leave_a_residual_block_unchanged() {
        let mut rng = Rng::new(62);
        let (tokens, n, inner) = (12, 36, 20);
        let x = rng.normal_matrix(tokens, n, 1.0);
        let mut g = Array1::from_shape_fn(n, |j| 0.5 + j as f32 / n as f32);
        let mut read = Linear { weight: rng.normal_matrix(inner, n, 0.3), bias: Some(Array1::from_elem(inner, 0.1)) };
        let mut write = Linear { weight: rng.normal_matrix(n, inner, 0.3), bias: Some(Array1::from_elem(n, -0.2)) };
        let block = |x: &Array2<f32>, g: &Array1<f32>, r: &Linear, w: &Linear| {
            x + &apply(w, &apply(r, &rms_norm(x, g)).mapv(f32::tanh))
        };
        let y0 = block(&x, &g, &read, &write);
        let q = Rotation::new(n, 11);
        fuse_norm(&mut g, &mut None, &mut [&mut read]).unwrap();
        assert!(g.iter().all(|&v| v == 1.0));
        rotate_input(&mut read, &q).unwrap();
        rotate_output(&mut write, &q).unwrap();
        let qm = q.matrix();
        let y1 = block(&x.dot(&qm), &g, &read, &write);
        let err = max_abs(&(&y1 - &y0.dot(&qm)));
        assert!(err < 1e-4 * max_abs(&y0), "{err}");
    }

    #[test]
    fn head_rotation_leaves_grouped_query_attention_unchanged() {
        let mut rng = Rng::new(63);
        let (tokens, hidden, d, nh, nkv) = (10, 16, 8, 4, 2);
        let x = rng.normal_matrix(tokens, hidden, 1.0);
        let mut v =
            Linear { weight: rng.normal_matrix(nkv * d, hidden, 0.3), bias: Some(Array1::from_elem(nkv * d, 0.3)) };
        let mut o = Linear { weight: rng.normal_matrix(hidden, nh * d, 0.3), bias: None };
        let p: Vec<Array2<f32>> = (0..nh)
            .map(|_| {
                let mut m =
                    Array2::from_shape_fn((tokens, tokens), |(t, s)| if s <= t { rng.normal().exp() } else { 0.0 });
                for mut row in m.rows_mut() {
                    let s = row.sum();
                    row /= s;
                }
                m
            })
            .collect();
        let run = |v: &Linear, o: &Linear| {
            let vals = apply(v, &x);
            let mut ctx = Array2::zeros((tokens, nh * d));
            for (h, ph) in p.iter().enumerate() {
                let g = h / (nh / nkv);
                let out = ph.dot(&vals.slice(ndarray::s![.., g * d..(g + 1) * d]));
                ctx.slice_mut(ndarray::s![.., h * d..(h + 1) * d]).assign(&out);
            }
            apply(o, &ctx)
        };
        let y0 = run(&v, &o);
        rotate_heads(&mut v, &mut o, &Rotation::new(d, 5), nh, nkv).unwrap();
        let y1 = run(&v, &o);
        assert!(max_abs(&(&y1 - &y0)) < 1e-5 * max_abs(&y0).max(1.0));
    }

    #[test]
    fn rotation_spreads_an_outlier_channel() {
        // One channel 100× the others: after a Hadamard rotation no channel stands out.
        let mut rng = Rng::new(64);
        let mut x = rng.normal_matrix(64, 128, 1.0);
        x.column_mut(5).mapv_inplace(|v| v * 100.0);
        let absmax = |a: &Array2<f32>| {
            a.axis_iter(Axis(1)).map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs()))).collect::<Vec<_>>()
        };
        let spread = |v: Vec<f32>| v.iter().fold(0f32, |m, &x| m.max(x)) / (v.iter().sum::<f32>() / v.len() as f32);
        let before = spread(absmax(&x));
        Rotation::new(128, 9).apply_rows(x.as_slice_mut().unwrap());
        let after = spread(absmax(&x));
        assert!(after < 2.0 && before > 20.0, "spread {before} → {after}");
    }
}
