//! Errors and warnings about a policy file, each naming the file, line, column and key.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    /// 1-based; 0 when the diagnostic is about the whole file (it could not be read), which is
    /// then shown without a position.
    pub line: usize,
    pub column: usize,
    /// Path of the offending key, like `rules[2].who[0]`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.line == 0 {
            // `FILE: cannot read: ...`: no made-up position, and no severity word, which the
            // caller's own `error:` prefix would repeat.
            write!(f, "{}: ", self.file)?;
            if self.severity == Severity::Warning {
                f.write_str("warning: ")?;
            }
        } else {
            write!(f, "{}:{}:{}: {sev}: ", self.file, self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, "`{}`: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl Diagnostic {
    /// An error about the file as a whole, like one that cannot be read.
    pub fn whole_file(file: &str, message: String) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            file: file.to_string(),
            line: 0,
            column: 0,
            key: String::new(),
            message,
        }
    }
}

/// An I/O error as people read it: "No such file or directory", without Rust's "(os error 2)".
pub fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

/// Why a policy could not be loaded: at least one error, plus any warnings found on the way.
#[derive(Debug, Clone, thiserror::Error)]
pub struct PolicyErrors(pub Vec<Diagnostic>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors: Vec<String> = self
            .0
            .iter()
            .filter(|d| d.severity == Severity::Error)
            .map(|d| d.to_string())
            .collect();
        f.write_str(&errors.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_cannot_be_read_has_no_position() {
        // ENOENT on every Linux architecture.
        let e = std::io::Error::from_raw_os_error(2);
        let d = Diagnostic::whole_file(
            "/nonexistent.yaml",
            format!("cannot read: {}", io_reason(&e)),
        );
        assert_eq!(
            d.to_string(),
            "/nonexistent.yaml: cannot read: No such file or directory"
        );
    }
}
