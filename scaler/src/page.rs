//! The scaler's web page at `/`: every service's replicas, traffic, latency, held connections and
//! last decision, with the last five minutes charted, and every agent. A single self-contained
//! document (no external assets: it works air-gapped and behind `kubectl port-forward`) that polls
//! the JSON API (`api/v1/services`, relative, so it also works under a path prefix) every second.

use axum::{
    http::header,
    response::{IntoResponse, Response},
};

const PAGE: &str = include_str!("page.html");

pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_reads_the_api_by_a_relative_path_and_writes_no_html_from_data() {
        assert!(PAGE.contains("const API = \"api/v1/services\";"));
        // Names and reasons come from users: they are only ever set as text.
        assert!(!PAGE.contains("innerHTML"));
        // Self-contained: no address outside the scaler (the SVG namespace is a name, not a fetch).
        assert!(!PAGE.replace("http://www.w3.org/2000/svg", "").contains("://"));
    }
}
