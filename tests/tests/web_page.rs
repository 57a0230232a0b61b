//! The scaler's web page in a real browser (Debian's chromium, headless): what it shows is what
//! the kernel counted, and a page that cannot reach the scaler says so. Needs root (eBPF).

use std::time::Duration;

use surge_tests::{
    browser::{element, rendered_dom},
    harness::{free_port, require_root, scratch, Agent, Sample, Scaler},
    http_client::get_text,
    load::{run, LoadSpec},
};

#[test]
fn the_page_shows_the_counted_requests_and_the_connected_agent() {
    require_root();
    let dir = scratch("web-page");
    let web = Sample::start(&dir);
    let scaler = Scaler::start(
        &dir,
        free_port(),
        &["--observe".into(), format!("web={}", web.addr)],
    );
    let _agent = Agent::start(&dir, &scaler.grpc_url(), &[]);
    scaler.wait_for("web", "first report", |v| v["reported"] == true);
    let sent = 37;
    let r = run(&LoadSpec::get(web.addr, sent));
    assert_eq!(r.ok, sent, "{:?}", &r.errors[..r.errors.len().min(5)]);
    scaler.wait_for("web", "every request counted", |v| {
        v["requests_total"] == sent as u64
    });

    let dom = rendered_dom(&format!("http://{}/", scaler.http), &dir, Duration::from_secs(3));
    let status = element(&dom, "span", r#"id="status""#).unwrap_or_else(|| panic!("no status in:\n{dom}"));
    assert!(
        status.contains("1 service(s) · 1 agent(s) connected · updated "),
        "{status}"
    );
    let row =
        element(&dom, "tr", r#"data-service="web""#).unwrap_or_else(|| panic!("no row for web in:\n{dom}"));
    assert!(
        row.contains(r#"<td data-field="requests_total" data-value="37">37</td>"#),
        "{row}"
    );
    assert!(row.contains(r#"<span class="sub">observe</span>"#), "{row}");
    // Nothing was held, so nothing is relayed or has left the path.
    assert!(
        row.contains(r#"<td data-field="relayed" data-value="[0,0]">0 / 0</td>"#),
        "{row}"
    );
    assert!(
        row.contains(r#"data-field="last_decision">no policy: observed only</td>"#),
        "{row}"
    );
    let agent = element(&dom, "tr", "data-node=").unwrap_or_else(|| panic!("no agent row in:\n{dom}"));
    assert!(
        agent.contains(r#"<td data-field="connected" data-value="true">yes</td>"#),
        "{agent}"
    );
}

#[test]
fn a_page_that_cannot_reach_the_scaler_says_so() {
    require_root();
    let dir = scratch("web-page-offline");
    let scaler = Scaler::start(&dir, free_port(), &[]);
    let (code, page) = get_text(scaler.http, "/").expect("the page");
    assert_eq!(code, 200);
    // The same page opened from a file: its API request (relative) has nothing to answer it.
    let file = dir.join("surge.html");
    std::fs::write(&file, page).expect("write the page");
    let dom = rendered_dom(
        &format!("file://{}", file.display()),
        &dir,
        Duration::from_secs(2),
    );
    let status = element(&dom, "span", r#"id="status""#).unwrap_or_else(|| panic!("no status in:\n{dom}"));
    assert!(
        status.starts_with(r#"<span id="status" class="bad">cannot reach the scaler: "#),
        "{status}"
    );
}
