//! Quoting for the SQL computectl builds from a spec. Names and hashes are validated before
//! they get here, but every one is still quoted: validation rules may loosen, quoting must not.

/// A double-quoted identifier, as Postgres's `quote_ident` always would: case is kept.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal that reads the same whatever `standard_conforming_strings` says: with a
/// backslash in it, the `E'...'` form with backslashes doubled, as Postgres's
/// `quote_literal` does. Postgres cannot hold a NUL in a string, so callers never pass one.
pub fn quote_literal(text: &str) -> String {
    let quoted = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", quoted.replace('\\', "\\\\"))
    } else {
        format!("'{quoted}'")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_are_always_quoted_and_quotes_doubled() {
        assert_eq!(quote_ident("alice"), "\"alice\"");
        assert_eq!(quote_ident("Bob"), "\"Bob\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(
            quote_ident("x\"; DROP ROLE y; --"),
            "\"x\"\"; DROP ROLE y; --\""
        );
        assert_eq!(quote_ident(""), "\"\"");
    }

    #[test]
    fn literals_double_quotes_and_escape_backslashes() {
        assert_eq!(quote_literal("plain"), "'plain'");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b"), "E'a\\\\b'");
        assert_eq!(quote_literal("\\'; DROP"), "E'\\\\''; DROP'");
        assert_eq!(
            quote_literal("SCRAM-SHA-256$4096:c2FsdA==$a+b/c=:d="),
            "'SCRAM-SHA-256$4096:c2FsdA==$a+b/c=:d='"
        );
    }
}
