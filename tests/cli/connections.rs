//! Connections held the way careless clients and attackers hold them, against real `janus
//! serve` processes on the tiny fixture over real loopback sockets: the accepted sockets'
//! `TCP_NODELAY`, HTTP/2 streams beyond the advertised limit, an oversized header list, silent
//! and stalled connections, descriptor exhaustion, and the memory of a burst of connections.
//! HTTP/2 is spoken frame by frame here (a client library would obey the server's settings).

use crate::common::fixture;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const JANUS: &str = env!("CARGO_BIN_EXE_janus");

/// A `janus serve` process (killed on drop), its addresses and its stderr lines.
struct Server {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    health: Option<SocketAddr>,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_of(url: &str) -> SocketAddr {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

impl Server {
    /// `janus serve` with `extra` flags and, when given, `RLIMIT_NOFILE` set to `(soft, hard)`
    /// before it starts.
    fn start(extra: &[&str], nofile: Option<(u64, u64)>) -> Self {
        let model = fixture().join("model");
        let mut cmd = Command::new(JANUS);
        cmd.args(["serve", "--model", model.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
            .args(["--grace-period", "1"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("JANUS_API_KEYS")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: only async-signal-safe setrlimit between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: soft as libc::rlim_t,
                        rlim_max: hard as libc::rlim_t,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let lines = log.clone();
        std::thread::spawn(move || {
            let (mut http, mut health) = (None, None);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.strip_prefix("janus: http api on ") {
                    http = rest.split_whitespace().next().map(addr_of);
                }
                if let Some(rest) = line.strip_prefix("janus: health on ") {
                    health = Some(addr_of(rest.trim()));
                }
                if let Some(rest) = line.strip_prefix("janus: serving on ") {
                    let _ = tx.send((addr_of(rest.trim()), http.take(), health.take()));
                }
                lines.lock().unwrap().push(line);
            }
        });
        let Ok((grpc, http, health)) = rx.recv_timeout(Duration::from_secs(120)) else {
            let _ = child.kill();
            panic!("janus serve did not start: {:?}", log.lock().unwrap());
        };
        Self {
            child,
            grpc,
            http: http.expect("an HTTP port"),
            health,
            log,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn rss(&self) -> u64 {
        proc_field(self.pid(), "status", "VmRSS:") * 1024
    }

    /// User + system CPU time of the process.
    fn cpu(&self) -> Duration {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let rest = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        Duration::from_millis(ticks * 10)
    }

    fn log_lines(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    fn http_get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect(self.http).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }
}

fn proc_field(pid: i32, file: &str, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/{file}"))
}

const MB: u64 = 1 << 20;

// ---- HTTP/2, frame by frame -------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;
const ACK: u8 = 1;
const REFUSED_STREAM: u32 = 7;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len();
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1), first byte ORed with `mask`.
fn hpack_int(out: &mut Vec<u8>, mask: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(mask | v as u8);
        return;
    }
    out.push(mask | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    hpack_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// The header block of a gRPC request to `path`, plus `extra` headers (literals, not indexed).
fn grpc_headers(path: &str, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    hpack_int(&mut b, 0, 4, 4); // :path, literal without indexing
    hpack_str(&mut b, path.as_bytes());
    hpack_int(&mut b, 0, 4, 1); // :authority
    hpack_str(&mut b, b"127.0.0.1");
    hpack_int(&mut b, 0, 4, 31); // content-type
    hpack_str(&mut b, b"application/grpc");
    for (name, value) in [("te", &b"trailers"[..])].iter().chain(extra) {
        b.push(0);
        hpack_str(&mut b, name.as_bytes());
        hpack_str(&mut b, value);
    }
    b
}

/// A header block as HEADERS + CONTINUATION frames of at most 16 KiB each.
fn header_frames(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if last { END_HEADERS } else { 0 };
        if i == 0 && end_stream {
            flags |= END_STREAM;
        }
        out.extend(frame(kind, flags, stream, c));
    }
    out
}

/// A gRPC message frame's payload (uncompressed).
fn grpc_message(body: &[u8]) -> Vec<u8> {
    let mut m = vec![0];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

struct H2 {
    tcp: TcpStream,
    buf: Vec<u8>,
    /// The server's SETTINGS (id → value).
    settings: Vec<(u16, u32)>,
}

impl H2 {
    /// Connects, sends the preface and empty SETTINGS, reads the server's SETTINGS and ACKs.
    fn connect(addr: SocketAddr) -> Self {
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut h2 = Self {
            tcp,
            buf: Vec::new(),
            settings: Vec::new(),
        };
        h2.send(PREFACE);
        h2.send(&frame(SETTINGS, 0, 0, &[]));
        loop {
            let f = h2.read().expect("the server's SETTINGS");
            if f.kind == SETTINGS && f.flags & ACK == 0 {
                h2.settings = f
                    .payload
                    .chunks(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
                break;
            }
        }
        h2.send(&frame(SETTINGS, ACK, 0, &[]));
        h2
    }

    fn setting(&self, id: u16) -> Option<u32> {
        self.settings.iter().find(|s| s.0 == id).map(|s| s.1)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).unwrap();
    }

    /// The next frame; `None` when the connection is closed.
    fn read(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 9 {
                let n = (self.buf[0] as usize) << 16
                    | (self.buf[1] as usize) << 8
                    | self.buf[2] as usize;
                if self.buf.len() >= 9 + n {
                    let f = Frame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + n].to_vec(),
                    };
                    self.buf.drain(..9 + n);
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.tcp.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

// ---- the accepted sockets of another process --------------------------------------------

/// Inodes of the TCP sockets of process `pid` that it accepted: established, with a local port
/// it listens on. Returns (local port, inode) pairs.
fn accepted_sockets(pid: i32) -> Vec<(u16, u64)> {
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap();
    let rows: Vec<(u16, u8, u64)> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            Some((port, state, f.get(9)?.parse().ok()?))
        })
        .collect();
    let listening: Vec<u16> = rows.iter().filter(|r| r.1 == 0x0A).map(|r| r.0).collect();
    let own: std::collections::HashSet<u64> = socket_fds(pid).into_iter().map(|s| s.1).collect();
    rows.iter()
        .filter(|r| r.1 == 0x01 && listening.contains(&r.0) && own.contains(&r.2))
        .map(|r| (r.0, r.2))
        .collect()
}

/// (fd, inode) of the sockets process `pid` holds.
fn socket_fds(pid: i32) -> Vec<(i32, u64)> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            let inode = target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((e.file_name().to_str()?.parse().ok()?, inode))
        })
        .collect()
}

/// `TCP_NODELAY` of the socket `inode` of process `pid`, read through a duplicate of its
/// descriptor (`pidfd_getfd`: the process is our child).
fn nodelay_of(pid: i32, inode: u64) -> bool {
    let fd = socket_fds(pid)
        .into_iter()
        .find(|s| s.1 == inode)
        .expect("the socket's descriptor")
        .0;
    // SAFETY: raw syscalls on descriptors we own (the pidfd and the duplicate).
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        assert!(
            pidfd >= 0,
            "pidfd_open: {}",
            std::io::Error::last_os_error()
        );
        let _pidfd = OwnedFd::from_raw_fd(pidfd);
        let dup = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        assert!(dup >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
        let dup = OwnedFd::from_raw_fd(dup);
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let r = libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&dup),
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &mut v as *mut _ as *mut libc::c_void,
            &mut len,
        );
        assert_eq!(r, 0, "getsockopt: {}", std::io::Error::last_os_error());
        v != 0
    }
}

// ---- the tests --------------------------------------------------------------------------

/// Without `TCP_NODELAY` every streamed response waits ≈ 40 ms for the peer's delayed ACK.
/// Every port of `janus serve` — the public gRPC port, the HTTP port, the health port and the
/// two internal service ports (which the in-process gateway dials) — must set it on the
/// sockets it accepts.
#[test]
fn every_accepted_socket_has_nodelay() {
    let srv = Server::start(&["--health-listen", "127.0.0.1:0"], None);
    let health = srv.health.expect("a health port");
    // A request on each public port, connections kept open.
    let mut grpc = H2::connect(srv.grpc);
    let mut probe = H2::connect(health);
    grpc.send(&frame(PING, 0, 0, &[1; 8]));
    probe.send(&frame(PING, 0, 0, &[2; 8]));
    let mut http = TcpStream::connect(srv.http).unwrap();
    write!(
        http,
        "GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    .unwrap();
    http.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut first = [0u8; 12];
    http.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    for c in [&mut grpc, &mut probe] {
        while let Some(f) = c.read() {
            if f.kind == PING && f.flags & ACK != 0 {
                break;
            }
        }
    }
    let sockets = accepted_sockets(srv.pid());
    let ports: std::collections::BTreeSet<u16> = sockets.iter().map(|s| s.0).collect();
    for port in [srv.grpc.port(), srv.http.port(), health.port()] {
        assert!(
            ports.contains(&port),
            "no accepted socket on {port}: {sockets:?}"
        );
    }
    // The two internal service ports, dialled by the in-process gateway.
    assert!(ports.len() >= 5, "accepted sockets on {ports:?}");
    for (port, inode) in &sockets {
        assert!(
            nodelay_of(srv.pid(), *inode),
            "an accepted socket on port {port} lacks TCP_NODELAY"
        );
    }
}

/// The gRPC port advertises its limits; streams beyond `--max-concurrent-streams` are refused
/// by the protocol, and a flood of them leaves the server's memory where it was.
#[test]
fn streams_beyond_the_advertised_limit_are_refused_and_cost_no_memory() {
    let srv = Server::start(&["--max-concurrent-streams", "16"], None);
    let mut c = H2::connect(srv.grpc);
    assert_eq!(c.setting(3), Some(16), "SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(
        c.setting(6),
        Some(16 * 1024),
        "SETTINGS_MAX_HEADER_LIST_SIZE"
    );
    let block = grpc_headers("/janus.v1.Understanding/Understand", &[]);
    // 16 streams within the limit, 40 beyond it: headers only, never finished.
    let mut out = Vec::new();
    for i in 0..56u32 {
        out.extend(header_frames(2 * i + 1, &block, false));
    }
    c.send(&out);
    let mut refused = Vec::new();
    while refused.len() < 40 {
        let f = c.read().expect("the connection stays open");
        assert_ne!(f.kind, GOAWAY, "GOAWAY instead of refusing streams: {f:?}");
        if f.kind == RST_STREAM {
            let code = u32::from_be_bytes(f.payload[..4].try_into().unwrap());
            assert_eq!(
                code, REFUSED_STREAM,
                "stream {} reset with {code}",
                f.stream
            );
            refused.push(f.stream);
        }
    }
    assert_eq!(refused, (16..56u32).map(|i| 2 * i + 1).collect::<Vec<_>>());

    // A flood: 20 000 header-only streams on a second connection.
    let before = srv.rss();
    let mut flood = H2::connect(srv.grpc);
    let mut out = Vec::new();
    for i in 0..20_000u32 {
        out.extend(header_frames(2 * i + 1, &block, false));
    }
    // The server may close the connection partway (h2's limit on streams it had to reset).
    let _ = flood.tcp.write_all(&out);
    let mut resets = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while resets < 20_000 - 16 && Instant::now() < deadline {
        match flood.read() {
            Some(f) if f.kind == RST_STREAM => resets += 1,
            Some(f) if f.kind == GOAWAY => break,
            Some(_) => {}
            None => break,
        }
    }
    let after = srv.rss();
    eprintln!(
        "rss before the flood {} MiB, after {} MiB ({resets} streams refused)",
        before / MB,
        after / MB
    );
    assert!(
        after < before + 64 * MB,
        "20 000 streams grew the server from {} to {} MiB",
        before / MB,
        after / MB
    );
    // The first connection and new ones are still served.
    assert!(srv
        .http_get("/openapi.json")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
}

/// A client declaring 16 MiB messages and sending five bytes of each cannot make the server
/// reserve 16 MiB per stream: declared lengths count against the connection's
/// `--max-buffered-request-bytes` (4 × 16 MiB by default), and the streams beyond it fail at
/// once (RESOURCE_EXHAUSTED) instead of waiting for their bodies.
#[test]
fn declared_message_lengths_count_against_the_connection_budget() {
    let srv = Server::start(&["--request-read-timeout", "600"], None);
    let vm_before = proc_field(srv.pid(), "status", "VmSize:");
    let mut c = H2::connect(srv.grpc);
    let block = grpc_headers("/janus.v1.Understanding/Understand", &[]);
    let mut out = Vec::new();
    for i in 0..128u32 {
        out.extend(header_frames(2 * i + 1, &block, false));
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(16_000_000u32).to_be_bytes());
        out.extend(frame(DATA, 0, 2 * i + 1, &prefix));
    }
    c.send(&out);
    // 4 × 16 000 005 bytes fit in 64 MiB: those four wait for their bodies; the other 124 end.
    let mut ended = std::collections::BTreeSet::new();
    while ended.len() < 124 {
        let f = c.read().expect("the connection stays open");
        assert_ne!(f.kind, GOAWAY);
        if f.kind == HEADERS && f.flags & END_STREAM != 0 {
            ended.insert(f.stream);
        }
    }
    let vm_after = proc_field(srv.pid(), "status", "VmSize:");
    eprintln!(
        "128 streams declaring 16 MB: {} ended at once, VmSize {} -> {} MiB",
        ended.len(),
        vm_before / 1024,
        vm_after / 1024
    );
    assert_eq!(ended.len(), 124);
    drop(c);

    // The port's total: 40 MB over all connections, 20 MB each; two connections hold 32 MB,
    // a third one's 16 MB message is refused while theirs are pending.
    let srv = Server::start(
        &[
            "--request-read-timeout",
            "600",
            "--max-buffered-request-bytes",
            "20000000",
            "--max-buffered-request-bytes-total",
            "40000000",
        ],
        None,
    );
    let declare = |c: &mut H2| {
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&(16_000_000u32).to_be_bytes());
        let mut out = header_frames(1, &block, false);
        out.extend(frame(DATA, 0, 1, &prefix));
        c.send(&out);
        // A PING answered means the server has read the DATA frame.
        c.send(&frame(PING, 0, 0, &[9; 8]));
        loop {
            let f = c.read().expect("the connection stays open");
            if f.kind == HEADERS && f.stream == 1 && f.flags & END_STREAM != 0 {
                return true;
            }
            if f.kind == PING && f.flags & ACK != 0 {
                return false;
            }
        }
    };
    let mut a = H2::connect(srv.grpc);
    let mut b = H2::connect(srv.grpc);
    let mut third = H2::connect(srv.grpc);
    assert!(!declare(&mut a), "the first 16 MB message was refused");
    assert!(!declare(&mut b), "the second 16 MB message was refused");
    // Refused at once, or at the latest right after its PING is answered.
    let ended = declare(&mut third)
        || loop {
            let f = third.read().expect("an answer for the third connection");
            if f.kind == HEADERS && f.stream == 1 && f.flags & END_STREAM != 0 {
                break true;
            }
        };
    assert!(ended);
}

/// A header list over `--max-header-list-bytes` fails its own stream (431), not the
/// connection: the next call on the same connection is answered.
#[test]
fn an_oversized_header_list_fails_only_its_own_call() {
    let srv = Server::start(&[], None);
    let mut c = H2::connect(srv.grpc);
    let big = vec![b'x'; 20 * 1024];
    let block = grpc_headers("/grpc.health.v1.Health/Check", &[("x-big", &big)]);
    c.send(&header_frames(1, &block, false));
    let mut answered = false;
    while !answered {
        let f = c.read().expect("the connection stays open");
        assert_ne!(f.kind, GOAWAY, "the whole connection was closed: {f:?}");
        if f.stream == 1 && (f.kind == RST_STREAM || f.kind == HEADERS) {
            if f.kind == HEADERS {
                // `:status` (static index 8) with "431", plain or Huffman-coded (RFC 7541
                // Appendix B: '4' 011010, '3' 011001, '1' 00001, padded with ones).
                let plain = f.payload.windows(4).any(|w| w == b"\x03431");
                let huffman = f.payload.windows(4).any(|w| w == [0x83, 0x69, 0x90, 0xff]);
                assert!(plain || huffman, "stream 1 answered without 431: {f:?}");
            }
            answered = true;
        }
    }
    // A normal health check on the same connection: HEADERS with :status 200 (0x88), then
    // trailers with grpc-status 0.
    let block = grpc_headers("/grpc.health.v1.Health/Check", &[]);
    c.send(&header_frames(3, &block, false));
    c.send(&frame(DATA, END_STREAM, 3, &grpc_message(&[])));
    loop {
        let f = c.read().expect("an answer to the second call");
        assert_ne!(f.kind, GOAWAY);
        if f.stream == 3 && f.kind == HEADERS {
            assert_eq!(f.payload.first(), Some(&0x88), "{f:?}");
            break;
        }
    }
}

/// Reads until the peer closes; panics if it sends more than `allow` bytes or stays open for a
/// minute (a bound on a hang, not a speed requirement).
fn wait_closed(mut s: TcpStream, what: &str) -> Duration {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return started.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("{what}: still open after {:?} ({e})", started.elapsed()),
        }
    }
}

/// Silent, half-sent and idle connections are closed by the server, on every kind of port.
#[test]
fn silent_stalled_and_idle_connections_are_closed() {
    let srv = Server::start(
        &[
            "--preface-timeout",
            "1",
            "--request-read-timeout",
            "1",
            "--idle-timeout",
            "2",
        ],
        None,
    );
    // Nothing sent at all, on the gRPC and the HTTP port.
    let silent_grpc = TcpStream::connect(srv.grpc).unwrap();
    let silent_http = TcpStream::connect(srv.http).unwrap();
    // Half an HTTP/2 preface.
    let mut half_preface = TcpStream::connect(srv.grpc).unwrap();
    half_preface.write_all(&PREFACE[..10]).unwrap();
    // Half an HTTP/1 request head.
    let mut half_head = TcpStream::connect(srv.http).unwrap();
    half_head
        .write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    // An HTTP/1 keep-alive connection after a complete request.
    let mut keep = TcpStream::connect(srv.http).unwrap();
    keep.write_all(b"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    // An HTTP/2 connection with no stream.
    let mut idle = H2::connect(srv.grpc);
    // An HTTP/2 call whose body never comes.
    let mut stalled = H2::connect(srv.grpc);
    let block = grpc_headers("/janus.v1.Understanding/Understand", &[]);
    stalled.send(&header_frames(1, &block, false));

    for (s, what) in [
        (silent_grpc, "a gRPC connection that sent nothing"),
        (silent_http, "an HTTP connection that sent nothing"),
        (half_preface, "a gRPC connection with half a preface"),
        (half_head, "an HTTP request with half its headers"),
    ] {
        let t = wait_closed(s, what);
        eprintln!("{what}: closed after {t:?}");
    }
    let mut head = [0u8; 12];
    keep.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    keep.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let t = wait_closed(keep, "an idle HTTP/1 keep-alive connection");
    eprintln!("idle keep-alive: closed after {t:?}");

    // The idle HTTP/2 connection gets a GOAWAY, then the end of the connection.
    let mut goaway = false;
    while let Some(f) = idle.read() {
        goaway |= f.kind == GOAWAY;
    }
    assert!(goaway, "an idle HTTP/2 connection closed without GOAWAY");

    // The stalled call is answered (trailers with a grpc-status) and the stream ends.
    loop {
        let f = stalled.read().expect("an answer to the stalled call");
        // Trailers (or a trailers-only answer) end the stream.
        if f.stream == 1 && f.kind == HEADERS && f.flags & END_STREAM != 0 {
            break;
        }
        if f.stream == 1 && f.kind == RST_STREAM {
            break;
        }
    }
    // Still serving.
    assert!(srv
        .http_get("/openapi.json")
        .unwrap()
        .starts_with("HTTP/1.1 200"));
}

/// The soft descriptor limit is raised to the hard one at start; when descriptors run out the
/// accept loop backs off instead of spinning, and the server recovers once the idle
/// connections are closed by the preface timeout.
#[test]
fn descriptor_exhaustion_is_survived() {
    let srv = Server::start(&["--preface-timeout", "3"], Some((64, 192)));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", srv.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(nums, ["192", "192"], "{line}");

    // More idle connections than descriptors.
    let conns: Vec<TcpStream> = (0..240)
        .filter_map(|_| TcpStream::connect(srv.http).ok())
        .collect();
    assert!(conns.len() > 192, "only {} connections", conns.len());
    let cpu0 = srv.cpu();
    std::thread::sleep(Duration::from_secs(2));
    let used = srv.cpu() - cpu0;
    eprintln!("CPU while out of descriptors: {used:?} in 2 s");
    assert!(
        used < Duration::from_millis(1000),
        "the accept loop spins: {used:?} of CPU in 2 s"
    );
    assert!(
        srv.log_lines("accept failed") < 20,
        "{} accept-failure log lines",
        srv.log_lines("accept failed")
    );
    assert!(srv.log_lines("out of file descriptors") >= 1);
    drop(conns);
    // Recovers: a new request is answered (the idle ones are closed within the preface timeout).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = srv.http_get("/openapi.json") {
            if r.starts_with("HTTP/1.1 200") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no answer after descriptor exhaustion"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Memory taken by a burst of connections and streams goes back to the OS once the server is
/// quiet (the trimmer also reaches the runtime's worker threads).
#[test]
fn a_burst_of_connections_gives_its_memory_back() {
    let srv = Server::start(&[], None);
    // Settle, then the baseline.
    std::thread::sleep(Duration::from_secs(3));
    let before = srv.rss();
    let block = grpc_headers("/janus.v1.Understanding/Understand", &[]);
    let mut conns = Vec::new();
    for _ in 0..48 {
        let mut c = H2::connect(srv.grpc);
        let mut out = Vec::new();
        for i in 0..128u32 {
            out.extend(header_frames(2 * i + 1, &block, false));
            // Half of an 8 KiB message, the rest never comes.
            let mut data = vec![0u8; 4096];
            data[1..5].copy_from_slice(&8192u32.to_be_bytes());
            out.extend(frame(DATA, 0, 2 * i + 1, &data));
        }
        c.send(&out);
        conns.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    let peak = srv.rss();
    drop(conns);
    eprintln!(
        "rss before {} MiB, with the burst {} MiB",
        before / MB,
        peak / MB
    );
    assert!(
        peak > before + 32 * MB,
        "the burst took too little memory to tell"
    );
    let target = before + (peak - before) / 3;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let now = srv.rss();
        if now <= target {
            eprintln!("rss back to {} MiB", now / MB);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "memory not returned: {} MiB (before {} MiB, peak {} MiB)",
            now / MB,
            before / MB,
            peak / MB
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
