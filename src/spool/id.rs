//! Job ids and job file names.

use std::ffi::OsStr;
use std::fmt;
use std::str::FromStr;

/// The longest id the spool accepts, in bytes (ids are ASCII).
pub const MAX_ID_LEN: usize = 128;

/// Why a string is not a valid job id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is the empty string.
    #[error("the id is empty")]
    Empty,
    /// The id is longer than [`MAX_ID_LEN`].
    #[error("the id is {0} characters long; at most {MAX_ID_LEN} are allowed")]
    TooLong(usize),
    /// The id starts with a dot.
    #[error("the id starts with a dot")]
    LeadingDot,
    /// The id holds a character outside `[A-Za-z0-9._-]`.
    #[error("the id contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadChar(char),
}

/// A validated job id: 1 to 128 characters of `[A-Za-z0-9._-]`, no leading dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(String);

impl JobId {
    /// Checks `s` and wraps it.
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(IdError::BadChar(c));
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        if s.starts_with('.') {
            return Err(IdError::LeadingDot);
        }
        Ok(Self(s.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for JobId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The two forms a job file takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `<id>.json`: a JSON job description.
    Json,
    /// `<id>.sh`: the whole file is a bash script.
    Script,
}

impl JobKind {
    /// The file name extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            JobKind::Json => "json",
            JobKind::Script => "sh",
        }
    }

    /// Both kinds, in the order clients look for them.
    pub const ALL: [JobKind; 2] = [JobKind::Json, JobKind::Script];
}

/// Why a file name in `pending/` is not a job file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is not valid UTF-8.
    #[error("the file name is not valid UTF-8")]
    NotUtf8,
    /// The name ends neither in `.json` nor in `.sh`.
    #[error("the file name ends neither in .json nor in .sh")]
    NoJobExtension,
    /// The part before the extension is not a valid id.
    #[error("bad id: {0}")]
    BadId(#[from] IdError),
}

/// Splits a job file name into its id and kind.
pub fn parse_job_file_name(name: &OsStr) -> Result<(JobId, JobKind), NameError> {
    let name = name.to_str().ok_or(NameError::NotUtf8)?;
    let (stem, kind) = if let Some(stem) = name.strip_suffix(".json") {
        (stem, JobKind::Json)
    } else if let Some(stem) = name.strip_suffix(".sh") {
        (stem, JobKind::Script)
    } else {
        return Err(NameError::NoJobExtension);
    };
    Ok((JobId::new(stem)?, kind))
}

/// The file name of a job with this id and kind.
pub fn job_file_name(id: &JobId, kind: JobKind) -> String {
    format!("{}.{}", id, kind.extension())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_allowed_alphabet() {
        for ok in [
            "a",
            "periodic_health_check",
            "build-7",
            "x.y.z",
            "A1_-.",
            &"a".repeat(128),
        ] {
            assert_eq!(JobId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(JobId::new(""), Err(IdError::Empty));
        assert_eq!(JobId::new(".hidden"), Err(IdError::LeadingDot));
        assert_eq!(JobId::new("../x"), Err(IdError::BadChar('/')));
        assert_eq!(JobId::new("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(JobId::new("é"), Err(IdError::BadChar('é')));
        assert_eq!(JobId::new(&"a".repeat(129)), Err(IdError::TooLong(129)));
        assert_eq!(JobId::new(&"a".repeat(200)), Err(IdError::TooLong(200)));
    }

    #[test]
    fn splits_file_names() {
        let (id, kind) = parse_job_file_name(OsStr::new("build-7.json")).unwrap();
        assert_eq!((id.as_str(), kind), ("build-7", JobKind::Json));
        let (id, kind) = parse_job_file_name(OsStr::new("a.b.sh")).unwrap();
        assert_eq!((id.as_str(), kind), ("a.b", JobKind::Script));
        assert_eq!(
            parse_job_file_name(OsStr::new("x.txt")),
            Err(NameError::NoJobExtension)
        );
        assert_eq!(
            parse_job_file_name(OsStr::new(".hidden.json")),
            Err(NameError::BadId(IdError::LeadingDot))
        );
        assert_eq!(
            parse_job_file_name(OsStr::new(".json")),
            Err(NameError::BadId(IdError::Empty))
        );
        assert_eq!(
            job_file_name(&JobId::new("q").unwrap(), JobKind::Script),
            "q.sh"
        );
    }
}
