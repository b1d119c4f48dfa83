//! Test helpers. For other crates (feature `testkit`): [`FakeVmm`], a [`crate::Vmm`] that runs
//! nothing, so the daemon's lifecycle is tested without a guest. For this crate's own tests:
//! Drop guards that kill processes a test started, and a tiny bootable "kernel" so QEMU can run
//! a real guest on a host that has no Linux guest kernel.

#[cfg(test)]
use std::path::Path;

#[cfg(test)]
use crate::process;

mod fake_vmm;

pub use fake_vmm::{FakeCall, FakeVmm, GuestAgent};

/// Kills (pid, start time) on drop if it still runs, and reaps it if it is our child.
#[cfg(test)]
pub(crate) struct ProcessGuard {
    pid: i32,
    start_time: u64,
}

#[cfg(test)]
impl ProcessGuard {
    pub(crate) fn new(pid: i32, start_time: u64) -> ProcessGuard {
        ProcessGuard { pid, start_time }
    }
}

#[cfg(test)]
impl Drop for ProcessGuard {
    fn drop(&mut self) {
        if process::is_alive(self.pid, self.start_time) {
            let _ = process::signal(self.pid, self.start_time, libc::SIGKILL);
        }
        for _ in 0..500 {
            if process::exit_status_if_gone(self.pid, self.start_time).is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Whether process `pid` holds `file` open with `O_APPEND` (from `/proc/PID/fdinfo`): what
/// lets the daemon truncate a VMM's console log under it (see bangerd's `console_log`).
#[cfg(test)]
pub(crate) fn holds_open_for_append(pid: i32, file: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok)
        .filter(|fd| std::fs::read_link(fd.path()).is_ok_and(|target| target == file))
        .any(|fd| {
            let info = std::fs::read_to_string(format!(
                "/proc/{pid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                .is_some_and(|flags| flags & libc::O_APPEND as u32 != 0)
        })
}

/// The line the test kernel prints on the serial port.
#[cfg(test)]
pub(crate) const TEST_KERNEL_GREETING: &str = "banger-test-kernel: hello";

/// Writes a minimal x86 guest that QEMU's microvm boots as a PVH ELF: it prints
/// [`TEST_KERNEL_GREETING`] on COM1 and halts. It does not answer ACPI, so a graceful stop
/// of it always ends in SIGKILL.
///
/// Layout: ELF64 header, a PT_LOAD of the code at 1 MiB, and a PT_NOTE holding the Xen
/// `PHYS32_ENTRY` note that marks the 32-bit, paging-off PVH entry point.
#[cfg(test)]
pub(crate) fn write_test_kernel(path: &Path) {
    write_kernel(path, false);
}

/// Like [`write_test_kernel`], but after the greeting it counts for ever: each line on COM1 is
/// the next value of a 32-bit counter in 8 hex digits, with a busy-wait between lines (tens of
/// milliseconds under TCG). A restored guest goes on counting from where it was saved; a
/// rebooted one would greet again and start at 0.
#[cfg(test)]
pub(crate) fn write_counting_test_kernel(path: &Path) {
    write_kernel(path, true);
}

/// The counter lines a counting test kernel printed, in order (the greeting left out).
#[cfg(test)]
pub(crate) fn counter_lines(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter(|l| l.len() == 8)
        .filter_map(|l| u32::from_str_radix(l, 16).ok())
        .collect()
}

#[cfg(test)]
fn write_kernel(path: &Path, count: bool) {
    const LOAD: u32 = 0x10_0000;
    const CODE_OFFSET: usize = 0x1000;

    let mut msg = TEST_KERNEL_GREETING.as_bytes().to_vec();
    msg.extend_from_slice(b"\n\0");
    let mut code: Vec<u8> = Vec::new();
    code.push(0xBE); // mov esi, imm32 (message address, patched below)
    code.extend_from_slice(&[0; 4]);
    code.extend_from_slice(&[0x66, 0xBA, 0xF8, 0x03]); // mov dx, 0x3f8
    let print = code.len();
    code.push(0xAC); // lodsb
    code.extend_from_slice(&[0x84, 0xC0]); // test al, al
    code.extend_from_slice(&[0x74, 0x03]); // jz done
    code.push(0xEE); // out dx, al
    let back = print as i64 - (code.len() as i64 + 2);
    code.extend_from_slice(&[0xEB, back as i8 as u8]); // jmp print
    let mut hex_at = None;
    if count {
        // done: edi counts; each round prints it as 8 hex digits and a newline, then waits.
        code.extend_from_slice(&[0x31, 0xFF]); // xor edi, edi
        let round = code.len();
        code.extend_from_slice(&[0xB9, 8, 0, 0, 0]); // mov ecx, 8
        code.extend_from_slice(&[0x89, 0xFB]); // mov ebx, edi
        let digit = code.len();
        code.extend_from_slice(&[0xC1, 0xC3, 0x04]); // rol ebx, 4
        code.extend_from_slice(&[0x89, 0xD8]); // mov eax, ebx
        code.extend_from_slice(&[0x83, 0xE0, 0x0F]); // and eax, 0xf
        code.extend_from_slice(&[0x8A, 0x80]); // mov al, [eax + hex]
        hex_at = Some(code.len());
        code.extend_from_slice(&[0; 4]);
        code.push(0xEE); // out dx, al
        code.push(0x49); // dec ecx
        let back = digit as i64 - (code.len() as i64 + 2);
        code.extend_from_slice(&[0x75, back as i8 as u8]); // jnz digit
        code.extend_from_slice(&[0xB0, 0x0A, 0xEE]); // mov al, '\n'; out dx, al
        code.push(0x47); // inc edi
        code.push(0xB9); // mov ecx, delay
        code.extend_from_slice(&0x0400_0000u32.to_le_bytes());
        code.extend_from_slice(&[0x49, 0x75, 0xFD]); // wait: dec ecx; jnz wait
        let back = round as i64 - (code.len() as i64 + 2);
        code.extend_from_slice(&[0xEB, back as i8 as u8]); // jmp round
    } else {
        let halt = code.len();
        code.extend_from_slice(&[0xFA, 0xF4]); // cli; hlt
        let back = halt as i64 - (code.len() as i64 + 2);
        code.extend_from_slice(&[0xEB, back as i8 as u8]); // jmp halt
    }
    let msg_addr = LOAD + code.len() as u32;
    code[1..5].copy_from_slice(&msg_addr.to_le_bytes());
    code.extend_from_slice(&msg);
    if let Some(at) = hex_at {
        let hex_addr = LOAD + code.len() as u32;
        code[at..at + 4].copy_from_slice(&hex_addr.to_le_bytes());
        code.extend_from_slice(b"0123456789abcdef");
    }

    let mut note = Vec::new();
    note.extend_from_slice(&4u32.to_le_bytes()); // namesz
    note.extend_from_slice(&8u32.to_le_bytes()); // descsz
    note.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&u64::from(LOAD).to_le_bytes());

    let (ehsize, phentsize, phnum) = (64u16, 56u16, 2u16);
    let note_offset = u64::from(ehsize) + u64::from(phentsize) * u64::from(phnum);
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV ABI
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&u64::from(LOAD).to_le_bytes()); // e_entry
    f.extend_from_slice(&u64::from(ehsize).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for v in [ehsize, phentsize, phnum, 0, 0, 0] {
        f.extend_from_slice(&v.to_le_bytes());
    }
    let phdr =
        |f: &mut Vec<u8>, ty: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
            for v in [ty, flags] {
                f.extend_from_slice(&v.to_le_bytes());
            }
            for v in [off, addr, addr, size, size, align] {
                f.extend_from_slice(&v.to_le_bytes());
            }
        };
    let code_len = code.len() as u64;
    phdr(
        &mut f,
        1,
        5,
        CODE_OFFSET as u64,
        u64::from(LOAD),
        code_len,
        0x1000,
    ); // PT_LOAD r-x
    phdr(&mut f, 4, 4, note_offset, 0, note.len() as u64, 4); // PT_NOTE
    f.extend_from_slice(&note);
    f.resize(CODE_OFFSET, 0);
    f.extend_from_slice(&code);
    std::fs::write(path, f).unwrap();
}

/// Polls `cond` every 50 ms for up to `secs` seconds.
#[cfg(test)]
pub(crate) async fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 20 {
        if cond() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    cond()
}
