//! Config-file errors that name the file, the line and the key.
//!
//! Both daemons read TOML. Serde reports *what* is wrong and a byte span; semantic validation (duplicate VIP,
//! weight out of range) knows *which key* is wrong. This module turns either into a [`ConfigError`] carrying
//! file, line, column and the dotted key path (`service[1].server[0].weight`), using toml's spanned document
//! tree. It does no I/O: callers read the file and pass its text.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// A config file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error has no position (e.g. the file could not be read).
    pub line: usize,
    /// 1-based.
    pub column: usize,
    /// Dotted path of the offending key, e.g. `service[0].server[1].weight`; empty for the document itself.
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStep<'a> {
    Key(&'a str),
    Index(usize),
}

/// The text of one config file, ready to deserialize and to place errors in.
pub struct ConfigText<'a> {
    path: &'a Path,
    text: &'a str,
}

impl<'a> ConfigText<'a> {
    pub fn new(path: &'a Path, text: &'a str) -> Self {
        ConfigText { path, text }
    }

    /// Deserializes the whole file into `T` (which should use `#[serde(deny_unknown_fields)]`).
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            let key = DeTable::parse(self.text).map(|doc| key_path_at(&doc, span.start)).unwrap_or_default();
            self.error_at_span(span, key, e.message().trim().to_string())
        })
    }

    /// An error about the value of the key at `path`: placed on that key's line. If the key is absent (a
    /// default was used), the error is placed on the nearest enclosing table that exists.
    pub fn error_at(&self, path: &[KeyStep<'_>], message: impl Into<String>) -> ConfigError {
        let span = DeTable::parse(self.text).ok().map(|doc| span_of(&doc, path)).unwrap_or(0..0);
        self.error_at_span(span, render_path(path), message.into())
    }

    fn error_at_span(&self, span: Range<usize>, key: String, message: String) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError { file: self.path.to_path_buf(), line, column, key, message }
    }
}

/// An error for a file that could not even be read.
pub fn unreadable(path: &Path, error: &std::io::Error) -> ConfigError {
    ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        key: String::new(),
        message: format!("cannot read: {error}"),
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn render_path(path: &[KeyStep<'_>]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            KeyStep::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            KeyStep::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The dotted path of the innermost key whose key or value span contains `offset`. (Array-of-tables items
/// span only their `[[header]]`, so containment is checked per key rather than by descending into tables.)
fn key_path_at(doc: &Spanned<DeTable<'_>>, offset: usize) -> String {
    let mut best: Option<(usize, String)> = None;
    visit_keys(doc.get_ref(), &mut String::new(), &mut |path, spans| {
        for span in spans {
            if span.contains(&offset) && best.as_ref().is_none_or(|(len, _)| span.len() < *len) {
                best = Some((span.len(), path.to_string()));
            }
        }
    });
    best.map(|(_, path)| path).unwrap_or_default()
}

/// Calls `f` with the dotted path and the spans (key, value) of every key and array item in `table`.
fn visit_keys(table: &DeTable<'_>, prefix: &mut String, f: &mut dyn FnMut(&str, [Range<usize>; 2])) {
    for (key, value) in table.iter() {
        let restore = prefix.len();
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(key.get_ref());
        f(prefix, [key.span(), value.span()]);
        match value.get_ref() {
            DeValue::Table(inner) => visit_keys(inner, prefix, f),
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let restore_item = prefix.len();
                    prefix.push_str(&format!("[{i}]"));
                    f(prefix, [item.span(), item.span()]);
                    if let DeValue::Table(inner) = item.get_ref() {
                        visit_keys(inner, prefix, f);
                    }
                    prefix.truncate(restore_item);
                }
            }
            _ => {}
        }
        prefix.truncate(restore);
    }
}

/// The span of the key at `path` (the key itself, so the line is where it is written), or of the deepest
/// existing ancestor.
fn span_of(doc: &Spanned<DeTable<'_>>, path: &[KeyStep<'_>]) -> Range<usize> {
    let mut best = 0..0;
    let mut value: &Spanned<DeValue<'_>>;
    let mut table = doc.get_ref();
    let mut steps = path.iter().peekable();
    while let Some(step) = steps.next() {
        let KeyStep::Key(name) = step else { break };
        let Some((key, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *name) else { break };
        best = key.span();
        value = v;
        if let Some(KeyStep::Index(i)) = steps.peek() {
            steps.next();
            let DeValue::Array(items) = value.get_ref() else { break };
            let Some(item) = items.get(*i) else { break };
            best = item.span();
            value = item;
        }
        match value.get_ref() {
            DeValue::Table(inner) => table = inner,
            _ => break,
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default)]
        service: Vec<Service>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Service {
        port: u16,
        #[serde(default)]
        server: Vec<Server>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Server {
        address: std::net::IpAddr,
        weight: u32,
    }

    const DOC: &str = "name = \"d1\"\n\n[[service]]\nport = 80\n\n[[service]]\nport = 443\n\n  [[service.server]]\n  address = \"10.0.0.1\"\n  weight = 1\n\n  [[service.server]]\n  address = \"10.0.0.2\"\n  weight = 2\n";

    fn parse(text: &str) -> Result<Doc, ConfigError> {
        ConfigText::new(Path::new("/etc/fulcrum/test.toml"), text).parse()
    }

    #[test]
    fn a_good_file_parses() {
        let doc = parse(DOC).unwrap();
        assert_eq!(doc.service[1].server[1].weight, 2);
    }

    #[test]
    fn an_unknown_key_names_file_line_and_key() {
        let text = DOC.replace("  weight = 2", "  wieght = 2");
        let err = parse(&text).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (15, "service[1].server[1].wieght"), "{err}");
        assert!(err.message.contains("unknown field `wieght`"), "{err}");
        assert!(
            err.to_string().starts_with("/etc/fulcrum/test.toml:15:3: key `service[1].server[1].wieght`: "),
            "{err}"
        );
    }

    #[test]
    fn a_bad_value_names_its_key() {
        let text = DOC.replace("address = \"10.0.0.2\"", "address = \"10.0.0.256\"");
        let err = parse(&text).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (14, "service[1].server[1].address"), "{err}");
        let text = DOC.replace("port = 443", "port = 70000");
        let err = parse(&text).unwrap_err();
        assert_eq!((err.line, err.key.as_str()), (7, "service[1].port"), "{err}");
    }

    #[test]
    fn a_syntax_error_has_a_line() {
        let err = parse("name = \"d1\"\nport = = 3\n").unwrap_err();
        assert_eq!(err.line, 2, "{err}");
    }

    #[test]
    fn semantic_errors_are_placed_on_the_key() {
        let config = ConfigText::new(Path::new("x.toml"), DOC);
        let path = [
            KeyStep::Key("service"),
            KeyStep::Index(1),
            KeyStep::Key("server"),
            KeyStep::Index(0),
            KeyStep::Key("weight"),
        ];
        let err = config.error_at(&path, "weight 1 is too small");
        assert_eq!((err.line, err.key.as_str()), (11, "service[1].server[0].weight"));
        // A key that is absent is placed on its nearest existing ancestor.
        let path = [KeyStep::Key("service"), KeyStep::Index(0), KeyStep::Key("scheduler")];
        assert_eq!(config.error_at(&path, "x").line, 3);
    }
}
