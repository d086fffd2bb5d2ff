//! popivr's XMPP session against a real prosody.

mod support;

use support::{Prosody, TestAgent};

#[tokio::test]
async fn smoke() {
    let server = Prosody::builder()
        .user("pbx", "pbx-pw")
        .user("alice", "alice-pw")
        .start();
    eprintln!("startup {:?}", server.startup_time());
    let t = std::time::Instant::now();
    let conn = popivr::xmpp::login(&server.account("pbx", "pbx-pw"))
        .await
        .unwrap();
    eprintln!(
        "login {:?} {} {}",
        t.elapsed(),
        conn.mechanism,
        conn.timings
    );
    let t = std::time::Instant::now();
    let agent = TestAgent::login(&server, "alice", "alice-pw").await;
    eprintln!("agent login {:?}", t.elapsed());
    agent.close().await;
}
