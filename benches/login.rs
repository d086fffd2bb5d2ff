//! Login latency against a local test prosody, phase by phase.
//!
//!     cargo bench --bench login            # 30 logins each
//!     LOGIN_BENCH_N=100 cargo bench --bench login
//!
//! Prints the median and 90th percentile of popivr's one-shot login per
//! phase, the same total for tokio-xmpp's stock `Client` (the test agent)
//! as a baseline, the XMPP part of a per-call pop (session start → agent
//! has the message), and what reading the system trust store costs.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use popivr::call::OutgoingMessage;
use popivr::xmpp::{XmppEvent, XmppStatus};
use support::{Prosody, TestAgent, body};

fn main() {
    // Benchmarks are not tests: `cargo test --all-targets` runs this binary
    // without `--bench`, and then it does nothing.
    if !std::env::args().any(|a| a == "--bench") {
        println!("run with `cargo bench --bench login`");
        return;
    }
    let n: usize = std::env::var("LOGIN_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let server = Prosody::builder()
        .user("pbx", "bench-pbx-pw")
        .user("alice", "bench-alice-pw")
        .start();
    println!("prosody start-up: {:.1} ms", ms(server.startup_time()));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let account = server.account("pbx", "bench-pbx-pw");
        // Warm-up: first-use costs (ring tables, page faults) are real for a
        // per-call process, so report the first login on its own too.
        let first = popivr::xmpp::login(&account).await.expect("login");
        println!("first login: {} via {}", first.timings, first.mechanism);
        drop(first);

        let mut totals = Vec::with_capacity(n);
        let mut phases: BTreeMap<String, Vec<Duration>> = BTreeMap::new();
        let mut order: Vec<String> = Vec::new();
        for _ in 0..n {
            let conn = popivr::xmpp::login(&account).await.expect("login");
            totals.push(conn.timings.total);
            for (phase, d) in &conn.timings.phases {
                let key = phase.to_string();
                if !order.contains(&key) {
                    order.push(key.clone());
                }
                phases.entry(key).or_default().push(*d);
            }
        }
        println!("popivr login x{n}: {}", stats(&mut totals));
        for key in &order {
            println!("  {key:<18} {}", stats(phases.get_mut(key).unwrap()));
        }

        // Without ca_file the system roots are loaded (once per process,
        // beside the first round trips). The test CA is not among them, so
        // this ends in "unknown issuer"; what counts is how long the
        // verdict takes when the store is loaded for the first time
        // (compare connect..tls handshake above).
        let mut system_only = account.clone();
        system_only.ca_file = None;
        let t = Instant::now();
        let verdict = popivr::xmpp::login(&system_only)
            .await
            .expect_err("test CA is private");
        println!(
            "first login without ca_file (system roots): {verdict} after {:.2} ms",
            ms(t.elapsed())
        );

        let mut stock = Vec::with_capacity(n);
        for _ in 0..n.min(20) {
            let t = Instant::now();
            let agent = TestAgent::login(&server, "alice", "bench-alice-pw").await;
            stock.push(t.elapsed());
            agent.close().await;
        }
        println!(
            "tokio-xmpp Client login x{}: {}",
            stock.len(),
            stats(&mut stock)
        );

        // The XMPP half of a per-call pop: spawn the session, wait for
        // Online, send, and stop the clock when the agent has the message.
        let mut agent = TestAgent::login(&server, "alice", "bench-alice-pw").await;
        let mut pops = Vec::with_capacity(n);
        let mut onlines = Vec::with_capacity(n);
        let mut deliveries = Vec::with_capacity(n);
        for i in 0..n {
            let text = format!("pop {i}");
            let t = Instant::now();
            let mut session = popivr::xmpp::spawn(account.clone(), Default::default());
            match session.recv().await {
                Some(XmppEvent::Status(XmppStatus::Online)) => {}
                other => panic!("expected online, got {other:?}"),
            }
            onlines.push(t.elapsed());
            let sent = Instant::now();
            session.send(OutgoingMessage::chat(agent.bare(), text.clone(), None));
            agent
                .expect_message(|m| body(m) == Some(text.as_str()))
                .await;
            pops.push(t.elapsed());
            deliveries.push(sent.elapsed());
            session.close().await;
        }
        println!("pop (spawn → agent has it) x{n}: {}", stats(&mut pops));
        println!("  spawn → online     {}", stats(&mut onlines));
        println!("  send → agent has it {}", stats(&mut deliveries));
        agent.close().await;
    });

    trust_store_costs();
    scram_cost();
}

/// Client-side SCRAM-SHA-1 work at prosody's default 10000 iterations:
/// the PBKDF2 a login spends in the auth phase.
fn scram_cost() {
    use sasl::client::Mechanism;
    use sasl::client::mechanisms::Scram;
    use sasl::common::scram::Sha1;
    use sasl::common::{ChannelBinding, Credentials};

    let mut v = Vec::new();
    for _ in 0..10 {
        let creds = Credentials::default()
            .with_username("pbx")
            .with_password("bench-pbx-pw")
            .with_channel_binding(ChannelBinding::None);
        let mut scram = Scram::<Sha1>::from_credentials(creds).expect("scram");
        let first = String::from_utf8(scram.initial()).expect("utf-8");
        let nonce = first.rsplit("r=").next().expect("nonce");
        let challenge = format!("r={nonce}server,s=c2FsdHNhbHRzYWx0,i=10000");
        let t = Instant::now();
        scram.response(challenge.as_bytes()).expect("response");
        v.push(t.elapsed());
    }
    println!("SCRAM-SHA-1 client proof, i=10000: {}", stats(&mut v));
}

/// What the system trust store costs a login without `ca_file`.
fn trust_store_costs() {
    use tokio_rustls::rustls::RootCertStore;
    use tokio_rustls::rustls::pki_types::{CertificateDer, pem::PemObject};

    let t = Instant::now();
    let native = rustls_native_certs::load_native_certs();
    let read = t.elapsed();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(native.certs.clone());
    println!(
        "system trust store (rustls-native-certs): {} certificates read in {:.2} ms, \
         anchors built in {:.2} ms",
        native.certs.len(),
        ms(read),
        ms(t.elapsed() - read)
    );
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    let t = Instant::now();
    if let Ok(iter) = CertificateDer::pem_file_iter(bundle) {
        let certs: Vec<_> = iter.filter_map(Result::ok).collect();
        println!(
            "  {bundle} alone (what popivr reads): {} certificates in {:.2} ms",
            certs.len(),
            ms(t.elapsed())
        );
    }
}

fn stats(v: &mut [Duration]) -> String {
    v.sort();
    let pick = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
        ms(pick(0.5)),
        ms(pick(0.9)),
        ms(v[0])
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
