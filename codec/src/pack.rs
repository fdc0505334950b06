//! Bit packing: the `raw` codec stores each affine symbol in exactly `bits` bits.
//!
//! Symbols are written least significant bit first into little-endian bytes; the last byte is
//! padded with zero bits, and a decoder refuses a payload whose length or padding is wrong, so
//! one tensor has exactly one raw encoding.

/// Bytes that `count` symbols of `bits` bits take.
pub(crate) fn packed_len(count: usize, bits: u8) -> usize {
    (count * usize::from(bits)).div_ceil(8)
}

/// Packs symbols, each in `0..2^bits`, into bytes.
pub(crate) fn pack(symbols: &[i32], bits: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(packed_len(symbols.len(), bits));
    let (mut acc, mut filled) = (0u32, 0u8);
    let mask = (1u32 << bits) - 1;
    for &s in symbols {
        acc |= (s as u32 & mask) << filled;
        filled += bits;
        while filled >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            filled -= 8;
        }
    }
    if filled > 0 {
        out.push(acc as u8);
    }
    out
}

/// Unpacks exactly `count` symbols of `bits` bits; `None` if the payload has the wrong length
/// or non-zero padding.
pub(crate) fn unpack(payload: &[u8], count: usize, bits: u8) -> Option<Vec<i32>> {
    if payload.len() != packed_len(count, bits) {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    let (mut acc, mut filled) = (0u32, 0u8);
    let mask = (1u32 << bits) - 1;
    let mut bytes = payload.iter();
    while out.len() < count {
        while filled < bits {
            acc |= u32::from(*bytes.next()?) << filled;
            filled += 8;
        }
        out.push((acc & mask) as i32);
        acc >>= bits;
        filled -= bits;
    }
    (acc == 0).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn padding_must_be_zero() {
        assert_eq!(pack(&[3, 1, 2], 2), vec![0b10_01_11]);
        assert_eq!(unpack(&[0b10_01_11], 3, 2), Some(vec![3, 1, 2]));
        assert_eq!(unpack(&[0b1110_0111], 3, 2), None);
        assert_eq!(unpack(&[0, 0], 3, 2), None);
    }

    proptest! {
        #[test]
        fn round_trip(bits in 2u8..=8, seed in proptest::collection::vec(any::<u8>(), 0..300)) {
            let symbols: Vec<i32> = seed.iter().map(|&s| i32::from(s) & ((1 << bits) - 1)).collect();
            let packed = pack(&symbols, bits);
            prop_assert_eq!(packed.len(), packed_len(symbols.len(), bits));
            prop_assert_eq!(unpack(&packed, symbols.len(), bits), Some(symbols));
        }
    }
}
