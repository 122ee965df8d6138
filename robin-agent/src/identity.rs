//! Workload identity: where a token comes from, and the one type allowed to hold it.
//!
//! Every source implements [`IdentitySource`]; a rule in the config names its source with
//! `source = { kind = "...", ... }` ([`SourceConfig`]). A token value lives only inside [`Token`],
//! whose `Debug`/`Display` print `<redacted>`, so it cannot reach a log record by accident.
use std::{fmt, future::Future, path::PathBuf, pin::Pin, sync::Arc};

use serde::Deserialize;

pub mod file;

/// A bearer credential. Constructed only through [`Token::parse`], which rejects anything that
/// could split or smuggle a header.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

/// Longest token accepted; projected tokens are ~1 KiB, JWT-SVIDs a few KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token is longer than {MAX_TOKEN_LEN} bytes")]
    TooLong,
    #[error("token contains a control character or non-ASCII byte at offset {0}")]
    ControlOrNonAscii(usize),
    #[error("token contains a character outside the token68 set at offset {0}")]
    NotToken68(usize),
}

impl Token {
    /// Trims surrounding whitespace (a trailing newline in a mounted file is normal) and accepts
    /// only token68-like values: `A-Z a-z 0-9 - . _ ~ + /` followed by optional `=` padding.
    pub fn parse(raw: &str) -> Result<Self, TokenError> {
        let value = raw.trim_matches(|c: char| c == ' ' || c == '\t' || c == '\r' || c == '\n');
        if value.is_empty() {
            return Err(TokenError::Empty);
        }
        if value.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let bytes = value.as_bytes();
        let mut padding = false;
        for (i, &b) in bytes.iter().enumerate() {
            if !(0x21..0x7f).contains(&b) {
                return Err(TokenError::ControlOrNonAscii(i));
            }
            let body =
                b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/');
            match (b, padding) {
                (b'=', _) => padding = true,
                (_, false) if body => {}
                _ => return Err(TokenError::NotToken68(i)),
            }
        }
        Ok(Self(Arc::from(value)))
    }

    /// The secret itself. Call only where the value is written into an outbound header or
    /// request body; never format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Why a source could not produce a token. Messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid token from {origin}: {source}")]
    Invalid {
        origin: String,
        #[source]
        source: TokenError,
    },
    #[error("{0}")]
    Unavailable(String),
}

pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<Token, IdentityError>> + Send + 'a>>;

/// A source of the workload's current token. `token()` is called once per forwarded request, so
/// it must be cheap when nothing changed (sources that fetch over the network cache).
pub trait IdentitySource: Send + Sync + fmt::Debug {
    /// A short label for logs and metrics, e.g. `file:/var/run/secrets/tokens/robin-token`.
    fn describe(&self) -> String;
    fn token(&self) -> TokenFuture<'_>;
}

/// `source = { kind = "...", ... }` of an `[[inject]]` rule.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// A projected ServiceAccount token (or any token file), re-read on every request.
    File { path: PathBuf },
}

/// Builds the runtime source for a rule's configuration.
pub fn build_source(cfg: &SourceConfig) -> Result<Arc<dyn IdentitySource>, IdentityError> {
    match cfg {
        SourceConfig::File { path } => Ok(Arc::new(file::FileSource::new(path.clone()))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_jwt_and_trims_newline() {
        let t = Token::parse("eyJhbGciOi.eyJzdWIi.c2ln\n").unwrap();
        assert_eq!(t.expose(), "eyJhbGciOi.eyJzdWIi.c2ln");
    }

    #[test]
    fn accepts_padding_only_at_end() {
        assert!(Token::parse("abc==").is_ok());
        assert_eq!(Token::parse("ab=c"), Err(TokenError::NotToken68(3)));
    }

    #[test]
    fn rejects_crlf_controls_and_spaces() {
        assert_eq!(
            Token::parse("abc\r\nX-Evil: 1"),
            Err(TokenError::ControlOrNonAscii(3))
        );
        assert_eq!(
            Token::parse("a\u{0}b"),
            Err(TokenError::ControlOrNonAscii(1))
        );
        assert_eq!(Token::parse("a b"), Err(TokenError::ControlOrNonAscii(1)));
        assert_eq!(Token::parse("  \n"), Err(TokenError::Empty));
        assert_eq!(Token::parse("tök"), Err(TokenError::ControlOrNonAscii(1)));
    }

    #[test]
    fn debug_and_display_redact() {
        let t = Token::parse("s3cr3t-value").unwrap();
        assert!(!format!("{t:?} {t}").contains("s3cr3t"));
    }
}
