//! Times, durations and tables as a person reads them.
//!
//! Machine output (`--json`) keeps RFC 3339 times and plain seconds; these
//! helpers are only for what a terminal shows.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// `t` relative to `now`: "just now", "42 s ago", "3 min ago", "5 h ago",
/// "2 days ago"; a date beyond 30 days, where "ago" stops helping.
pub fn ago(t: DateTime<Utc>, now: DateTime<Utc>) -> String {
    let secs = (now - t).num_seconds();
    if secs < 0 {
        // A clock that differs between machines; say so rather than lie.
        return format!("{} (in the future)", t.format("%Y-%m-%d %H:%M UTC"));
    }
    match secs {
        0..5 => "just now".into(),
        5..60 => format!("{secs} s ago"),
        60..3_600 => format!("{} min ago", secs / 60),
        3_600..86_400 => format!("{} h ago", secs / 3_600),
        86_400..172_800 => "yesterday".into(),
        172_800..2_592_000 => format!("{} days ago", secs / 86_400),
        _ => t.format("%Y-%m-%d").to_string(),
    }
}

/// [`ago`] for an RFC 3339 string; the string itself if it does not parse.
pub fn ago_rfc3339(t: &str, now: DateTime<Utc>) -> String {
    match DateTime::parse_from_rfc3339(t) {
        Ok(t) => ago(t.with_timezone(&Utc), now),
        Err(_) => t.to_string(),
    }
}

/// "0.4 s", "42 s", "3 min 05 s", "2 h 10 min".
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        return format!("{s:.1} s");
    }
    let s = d.as_secs();
    match s {
        0..60 => format!("{s} s"),
        60..3_600 => format!("{} min {:02} s", s / 60, s % 60),
        _ => format!("{} h {:02} min", s / 3_600, (s % 3_600) / 60),
    }
}

/// Columns as wide as their widest cell, two spaces apart; columns listed
/// in `right` are right-aligned (numbers). The last column is not padded.
pub fn table(header: &[&str], rows: &[Vec<String>], right: &[usize]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, cell) in cells.into_iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right.contains(&i) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i != last {
                    out.push_str(&" ".repeat(pad));
                }
            }
            if i != last {
                out.push_str("  ");
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ago_reads_like_a_person() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T20:58:38Z")
            .unwrap()
            .with_timezone(&Utc);
        let before = |s: i64| now - chrono::Duration::seconds(s);
        for (secs, want) in [
            (0, "just now"),
            (42, "42 s ago"),
            (185, "3 min ago"),
            (5 * 3600 + 10, "5 h ago"),
            (86_400 + 5, "yesterday"),
            (3 * 86_400, "3 days ago"),
            (40 * 86_400, "2026-10-22"),
        ] {
            assert_eq!(ago(before(secs), now), want, "{secs}");
        }
        assert!(ago(now + chrono::Duration::seconds(60), now).contains("in the future"));
        assert_eq!(
            ago_rfc3339("2026-12-01T20:55:30.970350635+00:00", now),
            "3 min ago"
        );
        assert_eq!(ago_rfc3339("garbage", now), "garbage");
    }

    #[test]
    fn durations() {
        for (d, want) in [
            (Duration::from_millis(400), "0.4 s"),
            (Duration::from_secs(42), "42 s"),
            (Duration::from_secs(185), "3 min 05 s"),
            (Duration::from_secs(2 * 3600 + 600), "2 h 10 min"),
        ] {
            assert_eq!(duration(d), want);
        }
    }

    #[test]
    fn table_widths_follow_the_longest_name() {
        let t = table(
            &["NAME", "BUILDS", "LAST USED"],
            &[
                vec!["a".into(), "3".into(), "3 min ago".into()],
                vec![
                    "a-builder-with-a-very-long-name".into(),
                    "120".into(),
                    "-".into(),
                ],
            ],
            &[1],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines,
            [
                "NAME                             BUILDS  LAST USED",
                "a                                     3  3 min ago",
                "a-builder-with-a-very-long-name     120  -",
            ]
        );
    }
}
