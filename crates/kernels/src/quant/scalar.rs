//! The portable decode dots: one weight row against up to four quantized activation rows,
//! integer products per block, scaled and summed in f32.

use super::blocks::{f16_at, Row, Q4_1_BYTES, Q8_0_BYTES, QK};

/// `Σ_b d_w·d_x·Σ q_w·q_x` of a `Q8_0` row against each of `xs`.
pub(super) fn dots_q8_0<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let mut acc = [0f32; R];
    for (b, blk) in w.chunks_exact(Q8_0_BYTES).enumerate() {
        let dw = f16_at(blk);
        for (a, x) in acc.iter_mut().zip(&xs) {
            let qx = &x.q[b * QK..(b + 1) * QK];
            let sum: i32 = (0..QK)
                .map(|i| (blk[2 + i] as i8) as i32 * qx[i] as i32)
                .sum();
            *a += dw * x.d[b] * sum as f32;
        }
    }
    acc
}

/// `Σ_b d_w·d_x·Σ q_w·q_x + m_w·s_x` of a `Q4_1` row against each of `xs`.
pub(super) fn dots_q4_1<const R: usize>(w: &[u8], xs: [Row<'_>; R]) -> [f32; R] {
    let mut acc = [0f32; R];
    for (b, blk) in w.chunks_exact(Q4_1_BYTES).enumerate() {
        let (dw, mw) = (f16_at(blk), f16_at(&blk[2..]));
        for (a, x) in acc.iter_mut().zip(&xs) {
            let qx = &x.q[b * QK..(b + 1) * QK];
            let mut sum = 0i32;
            for i in 0..QK / 2 {
                let byte = blk[4 + i];
                sum += (byte & 15) as i32 * qx[i] as i32;
                sum += (byte >> 4) as i32 * qx[i + QK / 2] as i32;
            }
            *a += dw * x.d[b] * sum as f32 + mw * x.s[b];
        }
    }
    acc
}
