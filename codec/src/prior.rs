//! Entropy models: one categorical distribution per channel, in 16-bit fixed point.
//!
//! A [`Prior`] is what both ends of a link agree the symbols look like. It comes from a
//! bundle's `priors.json` (`docs/coding-tables.md`): a smoothed histogram per channel for the
//! calibrated affine levels, or the quantized CDFs of a CompressAI `EntropyBottleneck`. The
//! second kind has an *escape*: its last interval stands for every value outside the table,
//! which then follows as 4-bit bypass digits (see [`crate::ans`]).
//!
//! [`Prior::information_bits`] is the bound a coder is measured against: the cross-entropy of
//! the symbols under the prior, escapes included.

use std::sync::OnceLock;

use constriction::stream::model::{
    ContiguousCategoricalEntropyModel, ContiguousLookupDecoderModel,
};

/// Fixed-point precision of every probability: they are integers out of `2^PRECISION`.
/// CompressAI uses the same, so its tables enter unchanged.
pub const PRECISION: usize = 16;
/// Most channels a prior may have (the coder indexes them with 16 bits, one value reserved).
pub const MAX_CHANNELS: usize = u16::MAX as usize - 1;
/// Bits per bypass digit of an escaped value (CompressAI's `bypass_precision`).
pub const BYPASS_BITS: u32 = 4;

/// The entropy model of one channel, as constriction codes with it.
pub(crate) type ChannelModel = ContiguousCategoricalEntropyModel<u32, Vec<u32>, PRECISION>;

/// The same distribution as a decoder-only lookup table: one entry per 2^-16 of probability,
/// so a symbol is found in one load instead of a binary search over the CDF (the search
/// made decoding cost grow with the bit depth: 110 µs a frame at 2 bits, 300 µs at 8).
/// Entries are 16-bit (a symbol index; PRECISION bits of cumulative probability, whose top
/// value 2^16 constriction keeps with wrapping arithmetic), so a table is 128 KiB.
pub(crate) type ChannelLookup = ContiguousLookupDecoderModel<u16, Vec<u16>, Box<[u16]>, PRECISION>;

/// One channel's distribution.
#[derive(Debug, Clone)]
pub(crate) struct ChannelPrior {
    /// The symbol that table index 0 stands for.
    pub(crate) offset: i32,
    /// Whether the last index is an escape for out-of-table values.
    pub(crate) escape: bool,
    /// Table entries, the escape included.
    pub(crate) len: u32,
    pub(crate) model: ChannelModel,
    /// Built on first decode (128 KiB): an encoder never needs it.
    lookup: OnceLock<ChannelLookup>,
    pmf: Vec<u32>,
    /// `-log2 p` per table index, for the information bound.
    cost: Vec<f64>,
    /// The cheapest symbol's cost in bits: no payload codes `n` symbols in fewer than
    /// `n × min_cost` bits (less the coder's state).
    pub(crate) min_cost: f64,
}

/// Per-channel distributions over symbols.
#[derive(Debug, Clone)]
pub struct Prior {
    pub(crate) channels: Vec<ChannelPrior>,
}

/// Why a table is not a usable prior.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PriorError {
    /// A channel's table is too short to code anything.
    #[error("channel {channel}: a table needs at least {min} entries, has {len}")]
    TooShort {
        /// Channel index.
        channel: usize,
        /// Entries needed.
        min: usize,
        /// Entries present.
        len: usize,
    },
    /// A probability is zero, or they do not sum to `2^16`.
    #[error(
        "channel {channel}: probabilities must be positive and sum to 2^{PRECISION} \
         (sum {sum}, zero entries {zeros})"
    )]
    NotNormalized {
        /// Channel index.
        channel: usize,
        /// Their sum.
        sum: u64,
        /// How many entries are zero.
        zeros: usize,
    },
    /// A CDF does not start at 0, end at `2^16`, or rise strictly.
    #[error("channel {channel}: a CDF must rise strictly from 0 to 2^{PRECISION}")]
    BadCdf {
        /// Channel index.
        channel: usize,
    },
    /// No channels at all, or more than a coder can index.
    #[error("a prior needs 1 to {MAX_CHANNELS} channels, has {0}")]
    Channels(usize),
    /// The CDFs and their offsets differ in number.
    #[error("{cdfs} CDFs but {offsets} offsets")]
    Lengths {
        /// CDFs given.
        cdfs: usize,
        /// Offsets given.
        offsets: usize,
    },
}

impl Prior {
    /// A prior over the symbols `0..pmf[c].len()` of each channel `c`, from fixed-point
    /// probabilities (each ≥ 1, each row summing to `2^16`).
    ///
    /// # Errors
    ///
    /// [`PriorError`] naming the first channel whose table is not a distribution.
    pub fn from_pmfs(pmfs: &[Vec<u32>]) -> Result<Self, PriorError> {
        let channels = pmfs
            .iter()
            .enumerate()
            .map(|(channel, pmf)| ChannelPrior::new(channel, pmf, 0, false, 2))
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(channels)
    }

    /// A prior from CompressAI's `EntropyBottleneck` state after `update()`: per channel the
    /// quantized CDF (cut to its length), the offset of its first symbol, and an escape in
    /// the last interval.
    ///
    /// # Errors
    ///
    /// [`PriorError`] naming the first channel whose CDF is malformed.
    pub fn from_compressai_cdfs(cdfs: &[Vec<u32>], offsets: &[i32]) -> Result<Self, PriorError> {
        if cdfs.len() != offsets.len() {
            return Err(PriorError::Lengths {
                cdfs: cdfs.len(),
                offsets: offsets.len(),
            });
        }
        let channels = cdfs
            .iter()
            .zip(offsets)
            .enumerate()
            .map(|(channel, (cdf, &offset))| {
                let rises = cdf.windows(2).all(|w| w[0] < w[1]);
                if cdf.first() != Some(&0) || cdf.last() != Some(&(1 << PRECISION)) || !rises {
                    return Err(PriorError::BadCdf { channel });
                }
                let pmf: Vec<u32> = cdf.windows(2).map(|w| w[1] - w[0]).collect();
                ChannelPrior::new(channel, &pmf, offset, true, 2)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(channels)
    }

    fn new(channels: Vec<ChannelPrior>) -> Result<Self, PriorError> {
        if channels.is_empty() || channels.len() > MAX_CHANNELS {
            return Err(PriorError::Channels(channels.len()));
        }
        Ok(Self { channels })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.channels.len()
    }

    /// Whether the prior escapes out-of-table values (a learned factorized prior) rather than
    /// covering a fixed alphabet (a calibrated level).
    pub fn has_escape(&self) -> bool {
        self.channels.iter().any(|c| c.escape)
    }

    /// The cross-entropy, in bits, of `symbols` under this prior: the size an ideal coder
    /// would reach. `symbols` is row-major with `symbols.len() / channels()` per channel.
    /// Escaped values cost the escape plus their bypass digits; a symbol outside a table
    /// without escape is impossible and costs infinity.
    pub fn information_bits(&self, symbols: &[i32]) -> f64 {
        let group_len = (symbols.len() / self.channels.len()).max(1);
        symbols
            .chunks(group_len)
            .zip(&self.channels)
            .map(|(group, channel)| group.iter().map(|&s| channel.cost(s)).sum::<f64>())
            .sum()
    }
}

impl ChannelPrior {
    fn new(
        channel: usize,
        pmf: &[u32],
        offset: i32,
        escape: bool,
        min: usize,
    ) -> Result<Self, PriorError> {
        if pmf.len() < min {
            return Err(PriorError::TooShort {
                channel,
                min,
                len: pmf.len(),
            });
        }
        let sum: u64 = pmf.iter().map(|&p| u64::from(p)).sum();
        let zeros = pmf.iter().filter(|&&p| p == 0).count();
        let not_normalized = PriorError::NotNormalized {
            channel,
            sum,
            zeros,
        };
        if zeros > 0 || sum != 1 << PRECISION {
            return Err(not_normalized);
        }
        let model = ChannelModel::from_nonzero_fixed_point_probabilities(pmf, false)
            .map_err(|()| not_normalized)?;
        let cost: Vec<f64> = pmf
            .iter()
            .map(|&p| PRECISION as f64 - f64::from(p).log2())
            .collect();
        let min_cost = cost.iter().copied().fold(f64::INFINITY, f64::min);
        Ok(Self {
            offset,
            escape,
            len: pmf.len() as u32,
            model,
            lookup: OnceLock::new(),
            pmf: pmf.to_vec(),
            cost,
            min_cost,
        })
    }

    /// The decoder's lookup table, built on first use.
    pub(crate) fn lookup(&self) -> &ChannelLookup {
        self.lookup.get_or_init(|| {
            // The PMF was checked (non-zero, normalized) when the prior was built, so the
            // lookup model accepts it as the categorical model did.
            let pmf = self.pmf.iter().map(|&p| {
                // Each entry is below 2^16: the PMF sums to 2^16 over at least two symbols.
                u16::try_from(p).unwrap_or_else(|_| unreachable!("a PMF entry below 2^16"))
            });
            ChannelLookup::from_nonzero_fixed_point_probabilities(pmf, false)
                .unwrap_or_else(|()| unreachable!("a checked PMF builds a lookup table"))
        })
    }

    /// The table index of the escape.
    pub(crate) fn escape_index(&self) -> u32 {
        self.len - 1
    }

    /// Bits an ideal coder spends on `symbol`.
    fn cost(&self, symbol: i32) -> f64 {
        match self.table_index(symbol) {
            Lookup::Direct(index) => self.cost[index as usize],
            Lookup::Escaped(raw) => {
                let digits = bypass_digits(raw);
                // The digit count itself is coded in base 15 runs, each a 4-bit bypass value.
                let count_values = digits / 15 + 1;
                self.cost[self.escape_index() as usize]
                    + f64::from((count_values + digits) * BYPASS_BITS)
            }
            Lookup::Impossible => f64::INFINITY,
        }
    }

    /// Where `symbol` sits in the table, following CompressAI's
    /// `RansEncoder::encode_with_indexes`.
    pub(crate) fn table_index(&self, symbol: i32) -> Lookup {
        let value = i64::from(symbol) - i64::from(self.offset);
        if !self.escape {
            return if (0..i64::from(self.len)).contains(&value) {
                Lookup::Direct(value as u32)
            } else {
                Lookup::Impossible
            };
        }
        let max_value = i64::from(self.escape_index());
        if value < 0 {
            Lookup::Escaped((-2 * value - 1) as u64)
        } else if value >= max_value {
            Lookup::Escaped((2 * (value - max_value)) as u64)
        } else {
            Lookup::Direct(value as u32)
        }
    }
}

/// A symbol's place in a channel table.
pub(crate) enum Lookup {
    /// An ordinary table index.
    Direct(u32),
    /// The escape, followed by this zigzag-coded value in bypass digits.
    Escaped(u64),
    /// Outside a table without escape.
    Impossible,
}

/// How many 4-bit digits `raw` needs (none for zero).
pub(crate) fn bypass_digits(raw: u64) -> u32 {
    (64 - raw.leading_zeros()).div_ceil(BYPASS_BITS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_tables_that_are_not_distributions() {
        assert!(matches!(
            Prior::from_pmfs(&[vec![1 << 16]]),
            Err(PriorError::TooShort { .. })
        ));
        assert!(matches!(
            Prior::from_pmfs(&[vec![1 << 15, 1 << 15], vec![0, 1 << 16]]),
            Err(PriorError::NotNormalized {
                channel: 1,
                zeros: 1,
                ..
            })
        ));
        assert!(matches!(
            Prior::from_pmfs(&[vec![3, 4]]),
            Err(PriorError::NotNormalized { sum: 7, .. })
        ));
        assert!(matches!(
            Prior::from_compressai_cdfs(&[vec![0, 5, 5, 1 << 16]], &[0]),
            Err(PriorError::BadCdf { channel: 0 })
        ));
        assert!(matches!(
            Prior::from_pmfs(&[]),
            Err(PriorError::Channels(0))
        ));
        assert!(matches!(
            Prior::from_compressai_cdfs(&[vec![0, 1 << 16]], &[]),
            Err(PriorError::Lengths { .. })
        ));
    }

    #[test]
    fn information_bits_of_a_uniform_prior_are_the_bit_depth() {
        let prior = Prior::from_pmfs(&[vec![1 << 14; 4], vec![1 << 14; 4]]).unwrap();
        assert_eq!(prior.information_bits(&[0, 1, 2, 3, 3, 2]), 12.0);
        assert_eq!(prior.information_bits(&[4, 0]), f64::INFINITY);
    }

    #[test]
    fn escapes_cost_the_escape_and_their_digits() {
        // Symbols -1..=1 direct (offset -1, three entries), the fourth entry is the escape.
        let prior =
            Prior::from_compressai_cdfs(&[vec![0, 1 << 14, 2 << 14, 3 << 14, 1 << 16]], &[-1])
                .unwrap();
        assert_eq!(prior.information_bits(&[0]), 2.0);
        // 2 is value 3 = max_value: raw 0, no digits, one count value.
        assert_eq!(prior.information_bits(&[2]), 2.0 + 4.0);
        // -2 is value -1: raw 1, one digit.
        assert_eq!(prior.information_bits(&[-2]), 2.0 + 8.0);
    }
}
