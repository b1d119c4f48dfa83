//! End-to-end tests: the real guest serve loop on one end of a Unix socket, the real host
//! client on the other, commands really run.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener as StdListener, UnixStream as StdStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use banger_hint::Hint;
use nix::sys::signal::{signal, SigHandler, Signal};

use crate::guest::identity::{Identity, IdentityControl};
use crate::guest::power::PowerControl;
use crate::guest::serve::{serve_session, FrameWriter, ServeConfig, BASE_ENV, BOOT_ID_PATH};
use crate::host::{
    wait_ready, AgentClient, AgentError, CollectedOutput, Endpoint, ExecEvent, ExecHandle,
    ExecOutput, ExecRequest,
};
use crate::protocol::{ExitStatus, WindowSize, AGENT_VERSION};

const VM: &str = "test-vm";

/// Records power-off requests instead of switching anything off.
struct FakePower {
    calls: AtomicUsize,
    refuse: Option<&'static str>,
}

impl PowerControl for FakePower {
    fn power_off(&self, accepted: &dyn Fn(Result<(), String>)) {
        self.calls.fetch_add(1, Ordering::SeqCst);
        accepted(self.refuse.map(|r| Err(r.to_string())).unwrap_or(Ok(())));
    }
}

struct Guest {
    cwd: tempfile::TempDir,
    power: Arc<FakePower>,
    /// A fake `/etc` with users and groups for the tests that switch users.
    etc: tempfile::TempDir,
    user: Option<String>,
    identity: Arc<crate::guest::identity::RecordingIdentity>,
}

const PASSWD: &str = "\
root:x:0:0:root:/root:/bin/sh
app:x:1234:2345:App:/home/app:/bin/sh
";
const GROUP: &str = "\
root:x:0:
tty:x:5:
staff:x:3456:other,app
app:x:2345:
";

impl Guest {
    fn new() -> Self {
        Self::with_power(None)
    }

    fn with_power(refuse: Option<&'static str>) -> Self {
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(etc.path().join("passwd"), PASSWD).unwrap();
        std::fs::write(etc.path().join("group"), GROUP).unwrap();
        Guest {
            cwd: tempfile::tempdir().unwrap(),
            power: Arc::new(FakePower {
                calls: AtomicUsize::new(0),
                refuse,
            }),
            identity: Arc::default(),
            etc,
            user: None,
        }
    }

    /// A guest whose image says `User: user`.
    fn with_user(user: &str) -> Self {
        Guest {
            user: Some(user.to_string()),
            ..Self::new()
        }
    }

    fn config(&self) -> Arc<ServeConfig> {
        Arc::new(ServeConfig {
            default_cwd: self.cwd.path().to_path_buf(),
            base_env: BASE_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            user: self.user.clone(),
            etc: self.etc.path().to_path_buf(),
            power: self.power.clone(),
            identity: self.identity.clone(),
        })
    }

    /// Serves `stream` on a thread until it closes.
    fn serve(&self, stream: StdStream) -> thread::JoinHandle<()> {
        serve_with(self.config(), stream)
    }

    /// A client connected to a fresh session of this guest, plus the guest's end of the
    /// socket (to cut the connection from the guest side).
    fn connect(&self) -> (AgentClient, StdStream) {
        connect_with(self.config())
    }
}

/// Serves `stream` with `cfg` on a thread until it closes.
fn serve_with(cfg: Arc<ServeConfig>, stream: StdStream) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let writer = Arc::new(FrameWriter::new(stream.try_clone().unwrap()));
        let _ = serve_session(&stream, &writer, &cfg);
    })
}

/// A client connected to a fresh session of a guest served with `cfg`, plus the guest's end
/// of the socket.
fn connect_with(cfg: Arc<ServeConfig>) -> (AgentClient, StdStream) {
    let (host, guest) = StdStream::pair().unwrap();
    let guest_handle = guest.try_clone().unwrap();
    serve_with(cfg, guest);
    host.set_nonblocking(true).unwrap();
    let client = AgentClient::new(VM, UnixStream::from_std(host).unwrap());
    (client, guest_handle)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn hello_is_answered_with_ready_and_the_boot_id() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let ready = client.hello(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ready.agent_version, AGENT_VERSION);
    let boot_id = std::fs::read_to_string(BOOT_ID_PATH).unwrap();
    assert_eq!(ready.boot_id, boot_id.trim());
    assert!(!ready.hostname.is_empty());
}

#[tokio::test]
async fn exit_code_stdout_and_stderr_are_reported_separately() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let exec = client
        .exec(sh("echo hi; echo err >&2; exit 7"))
        .await
        .unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(text(&out.stdout), "hi\n");
    assert_eq!(text(&out.stderr), "err\n");
    assert_eq!(out.status, ExitStatus::Code(7));
}

#[tokio::test]
async fn cat_echoes_stdin_including_large_binary_input() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let exec = client.exec(ExecRequest::new(["cat"])).await.unwrap();
    exec.input.write(b"hello\n").await.unwrap();
    exec.input.write(b"world").await.unwrap();
    let out = exec.collect().await.unwrap();
    assert_eq!(text(&out.stdout), "hello\nworld");
    assert!(out.status.success());

    // Without a hello the client does not know the agent acks, so this is the unwindowed path.
    assert_cat_round_trips_megabytes(&client).await;
}

/// Several MiB of every byte value through `cat`: chunking, base64 and backpressure all take part.
async fn assert_cat_round_trips_megabytes(client: &AgentClient) {
    let big: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let exec = client.exec(ExecRequest::new(["cat"])).await.unwrap();
    let input = exec.input.clone();
    let payload = big.clone();
    let feeder = tokio::spawn(async move {
        input.write(&payload).await.unwrap();
        input.close().await.unwrap();
    });
    let out = exec.output.collect().await.unwrap();
    feeder.await.unwrap();
    assert_eq!(out.stdout.len(), big.len());
    assert!(out.stdout == big, "cat output differs from its input");
}

#[tokio::test]
async fn with_stdin_acks_large_input_arrives_whole() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    client.hello(Duration::from_secs(5)).await.unwrap();
    assert_cat_round_trips_megabytes(&client).await;
}

#[tokio::test]
async fn a_command_that_does_not_read_stdin_holds_up_neither_signals_nor_other_commands() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    client.hello(Duration::from_secs(5)).await.unwrap();
    let mut exec = client.exec(sh("echo started; sleep 30")).await.unwrap();
    assert_eq!(
        exec.output.recv().await.unwrap().unwrap(),
        ExecEvent::Stdout("started\n".into())
    );
    // Far more than the window, the guest's queue and the pipe hold together.
    let input = exec.input.clone();
    let writer = tokio::spawn(async move { input.write(&vec![b'x'; 16 << 20]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !writer.is_finished(),
        "the stdin window should hold the writer back"
    );

    let limit = Duration::from_secs(5);
    let other = tokio::time::timeout(limit, async {
        client.exec(sh("echo other")).await.unwrap().collect().await
    })
    .await
    .expect("another command must not wait behind the blocked stdin")
    .unwrap();
    assert_eq!(text(&other.stdout), "other\n");

    tokio::time::timeout(limit, exec.input.signal(libc::SIGTERM))
        .await
        .expect("a signal must not wait behind the blocked stdin")
        .unwrap();
    let rest = tokio::time::timeout(limit, exec.output.collect())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.status, ExitStatus::Signal(libc::SIGTERM));
    let written = tokio::time::timeout(limit, writer).await.unwrap().unwrap();
    assert!(
        matches!(written, Err(AgentError::StdinClosed { .. })),
        "{written:?}"
    );
}

#[tokio::test]
async fn a_command_killed_by_a_signal_reports_the_signal() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let out = client
        .exec(sh("kill -9 $$"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::Signal(9));
    assert_eq!(out.status.to_string(), "killed by signal 9 (SIGKILL)");
}

#[tokio::test]
async fn a_signal_from_the_host_reaches_the_whole_process_group() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    // The shell waits on a child: only signalling the group ends both promptly.
    let mut exec = client
        .exec(sh("echo started; sleep 30; echo not reached"))
        .await
        .unwrap();
    assert_eq!(
        exec.output.recv().await.unwrap().unwrap(),
        ExecEvent::Stdout("started\n".into())
    );
    let start = Instant::now();
    exec.input.signal(libc::SIGTERM).await.unwrap();
    let out = exec.output.collect().await.unwrap();
    assert_eq!(out.status, ExitStatus::Signal(libc::SIGTERM));
    assert!(out.stdout.is_empty());
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_missing_program_is_an_error_naming_it_and_the_cwd() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut exec = client
        .exec(ExecRequest::new(["banger-no-such-program", "--flag"]))
        .await
        .unwrap();
    let err = exec.output.recv().await.unwrap().unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AgentError::Guest { .. }), "{msg}");
    assert!(
        msg.starts_with("VM test-vm: banger-no-such-program: command not found"),
        "{msg}"
    );
    assert!(
        msg.contains(&guest.cwd.path().display().to_string()),
        "{msg}"
    );
    assert!(exec.output.recv().await.is_none());

    let err = client
        .exec(ExecRequest::new(["true"]).cwd("/banger/no/such/dir"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("working directory /banger/no/such/dir does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn five_concurrent_commands_each_get_their_own_output() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut handles = Vec::new();
    for n in 0..5 {
        let exec = client
            .exec(
                sh("for i in 1 2 3; do echo $ID-$i; echo e$ID >&2; sleep 0.05; done; exit $ID")
                    .env("ID", n.to_string()),
            )
            .await
            .unwrap();
        handles.push(tokio::spawn(exec.collect()));
    }
    for (n, h) in handles.into_iter().enumerate() {
        let out = h.await.unwrap().unwrap();
        assert_eq!(text(&out.stdout), format!("{n}-1\n{n}-2\n{n}-3\n"));
        assert_eq!(text(&out.stderr), format!("e{n}\ne{n}\ne{n}\n"));
        assert_eq!(out.status, ExitStatus::Code(n as i32));
    }
}

#[tokio::test]
async fn output_is_streamed_as_it_is_produced() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut exec = client
        .exec(sh("echo first; sleep 1.5; echo second"))
        .await
        .unwrap();
    assert_eq!(
        exec.output.recv().await.unwrap().unwrap(),
        ExecEvent::Stdout("first\n".into())
    );
    // Measured from the first line, not from the start, so a slow machine cannot fail it:
    // a buffering agent would deliver both lines together, at the end.
    let first_at = Instant::now();
    let rest = exec.output.collect().await.unwrap();
    assert_eq!(text(&rest.stdout), "second\n");
    assert!(
        first_at.elapsed() >= Duration::from_secs(1),
        "the first line arrived only {:?} before the end",
        first_at.elapsed()
    );
}

#[tokio::test]
async fn commands_get_the_base_environment_the_request_env_and_cwd() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let out = client
        .exec(sh("echo $HOME $LANG $FOO; echo $PATH; pwd").env("FOO", "bar"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let canonical_cwd = std::fs::canonicalize(guest.cwd.path()).unwrap();
    assert_eq!(
        text(&out.stdout),
        format!(
            "/root C.UTF-8 bar\n{}\n{}\n",
            BASE_ENV[0].1,
            canonical_cwd.display()
        )
    );
    let out = client
        .exec(
            ExecRequest::new(["pwd"])
                .cwd("/tmp")
                .env("HOME", "/elsewhere"),
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "/tmp\n");
}

#[tokio::test]
async fn a_background_process_holding_the_pipes_does_not_delay_exit() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let start = Instant::now();
    let out = client
        .exec(sh("sleep 8 & echo done"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "done\n");
    assert!(out.status.success());
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "exit took {:?}",
        start.elapsed()
    );
}

fn process_alive(pid: i32) -> bool {
    // A zombie is dead for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[tokio::test]
async fn losing_the_connection_fails_pending_commands_and_kills_them_in_the_guest() {
    let guest = Guest::new();
    let (client, guest_end) = guest.connect();
    let mut exec = client.exec(sh("echo $$; exec sleep 30")).await.unwrap();
    let pid: i32 = match exec.output.recv().await.unwrap().unwrap() {
        ExecEvent::Stdout(b) => text(&b).trim().parse().unwrap(),
        other => panic!("expected the pid, got {other:?}"),
    };
    assert!(process_alive(pid));

    guest_end.shutdown(std::net::Shutdown::Both).unwrap();
    let err = exec.output.recv().await.unwrap().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("lost the agent connection to VM test-vm"),
        "{err}"
    );
    assert!(err.hint().unwrap().contains("console log"));
    let later = client.exec(ExecRequest::new(["true"])).await.unwrap_err();
    assert!(
        matches!(later, AgentError::ConnectionLost { .. }),
        "{later}"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!process_alive(pid), "command {pid} outlived its connection");
}

#[tokio::test]
async fn poweroff_is_handed_to_the_power_control_and_acknowledged() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    client.poweroff().await.unwrap();
    assert_eq!(guest.power.calls.load(Ordering::SeqCst), 1);

    let guest = Guest::with_power(Some("`systemctl poweroff` failed (exit status: 1)"));
    let (client, _g) = guest.connect();
    let err = client.poweroff().await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "VM test-vm: the guest did not power off: `systemctl poweroff` failed (exit status: 1)"
    );
}

#[tokio::test]
async fn a_restored_guest_takes_on_the_identity_the_host_gives_it_or_says_why_not() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let identity = crate::host::Identity {
        boot: crate::cmdline::parse(
            "banger.ip=172.16.0.9/24 banger.gw=172.16.0.1 banger.hostname=web2 banger.time=1796221963",
        )
        .settings,
        mac: "02:ba:ac:10:00:09".into(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        seed: vec![9; 32],
        ssh_host_key: None,
    };
    let ready = client
        .reidentify(identity.clone(), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(ready.capabilities.reidentify);
    let seen = guest.identity.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].mac, [0x02, 0xba, 0xac, 0x10, 0x00, 0x09]);
    assert_eq!(seen[0].seed, vec![9; 32]);
    assert_eq!(seen[0].boot, identity.boot);
    // A request the guest refuses changes nothing and says why.
    let bad = crate::host::Identity {
        mac: "not a mac".into(),
        ..identity
    };
    let err = client
        .reidentify(bad, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is not a MAC address"), "{err}");
    assert_eq!(guest.identity.seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn the_work_disk_is_unmounted_for_a_warm_snapshot_and_mounted_again_on_request() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let ready = client
        .work_disk(false, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(ready.capabilities.work_disk);
    client
        .work_disk(true, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(
        *guest.identity.work_disk_calls.lock().unwrap(),
        vec![false, true]
    );
    // The guest still serves commands afterwards, in its working directory.
    let out = client
        .exec(sh("pwd"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), guest.cwd.path().to_str().unwrap());
}

/// A guest whose `/root` is in use: it refuses to swap its work disk.
struct BusyHome;

impl IdentityControl for BusyHome {
    fn become_vm(&self, _identity: &Identity) -> Result<(), String> {
        Ok(())
    }

    fn work_disk(&self, _mounted: bool) -> Result<(), String> {
        Err("something still uses /root (a process's working directory or an open file)".into())
    }
}

#[tokio::test]
async fn a_work_disk_the_guest_cannot_swap_is_an_error_saying_why() {
    let guest = Guest::new();
    let cfg = Arc::new(ServeConfig {
        identity: Arc::new(BusyHome),
        ..Arc::try_unwrap(guest.config()).ok().unwrap()
    });
    let (client, _g) = connect_with(cfg);
    let err = client
        .work_disk(false, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "VM test-vm: cannot unmount the work disk: something still uses /root (a process's \
         working directory or an open file)"
    );
    let err = client
        .work_disk(true, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with("VM test-vm: cannot mount the work disk: "),
        "{err}"
    );
}

/// Talks raw protocol to the guest: one line out, one line back.
fn raw_exchange(
    stream: &mut StdStream,
    reader: &mut impl BufRead,
    line: &str,
) -> serde_json::Value {
    stream.write_all(line.as_bytes()).unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap()
}

#[test]
fn the_guest_skips_garbage_answers_unknown_ops_and_ignores_frames_for_unknown_ids() {
    let guest = Guest::new();
    let (mut host, guest_end) = StdStream::pair().unwrap();
    guest.serve(guest_end);
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(host.try_clone().unwrap());

    // Half a frame left by an earlier host, then a blank line (how a new host resyncs), then
    // requests for ids nobody started: all silently dropped, so the hello answer comes first.
    host.write_all(b"{\"op\":\"std\n\n").unwrap();
    host.write_all(b"{\"op\":\"stdin\",\"id\":99,\"data\":\"aGk=\"}\n")
        .unwrap();
    host.write_all(b"{\"op\":\"signal\",\"id\":99,\"signal\":9}\n")
        .unwrap();
    let ready = raw_exchange(&mut host, &mut reader, "{\"op\":\"hello\",\"id\":1}\n");
    assert_eq!(ready["op"], "ready");
    assert_eq!(ready["id"], 1);

    let err = raw_exchange(&mut host, &mut reader, "{\"op\":\"teleport\",\"id\":5}\n");
    assert_eq!(err["op"], "error");
    assert_eq!(err["id"], 5);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("does not understand"),
        "{err}"
    );

    // A resize for a command that does not exist (any more) is dropped like a stdin frame.
    host.write_all(b"{\"op\":\"resize\",\"id\":99,\"rows\":1,\"cols\":1}\n")
        .unwrap();
    let err = raw_exchange(
        &mut host,
        &mut reader,
        "{\"op\":\"exec\",\"id\":6,\"argv\":[\"true\"],\"tty\":true,\"user\":\"nobody-here\"}\n",
    );
    assert_eq!(err["op"], "error");
    assert_eq!(err["id"], 6);
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("\"nobody-here\" is not in"), "{err}");
    assert!(message.ends_with("/passwd"), "{err}");
    let ready = raw_exchange(&mut host, &mut reader, "{\"op\":\"hello\",\"id\":7}\n");
    assert_eq!(
        (ready["tty"].as_bool(), ready["users"].as_bool()),
        (Some(true), Some(true))
    );
}

#[tokio::test]
async fn the_client_ignores_stale_frames_and_garbage_from_the_guest() {
    let (host, fake_guest) = UnixStream::pair().unwrap();
    let client = AgentClient::new(VM, host);
    let guest_task = tokio::spawn(async move {
        let (read, mut write) = fake_guest.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut hello = String::new();
        while hello.trim().is_empty() {
            hello = lines.next_line().await.unwrap().unwrap();
        }
        let id = serde_json::from_str::<serde_json::Value>(&hello).unwrap()["id"].clone();
        let stale = "\"data\":\"aGk=\"}\n{\"op\":\"stdout\",\"id\":1,\"data\":\"aGk=\"}\n";
        write.write_all(stale.as_bytes()).await.unwrap();
        let ready = format!(
            "{{\"op\":\"ready\",\"id\":{id},\"hostname\":\"h\",\"agent_version\":\"9\",\"boot_id\":\"b\"}}\n"
        );
        write.write_all(ready.as_bytes()).await.unwrap();
        // Keep the connection open until the client is done.
        let _ = lines.next_line().await;
    });
    let ready = client.hello(Duration::from_secs(5)).await.unwrap();
    assert_eq!(ready.hostname, "h");
    drop(client);
    guest_task.await.unwrap();
}

#[tokio::test]
async fn hello_without_an_answer_times_out_naming_the_vm() {
    let (host, _silent_guest) = UnixStream::pair().unwrap();
    let client = AgentClient::new(VM, host);
    let err = client.hello(Duration::from_millis(200)).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the agent of VM test-vm did not answer within 200ms"
    );
}

/// A guest that listens on a Unix socket like QEMU's virtio-serial chardev, appearing only
/// after `delay`.
fn serve_unix_socket_later(guest: &Guest, path: PathBuf, delay: Duration) {
    let cfg = guest.config();
    thread::spawn(move || {
        thread::sleep(delay);
        let listener = StdListener::bind(&path).unwrap();
        let (conn, _) = listener.accept().unwrap();
        let writer = Arc::new(FrameWriter::new(conn.try_clone().unwrap()));
        let _ = serve_session(&conn, &writer, &cfg);
    });
}

#[tokio::test]
async fn wait_ready_retries_until_the_socket_appears() {
    let guest = Guest::new();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    serve_unix_socket_later(&guest, socket.clone(), Duration::from_millis(500));
    let endpoint = Endpoint::VirtioSerial { socket };
    let (client, ready) = wait_ready(VM, &endpoint, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ready.agent_version, AGENT_VERSION);
    let out = client
        .exec(ExecRequest::new(["echo", "up"]))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "up\n");
}

#[tokio::test]
async fn wait_ready_gives_up_after_the_timeout_with_the_last_error() {
    let endpoint = Endpoint::VirtioSerial {
        socket: "/nonexistent/banger/agent.sock".into(),
    };
    let start = Instant::now();
    let err = wait_ready(VM, &endpoint, Duration::from_millis(600))
        .await
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3));
    let msg = err.to_string();
    assert!(
        msg.starts_with("the agent of VM test-vm did not become ready within 600ms"),
        "{msg}"
    );
    assert!(msg.contains("/nonexistent/banger/agent.sock"), "{msg}");
    assert!(err.hint().is_some());
}

/// A fake Firecracker vsock bridge: reads `CONNECT <port>\n`, answers `reply`, and on `OK`
/// hands the rest of the connection to a real guest session.
fn fake_firecracker_bridge(
    guest: &Guest,
    uds: &Path,
    reply: &'static str,
) -> thread::JoinHandle<String> {
    let listener = StdListener::bind(uds).unwrap();
    let cfg = guest.config();
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            conn.read_exact(&mut byte).unwrap();
            line.push(byte[0]);
        }
        conn.write_all(reply.as_bytes()).unwrap();
        if reply.starts_with("OK") {
            let writer = Arc::new(FrameWriter::new(conn.try_clone().unwrap()));
            let _ = serve_session(&conn, &writer, &cfg);
        }
        String::from_utf8(line).unwrap()
    })
}

#[tokio::test]
async fn firecracker_vsock_connect_handshakes_then_speaks_the_protocol() {
    let guest = Guest::new();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let bridge = fake_firecracker_bridge(&guest, &uds, "OK 1073741824\n");
    let client = AgentClient::connect_firecracker_vsock(VM, &uds, crate::VSOCK_PORT)
        .await
        .unwrap();
    client.hello(Duration::from_secs(5)).await.unwrap();
    drop(client);
    assert_eq!(
        tokio::task::spawn_blocking(move || bridge.join().unwrap())
            .await
            .unwrap(),
        "CONNECT 1024\n"
    );
}

#[tokio::test]
async fn firecracker_vsock_refusal_names_the_vm_and_the_reply() {
    let guest = Guest::new();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let _bridge = fake_firecracker_bridge(&guest, &uds, "FAILURE\n");
    let err = AgentClient::connect_firecracker_vsock(VM, &uds, 1024)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Firecracker refused the vsock connection to the agent of VM test-vm (port 1024): \"FAILURE\""
    );
}

// ---- Terminal sessions -------------------------------------------------------------------

const SIZE: WindowSize = WindowSize {
    rows: 33,
    cols: 101,
};

fn tty_sh(script: &str) -> ExecRequest {
    sh(script).tty(SIZE)
}

/// Reads stdout until it contains `needle` (a terminal session must be past its set-up before
/// what the test types means anything); returns everything read so far.
async fn read_until(output: &mut ExecOutput, needle: &str) -> Vec<u8> {
    let mut seen = Vec::new();
    let wait = async {
        while !text(&seen).contains(needle) {
            match output.recv().await {
                Some(Ok(ExecEvent::Stdout(b))) => seen.extend_from_slice(&b),
                other => panic!("waiting for {needle:?} after {:?}: {other:?}", text(&seen)),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("no {needle:?} within 20s, got {:?}", text(&seen)));
    seen
}

#[tokio::test]
async fn a_terminal_session_has_a_terminal_on_stdin_and_stdout_and_merges_stderr() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut exec = client
        .exec(tty_sh(
            "test -t 0 && test -t 1 && test -t 2 && echo on-a-tty; echo to-stderr >&2; echo $TERM",
        ))
        .await
        .unwrap();
    exec.input.close().await.unwrap();
    let mut stdout = Vec::new();
    let status = loop {
        match exec.output.recv().await.unwrap().unwrap() {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => panic!("a terminal has no separate stderr: {b:?}"),
            ExecEvent::Exit(status) => break status,
        }
    };
    // The terminal turns \n into \r\n, as it would on screen.
    assert_eq!(text(&stdout), "on-a-tty\r\nto-stderr\r\nxterm-256color\r\n");
    assert!(status.success());

    let out = client
        .exec(tty_sh("echo $TERM").env("TERM", "vt100"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(text(&out.stdout), "vt100\r\n");
}

#[tokio::test]
async fn stty_reports_the_window_size_and_the_new_one_after_a_resize() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut exec = client
        .exec(tty_sh("stty size; echo ready; read line; stty size"))
        .await
        .unwrap();
    let first = read_until(&mut exec.output, "ready").await;
    assert!(text(&first).starts_with("33 101\r\n"), "{:?}", text(&first));
    exec.input
        .resize(WindowSize {
            rows: 50,
            cols: 120,
        })
        .await
        .unwrap();
    exec.input.write(b"\n").await.unwrap();
    let rest = exec.output.collect().await.unwrap();
    assert!(
        text(&rest.stdout).ends_with("50 120\r\n"),
        "{:?}",
        text(&rest.stdout)
    );
    assert!(rest.status.success());
}

/// Presses Ctrl-C (byte 0x03) until the command ends, as a user would: a `sh -c` that gets
/// SIGINT before it has started its child only acts on it once the child ends, so the first
/// press can come too early. Returns how the command ended and what it printed.
async fn press_ctrl_c_until_it_ends(exec: ExecHandle) -> CollectedOutput {
    let input = exec.input.clone();
    let presser = tokio::spawn(async move {
        for _ in 0..20 {
            if input.write(&[0x03]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(10), exec.output.collect())
        .await
        .expect("Ctrl-C did not interrupt the command")
        .unwrap();
    presser.abort();
    out
}

#[tokio::test]
async fn ctrl_c_interrupts_the_foreground_command() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut exec = client
        .exec(tty_sh("echo ready; sleep 100; echo not reached"))
        .await
        .unwrap();
    read_until(&mut exec.output, "ready").await;
    let start = Instant::now();
    let out = press_ctrl_c_until_it_ends(exec).await;
    assert!(
        matches!(
            out.status,
            ExitStatus::Signal(libc::SIGINT) | ExitStatus::Code(130)
        ),
        "{:?}",
        out.status
    );
    assert_eq!(out.status.shell_code(), 130);
    assert!(!text(&out.stdout).contains("not reached"));
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// Puts SIGINT's disposition back when dropped.
struct RestoreSigint(SigHandler);

impl Drop for RestoreSigint {
    fn drop(&mut self) {
        // SAFETY: reinstalls the disposition found before (a default or ignore, or whatever
        // handler was there), as it was.
        let _ = unsafe { signal(Signal::SIGINT, self.0) };
    }
}

#[tokio::test]
async fn ctrl_c_works_even_when_the_agent_itself_ignores_sigint() {
    // As an agent started as a background job would: ignored dispositions survive exec.
    // SAFETY: SIG_IGN installs no handler code; the guard puts the old disposition back.
    let old = unsafe { signal(Signal::SIGINT, SigHandler::SigIgn) }.unwrap();
    let _restore = RestoreSigint(old);
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut exec = client.exec(tty_sh("echo ready; sleep 100")).await.unwrap();
    read_until(&mut exec.output, "ready").await;
    let out = press_ctrl_c_until_it_ends(exec).await;
    assert_eq!(out.status.shell_code(), 130);
}

#[tokio::test]
async fn ctrl_d_ends_cat_and_the_exit_status_comes_through() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let exec = client
        .exec(ExecRequest::new(["cat"]).tty(SIZE))
        .await
        .unwrap();
    exec.input.write(b"hello\n").await.unwrap();
    exec.input.write(&[0x04]).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), exec.output.collect())
        .await
        .expect("Ctrl-D should end cat")
        .unwrap();
    // Echoed by the terminal, then printed by cat.
    assert_eq!(text(&out.stdout), "hello\r\nhello\r\n");
    assert!(out.status.success());

    let out = client
        .exec(tty_sh("exit 7"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::Code(7));
    let out = client
        .exec(tty_sh("kill -TERM $$"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(out.status, ExitStatus::Signal(libc::SIGTERM));
}

#[tokio::test]
async fn a_mebibyte_of_output_arrives_complete_and_in_order() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let out = client
        .exec(ExecRequest::new(["seq", "1", "150000"]).tty(SIZE))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let expected: String = (1..=150_000).map(|n| format!("{n}\r\n")).collect();
    assert!(expected.len() > 1 << 20);
    assert_eq!(out.stdout.len(), expected.len());
    assert!(text(&out.stdout) == expected, "the output differs");
    assert!(out.status.success());
}

#[tokio::test]
async fn a_mebibyte_of_raw_input_arrives_complete_and_in_order() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    client.hello(Duration::from_secs(5)).await.unwrap();
    let data: Vec<u8> = (0..1usize << 20).map(|i| (i * 7 % 256) as u8).collect();
    // Raw and without echo the terminal passes every byte value as it is, both ways.
    let mut exec = client
        .exec(tty_sh(
            "stty raw -echo; echo ready; head -c 1048576 > in.bin; cat in.bin",
        ))
        .await
        .unwrap();
    read_until(&mut exec.output, "ready\n").await;
    let input = exec.input.clone();
    let payload = data.clone();
    let feeder = tokio::spawn(async move { input.write(&payload).await });
    let out = tokio::time::timeout(Duration::from_secs(60), exec.output.collect())
        .await
        .expect("1 MiB through the terminal took over a minute")
        .unwrap();
    feeder.await.unwrap().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "the bytes differ");
}

#[tokio::test]
async fn a_host_signal_reaches_the_foreground_group_of_the_terminal() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let mut exec = client.exec(tty_sh("echo ready; sleep 100")).await.unwrap();
    read_until(&mut exec.output, "ready").await;
    exec.input.signal(libc::SIGTERM).await.unwrap();
    let out = exec.output.collect().await.unwrap();
    assert_eq!(out.status, ExitStatus::Signal(libc::SIGTERM));
}

#[tokio::test]
async fn losing_the_connection_hangs_up_a_terminal_session() {
    let guest = Guest::new();
    let (client, guest_end) = guest.connect();
    // The shell waits for a child in the foreground; a hang-up must end both.
    let mut exec = client.exec(tty_sh("echo $$; sleep 100")).await.unwrap();
    let pid: i32 = text(&read_until(&mut exec.output, "\n").await)
        .trim()
        .parse()
        .unwrap();
    assert!(process_alive(pid));
    guest_end.shutdown(std::net::Shutdown::Both).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while process_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!process_alive(pid), "session {pid} outlived its connection");
}

#[tokio::test]
async fn losing_the_connection_closes_the_terminal_even_for_a_session_that_ignores_sighup() {
    let guest = Guest::new();
    let (client, guest_end) = guest.connect();
    // Deaf to SIGHUP, but a closed terminal still ends its read loop (end-of-file).
    let mut exec = client
        .exec(tty_sh("trap '' HUP; echo $$; while read line; do :; done"))
        .await
        .unwrap();
    let pid: i32 = text(&read_until(&mut exec.output, "\n").await)
        .trim()
        .parse()
        .unwrap();
    guest_end.shutdown(std::net::Shutdown::Both).unwrap();
    let deadline = Instant::now() + Duration::from_secs(8);
    while process_alive(pid) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !process_alive(pid),
        "session {pid} kept its terminal after the host left"
    );
}

#[tokio::test]
async fn no_argv_runs_the_users_login_shell() {
    let guest = Guest::new();
    let (client, _g) = guest.connect();
    let exec = client
        .exec(ExecRequest::new(Vec::<String>::new()).tty(SIZE))
        .await
        .unwrap();
    exec.input
        .write(b"echo \"shell=$0\"; exit 3\n")
        .await
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), exec.output.collect())
        .await
        .unwrap()
        .unwrap();
    // The fake passwd gives root /bin/sh; the dash makes it a login shell.
    assert!(
        text(&out.stdout).contains("shell=-sh\r\n"),
        "{:?}",
        text(&out.stdout)
    );
    assert_eq!(out.status, ExitStatus::Code(3));
}

/// An agent of an earlier version, version 0.0.9, on the far end of `fake_guest`: it answers
/// hello with `ready` and the capabilities `caps` (JSON object members, e.g.
/// `"stdin_acks":true`) and nothing else; the task returns the ops it was sent.
fn old_agent(fake_guest: UnixStream, caps: &'static str) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let (read, mut write) = fake_guest.into_split();
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut ops = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim().is_empty() {
                continue;
            }
            let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
            ops.push(msg["op"].as_str().unwrap().to_string());
            if msg["op"] == "hello" {
                let ready = format!(
                    "{{\"op\":\"ready\",\"id\":{},\"hostname\":\"h\",\"agent_version\":\"0.0.9\",\"boot_id\":\"b\",{caps}}}\n",
                    msg["id"]
                );
                write.write_all(ready.as_bytes()).await.unwrap();
            }
        }
        ops
    })
}

#[tokio::test]
async fn an_agent_without_terminals_is_refused_clearly_for_a_tty_exec() {
    let (host, fake_guest) = UnixStream::pair().unwrap();
    let client = AgentClient::new(VM, host);
    // An agent of the previous version: knows nothing of tty or users.
    let guest_task = old_agent(fake_guest, "\"stdin_acks\":true");
    let err = client.exec(tty_sh("true")).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "the agent of VM test-vm (version 0.0.9) cannot open a terminal (interactive sessions)"
    );
    assert!(err.hint().unwrap().contains("recreate the VM"));
    let err = client.exec(sh("id").user("app")).await.unwrap_err();
    assert!(matches!(err, AgentError::Unsupported { .. }), "{err}");
    drop(client);
    // One hello to learn what the agent can do, and no exec it would have misread.
    assert_eq!(guest_task.await.unwrap(), vec!["hello"]);
}

#[tokio::test]
async fn an_agent_without_work_disk_is_refused_before_anything_is_sent() {
    let (host, fake_guest) = UnixStream::pair().unwrap();
    let client = AgentClient::new(VM, host);
    // An agent that restores (reidentify) but cannot swap its work disk.
    let guest_task = old_agent(fake_guest, "\"stdin_acks\":true,\"reidentify\":true");
    for mounted in [false, true] {
        let err = client
            .work_disk(mounted, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(matches!(err, AgentError::Unsupported { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "the agent of VM test-vm (version 0.0.9) cannot mount or unmount the work disk \
             (warm snapshots)"
        );
        assert!(err.hint().unwrap().contains("recreate the VM"));
    }
    drop(client);
    assert_eq!(guest_task.await.unwrap(), vec!["hello"]);
}

/// A hostile guest for the output limits: answers hello (claiming `output_acks`), then, for the
/// first exec, writes `frames` stdout frames of `size` bytes without waiting for any ack,
/// counting the bytes the host took off the stream.
fn flooding_guest(
    fake_guest: UnixStream,
    frames: usize,
    size: usize,
    written: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let (read, write) = fake_guest.into_split();
        let mut write = Some(write);
        let mut lines = tokio::io::BufReader::new(read).lines();
        // Keeps reading (the host's acks) while a spawned task floods.
        while let Ok(Some(line)) = lines.next_line().await {
            if line.trim().is_empty() {
                continue;
            }
            let msg: serde_json::Value = serde_json::from_str(&line).unwrap();
            let id = msg["id"].clone();
            match (msg["op"].as_str(), write.as_mut()) {
                (Some("hello"), Some(write)) => {
                    let ready = format!(
                        "{{\"op\":\"ready\",\"id\":{id},\"hostname\":\"h\",\"agent_version\":\"9\",\"boot_id\":\"b\",\"stdin_acks\":true,\"output_acks\":true}}\n"
                    );
                    write.write_all(ready.as_bytes()).await.unwrap();
                }
                (Some("exec"), Some(_)) => {
                    let Some(mut write) = write.take() else {
                        continue;
                    };
                    let written = written.clone();
                    tokio::spawn(async move {
                        let data = base64::Engine::encode(
                            &base64::engine::general_purpose::STANDARD,
                            vec![b'x'; size],
                        );
                        let frame =
                            format!("{{\"op\":\"stdout\",\"id\":{id},\"data\":\"{data}\"}}\n");
                        for _ in 0..frames {
                            if write.write_all(frame.as_bytes()).await.is_err() {
                                return;
                            }
                            written.fetch_add(frame.len(), Ordering::SeqCst);
                        }
                    });
                }
                _ => {}
            }
        }
    })
}

#[tokio::test]
async fn a_guest_that_ignores_the_output_window_is_held_back_not_buffered() {
    let (host, fake_guest) = UnixStream::pair().unwrap();
    let client = AgentClient::new(VM, host);
    let written = Arc::new(AtomicUsize::new(0));
    // 2,000 frames of 32 KiB: 87 MB on the wire if nothing pushed back.
    let guest = flooding_guest(
        fake_guest,
        2_000,
        crate::protocol::MAX_CHUNK,
        written.clone(),
    );
    client.hello(Duration::from_secs(5)).await.unwrap();
    let mut handle = client.exec(sh("flood")).await.unwrap();
    // Nobody reads the output for a while: the host takes in its queue's worth and stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = written.load(Ordering::SeqCst);
    assert!(held < 8 << 20, "the host took {held} bytes nobody read");
    // Reading goes on where it stopped.
    let mut got = 0;
    while got < 2_000 * crate::protocol::MAX_CHUNK {
        match handle.output.recv().await {
            Some(Ok(ExecEvent::Stdout(b))) => got += b.len(),
            other => panic!("unexpected {other:?} after {got} bytes"),
        }
    }
    drop(client);
    guest.abort();
}

#[tokio::test]
async fn an_oversized_output_frame_ends_the_command_with_a_clear_error() {
    let (host, fake_guest) = UnixStream::pair().unwrap();
    let client = AgentClient::new(VM, host);
    let guest = flooding_guest(
        fake_guest,
        1,
        crate::protocol::MAX_CHUNK + 1,
        Arc::new(AtomicUsize::new(0)),
    );
    client.hello(Duration::from_secs(5)).await.unwrap();
    let mut handle = client.exec(sh("big")).await.unwrap();
    let err = match handle.output.recv().await {
        Some(Err(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    };
    assert!(
        err.to_string().contains("output frame of 32769 bytes"),
        "{err}"
    );
    assert!(
        handle.output.recv().await.is_none(),
        "nothing follows the error"
    );
    drop(client);
    guest.abort();
}

// ---- Users --------------------------------------------------------------------------------

/// Whether to run a test that switches users: it needs root (CI runs the tests as root);
/// only the developer opt-out `BANGER_E2E_SKIP=1` skips it.
fn root_for_user_switching() -> bool {
    if std::env::var_os("BANGER_E2E_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: BANGER_E2E_SKIP=1 is set (developer opt-out; CI never sets it)");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs commands as other users (setuid) and must run as root, as CI does; \
         run `sudo make test`, or set BANGER_E2E_SKIP=1 to skip it on a developer machine"
    );
    true
}

const WHO: &str = "id -u; id -g; id -G; echo $HOME";

async fn who(client: &AgentClient, req: ExecRequest) -> String {
    let out = client.exec(req).await.unwrap().collect().await.unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

#[tokio::test]
async fn commands_run_as_the_images_user_with_its_groups_and_home() {
    if !root_for_user_switching() {
        return;
    }
    let guest = Guest::with_user("app");
    let (client, _g) = guest.connect();
    assert_eq!(
        who(&client, sh(WHO)).await,
        "1234\n2345\n2345 3456\n/home/app\n"
    );
    // The request's HOME wins over the passwd entry's.
    assert_eq!(
        who(&client, sh("echo $HOME").env("HOME", "/elsewhere")).await,
        "/elsewhere\n"
    );
}

#[tokio::test]
async fn a_request_overrides_the_user_in_every_oci_form() {
    if !root_for_user_switching() {
        return;
    }
    let guest = Guest::with_user("app");
    let (client, _g) = guest.connect();
    let cases = [
        ("4321", "4321\n0\n0\n/\n"),
        ("4321:5432", "4321\n5432\n5432\n/\n"),
        ("app:staff", "1234\n3456\n3456\n/home/app\n"),
        ("1234:77", "1234\n77\n77\n/home/app\n"),
        ("4321:staff", "4321\n3456\n3456\n/\n"),
        ("root", "0\n0\n0\n/root\n"),
    ];
    for (user, expected) in cases {
        assert_eq!(
            who(&client, sh(WHO).user(user)).await,
            expected,
            "user {user}"
        );
    }
    let err = client
        .exec(sh("id").user("bob:staff"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "VM test-vm: cannot run as user \"bob:staff\": user \"bob\" is not in {}/passwd",
            guest.etc.path().display()
        )
    );
}

#[tokio::test]
async fn a_terminal_session_runs_as_the_user_and_owns_its_terminal() {
    if !root_for_user_switching() {
        return;
    }
    let guest = Guest::with_user("app");
    let (client, _g) = guest.connect();
    let out = client
        .exec(tty_sh("id -u; stat -c '%u %g %a' \"$(tty)\"; echo $HOME"))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    // The terminal belongs to the user and the image's tty group, as after a login.
    assert_eq!(text(&out.stdout), "1234\r\n1234 5 620\r\n/home/app\r\n");
}
