//! A tiny HTTP/1.1 file server on 127.0.0.1 for download and pull tests, with injectable faults.
//!
//! Supports GET and `Range: bytes=N-`, closes every connection after one response, and records
//! each request's path and Range header. Faults apply to the next request of a path, one each.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and no body.
    Status(u16),
    /// Promise the full length but close the connection at this absolute offset.
    Truncate { at: usize },
    /// Invert the byte at this absolute offset.
    FlipByte { at: usize },
    /// Answer a range request with `200` and the whole file.
    IgnoreRange,
}

#[derive(Default)]
struct State {
    files: HashMap<String, Vec<u8>>,
    faults: HashMap<String, VecDeque<Fault>>,
    requests: Vec<(String, Option<String>)>,
}

pub struct TestServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    pub async fn start() -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let st = st.clone();
                tokio::spawn(async move {
                    let _ = handle(conn, st).await;
                });
            }
        });
        TestServer { addr, state, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn serve(&self, path: &str, data: Vec<u8>) {
        self.state
            .lock()
            .unwrap()
            .files
            .insert(path.to_owned(), data);
    }

    pub fn fault(&self, path: &str, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .entry(path.to_owned())
            .or_default()
            .push_back(fault);
    }

    /// The Range header of every request for `path`, in order.
    pub fn ranges(&self, path: &str) -> Vec<Option<String>> {
        self.state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }

    pub fn request_count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }
}

async fn handle(mut conn: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or("");
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("/")
        .to_owned();
    let range = lines.find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("range").then(|| v.trim().to_owned())
    });
    let (data, fault) = {
        let mut s = state.lock().unwrap();
        s.requests.push((path.clone(), range.clone()));
        let fault = s.faults.get_mut(&path).and_then(|q| q.pop_front());
        (s.files.get(&path).cloned(), fault)
    };
    let Some(mut data) = data else {
        return respond(&mut conn, "404 Not Found", &[], b"").await;
    };
    match fault {
        Some(Fault::Status(code)) => {
            let reason = match code {
                500 => "Internal Server Error",
                503 => "Service Unavailable",
                _ => "Error",
            };
            return respond(&mut conn, &format!("{code} {reason}"), &[], b"").await;
        }
        Some(Fault::FlipByte { at }) if at < data.len() => data[at] ^= 0xff,
        _ => {}
    }
    let start = match (&range, fault) {
        (Some(r), f) if f != Some(Fault::IgnoreRange) => r
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok()),
        _ => None,
    };
    let total = data.len();
    let (status, body_start, extra) = match start {
        Some(s) if s >= total => {
            let cr = format!("Content-Range: bytes */{total}");
            return respond(&mut conn, "416 Range Not Satisfiable", &[cr], b"").await;
        }
        Some(s) => (
            "206 Partial Content",
            s,
            vec![format!("Content-Range: bytes {s}-{}/{total}", total - 1)],
        ),
        None => ("200 OK", 0, vec![]),
    };
    let body = &data[body_start..];
    if let Some(Fault::Truncate { at }) = fault {
        let cut = at.saturating_sub(body_start).min(body.len());
        let mut h = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for e in &extra {
            h.push_str(e);
            h.push_str("\r\n");
        }
        h.push_str("\r\n");
        conn.write_all(h.as_bytes()).await?;
        conn.write_all(&body[..cut]).await?;
        conn.flush().await?;
        return conn.shutdown().await;
    }
    respond(&mut conn, status, &extra, body).await
}

async fn respond(
    conn: &mut TcpStream,
    status: &str,
    extra: &[String],
    body: &[u8],
) -> std::io::Result<()> {
    let mut h = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for e in extra {
        h.push_str(e);
        h.push_str("\r\n");
    }
    h.push_str("\r\n");
    conn.write_all(h.as_bytes()).await?;
    conn.write_all(body).await?;
    conn.flush().await?;
    conn.shutdown().await
}

/// A sparse fake "rootfs": data at the start, in the middle and near the end, holes elsewhere.
pub fn fake_rootfs(path: &std::path::Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(b"ext4-ish superblock", 1024).unwrap();
    f.write_all_at(&[7u8; 10_000], size / 2).unwrap();
    f.write_all_at(b"tail", size - 4096).unwrap();
}
