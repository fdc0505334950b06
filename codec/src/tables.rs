//! A bundle's coding tables: the calibrated quantizer and static prior for each bit depth,
//! and an optional learned factorized prior, checked once when the bundle is loaded.
//!
//! The clipping ranges come from the manifest, the priors from `priors.json`; both formats
//! are in `docs/coding-tables.md`. The engine reads the files; this module only parses and
//! validates text and numbers it is given, so a bad table is an error that names what is
//! wrong before any frame is coded with it.

use serde::Deserialize;

use crate::frame::Coding;
use crate::prior::{PRECISION, Prior, PriorError};
use crate::quantize::{AffineRange, MAX_BITS, MIN_BITS, Quantizer};

/// One calibrated bit depth as the manifest states it: per-channel clipping ranges.
#[derive(Debug, Clone, PartialEq)]
pub struct LevelRanges {
    /// Bit depth, 2 to 8.
    pub bits: u8,
    /// Lower clip per channel.
    pub low: Vec<f32>,
    /// Upper clip per channel.
    pub high: Vec<f32>,
}

/// A calibrated bit depth, ready to code with.
#[derive(Debug, Clone)]
pub struct Level {
    /// Bit depth.
    pub bits: u8,
    /// The affine quantizer with the calibrated ranges.
    pub quantizer: Quantizer,
    /// The static prior fitted on the calibration symbols.
    pub prior: Prior,
}

/// A learned factorized prior (CompressAI `EntropyBottleneck`), ready to code with.
#[derive(Debug, Clone)]
pub struct Learned {
    /// Integer quantizer around the bottleneck's medians.
    pub quantizer: Quantizer,
    /// The bottleneck's quantized CDFs, with escape.
    pub prior: Prior,
    /// Where the tables came from, as `priors.json` says.
    pub source: String,
}

/// Everything a head and tail sharing a bundle agree on about coding.
#[derive(Debug, Clone)]
pub struct CodingTables {
    channels: usize,
    levels: Vec<Level>,
    learned: Option<Learned>,
}

/// Why coding tables were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// `priors.json` is not the documented JSON.
    #[error("priors.json: {0}")]
    Json(String),
    /// A format or version this build does not read.
    #[error("priors.json: format {format:?} version {version}, expected \"cleave-priors\" 1")]
    Format {
        /// The `format` field.
        format: String,
        /// The `version` field.
        version: u32,
    },
    /// A precision other than 16.
    #[error("priors.json: precision {0}, only {PRECISION} is supported")]
    Precision(u32),
    /// A level's bit depth is outside 2..=8 or appears twice.
    #[error("bit depth {0}: outside {MIN_BITS}..={MAX_BITS} or listed twice")]
    Bits(u8),
    /// A per-channel list has the wrong length.
    #[error("{what}: {actual} entries, the bottleneck has {channels} channels")]
    Channels {
        /// Which list.
        what: String,
        /// Its length.
        actual: usize,
        /// The bottleneck's channel count.
        channels: usize,
    },
    /// A range or gain is not finite, or a range is inverted.
    #[error("{what}: channel {channel} has unusable values ({detail})")]
    Values {
        /// Which table.
        what: String,
        /// Channel index.
        channel: usize,
        /// The values.
        detail: String,
    },
    /// A level has clipping ranges but no static prior.
    #[error("bit depth {0} has clipping ranges but priors.json has no static prior for it")]
    MissingPrior(u8),
    /// A prior table is not a distribution.
    #[error("{what}: {source}")]
    Prior {
        /// Which table.
        what: String,
        /// The problem.
        source: PriorError,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriorsFile {
    format: String,
    version: u32,
    precision: u32,
    #[serde(default, rename = "static")]
    static_priors: Vec<StaticEntry>,
    factorized: Option<FactorizedEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StaticEntry {
    bits: u8,
    pmf: Vec<Vec<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FactorizedEntry {
    source: String,
    scale: Vec<f32>,
    medians: Vec<f32>,
    offset: Vec<i32>,
    cdf_length: Vec<u32>,
    quantized_cdf: Vec<Vec<u32>>,
}

impl CodingTables {
    /// Builds the tables of a bottleneck with `channels` channels from the manifest's
    /// calibrated ranges and, if the bundle has one, the text of its `priors.json`.
    ///
    /// # Errors
    ///
    /// [`TableError`] naming the first list, channel or table that is malformed, or a level
    /// without a prior.
    pub fn new(
        channels: usize,
        ranges: &[LevelRanges],
        priors_json: Option<&str>,
    ) -> Result<Self, TableError> {
        let file = priors_json.map(parse_priors).transpose()?;
        let mut levels: Vec<Level> = Vec::with_capacity(ranges.len());
        for level in ranges {
            let bits = level.bits;
            if !(MIN_BITS..=MAX_BITS).contains(&bits) || levels.iter().any(|l| l.bits == bits) {
                return Err(TableError::Bits(bits));
            }
            let what = format!("bit depth {bits}");
            check_len(&format!("{what} low"), level.low.len(), channels)?;
            check_len(&format!("{what} high"), level.high.len(), channels)?;
            let mut affine = Vec::with_capacity(channels);
            for (channel, (&low, &high)) in level.low.iter().zip(&level.high).enumerate() {
                if !low.is_finite() || !high.is_finite() || high < low {
                    return Err(TableError::Values {
                        what: what.clone(),
                        channel,
                        detail: format!("low {low}, high {high}"),
                    });
                }
                affine.push(AffineRange::spanning(low, high, bits));
            }
            let pmf = file
                .as_ref()
                .and_then(|f| f.static_priors.iter().find(|s| s.bits == bits))
                .ok_or(TableError::MissingPrior(bits))?;
            let what = format!("static prior for {bits} bits");
            check_len(&what, pmf.pmf.len(), channels)?;
            for (channel, row) in pmf.pmf.iter().enumerate() {
                check_len(&format!("{what}, channel {channel}"), row.len(), 1 << bits)?;
            }
            let prior = Prior::from_pmfs(&pmf.pmf).map_err(|source| TableError::Prior {
                what: what.clone(),
                source,
            })?;
            levels.push(Level {
                bits,
                quantizer: Quantizer::Affine {
                    bits,
                    ranges: affine,
                },
                prior,
            });
        }
        levels.sort_by_key(|l| l.bits);
        let learned = file
            .and_then(|f| f.factorized)
            .map(|f| learned(channels, f))
            .transpose()?;
        Ok(Self {
            channels,
            levels,
            learned,
        })
    }

    /// Channels of the bottleneck these tables are for.
    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The calibrated levels, lowest bit depth first.
    pub fn levels(&self) -> &[Level] {
        &self.levels
    }

    /// The calibrated level at `bits`, if the bundle has one.
    pub fn level(&self, bits: u8) -> Option<&Level> {
        self.levels.iter().find(|l| l.bits == bits)
    }

    /// The learned factorized prior, if the bundle has one.
    pub fn learned(&self) -> Option<&Learned> {
        self.learned.as_ref()
    }

    /// The quantizer and prior a table coding uses; `None` for inline coding or a table the
    /// bundle does not have.
    pub fn table(&self, coding: Coding) -> Option<(&Quantizer, &Prior)> {
        match coding {
            Coding::Calibrated { bits } => self.level(bits).map(|l| (&l.quantizer, &l.prior)),
            Coding::Learned => self.learned().map(|l| (&l.quantizer, &l.prior)),
            Coding::Inline { .. } => None,
        }
    }
}

/// Largest `|offset|` a learned prior's table may start at: far beyond any real table, and
/// small enough that symbols and their escapes stay within 32 bits.
const MAX_OFFSET: i32 = 1 << 20;

fn parse_priors(text: &str) -> Result<PriorsFile, TableError> {
    let file: PriorsFile =
        serde_json::from_str(text).map_err(|e| TableError::Json(e.to_string()))?;
    if file.format != "cleave-priors" || file.version != 1 {
        return Err(TableError::Format {
            format: file.format,
            version: file.version,
        });
    }
    if file.precision != PRECISION as u32 {
        return Err(TableError::Precision(file.precision));
    }
    for (i, entry) in file.static_priors.iter().enumerate() {
        if file.static_priors[..i].iter().any(|e| e.bits == entry.bits) {
            return Err(TableError::Bits(entry.bits));
        }
    }
    Ok(file)
}

fn check_len(what: &str, actual: usize, channels: usize) -> Result<(), TableError> {
    if actual == channels {
        Ok(())
    } else {
        Err(TableError::Channels {
            what: what.to_owned(),
            actual,
            channels,
        })
    }
}

fn learned(channels: usize, f: FactorizedEntry) -> Result<Learned, TableError> {
    for (what, len) in [
        ("factorized scale", f.scale.len()),
        ("factorized medians", f.medians.len()),
        ("factorized offset", f.offset.len()),
        ("factorized cdf_length", f.cdf_length.len()),
        ("factorized quantized_cdf", f.quantized_cdf.len()),
    ] {
        check_len(what, len, channels)?;
    }
    for (channel, ((&gain, &median), &offset)) in
        f.scale.iter().zip(&f.medians).zip(&f.offset).enumerate()
    {
        if !gain.is_finite() || gain <= 0.0 || !median.is_finite() || offset.abs() > MAX_OFFSET {
            return Err(TableError::Values {
                what: "factorized prior".to_owned(),
                channel,
                detail: format!("scale {gain}, median {median}, offset {offset}"),
            });
        }
    }
    for (channel, (row, &len)) in f.quantized_cdf.iter().zip(&f.cdf_length).enumerate() {
        check_len(
            &format!("factorized quantized_cdf, channel {channel}"),
            row.len(),
            len as usize,
        )?;
    }
    let prior = Prior::from_compressai_cdfs(&f.quantized_cdf, &f.offset).map_err(|source| {
        TableError::Prior {
            what: "factorized prior".to_owned(),
            source,
        }
    })?;
    Ok(Learned {
        quantizer: Quantizer::Integer {
            gain: f.scale,
            median: f.medians,
        },
        prior,
        source: f.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_row(bits: u8) -> Vec<u32> {
        vec![(1u32 << PRECISION) >> bits; 1 << bits]
    }

    fn priors(bits: u8, channels: usize) -> String {
        serde_json::json!({
            "format": "cleave-priors", "version": 1, "precision": 16,
            "static": [{ "bits": bits, "pmf": vec![uniform_row(bits); channels] }],
            "factorized": {
                "source": "test", "scale": vec![1.0; channels], "medians": vec![0.0; channels],
                "offset": vec![-1; channels], "cdf_length": vec![4; channels],
                "quantized_cdf": vec![vec![0, 1 << 14, 1 << 15, 1 << 16]; channels],
            }
        })
        .to_string()
    }

    fn ranges(bits: u8, channels: usize) -> LevelRanges {
        LevelRanges {
            bits,
            low: vec![-1.0; channels],
            high: vec![1.0; channels],
        }
    }

    #[test]
    fn reads_levels_and_learned_prior() {
        let tables = CodingTables::new(3, &[ranges(4, 3)], Some(&priors(4, 3))).unwrap();
        assert_eq!(tables.levels().len(), 1);
        assert_eq!(tables.level(4).unwrap().prior.channels(), 3);
        assert!(tables.level(5).is_none());
        assert!(tables.learned().unwrap().prior.has_escape());
    }

    #[test]
    fn errors_name_what_is_wrong() {
        let err = |ranges: &[LevelRanges], json: Option<&str>| {
            CodingTables::new(3, ranges, json).unwrap_err().to_string()
        };
        assert!(err(&[ranges(4, 3)], None).contains("no static prior"));
        assert!(err(&[ranges(5, 3)], Some(&priors(4, 3))).contains("bit depth 5"));
        assert!(err(&[ranges(4, 2)], Some(&priors(4, 3))).contains("2 entries"));
        assert!(err(&[ranges(9, 3)], Some(&priors(4, 3))).contains("bit depth 9"));
        assert!(err(&[], Some("{")).contains("priors.json"));
        let wrong_precision = priors(4, 3).replace("\"precision\":16", "\"precision\":12");
        assert!(err(&[], Some(&wrong_precision)).contains("precision 12"));
        let mut inverted = ranges(4, 3);
        inverted.low[1] = 2.0;
        assert!(err(&[inverted], Some(&priors(4, 3))).contains("channel 1"));
        let bad_cdf = priors(4, 3).replace("16384,32768", "32768,16384");
        assert!(err(&[], Some(&bad_cdf)).contains("CDF"));
    }
}
