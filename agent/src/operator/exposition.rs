//! The two exposition formats `/metrics` speaks, chosen by the scraper's `Accept`
//! header: OpenMetrics when it asks for it (Prometheus itself does), else the
//! Prometheus text format 0.0.4 (curl, `promtool check metrics`, older scrapers).
//!
//! The registry encodes OpenMetrics; the text format is derived from it line by line.
//! The two differ where a strict text parser trips: an OpenMetrics counter family
//! `x` has samples `x_total`, which the text format must declare as `x_total`
//! (else the samples are untyped, with no help text), and the text format has no
//! `# UNIT` or `# EOF`. Must not: know any metric by name.

/// What a scrape gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    PrometheusText,
}

impl Format {
    /// The format an `Accept` header asks for (the text format when it names none
    /// we speak, as Prometheus's own exporters do).
    pub fn from_accept(accept: Option<&str>) -> Self {
        let asks_openmetrics = accept.is_some_and(|accept| {
            accept.split(',').any(|range| {
                let mut params = range.split(';').map(str::trim);
                let media = params.next().unwrap_or_default();
                let quality = params
                    .find_map(|param| param.strip_prefix("q="))
                    .and_then(|q| q.parse::<f32>().ok())
                    .unwrap_or(1.0);
                media.eq_ignore_ascii_case("application/openmetrics-text") && quality > 0.0
            })
        });
        if asks_openmetrics {
            Self::OpenMetrics
        } else {
            Self::PrometheusText
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The Prometheus text format of an OpenMetrics exposition.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // Families declared as counters: their `# HELP` and `# TYPE` take the `_total` name.
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let declared = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| line.strip_prefix(prefix).map(|rest| (prefix, rest)));
        match declared {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_and_gets_it() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
    }

    #[test]
    fn anything_else_gets_the_text_format() {
        for accept in [
            None,
            Some("*/*"),
            Some("text/plain"),
            Some("application/openmetrics-text;q=0"),
        ] {
            assert_eq!(
                Format::from_accept(accept),
                Format::PrometheusText,
                "{accept:?}"
            );
        }
    }

    #[test]
    fn counters_are_declared_by_their_sample_names_and_the_trailer_goes() {
        let openmetrics = "# HELP rayfence_drops Packets dropped.\n# TYPE rayfence_drops counter\nrayfence_drops_total{reason=\"no-policy\"} 3\n# HELP rayfence_latency_seconds Latency.\n# TYPE rayfence_latency_seconds histogram\n# UNIT rayfence_latency_seconds seconds\nrayfence_latency_seconds_sum 0.5\n# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP rayfence_drops_total Packets dropped.\n# TYPE rayfence_drops_total counter\nrayfence_drops_total{reason=\"no-policy\"} 3\n# HELP rayfence_latency_seconds Latency.\n# TYPE rayfence_latency_seconds histogram\nrayfence_latency_seconds_sum 0.5\n"
        );
    }
}
