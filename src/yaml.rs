//! A guard run on YAML text before the parser sees it.
//!
//! libyaml rescans its stack of flow levels for every token, so a file of
//! 100 000 nested `[` took it about 40 s before serde's own recursion limit
//! could apply. Config and environment files nest a handful of levels; this
//! scan refuses anything deeper than [`MAX_DEPTH`] in time linear in the text,
//! so a hostile or broken file fails at once with its line and column.

/// The deepest nesting a config or environment file may have.
pub const MAX_DEPTH: usize = 64;

/// Where the text first nests deeper than [`MAX_DEPTH`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("nested more than {MAX_DEPTH} levels deep at line {line} column {column}")]
pub struct TooDeep {
    pub line: usize,
    pub column: usize,
}

/// Refuses text nesting flow collections (`[`, `{`) or compact block
/// sequences (`- - -`) deeper than [`MAX_DEPTH`]. Brackets inside quoted
/// strings, comments and plain words (`uvicorn[standard]`) do not count; the
/// scan over-counts rather than under-counts only for unbalanced brackets,
/// which the parser would refuse anyway.
pub fn check_depth(text: &str) -> Result<(), TooDeep> {
    let mut flow = 0usize;
    for (index, line) in text.lines().enumerate() {
        let too_deep = |column: usize| TooDeep {
            line: index + 1,
            column: column + 1,
        };
        let bytes = line.as_bytes();
        // Compact block sequences at the start of the line: `- - - x`.
        let mut i = 0;
        let mut dashes = 0;
        loop {
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            if i < bytes.len()
                && bytes[i] == b'-'
                && (i + 1 == bytes.len() || bytes[i + 1] == b' ' || bytes[i + 1] == b'\t')
            {
                dashes += 1;
                if dashes > MAX_DEPTH {
                    return Err(too_deep(i));
                }
                i += 1;
            } else {
                break;
            }
        }
        let mut quote: Option<u8> = None;
        let mut prev = b' ';
        let mut j = 0;
        while j < bytes.len() {
            let b = bytes[j];
            match quote {
                Some(b'"') if b == b'\\' => {
                    j += 2;
                    continue;
                }
                Some(q) if b == q => quote = None,
                Some(_) => {}
                None => {
                    let token_start = matches!(prev, b' ' | b'\t' | b'[' | b'{' | b',' | b':');
                    match b {
                        b'#' if matches!(prev, b' ' | b'\t') => break,
                        b'"' | b'\'' if token_start => quote = Some(b),
                        b'[' | b'{' if token_start || flow > 0 => {
                            flow += 1;
                            if flow > MAX_DEPTH {
                                return Err(too_deep(j));
                            }
                        }
                        b']' | b'}' if flow > 0 => flow -= 1,
                        _ => {}
                    }
                }
            }
            prev = b;
            j += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn ordinary_files_pass() {
        for text in [
            "dependencies:\n  - python=3.12\n  - pip:\n      - uvicorn[standard]\n",
            "a: [1, [2, {b: [3]}]]\n",
            "a: \"[[[[\" # [[[[\n",
            "a: '[[[['\n",
            "- - - x\n",
            "name: don't [\n",
        ] {
            assert_eq!(check_depth(text), Ok(()), "{text:?}");
        }
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        let cases = [
            ("[".repeat(100_000), 1, 65),
            (format!("a: {}", "{a: ".repeat(100_000)), 1, 4 + 64 * 4),
            ("- ".repeat(100_000), 1, 129),
            (format!("x:\n  {}", "[\n".repeat(100_000)), 66, 1),
        ];
        for (text, line, column) in cases {
            let start = Instant::now();
            let err = check_depth(&text).unwrap_err();
            assert!(start.elapsed() < Duration::from_secs(1));
            assert_eq!((err.line, err.column), (line, column), "{}", &text[..20]);
            assert!(err.to_string().contains("nested more than 64 levels"));
        }
    }
}
