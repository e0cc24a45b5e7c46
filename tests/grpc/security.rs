//! API keys and TLS with real sockets and real certificates (generated here with rcgen): keys at
//! the gateway (missing, malformed, unknown, right; health and reflection open; the per-key
//! counter), TLS on the public port (a plaintext client fails cleanly and the server keeps
//! serving), mTLS between the gateway and the model services (a gateway whose client
//! certificate comes from another CA is refused: UNAVAILABLE naming the backend, quickly), and
//! the `janus` CLI with `--api-key` and `--ca-file` against `janus serve` with TLS and keys.

use crate::common::*;
use janus_proto::v1 as pb;
use janus_proto::v1::understanding_client::UnderstandingClient;
use janus_service::auth::{ApiKeys, AuthPolicy};
use janus_service::{Lifecycle, Running, Security, ServerOptions};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request};

const KEY: &str = "test-key-0123456789abcdef";
const OTHER_KEY: &str = "second-key-abcdef";

/// A certificate authority writing PEM files into a directory.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes `<name>.crt`/`<name>.key` (server and client usage, SANs localhost and
    /// 127.0.0.1) and returns their paths.
    fn leaf(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, &self.pem).unwrap();
        p
    }
}

fn keys(list: &[&str]) -> Option<Arc<ApiKeys>> {
    Some(Arc::new(ApiKeys::new(list).unwrap()))
}

fn with_key<T>(body: T, key: &str) -> Request<T> {
    let mut r = Request::new(body);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

async fn tls_channel(url: &str, ca_pem: &str) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
    tokio::time::timeout(
        Duration::from_secs(10),
        Endpoint::from_shared(url.to_string())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect(),
    )
    .await
    .expect("TLS connect: no answer within 10 s")
}

async fn gateway(
    und: Vec<String>,
    gen: Vec<String>,
    server: ServerOptions,
    backend_tls: Option<ClientTlsConfig>,
) -> Running {
    janus_gateway::serve(
        janus_gateway::GatewayOptions {
            understanding: und,
            generation: gen,
            tuning: janus_gateway::GatewayTuning {
                health_interval: 0.2,
                connect_timeout: 1.0,
                ..Default::default()
            },
            server,
            backend_tls,
        },
        bind().await,
        Lifecycle::new(),
    )
    .await
    .unwrap()
}

fn short_question() -> pb::UnderstandRequest {
    pb::UnderstandRequest {
        messages: vec![user("Say something.", vec![])],
        sampling: Some(greedy_sampling(3)),
        request_id: String::new(),
    }
}

async fn reflection_list(ch: Channel, key: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let body = tokio_stream::iter(vec![req]);
    let r = match key {
        Some(k) => with_key(body, k),
        None => Request::new(body),
    };
    let mut s = within(
        WAIT,
        "reflection",
        ServerReflectionClient::new(ch).server_reflection_info(r),
    )
    .await?
    .into_inner();
    match within(WAIT, "reflection", s.message())
        .await?
        .unwrap()
        .message_response
    {
        Some(MessageResponse::ListServicesResponse(l)) => {
            Ok(l.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

fn assert_unauthenticated(r: Result<impl std::fmt::Debug, tonic::Status>, needle: &str) {
    let s = r.expect_err("refused");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(
        s.message().contains(needle),
        "{needle:?} in {:?}",
        s.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_at_the_gateway() {
    let cfg = StackConfig::default();
    let und = start_understanding(&cfg).await;
    let gen = start_generation(&cfg).await;
    let metrics = janus_telemetry::Metrics::new("janus-gateway", janus_telemetry::build_info!());
    let secured = |reflection_requires_key| ServerOptions {
        security: Security {
            auth: AuthPolicy {
                keys: keys(&[KEY, OTHER_KEY]),
                reflection_requires_key,
            },
            tls: None,
        },
        metrics: metrics.clone(),
        ..cfg.server.clone()
    };
    let gw = gateway(vec![und.url()], vec![gen.url()], secured(false), None).await;
    let ch = channel(&gw.url()).await;

    // Health is open: probes carry no key.
    wait_for(Duration::from_secs(20), "gateway sees the backends", || {
        let ch = ch.clone();
        async move { health_status(ch, janus_proto::UNDERSTANDING_SERVICE).await == Some(1) }
    })
    .await;
    assert_eq!(health_status(ch.clone(), "").await, Some(1));

    let mut c = UnderstandingClient::new(ch.clone());
    // No key, not Bearer, an unknown key: UNAUTHENTICATED naming what is wrong, never the key.
    assert_unauthenticated(c.info(pb::InfoRequest {}).await, "missing API key");
    let mut basic = Request::new(pb::InfoRequest {});
    basic
        .metadata_mut()
        .insert("authorization", "Basic dGVzdDp0ZXN0".parse().unwrap());
    assert_unauthenticated(
        c.info(basic).await,
        "expected `authorization: Bearer <key>`",
    );
    let wrong = "wrong-key-that-must-not-be-echoed";
    let r = c.info(with_key(pb::InfoRequest {}, wrong)).await;
    let s = r.as_ref().expect_err("refused").clone();
    assert!(!s.message().contains(wrong) && !format!("{:?}", s.metadata()).contains(wrong));
    assert_unauthenticated(r, "unknown API key");
    // Streams are refused before they start.
    assert_unauthenticated(c.understand(short_question()).await, "missing API key");

    // The right keys work, for unary and streaming calls.
    let info = c.info(with_key(pb::InfoRequest {}, KEY)).await.unwrap();
    assert_eq!(info.get_ref().model_id, "janus-tiny");
    let a = collect_answer(&mut c, with_key(short_question(), OTHER_KEY))
        .await
        .unwrap();
    assert_eq!(a.ids.len(), 3);
    assert!(a.fin.is_some());

    // Reflection is open by default…
    let names = reflection_list(ch.clone(), None).await.unwrap();
    assert!(
        names.iter().any(|n| n == "janus.v1.Understanding"),
        "{names:?}"
    );

    // …and per key counts use the key's short hash, never the key.
    let text = metrics.encode();
    let label = janus_service::auth::key_label(KEY);
    assert!(
        text.contains(&format!(
            "janus_auth_requests_total{{key=\"{label}\",result=\"ok\"}} 1"
        )),
        "{text}"
    );
    for result in ["missing", "malformed", "unknown_key"] {
        assert!(
            text.contains(&format!("key=\"none\",result=\"{result}\"")),
            "{result}: {text}"
        );
    }
    assert!(!text.contains(KEY) && !text.contains(wrong));
    assert!(text.contains("code=\"UNAUTHENTICATED\""), "{text}");

    // With --reflection-requires-key, reflection needs a key too; health still does not.
    let strict = gateway(vec![und.url()], vec![gen.url()], secured(true), None).await;
    let ch2 = channel(&strict.url()).await;
    assert_unauthenticated(reflection_list(ch2.clone(), None).await, "missing API key");
    assert!(reflection_list(ch2.clone(), Some(KEY)).await.is_ok());
    assert!(health_status(ch2, "").await.is_some());

    strict.stop().await.unwrap();
    gw.stop().await.unwrap();
    und.stop().await.unwrap();
    gen.stop().await.unwrap();
}

/// mTLS model services (client CA = `clients`), each answering with `services`' certificates.
struct MtlsBackends {
    und: Running,
    gen: Running,
    services_ca: Ca,
    clients_ca: Ca,
    dir: tempfile::TempDir,
}

async fn mtls_backends() -> MtlsBackends {
    let dir = tempfile::tempdir().unwrap();
    let services_ca = Ca::new("janus services CA");
    let clients_ca = Ca::new("janus clients CA");
    let (cert, key) = services_ca.leaf(dir.path(), "service");
    let client_ca = clients_ca.write(dir.path(), "clients-ca.crt");
    let mut cfg = StackConfig::default();
    cfg.server.security = Security {
        // The services check keys too: the gateway forwards the caller's.
        auth: AuthPolicy {
            keys: keys(&[KEY]),
            reflection_requires_key: false,
        },
        tls: Some(janus_service::tls::server_config(&cert, &key, Some(&client_ca)).unwrap()),
    };
    let und = start_understanding(&cfg).await;
    let gen = start_generation(&cfg).await;
    MtlsBackends {
        und,
        gen,
        services_ca,
        clients_ca,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_the_gateway_and_mtls_to_the_services() {
    let b = mtls_backends().await;
    let dir = b.dir.path();
    // The gateway: its client certificate from the clients' CA, trusting the services' CA;
    // the public port with its own certificate from a public CA.
    let (gw_client_cert, gw_client_key) = b.clients_ca.leaf(dir, "gateway-client");
    let services_ca = b.services_ca.write(dir, "services-ca.crt");
    let backend_tls = janus_service::tls::client_config(
        Some(&services_ca),
        Some(&gw_client_cert),
        Some(&gw_client_key),
        None,
    )
    .unwrap();
    let public_ca = Ca::new("janus public CA");
    let (pub_cert, pub_key) = public_ca.leaf(dir, "gateway");
    let server = ServerOptions {
        security: Security {
            auth: AuthPolicy {
                keys: keys(&[KEY]),
                reflection_requires_key: false,
            },
            tls: Some(janus_service::tls::server_config(&pub_cert, &pub_key, None).unwrap()),
        },
        grace_period: Duration::from_secs(2),
        ..Default::default()
    };
    // Bare host:port backends with backend TLS configured: https.
    let gw = gateway(
        vec![b.und.local_addr().to_string()],
        vec![b.gen.local_addr().to_string()],
        server,
        Some(backend_tls),
    )
    .await;
    let url = format!("https://localhost:{}", gw.local_addr().port());
    let ch = tls_channel(&url, &public_ca.pem).await.unwrap();
    wait_for(
        Duration::from_secs(20),
        "gateway sees the mTLS backends",
        || {
            let ch = ch.clone();
            async move {
                health_status(ch.clone(), janus_proto::UNDERSTANDING_SERVICE).await == Some(1)
                    && health_status(ch, janus_proto::GENERATION_SERVICE).await == Some(1)
            }
        },
    )
    .await;

    // Through TLS, the gateway and mTLS to the services, with the key.
    let mut c = UnderstandingClient::new(ch.clone());
    let a = collect_answer(&mut c, with_key(short_question(), KEY))
        .await
        .unwrap();
    assert_eq!(a.ids.len(), 3);
    let gen_info = janus_proto::v1::generation_client::GenerationClient::new(ch.clone())
        .info(with_key(pb::InfoRequest {}, KEY))
        .await
        .unwrap();
    assert_eq!(gen_info.get_ref().model_id, "janus-tiny");
    assert_unauthenticated(c.info(pb::InfoRequest {}).await, "missing API key");

    // A plaintext client on the TLS port fails cleanly (no hang)…
    let plain = format!("http://127.0.0.1:{}", gw.local_addr().port());
    let started = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(15), async {
        let ch = Endpoint::from_shared(plain)
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        UnderstandingClient::new(ch)
            .info(with_key(pb::InfoRequest {}, KEY))
            .await
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
    .await
    .expect("a plaintext client on a TLS port must fail, not hang");
    eprintln!("plaintext client on the TLS port: {res:?}");
    assert!(res.is_err(), "plaintext call succeeded on a TLS port");
    assert!(started.elapsed() < Duration::from_secs(15));
    // …and so does a TLS client that does not trust the certificate.
    let stranger = Ca::new("someone else");
    let untrusted = match tls_channel(&url, &stranger.pem).await {
        Err(_) => true,
        Ok(ch) => UnderstandingClient::new(ch)
            .info(with_key(pb::InfoRequest {}, KEY))
            .await
            .is_err(),
    };
    assert!(untrusted, "a client with the wrong CA got through");

    // The server keeps serving.
    let ch = tls_channel(&url, &public_ca.pem).await.unwrap();
    let info = UnderstandingClient::new(ch)
        .info(with_key(pb::InfoRequest {}, KEY))
        .await
        .unwrap();
    assert_eq!(info.get_ref().model_id, "janus-tiny");

    // Probes that speak neither TLS nor keys use the plaintext health port (--health-listen).
    let stop = tokio_util::sync::CancellationToken::new();
    let probe = janus_service::server::serve_health(
        "127.0.0.1:0",
        gw.health(),
        &Default::default(),
        stop.clone(),
    )
    .await
    .unwrap();
    let probe_ch = channel(&format!("http://{probe}")).await;
    assert_eq!(health_status(probe_ch.clone(), "").await, Some(1));
    assert_eq!(
        health_status(probe_ch, janus_proto::GENERATION_SERVICE).await,
        Some(1)
    );
    stop.cancel();

    // The services themselves refuse a client without a certificate.
    let direct = format!("https://127.0.0.1:{}", b.und.local_addr().port());
    let refused = match tls_channel(&direct, &b.services_ca.pem).await {
        Err(_) => true,
        Ok(ch) => UnderstandingClient::new(ch)
            .info(with_key(pb::InfoRequest {}, KEY))
            .await
            .is_err(),
    };
    assert!(
        refused,
        "a model service accepted a client without a certificate"
    );

    gw.stop().await.unwrap();
    b.und.stop().await.unwrap();
    b.gen.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_a_foreign_client_certificate_is_refused() {
    let b = mtls_backends().await;
    let dir = b.dir.path();
    let rogue = Ca::new("rogue CA");
    let (cert, key) = rogue.leaf(dir, "rogue-gateway");
    let services_ca = b.services_ca.write(dir, "services-ca.crt");
    let backend_tls =
        janus_service::tls::client_config(Some(&services_ca), Some(&cert), Some(&key), None)
            .unwrap();
    let gw = gateway(
        vec![format!("https://127.0.0.1:{}", b.und.local_addr().port())],
        vec![],
        ServerOptions {
            grace_period: Duration::from_secs(2),
            ..Default::default()
        },
        Some(backend_tls),
    )
    .await;
    let started = Instant::now();
    let s = within(
        Duration::from_secs(20),
        "a request to a backend that refuses the gateway",
        und_client(&gw.url())
            .await
            .info(with_key(pb::InfoRequest {}, KEY)),
    )
    .await
    .expect_err("the backend must refuse the gateway's certificate");
    eprintln!("refused after {:?}: {}", started.elapsed(), s.message());
    assert_eq!(s.code(), Code::Unavailable, "{s:?}");
    let backend = format!("https://127.0.0.1:{}", b.und.local_addr().port());
    assert!(s.message().contains(&backend), "{}", s.message());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    gw.stop().await.unwrap();
    b.und.stop().await.unwrap();
    b.gen.stop().await.unwrap();
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `janus args…` (killed and failed after 120 s).
fn janus(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_janus"));
    cmd.args(args)
        .env_remove("JANUS_SERVER")
        .env_remove("JANUS_API_KEY")
        .env_remove("JANUS_CA_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(o) => o.unwrap(),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &id.to_string()])
                .status();
            panic!("janus {args:?} did not finish within 120 s");
        }
    };
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `janus serve` killed on drop.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn cli_with_api_key_and_ca_file() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("janus public CA");
    let (cert, key) = ca.leaf(dir.path(), "server");
    let ca_file = ca.write(dir.path(), "ca.crt");
    let keys_file = dir.path().join("keys");
    std::fs::write(&keys_file, format!("# clients\n{KEY}\n")).unwrap();
    let model = fixture().join("model");
    let mut child = Command::new(env!("CARGO_BIN_EXE_janus"))
        .args(["serve", "--model", model.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--grace-period", "1"])
        .args(["--http-listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--api-keys-file")
        .arg(&keys_file)
        .env("JANUS_API_KEYS", OTHER_KEY)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let serve = Serve(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let (http_tx, http_rx) = std::sync::mpsc::channel();
    let log = Arc::new(std::sync::Mutex::new(String::new()));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(url) = line.strip_prefix("janus: serving on ") {
                let _ = tx.send(url.trim().to_string());
            }
            if let Some(rest) = line.strip_prefix("janus: http api on ") {
                let _ = http_tx.send(rest.split(' ').next().unwrap_or_default().to_string());
            }
            log2.lock().unwrap().push_str(&line);
            log2.lock().unwrap().push('\n');
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("janus serve reports its address");
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let port = url.rsplit(':').next().unwrap().to_string();
    let server = format!("https://localhost:{port}");
    let ca_s = ca_file.to_str().unwrap();

    // The key from the flag, the CA from the flag.
    let out = janus(
        &[
            "info",
            "--json",
            "--server",
            &server,
            "--ca-file",
            ca_s,
            "--api-key",
            KEY,
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["understanding"]["model_id"], model.to_str().unwrap());

    // Both from the environment (the key from JANUS_API_KEYS on the server); the plain
    // host:port becomes https because of the CA file.
    let out = janus(
        &[
            "understand",
            "--server",
            &format!("localhost:{port}"),
            "--max-new-tokens",
            "3",
            "Hello?",
        ],
        &[("JANUS_API_KEY", OTHER_KEY), ("JANUS_CA_FILE", ca_s)],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("finish:"), "{}", out.stderr);

    // No key: exit code 8, a message saying what is missing.
    let out = janus(&["info", "--server", &server, "--ca-file", ca_s], &[]);
    assert_eq!(out.code, Some(8), "{}", out.stderr);
    assert!(out.stderr.contains("missing API key"), "{}", out.stderr);
    // A wrong key: 8, and the key is not repeated.
    let out = janus(
        &[
            "info",
            "--server",
            &server,
            "--ca-file",
            ca_s,
            "--api-key",
            "nope-nope-nope",
        ],
        &[],
    );
    assert_eq!(out.code, Some(8), "{}", out.stderr);
    assert!(out.stderr.contains("unknown API key"), "{}", out.stderr);
    assert!(!out.stderr.contains("nope-nope-nope"), "{}", out.stderr);

    // Health needs no key.
    let out = janus(&["health", "--server", &server, "--ca-file", ca_s], &[]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);

    // A CA that did not sign the server's certificate: unreachable (4), cleanly.
    let other = Ca::new("other CA").write(dir.path(), "other.crt");
    let out = janus(
        &[
            "health",
            "--server",
            &server,
            "--ca-file",
            other.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.code, Some(4), "{}", out.stderr);

    // Plaintext to the TLS port: a clean failure, not a hang.
    let out = janus(
        &["health", "--server", &format!("http://127.0.0.1:{port}")],
        &[],
    );
    assert_ne!(out.code, Some(0), "{}", out.stderr);

    // The OpenAI HTTP port: the same certificate and keys (HTTPS, 401 without a key, an
    // untrusting client and plaintext refused).
    let http_url = http_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("janus serve reports its HTTP address");
    assert!(http_url.starts_with("https://127.0.0.1:"), "{http_url}");
    let http_port = http_url.rsplit(':').next().unwrap().to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(&ca_file).unwrap()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .unwrap();
        let models = format!("https://localhost:{http_port}/v1/models");
        let r = client.get(&models).bearer_auth(KEY).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let body: serde_json::Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(body["object"], "list", "{body}");
        let r = client.get(&models).send().await.unwrap();
        assert_eq!(r.status(), 401);
        let r = client
            .get(&models)
            .bearer_auth("nope-nope-nope")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        // A client that does not trust the CA fails the handshake.
        let untrusting = reqwest::Client::new().get(&models).send().await;
        assert!(untrusting.is_err(), "{untrusting:?}");
        // Plaintext to the TLS port gets no answer.
        let plain = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{http_port}/v1/models"))
            .bearer_auth(KEY)
            .send()
            .await;
        assert!(plain.is_err(), "{plain:?}");
    });

    // Keys never reach the logs.
    drop(serve);
    std::thread::sleep(Duration::from_millis(200));
    let log = log.lock().unwrap().clone();
    assert!(
        !log.contains(KEY) && !log.contains(OTHER_KEY) && !log.contains("nope-nope"),
        "{log}"
    );
    assert!(log.contains("API keys required"), "{log}");
}
