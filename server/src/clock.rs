//! Wall-clock time as the relay stores it: milliseconds since the Unix epoch (UTC), rendered and
//! parsed as RFC 3339 at the edges (CLI, HTTP, exports).

use crate::error::{Error, Result};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// RFC 3339 rendering (UTC, millisecond precision) of a stored time.
pub fn format_ms(ms: i64) -> String {
    match jiff::Timestamp::from_millisecond(ms) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => ms.to_string(),
    }
}

/// Parse a time given by a person or a script: RFC 3339 (`2026-11-26T14:02:00Z`), a date
/// (`2026-11-26`, midnight UTC), or an integer number of milliseconds since the epoch.
pub fn parse_time(input: &str) -> Result<i64> {
    let input = input.trim();
    if let Ok(ms) = input.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(ts) = input.parse::<jiff::Timestamp>() {
        return Ok(ts.as_millisecond());
    }
    if input.parse::<jiff::civil::Date>().is_ok()
        && let Ok(ts) = format!("{input}T00:00:00Z").parse::<jiff::Timestamp>()
    {
        return Ok(ts.as_millisecond());
    }
    Err(Error::BadRequest(format!(
        "time {input:?} is not RFC 3339 (2026-11-26T14:02:00Z), a date (2026-11-26) or milliseconds since the epoch"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_in_all_accepted_forms_and_render_back() {
        let ms = parse_time("2026-11-26T14:02:00Z").expect("rfc3339");
        assert_eq!(format_ms(ms), "2026-11-26T14:02:00.000Z");
        assert_eq!(
            parse_time("2026-11-26").expect("date"),
            parse_time("2026-11-26T00:00:00Z").expect("midnight")
        );
        assert_eq!(parse_time("1234").expect("ms"), 1234);
        assert!(matches!(parse_time("yesterday"), Err(Error::BadRequest(_))));
    }
}
