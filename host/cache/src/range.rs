//! HTTP range requests (RFC 9110 §14) and the preconditions that gate them.

/// What a request's `Range` field asks of a representation of a known length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable `Range`: absent, syntactically invalid, in another unit, or too
    /// fragmented to be worth honouring. RFC 9110 §14.2 says to ignore it: send 200.
    Whole,
    /// The satisfiable ranges, sorted and with overlapping or adjacent ones coalesced,
    /// as inclusive `(first, last)` byte positions. One entry gets a plain 206; several
    /// get a `multipart/byteranges` 206.
    Ranges(Vec<(u64, u64)>),
    /// Valid syntax, but no range overlaps the representation: 416.
    Unsatisfiable,
}

/// More ranges than this in one request are ignored (RFC 9110 §14.2 lets a server ignore
/// or reject many small or overlapping ranges, a known denial-of-service vector).
pub const MAX_RANGES: usize = 16;

enum Spec {
    From(u64, Option<u64>),
    Suffix(u64),
}

/// Interprets a `Range` field value against a representation of `len` bytes.
pub fn parse(value: &str, len: u64) -> RangeRequest {
    let Some(specs) = parse_specs(value) else {
        return RangeRequest::Whole;
    };
    if specs.len() > MAX_RANGES || len == 0 {
        // A zero-length representation has no byte to point at; send it whole.
        return RangeRequest::Whole;
    }
    let mut ranges: Vec<(u64, u64)> = specs
        .into_iter()
        .filter_map(|spec| match spec {
            Spec::From(first, _) if first >= len => None,
            Spec::From(first, last) => Some((first, last.map_or(len - 1, |l| l.min(len - 1)))),
            Spec::Suffix(0) => None,
            Spec::Suffix(n) => Some((len.saturating_sub(n), len - 1)),
        })
        .collect();
    if ranges.is_empty() {
        return RangeRequest::Unsatisfiable;
    }
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match merged.last_mut() {
            Some(prev) if first <= prev.1.saturating_add(1) => prev.1 = prev.1.max(last),
            _ => merged.push((first, last)),
        }
    }
    RangeRequest::Ranges(merged)
}

/// `ranges-specifier = range-unit "=" range-set`; None when it does not parse.
fn parse_specs(value: &str) -> Option<Vec<Spec>> {
    let (unit, set) = value.trim().split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    // range-set = 1#range-spec: empty list elements are allowed and skipped (RFC 9110 §5.6.1).
    for spec in set.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (first, last) = spec.split_once('-')?;
        let spec = if first.is_empty() {
            Spec::Suffix(digits(last)?)
        } else {
            let first = digits(first)?;
            let last = if last.is_empty() {
                None
            } else {
                Some(digits(last)?)
            };
            if last.is_some_and(|last| last < first) {
                // "first-pos > last-pos" makes the whole field invalid (§14.1.1).
                return None;
            }
            Spec::From(first, last)
        };
        specs.push(spec);
    }
    (!specs.is_empty()).then_some(specs)
}

fn digits(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Positions beyond u64 cannot be satisfied anyway; clamp rather than refuse.
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Whether an `If-None-Match` field value matches `etag` (weak comparison, §13.1.2).
pub fn if_none_match(value: &str, etag: &str) -> bool {
    let value = value.trim();
    value == "*" || entity_tags(value).any(|tag| tag.trim_start_matches("W/") == etag)
}

/// Whether an `If-Range` field value lets the range through (§13.1.5): only a strong
/// entity tag equal to ours. A date cannot match, as no `Last-Modified` is sent.
pub fn if_range(value: &str, etag: &str) -> bool {
    value.trim() == etag
}

fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: u64 = 1000;

    fn ranges(value: &str) -> RangeRequest {
        parse(value, LEN)
    }

    #[test]
    fn single_ranges() {
        assert_eq!(ranges("bytes=0-0"), RangeRequest::Ranges(vec![(0, 0)]));
        assert_eq!(
            ranges("bytes=999-999"),
            RangeRequest::Ranges(vec![(999, 999)])
        );
        assert_eq!(ranges("bytes=500-"), RangeRequest::Ranges(vec![(500, 999)]));
        assert_eq!(
            ranges("bytes=990-5000"),
            RangeRequest::Ranges(vec![(990, 999)])
        );
        assert_eq!(ranges("BYTES = 1-2"), RangeRequest::Ranges(vec![(1, 2)]));
    }

    #[test]
    fn suffix_ranges() {
        assert_eq!(ranges("bytes=-1"), RangeRequest::Ranges(vec![(999, 999)]));
        assert_eq!(ranges("bytes=-100"), RangeRequest::Ranges(vec![(900, 999)]));
        assert_eq!(ranges("bytes=-5000"), RangeRequest::Ranges(vec![(0, 999)]));
        assert_eq!(ranges("bytes=-0"), RangeRequest::Unsatisfiable);
    }

    #[test]
    fn beyond_the_end_is_unsatisfiable() {
        assert_eq!(ranges("bytes=1000-"), RangeRequest::Unsatisfiable);
        assert_eq!(
            ranges("bytes=1000-2000, 5000-"),
            RangeRequest::Unsatisfiable
        );
        assert_eq!(
            ranges("bytes=99999999999999999999999-"),
            RangeRequest::Unsatisfiable
        );
        // One satisfiable range is enough.
        assert_eq!(
            ranges("bytes=2000-, 10-19"),
            RangeRequest::Ranges(vec![(10, 19)])
        );
    }

    #[test]
    fn malformed_ranges_are_ignored() {
        for value in [
            "",
            "bytes",
            "bytes=",
            "bytes=,",
            "bytes=a-b",
            "bytes=5-1",
            "bytes=--5",
            "bytes=1-2-3",
            "bytes=+1-2",
            "items=0-1",
            "bytes=0x10-",
            "bytes=- 5",
            "bytes 0-1",
        ] {
            assert_eq!(ranges(value), RangeRequest::Whole, "{value:?}");
        }
    }

    #[test]
    fn overlapping_and_adjacent_ranges_coalesce() {
        assert_eq!(
            ranges("bytes=0-9,10-19"),
            RangeRequest::Ranges(vec![(0, 19)])
        );
        assert_eq!(
            ranges("bytes=50-60, 0-9, 5-20"),
            RangeRequest::Ranges(vec![(0, 20), (50, 60)])
        );
        assert_eq!(ranges("bytes=0-,-10"), RangeRequest::Ranges(vec![(0, 999)]));
    }

    #[test]
    fn too_many_ranges_are_ignored() {
        let many = (0..=MAX_RANGES)
            .map(|i| format!("{}-{}", i * 10, i * 10))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(ranges(&format!("bytes={many}")), RangeRequest::Whole);
    }

    #[test]
    fn empty_representation_is_sent_whole() {
        assert_eq!(parse("bytes=0-", 0), RangeRequest::Whole);
    }

    #[test]
    fn preconditions() {
        let etag = "\"abc\"";
        assert!(if_none_match("\"abc\"", etag));
        assert!(if_none_match("W/\"abc\"", etag));
        assert!(if_none_match("\"x\", \"abc\"", etag));
        assert!(if_none_match("*", etag));
        assert!(!if_none_match("\"abd\"", etag));
        assert!(if_range("\"abc\"", etag));
        assert!(!if_range("W/\"abc\"", etag));
        assert!(!if_range("Sat, 21 Nov 2026 10:00:00 GMT", etag));
    }
}
