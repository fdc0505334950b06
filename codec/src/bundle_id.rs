//! The identity of a model bundle: 32 bytes (a sha256), shown as 64 hex digits.
//!
//! Head and tail compare bundle ids before they exchange frames, and every frame carries a
//! [`BundleTag`] (the id's first 8 bytes) of the bundle it was coded for, so features from one
//! model never reach another model's tail. The tag keeps the frame header within 32 bytes; the
//! full id is compared once per stream, when head and tail negotiate.

use std::fmt;
use std::str::FromStr;

/// A bundle's id: the sha256 of its manifest (which lists the sha256 of every model file).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BundleId([u8; 32]);

impl BundleId {
    /// Wraps raw digest bytes.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The raw digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The tag frames carry: the first 8 bytes.
    pub fn tag(&self) -> BundleTag {
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&self.0[..8]);
        BundleTag(tag)
    }

    /// The first 12 hex digits, for log lines and tables.
    pub fn short(&self) -> String {
        self.to_string()[..12].to_owned()
    }
}

impl fmt::Display for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// Lower-case hex, two digits a byte.
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
}

impl fmt::Debug for BundleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BundleId({self})")
    }
}

/// The first 8 bytes of a [`BundleId`], as a frame header carries it; shown as 16 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct BundleTag(pub [u8; 8]);

impl fmt::Display for BundleTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for BundleTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BundleTag({self})")
    }
}

/// A string that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a bundle id is 64 hex digits, got {0:?}")]
pub struct ParseBundleIdError(pub String);

impl FromStr for BundleId {
    type Err = ParseBundleIdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || ParseBundleIdError(text.chars().take(80).collect());
        if text.len() != 64 || !text.is_ascii() {
            return Err(err());
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| err())?;
        }
        Ok(Self(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let id = BundleId::from_bytes(std::array::from_fn(|i| i as u8 * 7));
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<BundleId>(), Ok(id));
        assert_eq!(id.short(), &text[..12]);
        assert_eq!(id.tag().to_string(), &text[..16]);
    }

    #[test]
    fn rejects_bad_hex() {
        assert!("zz".repeat(32).parse::<BundleId>().is_err());
        assert!("ab".parse::<BundleId>().is_err());
        assert!("é".repeat(32).parse::<BundleId>().is_err());
    }
}
