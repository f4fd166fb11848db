//! Helpers shared by the integration tests.

use std::time::Duration;

use picotun_testground::http;

/// Polls `GET path` on `addr` with `host` until the body equals `want`, for up to 20 s, and
/// returns the number of attempts it took. Panics with the last answer otherwise.
pub async fn expect_body(addr: &str, host: &str, path: &str, want: &str) -> u32 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let last = match http::get(addr, host, path).await {
            Ok(r) if r.status == 200 && r.body == want => return attempts,
            Ok(r) => format!("{} {:?}", r.status, r.body),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() > deadline {
            panic!("GET http://{host}{path} via {addr}: wanted {want:?}, last answer: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
