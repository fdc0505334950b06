//! Request deadlines from the wire: gRPC's `grpc-timeout` header and `cleave.v1`'s per-frame
//! `deadline_ms`.
//!
//! Both are relative ("this much time from now"), so they are turned into an [`Instant`] at
//! arrival; the batcher drops a request still queued at its deadline.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// The deadline a call's `grpc-timeout` header sets, counted from `now`.
///
/// The header is `<digits><unit>` with at most 8 digits and unit `H`, `M`, `S`, `m`
/// (milliseconds), `u` or `n` ([gRPC over HTTP/2]); anything else is ignored, as gRPC
/// servers do.
///
/// [gRPC over HTTP/2]: https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md
pub(crate) fn from_metadata(metadata: &MetadataMap, now: Instant) -> Option<Instant> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    now.checked_add(parse_grpc_timeout(text)?)
}

fn parse_grpc_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let value: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

/// The deadline of a frame that allows `deadline_ms` from `now` (0: none), or the call's.
pub(crate) fn for_frame(deadline_ms: u32, call: Option<Instant>, now: Instant) -> Option<Instant> {
    let frame = (deadline_ms > 0).then(|| now + Duration::from_millis(deadline_ms.into()));
    match (frame, call) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_by_the_protocol() {
        assert_eq!(parse_grpc_timeout("20m"), Some(Duration::from_millis(20)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("150u"), Some(Duration::from_micros(150)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_earlier_of_frame_and_call_deadlines_wins() {
        let now = Instant::now();
        let call = now + Duration::from_millis(50);
        assert_eq!(for_frame(0, None, now), None);
        assert_eq!(for_frame(0, Some(call), now), Some(call));
        assert_eq!(
            for_frame(10, Some(call), now),
            Some(now + Duration::from_millis(10))
        );
        assert_eq!(for_frame(100, Some(call), now), Some(call));
    }
}
