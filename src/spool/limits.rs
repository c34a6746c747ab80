//! Per-job resource limits: the job file's `limits` object, the
//! configuration's `[limits]` table (defaults, and a ceiling no job may
//! pass), and the limits a run gets from the two.
//!
//! How a limit is enforced is the worker's business (see
//! `worker::limits`); this module only reads, checks and resolves values.

use std::fmt;
use std::num::NonZeroU32;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The smallest `memory_max`: 1 MiB. Below it not even the shell starts.
pub const MIN_MEMORY: u64 = 1 << 20;
/// The largest `memory_max`: 1 PiB.
pub const MAX_MEMORY: u64 = 1 << 50;
/// The largest `tasks_max`: the kernel's highest `pid_max`.
pub const MAX_TASKS: u32 = 4_194_304;
/// The largest `cpu_max`, in percent of one CPU: 1000 CPUs.
pub const MAX_CPU_PERCENT: u32 = 100_000;

/// A memory size in bytes. Written as a whole number of bytes or as a
/// string with a `K`, `M`, `G`, `T` or `P` suffix (powers of 1024, as in
/// systemd's `MemoryMax=`): `67108864`, `"64M"`, `"1.5G"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(u64);

impl Bytes {
    /// `n` bytes, if it lies in [`MIN_MEMORY`]..=[`MAX_MEMORY`].
    pub fn new(n: u64) -> Result<Bytes, String> {
        if (MIN_MEMORY..=MAX_MEMORY).contains(&n) {
            Ok(Bytes(n))
        } else {
            Err(format!(
                "\"memory_max\" must be from 1M to 1P (1048576 to {MAX_MEMORY} bytes), not {n}"
            ))
        }
    }

    /// The number of bytes.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Reads `"64M"`, `"1.5G"`, `"4096K"` or a plain number of bytes.
    pub fn parse(s: &str) -> Result<Bytes, String> {
        let bad = || {
            format!(
                "\"memory_max\" must be a number of bytes or a size such as \"512M\" or \"2G\", not {s:?}"
            )
        };
        let t = s.trim();
        let (num, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    'P' => 50,
                    _ => return Err(bad()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(bad());
        }
        let bytes = match num.split_once('.') {
            None => num
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(1u64 << shift)),
            Some((whole, frac)) if shift > 0 && !frac.is_empty() && !frac.contains('.') => {
                // Exact for any fraction a person writes: whole and
                // fraction scaled separately, rounded down to a byte.
                let scale = 1u64 << shift;
                let w = if whole.is_empty() {
                    Some(0)
                } else {
                    whole.parse::<u64>().ok()
                };
                let digits = frac.len().min(9);
                let f: u64 = frac[..digits].parse().ok().unwrap_or(0);
                let f_bytes = u128::from(f) * u128::from(scale) / 10u128.pow(digits as u32);
                w.and_then(|w| w.checked_mul(scale))
                    .and_then(|w| w.checked_add(u64::try_from(f_bytes).ok()?))
            }
            Some(_) => None,
        };
        match bytes {
            Some(n) => Bytes::new(n),
            None => Err(bad()),
        }
    }
}

impl fmt::Display for Bytes {
    /// The shortest exact form: `64M`, `1536K`, `1000000`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (suffix, shift) in [("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            if self.0.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{suffix}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => match n.as_u64() {
                Some(n) => Bytes::new(n),
                None => Err(format!(
                    "\"memory_max\" must be a whole number of bytes, not {n}"
                )),
            },
            Value::String(s) => Bytes::parse(&s),
            other => Err(format!(
                "\"memory_max\" must be a number of bytes or a size such as \"512M\", not {}",
                kind(&other)
            )),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// A CPU quota in percent of one CPU. Written as a share of one CPU
/// (`0.5`, `2`) or as a percentage (`"50%"`, `"200%"`), as in systemd's
/// `CPUQuota=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CpuQuota(u32);

impl CpuQuota {
    /// `percent` of one CPU, if it lies in 1..=[`MAX_CPU_PERCENT`].
    pub fn percent(percent: u64) -> Result<CpuQuota, String> {
        match u32::try_from(percent) {
            Ok(p) if (1..=MAX_CPU_PERCENT).contains(&p) => Ok(CpuQuota(p)),
            _ => Err(format!(
                "\"cpu_max\" must be from 1% to {MAX_CPU_PERCENT}% of one CPU, not {percent}%"
            )),
        }
    }

    /// The quota in percent of one CPU.
    pub fn get(self) -> u32 {
        self.0
    }

    /// Reads `"50%"`, or a share such as `"0.5"`.
    pub fn parse(s: &str) -> Result<CpuQuota, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            return match p.trim().parse::<u64>() {
                Ok(p) => CpuQuota::percent(p),
                Err(_) => Err(format!(
                    "\"cpu_max\" must be a whole percentage such as \"50%\" or a share of one CPU such as 0.5, not {s:?}"
                )),
            };
        }
        match t.parse::<f64>() {
            Ok(share) => CpuQuota::share(share),
            Err(_) => Err(format!(
                "\"cpu_max\" must be a share of one CPU such as 0.5 or a percentage such as \"50%\", not {s:?}"
            )),
        }
    }

    fn share(share: f64) -> Result<CpuQuota, String> {
        let percent = (share * 100.0).round();
        if !percent.is_finite() || !(1.0..=f64::from(MAX_CPU_PERCENT)).contains(&percent) {
            return Err(format!(
                "\"cpu_max\" must be a share of one CPU from 0.01 to {}, not {share}",
                MAX_CPU_PERCENT / 100
            ));
        }
        CpuQuota::percent(percent as u64)
    }
}

impl fmt::Display for CpuQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0)
    }
}

impl Serialize for CpuQuota {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for CpuQuota {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Number(n) => match n.as_f64() {
                Some(share) => CpuQuota::share(share),
                None => Err(format!("\"cpu_max\" cannot be {n}")),
            },
            Value::String(s) => CpuQuota::parse(&s),
            other => Err(format!(
                "\"cpu_max\" must be a share of one CPU such as 0.5 or a percentage such as \"50%\", not {}",
                kind(&other)
            )),
        }
        .map_err(serde::de::Error::custom)
    }
}

fn de_tasks<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NonZeroU32>, D::Error> {
    let value = Value::deserialize(d)?;
    if value.is_null() {
        return Ok(None);
    }
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (1..=MAX_TASKS).contains(n))
        .and_then(NonZeroU32::new)
        .map(Some)
        .ok_or_else(|| {
            serde::de::Error::custom(format!(
                "\"tasks_max\" must be a whole number from 1 to {MAX_TASKS}, not {}",
                kind(&value)
            ))
        })
}

/// Reads a job file's `limits`: an object (serde would also fill the
/// struct from an array), or `null` for none.
pub fn de_job_limits<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Limits>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v @ Value::Object(_) => serde_json::from_value(v)
            .map(Some)
            .map_err(serde::de::Error::custom),
        other => Err(serde::de::Error::custom(format!(
            "\"limits\" must be an object such as {{\"memory_max\": \"512M\"}}, not {}",
            kind(&other)
        ))),
    }
}

/// A JSON value as an error message shows it.
fn kind(value: &Value) -> String {
    match value {
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
        Value::String(s) if s.len() > 40 => "a long string".into(),
        other => other.to_string(),
    }
}

/// Resource limits of one run; each absent limit is not set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// The most memory the job may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<Bytes>,
    /// The most processes (and threads) the job may have at once.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_tasks"
    )]
    pub tasks_max: Option<NonZeroU32>,
    /// The most CPU the job may use, in percent of one CPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<CpuQuota>,
}

impl Limits {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// Each limit in `self` and not in `base`, else `base`'s.
    fn or(self, base: Limits) -> Limits {
        Limits {
            memory_max: self.memory_max.or(base.memory_max),
            tasks_max: self.tasks_max.or(base.tasks_max),
            cpu_max: self.cpu_max.or(base.cpu_max),
        }
    }

    /// Each limit set here that exceeds the one in `ceiling`, as
    /// `(key, value, ceiling)` text.
    fn above(&self, ceiling: &Limits) -> Vec<(&'static str, String, String)> {
        fn over<T: PartialOrd + fmt::Display>(
            key: &'static str,
            v: Option<T>,
            c: Option<T>,
        ) -> Option<(&'static str, String, String)> {
            match (v, c) {
                (Some(v), Some(c)) if v > c => Some((key, v.to_string(), c.to_string())),
                _ => None,
            }
        }
        [
            over("memory_max", self.memory_max, ceiling.memory_max),
            over("tasks_max", self.tasks_max, ceiling.tasks_max),
            over("cpu_max", self.cpu_max, ceiling.cpu_max),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl fmt::Display for Limits {
    /// `memory_max 64M, tasks_max 32, cpu_max 50%`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = [
            self.memory_max.map(|m| format!("memory_max {m}")),
            self.tasks_max.map(|t| format!("tasks_max {t}")),
            self.cpu_max.map(|c| format!("cpu_max {c}")),
        ]
        .into_iter()
        .flatten()
        .collect();
        f.write_str(&parts.join(", "))
    }
}

/// The limits a run had and what enforced each, as its result records
/// them: `{"memory_max": 67108864, "enforced_by": {"memory_max":
/// "RLIMIT_DATA"}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The memory limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<Bytes>,
    /// The task limit.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "de_tasks"
    )]
    pub tasks_max: Option<NonZeroU32>,
    /// The CPU limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<CpuQuota>,
    /// For each limit, how it was enforced (`RLIMIT_DATA`, ...), or why it
    /// was not.
    #[serde(default)]
    pub enforced_by: std::collections::BTreeMap<String, String>,
}

impl Applied {
    /// The limits themselves.
    pub fn limits(&self) -> Limits {
        Limits {
            memory_max: self.memory_max,
            tasks_max: self.tasks_max,
            cpu_max: self.cpu_max,
        }
    }
}

impl fmt::Display for Applied {
    /// `memory_max 64M (RLIMIT_DATA), cpu_max 50% (RLIMIT_CPU=2s)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let by = |key: &str| {
            self.enforced_by
                .get(key)
                .map_or_else(String::new, |b| format!(" ({b})"))
        };
        let parts: Vec<String> = [
            self.memory_max
                .map(|m| format!("memory_max {m}{}", by("memory_max"))),
            self.tasks_max
                .map(|t| format!("tasks_max {t}{}", by("tasks_max"))),
            self.cpu_max
                .map(|c| format!("cpu_max {c}{}", by("cpu_max"))),
        ]
        .into_iter()
        .flatten()
        .collect();
        f.write_str(&parts.join(", "))
    }
}

/// The configuration's `[limits]` table: the limits of a job that sets
/// none, and `[limits.ceiling]`, the most any job may ask for (a job that
/// sets a limit neither here nor in its file gets the ceiling).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Default `memory_max`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<Bytes>,
    /// Default `tasks_max`.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "de_tasks")]
    pub tasks_max: Option<NonZeroU32>,
    /// Default `cpu_max`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_max: Option<CpuQuota>,
    /// The most a job may ask for.
    #[serde(skip_serializing_if = "Limits::is_empty")]
    pub ceiling: Limits,
}

impl LimitsConfig {
    /// The defaults, as limits.
    pub fn defaults(&self) -> Limits {
        Limits {
            memory_max: self.memory_max,
            tasks_max: self.tasks_max,
            cpu_max: self.cpu_max,
        }
    }

    /// Why this table cannot be right: a default above the ceiling.
    pub fn check(&self) -> Result<(), String> {
        match self.defaults().above(&self.ceiling).first() {
            Some((key, v, c)) => Err(format!(
                "limits.{key} = {v} is above limits.ceiling.{key} = {c}"
            )),
            None => Ok(()),
        }
    }

    /// The limits a run of a job that asks for `asked` gets: each of its
    /// own, else the default, else the ceiling. A job that asks for more
    /// than the ceiling is refused, with the reason.
    pub fn resolve(&self, asked: Option<&Limits>) -> Result<Limits, String> {
        let asked = asked.copied().unwrap_or_default();
        if let Some((key, v, c)) = asked.above(&self.ceiling).first() {
            return Err(format!(
                "\"limits\".\"{key}\" {v} is above the most this host allows, {c} (limits.ceiling.{key} in the configuration)"
            ));
        }
        Ok(asked.or(self.defaults()).or(self.ceiling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_systemd_writes_them_and_print_back_exactly() {
        for (text, bytes, shown) in [
            ("64M", 64 << 20, "64M"),
            ("64m", 64 << 20, "64M"),
            ("1.5G", 3 << 29, "1536M"),
            ("4096K", 4 << 20, "4M"),
            ("1048577", (1 << 20) + 1, "1048577"),
            (" 2G ", 2 << 30, "2G"),
            ("1P", 1 << 50, "1P"),
        ] {
            let b = Bytes::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(b.get(), bytes, "{text}");
            assert_eq!(b.to_string(), shown, "{text}");
        }
        for bad in [
            "", "M", "64X", "-1M", "1.2.3G", "1.5", "0", "1023K", "2P", "64 M B", "1e9",
        ] {
            let err = Bytes::parse(bad).unwrap_err();
            assert!(err.contains("\"memory_max\""), "{bad}: {err}");
        }
    }

    #[test]
    fn cpu_quotas_read_as_a_share_or_a_percentage() {
        let q = |v: &str| serde_json::from_str::<CpuQuota>(v).map(|q| q.get());
        assert_eq!(q("0.5").unwrap(), 50);
        assert_eq!(q("2").unwrap(), 200);
        assert_eq!(q("\"50%\"").unwrap(), 50);
        assert_eq!(q("\"0.25\"").unwrap(), 25);
        for bad in [
            "0",
            "0.001",
            "-1",
            "1e9",
            "\"x%\"",
            "\"12.5%\"",
            "true",
            "[1]",
        ] {
            let err = q(bad).unwrap_err().to_string();
            assert!(err.contains("\"cpu_max\""), "{bad}: {err}");
        }
        assert_eq!(CpuQuota::percent(50).unwrap().to_string(), "50%");
    }

    #[test]
    fn bad_values_name_the_key_and_unknown_keys_are_refused() {
        let l = |v: &str| serde_json::from_str::<Limits>(v);
        let ok = l(r#"{"memory_max":"64M","tasks_max":32,"cpu_max":"50%"}"#).unwrap();
        assert_eq!(ok.to_string(), "memory_max 64M, tasks_max 32, cpu_max 50%");
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            r#"{"memory_max":67108864,"tasks_max":32,"cpu_max":"50%"}"#
        );
        for (bad, want) in [
            (r#"{"tasks_max":0}"#, "\"tasks_max\" must be"),
            (r#"{"tasks_max":-3}"#, "\"tasks_max\" must be"),
            (r#"{"tasks_max":"8"}"#, "\"tasks_max\" must be"),
            (r#"{"tasks_max":4194305}"#, "\"tasks_max\" must be"),
            (r#"{"memory_max":1.5}"#, "\"memory_max\" must be"),
            (r#"{"memory_max":{}}"#, "\"memory_max\" must be"),
            (r#"{"memory":"1G"}"#, "unknown field `memory`"),
        ] {
            let err = l(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
    }

    #[test]
    fn a_run_gets_its_own_limit_else_the_default_else_the_ceiling() {
        let config: LimitsConfig = toml::from_str(
            "memory_max = \"1G\"\n[ceiling]\nmemory_max = \"4G\"\ntasks_max = 256\n",
        )
        .unwrap();
        config.check().unwrap();
        let got = config.resolve(None).unwrap();
        assert_eq!(got.to_string(), "memory_max 1G, tasks_max 256");
        let asked: Limits = serde_json::from_str(r#"{"memory_max":"2G","cpu_max":0.5}"#).unwrap();
        let got = config.resolve(Some(&asked)).unwrap();
        assert_eq!(got.to_string(), "memory_max 2G, tasks_max 256, cpu_max 50%");
        let greedy: Limits = serde_json::from_str(r#"{"memory_max":"8G"}"#).unwrap();
        let err = config.resolve(Some(&greedy)).unwrap_err();
        assert!(
            err.contains("8G is above the most this host allows, 4G"),
            "{err}"
        );
        let none = LimitsConfig::default();
        assert!(none.resolve(None).unwrap().is_empty());
        let wrong: LimitsConfig =
            toml::from_str("tasks_max = 512\n[ceiling]\ntasks_max = 256\n").unwrap();
        assert!(
            wrong
                .check()
                .unwrap_err()
                .contains("limits.tasks_max = 512")
        );
    }
}
