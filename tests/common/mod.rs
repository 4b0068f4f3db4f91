//! Helpers shared by the tests that run the `fleetwave` binary.
#![allow(dead_code)]

use std::process::Output;

pub(crate) fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A failure is a non-zero exit and exactly one line on stderr that contains every `needle`.
pub(crate) fn assert_fails_with(out: &Output, needles: &[&str]) {
    assert!(!out.status.success(), "expected failure, got success: {}", stdout(out));
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for needle in needles {
        assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
    }
}

/// Reads `label:  N ...` from publish output, taking the first integer after the label.
pub(crate) fn field(out: &Output, label: &str) -> u64 {
    let text = stdout(out);
    let line = text.lines().find(|l| l.starts_with(label)).expect("field present");
    line[label.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .expect("number")
}

/// The number inside the last parentheses of `label` line: `chunks:    N (M distinct)` or
/// `... (N bytes)`.
pub(crate) fn paren_field(out: &Output, label: &str) -> u64 {
    let text = stdout(out);
    let line = text.lines().find(|l| l.starts_with(label)).expect("field present");
    let open = line.rfind('(').expect("paren");
    line[open + 1..].split(' ').next().and_then(|n| n.parse().ok()).expect("number")
}
