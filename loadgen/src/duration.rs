//! Human durations as people write them in flags, TOML and thresholds:
//! `250ms`, `1.5s`, `2m`, `1h`, `800us`.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
#[error("invalid duration {0:?}: write a number and a unit, e.g. 250ms, 1.5s, 2m, 1h")]
pub struct ParseDurationError(pub String);

/// Parses `250ms`, `1.5s`, `2m`, `1h`, `800us`.
pub fn parse(text: &str) -> Result<Duration, ParseDurationError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| ParseDurationError(text.into()))?;
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| ParseDurationError(text.into()))?;
    let seconds = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(ParseDurationError(text.into())),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| ParseDurationError(text.into()))
}

/// Writes a duration the way [`parse`] reads it back, choosing a readable unit.
pub fn format(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 1.0 {
        format!("{}s", trim(s))
    } else if s >= 1e-3 {
        format!("{}ms", trim(s * 1e3))
    } else {
        format!("{}us", trim(s * 1e6))
    }
}

fn trim(v: f64) -> String {
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// `#[serde(with = "duration::serde_str")]`: durations as strings like `"5s"`.
pub mod serde_str {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_parse_and_format_round_trip() {
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse("800us").unwrap(), Duration::from_micros(800));
        for text in ["250ms", "1.5s", "800us", "30s"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        for bad in ["", "5", "ms", "5 parsecs", "-1s"] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
