//! Fused MoE expert tensors, split into per-expert `[out, in]` linears.
//!
//! Qwen3-VL-MoE releases store `mlp.experts.gate_up_proj [E, hidden, 2*inter]` (gate first, up
//! second) and `mlp.experts.down_proj [E, inter, hidden]`: transposed relative to `nn.Linear`.
//! Checkpoints saved by transformers 5 hold `[E, 2*inter, hidden]` and `[E, hidden, inter]`.
//! The two are told apart by the config's sizes, looking at both tensors of a layer together;
//! where the shapes fit neither reading (or, for degenerate sizes, both), lamina refuses.

use anyhow::{bail, Result};

pub const GATE_UP: &str = "mlp.experts.gate_up_proj";
pub const DOWN: &str = "mlp.experts.down_proj";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FusedLayout {
    /// `gate_up [E, hidden, 2*inter]`, `down [E, inter, hidden]` (the public releases).
    Release,
    /// `gate_up [E, 2*inter, hidden]`, `down [E, hidden, inter]` (transformers 5).
    Transformers5,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertPart {
    Gate,
    Up,
    Down,
}

impl ExpertPart {
    pub fn module(self) -> &'static str {
        match self {
            ExpertPart::Gate => "gate_proj",
            ExpertPart::Up => "up_proj",
            ExpertPart::Down => "down_proj",
        }
    }
}

/// Decides the layout of one layer's fused pair from the shapes and the config's sizes.
pub fn decide_layout(
    gate_up: &[usize],
    down: &[usize],
    experts: usize,
    hidden: usize,
    inter: usize,
) -> Result<FusedLayout> {
    let fits = |l: FusedLayout| {
        let (gu, d) = match l {
            FusedLayout::Release => ([experts, hidden, 2 * inter], [experts, inter, hidden]),
            FusedLayout::Transformers5 => ([experts, 2 * inter, hidden], [experts, hidden, inter]),
        };
        gate_up == gu && down == d
    };
    match (fits(FusedLayout::Release), fits(FusedLayout::Transformers5)) {
        (true, false) => Ok(FusedLayout::Release),
        (false, true) => Ok(FusedLayout::Transformers5),
        (true, true) => bail!(
            "fused experts gate_up_proj {gate_up:?} / down_proj {down:?} fit both the release layout and the transformers-5 layout \
             (hidden_size {hidden}, moe_intermediate_size {inter}); lamina cannot tell which one this checkpoint uses"
        ),
        (false, false) => bail!(
            "fused experts gate_up_proj {gate_up:?} / down_proj {down:?} match neither [E, hidden, 2*inter]/[E, inter, hidden] \
             nor [E, 2*inter, hidden]/[E, hidden, inter] for {experts} experts, hidden_size {hidden}, moe_intermediate_size {inter}"
        ),
    }
}

/// The `[out, in]` shape of one expert's linear.
pub fn expert_shape(part: ExpertPart, hidden: usize, inter: usize) -> [usize; 2] {
    match part {
        ExpertPart::Gate | ExpertPart::Up => [inter, hidden],
        ExpertPart::Down => [hidden, inter],
    }
}

/// Where one expert's `[out, in]` linear lies inside a fused tensor, in elements: element `(o, i)` of the
/// linear is element `offset + o * row_stride + i * col_stride` of the fused tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// Places expert `j`'s part in a fused tensor of `fused_shape` `[E, a, b]`. No bytes move: the quantizer
/// reads the linear in place, transposed or not.
pub fn place(fused_shape: &[usize], layout: FusedLayout, part: ExpertPart, j: usize) -> Placement {
    let (a, b) = (fused_shape[1], fused_shape[2]);
    let base = j * a * b;
    match (layout, part) {
        // Rows of the stored matrix are already the linear's rows.
        (FusedLayout::Transformers5, ExpertPart::Gate | ExpertPart::Down) => {
            Placement { offset: base, row_stride: b, col_stride: 1 }
        }
        (FusedLayout::Transformers5, ExpertPart::Up) => {
            Placement { offset: base + a / 2 * b, row_stride: b, col_stride: 1 }
        }
        // Columns of the stored matrix are the linear's rows.
        (FusedLayout::Release, ExpertPart::Gate | ExpertPart::Down) => {
            Placement { offset: base, row_stride: 1, col_stride: b }
        }
        (FusedLayout::Release, ExpertPart::Up) => Placement { offset: base + b / 2, row_stride: 1, col_stride: b },
    }
}

/// Copies expert `j`'s `[out, in]` linear out of a fused tensor's bytes (`elem` bytes an element), for
/// writing it unquantized. `fused_shape` is the shape of the fused tensor this part comes from.
pub fn extract(
    bytes: &[u8],
    elem: usize,
    fused_shape: &[usize],
    layout: FusedLayout,
    part: ExpertPart,
    j: usize,
) -> Vec<u8> {
    let (a, b) = (fused_shape[1], fused_shape[2]);
    let p = place(fused_shape, layout, part, j);
    let (rows, cols) = match (layout, part) {
        (FusedLayout::Transformers5, ExpertPart::Down) => (a, b),
        (FusedLayout::Transformers5, _) => (a / 2, b),
        (FusedLayout::Release, ExpertPart::Down) => (b, a),
        (FusedLayout::Release, _) => (b / 2, a),
    };
    if p.col_stride == 1 {
        return bytes[p.offset * elem..(p.offset + rows * cols) * elem].to_vec();
    }
    // out[o][i] = stored[i][o], tile by tile so both sides stay in cache.
    let mut out = vec![0u8; rows * cols * elem];
    const TILE: usize = 32;
    for ib in (0..cols).step_by(TILE) {
        for ob in (0..rows).step_by(TILE) {
            for i in ib..(ib + TILE).min(cols) {
                for o in ob..(ob + TILE).min(rows) {
                    let s = (p.offset + o + i * p.col_stride) * elem;
                    let d = (o * cols + i) * elem;
                    out[d..d + elem].copy_from_slice(&bytes[s..s + elem]);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fused(shape: [usize; 3]) -> Vec<u8> {
        (0..shape.iter().product::<usize>()).flat_map(|x| (x as u16).to_le_bytes()).collect()
    }
    fn at(bytes: &[u8], idx: usize) -> u16 {
        u16::from_le_bytes([bytes[2 * idx], bytes[2 * idx + 1]])
    }

    #[test]
    fn release_layout_transposes() {
        let (e, h, i) = (3, 5, 4);
        let gu = fused([e, h, 2 * i]);
        for j in 0..e {
            let gate = extract(&gu, 2, &[e, h, 2 * i], FusedLayout::Release, ExpertPart::Gate, j);
            let up = extract(&gu, 2, &[e, h, 2 * i], FusedLayout::Release, ExpertPart::Up, j);
            for o in 0..i {
                for k in 0..h {
                    assert_eq!(at(&gate, o * h + k), ((j * h + k) * 2 * i + o) as u16);
                    assert_eq!(at(&up, o * h + k), ((j * h + k) * 2 * i + i + o) as u16);
                }
            }
        }
        let down = fused([e, i, h]);
        let d = extract(&down, 2, &[e, i, h], FusedLayout::Release, ExpertPart::Down, 2);
        assert_eq!(at(&d, 3 * i + 1), ((2 * i + 1) * h + 3) as u16);
    }

    #[test]
    fn placements_address_the_same_elements_as_the_copies() {
        let (e, h, i) = (3, 5, 4);
        for (layout, gu_shape, d_shape) in
            [(FusedLayout::Release, [e, h, 2 * i], [e, i, h]), (FusedLayout::Transformers5, [e, 2 * i, h], [e, h, i])]
        {
            for part in [ExpertPart::Gate, ExpertPart::Up, ExpertPart::Down] {
                let shape = if part == ExpertPart::Down { d_shape } else { gu_shape };
                let [rows, cols] = expert_shape(part, h, i);
                let bytes = fused(shape);
                for j in 0..e {
                    let copy = extract(&bytes, 2, &shape, layout, part, j);
                    let p = place(&shape, layout, part, j);
                    for o in 0..rows {
                        for k in 0..cols {
                            let placed = at(&bytes, p.offset + o * p.row_stride + k * p.col_stride);
                            assert_eq!(placed, at(&copy, o * cols + k), "{layout:?} {part:?} {j} ({o},{k})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn transformers5_layout_slices_rows() {
        let (e, h, i) = (2, 3, 2);
        let gu = fused([e, 2 * i, h]);
        let up = extract(&gu, 2, &[e, 2 * i, h], FusedLayout::Transformers5, ExpertPart::Up, 1);
        assert_eq!(at(&up, 0), ((2 * i + i) * h) as u16);
    }

    #[test]
    fn layouts_are_decided_or_refused() {
        assert_eq!(decide_layout(&[4, 64, 96], &[4, 48, 64], 4, 64, 48).unwrap(), FusedLayout::Release);
        assert_eq!(decide_layout(&[4, 96, 64], &[4, 64, 48], 4, 64, 48).unwrap(), FusedLayout::Transformers5);
        // gate_up alone is ambiguous when hidden == 2*inter; down_proj decides.
        assert_eq!(decide_layout(&[4, 64, 64], &[4, 32, 64], 4, 64, 32).unwrap(), FusedLayout::Release);
        assert_eq!(decide_layout(&[4, 64, 64], &[4, 64, 32], 4, 64, 32).unwrap(), FusedLayout::Transformers5);
        // A config whose sizes contradict the tensors is refused, naming both.
        let e = decide_layout(&[4, 64, 64], &[4, 64, 64], 4, 64, 32).unwrap_err().to_string();
        assert!(e.contains("neither"), "{e}");
    }
}
