//! Token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Sampling settings of one understanding request.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// New tokens at most.
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens were produced (0 = never suppressed).
    pub min_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Nucleus mass in (0, 1]; 1 = off.
    pub top_p: f32,
    /// HF-style penalty on tokens already generated (1 = off).
    pub repetition_penalty: f32,
    /// RNG seed (sampling is deterministic for a given seed).
    pub seed: u64,
    /// Generation stops when the text contains one of these (the stop string is not returned).
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_new_tokens: 512,
            min_new_tokens: 0,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 42,
            stop: Vec::new(),
        }
    }
}

/// Checks a temperature: finite and ≥ 0.
pub fn check_temperature(t: f32) -> Result<()> {
    if !t.is_finite() || t < 0.0 {
        return Err(Error::invalid(
            "temperature",
            format!("must be a finite number ≥ 0, got {t}"),
        ));
    }
    Ok(())
}

/// Checks a nucleus mass: in (0, 1].
pub fn check_top_p(p: f32) -> Result<()> {
    if !(p > 0.0 && p <= 1.0) {
        return Err(Error::invalid(
            "top_p",
            format!("must be in (0, 1], got {p}"),
        ));
    }
    Ok(())
}

impl SamplingParams {
    /// Rejects out-of-range settings with an error naming the field.
    pub fn validate(&self) -> Result<()> {
        check_temperature(self.temperature)?;
        check_top_p(self.top_p)?;
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(Error::invalid(
                "repetition_penalty",
                format!(
                    "must be a finite number > 0, got {}",
                    self.repetition_penalty
                ),
            ));
        }
        if self.max_new_tokens == 0 {
            return Err(Error::invalid("max_new_tokens", "must be at least 1"));
        }
        if self.min_new_tokens > self.max_new_tokens {
            return Err(Error::invalid(
                "min_new_tokens",
                format!(
                    "{} is larger than max_new_tokens {}",
                    self.min_new_tokens, self.max_new_tokens
                ),
            ));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return Err(Error::invalid("stop", "stop strings must not be empty"));
        }
        Ok(())
    }
}

/// A seeded sampler over one row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    rng: ChaCha8Rng,
    temperature: f32,
    top_k: usize,
    top_p: f32,
}

impl Sampler {
    /// A sampler; `temperature == 0` means argmax.
    pub fn new(seed: u64, temperature: f32, top_k: usize, top_p: f32) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            temperature,
            top_k,
            top_p,
        }
    }

    /// Picks a token from `logits` (modified in place).
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        if self.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Candidates sorted by logit when filtering is on; the full vocabulary otherwise.
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let filtering = self.top_k > 0 || self.top_p < 1.0;
        if filtering {
            idx.sort_unstable_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
            if self.top_k > 0 {
                idx.truncate(self.top_k.max(1));
            }
        }
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| ((logits[i as usize] - max) * inv_t).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        if self.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = probs.len();
            for (j, p) in probs.iter().enumerate() {
                acc += p / total;
                if acc >= self.top_p {
                    keep = j + 1;
                    break;
                }
            }
            probs.truncate(keep);
            idx.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            return argmax(logits);
        }
        let mut r = self.rng.random::<f32>() * total;
        for (j, p) in probs.iter().enumerate() {
            if r < *p {
                return idx[j];
            }
            r -= p;
        }
        idx[probs.len() - 1]
    }
}

/// Index of the largest value (first on ties, like torch.argmax on CPU).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// HF `RepetitionPenaltyLogitsProcessor`: divides positive and multiplies negative logits of seen tokens.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = std::collections::HashSet::new();
    for &t in seen {
        if done.insert(t) {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = vec![0.1, 3.0, 2.9, -1.0];
        assert_eq!(Sampler::new(1, 0.0, 0, 1.0).sample(&mut logits.clone()), 1);
        let draw = |seed| {
            let mut s = Sampler::new(seed, 1.0, 0, 1.0);
            (0..32)
                .map(|_| s.sample(&mut logits.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top_k = 1 is greedy whatever the temperature.
        let mut s = Sampler::new(3, 5.0, 1, 1.0);
        assert!((0..20).all(|_| s.sample(&mut logits.clone()) == 1));
        // A tiny nucleus keeps only the best token.
        let mut s = Sampler::new(3, 1.0, 0, 0.01);
        assert!((0..20).all(|_| s.sample(&mut logits.clone()) == 1));
    }

    #[test]
    fn penalty_and_validation() {
        let mut l = vec![2.0, -2.0, 1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 0], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0]);
        let bad = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(Error::InvalidArgument { field: "top_p", .. })
        ));
        let bad = SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(Error::InvalidArgument {
                field: "temperature",
                ..
            })
        ));
        let bad = SamplingParams {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(SamplingParams {
            top_p: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
