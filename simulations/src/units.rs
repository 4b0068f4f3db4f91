//! Byte sizes and link rates as scenario files write them: `"200 MB"`, `"128 MiB"`,
//! `"100 Mbit/s"`, `"12.5 MB/s"`, or plain numbers (bytes, bytes per second).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A size that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot read {text:?} as {what}")]
pub struct UnitError {
    /// The text.
    pub text: String,
    /// What it should have been.
    pub what: &'static str,
}

/// A number of bytes. Decimal (`kB`, `MB`, `GB`) and binary (`KiB`, `MiB`, `GiB`) units.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Bytes(pub u64);

/// A link rate in bytes per second. Bit units (`kbit/s`, `Mbit/s`, `Gbit/s`) and byte units
/// (`kB/s`, `MB/s`, `GB/s`, `MiB/s`).
#[derive(Clone, Copy, Debug, PartialEq, PartialOrd, Default)]
pub struct Rate(pub f64);

impl Rate {
    /// Bytes per second.
    pub fn bytes_per_sec(self) -> f64 {
        self.0
    }

    /// Megabits per second, for reports.
    pub fn mbit(self) -> f64 {
        self.0 * 8.0 / 1e6
    }
}

fn split(text: &str) -> (f64, String, bool) {
    let t = text.trim();
    let end = t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(t.len());
    let number = t[..end].replace('_', "");
    let unit = t[end..].trim().to_owned();
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n >= 0.0 => (n, unit, true),
        _ => (0.0, unit, false),
    }
}

fn byte_factor(unit: &str) -> Option<f64> {
    Some(match unit {
        "" | "B" => 1.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    })
}

impl FromStr for Bytes {
    type Err = UnitError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || UnitError { text: text.to_owned(), what: "a size (e.g. 200 MB, 1 MiB)" };
        let (n, unit, ok) = split(text);
        let factor = byte_factor(&unit).ok_or_else(err)?;
        if !ok {
            return Err(err());
        }
        Ok(Bytes((n * factor).round() as u64))
    }
}

impl FromStr for Rate {
    type Err = UnitError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = || UnitError { text: text.to_owned(), what: "a rate (e.g. 100 Mbit/s, 10 MB/s)" };
        let (n, unit, ok) = split(text);
        if !ok {
            return Err(err());
        }
        let factor = match unit.as_str() {
            "kbit/s" | "Kbit/s" => 1e3 / 8.0,
            "Mbit/s" => 1e6 / 8.0,
            "Gbit/s" => 1e9 / 8.0,
            "" | "B/s" => 1.0,
            u => match u.strip_suffix("/s").and_then(byte_factor) {
                Some(f) => f,
                None => return Err(err()),
            },
        };
        let rate = n * factor;
        if rate <= 0.0 {
            return Err(err());
        }
        Ok(Rate(rate))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b >= 1e9 {
            write!(f, "{:.2} GB", b / 1e9)
        } else if b >= 1e6 {
            write!(f, "{:.1} MB", b / 1e6)
        } else if b >= 1e3 {
            write!(f, "{:.1} kB", b / 1e3)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.mbit();
        if m >= 1000.0 { write!(f, "{:.1} Gbit/s", m / 1000.0) } else { write!(f, "{m:.1} Mbit/s") }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrText {
    Num(f64),
    Text(String),
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) if n >= 0.0 => Ok(Bytes(n as u64)),
            NumOrText::Num(n) => Err(serde::de::Error::custom(format!("negative size {n}"))),
            NumOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumOrText::deserialize(d)? {
            NumOrText::Num(n) if n > 0.0 => Ok(Rate(n)),
            NumOrText::Num(n) => Err(serde::de::Error::custom(format!("rate {n} not positive"))),
            NumOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_parse() {
        assert_eq!("200 MB".parse::<Bytes>(), Ok(Bytes(200_000_000)));
        assert_eq!("128MiB".parse::<Bytes>(), Ok(Bytes(128 << 20)));
        assert_eq!("4096".parse::<Bytes>(), Ok(Bytes(4096)));
        assert_eq!("50 Mbit/s".parse::<Rate>(), Ok(Rate(6_250_000.0)));
        assert_eq!("10 Gbit/s".parse::<Rate>(), Ok(Rate(1.25e9)));
        assert_eq!("2 MiB/s".parse::<Rate>(), Ok(Rate(2.0 * 1024.0 * 1024.0)));
        assert!("fast".parse::<Rate>().is_err());
        assert!("0 Mbit/s".parse::<Rate>().is_err());
        assert!("12 parsecs".parse::<Bytes>().is_err());
    }
}
