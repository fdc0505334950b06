//! From logits to ranked classes.

/// One class and its probability.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassScore {
    /// Class index.
    pub index: usize,
    /// Softmax probability.
    pub score: f32,
}

/// Softmax of one sample's logits, computed stably.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// The `k` most probable classes of one sample's logits, best first (ties: lower index).
pub fn top_k(logits: &[f32], k: usize) -> Vec<ClassScore> {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    let better = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    // Select the k best first, then sort only those: the tail ranks 1000 classes per frame.
    let k = k.min(order.len());
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, better);
    }
    order.truncate(k);
    order.sort_by(better);
    order
        .into_iter()
        .map(|index| ClassScore {
            index,
            score: probs[index],
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_probability() {
        let top = top_k(&[0.1, 3.0, -1.0, 2.0], 2);
        assert_eq!(top.iter().map(|c| c.index).collect::<Vec<_>>(), vec![1, 3]);
        let total: f32 = softmax(&[0.1, 3.0, -1.0, 2.0]).iter().sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!(top[0].score > top[1].score);
    }

    #[test]
    fn top_k_equals_ranking_everything() {
        // Ties included: the lower index wins, as in a full sort.
        let logits: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 613) as f32 / 61.0)
            .collect();
        let probs = softmax(&logits);
        let mut all: Vec<usize> = (0..logits.len()).collect();
        all.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        for k in [0, 1, 5, 17, 1000, 2000] {
            let top: Vec<usize> = top_k(&logits, k).iter().map(|c| c.index).collect();
            assert_eq!(top, all[..k.min(1000)], "k = {k}");
        }
    }

    #[test]
    fn softmax_survives_large_logits() {
        let p = softmax(&[1000.0, 0.0]);
        assert!(p[0] > 0.999 && p[1] >= 0.0);
    }
}
