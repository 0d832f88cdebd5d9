//! Configuration: the YAML file (`conf/fanout.yaml` shows every key), parsed ([`file`]) and validated into the runtime
//! model ([`model`]) that the gateway runs on. Loading never stops at the first mistake: it
//! collects every problem it can find, each with the key path it concerns (and the line,
//! where the YAML parser knows it), so `fanout -t` prints one line per problem.

pub mod diff;
pub mod file;
pub mod model;
pub mod redact;
pub mod units;
mod validate;

use std::fmt;
use std::path::Path;

pub use model::*;
pub use validate::jwks;

/// One problem in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Key path such as `upstreams.api.backends[1]`; empty for the whole file.
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            line: None,
            message: message.into(),
        }
    }
}

/// Every problem found in one configuration source.
#[derive(Debug)]
pub struct ConfigErrors {
    pub source: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.source)?;
            if let Some(line) = e.line {
                write!(f, ":{line}")?;
            }
            if e.path.is_empty() {
                write!(f, ": {}", e.message)?;
            } else {
                write!(f, ": {}: {}", e.path, e.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    from_yaml(&read(path)?, &path.display().to_string())
}

/// The text of the file at `path`.
pub fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        source: path.display().to_string(),
        errors: vec![ConfigError::new("", format!("cannot read file: {e}"))],
    })
}

/// Validates configuration text; `source` names it in messages.
pub fn from_yaml(text: &str, source: &str) -> Result<Config, ConfigErrors> {
    validate::build(text).map_err(|errors| located(text, source, errors))
}

/// `errors` found in `text` (named `source` in messages), each with the line its path is
/// on: for checks made outside this module (the filters' constructors, `plugins:`).
pub fn located(text: &str, source: &str, mut errors: Vec<ConfigError>) -> ConfigErrors {
    validate::attach_lines(text, &mut errors);
    ConfigErrors {
        source: source.to_string(),
        errors,
    }
}

#[cfg(test)]
mod tests;
