//! The `janus` binary end to end: `serve` on an ephemeral port, the client commands against
//! it, documented exit codes, local mode, and a clean exit on SIGTERM.

use std::io::{BufRead, BufReader};
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

/// `janus serve` on 127.0.0.1:0; killed on drop if still running.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start() -> Self {
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
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("janus: serving on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(u) => u,
            Err(_) => {
                let _ = child.kill();
                panic!("janus serve did not report its address");
            }
        };
        Self { child, url }
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

    let dir = tempfile::tempdir().unwrap();
    let out = janus(
        &[
            "generate",
            "--server",
            s,
            "-n",
            "1",
            "--temperature",
            "0",
            "--quiet",
            "-o",
            dir.path().to_str().unwrap(),
            "a cat",
        ],
        &[],
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let img = image::open(dir.path().join("image_0.png")).unwrap();
    assert_eq!((img.width(), img.height()), (384, 384));

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

    // A hub id that is not cached while offline: exit 3 and how to point at a directory.
    let home = tempfile::tempdir().unwrap();
    let out = janus(
        &[
            "serve",
            "--model",
            "deepseek-ai/Janus-Pro-1B",
            "--listen",
            "127.0.0.1:0",
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
