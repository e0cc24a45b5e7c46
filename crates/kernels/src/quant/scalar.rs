//! The portable decode dots: one split weight row (see `blocks`) against up to four quantized
//! activation rows, integer products per block, scaled and summed in f32.

use super::blocks::{field, Row, Q4_1_BYTES, Q8_0_BYTES, Q8_0_FLIP, QK};

/// `Σ_b d_w·d_x·Σ q_w·q_x` of a `Q8_0` row against each of `xs`.
pub(super) fn dots_q8_0<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let nb = w.len() / Q8_0_BYTES;
    let mut acc = [0f32; R];
    for b in 0..nb {
        let dw = field(w, nb, 0, b);
        let qw = &w[2 * nb + b * QK..][..QK];
        for (a, x) in acc.iter_mut().zip(&xs) {
            let qx = &x.q[b * QK..(b + 1) * QK];
            let sum: i32 = (0..QK)
                .map(|i| ((qw[i] ^ Q8_0_FLIP) as i8) as i32 * qx[i] as i32)
                .sum();
            *a += dw * x.d[b] * sum as f32;
        }
    }
    acc
}

/// `Σ_b d_w·d_x·Σ q_w·q_x + m_w·s_x` of a `Q4_1` row against each of `xs`.
pub(super) fn dots_q4_1<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let nb = w.len() / Q4_1_BYTES;
    let mut acc = [0f32; R];
    for b in 0..nb {
        let (dw, mw) = (field(w, nb, 0, b), field(w, nb, 1, b));
        let qs = &w[4 * nb + b * (QK / 2)..][..QK / 2];
        for (a, x) in acc.iter_mut().zip(&xs) {
            let qx = &x.q[b * QK..(b + 1) * QK];
            let mut sum = 0i32;
            for i in 0..QK / 2 {
                sum += (qs[i] & 15) as i32 * qx[i] as i32;
                sum += (qs[i] >> 4) as i32 * qx[i + QK / 2] as i32;
            }
            *a += dw * x.d[b] * sum as f32 + mw * x.s[b];
        }
    }
    acc
}
