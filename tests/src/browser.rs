//! A real browser for the tests: Debian's `chromium`, headless, with a profile of its own. It loads
//! a page, lets its scripts run for a while of virtual time (timers fire at once, so no test waits
//! for them), and returns the document as the scripts left it.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const CHROMIUM: &str = "/usr/bin/chromium";

/// The DOM of `url` after `script_time` of virtual time, serialised as HTML.
pub fn rendered_dom(url: &str, dir: &Path, script_time: Duration) -> String {
    assert!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: deploy/setup.sh installs Debian's chromium"
    );
    let profile = dir.join(format!("chromium-profile-{}", std::process::id()));
    let out = dir.join("chromium-dom.html");
    let err = dir.join("chromium.log");
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            // Tests run as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--virtual-time-budget={}", script_time.as_millis()),
            "--dump-dom",
            url,
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("DOM file"))
        .stderr(std::fs::File::create(&err).expect("chromium log"))
        .spawn()
        .expect("start chromium");
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s; its log is {}", err.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        status.success(),
        "chromium failed ({status}); its log is {}",
        err.display()
    );
    std::fs::read_to_string(&out).expect("the dumped DOM")
}

/// The outer HTML of the first element whose start tag contains `marker` (e.g.
/// `data-service="web"`), up to its matching end tag `</tag>` (elements of the same tag are not
/// nested in what the tests look at).
pub fn element<'a>(dom: &'a str, tag: &str, marker: &str) -> Option<&'a str> {
    let open = format!("<{tag} ");
    let mut from = 0;
    while let Some(at) = dom[from..].find(&open) {
        let start = from + at;
        let head_end = start + dom[start..].find('>')?;
        if dom[start..head_end].contains(marker) {
            let end = start + dom[start..].find(&format!("</{tag}>"))? + tag.len() + 3;
            return Some(&dom[start..end]);
        }
        from = head_end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_element_is_found_by_a_marker_in_its_start_tag() {
        let dom = r#"<tr data-service="a"><td>1</td></tr><tr data-service="b"><td>2</td></tr>"#;
        assert_eq!(
            element(dom, "tr", r#"data-service="b""#),
            Some(r#"<tr data-service="b"><td>2</td></tr>"#)
        );
        assert_eq!(element(dom, "tr", r#"data-service="c""#), None);
    }
}
