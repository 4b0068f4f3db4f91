//! Reading a service's request counters from its own Prometheus endpoint, for canary analysis.
//!
//! A host configured with a `[[scrape]]` entry for a service fetches the service's metrics page
//! (the Prometheus text exposition format, version 0.0.4, or OpenMetrics text) every interval
//! and reports three figures with its heartbeats, exactly as if the service had pushed them to
//! `POST /v1/services/{service}/metrics`:
//!
//! - **requests**: the sum of every series matching the `requests` selector;
//! - **errors**: the sum of every series matching the `errors` selector;
//! - **latency** (optional): the classic histogram named by the `latency` selector (its
//!   `_bucket` series, summed over every label set that matches, by `le`), as per-bucket counts
//!   at its own bounds, `+Inf` last. The coordinator judges latency only when these bounds are
//!   the layout its analysis is configured with; otherwise latency is left out of the gate.
//!
//! Selectors are the instant-vector selectors of PromQL without functions: a metric name and
//! optionally label matchers, `name{label="v", label!="v", label=~"regex", label!~"regex"}`
//! (regexes are anchored, as in PromQL). Counter values are cumulative since the service
//! started; a decrease is a restart, which the coordinator treats as counting from zero.
//!
//! The page is untrusted input: it is read up to [`MAX_PAGE`] bytes, a line longer than
//! [`MAX_LINE`] or a value that is not a finite number is an error naming the line, and the
//! number of distinct `le` bounds is capped at [`MAX_BOUNDS`]. Everything here is pure (no
//! I/O); the daemon fetches the page and calls [`Scrape::read`].

use std::collections::BTreeMap;

use regex::Regex;

/// Most bytes of a metrics page read.
pub const MAX_PAGE: usize = 8 << 20;

/// Longest line accepted.
pub const MAX_LINE: usize = 64 << 10;

/// Most histogram bounds (`le` values, `+Inf` included) accepted.
pub const MAX_BOUNDS: usize = 128;

/// A selector that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {selector:?}: {reason}")]
pub struct SelectorError {
    /// The selector as written.
    pub selector: String,
    /// What is wrong with it.
    pub reason: String,
}

/// A page that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PageError {
    /// A line that is not a comment, a blank or a sample.
    #[error("line {line}: {reason}")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No series matched the requests selector: the service does not export it (yet).
    #[error("no series matches the requests selector {selector:?}")]
    NoRequests {
        /// The selector.
        selector: String,
    },
    /// The histogram's buckets do not form a histogram.
    #[error("histogram {name:?}: {reason}")]
    Histogram {
        /// The histogram's name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

#[derive(Debug, Clone)]
enum Op {
    Eq(String),
    Ne(String),
    Re(Regex),
    NotRe(Regex),
}

#[derive(Debug, Clone)]
struct Matcher {
    label: String,
    op: Op,
}

impl Matcher {
    fn matches(&self, value: &str) -> bool {
        match &self.op {
            Op::Eq(v) => value == v,
            Op::Ne(v) => value != v,
            Op::Re(r) => r.is_match(value),
            Op::NotRe(r) => !r.is_match(value),
        }
    }
}

/// A parsed instant-vector selector: `name{matchers}`.
#[derive(Debug, Clone)]
pub struct Selector {
    text: String,
    name: String,
    matchers: Vec<Matcher>,
}

impl Selector {
    /// Parses `text`.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let fail =
            |reason: &str| SelectorError { selector: text.to_owned(), reason: reason.into() };
        let t = text.trim();
        let (name, rest) = match t.find('{') {
            Some(i) => (&t[..i], Some(&t[i..])),
            None => (t, None),
        };
        let name = name.trim();
        if !is_metric_name(name) {
            return Err(fail("expected a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*)"));
        }
        let mut matchers = Vec::new();
        if let Some(rest) = rest {
            let inner = rest
                .strip_prefix('{')
                .and_then(|r| r.strip_suffix('}'))
                .ok_or_else(|| fail("label matchers must end with '}'"))?;
            let labels = parse_labels(inner, true).map_err(&fail)?;
            for (label, op, value) in labels {
                let anchored = || {
                    Regex::new(&format!("^(?:{value})$"))
                        .map_err(|e| fail(&format!("label {label}: {e}")))
                };
                let op = match op {
                    "=" => Op::Eq(value.clone()),
                    "!=" => Op::Ne(value.clone()),
                    "=~" => Op::Re(anchored()?),
                    _ => Op::NotRe(anchored()?),
                };
                matchers.push(Matcher { label, op });
            }
        }
        Ok(Self { text: text.to_owned(), name: name.to_owned(), matchers })
    }

    /// The selector as written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether a series named `name` with `labels` is selected (a missing label is empty,
    /// as in PromQL).
    fn selects(&self, name: &str, labels: &[(String, String)]) -> bool {
        name == self.name
            && self.matchers.iter().all(|m| {
                let v = labels.iter().find(|(l, _)| *l == m.label).map_or("", |(_, v)| v);
                m.matches(v)
            })
    }
}

/// What to read from one service's page.
#[derive(Debug, Clone)]
pub struct Scrape {
    /// Requests served.
    pub requests: Selector,
    /// Errors among them.
    pub errors: Selector,
    /// A classic histogram of request durations in seconds: its name without `_bucket`, with
    /// optional label matchers (`le` excluded).
    pub latency: Option<Selector>,
}

/// What one page said.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    /// Requests served (cumulative).
    pub requests: u64,
    /// Errors among them (cumulative; at most `requests`).
    pub errors: u64,
    /// The latency histogram's bounds (seconds, `+Inf` excluded) and per-bucket counts (one
    /// more than the bounds); empty when not configured.
    pub latency_bounds: Vec<f64>,
    /// Per-bucket counts, `+Inf` last.
    pub latency_buckets: Vec<u64>,
}

impl Scrape {
    /// Reads `page`.
    pub fn read(&self, page: &str) -> Result<Reading, PageError> {
        let mut requests = 0f64;
        let mut errors = 0f64;
        let mut any_requests = false;
        let bucket_name = self.latency.as_ref().map(|l| format!("{}_bucket", l.name));
        let mut cumulative: BTreeMap<OrderedBound, f64> = BTreeMap::new();
        for (i, line) in page.lines().enumerate() {
            let line_no = i + 1;
            let malformed = |reason| PageError::Malformed { line: line_no, reason };
            if line.len() > MAX_LINE {
                return Err(malformed("longer than 64 KiB"));
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, labels, value) = parse_sample(line).map_err(malformed)?;
            if self.requests.selects(name, &labels) {
                requests += value;
                any_requests = true;
            }
            if self.errors.selects(name, &labels) {
                errors += value;
            }
            if let (Some(latency), Some(bucket)) = (&self.latency, &bucket_name) {
                if name == bucket && latency.selects(&latency.name, &labels) {
                    let le = labels
                        .iter()
                        .find(|(l, _)| l == "le")
                        .ok_or(malformed("histogram bucket without an le label"))?;
                    let bound = parse_value(&le.1).ok_or(malformed("le is not a number"))?;
                    if bound.is_nan() {
                        return Err(malformed("le is not a number"));
                    }
                    let key = OrderedBound(bound);
                    if !cumulative.contains_key(&key) && cumulative.len() >= MAX_BOUNDS {
                        return Err(malformed("more than 128 histogram bounds"));
                    }
                    *cumulative.entry(key).or_insert(0.0) += value;
                }
            }
        }
        if !any_requests {
            return Err(PageError::NoRequests { selector: self.requests.text.clone() });
        }
        let requests = requests as u64;
        // Counters sampled while they move can disagree by a few; never report more errors than
        // requests.
        let errors = (errors as u64).min(requests);
        let (latency_bounds, latency_buckets) = match &self.latency {
            Some(l) if !cumulative.is_empty() => histogram(&l.name, &cumulative)?,
            _ => (Vec::new(), Vec::new()),
        };
        Ok(Reading { requests, errors, latency_bounds, latency_buckets })
    }
}

/// Cumulative `le` counts to bounds and per-bucket counts.
fn histogram(
    name: &str,
    cumulative: &BTreeMap<OrderedBound, f64>,
) -> Result<(Vec<f64>, Vec<u64>), PageError> {
    let fail = |reason| PageError::Histogram { name: name.to_owned(), reason };
    let last = cumulative.keys().next_back().map(|b| b.0);
    if last != Some(f64::INFINITY) {
        return Err(fail("no +Inf bucket"));
    }
    let mut bounds = Vec::with_capacity(cumulative.len());
    let mut buckets = Vec::with_capacity(cumulative.len());
    let mut below = 0u64;
    for (bound, &count) in cumulative {
        let count = count as u64;
        if count < below {
            return Err(fail("bucket counts decrease with le"));
        }
        buckets.push(count - below);
        below = count;
        if bound.0.is_finite() {
            bounds.push(bound.0);
        }
    }
    Ok((bounds, buckets))
}

/// An `le` bound, ordered (never NaN).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A series' labels, as written.
type Labels = Vec<(String, String)>;

/// A sample line: `name{labels} value [timestamp]`.
fn parse_sample(line: &str) -> Result<(&str, Labels, f64), &'static str> {
    let name_end = line.find(|c: char| c == '{' || c.is_ascii_whitespace()).unwrap_or(line.len());
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err("not a metric name");
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if rest.starts_with('{') {
        let close = closing_brace(rest).ok_or("labels without a closing '}'")?;
        labels = parse_labels(&rest[1..close], false)?
            .into_iter()
            .map(|(label, _, value)| (label, value))
            .collect();
        rest = &rest[close + 1..];
    }
    let mut fields = rest.split_ascii_whitespace();
    let value = fields.next().ok_or("a sample without a value")?;
    let value = parse_value(value).ok_or("the value is not a number")?;
    if fields.clone().count() > 1 {
        return Err("trailing fields after the timestamp");
    }
    if !value.is_finite() || value < 0.0 {
        // Counters and bucket counts are finite and nonnegative; other series (gauges) may
        // not be, but none is read: only selected series must be valid, so skip, not fail.
        return Ok((name, labels, 0.0));
    }
    Ok((name, labels, value))
}

/// The index of the `}` closing the label set at the start of `s` (quotes respected).
fn closing_brace(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// `label="value", ...` (with `!=`, `=~`, `!~` when `matchers`); a trailing comma is allowed.
fn parse_labels(
    mut s: &str,
    matchers: bool,
) -> Result<Vec<(String, &'static str, String)>, &'static str> {
    let mut out = Vec::new();
    loop {
        s = s.trim_start();
        if s.is_empty() {
            return Ok(out);
        }
        let name_end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .ok_or("a label without a value")?;
        let label = &s[..name_end];
        if !is_label_name(label) {
            return Err("not a label name");
        }
        s = s[name_end..].trim_start();
        let ops: &[&'static str] = if matchers { &["=~", "!~", "!=", "="] } else { &["="] };
        let op = *ops.iter().find(|op| s.starts_with(**op)).ok_or("expected '=' after a label")?;
        s = s[op.len()..].trim_start();
        let body = s.strip_prefix('"').ok_or("a label value must be quoted")?;
        let mut value = String::new();
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("an unterminated label value"),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    Some((_, c)) if matchers => {
                        // PromQL strings keep regex escapes such as `\.`.
                        value.push('\\');
                        value.push(c);
                    }
                    _ => return Err("a bad escape in a label value"),
                },
                Some((_, c)) => value.push(c),
            }
        };
        out.push((label.to_owned(), op, value));
        s = body[end + 1..].trim_start();
        match s.strip_prefix(',') {
            Some(r) => s = r,
            None if s.is_empty() => return Ok(out),
            None => return Err("expected ',' between labels"),
        }
    }
}

/// A sample value: a float, or `+Inf`, `-Inf`, `NaN`.
fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP http_requests_total Requests.
# TYPE http_requests_total counter
http_requests_total{code="200",path="/"} 1027
http_requests_total{code="200",path="/api"} 3
http_requests_total{code="503",path="/"} 12 1700000000000
http_requests_total{code="500",path="/api"} 1.0e1
process_resident_memory_bytes 2.5e+07
go_gc_duration_seconds{quantile="0.5"} NaN
# TYPE http_request_duration_seconds histogram
http_request_duration_seconds_bucket{path="/",le="0.05"} 600
http_request_duration_seconds_bucket{path="/",le="0.1"} 1000
http_request_duration_seconds_bucket{path="/",le="+Inf"} 1039
http_request_duration_seconds_bucket{path="/api",le="0.05"} 1
http_request_duration_seconds_bucket{path="/api",le="0.1"} 10
http_request_duration_seconds_bucket{path="/api",le="+Inf"} 13
http_request_duration_seconds_sum 73.5
http_request_duration_seconds_count 1052
"#;

    fn scrape(latency: Option<&str>) -> Scrape {
        Scrape {
            requests: Selector::parse("http_requests_total").expect("valid"),
            errors: Selector::parse(r#"http_requests_total{code=~"5.."}"#).expect("valid"),
            latency: latency.map(|l| Selector::parse(l).expect("valid")),
        }
    }

    #[test]
    fn counters_and_histograms_are_summed_over_the_selected_series() {
        let r = scrape(Some("http_request_duration_seconds")).read(PAGE).expect("valid page");
        assert_eq!((r.requests, r.errors), (1052, 22));
        assert_eq!(r.latency_bounds, [0.05, 0.1]);
        assert_eq!(r.latency_buckets, [601, 409, 42]);
        // Label matchers narrow the histogram too.
        let r = scrape(Some(r#"http_request_duration_seconds{path="/api"}"#)).read(PAGE);
        assert_eq!(r.expect("valid").latency_buckets, [1, 9, 3]);
        // Without a latency selector there is no histogram.
        assert!(scrape(None).read(PAGE).expect("valid").latency_buckets.is_empty());
    }

    #[test]
    fn matchers_follow_promql() {
        let page = "m{a=\"x\"} 1\nm{a=\"xy\"} 2\nm 4\nm{a=\"q\\\"\"} 8\n";
        let sum = |sel: &str| {
            let s = Scrape {
                requests: Selector::parse("m").expect("valid"),
                errors: Selector::parse(sel).expect("valid"),
                latency: None,
            };
            s.read(page).expect("valid").errors
        };
        assert_eq!(sum(r#"m{a="x"}"#), 1);
        assert_eq!(sum(r#"m{a!="x"}"#), 14);
        assert_eq!(sum(r#"m{a=~"x"}"#), 1, "regexes are anchored");
        assert_eq!(sum(r#"m{a=~"x.*"}"#), 3);
        assert_eq!(sum(r#"m{a!~"x.*"}"#), 12);
        assert_eq!(sum(r#"m{a=""}"#), 4, "a missing label is empty");
        assert_eq!(sum(r#"m{a="q\""}"#), 8);
    }

    #[test]
    fn bad_selectors_are_refused_with_the_reason() {
        for bad in ["", "1abc", "m{a=x}", "m{a=\"x\"", "m{a~\"x\"}", "m{a=~\"(\"}"] {
            let e = Selector::parse(bad).expect_err(bad);
            assert_eq!(e.selector, bad);
            assert!(!e.reason.is_empty());
        }
    }

    #[test]
    fn bad_pages_are_refused_naming_the_line() {
        let s = scrape(Some("h"));
        let cases = [
            ("http_requests_total{code=\"200\" 1\n", 1),
            ("ok 1\nhttp_requests_total abc\n", 2),
            ("http_requests_total 1\nh_bucket{le=\"x\"} 1\n", 2),
            ("http_requests_total 1\nh_bucket 1\n", 2),
            ("http_requests_total 1 2 3\n", 1),
        ];
        for (page, line) in cases {
            match s.read(page) {
                Err(PageError::Malformed { line: l, .. }) => assert_eq!(l, line, "{page:?}"),
                other => panic!("{page:?}: {other:?}"),
            }
        }
        let long = format!("http_requests_total{{a=\"{}\"}} 1\n", "x".repeat(MAX_LINE));
        assert!(matches!(s.read(&long), Err(PageError::Malformed { line: 1, .. })));
        assert!(matches!(s.read("other 1\n"), Err(PageError::NoRequests { .. })));
        let no_inf = "http_requests_total 1\nh_bucket{le=\"0.1\"} 1\n";
        assert!(matches!(s.read(no_inf), Err(PageError::Histogram { .. })));
        let decreasing = "http_requests_total 1\nh_bucket{le=\"0.1\"} 5\nh_bucket{le=\"+Inf\"} 2\n";
        assert!(matches!(s.read(decreasing), Err(PageError::Histogram { .. })));
        let many: String =
            (0..=MAX_BOUNDS).map(|i| format!("h_bucket{{le=\"{i}\"}} 1\n")).collect();
        let many = format!("http_requests_total 1\n{many}");
        assert!(matches!(s.read(&many), Err(PageError::Malformed { .. })));
    }

    proptest::proptest! {
        /// Whatever a service serves, the page is read or refused, never a panic.
        #[test]
        fn any_page_is_read_or_refused(
            lines in proptest::collection::vec(
                r#"(h_bucket|http_requests_total|x)?(\{[a-z=",~!\\ ]{0,20}\}?)? ?[-+0-9.eInfNa]{0,8}( [0-9]{0,4})?"#,
                0..20,
            )
        ) {
            let _ = scrape(Some("h")).read(&lines.join("\n"));
        }
    }

    #[test]
    fn errors_never_exceed_requests() {
        let s = Scrape {
            requests: Selector::parse("r").expect("valid"),
            errors: Selector::parse("e").expect("valid"),
            latency: None,
        };
        let r = s.read("r 10\ne 12\n").expect("valid");
        assert_eq!((r.requests, r.errors), (10, 10));
    }
}
