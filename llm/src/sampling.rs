//! Choosing the next token from the logits: greedy at temperature 0, otherwise a draw from
//! the softmax at a temperature, cut to the `top_k` most likely tokens and to the nucleus
//! (`top_p`: the fewest most likely tokens whose probabilities sum to at least `top_p`).
//!
//! The draws come from a ChaCha8 generator seeded by the caller's seed (or the operating
//! system's randomness when there is none), so a request that gives a seed gets the same
//! tokens again from the same model: the logits are computed exactly (see `matmul`), and
//! the candidates are ordered by probability and then by id, never by a hash or a sort that
//! is not stable.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::argmax;

/// How to choose tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 (or less): greedy. Otherwise the logits are divided by it before the softmax.
    pub temperature: f32,
    /// Keep the fewest most likely tokens whose probabilities sum to at least this (in
    /// (0, 1]; 1 keeps all).
    pub top_p: f32,
    /// Keep at most this many most likely tokens (0: no limit).
    pub top_k: usize,
    /// The generator's seed; `None`: one from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// Greedy.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

/// Chooses tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch: (probability, id) of the candidates.
    candidates: Vec<(f32, u32)>,
}

impl Sampler {
    /// A sampler with `params`.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    /// Whether it always takes the most likely token.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature.is_nan() || self.params.temperature <= 0.0 || self.params.top_k == 1
    }

    /// The next token from `logits` (one per vocabulary entry). Logits that are not finite
    /// are never chosen unless all are.
    pub fn pick(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() || logits.is_empty() {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let max = logits
            .iter()
            .copied()
            .filter(|l| l.is_finite())
            .fold(f32::NEG_INFINITY, f32::max);
        if !max.is_finite() {
            return argmax(logits);
        }
        self.candidates.clear();
        self.candidates.extend(
            (0u32..)
                .zip(logits)
                .filter(|(_, l)| l.is_finite())
                .map(|(id, &l)| (((l - max) / t).exp(), id)),
        );
        let total: f32 = self.candidates.iter().map(|c| c.0).sum();
        for c in &mut self.candidates {
            c.0 /= total;
        }
        self.cut();
        let mass: f64 = self.candidates.iter().map(|c| f64::from(c.0)).sum();
        let mut r = self.rng.random::<f64>() * mass;
        for &(p, id) in &self.candidates {
            r -= f64::from(p);
            if r < 0.0 {
                return id;
            }
        }
        // Rounding left a sliver past the last candidate.
        self.candidates
            .last()
            .map_or_else(|| argmax(logits), |c| c.1)
    }

    /// Keeps the `top_k` most likely candidates, then the nucleus of `top_p`, ordered most
    /// likely first (ties by id). Without either cut the candidates stay in id order.
    fn cut(&mut self) {
        let SamplingParams { top_p, top_k, .. } = self.params;
        let by_probability =
            |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k_cuts = top_k > 0 && top_k < self.candidates.len();
        let p_cuts = top_p < 1.0;
        if !k_cuts && !p_cuts {
            return;
        }
        if k_cuts {
            self.candidates
                .select_nth_unstable_by(top_k - 1, by_probability);
            self.candidates.truncate(top_k);
        } else {
            // Sorting the whole vocabulary for every token is slow; the nucleus lies among
            // the tokens above a small threshold whenever those already sum to `top_p`.
            let floor = 1e-4 / self.candidates.len() as f32;
            let above: f32 = self
                .candidates
                .iter()
                .filter(|c| c.0 >= floor)
                .map(|c| c.0)
                .sum();
            if above >= top_p {
                self.candidates.retain(|c| c.0 >= floor);
            }
        }
        self.candidates.sort_unstable_by(by_probability);
        if p_cuts {
            let mut sum = 0.0f32;
            let keep = self
                .candidates
                .iter()
                .position(|c| {
                    sum += c.0;
                    sum >= top_p
                })
                .map_or(self.candidates.len(), |i| i + 1);
            self.candidates.truncate(keep.max(1));
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed: Some(seed),
        }
    }

    fn draws(p: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(p);
        (0..n).map(|_| sampler.pick(logits)).collect()
    }

    fn counts(picks: &[u32], vocab: usize) -> Vec<usize> {
        let mut c = vec![0; vocab];
        for &p in picks {
            c[p as usize] += 1;
        }
        c
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.0, 3.0, -1.0];

    #[test]
    fn temperature_zero_is_greedy_and_ignores_the_seed() {
        assert!(Sampler::new(SamplingParams::default()).is_greedy());
        for seed in 0..5 {
            assert_eq!(draws(params(0.0, 0.5, 0, seed), &LOGITS, 10), vec![1; 10]);
        }
        // top_k 1 is greedy too.
        assert_eq!(draws(params(1.5, 1.0, 1, 3), &LOGITS, 10), vec![1; 10]);
    }

    #[test]
    fn a_seed_repeats_and_another_seed_differs() {
        let a = draws(params(1.0, 1.0, 0, 42), &LOGITS, 200);
        assert_eq!(a, draws(params(1.0, 1.0, 0, 42), &LOGITS, 200));
        assert_ne!(a, draws(params(1.0, 1.0, 0, 43), &LOGITS, 200));
    }

    #[test]
    fn draws_follow_the_softmax() {
        let n = 20_000;
        let c = counts(&draws(params(1.0, 1.0, 0, 1), &LOGITS, n), LOGITS.len());
        let z: f32 = LOGITS.iter().map(|l| l.exp()).sum();
        for (i, l) in LOGITS.iter().enumerate() {
            let expected = l.exp() / z;
            let got = c[i] as f32 / n as f32;
            assert!(
                (got - expected).abs() < 0.015,
                "token {i}: {got} vs {expected}"
            );
        }
        // A high temperature flattens, a low one sharpens.
        let hot = counts(&draws(params(100.0, 1.0, 0, 1), &LOGITS, n), 5);
        assert!(hot.iter().all(|&k| k > n / 6), "{hot:?}");
        let cold = counts(&draws(params(0.05, 1.0, 0, 1), &LOGITS, n), 5);
        assert_eq!(cold[0] + cold[2] + cold[4], 0, "{cold:?}");
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let n = 5_000;
        // The two tied best tokens (1 and 3) hold 2·e³/z ≈ 0.79 of the mass, with the third
        // (2) 0.94.
        let k2 = counts(&draws(params(1.0, 1.0, 2, 9), &LOGITS, n), 5);
        assert_eq!(k2[0] + k2[2] + k2[4], 0, "{k2:?}");
        assert!(k2[1] > n / 3 && k2[3] > n / 3, "{k2:?}");
        let p75 = counts(&draws(params(1.0, 0.75, 0, 9), &LOGITS, n), 5);
        assert_eq!(p75[0] + p75[2] + p75[4], 0, "{p75:?}");
        // 0.9 needs the third most likely token as well.
        let p90 = counts(&draws(params(1.0, 0.9, 0, 9), &LOGITS, n), 5);
        assert!(p90[2] > 0 && p90[0] + p90[4] == 0, "{p90:?}");
        // A tiny top_p still keeps one token.
        let tiny = draws(params(1.0, 1e-9, 0, 9), &LOGITS, 50);
        assert!(tiny.iter().all(|&t| t == 1), "{tiny:?}");
    }

    #[test]
    fn the_nucleus_shortcut_gives_the_full_sort_s_answer_on_a_large_vocabulary() {
        // Many tiny logits below the threshold, a few large ones: the shortcut applies.
        let mut logits = vec![-30.0f32; 50_000];
        logits[7] = 5.0;
        logits[11] = 4.5;
        logits[49_999] = 4.0;
        let picks = counts(&draws(params(1.0, 0.95, 0, 5), &logits, 3_000), 50_000);
        let seen: Vec<usize> = (0..50_000).filter(|&i| picks[i] > 0).collect();
        assert_eq!(seen, [7, 11, 49_999]);
    }

    #[test]
    fn non_finite_logits_are_never_drawn() {
        let logits = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0];
        let picks = draws(params(1.0, 1.0, 0, 2), &logits, 500);
        assert!(picks.iter().all(|&t| t == 1 || t == 3), "{picks:?}");
        assert_eq!(
            Sampler::new(params(1.0, 1.0, 0, 2)).pick(&[f32::NAN; 3]),
            argmax(&[f32::NAN; 3])
        );
    }
}
