//! The one type allowed to hold a credential, and the one way text from outside enters a log
//! line. Below every stage: identity sources, the Kubernetes client and the proxy all use it.
use std::{fmt, sync::Arc};

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

/// Makes a remote-controlled string safe to log or show: printable ASCII only, at most `max`
/// characters.
pub fn sanitize(raw: &str, max: usize) -> String {
    let mut out: String = raw
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect();
    if raw.chars().count() > max {
        out.push_str("...");
    }
    out
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

    #[test]
    fn sanitize_keeps_one_printable_line() {
        assert_eq!(sanitize("no\r\naccess", 64), "noaccess");
        assert_eq!(sanitize("abcdef", 3), "abc...");
    }
}
