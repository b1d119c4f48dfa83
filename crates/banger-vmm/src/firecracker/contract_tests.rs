//! Contract tests of the Firecracker backend: the real backend code path drives a fake
//! Firecracker (a Unix-socket HTTP server in the test, with a real `sleep` process standing in
//! for the VMM process), and every request it sends is validated against Firecracker's OpenAPI
//! description. One ignored test runs the same sequence against a real `firecracker` binary.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use super::*;
use crate::openapi_check::Spec;
use crate::process::{ProcessError, SpawnSpec, Spawned};
use crate::testkit::ProcessGuard;
use crate::{Nic, SnapshotPaths};

/// One HTTP request as the fake server saw it.
#[derive(Debug, Clone)]
struct Recorded {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Option<Value>,
}

impl Recorded {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How the fake Firecracker behaves.
#[derive(Clone, Default)]
struct Behaviour {
    /// Answer 400 with this fault message to a PUT on this path.
    fail_put: Option<(&'static str, &'static str)>,
    /// Instead of serving the API, run this shell script as the "VMM" (its output goes where
    /// Firecracker's would).
    crash_script: Option<&'static str>,
}

/// A fake Firecracker API server on a Unix socket, answering like Firecracker does.
struct FakeServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    fn start(path: &Path, log: Arc<Mutex<Vec<Recorded>>>, behaviour: Behaviour) -> FakeServer {
        let listener = UnixListener::bind(path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        // Non-blocking accept polled against the stop flag: the backend deletes the socket
        // file on stop, so teardown cannot wake a blocking accept by connecting to it.
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        // A client that never closes must not wedge the test's teardown.
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
                        serve_connection(conn, &log, &behaviour);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        FakeServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Minimal HTTP/1.1 server side: request line, headers, Content-Length body; keep-alive.
fn serve_connection(conn: UnixStream, log: &Mutex<Vec<Recorded>>, behaviour: &Behaviour) {
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut headers = Vec::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (k, v) = line.split_once(':').unwrap();
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.parse().unwrap())
            .unwrap_or(0);
        let mut raw = vec![0u8; len];
        reader.read_exact(&mut raw).unwrap();
        let body = (len > 0).then(|| serde_json::from_slice(&raw).expect("request body is JSON"));
        log.lock().unwrap().push(Recorded {
            method: method.clone(),
            path: path.clone(),
            headers,
            body: body.clone(),
        });

        if (method.as_str(), path.as_str()) == ("PUT", "/snapshot/create") {
            // Firecracker writes both files (partly, when it then fails).
            let b = body.as_ref().unwrap();
            for key in ["snapshot_path", "mem_file_path"] {
                std::fs::write(b[key].as_str().unwrap(), b"state").unwrap();
            }
        }
        let (status, payload) = match (method.as_str(), path.as_str()) {
            ("GET", "/vm/config") => (
                "200 OK",
                json!({"machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false},
                       "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "bg-tap0",
                                               "guest_mac": "06:00:ac:10:00:02"}],
                       "drives": []})
                .to_string(),
            ),
            ("GET", "/") => (
                "200 OK",
                json!({"app_name": "Firecracker", "id": "anonymous-instance",
                       "state": "Not started", "vmm_version": "1.16.1"})
                .to_string(),
            ),
            ("PUT", p) if behaviour.fail_put.is_some_and(|(fp, _)| fp == p) => (
                "400 Bad Request",
                json!({"fault_message": behaviour.fail_put.map(|(_, m)| m)}).to_string(),
            ),
            _ => ("204 No Content", String::new()),
        };
        let response = if payload.is_empty() {
            format!("HTTP/1.1 {status}\r\nServer: Firecracker API\r\n\r\n")
        } else {
            format!(
                "HTTP/1.1 {status}\r\nServer: Firecracker API\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{payload}",
                payload.len()
            )
        };
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A [`Launcher`] that starts a [`FakeServer`] on the `--api-sock` path and a real `sleep`
/// process as the VMM, recording what it was asked to run.
#[derive(Default)]
struct FakeFirecracker {
    behaviour: Behaviour,
    requests: Arc<Mutex<Vec<Recorded>>>,
    spawned: Mutex<Vec<(SpawnSpec, Spawned)>>,
    servers: Mutex<Vec<FakeServer>>,
}

impl Launcher for FakeFirecracker {
    fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned, ProcessError> {
        let mut stand_in = spec.clone();
        stand_in.program = "sh".into();
        if let Some(script) = self.behaviour.crash_script {
            stand_in.args = vec!["-c".into(), script.into()];
        } else {
            let i = spec.args.iter().position(|a| a == "--api-sock").unwrap();
            let socket = PathBuf::from(&spec.args[i + 1]);
            let server = FakeServer::start(&socket, self.requests.clone(), self.behaviour.clone());
            self.servers.lock().unwrap().push(server);
            stand_in.args = vec!["-c".into(), "exec sleep 300".into()];
        }
        let spawned = process::spawn_detached(&stand_in)?;
        self.spawned.lock().unwrap().push((spec.clone(), spawned));
        Ok(spawned)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    cfg: VmConfig,
}

fn fixture(name: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in ["vmlinux", "initrd.img", "root.ext4", "work.ext4"] {
        std::fs::write(d.join(f), b"").unwrap();
    }
    std::fs::create_dir(d.join("run")).unwrap();
    let cfg = VmConfig {
        name: name.into(),
        vcpus: 2,
        memory_mib: 1024,
        kernel: d.join("vmlinux"),
        initrd: Some(d.join("initrd.img")),
        kernel_args: "console=ttyS0 reboot=k panic=1 banger.ip=172.16.0.2".into(),
        root_disk: d.join("root.ext4"),
        work_disk: d.join("work.ext4"),
        net: Some(Nic {
            tap: banger_net::TapName::parse("bg-tap0").unwrap(),
            mac: "06:00:ac:10:00:02".parse().unwrap(),
        }),
        vsock_cid: None,
        run_dir: d.join("run"),
        console_log: d.join("console.log"),
    };
    Fixture { _dir: dir, cfg }
}

fn guard_all(fake: &FakeFirecracker) -> Vec<ProcessGuard> {
    fake.spawned
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| ProcessGuard::new(s.pid, s.start_time))
        .collect()
}

#[tokio::test]
async fn every_request_of_a_create_start_stop_sequence_conforms_to_the_firecracker_api() {
    let fx = fixture("fc-contract");
    let cfg = &fx.cfg;
    let fake = Arc::new(FakeFirecracker::default());
    let backend = FirecrackerBackend::with_launcher("/opt/fc/firecracker".into(), fake.clone());

    let handle = backend.start(cfg).await.unwrap();
    let _guards = guard_all(&fake);
    assert!(crate::process::is_alive(handle.pid, handle.pid_start_time));
    backend
        .stop(&handle, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(!crate::process::is_alive(handle.pid, handle.pid_start_time));
    assert!(
        process::proc_stat(handle.pid).is_none(),
        "stand-in VMM not reaped"
    );

    // Every request conforms to the API description.
    let spec = Spec::firecracker();
    let requests = fake.requests.lock().unwrap().clone();
    let mut problems = Vec::new();
    for r in &requests {
        problems.extend(spec.check_request(&r.method, &r.path, r.body.as_ref()));
        if r.body.is_some() {
            assert_eq!(r.header("Content-Type"), Some("application/json"), "{r:?}");
        }
    }
    assert!(
        problems.is_empty(),
        "requests violate the API:\n{}",
        problems.join("\n")
    );

    // And the sequence is the full create/start/stop one.
    let mut seq: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    seq.dedup(); // readiness polling may GET / more than once
    assert_eq!(
        seq,
        [
            "GET /",
            "PUT /logger",
            "PUT /machine-config",
            "PUT /boot-source",
            "PUT /drives/rootfs",
            "PUT /drives/work",
            "PUT /network-interfaces/eth0",
            "PUT /vsock",
            "PUT /actions",
        ]
    );
    let body = |path: &str, nth: usize| {
        requests
            .iter()
            .filter(|r| r.path == path)
            .nth(nth)
            .and_then(|r| r.body.clone())
            .unwrap()
    };
    let run = &cfg.run_dir;
    assert_eq!(body("/actions", 0), json!({"action_type": "InstanceStart"}));
    assert_eq!(
        body("/actions", 1),
        json!({"action_type": "SendCtrlAltDel"})
    );
    assert_eq!(
        body("/machine-config", 0),
        json!({"vcpu_count": 2, "mem_size_mib": 1024})
    );
    assert_eq!(
        body("/boot-source", 0),
        json!({"kernel_image_path": cfg.kernel, "initrd_path": cfg.initrd,
               "boot_args": cfg.kernel_args})
    );
    // Disks by names relative to the run directory Firecracker runs in, linked to the VM's own
    // disks, so that a snapshot of it restores onto another VM's disks.
    assert_eq!(
        body("/drives/rootfs", 0),
        json!({"drive_id": "rootfs", "path_on_host": "rootfs.disk", "is_root_device": true,
               "is_read_only": false, "cache_type": "Writeback"})
    );
    assert_eq!(body("/drives/work", 0)["path_on_host"], json!("work.disk"));
    assert_eq!(
        std::fs::read_link(run.join(ROOT_LINK)).unwrap(),
        cfg.root_disk
    );
    assert_eq!(
        std::fs::read_link(run.join(WORK_LINK)).unwrap(),
        cfg.work_disk
    );
    assert_eq!(body("/drives/work", 0)["is_root_device"], json!(false));
    assert_eq!(
        body("/network-interfaces/eth0", 0),
        json!({"iface_id": "eth0", "host_dev_name": "bg-tap0", "guest_mac": "06:00:ac:10:00:02"})
    );
    assert_eq!(
        body("/vsock", 0),
        json!({"guest_cid": 3, "uds_path": run.join(VSOCK_UDS)})
    );
    assert_eq!(
        body("/logger", 0)["log_path"],
        json!(run.join(FIRECRACKER_LOG))
    );
    assert!(
        run.join(FIRECRACKER_LOG).exists(),
        "logger file must exist before PUT /logger"
    );

    // The command line and the handle.
    let (spec0, _) = fake.spawned.lock().unwrap()[0].clone();
    assert_eq!(spec0.program, Path::new("/opt/fc/firecracker"));
    assert_eq!(
        spec0.args,
        [
            "--api-sock".into(),
            run.join(API_SOCKET).into_os_string(),
            "--id".into(),
            "fc-contract".into()
        ] as [std::ffi::OsString; 4]
    );
    assert_eq!(spec0.log, cfg.console_log);
    assert_eq!(spec0.cwd.as_deref(), Some(run.as_path()));
    assert_eq!(spec0.log_mode, LogMode::Append);
    assert_eq!(
        handle.agent,
        AgentEndpoint::FirecrackerVsock {
            uds: run.join(VSOCK_UDS),
            port: 1024
        }
    );
    assert_eq!(handle.api_socket, Some(run.join(API_SOCKET)));
    assert!(
        !run.join(PID_FILE).exists(),
        "pid file left behind after stop"
    );
}

/// Every request problem of `requests` against the API description.
fn violations(requests: &[Recorded]) -> Vec<String> {
    let spec = Spec::firecracker();
    let mut problems = Vec::new();
    for r in requests {
        problems.extend(spec.check_request(&r.method, &r.path, r.body.as_ref()));
        if r.body.is_some() && r.header("Content-Type") != Some("application/json") {
            problems.push(format!(
                "{} {}: body without JSON content type",
                r.method, r.path
            ));
        }
    }
    problems
}

#[tokio::test]
async fn snapshot_and_restore_requests_conform_to_the_firecracker_api() {
    let fx = fixture("fc-snap");
    let fake = Arc::new(FakeFirecracker::default());
    let backend = FirecrackerBackend::with_launcher("firecracker".into(), fake.clone());
    let handle = backend.start(&fx.cfg).await.unwrap();
    let booted = fake.requests.lock().unwrap().len();

    let snap = fx.cfg.run_dir.parent().unwrap().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let paths = SnapshotPaths::new(&snap);
    let info = backend
        .snapshot(&handle, &paths, Box::pin(async { Ok(()) }))
        .await
        .unwrap();
    assert_eq!(info.state_bytes, 10, "state and memory files, 5 bytes each");
    let shape = crate::Manifest::read(&paths, "x").unwrap().shape;
    assert_eq!(
        (shape.vcpus, shape.memory_mib, shape.network),
        (2, 1024, true)
    );

    // The restore: another VM, with its own run directory and tap.
    let fx2 = fixture("fc-restored");
    let mut cfg2 = fx2.cfg.clone();
    cfg2.net = Some(Nic {
        tap: banger_net::TapName::parse("bg-tap1").unwrap(),
        mac: "06:00:ac:10:00:03".parse().unwrap(),
    });
    let mut wrong = cfg2.clone();
    wrong.vcpus = 1;
    let err = backend.restore(&wrong, &paths).await.unwrap_err();
    assert!(matches!(err, VmmError::SnapshotMismatch { .. }), "{err}");
    let restored = backend.restore(&cfg2, &paths).await.unwrap();
    let _guards = guard_all(&fake);
    // The snapshot names the disks relative to Firecracker's working directory: the restored
    // VM's run directory, whose links lead to its own disks.
    let (spec, _) = fake.spawned.lock().unwrap()[1].clone();
    assert_eq!(spec.cwd.as_deref(), Some(cfg2.run_dir.as_path()));
    assert_eq!(
        std::fs::read_link(cfg2.run_dir.join(ROOT_LINK)).unwrap(),
        cfg2.root_disk
    );
    assert_eq!(restored.api_socket, Some(cfg2.run_dir.join(API_SOCKET)));
    assert_eq!(
        fake.spawned.lock().unwrap().len(),
        2,
        "the refused restore spawned"
    );

    let requests = fake.requests.lock().unwrap().clone();
    let problems = violations(&requests);
    assert!(
        problems.is_empty(),
        "requests violate the API:\n{}",
        problems.join("\n")
    );
    let mut seq: Vec<String> = requests[booted..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    seq.dedup();
    assert_eq!(
        seq,
        [
            "GET /vm/config",
            "PATCH /vm",
            "PUT /snapshot/create",
            "PATCH /vm",
            "GET /",
            "PUT /logger",
            "PUT /snapshot/load",
        ]
    );
    let bodies: Vec<Value> = requests[booted..]
        .iter()
        .filter_map(|r| r.body.clone())
        .collect();
    assert_eq!(bodies[0], json!({"state": "Paused"}));
    assert_eq!(
        bodies[1],
        json!({"snapshot_type": "Full", "snapshot_path": paths.state(),
               "mem_file_path": paths.memory()})
    );
    assert_eq!(bodies[2], json!({"state": "Resumed"}));
    assert_eq!(
        bodies[4],
        json!({"snapshot_path": paths.state(),
               "mem_backend": {"backend_type": "File", "backend_path": paths.memory()},
               "resume_vm": true,
               "network_overrides": [{"iface_id": "eth0", "host_dev_name": "bg-tap1"}],
               "vsock_override": {"uds_path": cfg2.run_dir.join(VSOCK_UDS)},
               "clock_realtime": true})
    );
    backend.stop(&restored, Duration::ZERO).await.unwrap();
    backend.stop(&handle, Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_refused_snapshot_resumes_the_guest_and_leaves_no_files() {
    let fx = fixture("fc-snap-fail");
    let fake = Arc::new(FakeFirecracker {
        behaviour: Behaviour {
            fail_put: Some(("/snapshot/create", "No space left on device (os error 28)")),
            crash_script: None,
        },
        ..Default::default()
    });
    let backend = FirecrackerBackend::with_launcher("firecracker".into(), fake.clone());
    let handle = backend.start(&fx.cfg).await.unwrap();
    let _guards = guard_all(&fake);
    let snap = fx.cfg.run_dir.parent().unwrap().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let paths = SnapshotPaths::new(&snap);
    let err = backend
        .snapshot(&handle, &paths, Box::pin(async { Ok(()) }))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "VM fc-snap-fail: Firecracker API request failed while saving the state"
    );
    assert!(
        err.report().contains("No space left on device"),
        "{}",
        err.report()
    );
    assert_eq!(
        std::fs::read_dir(&snap).unwrap().count(),
        0,
        "files left behind"
    );
    let requests = fake.requests.lock().unwrap().clone();
    let last = requests.last().unwrap();
    assert_eq!(
        (last.method.as_str(), last.path.as_str(), last.body.clone()),
        ("PATCH", "/vm", Some(json!({"state": "Resumed"})))
    );
    backend.stop(&handle, Duration::ZERO).await.unwrap();
}

#[tokio::test]
async fn a_rejected_request_aborts_start_kills_firecracker_and_reports_the_fault() {
    let fx = fixture("fc-fault");
    let fake = Arc::new(FakeFirecracker {
        behaviour: Behaviour {
            fail_put: Some((
                "/boot-source",
                "Invalid kernel path: No such file or directory",
            )),
            crash_script: None,
        },
        ..Default::default()
    });
    let backend = FirecrackerBackend::with_launcher("firecracker".into(), fake.clone());
    let err = backend.start(&fx.cfg).await.unwrap_err();
    let _guards = guard_all(&fake);
    assert_eq!(
        err.report(),
        "VM fc-fault: Firecracker API request failed while setting the kernel and its command \
         line: PUT /boot-source: Firecracker answered 400 Bad Request: Invalid kernel path: \
         No such file or directory"
    );
    let (_, spawned) = fake.spawned.lock().unwrap()[0];
    assert!(
        !process::is_alive(spawned.pid, spawned.start_time),
        "Firecracker left running"
    );
    // Nothing after the failed request was sent.
    let last = fake.requests.lock().unwrap().last().cloned().unwrap();
    assert_eq!(last.path, "/boot-source");
}

#[tokio::test]
async fn firecracker_exiting_during_start_reports_status_and_console_tail() {
    let fx = fixture("fc-crash");
    let fake = Arc::new(FakeFirecracker {
        behaviour: Behaviour {
            fail_put: None,
            crash_script: Some("echo 'Error: cannot open /dev/kvm' >&2; exit 3"),
        },
        ..Default::default()
    });
    let backend = FirecrackerBackend::with_launcher("firecracker".into(), fake.clone());
    let err = backend.start(&fx.cfg).await.unwrap_err();
    let _guards = guard_all(&fake);
    let msg = err.report();
    assert!(
        msg.starts_with("VM fc-crash: firecracker exited during start-up (exit status 3)"),
        "{msg}"
    );
    assert!(msg.contains("Error: cannot open /dev/kvm"), "{msg}");
}

#[test]
fn every_request_model_with_every_field_set_conforms() {
    let spec = Spec::firecracker();
    let mut problems = Vec::new();
    let mut check = |path: &str, body: Value| {
        problems.extend(spec.check_request("PUT", path, Some(&body)));
    };
    check(
        "/machine-config",
        serde_json::to_value(MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 512,
            smt: Some(false),
            track_dirty_pages: Some(true),
            huge_pages: Some(HugePages::TwoMiB),
        })
        .unwrap(),
    );
    check(
        "/boot-source",
        serde_json::to_value(BootSource {
            kernel_image_path: "/k".into(),
            initrd_path: Some("/i".into()),
            boot_args: Some("console=ttyS0".into()),
        })
        .unwrap(),
    );
    check(
        "/drives/d",
        serde_json::to_value(Drive {
            drive_id: "d".into(),
            path_on_host: "/d".into(),
            is_root_device: false,
            is_read_only: Some(true),
            partuuid: Some("0eaa91a0-01".into()),
            cache_type: Some(CacheType::Unsafe),
            io_engine: Some(IoEngine::Async),
        })
        .unwrap(),
    );
    check(
        "/network-interfaces/eth0",
        serde_json::to_value(NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: Some("06:00:00:00:00:01".into()),
            mtu: Some(1500),
        })
        .unwrap(),
    );
    check(
        "/vsock",
        serde_json::to_value(Vsock {
            guest_cid: 3,
            uds_path: "/v.sock".into(),
        })
        .unwrap(),
    );
    for level in [
        LogLevel::Error,
        LogLevel::Warning,
        LogLevel::Info,
        LogLevel::Debug,
        LogLevel::Trace,
        LogLevel::Off,
    ] {
        check(
            "/logger",
            serde_json::to_value(Logger {
                log_path: Some("/l".into()),
                level: Some(level),
                show_level: Some(true),
                show_log_origin: Some(true),
                module: Some("api_server".into()),
            })
            .unwrap(),
        );
    }
    for action_type in [
        ActionType::InstanceStart,
        ActionType::SendCtrlAltDel,
        ActionType::FlushMetrics,
    ] {
        check(
            "/actions",
            serde_json::to_value(InstanceActionInfo { action_type }).unwrap(),
        );
    }
    check(
        "/machine-config",
        serde_json::to_value(MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: None,
            track_dirty_pages: None,
            huge_pages: Some(HugePages::None),
        })
        .unwrap(),
    );
    for snapshot_type in [SnapshotType::Full, SnapshotType::Diff] {
        check(
            "/snapshot/create",
            serde_json::to_value(SnapshotCreateParams {
                mem_file_path: "/s/vm.mem".into(),
                snapshot_path: "/s/vm.state".into(),
                snapshot_type: Some(snapshot_type),
            })
            .unwrap(),
        );
    }
    for backend_type in [MemoryBackendType::File, MemoryBackendType::Uffd] {
        check(
            "/snapshot/load",
            serde_json::to_value(SnapshotLoadParams {
                snapshot_path: "/s/vm.state".into(),
                mem_backend: Some(MemoryBackend {
                    backend_type,
                    backend_path: "/s/vm.mem".into(),
                }),
                resume_vm: Some(false),
                network_overrides: vec![NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: "tap1".into(),
                }],
                vsock_override: Some(VsockOverride {
                    uds_path: "/r/v.sock".into(),
                }),
                track_dirty_pages: Some(true),
                clock_realtime: Some(false),
            })
            .unwrap(),
        );
    }
    for state in [VmState::Paused, VmState::Resumed] {
        problems.extend(spec.check_request(
            "PATCH",
            "/vm",
            Some(&serde_json::to_value(Vm { state }).unwrap()),
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[tokio::test]
async fn client_reads_typed_responses_and_fault_messages() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let log = Arc::new(Mutex::new(Vec::new()));
    let _server = FakeServer::start(
        &sock,
        log.clone(),
        Behaviour {
            fail_put: Some(("/vsock", "vsock already configured")),
            crash_script: None,
        },
    );
    let client = FirecrackerClient::new(&sock);
    let info = client.describe_instance().await.unwrap();
    assert_eq!(info.state, "Not started");
    let err = client
        .put_vsock(&Vsock {
            guest_cid: 3,
            uds_path: "/v".into(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ApiError::Fault { status, fault_message, .. }
            if status.as_u16() == 400 && fault_message == "vsock already configured"),
        "{err}"
    );
    let err = FirecrackerClient::new(dir.path().join("missing.sock"))
        .describe_instance()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing.sock"), "{err}");
}

/// Runs the create/start sequence against a real `firecracker` binary's API server. Guests
/// cannot boot without hardware KVM, so `InstanceStart` may fail; every configuration request
/// before it must succeed. Run with `cargo test -p banger-vmm -- --ignored`.
#[tokio::test]
#[ignore = "needs a `firecracker` binary on PATH (not installed on the development host)"]
async fn real_firecracker_accepts_the_configuration_sequence() {
    let binary = crate::host::find_in_path(
        std::ffi::OsStr::new("firecracker"),
        std::env::var_os("PATH").as_deref(),
    )
    .unwrap_or_else(|| {
        panic!(
            "NOT RUN: no `firecracker` binary on PATH; this test checks banger's requests \
             against a real Firecracker API server. Put a release binary on PATH and rerun."
        )
    });
    let fx = fixture("fc-real");
    let cfg = &fx.cfg;
    let files = Files::new(&cfg.run_dir);
    std::fs::write(&files.log, b"").unwrap();
    let spawned = process::spawn_detached(&SpawnSpec {
        program: binary,
        args: vec!["--api-sock".into(), files.api_socket.clone().into()],
        log: cfg.console_log.clone(),
        log_mode: LogMode::Append,
        pid_file: files.pid_file.clone(),
        cwd: Some(cfg.run_dir.clone()),
    })
    .unwrap();
    let _guard = ProcessGuard::new(spawned.pid, spawned.start_time);
    let client = FirecrackerClient::new(&files.api_socket);
    wait_ready(cfg, spawned, &client, &files).await.unwrap();
    let mut cfg = cfg.clone();
    // Firecracker checks that the tap exists; leave networking out of the real run.
    cfg.net = None;
    configure(&client, &cfg, &files).await.unwrap();
    println!("version: {:?}", client.version().await);
    println!("machine-config: {:?}", client.machine_config().await);
    println!(
        "InstanceStart (may fail without hardware KVM): {:?}",
        client.action(ActionType::InstanceStart).await
    );
}
