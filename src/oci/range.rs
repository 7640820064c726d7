//! Byte ranges: the `Range` request header on blob GETs (RFC 9110 §14 as the conformance suite
//! reads it) and the `Content-Range` header on chunked upload PATCHes (`<start>-<end>`,
//! inclusive, no `bytes ` prefix).

/// What a blob GET with a `Range` header should return for a blob of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    /// No usable single range: send the whole body with 200.
    Full,
    /// Send bytes `start..=end` with 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Interprets a `Range` header for a body of `len` bytes.
///
/// Malformed headers, other units and multi-range requests are ignored (a full 200 is always a
/// correct answer to them). `last < first` and a start at or past the end are unsatisfiable —
/// that is what the conformance suite expects.
pub fn interpret_range(header: &str, len: u64) -> RangeOutcome {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return RangeOutcome::Full;
    };
    if spec.contains(',') {
        return RangeOutcome::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeOutcome::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if first.is_empty() {
        // Suffix range: the last N bytes.
        let Some(n) = num(last) else {
            return RangeOutcome::Full;
        };
        if n == 0 || len == 0 {
            return RangeOutcome::Unsatisfiable;
        }
        let n = n.min(len);
        return RangeOutcome::Partial {
            start: len - n,
            end: len - 1,
        };
    }
    let Some(start) = num(first) else {
        return RangeOutcome::Full;
    };
    let end = if last.is_empty() {
        None
    } else {
        match num(last) {
            Some(e) => Some(e),
            None => return RangeOutcome::Full,
        }
    };
    if let Some(e) = end
        && e < start
    {
        return RangeOutcome::Unsatisfiable;
    }
    if start >= len {
        return RangeOutcome::Unsatisfiable;
    }
    let end = end.map_or(len - 1, |e| e.min(len - 1));
    RangeOutcome::Partial { start, end }
}

/// Parses an upload `Content-Range` (`start-end`, inclusive). A leading `bytes ` and a trailing
/// `/total` are tolerated because some clients send them.
pub fn parse_content_range(header: &str) -> Option<(u64, u64)> {
    let s = header.trim();
    let s = s
        .strip_prefix("bytes ")
        .or_else(|| s.strip_prefix("bytes="))
        .unwrap_or(s);
    let s = s.split_once('/').map_or(s, |(r, _)| r);
    let (a, b) = s.split_once('-')?;
    let digits = |x: &str| !x.is_empty() && x.len() <= 19 && x.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return None;
    }
    let (start, end) = (a.parse().ok()?, b.parse().ok()?);
    (end >= start).then_some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use RangeOutcome::*;

    #[test]
    fn conformance_table() {
        let len = 4000;
        assert_eq!(
            interpret_range("bytes=500-1499", len),
            Partial {
                start: 500,
                end: 1499
            }
        );
        assert_eq!(
            interpret_range("bytes=500-", len),
            Partial {
                start: 500,
                end: 3999
            }
        );
        assert_eq!(
            interpret_range("bytes=-500", len),
            Partial {
                start: 3500,
                end: 3999
            }
        );
        assert_eq!(
            interpret_range("bytes=2000-5000", len),
            Partial {
                start: 2000,
                end: 3999
            }
        );
        assert_eq!(interpret_range("bytes=500-0", len), Unsatisfiable);
        assert_eq!(interpret_range("bytes=5000-10000", len), Unsatisfiable);
        assert_eq!(interpret_range("bytes=4000-", len), Unsatisfiable);
        assert_eq!(
            interpret_range("bytes=-5000", len),
            Partial {
                start: 0,
                end: 3999
            }
        );
        assert_eq!(
            interpret_range("bytes=0-0", len),
            Partial { start: 0, end: 0 }
        );
    }

    #[test]
    fn ignores_what_it_cannot_serve_as_one_range() {
        for h in [
            "",
            "items=0-1",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=0-1,5-6",
            "bytes=1-x",
            "bytes 0-1",
        ] {
            assert_eq!(interpret_range(h, 100), Full, "{h:?}");
        }
        assert_eq!(interpret_range("bytes=99999999999999999999-", 100), Full);
    }

    #[test]
    fn empty_body_is_unsatisfiable() {
        assert_eq!(interpret_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(interpret_range("bytes=-1", 0), Unsatisfiable);
        assert_eq!(interpret_range("bytes=-0", 10), Unsatisfiable);
    }

    #[test]
    fn content_range() {
        assert_eq!(parse_content_range("0-99"), Some((0, 99)));
        assert_eq!(parse_content_range("100-100"), Some((100, 100)));
        assert_eq!(parse_content_range("bytes 0-99/100"), Some((0, 99)));
        for bad in [
            "",
            "-",
            "5-",
            "-5",
            "9-5",
            "a-b",
            "0-1-2",
            "+1-2",
            " - ",
            "99999999999999999999-1",
        ] {
            assert_eq!(parse_content_range(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn ranges_stay_inside_the_body(h in "bytes=[0-9]{0,6}-[0-9]{0,6}", len in 0u64..100_000) {
            if let Partial { start, end } = interpret_range(&h, len) {
                proptest::prop_assert!(start <= end && end < len);
            }
        }
    }
}
