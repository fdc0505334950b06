//! Which part of every layer each node computes: the tensor-parallel plan.
//!
//! As in TPI-LLM (and Megatron's column/row split), every node holds a slice of every
//! layer, and two all-reduces per layer sum the slices' outputs:
//!
//! - **Attention** is split by heads. With no more nodes than KV heads, each node gets whole
//!   KV groups (its K/V heads and every query head that reads them), so nothing is
//!   computed twice. With more nodes than KV heads, the query heads are split and each node
//!   computes the K/V heads its query heads read (replicated where a group is shared). A
//!   node's rows of Wq/Wk/Wv and its columns of Wo follow.
//! - **The feed-forward network** is split along its inner dimension, in whole blocks of 32
//!   (one quantization block), so each node's rows of Wgate/Wup and columns of Wdown are
//!   whole blocks. No power-of-two rule: 2, 3, 5 or 7 nodes are all fine.
//!
//! Shares follow each node's declared capability (relative speed), by largest remainders,
//! with at least one unit each. The master (node 0) also keeps the embedding, the final
//! norm, the output head and sampling, so the prompt's text never leaves it.

use std::ops::Range;

use crate::model::Config;
use crate::quant::BLOCK;

/// What one node computes of every layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeShard {
    /// Query heads (rows `heads.start * head_dim ..` of Wq; columns of Wo).
    pub heads: Range<usize>,
    /// KV heads these query heads read (rows of Wk and Wv).
    pub kv_heads: Range<usize>,
    /// Inner FFN dimensions (rows of Wgate and Wup; columns of Wdown), whole blocks.
    pub ffn: Range<usize>,
}

/// The plan for a cluster, node 0 first (the master).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    /// One entry per node.
    pub nodes: Vec<NodeShard>,
}

/// Why a cluster cannot run a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// No nodes, or a capability that is not a positive number.
    #[error("node capabilities must be positive numbers, one per node (got {0:?})")]
    BadCapabilities(Vec<f64>),
    /// More nodes than there are query heads or FFN blocks to share.
    #[error(
        "{nodes} nodes cannot share a model of {heads} query heads and {blocks} FFN blocks of 32: at most {most} nodes"
    )]
    TooManyNodes {
        /// Nodes asked for.
        nodes: usize,
        /// Query heads.
        heads: usize,
        /// FFN blocks.
        blocks: usize,
        /// The most nodes that can share it.
        most: usize,
    },
    /// The FFN's inner width is not whole blocks.
    #[error("the FFN's inner width {0} is not a multiple of {BLOCK}")]
    UnevenFfn(usize),
}

impl ShardPlan {
    /// Shares `config` among nodes of the given relative `capabilities` (node 0 is the
    /// master).
    ///
    /// # Errors
    ///
    /// [`PlanError`].
    pub fn new(config: &Config, capabilities: &[f64]) -> Result<Self, PlanError> {
        let n = capabilities.len();
        if n == 0 || capabilities.iter().any(|c| !c.is_finite() || *c <= 0.0) {
            return Err(PlanError::BadCapabilities(capabilities.to_vec()));
        }
        if !config.ffn.is_multiple_of(BLOCK) {
            return Err(PlanError::UnevenFfn(config.ffn));
        }
        let blocks = config.ffn / BLOCK;
        let most = config.heads.min(blocks);
        if n > most {
            return Err(PlanError::TooManyNodes {
                nodes: n,
                heads: config.heads,
                blocks,
                most,
            });
        }
        let group = config.heads / config.kv_heads;
        let heads: Vec<Range<usize>> = if n <= config.kv_heads {
            ranges(&apportion(config.kv_heads, capabilities))
                .into_iter()
                .map(|g| g.start * group..g.end * group)
                .collect()
        } else {
            ranges(&apportion(config.heads, capabilities))
        };
        let ffn = ranges(&apportion(blocks, capabilities));
        let nodes = heads
            .into_iter()
            .zip(ffn)
            .map(|(heads, ffn)| NodeShard {
                kv_heads: heads.start / group..heads.end.div_ceil(group),
                heads,
                ffn: ffn.start * BLOCK..ffn.end * BLOCK,
            })
            .collect();
        Ok(Self { nodes })
    }
}

/// `units` shared by `weights`: at least one each, the rest by largest remainders (ties to
/// the lower index). Needs `units >= weights.len()`.
fn apportion(units: usize, weights: &[f64]) -> Vec<usize> {
    let n = weights.len();
    let spare = units - n;
    // Relative to the largest, so that huge capabilities cannot overflow the total.
    let largest = weights.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
    let total: f64 = weights.iter().map(|w| w / largest).sum();
    let ideal: Vec<f64> = weights
        .iter()
        .map(|w| spare as f64 * (w / largest) / total)
        .collect();
    let mut shares: Vec<usize> = ideal.iter().map(|x| 1 + x.floor() as usize).collect();
    let given: usize = shares.iter().sum();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (ideal[a] - ideal[a].floor(), ideal[b] - ideal[b].floor());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &i in order.iter().take(units.saturating_sub(given)) {
        shares[i] += 1;
    }
    shares
}

/// Consecutive ranges of the given lengths from 0.
fn ranges(lengths: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    lengths
        .iter()
        .map(|&len| {
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// SmolLM2-135M's shape: 9 query heads in 3 KV groups, FFN 1536 (48 blocks).
    fn smollm2() -> Config {
        Config {
            layers: 30,
            hidden: 576,
            ffn: 1536,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            vocab: 49152,
            context: 8192,
            norm_eps: 1e-5,
            rope_base: 100_000.0,
        }
    }

    /// Every head and FFN dimension is computed, each query head once.
    fn check_cover(config: &Config, plan: &ShardPlan) {
        let mut head = 0;
        let mut ffn = 0;
        for node in &plan.nodes {
            assert_eq!(node.heads.start, head, "{plan:?}");
            assert!(!node.heads.is_empty() && !node.ffn.is_empty(), "{plan:?}");
            assert_eq!(node.ffn.start, ffn);
            assert_eq!(node.ffn.len() % BLOCK, 0);
            let group = config.heads / config.kv_heads;
            assert_eq!(node.kv_heads.start, node.heads.start / group);
            assert_eq!(node.kv_heads.end, (node.heads.end - 1) / group + 1);
            head = node.heads.end;
            ffn = node.ffn.end;
        }
        assert_eq!((head, ffn), (config.heads, config.ffn));
    }

    #[test]
    fn equal_nodes_share_smollm2_by_whole_groups_until_there_are_more_nodes_than_groups() {
        let c = smollm2();
        for n in 1..=9 {
            let plan = ShardPlan::new(&c, &vec![1.0; n]).unwrap();
            check_cover(&c, &plan);
            if n <= 3 {
                // Whole groups: no K/V head is computed twice.
                let kv: usize = plan.nodes.iter().map(|s| s.kv_heads.len()).sum();
                assert_eq!(kv, 3, "{n} nodes: {plan:?}");
            }
        }
        let three = ShardPlan::new(&c, &[1.0; 3]).unwrap();
        assert_eq!(
            three.nodes[1],
            NodeShard {
                heads: 3..6,
                kv_heads: 1..2,
                ffn: 512..1024
            }
        );
        // Two nodes: 2 + 1 groups, FFN 24 + 24 blocks.
        let two = ShardPlan::new(&c, &[1.0; 2]).unwrap();
        assert_eq!(two.nodes[0].heads, 0..6);
        assert_eq!(two.nodes[1].ffn, 768..1536);
        // Four nodes: query heads 3/2/2/2, K/V replicated where a group is shared.
        let four = ShardPlan::new(&c, &[1.0; 4]).unwrap();
        let heads: Vec<usize> = four.nodes.iter().map(|s| s.heads.len()).collect();
        assert_eq!(heads, [3, 2, 2, 2]);
        assert_eq!(four.nodes[1].kv_heads, 1..2);
        assert_eq!(four.nodes[2].kv_heads, 1..3);
    }

    #[test]
    fn shares_follow_capability() {
        let c = smollm2();
        // A node twice as fast gets about twice the FFN.
        let plan = ShardPlan::new(&c, &[2.0, 1.0]).unwrap();
        check_cover(&c, &plan);
        assert_eq!(plan.nodes[0].ffn.len() / BLOCK, 32);
        assert_eq!(plan.nodes[1].ffn.len() / BLOCK, 16);
        // A very slow node still gets one unit of each.
        let plan = ShardPlan::new(&c, &[100.0, 0.01]).unwrap();
        check_cover(&c, &plan);
        assert_eq!(plan.nodes[1].heads.len(), 3);
        assert_eq!(plan.nodes[1].ffn.len(), BLOCK);
    }

    #[test]
    fn impossible_clusters_are_refused() {
        let c = smollm2();
        assert!(matches!(
            ShardPlan::new(&c, &[1.0; 10]),
            Err(PlanError::TooManyNodes { most: 9, .. })
        ));
        for bad in [vec![], vec![1.0, 0.0], vec![f64::NAN], vec![-1.0]] {
            assert!(matches!(
                ShardPlan::new(&c, &bad),
                Err(PlanError::BadCapabilities(_))
            ));
        }
        let odd = Config { ffn: 1000, ..c };
        assert_eq!(
            ShardPlan::new(&odd, &[1.0]),
            Err(PlanError::UnevenFfn(1000))
        );
    }

    #[test]
    fn apportioning_is_exact_and_at_least_one() {
        for units in 1..40 {
            for n in 1..=units.min(7) {
                let weights: Vec<f64> = (0..n).map(|i| 1.0 + i as f64 * 0.7).collect();
                let shares = apportion(units, &weights);
                assert_eq!(shares.iter().sum::<usize>(), units);
                assert!(shares.iter().all(|&s| s >= 1));
                let huge = vec![1e308; n];
                assert_eq!(apportion(units, &huge).iter().sum::<usize>(), units);
            }
        }
    }
}
