//! Helpers shared by the integration tests.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use picotun_testground::{http, wait_for};

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

/// Waits (up to 60 s) until exactly `count` pods matching `labels` are Running; returns them.
pub async fn running_pods(pods: &Api<Pod>, labels: &str, count: usize) -> Vec<Pod> {
    wait_for(
        &format!("{count} Running pods ({labels})"),
        Duration::from_secs(60),
        Duration::from_millis(250),
        || async {
            let list = pods.list(&ListParams::default().labels(labels)).await.map_err(|e| e.to_string())?;
            let running: Vec<Pod> = list
                .items
                .into_iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
                .collect();
            Ok((running.len() == count).then_some(running))
        },
    )
    .await
    .unwrap()
}
