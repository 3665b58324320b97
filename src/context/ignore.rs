//! `.dockerignore` matching with Docker's own rules, so that what absconda
//! leaves out of the context is exactly what `docker build` would leave out.
//!
//! The remote builder applies the same file again, so sending a file Docker
//! would ignore only costs bandwidth, while *not* sending a file Docker would
//! keep breaks the build. The rules therefore follow moby's code rather than
//! its prose:
//!
//! - reading the file: moby/patternmatcher `ignorefile.ReadAll` (the same code
//!   as buildkit's `frontend/dockerfile/dockerignore`): a UTF-8 BOM is dropped,
//!   a line whose first byte is `#` is a comment (before trimming, so `  #x`
//!   is a pattern), lines are trimmed, blank lines skipped, a leading `!`
//!   re-includes, patterns are cleaned like Go's `filepath.Clean` and a leading
//!   `/` is dropped (patterns are anchored at the root of the context);
//! - one pattern: `patternmatcher.Pattern.compile`, which sorts patterns into
//!   exact, prefix (`dir/**`), suffix (`**/name`, and also `**name`, which
//!   matches any path that merely *ends* in `name`) and regexp matches: `*` is
//!   any run of non-`/` characters, `?` one non-`/` character, `**` any number
//!   of directories including none, `[...]`/`[^...]` classes, `\` escapes;
//! - the whole list: `MatchesUsingParentResults` as used by the walkers of both
//!   Docker builders (buildkit's fsutil `filterFS.Walk`, the classic builder's
//!   `archive.TarWithOptions`): the last matching pattern wins, and a path
//!   whose parent directory matched a pattern matches it too, so `dir`
//!   excludes `dir/a/b` while a later `!dir/a/b` can bring that file back.
//!   Like Docker, a pattern that cannot change a directory's verdict is not
//!   evaluated on it and counts as "no match" for its children, so in rare
//!   lists (`*`, `!**/x`, `**/d*`) a later pattern does not re-exclude below
//!   a directory it names; [`DockerIgnore::is_excluded`] gives that verdict.
//!
//! Docker 20.10's client, still common on builders, matched parent
//! directories differently (see [`DockerIgnore::kept_by_docker_20_10`]); the
//! walk also sends what it would keep, which only costs bandwidth where a
//! newer Docker filters it out again.
//!
//! Deviations, all in patterns nobody writes on purpose: Docker copies `\x`
//! and the inside of `[...]` into a Go regexp, so there `\d` is a digit class,
//! `\1` an error and `[*]` a strange nested class; here an escaped character is
//! always itself and a class holds exactly the characters Go's
//! `filepath.Match` (the documented syntax) would put in it.

use std::io;
use std::path::{Path, PathBuf};

use regex::Regex;

/// A parsed `.dockerignore`: an ordered list of patterns.
#[derive(Debug, Clone, Default)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
    invalid: Vec<InvalidPattern>,
    source: Option<PathBuf>,
}

/// A line Docker would refuse (it fails the whole build on it). Such a line
/// matches nothing here; [`DockerIgnore::for_context`] turns it into an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPattern {
    /// 1-based line number in the ignore file.
    pub line: usize,
    /// The pattern as Docker sees it after cleaning (with its `!`).
    pub pattern: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Pattern {
    /// Cleaned text without the leading `!`; Docker's `Pattern.String()`.
    text: String,
    exception: bool,
    matcher: Matcher,
    /// For exceptions only: what can this pattern match below a directory?
    reach: Reach,
}

#[derive(Debug, Clone)]
enum Matcher {
    Exact(String),
    /// The pattern without its trailing `**`.
    Prefix(String),
    /// The pattern without its leading `**`.
    Suffix(String),
    Regex(Regex),
}

/// How an exception pattern is checked against "anything below directory D"
/// when the walk decides whether an excluded directory must be entered.
#[derive(Debug, Clone)]
enum Reach {
    /// Not an exception: never keeps a directory open.
    None,
    /// May match below any directory (`**`, suffix patterns).
    Anywhere,
    /// Matches exactly this path.
    Exact(String),
    /// Every match starts with this literal text.
    LiteralPrefix(String),
    /// One matcher per `/`-separated component; a match has exactly that many
    /// components (no `**`, classes or escapes in the pattern).
    Components(Vec<Matcher>),
}

impl Matcher {
    fn matches(&self, path: &str) -> bool {
        match self {
            Matcher::Exact(s) => path == s,
            Matcher::Prefix(s) => path.starts_with(s.as_str()),
            Matcher::Suffix(s) => {
                path.ends_with(s.as_str()) || s.strip_prefix('/').is_some_and(|rest| path == rest)
            }
            Matcher::Regex(re) => re.is_match(path),
        }
    }
}

/// Per-pattern match results of a directory, handed down to its children
/// (patternmatcher's `MatchInfo`). Empty means "no parent information".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MatchInfo(Vec<bool>);

impl DockerIgnore {
    /// Parses the text of a `.dockerignore` file. Never fails: lines Docker
    /// would reject are kept in [`DockerIgnore::invalid_patterns`] and match
    /// nothing.
    pub fn parse(text: &str) -> DockerIgnore {
        let mut ignore = DockerIgnore::default();
        for (index, raw) in text.split('\n').enumerate() {
            let line_no = index + 1;
            // bufio.ScanLines drops one trailing '\r'.
            let mut line = raw.strip_suffix('\r').unwrap_or(raw);
            if index == 0 {
                line = line.strip_prefix('\u{feff}').unwrap_or(line);
            }
            let Some(pattern) = read_line(line) else {
                continue;
            };
            match compile_pattern(&pattern) {
                Ok(p) => ignore.patterns.push(p),
                Err(reason) => ignore.invalid.push(InvalidPattern {
                    line: line_no,
                    pattern,
                    reason,
                }),
            }
        }
        ignore
    }

    /// Reads the ignore file that applies to a build: `<Dockerfile>.dockerignore`
    /// next to the Dockerfile wins over `<context>/.dockerignore` (BuildKit's
    /// rule); with neither, nothing is ignored. A pattern Docker would refuse
    /// is an `InvalidData` error naming the file, the line and the pattern.
    pub fn for_context(context_dir: &Path, dockerfile: &Path) -> io::Result<DockerIgnore> {
        let mut specific = dockerfile.as_os_str().to_owned();
        specific.push(".dockerignore");
        DockerIgnore::first_of([PathBuf::from(specific), context_dir.join(".dockerignore")])
    }

    /// Reads `<dir>/.dockerignore` alone: a named build context's
    /// (`--build-context`), which no Dockerfile sits next to.
    pub fn for_dir(dir: &Path) -> io::Result<DockerIgnore> {
        DockerIgnore::first_of([dir.join(".dockerignore")])
    }

    fn first_of<const N: usize>(candidates: [PathBuf; N]) -> io::Result<DockerIgnore> {
        for candidate in candidates {
            let bytes = match std::fs::read(&candidate) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot read `{}`: {e}", candidate.display()),
                    ));
                }
            };
            let mut ignore = DockerIgnore::parse(&String::from_utf8_lossy(&bytes));
            if let Some(bad) = ignore.invalid.first() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "`{}` line {}: invalid pattern `{}`: {}",
                        candidate.display(),
                        bad.line,
                        bad.pattern,
                        bad.reason
                    ),
                ));
            }
            ignore.source = Some(candidate);
            return Ok(ignore);
        }
        Ok(DockerIgnore::default())
    }

    /// Whether `rel_path` (relative to the context, `/`-separated, no leading
    /// `/`) is left out of the context. This is the verdict the walk reaches
    /// for that path, directory by directory, as Docker's walkers do.
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        if self.patterns.is_empty() || rel_path.is_empty() || rel_path == "." {
            return false;
        }
        let mut info = MatchInfo::default();
        let mut start = 0;
        while let Some(offset) = rel_path[start..].find('/') {
            let end = start + offset;
            info = self.evaluate(&rel_path[..end], &info).1;
            start = end + 1;
        }
        self.evaluate(rel_path, &info).0
    }

    /// The file the patterns were read from, when [`DockerIgnore::for_context`]
    /// found one. The pipeline sends it with the context.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// Lines Docker would reject.
    pub fn invalid_patterns(&self) -> &[InvalidPattern] {
        &self.invalid
    }

    /// No pattern at all: everything is sent.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The cleaned patterns, `!` included, in file order.
    pub fn patterns(&self) -> impl Iterator<Item = String> + '_ {
        self.patterns.iter().map(|p| {
            if p.exception {
                format!("!{}", p.text)
            } else {
                p.text.clone()
            }
        })
    }

    /// patternmatcher's `MatchesUsingParentResults`: `parent` holds the
    /// per-pattern results of the containing directory (empty at the root).
    pub(crate) fn evaluate(&self, path: &str, parent: &MatchInfo) -> (bool, MatchInfo) {
        let mut matched = false;
        let mut info = Vec::with_capacity(self.patterns.len());
        for (i, pattern) in self.patterns.iter().enumerate() {
            let mut hit = parent.0.get(i).copied().unwrap_or(false);
            if !hit {
                // A pattern that cannot change the verdict is not evaluated,
                // and (as in Docker) its result is recorded as "no match".
                if pattern.exception != matched {
                    info.push(false);
                    continue;
                }
                hit = pattern.matcher.matches(path);
                if !hit && parent.0.is_empty() {
                    // No parent information: try the parent directories.
                    hit = parent_dirs(path).any(|dir| pattern.matcher.matches(dir));
                }
            }
            info.push(hit);
            if hit {
                matched = !pattern.exception;
            }
        }
        (matched, MatchInfo(info))
    }

    /// Whether Docker 20.10's client (which filters the context for both of
    /// its builders) keeps `path`: no ancestor directory was skipped whole,
    /// and its `PatternMatcher.Matches` does not exclude the path itself.
    ///
    /// Its matcher differs from today's in one way that matters: a pattern
    /// is tried on the path and on the one ancestor with as many components
    /// as the pattern, not on every ancestor. So below a directory it entered
    /// for an exception (`**/node_modules` with `!node_modules/a/x`), it
    /// keeps files that current Docker excludes (`node_modules/a/y`). A
    /// builder may run either Docker, and both filter the context again, so
    /// the walk sends what either keeps.
    pub fn kept_by_docker_20_10(&self, path: &str) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        for dir in parent_dirs(path) {
            if self.matches_20_10(dir) && !self.exception_text_below(dir) {
                return false;
            }
        }
        !self.matches_20_10(path)
    }

    /// moby 20.10 `fileutils.PatternMatcher.Matches`.
    fn matches_20_10(&self, path: &str) -> bool {
        let parents: Vec<&str> = match path.rfind('/') {
            Some(i) => path[..i].split('/').collect(),
            None => Vec::new(),
        };
        let mut matched = false;
        for p in &self.patterns {
            let mut hit = p.matcher.matches(path);
            let depth = p.text.split('/').count();
            if !hit && !parents.is_empty() && depth <= parents.len() {
                hit = p.matcher.matches(&parents[..depth].join("/"));
            }
            if hit {
                matched = !p.exception;
            }
        }
        matched
    }

    /// The classic walk's test for entering an excluded directory: some
    /// exception's text starts with `dir/`.
    fn exception_text_below(&self, dir: &str) -> bool {
        let dir_slash = format!("{dir}/");
        self.patterns
            .iter()
            .any(|p| p.exception && format!("{}/", p.text).starts_with(&dir_slash))
    }

    /// Whether some exception (`!`) pattern could match a path strictly below
    /// directory `dir`. When none can, an excluded directory can be skipped
    /// whole: nothing inside it can be re-included (see walk.rs).
    pub(crate) fn exceptions_may_match_below(&self, dir: &str) -> bool {
        let dir_slash = format!("{dir}/");
        self.patterns.iter().any(|p| match &p.reach {
            Reach::None => false,
            Reach::Anywhere => true,
            Reach::Exact(path) => path.starts_with(dir_slash.as_str()),
            Reach::LiteralPrefix(prefix) => {
                prefix.starts_with(dir_slash.as_str()) || dir_slash.starts_with(prefix.as_str())
            }
            Reach::Components(parts) => {
                let dirs: Vec<&str> = dir.split('/').collect();
                parts.len() > dirs.len() && dirs.iter().zip(parts).all(|(d, m)| m.matches(d))
            }
        })
    }
}

/// `a/b/c` → `a`, `a/b`.
fn parent_dirs(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// One line of the ignore file → the pattern Docker hands to the matcher, or
/// `None` for comments and blank lines (`ignorefile.ReadAll`).
fn read_line(line: &str) -> Option<String> {
    if line.starts_with('#') {
        return None;
    }
    let mut pattern = line.trim();
    if pattern.is_empty() {
        return None;
    }
    let invert = pattern.starts_with('!');
    if invert {
        pattern = pattern[1..].trim();
    }
    let mut cleaned = String::new();
    if !pattern.is_empty() {
        cleaned = go_clean(pattern);
        if cleaned.len() > 1 && cleaned.starts_with('/') {
            cleaned.remove(0);
        }
    }
    Some(if invert {
        format!("!{cleaned}")
    } else {
        cleaned
    })
}

/// Go's `filepath.Clean` on Unix: drop empty and `.` elements, fold `..`.
pub(crate) fn go_clean(path: &str) -> String {
    if path.is_empty() {
        return ".".to_string();
    }
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|last| *last != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            other => parts.push(other),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_string(),
        (false, false) => joined,
    }
}

/// `patternmatcher.New` for one pattern: trim, clean, split off `!`, check the
/// syntax, compile.
fn compile_pattern(line: &str) -> Result<Pattern, String> {
    let cleaned = go_clean(line.trim());
    let (exception, text) = match cleaned.strip_prefix('!') {
        Some("") => return Err("illegal exclusion pattern: \"!\"".to_string()),
        Some(rest) => (true, rest.to_string()),
        None => (false, cleaned),
    };
    let matcher = compile(&text)?;
    let reach = if exception {
        reach_of(&text, &matcher)
    } else {
        Reach::None
    };
    Ok(Pattern {
        text,
        exception,
        matcher,
        reach,
    })
}

fn reach_of(text: &str, matcher: &Matcher) -> Reach {
    match matcher {
        Matcher::Exact(s) => Reach::Exact(s.clone()),
        Matcher::Prefix(s) => Reach::LiteralPrefix(s.clone()),
        Matcher::Suffix(_) => Reach::Anywhere,
        Matcher::Regex(_) => {
            if text.contains("**") || text.contains(['[', '\\', '^']) {
                let end = text.find(['*', '?', '[', '\\', '^']).unwrap_or(text.len());
                if end == 0 {
                    Reach::Anywhere
                } else {
                    Reach::LiteralPrefix(text[..end].to_string())
                }
            } else {
                // Only `*`, `?` and literals: each component matches one name.
                let parts: Result<Vec<Matcher>, String> = text.split('/').map(compile).collect();
                match parts {
                    Ok(parts) => Reach::Components(parts),
                    Err(_) => Reach::Anywhere,
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Exact,
    Prefix,
    Suffix,
    Regex,
}

/// `Pattern.compile`: the same classification into exact, prefix, suffix and
/// regexp matches, and the same regexp for `*`, `?` and `**`.
fn compile(pattern: &str) -> Result<Matcher, String> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut re = String::from("^");
    let mut kind = Kind::Exact;
    let mut pos = 0;
    let mut first = true;
    while pos < chars.len() {
        let ch = chars[pos];
        pos += 1;
        match ch {
            '*' if chars.get(pos) == Some(&'*') => {
                pos += 1;
                // `**/` is read as `**`.
                if chars.get(pos) == Some(&'/') {
                    pos += 1;
                }
                if pos == chars.len() {
                    // `**` at the end matches everything, as in .gitignore.
                    if kind == Kind::Exact {
                        kind = Kind::Prefix;
                    } else {
                        re.push_str(".*");
                        kind = Kind::Regex;
                    }
                } else {
                    // Any number of directories, even none.
                    re.push_str("(.*/)?");
                    kind = Kind::Regex;
                }
                if first {
                    kind = Kind::Suffix;
                }
            }
            '*' => {
                re.push_str("[^/]*");
                kind = Kind::Regex;
            }
            '?' => {
                re.push_str("[^/]");
                kind = Kind::Regex;
            }
            '\\' => {
                let Some(&next) = chars.get(pos) else {
                    return Err("trailing `\\` escapes nothing".to_string());
                };
                pos += 1;
                push_literal(&mut re, next);
                kind = Kind::Regex;
            }
            '[' => {
                pos = push_class(&mut re, &chars, pos)?;
                kind = Kind::Regex;
            }
            ']' => {
                re.push_str("\\]");
                kind = Kind::Regex;
            }
            // Docker copies `^` into its regexp unescaped: an anchor there
            // (so such a pattern never matches), a plain character in exact,
            // prefix and suffix matches. Kept as is.
            '^' => re.push('^'),
            other => push_literal(&mut re, other),
        }
        first = false;
    }
    Ok(match kind {
        Kind::Exact => Matcher::Exact(pattern.to_string()),
        Kind::Prefix => Matcher::Prefix(pattern[..pattern.len() - 2].to_string()),
        Kind::Suffix => Matcher::Suffix(pattern[2..].to_string()),
        Kind::Regex => {
            re.push('$');
            Matcher::Regex(Regex::new(&re).map_err(|e| e.to_string())?)
        }
    })
}

fn push_literal(re: &mut String, ch: char) {
    let mut buf = [0u8; 4];
    re.push_str(&regex::escape(ch.encode_utf8(&mut buf)));
}

/// A character class with the grammar of Go's `filepath.Match`:
/// `[` `^`? (char (`-` char)?)+ `]`, where char is anything but `-` and `]`,
/// or `\` and any character. Returns the position after the closing `]`.
fn push_class(re: &mut String, chars: &[char], mut pos: usize) -> Result<usize, String> {
    let bad = || Err("unterminated or malformed character class".to_string());
    re.push('[');
    if chars.get(pos) == Some(&'^') {
        re.push('^');
        pos += 1;
    }
    let mut ranges = 0;
    loop {
        if chars.get(pos) == Some(&']') && ranges > 0 {
            re.push(']');
            return Ok(pos + 1);
        }
        let Some((lo, next)) = class_char(chars, pos) else {
            return bad();
        };
        push_literal(re, lo);
        pos = next;
        if chars.get(pos) == Some(&'-') {
            let Some((hi, next)) = class_char(chars, pos + 1) else {
                return bad();
            };
            re.push('-');
            push_literal(re, hi);
            pos = next;
        }
        ranges += 1;
    }
}

/// Go's `getEsc`: one class character; it may not end the pattern.
fn class_char(chars: &[char], mut pos: usize) -> Option<(char, usize)> {
    let mut ch = *chars.get(pos)?;
    if ch == '-' || ch == ']' {
        return None;
    }
    if ch == '\\' {
        pos += 1;
        ch = *chars.get(pos)?;
    }
    pos += 1;
    (pos < chars.len()).then_some((ch, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn excluded(ignore: &str, path: &str) -> bool {
        DockerIgnore::parse(ignore).is_excluded(path)
    }

    /// Table: (.dockerignore text, path, excluded?).
    #[test]
    fn dockerignore_table() {
        let cases: &[(&str, &str, bool)] = &[
            // `*.md` only at the root; `**/*.md` everywhere.
            ("*.md", "README.md", true),
            ("*.md", "docs/README.md", false),
            ("**/*.md", "README.md", true),
            ("**/*.md", "docs/README.md", true),
            ("**/*.md", "a/b/c/x.md", true),
            ("**/*.md", "a/b/c/x.mdx", false),
            // Anchoring: a leading `/` is dropped, patterns are rooted anyway.
            ("/foo", "foo", true),
            ("/foo", "sub/foo", false),
            ("foo", "sub/foo", false),
            // A directory pattern excludes everything below it.
            ("dir", "dir", true),
            ("dir", "dir/a/b", true),
            ("dir", "dirx", false),
            ("dir/", "dir/a", true),
            ("dir/*", "dir/a/b", true),
            ("dir/*", "dir", false),
            // Exceptions.
            ("*.md\n!keep.md", "keep.md", false),
            ("*.md\n!keep.md", "other.md", true),
            ("!keep.md\n*.md", "keep.md", true), // last match wins
            ("dir\n!dir/keep", "dir/keep", false),
            ("dir\n!dir/keep", "dir/other", true),
            ("dir\n!dir/keep", "dir", true),
            ("dir\n!dir/keep", "dir/keep/inner", false),
            // Several `!`: the last matching line wins.
            ("*.txt\n!a*.txt\nab*.txt\n!abc.txt", "abc.txt", false),
            ("*.txt\n!a*.txt\nab*.txt\n!abc.txt", "abd.txt", true),
            ("*.txt\n!a*.txt\nab*.txt\n!abc.txt", "ax.txt", false),
            ("*.txt\n!a*.txt\nab*.txt\n!abc.txt", "x.txt", true),
            // `**` at the start, in the middle, at the end.
            ("**/node_modules", "node_modules", true),
            ("**/node_modules", "a/b/node_modules/x/y", true),
            ("**/node_modules", "a/my_node_modules", false),
            ("a/**/z", "a/z", true),
            ("a/**/z", "a/b/c/z", true),
            ("a/**/z", "b/a/z", false),
            ("a/**", "a", false),
            ("a/**", "a/b/c", true),
            ("**", "anything/at/all", true),
            // `**name` is a suffix match: any path ending in `name`.
            ("**file", "dir/myfile", true),
            // `?`, classes, escapes.
            ("fil?.txt", "file.txt", true),
            ("fil?.txt", "fil/.txt", false),
            ("fil?.txt", "fi.txt", false),
            ("[abc].txt", "b.txt", true),
            ("[abc].txt", "d.txt", false),
            ("[^abc].txt", "d.txt", true),
            ("[^abc].txt", "a.txt", false),
            ("[a-c]x", "bx", true),
            ("[a-c]x", "dx", false),
            ("\\*.txt", "*.txt", true),
            ("\\*.txt", "a.txt", false),
            ("a\\[b", "a[b", true),
            // Regexp characters are literal.
            ("a.b", "axb", false),
            ("a.b", "a.b", true),
            ("f(1)+$", "f(1)+$", true),
            ("*.c++", "x.c++", true),
            // Cleaning: `./foo`, `foo/`, `foo/../bar`, `//x`.
            ("./foo", "foo", true),
            ("foo/", "foo", true),
            ("foo/../bar", "bar", true),
            ("foo/../bar", "foo", false),
            ("//x//y/", "x/y", true),
            ("!./keep\n*", "keep", true),
            ("*\n!./keep", "keep", false),
            // Comments, blank lines, whitespace.
            ("# a comment\n\n   \nfoo", "foo", true),
            ("# foo", "# foo", false),
            ("  # foo", "# foo", true), // only a `#` in column 1 starts a comment
            ("  foo  \t", "foo", true),
            ("! foo\n*", "foo", true),
            ("*\n! foo ", "foo", false),
            ("foo\r\nbar\r\n", "bar", true),
            ("\u{feff}foo", "foo", true),
            // Names with spaces and non-ASCII characters.
            ("my file.txt", "my file.txt", true),
            ("caf\u{e9}/*", "caf\u{e9}/menu", true),
            ("*.\u{e9}", "x.\u{e9}", true),
            ("\u{263a}?", "\u{263a}\u{263a}", true),
            // Docker's regexps use `.` for `**`, which does not cross a
            // newline: a folder with a newline in its name hides its files
            // from `**/` regexp patterns (suffix patterns still match).
            ("**/*.md", "new\nline/x.md", false),
            ("**/x.md", "new\nline/x.md", true),
            ("*.md", "new\nline.md", true),
        ];
        for (ignore, path, want) in cases {
            assert_eq!(
                excluded(ignore, path),
                *want,
                "pattern {ignore:?} path {path:?}"
            );
        }
    }

    /// Single patterns from moby/patternmatcher `patternmatcher_test.go`
    /// (`TestMatches` table), with its expected result under
    /// `MatchesUsingParentResults`: true for its `exact` and `inexact` rows.
    #[test]
    fn moby_test_matches_table() {
        let cases: &[(&str, &str, bool)] = &[
            ("**", "file", true),
            ("**", "file/", true),
            ("**/", "file", true),
            ("**/", "file/", true),
            ("**", "/", true),
            ("**/", "/", true),
            ("**", "dir/file", true),
            ("**/", "dir/file", true),
            ("**", "dir/file/", true),
            ("**/", "dir/file/", true),
            ("**/**", "dir/file", true),
            ("**/**", "dir/file/", true),
            ("dir/**", "dir/file", true),
            ("dir/**", "dir/file/", true),
            ("dir/**", "dir/dir2/file", true),
            ("dir/**", "dir/dir2/file/", true),
            ("**/dir", "dir", true),
            ("**/dir", "dir/file", true),
            ("**/dir2/*", "dir/dir2/file", true),
            ("**/dir2/*", "dir/dir2/file/", true),
            ("**/dir2/**", "dir/dir2/dir3/file", true),
            ("**/dir2/**", "dir/dir2/dir3/file/", true),
            ("**file", "file", true),
            ("**file", "dir/file", true),
            ("**/file", "dir/file", true),
            ("**file", "dir/dir/file", true),
            ("**/file", "dir/dir/file", true),
            ("**/file*", "dir/dir/file", true),
            ("**/file*", "dir/dir/file.txt", true),
            ("**/file*txt", "dir/dir/file.txt", true),
            ("**/file*.txt", "dir/dir/file.txt", true),
            ("**/file*.txt*", "dir/dir/file.txt", true),
            ("**/**/*.txt", "dir/dir/file.txt", true),
            ("**/**/*.txt2", "dir/dir/file.txt", false),
            ("**/*.txt", "file.txt", true),
            ("**/**/*.txt", "file.txt", true),
            ("a**/*.txt", "a/file.txt", true),
            ("a**/*.txt", "a/dir/file.txt", true),
            ("a**/*.txt", "a/dir/dir/file.txt", true),
            ("a/*.txt", "a/dir/file.txt", false),
            ("a/*.txt", "a/file.txt", true),
            ("a/*.txt**", "a/file.txt", true),
            ("a[b-d]e", "ae", false),
            ("a[b-d]e", "ace", true),
            ("a[b-d]e", "aae", false),
            ("a[^b-d]e", "aze", true),
            (".*", ".foo", true),
            (".*", "foo", false),
            ("abc.def", "abcdef", false),
            ("abc.def", "abc.def", true),
            ("abc.def", "abcZdef", false),
            ("abc?def", "abcZdef", true),
            ("abc?def", "abcdef", false),
            ("**/foo/bar", "foo/bar", true),
            ("**/foo/bar", "dir/foo/bar", true),
            ("**/foo/bar", "dir/dir2/foo/bar", true),
            ("abc/**", "abc", false),
            ("abc/**", "abc/def", true),
            ("abc/**", "abc/def/ghi", true),
            ("**/.foo", ".foo", true),
            ("**/.foo", "bar.foo", false),
            ("a(b)c/def", "a(b)c/def", true),
            ("a(b)c/def", "a(b)c/xyz", false),
            ("a.|)$(}+{bc", "a.|)$(}+{bc", true),
            (
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            (
                "dist/*.whl",
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                true,
            ),
            ("a\\\\", "a\\", true),
            ("a\\*b", "a*b", true),
        ];
        for (pattern, path, want) in cases {
            let ignore = DockerIgnore::parse(pattern);
            assert!(ignore.invalid_patterns().is_empty(), "{pattern:?}");
            // moby's table feeds the matcher raw paths (some with a trailing
            // `/`), so evaluate exactly as its MatchesUsingParentResults test.
            let mut info = MatchInfo::default();
            let parent = path.rsplit_once('/').map(|(dir, _)| dir).unwrap_or("");
            if !parent.is_empty() {
                let mut acc = String::new();
                for part in parent.split('/') {
                    if !acc.is_empty() || part.is_empty() {
                        acc.push('/');
                    }
                    acc.push_str(part);
                    info = ignore.evaluate(&acc, &info).1;
                }
            }
            assert_eq!(
                ignore.evaluate(path, &info).0,
                *want,
                "pattern {pattern:?} path {path:?}"
            );
        }
    }

    /// moby's `multiPatternTests` and the folder exclusion tests
    /// (`TestPatternMatchesFolderExclusions` and friends, which use the old
    /// `Matches` and expect the exception to win).
    #[test]
    fn moby_multi_pattern_tests() {
        let cases: &[(&[&str], &str, bool)] = &[
            (&["**", "!util/docker/web"], "util/docker/web/foo", false),
            (
                &["**", "!util/docker/web", "util/docker/web/foo"],
                "util/docker/web/foo",
                true,
            ),
            (
                &[
                    "**",
                    "!dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                ],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                false,
            ),
            (
                &["**", "!dist/*.whl"],
                "dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl",
                false,
            ),
            (&["docs", "!docs/README.md"], "docs/README.md", false),
            (&["docs/", "!docs/README.md"], "docs/README.md", false),
            (&["docs/*", "!docs/README.md"], "docs/README.md", false),
            (&["*.go", "!fileutils.go"], "fileutils.go", false),
            (&["!fileutils.go", "*.go"], "fileutils.go", true),
            (&["*"], "fileutils.go", true),
            (&["*.go"], "fileutils.go", true),
            (&[], "any/path/there", false),
        ];
        for (patterns, path, want) in cases {
            let ignore = DockerIgnore::parse(&patterns.join("\n"));
            assert_eq!(ignore.is_excluded(path), *want, "{patterns:?} {path:?}");
        }
    }

    /// The walk's verdict (parent results) differs from
    /// `MatchesOrParentMatches` when a pattern is repeated after an exception:
    /// Docker's walkers send `d/f` here, and so do we.
    #[test]
    fn repeated_pattern_after_exception_follows_docker_walkers() {
        assert!(!excluded("d\n!d/f\nd", "d/f"));
        assert!(excluded("d\n!d/f\nd", "d/g"));
        // And the reverse quirk: `!d` does not re-include `d/f` here.
        assert!(excluded("d/*\n!d", "d/f"));
    }

    /// `ignorefile_test.go` (`TestReadAll`) and moby's syntax-error cases
    /// from `TestMatch` (taken from Go's `filepath.Match` tests).
    #[test]
    fn reading_and_syntax_errors() {
        let text = "test1\n/test2\n/a/file/here\n\nlastfile\n# this is a comment\n! /inverted/abs/path\n!\n! ";
        let ignore = DockerIgnore::parse(text);
        let patterns: Vec<String> = ignore.patterns().collect();
        assert_eq!(
            patterns,
            [
                "test1",
                "test2",
                "a/file/here",
                "lastfile",
                "!inverted/abs/path"
            ]
        );
        // A lone `!` is refused by Docker ("illegal exclusion pattern").
        let lines: Vec<usize> = ignore.invalid_patterns().iter().map(|p| p.line).collect();
        assert_eq!(lines, [8, 9]);

        for bad in [
            "[", "[^", "[^bc", "a[", "[]a]", "[-]", "[x-]", "[-x]", "\\", "[a-b-c]", "[z-a]",
        ] {
            let ignore = DockerIgnore::parse(bad);
            assert_eq!(
                ignore.invalid_patterns().len(),
                1,
                "{bad:?} should be invalid"
            );
            assert!(!ignore.is_excluded("a"));
        }
        for (pattern, path, want) in [
            ("[\\]a]", "]", true),
            ("[\\-]", "-", true),
            ("[x\\-]", "-", true),
            ("[x\\-]", "z", false),
            ("[\\-x]", "x", true),
            ("a?b", "a\u{263a}b", true),
            ("a[^a]b", "a\u{263a}b", true),
            ("a???b", "a\u{263a}b", false),
            ("[a-\u{3b6}]*", "\u{3b1}", true),
            ("*[a-\u{3b6}]", "A", false),
            ("a*/b", "abc/b", true),
            ("a*/b", "a/c/b", false),
            ("a*b*c*d*e*/f", "axbxcxdxexxx/f", true),
            ("a*b?c*x", "abxbbxdbxebxczzx", true),
            ("a*b?c*x", "abxbbxdbxebxczzy", false),
            ("*x", "xxx", true),
        ] {
            assert_eq!(excluded(pattern, path), want, "{pattern:?} {path:?}");
        }
    }

    #[test]
    fn go_clean_matches_go() {
        for (input, want) in [
            ("", "."),
            (".", "."),
            ("./foo", "foo"),
            ("foo/", "foo"),
            ("foo/../bar", "bar"),
            ("../foo", "../foo"),
            ("foo/../..", ".."),
            ("/../x", "/x"),
            ("/", "/"),
            ("a//b/./c/", "a/b/c"),
            ("!a/../b", "b"),
        ] {
            assert_eq!(go_clean(input), want, "{input:?}");
        }
    }

    #[test]
    fn exceptions_reach() {
        let ignore = DockerIgnore::parse("node_modules\nsrc\n!src/keep/*.rs\n!cfg/x");
        assert!(!ignore.exceptions_may_match_below("node_modules"));
        assert!(ignore.exceptions_may_match_below("src"));
        assert!(ignore.exceptions_may_match_below("src/keep"));
        assert!(!ignore.exceptions_may_match_below("src/other"));
        assert!(!ignore.exceptions_may_match_below("src/keep/deeper"));
        assert!(ignore.exceptions_may_match_below("cfg"));
        let anywhere = DockerIgnore::parse("node_modules\n!**/*.rs");
        assert!(anywhere.exceptions_may_match_below("node_modules"));
        let literal = DockerIgnore::parse("a\n!a/b[cd]/e");
        assert!(literal.exceptions_may_match_below("a"));
        assert!(!literal.exceptions_may_match_below("x"));
        let none = DockerIgnore::parse("a\nb");
        assert!(!none.exceptions_may_match_below("a"));
    }

    #[test]
    fn for_context_prefers_dockerfile_specific_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".dockerignore"), "general\n").unwrap();
        std::fs::write(dir.path().join("app.Dockerfile"), "FROM scratch\n").unwrap();
        let general =
            DockerIgnore::for_context(dir.path(), &dir.path().join("Dockerfile")).unwrap();
        assert!(general.is_excluded("general"));
        assert_eq!(
            general.source(),
            Some(dir.path().join(".dockerignore").as_path())
        );

        std::fs::write(dir.path().join("app.Dockerfile.dockerignore"), "specific\n").unwrap();
        let specific =
            DockerIgnore::for_context(dir.path(), &dir.path().join("app.Dockerfile")).unwrap();
        assert!(specific.is_excluded("specific"));
        assert!(!specific.is_excluded("general"));

        let empty = tempfile::tempdir().unwrap();
        let none =
            DockerIgnore::for_context(empty.path(), &empty.path().join("Dockerfile")).unwrap();
        assert!(none.is_empty() && none.source().is_none());

        std::fs::write(dir.path().join(".dockerignore"), "ok\n!\n").unwrap();
        let err =
            DockerIgnore::for_context(dir.path(), &dir.path().join("Dockerfile")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("line 2"), "{err}");
    }
}
