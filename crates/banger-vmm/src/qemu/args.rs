//! The `qemu-system-x86_64` command line for a [`VmConfig`], built as a pure function of the
//! config and a few host facts so it can be checked without running QEMU.
//!
//! Machine: `microvm` with ACPI on, because the Debian cloud kernel finds virtio-mmio devices
//! through ACPI and has no `virtio_mmio.device=` command-line support. Devices are
//! `virtio-*-device` (MMIO), each disk with a `serial=` so the guest can also find it as
//! `/dev/disk/by-id/virtio-banger-root|work`. Values inside QEMU option lists have their commas
//! doubled, QEMU's own escape, so a path with a comma cannot inject options.
//!
//! A restore runs the very same command line plus `-incoming defer`: QEMU loads a saved state
//! only into a machine with the same devices in the same order, so there is one builder and the
//! restore cannot drift from the boot.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::{VmConfig, AGENT_SERIAL_PORT_NAME};

/// `-sandbox` value: every restriction QEMU offers.
pub(crate) const SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// How QEMU executes guest code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware KVM.
    Kvm,
    /// Software emulation (no usable hardware KVM).
    Tcg,
}

/// Which channel the guest agent gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AgentChannel {
    /// `virtserialport` backed by a listening Unix socket on the host.
    VirtioSerial { socket: PathBuf },
    /// `vhost-vsock-device` with this guest CID.
    Vsock { cid: u32 },
}

/// Host facts and per-VM paths the command line depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub accel: Accel,
    pub agent: AgentChannel,
    pub qmp_socket: PathBuf,
    /// `/dev/vhost-net` exists (used only with KVM).
    pub vhost_net: bool,
    /// Host TSC frequency, handed to TCG guests (see `build_args`).
    pub tsc_khz: Option<u64>,
    /// Wait for a saved state over QMP (`migrate-incoming`) instead of booting the kernel.
    pub incoming: bool,
}

impl Plan {
    /// The part of the device layout a saved state depends on beyond vCPUs, memory and the
    /// network interface, as a snapshot's manifest records it.
    pub(crate) fn layout(&self) -> String {
        layout(self.accel, matches!(self.agent, AgentChannel::Vsock { .. }))
    }
}

/// See [`Plan::layout`]; also computed from a running VM's handle.
pub(crate) fn layout(accel: Accel, vsock: bool) -> String {
    let accel = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
    };
    let agent = if vsock { "vsock" } else { "virtio-serial" };
    format!("qemu microvm accel={accel} agent={agent}")
}

/// Doubles commas: QEMU's escape inside `key=value,key=value` option lists.
pub(crate) fn escape(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// Builds `"{prefix}{escaped value}{suffix}"`.
fn opt(prefix: &str, value: &OsStr, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape(value));
    s.push(suffix);
    s
}

pub(crate) fn build_args(cfg: &VmConfig, plan: &Plan) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&dyn AsRef<OsStr>]| {
        for i in items {
            a.push(i.as_ref().to_os_string());
        }
    };

    // Under TCG the guest kernel cannot calibrate its TSC without the legacy PIT (and PIC it
    // routes through): with microvm's defaults it hangs at "Marking TSC unstable". KVM has
    // in-kernel timers and keeps microvm's defaults.
    let (accel, cpu, legacy) = match plan.accel {
        Accel::Kvm => ("kvm", "host", ""),
        Accel::Tcg => ("tcg", "max", ",pit=on,pic=on"),
    };
    push(&[&"-name", &opt("", OsStr::new(&cfg.name), "")]);
    push(&[&"-M", &format!("microvm,accel={accel},acpi=on{legacy}")]);
    push(&[&"-cpu", &cpu]);
    push(&[&"-m", &format!("{}M", cfg.memory_mib)]);
    push(&[&"-smp", &cfg.vcpus.to_string()]);
    push(&[
        &"-nodefaults",
        &"-no-user-config",
        &"-display",
        &"none",
        &"-no-reboot",
        &"-msg",
        &"timestamp=on",
    ]);
    // QEMU's seccomp filter: a guest that escapes into QEMU cannot run programs, gain privileges,
    // change scheduling or use obsolete system calls. Nothing banger asks of QEMU needs them
    // (taps are opened by name, state is saved to a file, never through `exec:`).
    push(&[&"-sandbox", &SANDBOX]);

    push(&[&"-kernel", &cfg.kernel]);
    if let Some(initrd) = &cfg.initrd {
        push(&[&"-initrd", initrd]);
    }
    // A TCG guest calibrates its TSC against the emulated PIT within a few milliseconds; on a
    // busy host that measurement fails, the kernel marks the TSC unstable and hangs with no
    // other clock source. TCG's TSC is the host's, so telling the guest its rate avoids the race.
    let kernel_args = match (plan.accel, plan.tsc_khz) {
        (Accel::Tcg, Some(khz)) => format!("{} tsc_early_khz={khz}", cfg.kernel_args),
        _ => cfg.kernel_args.clone(),
    };
    push(&[&"-append", &kernel_args]);

    push(&[
        &"-chardev",
        &opt(
            "file,id=console,path=",
            cfg.console_log.as_os_str(),
            ",append=on",
        ),
        &"-serial",
        &"chardev:console",
    ]);

    for (id, disk) in [("root", &cfg.root_disk), ("work", &cfg.work_disk)] {
        push(&[
            &"-drive",
            &opt(
                &format!("if=none,id={id},file="),
                disk.as_os_str(),
                ",format=raw,cache=writeback,discard=unmap",
            ),
            &"-device",
            &format!("virtio-blk-device,drive={id},serial=banger-{id}"),
        ]);
    }

    if let Some(net) = &cfg.net {
        let vhost = if plan.vhost_net && plan.accel == Accel::Kvm {
            ",vhost=on"
        } else {
            ""
        };
        push(&[
            &"-netdev",
            &opt(
                "tap,id=net0,ifname=",
                OsStr::new(net.tap.as_str()),
                &format!(",script=no,downscript=no{vhost}"),
            ),
            &"-device",
            &opt(
                "virtio-net-device,netdev=net0,mac=",
                OsStr::new(&net.mac.to_string()),
                "",
            ),
        ]);
    }

    match &plan.agent {
        AgentChannel::Vsock { cid } => {
            push(&[&"-device", &format!("vhost-vsock-device,guest-cid={cid}")]);
        }
        AgentChannel::VirtioSerial { socket } => push(&[
            &"-device",
            &"virtio-serial-device",
            &"-chardev",
            &opt(
                "socket,id=agent,path=",
                socket.as_os_str(),
                ",server=on,wait=off",
            ),
            &"-device",
            &format!("virtserialport,chardev=agent,name={AGENT_SERIAL_PORT_NAME}"),
        ]),
    }

    push(&[
        &"-chardev",
        &opt(
            "socket,id=qmp,path=",
            plan.qmp_socket.as_os_str(),
            ",server=on,wait=off",
        ),
        &"-mon",
        &"chardev=qmp,mode=control",
    ]);
    if plan.incoming {
        push(&[&"-incoming", &"defer"]);
    }
    a
}

/// Renders arguments as one shell-like line, for logs and error messages.
pub(crate) fn display(program: &Path, args: &[OsString]) -> String {
    let mut out = program.display().to_string();
    for arg in args {
        let s = arg.to_string_lossy();
        if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            out.push_str(&format!(" '{}'", s.replace('\'', r"'\''")));
        } else {
            out.push(' ');
            out.push_str(&s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Nic;

    fn cfg() -> VmConfig {
        VmConfig {
            name: "sandbox".into(),
            vcpus: 2,
            memory_mib: 1024,
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd.img".into()),
            kernel_args: "console=ttyS0 root=/dev/vda rw banger.ip=172.16.0.2".into(),
            root_disk: "/vms/sandbox/root.ext4".into(),
            work_disk: "/vms/sandbox/work.ext4".into(),
            net: Some(Nic {
                tap: banger_net::TapName::parse("bg-tap0").unwrap(),
                mac: "06:00:ac:10:00:02".parse().unwrap(),
            }),
            vsock_cid: None,
            run_dir: "/run/banger/sandbox".into(),
            console_log: "/vms/sandbox/console.log".into(),
        }
    }

    fn plan(accel: Accel) -> Plan {
        Plan {
            accel,
            agent: AgentChannel::VirtioSerial {
                socket: "/run/banger/sandbox/agent.sock".into(),
            },
            qmp_socket: "/run/banger/sandbox/qmp.sock".into(),
            vhost_net: true,
            tsc_khz: None,
            incoming: false,
        }
    }

    fn line(cfg: &VmConfig, plan: &Plan) -> String {
        display(Path::new("qemu-system-x86_64"), &build_args(cfg, plan))
    }

    #[test]
    fn tcg_command_line() {
        assert_eq!(
            line(&cfg(), &plan(Accel::Tcg)),
            "qemu-system-x86_64 -name sandbox -M microvm,accel=tcg,acpi=on,pit=on,pic=on -cpu max -m 1024M \
             -smp 2 -nodefaults -no-user-config -display none -no-reboot -msg timestamp=on \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
             -kernel /img/vmlinuz -initrd /img/initrd.img \
             -append 'console=ttyS0 root=/dev/vda rw banger.ip=172.16.0.2' \
             -chardev file,id=console,path=/vms/sandbox/console.log,append=on \
             -serial chardev:console \
             -drive if=none,id=root,file=/vms/sandbox/root.ext4,format=raw,cache=writeback,discard=unmap \
             -device virtio-blk-device,drive=root,serial=banger-root \
             -drive if=none,id=work,file=/vms/sandbox/work.ext4,format=raw,cache=writeback,discard=unmap \
             -device virtio-blk-device,drive=work,serial=banger-work \
             -netdev tap,id=net0,ifname=bg-tap0,script=no,downscript=no \
             -device virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02 \
             -device virtio-serial-device \
             -chardev socket,id=agent,path=/run/banger/sandbox/agent.sock,server=on,wait=off \
             -device virtserialport,chardev=agent,name=banger.agent \
             -chardev socket,id=qmp,path=/run/banger/sandbox/qmp.sock,server=on,wait=off \
             -mon chardev=qmp,mode=control"
        );
    }

    #[test]
    fn a_restore_runs_the_boot_command_line_plus_incoming_defer() {
        for accel in [Accel::Tcg, Accel::Kvm] {
            let boot = build_args(&cfg(), &plan(accel));
            let mut p = plan(accel);
            p.incoming = true;
            let mut restore = build_args(&cfg(), &p);
            assert_eq!(
                restore.split_off(boot.len()),
                [OsString::from("-incoming"), OsString::from("defer")]
            );
            assert_eq!(restore, boot);
        }
    }

    #[test]
    fn kvm_uses_host_cpu_and_vhost_net() {
        let l = line(&cfg(), &plan(Accel::Kvm));
        assert!(
            l.contains(" -M microvm,accel=kvm,acpi=on -cpu host "),
            "{l}"
        );
        assert!(l.contains("script=no,downscript=no,vhost=on "), "{l}");
    }

    #[test]
    fn vhost_net_is_not_used_under_tcg() {
        assert!(!line(&cfg(), &plan(Accel::Tcg)).contains("vhost=on"));
    }

    #[test]
    fn vsock_replaces_the_serial_port() {
        let mut p = plan(Accel::Kvm);
        p.agent = AgentChannel::Vsock { cid: 42 };
        let l = line(&cfg(), &p);
        assert!(
            l.contains(" -device vhost-vsock-device,guest-cid=42 "),
            "{l}"
        );
        assert!(!l.contains("virtserialport"), "{l}");
    }

    #[test]
    fn optional_parts_are_left_out() {
        let mut c = cfg();
        c.initrd = None;
        c.net = None;
        let l = line(&c, &plan(Accel::Tcg));
        assert!(!l.contains("-initrd"), "{l}");
        assert!(!l.contains("-netdev"), "{l}");
        assert!(!l.contains("virtio-net-device"), "{l}");
    }

    #[test]
    fn commas_in_paths_are_escaped_not_option_separators() {
        let mut c = cfg();
        c.root_disk = "/vms/a,format=qcow2/root.ext4".into();
        let args = build_args(&c, &plan(Accel::Tcg));
        assert!(args.contains(&OsString::from(
            "if=none,id=root,file=/vms/a,,format=qcow2/root.ext4,format=raw,cache=writeback,discard=unmap"
        )));
        // The kernel command line is not an option list and stays as it is.
        c.kernel_args = "a=b,c".into();
        let args = build_args(&c, &plan(Accel::Tcg));
        assert!(args.contains(&OsString::from("a=b,c")));
    }
}
