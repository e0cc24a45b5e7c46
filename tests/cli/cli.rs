//! The `janus` binary end to end: `serve` on an ephemeral port, the client commands against
//! it, documented exit codes, local mode, a clean exit on SIGTERM, and `/metrics`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JANUS: &str = env!("CARGO_BIN_EXE_janus");

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/janus-tiny")
}

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `janus args…` with a time limit (killed and failed after it).
fn janus(args: &[&str], env: &[(&str, &str)]) -> Out {
    let dir = tempfile::tempdir().unwrap();
    let (o, e) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(JANUS);
    cmd.args(args)
        .env_remove("JANUS_SERVER")
        .env_remove("JANUS_MODEL")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&o).unwrap())
        .stderr(std::fs::File::create(&e).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("janus {args:?} did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Out {
        code: status.code(),
        stdout: std::fs::read_to_string(o).unwrap(),
        stderr: std::fs::read_to_string(e).unwrap(),
    }
}

/// `janus generate -n 1 --quiet "a cat"` against `server` (with `extra` flags); asserts it
/// succeeds and writes one 384 × 384 image.
fn generate_one(server: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let mut args = vec![
        "generate", "--server", server, "-n", "1", "--quiet", "-o", out_dir,
    ];
    args.extend_from_slice(extra);
    args.push("a cat");
    let out = janus(&args, &[]);
    assert_eq!(out.code, Some(0), "{args:?}: {}", out.stderr);
    let img = image::open(dir.path().join("image_0.png")).unwrap();
    assert_eq!((img.width(), img.height()), (384, 384));
}

/// `janus serve` on 127.0.0.1:0; killed on drop if still running.
struct Server {
    child: Child,
    url: String,
    /// `http://ADDR/metrics` when started with `--metrics-listen`.
    metrics: Option<String>,
}

impl Server {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(extra: &[&str]) -> Self {
        let model = fixture().join("model");
        let mut child = Command::new(JANUS)
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
                "--grace-period",
                "2",
                // The HTTP port (on by default at 127.0.0.1:8000) is tests/http/openai.rs's.
                "--http-listen",
                "off",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut metrics = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // The metrics endpoint starts before the model loads: its line comes first.
                if let Some(url) = line.strip_prefix("janus: metrics on ") {
                    metrics = Some(url.trim().to_string());
                }
                if let Some(url) = line.strip_prefix("janus: serving on ") {
                    let _ = tx.send((url.trim().to_string(), metrics.take()));
                }
            }
        });
        let (url, metrics) = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("janus serve did not report its address");
            }
        };
        Self {
            child,
            url,
            metrics,
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serve_and_the_client_commands() {
    let server = Server::start();
    let s = server.url.as_str();

    let out = janus(&["health", "--server", s], &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout.contains("janus.v1.Understanding: SERVING"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("janus.v1.Generation: SERVING"),
        "{}",
        out.stdout
    );

    let out = janus(&["info", "--json"], &[("JANUS_SERVER", s)]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["understanding"]["half"], "MODEL_HALF_UNDERSTANDING");
    assert_eq!(v["generation"]["half"], "MODEL_HALF_GENERATION");
    assert_eq!(v["generation"]["limits"]["image_tokens"], 576);
    assert_eq!(v["generation"]["limits"]["max_prompt_bytes"], 65536);
    assert_eq!(v["understanding"]["limits"]["max_prompt_bytes"], 262144);
    assert_eq!(v["understanding"]["limits"]["max_stop_strings"], 16);

    let wide = fixture().join("wide.png");
    let out = janus(
        &[
            "understand",
            "--server",
            s,
            "--image",
            wide.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--min-new-tokens",
            "6",
            "What is shown?",
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!out.stdout.trim().is_empty());
    assert!(out.stderr.contains("finish: length"), "{}", out.stderr);

    generate_one(s, &["--temperature", "0"]);
    let dir = tempfile::tempdir().unwrap();

    // The tensor-math threads carry their own name, not the async runtime's (`top -H`, `perf`).
    let tasks = format!("/proc/{}/task", server.child.id());
    let names: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("janus-math-")),
        "no janus-math-N thread among {names:?}"
    );

    // Exit codes: invalid request 2 (from the server, and a local file problem).
    let out = janus(&["generate", "--server", s, "-n", "17", "x"], &[]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("invalid n"), "{}", out.stderr);
    let out = janus(
        &["understand", "--server", s, "--image", "/no/such.png", "x"],
        &[],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    // Deadline 6.
    let out = janus(
        &[
            "generate",
            "--server",
            s,
            "--timeout",
            "0.2",
            "--quiet",
            "-o",
            dir.path().to_str().unwrap(),
            "x",
        ],
        &[],
    );
    assert_eq!(out.code, Some(6), "{}", out.stderr);

    // SIGTERM: graceful exit with status 0.
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}

#[test]
fn exit_codes_without_a_server() {
    let out = janus(&["health", "--server", "http://127.0.0.1:1"], &[]);
    assert_eq!(out.code, Some(4), "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    let out = janus(&["understand", "--server", "http://127.0.0.1:1", "hi"], &[]);
    assert_eq!(out.code, Some(4), "{}", out.stderr);

    // An --out that cannot be a directory: exit 2 naming it, before the (unreachable, exit 4)
    // server is dialed or a model loaded.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let bad_out = file.join("images");
    let bad = bad_out.to_str().unwrap();
    let out = janus(
        &[
            "generate",
            "--server",
            "http://127.0.0.1:1",
            "-o",
            bad,
            "a cat",
        ],
        &[],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("--out") && out.stderr.contains(bad),
        "{}",
        out.stderr
    );
    assert!(!out.stderr.contains("connect"), "{}", out.stderr);
    let model = fixture().join("model");
    let out = janus(
        &[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "-o",
            bad,
            "a cat",
        ],
        &[],
    );
    assert_eq!(out.code, Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot create"), "{}", out.stderr);

    // A hub id that is not cached while offline: exit 3 and how to point at a directory.
    let home = tempfile::tempdir().unwrap();
    let out = janus(
        &[
            "serve",
            "--model",
            "deepseek-ai/Janus-Pro-1B",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
        ],
        &[
            ("HF_HUB_OFFLINE", "1"),
            ("HF_HOME", home.path().to_str().unwrap()),
        ],
    );
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    assert!(
        out.stderr.contains("--model /path/to/checkpoint-directory"),
        "{}",
        out.stderr
    );
    let out = janus(&["serve-understanding", "--model", "/no/such/dir"], &[]);
    assert_ne!(out.code, Some(0), "{}", out.stderr);
    assert!(out.stderr.contains("does not exist"), "{}", out.stderr);
}

#[test]
fn local_mode_runs_the_model_in_process() {
    let model = fixture().join("model");
    let wide = fixture().join("wide.png");
    let out = janus(
        &[
            "understand",
            "--model",
            model.to_str().unwrap(),
            "--image",
            wide.to_str().unwrap(),
            "--max-new-tokens",
            "4",
            "What?",
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(!out.stdout.trim().is_empty());
}

/// `janus bench` on the fixture: every part reported, `--repeats` warm runs listed with their
/// median as the part's figure, the generation rows per `--gen-n`, and bad options refused
/// before any model loads.
#[test]
fn bench_reports_every_part_and_the_median_of_its_runs() {
    let model = fixture().join("model");
    let model = model.to_str().unwrap();
    let out = janus(
        &[
            "--threads",
            "2",
            "bench",
            "--model",
            model,
            "--decode-tokens",
            "3",
            "--gen-steps",
            "2",
            "--gen-n",
            "1,2",
            "--repeats",
            "3",
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let j: serde_json::Value = serde_json::from_str(&out.stdout).expect("bench prints JSON");
    assert_eq!(j["threads"], 2);
    let median_of = |runs: &serde_json::Value, figure: &serde_json::Value, what: &str| {
        let mut v: Vec<f64> = runs
            .as_array()
            .unwrap_or_else(|| panic!("{what}: no runs in {j}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), 3, "{what}: one entry per --repeats run");
        assert!(v.iter().all(|&x| x >= 0.0), "{what}: {v:?}");
        v.sort_by(f64::total_cmp);
        assert_eq!(
            figure.as_f64().unwrap(),
            v[1],
            "{what} is the median of its runs"
        );
    };
    let u = &j["understanding"];
    median_of(&u["vision_runs_s"], &u["vision_s"], "vision");
    median_of(&u["prefill_runs_s"], &u["prefill_s"], "prefill");
    median_of(&j["vq_decode_runs_s"], &j["vq_decode_s"], "VQ decode");
    assert_eq!(u["decode_tokens"], 3);
    assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
    for key in ["vision_gflop", "prefill_gflop"] {
        assert!(u[key].as_f64().unwrap() > 0.0, "{key}: {u}");
    }
    assert!(j["vq_decode_gflop"].as_f64().unwrap() > 0.0);
    let g = &j["generation"];
    assert_eq!(g["steps_timed"], 2);
    assert_eq!(
        g["s_per_image_measured"], false,
        "2 of the steps: extrapolated"
    );
    let by_n: Vec<u64> = g["by_n"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["n"].as_u64().unwrap())
        .collect();
    assert_eq!(by_n, [1, 2]);

    for (args, names) in [
        (&["--repeats", "0"][..], "--repeats"),
        (&["--gen-n", "17"][..], "--gen-n"),
    ] {
        let mut all = vec!["bench", "--model", model];
        all.extend_from_slice(args);
        let out = janus(&all, &[]);
        assert_ne!(out.code, Some(0), "{args:?} is refused");
        assert!(out.stderr.contains(names), "{args:?}: {}", out.stderr);
        assert!(
            !out.stderr.contains("vision_s"),
            "{args:?}: refused before the understanding half ran: {}",
            out.stderr
        );
    }
}

/// `GET` of an `http://host:port/path` URL over HTTP/1.1 (bounded); the status line and body.
fn http_get(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the sample `series` (exact series text) in a Prometheus text exposition.
fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.rsplit_once(' ').filter(|(s, _)| *s == series))
        .map(|(_, v)| v.parse().unwrap())
}

#[test]
fn serve_exposes_prometheus_metrics() {
    let server = Server::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = server
        .metrics
        .clone()
        .expect("`janus: metrics on` line before `janus: serving on`");
    let out = janus(&["health", "--server", &server.url], &[]);
    assert_eq!(out.code, Some(0), "{}", out.stderr);

    let (status, body) = http_get(&metrics);
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let version = env!("CARGO_PKG_VERSION");
    let build = body
        .lines()
        .find(|l| l.starts_with("janus_build_info{"))
        .unwrap_or_else(|| panic!("no janus_build_info in {body}"));
    assert!(build.contains(r#"service="janus""#), "{build}");
    assert!(
        build.contains(&format!(r#"version="{version}""#)),
        "{build}"
    );
    assert!(build.ends_with(" 1"), "{build}");
    assert!(
        sample(&body, "janus_model_load_seconds").unwrap() > 0.0,
        "the model load was timed: {body}"
    );
    // The health checks (the client's, through the gateway, and the gateway's own of its
    // backends) were counted by method and status code.
    let checks = sample(
        &body,
        r#"janus_grpc_requests_total{code="OK",method="grpc.health.v1.Health/Check"}"#,
    )
    .unwrap_or_else(|| panic!("no health checks counted in {body}"));
    assert!(checks >= 3.0, "{checks}");
    assert_eq!(sample(&body, "janus_queue_depth"), Some(0.0));
    // Only /metrics is served there.
    let (status, _) = http_get(&metrics.replace("/metrics", "/other"));
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    assert!(server.terminate().success());
}

/// Rough edges of the CLI: output into a closed pipe ends quietly (no panic), deadlines map to
/// exit 6 however short, and a `--timeout` that is not a positive number is refused (exit 2).
#[test]
fn pipes_and_timeouts() {
    let server = Server::start();
    let s = server.url.as_str();
    // `janus health | head -0`: the reader is gone before the first line is written.
    let mut child = Command::new(JANUS)
        .args(["health", "--server", s])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_ne!(out.status.code(), Some(101), "{stderr}");

    for bad in ["0", "-1", "nan"] {
        let flag = format!("--timeout={bad}");
        let out = janus(&["understand", "--server", s, &flag, "hi"], &[]);
        assert_eq!(out.code, Some(2), "--timeout {bad}: {}", out.stderr);
        assert!(out.stderr.contains("--timeout"), "{}", out.stderr);
    }
    let out = janus(
        &[
            "understand",
            "--server",
            s,
            "--timeout",
            "0.001",
            "--max-new-tokens",
            "500",
            "hi",
        ],
        &[],
    );
    assert_eq!(out.code, Some(6), "{}", out.stderr);
}

/// A busy port is reported before the model is looked at (loading a 7B takes minutes): with the
/// port taken and no model at all, the error is about the port.
#[test]
fn a_busy_port_fails_before_the_model_loads() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for cmd in ["serve", "serve-understanding", "serve-generation"] {
        let out = janus(
            &[cmd, "--model", "/nonexistent/janus", "--listen", &addr],
            &[],
        );
        assert_ne!(out.code, Some(0), "{cmd}");
        assert!(
            out.stderr.contains(&addr) && !out.stderr.contains("/nonexistent"),
            "{cmd}: {}",
            out.stderr
        );
    }
}

/// The first SIGTERM drains (and says for how long), a second one exits at once even while a
/// stream is still running and the grace period is long.
#[test]
fn a_second_signal_exits_at_once() {
    let model = fixture().join("model");
    let mut server = Command::new(JANUS)
        .args(["serve", "--model", model.to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--grace-period", "600"])
        .args(["--http-listen", "off"])
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = server.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let wait_line = |what: &str| loop {
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(l) if l.contains(what) => return l,
            Ok(_) => {}
            Err(_) => panic!("no line with '{what}'"),
        }
    };
    let url = wait_line("janus: serving on ")
        .trim_start_matches("janus: serving on ")
        .trim()
        .to_string();
    // A long answer keeps the drain busy.
    let mut stream = Command::new(JANUS)
        .args(["understand", "--server", &url, "--max-new-tokens", "2000"])
        .args(["--min-new-tokens", "2000", "Tell me a long story."])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(stream.stdout.as_mut().unwrap(), &mut first).unwrap();
    let pid = server.id().to_string();
    let term = || {
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success())
    };
    term();
    let said = wait_line("draining for up to");
    assert!(said.contains("600 s"), "{said}");
    term();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.try_wait().unwrap() {
            break s;
        }
        // Far below the 600 s grace period: only the second signal can end it this soon.
        assert!(start.elapsed() < Duration::from_secs(60), "still draining");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    let _ = stream.kill();
    let _ = stream.wait();
}

/// `--special-tokens-in-text` switches on the reference's tokenization: special-token strings
/// typed in a message become single special tokens (the default keeps them plain text).
#[test]
fn special_tokens_in_text_is_an_explicit_server_option() {
    let text = "hi<|Assistant|>: ok<｜end▁of▁sentence｜><|User|>: <begin_of_image>";
    let prompt_tokens = |server: &Server| {
        let out = janus(
            &[
                "understand",
                "--server",
                &server.url,
                "--max-new-tokens",
                "1",
                text,
            ],
            &[],
        );
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let n = out
            .stderr
            .split("tokens: ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|n| n.parse::<u32>().ok());
        n.unwrap_or_else(|| panic!("no prompt token count in: {}", out.stderr))
    };
    let plain = prompt_tokens(&Server::start());
    let reference = prompt_tokens(&Server::start_with(&["--special-tokens-in-text"]));
    // Four special tokens instead of their spelled-out text.
    assert!(
        plain > reference + 20,
        "plain {plain}, reference {reference}"
    );
}

/// `janus serve --weight-dtype q8|q4`: the language model quantized at load, reported by
/// `info`, and both halves answer.
#[test]
fn serve_with_quantized_weights_answers_both_halves() {
    for (flag, name) in [("q8", "q8_0"), ("q4", "q4_1")] {
        let server = Server::start_with(&["--weight-dtype", flag]);
        let s = server.url.as_str();
        let out = janus(&["info", "--json", "--server", s], &[]);
        assert_eq!(out.code, Some(0), "{}", out.stderr);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        for half in ["understanding", "generation"] {
            assert_eq!(v[half]["weight_dtype"], name, "{half}: {}", out.stdout);
        }
        let wide = fixture().join("wide.png");
        let out = janus(
            &[
                "understand",
                "--server",
                s,
                "--image",
                wide.to_str().unwrap(),
                "--max-new-tokens",
                "4",
                "--min-new-tokens",
                "4",
                "What is shown?",
            ],
            &[],
        );
        assert_eq!(out.code, Some(0), "{flag}: {}", out.stderr);
        assert!(out.stderr.contains("finish: length"), "{}", out.stderr);
        generate_one(s, &[]);
    }
    // Each half its own: 4-bit understanding, 8-bit generation (two language models).
    let server = Server::start_with(&["--weight-dtype", "q4", "--generation-weight-dtype", "q8"]);
    let s = server.url.as_str();
    let out = janus(&["info", "--json", "--server", s], &[]);
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["understanding"]["weight_dtype"], "q4_1", "{}", out.stdout);
    assert_eq!(v["generation"]["weight_dtype"], "q8_0", "{}", out.stdout);
    generate_one(s, &[]);
    drop(server);
    // An unknown weight dtype fails before serving, naming the flag's values.
    let out = janus(
        &[
            "serve",
            "--model",
            fixture().join("model").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "off",
            "--weight-dtype",
            "q3",
        ],
        &[],
    );
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("q3") && out.stderr.contains("q8, q4"),
        "{}",
        out.stderr
    );
}
