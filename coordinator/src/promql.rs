//! Canary counters from a Prometheus server: PromQL templates per service.
//!
//! Hosts normally report their services' counters in their heartbeats (pushed to, or scraped
//! by, the node). A service may instead be judged on what a Prometheus server already
//! collects: a `[[prometheus]]` entry in the coordinator's configuration names the service,
//! the server and three instant queries, each returning one series per host:
//!
//! - `requests`: the host's cumulative request count (a counter, summed by the host label);
//! - `errors`: the cumulative count of failed requests among them;
//! - `latency` (optional): the cumulative histogram, one series per host and `le` bound.
//!
//! Counters, not rates: the coordinator takes the difference between two looks itself, exactly
//! as it does with reported counters, so every host of a window is measured over the same
//! interval and a counter reset (a restarted service) counts from zero. In a template,
//! `$service` stands for the service's name and `$host_label` for the label that names the
//! host. A series belongs to the enrolled host whose name equals the label's value, or the
//! value up to its last `:` (Prometheus's `instance` is `host:port`); other series are
//! counted as unmatched and ignored.
//!
//! The parsing and the assembly are pure ([`parse_vector`], [`assemble`]); [`Source::fetch`] is
//! the I/O. Every response is length-capped ([`MAX_RESPONSE`]) before it is read.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::analysis::Buckets;
use crate::analysis_gate::HostCounters;

/// The largest query response read, in bytes.
pub const MAX_RESPONSE: usize = 64 << 20;
/// The most series one response may hold.
pub const MAX_SERIES: usize = 4_000_000;
/// The longest label value kept as a host name.
const MAX_HOST: usize = 253;

/// One `[[prometheus]]` entry of the coordinator's configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The service whose canaries are judged on these queries.
    pub service: String,
    /// The Prometheus server (`http://prometheus:9090`); queries go to `/api/v1/query`.
    pub url: String,
    /// The label that names the host in every query's result.
    #[serde(default = "default_host_label")]
    pub host_label: String,
    /// Cumulative requests per host.
    #[serde(default = "default_requests")]
    pub requests: String,
    /// Cumulative failed requests per host.
    #[serde(default = "default_errors")]
    pub errors: String,
    /// Cumulative latency histogram per host and `le`, in seconds (optional).
    #[serde(default)]
    pub latency: Option<String>,
    /// How often the queries run while the service has a deployment in progress.
    #[serde(default = "default_every", with = "humantime_serde")]
    pub every: Duration,
    /// How long one query may take.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_host_label() -> String {
    "instance".into()
}

fn default_requests() -> String {
    r#"sum by ($host_label) (http_requests_total{job="$service"})"#.into()
}

fn default_errors() -> String {
    r#"sum by ($host_label) (http_requests_total{job="$service",code=~"5.."})"#.into()
}

fn default_every() -> Duration {
    Duration::from_secs(10)
}

fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

impl SourceConfig {
    /// A source for `service` at `url` with the default queries.
    pub fn new(service: &str, url: &str) -> Self {
        Self {
            service: service.into(),
            url: url.into(),
            host_label: default_host_label(),
            requests: default_requests(),
            errors: default_errors(),
            latency: None,
            every: default_every(),
            timeout: default_timeout(),
        }
    }

    /// Checks what can be checked without the server: a one-line reason.
    pub fn validate(&self) -> Result<(), String> {
        if self.service.is_empty() {
            return Err("service is empty".into());
        }
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return Err(format!("{}: url {:?} is not http(s)", self.service, self.url));
        }
        let label_ok = !self.host_label.is_empty()
            && self.host_label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !self.host_label.starts_with(|c: char| c.is_ascii_digit());
        if !label_ok {
            return Err(format!(
                "{}: host_label {:?} is not a label name",
                self.service, self.host_label
            ));
        }
        for (name, q) in [("requests", &self.requests), ("errors", &self.errors)]
            .into_iter()
            .chain(self.latency.iter().map(|q| ("latency", q)))
        {
            if q.trim().is_empty() {
                return Err(format!("{}: {name} query is empty", self.service));
            }
        }
        if self.every.is_zero() || self.timeout.is_zero() {
            return Err(format!("{}: every and timeout must be above zero", self.service));
        }
        Ok(())
    }

    /// A template with `$service` and `$host_label` filled in.
    pub fn render(&self, template: &str) -> String {
        template.replace("$host_label", &self.host_label).replace("$service", &self.service)
    }

    /// How long fetched counters stand for the hosts: three rounds.
    pub fn valid_for(&self) -> Duration {
        self.every.saturating_mul(3)
    }
}

/// Why a query's answer cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PromError {
    /// The server could not be reached or did not answer in time.
    #[error("prometheus unreachable: {0}")]
    Unreachable(String),
    /// The server answered with an error.
    #[error("prometheus refused the query ({status}): {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Its `errorType: error`, or the start of the body.
        message: String,
    },
    /// The answer is over [`MAX_RESPONSE`] or [`MAX_SERIES`].
    #[error("prometheus answer too large: over {0}")]
    TooLarge(String),
    /// The answer is not an instant vector of numbers.
    #[error("prometheus answer malformed: {0}")]
    Malformed(String),
}

/// One series of an instant vector.
#[derive(Clone, Debug, PartialEq)]
pub struct Point {
    /// The host label's value.
    pub host: String,
    /// The `le` label's value as a bound (`+Inf` is infinity), if present.
    pub le: Option<f64>,
    /// The value.
    pub value: f64,
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<Data>,
    #[serde(default, rename = "errorType")]
    error_type: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct Data {
    #[serde(rename = "resultType")]
    result_type: String,
    result: Vec<Series>,
}

#[derive(Deserialize)]
struct Series {
    #[serde(default)]
    metric: HashMap<String, String>,
    value: (f64, String),
}

/// Parses a `/api/v1/query` answer (an instant vector) into points by `host_label`.
///
/// Series without the host label are dropped (they cannot be attributed); a value that is not
/// a finite non-negative number fails the whole answer, as does any other result type.
pub fn parse_vector(body: &[u8], host_label: &str) -> Result<Vec<Point>, PromError> {
    if body.len() > MAX_RESPONSE {
        return Err(PromError::TooLarge(format!("{MAX_RESPONSE} bytes")));
    }
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| PromError::Malformed(e.to_string()))?;
    if answer.status != "success" {
        let kind = answer.error_type.unwrap_or_default();
        let message = answer.error.unwrap_or_default();
        return Err(PromError::Refused { status: 200, message: format!("{kind}: {message}") });
    }
    let data = answer.data.ok_or_else(|| PromError::Malformed("no data".into()))?;
    if data.result_type != "vector" {
        return Err(PromError::Malformed(format!(
            "result type {:?}, not an instant vector",
            data.result_type
        )));
    }
    if data.result.len() > MAX_SERIES {
        return Err(PromError::TooLarge(format!("{MAX_SERIES} series")));
    }
    let mut points = Vec::with_capacity(data.result.len());
    for series in data.result {
        let Some(host) = series.metric.get(host_label) else { continue };
        if host.len() > MAX_HOST {
            continue;
        }
        let value: f64 = series.value.1.parse().map_err(|_| {
            PromError::Malformed(format!("value {:?} of {host} is not a number", series.value.1))
        })?;
        if !value.is_finite() || value < 0.0 {
            return Err(PromError::Malformed(format!("value {value} of {host} is not a count")));
        }
        let le =
            match series.metric.get("le") {
                None => None,
                Some(v) if v == "+Inf" => Some(f64::INFINITY),
                Some(v) => Some(v.parse().map_err(|_| {
                    PromError::Malformed(format!("le {v:?} of {host} is not a bound"))
                })?),
            };
        points.push(Point { host: host.clone(), le, value });
    }
    Ok(points)
}

/// What [`assemble`] could not use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Unused {
    /// Series whose host label names no enrolled host.
    pub unmatched: usize,
    /// Hosts whose histogram is not in the coordinator's layout (their latency is left out).
    pub other_layout: usize,
}

/// The enrolled host a label value names: the name itself, or `name:port`.
fn host_of(value: &str, names: &HashMap<String, u64>) -> Option<u64> {
    if let Some(&n) = names.get(value) {
        return Some(n);
    }
    let (name, port) = value.rsplit_once(':')?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    names.get(name).copied()
}

fn count(value: f64) -> u64 {
    // parse_vector admits finite non-negative values only; the cast saturates.
    value.round() as u64
}

/// Per-host counters from the three queries' points. A host is present when the requests
/// query has a series for it; errors default to zero (no failed request yet is no series).
/// Its latency is kept only when its bounds are exactly `buckets`' (`+Inf` last).
pub fn assemble(
    requests: &[Point],
    errors: &[Point],
    latency: Option<&[Point]>,
    names: &HashMap<String, u64>,
    buckets: &Buckets,
) -> (HashMap<u64, HostCounters>, Unused) {
    let mut unused = Unused::default();
    let mut out: HashMap<u64, HostCounters> = HashMap::new();
    for p in requests {
        match host_of(&p.host, names) {
            Some(n) => out.entry(n).or_default().requests += count(p.value),
            None => unused.unmatched += 1,
        }
    }
    for p in errors {
        match host_of(&p.host, names) {
            Some(n) => {
                if let Some(c) = out.get_mut(&n) {
                    c.errors += count(p.value);
                }
            }
            None => unused.unmatched += 1,
        }
    }
    let Some(latency) = latency else { return (out, unused) };
    let mut per_host: HashMap<u64, Vec<(f64, u64)>> = HashMap::new();
    for p in latency {
        match (host_of(&p.host, names), p.le) {
            (Some(n), Some(le)) => per_host.entry(n).or_default().push((le, count(p.value))),
            (Some(_), None) => {}
            (None, _) => unused.unmatched += 1,
        }
    }
    let bounds = buckets.upper();
    for (n, mut le) in per_host {
        let Some(c) = out.get_mut(&n) else { continue };
        le.sort_by(|a, b| a.0.total_cmp(&b.0));
        let same = le.len() == bounds.len() + 1
            && le.last().is_some_and(|l| l.0.is_infinite())
            && le.iter().zip(bounds).all(|(l, b)| (l.0 - b).abs() <= b.abs() * 1e-9);
        if same {
            c.latency_buckets = le.into_iter().map(|(_, v)| v).collect();
        } else {
            unused.other_layout += 1;
        }
    }
    (out, unused)
}

/// A configured source with its HTTP client.
#[derive(Clone, Debug)]
pub struct Source {
    /// Its configuration.
    pub config: SourceConfig,
    http: reqwest::Client,
}

impl Source {
    /// A source; the client's timeout is the configured one.
    pub fn new(config: SourceConfig) -> Self {
        let http = reqwest::Client::builder().timeout(config.timeout).build().unwrap_or_default();
        Self { config, http }
    }

    /// Runs one instant query, reading at most [`MAX_RESPONSE`] bytes of its answer.
    pub async fn query(&self, query: &str) -> Result<Vec<Point>, PromError> {
        let url = format!("{}/api/v1/query", self.config.url.trim_end_matches('/'));
        let mut response = self
            .http
            .post(&url)
            .form(&[("query", query)])
            .send()
            .await
            .map_err(|e| PromError::Unreachable(format!("{url}: {e}")))?;
        let status = response.status();
        if response.content_length().is_some_and(|l| l > MAX_RESPONSE as u64) {
            return Err(PromError::TooLarge(format!("{MAX_RESPONSE} bytes")));
        }
        let mut body = Vec::new();
        while let Some(chunk) =
            response.chunk().await.map_err(|e| PromError::Unreachable(format!("{url}: {e}")))?
        {
            if body.len() + chunk.len() > MAX_RESPONSE {
                return Err(PromError::TooLarge(format!("{MAX_RESPONSE} bytes")));
            }
            body.extend_from_slice(&chunk);
        }
        if !status.is_success() {
            // Prometheus explains a bad query in the JSON body.
            let message = match parse_vector(&body, &self.config.host_label) {
                Err(PromError::Refused { message, .. }) => message,
                _ => String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            };
            return Err(PromError::Refused { status: status.as_u16(), message });
        }
        parse_vector(&body, &self.config.host_label)
    }

    /// Runs the source's queries at once and assembles the hosts' counters.
    pub async fn fetch(
        &self,
        names: &HashMap<String, u64>,
        buckets: &Buckets,
    ) -> Result<(HashMap<u64, HostCounters>, Unused), PromError> {
        let c = &self.config;
        let (requests_q, errors_q) = (c.render(&c.requests), c.render(&c.errors));
        let (requests, errors, latency) =
            tokio::join!(self.query(&requests_q), self.query(&errors_q), async {
                match &c.latency {
                    Some(q) => Some(self.query(&c.render(q)).await),
                    None => None,
                }
            });
        let (requests, errors) = (requests?, errors?);
        let latency = latency.transpose()?;
        Ok(assemble(&requests, &errors, latency.as_deref(), names, buckets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(series: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
        let result: Vec<serde_json::Value> = series
            .iter()
            .map(|(host, le, v)| {
                let mut metric = serde_json::json!({"instance": host, "job": "web"});
                if let Some(le) = le {
                    metric["le"] = serde_json::Value::String((*le).into());
                }
                serde_json::json!({"metric": metric, "value": [1700000000.123, v]})
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({
            "status": "success",
            "data": {"resultType": "vector", "result": result}
        }))
        .expect("json")
    }

    fn names() -> HashMap<String, u64> {
        [("host-0".to_owned(), 10), ("host-1".to_owned(), 11), ("db:1".to_owned(), 12)].into()
    }

    #[test]
    fn defaults_render_the_service_and_label() {
        let s = SourceConfig::new("web", "http://127.0.0.1:9090");
        assert_eq!(
            s.render(&s.errors),
            r#"sum by (instance) (http_requests_total{job="web",code=~"5.."})"#
        );
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(s.valid_for(), Duration::from_secs(30));
        for bad in [
            SourceConfig { url: "prometheus:9090".into(), ..s.clone() },
            SourceConfig { host_label: "in stance".into(), ..s.clone() },
            SourceConfig { host_label: "9x".into(), ..s.clone() },
            SourceConfig { errors: " ".into(), ..s.clone() },
            SourceConfig { every: Duration::ZERO, ..s.clone() },
            SourceConfig { service: String::new(), ..s.clone() },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_vector_parses_by_host_label() {
        let body = vector(&[("host-0:8080", None, "1200"), ("host-1", Some("+Inf"), "7")]);
        let points = parse_vector(&body, "instance").expect("parses");
        assert_eq!(
            points,
            vec![
                Point { host: "host-0:8080".into(), le: None, value: 1200.0 },
                Point { host: "host-1".into(), le: Some(f64::INFINITY), value: 7.0 },
            ]
        );
        // Series without the label are not attributed to anyone.
        assert_eq!(parse_vector(&body, "host").expect("parses"), vec![]);
    }

    #[test]
    fn bad_answers_are_typed_errors() {
        let refused =
            br#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        assert!(matches!(
            parse_vector(refused, "instance"),
            Err(PromError::Refused { message, .. }) if message.contains("parse error")
        ));
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(matches!(parse_vector(matrix, "instance"), Err(PromError::Malformed(_))));
        for v in ["NaN", "-1", "+Inf", "many"] {
            let body = vector(&[("host-0", None, v)]);
            assert!(matches!(parse_vector(&body, "instance"), Err(PromError::Malformed(_))), "{v}");
        }
        let body = vector(&[("host-0", Some("fast"), "1")]);
        assert!(matches!(parse_vector(&body, "instance"), Err(PromError::Malformed(_))));
        assert!(matches!(parse_vector(b"<html>", "instance"), Err(PromError::Malformed(_))));
        let huge = vec![b' '; MAX_RESPONSE + 1];
        assert!(matches!(parse_vector(&huge, "instance"), Err(PromError::TooLarge(_))));
    }

    #[test]
    fn counters_are_assembled_per_enrolled_host() {
        let buckets = Buckets::new(vec![0.1, 1.0]).expect("bounds");
        let p = |host: &str, le: Option<f64>, value: f64| Point { host: host.into(), le, value };
        let requests =
            [p("host-0:9100", None, 1000.0), p("host-1", None, 500.0), p("web-9", None, 3.0)];
        let errors = [p("host-0:9100", None, 12.0), p("ghost", None, 1.0)];
        let latency = [
            p("host-0:9100", Some(1.0), 990.0),
            p("host-0:9100", Some(f64::INFINITY), 1000.0),
            p("host-0:9100", Some(0.1), 600.0),
            // host-1 is on other bounds: its latency is left out, its counts kept.
            p("host-1", Some(0.5), 100.0),
            p("host-1", Some(f64::INFINITY), 500.0),
        ];
        let (hosts, unused) = assemble(&requests, &errors, Some(&latency), &names(), &buckets);
        assert_eq!(
            hosts[&10],
            HostCounters { requests: 1000, errors: 12, latency_buckets: vec![600, 990, 1000] }
        );
        assert_eq!(hosts[&11], HostCounters { requests: 500, errors: 0, latency_buckets: vec![] });
        assert_eq!(hosts.len(), 2);
        assert_eq!(unused, Unused { unmatched: 2, other_layout: 1 });
        // A name that contains a colon is matched whole before any port is stripped.
        let (hosts, _) = assemble(&[p("db:1", None, 4.0)], &[], None, &names(), &buckets);
        assert_eq!(hosts[&12].requests, 4);
    }

    /// Answers every connection on 127.0.0.1 with `response`, up to `n` times.
    async fn answer(response: &'static str, n: usize) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            for _ in 0..n {
                let Ok((mut s, _)) = listener.accept().await else { return };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(response.as_bytes()).await;
            }
        });
        url
    }

    #[tokio::test]
    async fn server_errors_are_typed_and_one_line() {
        let bad = answer(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n\
             {\"status\":\"error\",\"errorType\":\"bad_data\",\"error\":\"1:5: parse error\"}",
            1,
        )
        .await;
        let e =
            Source::new(SourceConfig::new("web", &bad)).query("sum(").await.expect_err("refused");
        assert_eq!(
            e,
            PromError::Refused { status: 400, message: "bad_data: 1:5: parse error".into() }
        );
        let huge = answer(
            "HTTP/1.1 200 OK\r\ncontent-length: 999999999999\r\nconnection: close\r\n\r\n{",
            1,
        )
        .await;
        let e = Source::new(SourceConfig::new("web", &huge)).query("up").await.expect_err("capped");
        assert!(matches!(e, PromError::TooLarge(_)), "{e}");
        // Nobody listens there any more.
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port");
        let gone = format!("http://{port}");
        let e = Source::new(SourceConfig::new("web", &gone)).query("up").await.expect_err("down");
        assert!(matches!(e, PromError::Unreachable(_)), "{e}");
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn parse_vector_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_vector(&body, "instance");
        }

        #[test]
        fn parse_vector_never_panics_on_near_json(
            host in "[a-z0-9:.-]{0,12}",
            le in proptest::option::of("[-+0-9.eInf]{0,8}"),
            v in "[-+0-9.eInfa]{0,10}",
        ) {
            let body = vector(&[(&host, le.as_deref(), &v)]);
            if let Ok(points) = parse_vector(&body, "instance") {
                proptest::prop_assert!(points.iter().all(|p| p.value.is_finite() && p.value >= 0.0));
            }
        }
    }
}
