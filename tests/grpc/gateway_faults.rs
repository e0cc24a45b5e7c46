//! The gateway against real model-service processes that fail: `kill -9` mid-stream, a frozen
//! (SIGSTOPped) replica, DNS answers that change under a running gateway, and the CLI's exit
//! code when its backend dies. The replicas are `janus serve-understanding` children on
//! 127.0.0.2 / 127.0.0.3 with the tiny checkpoint; the gateway runs in-process. Every wait is
//! bounded; nothing asserts on wall-clock thresholds (the measured times are printed).

// Every test holds `serial()`'s guard across its awaits on purpose (see `serial`).
#![allow(clippy::await_holding_lock)]

use crate::common::*;
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use janus_gateway::{GatewayOptions, GatewayTuning};
use janus_proto::v1 as pb;
use janus_service::{Lifecycle, Running, ServerOptions};
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Endpoint;
use tonic::{Code, Status, Streaming};

const JANUS: &str = env!("CARGO_BIN_EXE_janus");
/// Tokens of a stream that must outlive the steps of a test (about 10 s on the tiny model).
const LONG: u32 = 10_000;
/// Tokens of a stream that is cut anyway.
const ENDLESS: u32 = 16_000;

/// The tests of this file share the two loopback addresses and the CPU: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Each caller holds the guard for its whole body, awaits included: that is the point (the
/// tests share loopback addresses), hence this file's `await_holding_lock` allowance.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A port free on every one of `ips` (the replicas of a DNS name share one).
fn free_port(ips: &[&str]) -> u16 {
    for _ in 0..50 {
        let l = std::net::TcpListener::bind((ips[0], 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        if ips[1..]
            .iter()
            .all(|ip| std::net::TcpListener::bind((*ip, port)).is_ok())
        {
            return port;
        }
    }
    panic!("no port free on all of {ips:?}");
}

/// `janus serve-understanding` as a child process; SIGKILLed on drop.
struct Replica {
    child: Child,
    addr: SocketAddr,
}

impl Replica {
    fn spawn_with(addr: SocketAddr, extra: &[&str]) -> Self {
        let child = Command::new(JANUS)
            .args([
                "serve-understanding",
                "--model",
                model_dir().to_str().unwrap(),
                "--listen",
                &addr.to_string(),
                "--grace-period",
                "1",
                "--max-new-tokens-limit",
                &ENDLESS.to_string(),
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("JANUS_MODEL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        Self { child, addr }
    }

    /// Spawned and SERVING (asked directly).
    async fn start(addr: SocketAddr) -> Self {
        Self::start_with(addr, &[]).await
    }

    async fn start_with(addr: SocketAddr, extra: &[&str]) -> Self {
        let r = Self::spawn_with(addr, extra);
        let url = r.url();
        wait_for(Duration::from_secs(120), &format!("{url} serving"), || {
            let url = url.clone();
            async move {
                let ep = Endpoint::from_shared(url)
                    .unwrap()
                    .connect_timeout(Duration::from_secs(1));
                match tokio::time::timeout(Duration::from_secs(2), ep.connect()).await {
                    Ok(Ok(ch)) => {
                        health_status(ch, janus_proto::UNDERSTANDING_SERVICE).await == Some(1)
                    }
                    _ => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        false
                    }
                }
            }
        })
        .await;
        r
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {}", self.child.id());
    }

    /// SIGKILL and reap.
    fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// The replica's engine counters, asked directly.
    async fn stats(&self) -> pb::EngineStats {
        let mut c = und_client(&self.url()).await;
        within(Duration::from_secs(10), "Info", c.info(pb::InfoRequest {}))
            .await
            .unwrap()
            .into_inner()
            .stats
            .unwrap()
    }

    async fn completed(&self) -> u64 {
        self.stats().await.completed
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // SIGKILL also ends a stopped process.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tuning() -> GatewayTuning {
    GatewayTuning {
        health_interval: 0.2,
        connect_timeout: 1.0,
        ..Default::default()
    }
}

/// An in-process gateway over understanding targets.
async fn gateway(und: Vec<String>, tuning: GatewayTuning) -> Running {
    janus_gateway::serve(
        GatewayOptions {
            understanding: und,
            generation: vec![],
            tuning,
            server: ServerOptions {
                grace_period: Duration::from_secs(2),
                ..Default::default()
            },
            backend_tls: None,
        },
        bind().await,
        Lifecycle::new(),
    )
    .await
    .unwrap()
}

fn request(n: u32) -> pb::UnderstandRequest {
    pb::UnderstandRequest {
        messages: vec![user("hello", vec![])],
        sampling: Some(greedy_sampling(n)),
        request_id: String::new(),
    }
}

/// A greedy stream of `n` tokens through `gw`, after its first `skip` tokens.
async fn open_stream(gw: &str, n: u32, skip: usize) -> Streaming<pb::UnderstandResponse> {
    let mut c = und_client(gw).await;
    let mut s = within(WAIT, "open a stream", c.understand(request(n)))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..skip {
        let m = within(WAIT, "a token", s.message()).await.unwrap();
        assert!(
            matches!(
                m.and_then(|m| m.event),
                Some(pb::understand_response::Event::Token(_))
            ),
            "a token"
        );
    }
    s
}

/// Reads `s` until it fails; panics when it ends normally.
async fn until_error(s: &mut Streaming<pb::UnderstandResponse>) -> Status {
    within(Duration::from_secs(60), "the stream's error", async {
        loop {
            match s.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the stream ended normally"),
                Err(e) => return e,
            }
        }
    })
    .await
}

/// One short request through the gateway.
/// A one-token answer through `gw`; each call a conversation of its own (as distinct users'
/// would be), so prefix affinity spreads them over the replicas like any balancing.
async fn ask(gw: &str) -> Result<Answer, Status> {
    static ASKED: AtomicUsize = AtomicUsize::new(0);
    let mut c = und_client(gw).await;
    let mut r = request(1);
    r.messages = vec![user(
        &format!("hello {}", ASKED.fetch_add(1, Ordering::Relaxed)),
        vec![],
    )];
    collect_answer(&mut c, tonic::Request::new(r)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_stream_then_the_replica_returns() {
    let _serial = serial();
    let a_addr: SocketAddr = format!("127.0.0.2:{}", free_port(&["127.0.0.2"]))
        .parse()
        .unwrap();
    let b_addr: SocketAddr = format!("127.0.0.3:{}", free_port(&["127.0.0.3"]))
        .parse()
        .unwrap();
    let mut a = Replica::start(a_addr).await;
    // B is configured but not up yet: the stream can only go to A.
    let gw = gateway(vec![a_addr.to_string(), b_addr.to_string()], tuning()).await;
    let gw_url = gw.url();
    let mut stream = open_stream(&gw_url, ENDLESS, 5).await;
    assert_eq!(a.stats().await.active, 1);

    let b = Replica::start(b_addr).await;
    // B in rotation: A has a stream in flight, so the two choices send new calls to B.
    wait_for(WAIT, "B takes requests through the gateway", || {
        let (gw_url, b) = (gw_url.clone(), &b);
        async move {
            ask(&gw_url).await.unwrap();
            b.completed().await > 0
        }
    })
    .await;

    let killed = Instant::now();
    a.kill9();
    let err = until_error(&mut stream).await;
    println!(
        "kill -9 → client error: {:?} ({:?}: {})",
        killed.elapsed(),
        err.code(),
        err.message()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&a_addr.to_string()),
        "the error names the lost backend {a_addr}: {}",
        err.message()
    );

    // The next requests are answered by B.
    let before = b.completed().await;
    for _ in 0..4 {
        let ans = ask(&gw_url).await.expect("answered by B");
        assert!(ans.fin.is_some());
    }
    wait_for(
        Duration::from_secs(10),
        "B counted the 4 requests",
        || async { b.completed().await == before + 4 },
    )
    .await;

    // A restarted on the same port returns to rotation.
    drop(a);
    let a = Replica::start(a_addr).await;
    wait_for(WAIT, "the restarted A takes requests again", || {
        let (gw_url, a) = (gw_url.clone(), &a);
        async move {
            ask(&gw_url).await.expect("requests keep succeeding");
            a.completed().await > 0
        }
    })
    .await;

    // The CLI: a stream whose backend is killed exits with 4 (UNAVAILABLE).
    let dir = tempfile::tempdir().unwrap();
    let err_path = dir.path().join("stderr");
    let mut cli = Command::new(JANUS)
        .args([
            "understand",
            "--server",
            &gw_url,
            "--max-new-tokens",
            &ENDLESS.to_string(),
            "--min-new-tokens",
            &ENDLESS.to_string(),
            "--temperature",
            "0",
            "hello",
        ])
        .env_remove("JANUS_SERVER")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let replicas = [a, b];
    wait_for(WAIT, "the CLI's stream runs on a replica", || {
        let replicas = &replicas;
        async move {
            let mut active = 0;
            for r in replicas {
                active += r.stats().await.active;
            }
            active > 0
        }
    })
    .await;
    let [mut a, mut b] = replicas;
    a.kill9();
    b.kill9();
    let started = Instant::now();
    let code = loop {
        if let Some(s) = cli.try_wait().unwrap() {
            break s.code();
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = cli.kill();
            panic!("the CLI did not exit within 60 s of its backend's death");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::fs::File::open(&err_path)
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(
        code,
        Some(4),
        "exit code of a lost backend; stderr: {stderr}"
    );
    assert!(stderr.to_lowercase().contains("unavailable"), "{stderr}");
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_fails_its_stream_by_keepalive() {
    let _serial = serial();
    let addr: SocketAddr = format!("127.0.0.2:{}", free_port(&["127.0.0.2"]))
        .parse()
        .unwrap();
    let a = Replica::start(addr).await;
    let gw = gateway(
        vec![addr.to_string()],
        GatewayTuning {
            backend_keepalive: 1.0,
            backend_keepalive_timeout: 1.0,
            ..tuning()
        },
    )
    .await;
    let mut stream = open_stream(&gw.url(), ENDLESS, 5).await;
    let stopped = Instant::now();
    a.signal("STOP");
    let err = until_error(&mut stream).await;
    println!(
        "SIGSTOP → client error: {:?} ({:?}: {})",
        stopped.elapsed(),
        err.code(),
        err.message()
    );
    a.signal("CONT");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&addr.to_string()),
        "the error names the frozen backend {addr}: {}",
        err.message()
    );
    drop(a);
    gw.stop().await.unwrap();
}

/// A UDP DNS server answering A queries with the current addresses (TTL 0), AAAA with none;
/// it can stop answering.
struct Dns {
    addr: SocketAddr,
    answer: Arc<Mutex<Vec<Ipv4Addr>>>,
    answering: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Dns {
    async fn start(first: Vec<Ipv4Addr>) -> Self {
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        let answer = Arc::new(Mutex::new(first));
        let answering = Arc::new(AtomicBool::new(true));
        let queries = Arc::new(AtomicUsize::new(0));
        let (ans, on, count) = (answer.clone(), answering.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                if !on.load(Ordering::SeqCst) {
                    continue;
                }
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::new();
                r.set_id(q.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(q.op_code())
                    .set_recursion_desired(q.recursion_desired())
                    .set_recursion_available(true)
                    .set_authoritative(true)
                    .set_response_code(ResponseCode::NoError);
                for query in q.queries() {
                    r.add_query(query.clone());
                    if query.query_type() == RecordType::A {
                        for ip in ans.lock().unwrap().iter() {
                            r.add_answer(Record::from_rdata(
                                query.name().clone(),
                                0,
                                RData::A(A(*ip)),
                            ));
                        }
                    }
                }
                if let Ok(bytes) = r.to_vec() {
                    let _ = sock.send_to(&bytes, peer).await;
                }
            }
        });
        Self {
            addr,
            answer,
            answering,
            queries,
            task,
        }
    }

    fn set(&self, ips: &[Ipv4Addr]) {
        *self.answer.lock().unwrap() = ips.to_vec();
    }

    /// Waits until the gateway has asked twice more: the second query comes after the answer
    /// to the first was applied.
    async fn two_more_queries(&self) {
        let seen = self.queries.load(Ordering::SeqCst);
        wait_for(WAIT, "two more DNS queries", || async {
            self.queries.load(Ordering::SeqCst) >= seen + 2
        })
        .await;
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_that_change() {
    let _serial = serial();
    let (ip2, ip3) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let port = free_port(&["127.0.0.2", "127.0.0.3"]);
    let r2 = Replica::start(SocketAddr::new(ip2.into(), port)).await;
    let r3 = Replica::start(SocketAddr::new(ip3.into(), port)).await;
    let dns = Dns::start(vec![ip2]).await;
    let gw = gateway(
        vec![format!("und.janus.test:{port}")],
        GatewayTuning {
            dns_server: Some(dns.addr),
            resolve_interval: 0.2,
            ..tuning()
        },
    )
    .await;
    let gw_url = gw.url();

    // Only .2 is answered: it serves everything.
    for _ in 0..3 {
        ask(&gw_url).await.expect("served by .2");
    }
    wait_for(Duration::from_secs(10), ".2 served 3", || async {
        r2.completed().await == 3
    })
    .await;
    assert_eq!(r3.completed().await, 0);
    // A long stream on .2 (the only address), to be drained later.
    let mut long = open_stream(&gw_url, LONG, 3).await;

    // .2 and .3: the new address gets traffic.
    dns.set(&[ip2, ip3]);
    wait_for(WAIT, ".3 takes requests", || {
        let (gw_url, r3) = (gw_url.clone(), &r3);
        async move {
            ask(&gw_url).await.expect("requests keep succeeding");
            r3.completed().await > 0
        }
    })
    .await;

    // Only .3: .2 gets no new request, its stream in flight is not cut.
    dns.set(&[ip3]);
    dns.two_more_queries().await;
    let (c2, c3) = (r2.completed().await, r3.completed().await);
    for _ in 0..6 {
        ask(&gw_url).await.expect("served by .3");
    }
    wait_for(Duration::from_secs(10), ".3 served 6 more", || async {
        r3.completed().await == c3 + 6
    })
    .await;
    let s2 = r2.stats().await;
    assert_eq!(
        s2.completed, c2,
        ".2 got no new request after leaving the answer"
    );
    assert_eq!(
        s2.active, 1,
        "the long stream still runs on .2 (it is what the drain is checked with)"
    );
    let (mut tokens, mut fin) = (3usize, None);
    within(
        Duration::from_secs(120),
        "the drained stream's end",
        async {
            while let Some(m) = long.message().await.expect("the drained stream is not cut") {
                match m.event.unwrap() {
                    pb::understand_response::Event::Token(_) => tokens += 1,
                    pb::understand_response::Event::Final(f) => fin = Some(f),
                }
            }
        },
    )
    .await;
    assert_eq!(tokens, LONG as usize);
    assert_eq!(
        fin.expect("a final message").finish_reason,
        pb::FinishReason::Length as i32
    );
    wait_for(
        Duration::from_secs(10),
        ".2 completed the stream",
        || async { r2.completed().await == c2 + 1 },
    )
    .await;

    // The DNS server stops answering: the last good set (.3) keeps serving.
    dns.answering.store(false, Ordering::SeqCst);
    dns.two_more_queries().await;
    let c3 = r3.completed().await;
    for _ in 0..3 {
        ask(&gw_url)
            .await
            .expect("the last good address still serves");
    }
    wait_for(Duration::from_secs(10), ".3 served 3 more", || async {
        r3.completed().await == c3 + 3
    })
    .await;
    assert_eq!(r2.completed().await, c2 + 1);
    gw.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_age_out_without_failing_calls() {
    let _serial = serial();
    // Past its age the connection gets a GOAWAY: its stream goes on, new calls re-dial.
    let addr: SocketAddr = format!("127.0.0.2:{}", free_port(&["127.0.0.2"]))
        .parse()
        .unwrap();
    let a = Replica::start_with(
        addr,
        &[
            "--max-connection-age",
            "1",
            "--max-connection-age-grace",
            "120",
        ],
    )
    .await;
    let gw = gateway(vec![addr.to_string()], tuning()).await;
    let gw_url = gw.url();
    let mut long = open_stream(&gw_url, LONG, 3).await;
    let started = Instant::now();
    let mut asked = 0;
    // Calls over three connection ages all succeed (health checks and calls share the
    // connections being retired).
    while started.elapsed() < Duration::from_secs(3) {
        ask(&gw_url)
            .await
            .expect("a call while connections age out");
        asked += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(a.stats().await.active, 1, "the long stream still runs");
    let mut tokens = 3usize;
    within(Duration::from_secs(120), "the long stream's end", async {
        while let Some(m) = long
            .message()
            .await
            .expect("a stream on an aged connection is not cut within the grace")
        {
            if let Some(pb::understand_response::Event::Token(_)) = m.event {
                tokens += 1;
            }
        }
    })
    .await;
    assert_eq!(tokens, LONG as usize);
    println!("{asked} calls while connections aged out");
    drop(a);
    gw.stop().await.unwrap();

    // Past age + grace the connection is closed: a stream still on it ends with UNAVAILABLE.
    let b = Replica::start_with(
        addr,
        &[
            "--max-connection-age",
            "1",
            "--max-connection-age-grace",
            "1",
        ],
    )
    .await;
    let gw = gateway(vec![addr.to_string()], tuning()).await;
    let mut stream = open_stream(&gw.url(), ENDLESS, 3).await;
    let err = until_error(&mut stream).await;
    println!(
        "closed past age + grace: {:?}: {}",
        err.code(),
        err.message()
    );
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains(&addr.to_string()),
        "{}",
        err.message()
    );
    drop(b);
    gw.stop().await.unwrap();
}
