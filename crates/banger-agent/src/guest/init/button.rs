//! The ACPI power button, as PID 1 sees it: QEMU's graceful stop (`system_powerdown`) presses
//! it when the agent does not answer. In a Debian guest systemd-logind reacts; here init reads
//! the button's input device (`evdev`) itself and powers off on a press of `KEY_POWER`.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Where the kernel lists input devices.
pub const SYSFS_INPUT: &str = "/sys/class/input";
/// The name the ACPI button driver gives its devices.
const POWER_BUTTON_NAME: &str = "Power Button";

/// `struct input_event` on 64-bit Linux: a 16-byte `timeval`, then type, code, value.
pub const EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 0x01;
const KEY_POWER: u16 = 116;

/// Opens every power button's event device (non-blocking), found by name under `sysfs`
/// with its node in `dev` (`/dev/input`).
pub fn open_power_buttons(sysfs: &Path, dev: &Path) -> Vec<File> {
    let Ok(entries) = std::fs::read_dir(sysfs) else {
        return Vec::new();
    };
    let mut names: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("event"))
        .collect();
    names.sort();
    names
        .into_iter()
        .filter(|n| {
            std::fs::read_to_string(sysfs.join(n).join("device/name"))
                .is_ok_and(|name| name.trim_end() == POWER_BUTTON_NAME)
        })
        .filter_map(|n| {
            File::options()
                .read(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(dev.join(n))
                .ok()
        })
        .collect()
}

/// Whether `events` (whole `input_event` records) hold a press of the power key.
pub fn power_key_pressed(events: &[u8]) -> bool {
    events.chunks_exact(EVENT_SIZE).any(|e| {
        let u16_at = |o: usize| u16::from_ne_bytes([e[o], e[o + 1]]);
        let value = i32::from_ne_bytes([e[20], e[21], e[22], e[23]]);
        u16_at(16) == EV_KEY && u16_at(18) == KEY_POWER && value == 1
    })
}

/// Reads what is pending on a button's device; whether it was a power-key press.
pub fn read_press(device: &mut File) -> io::Result<bool> {
    let mut buf = [0u8; EVENT_SIZE * 16];
    let mut pressed = false;
    loop {
        match device.read(&mut buf) {
            Ok(0) => return Ok(pressed),
            Ok(n) => pressed |= power_key_pressed(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(pressed),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> Vec<u8> {
        let mut e = vec![0u8; 16];
        e.extend_from_slice(&kind.to_ne_bytes());
        e.extend_from_slice(&code.to_ne_bytes());
        e.extend_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn only_a_press_of_the_power_key_counts() {
        let press = event(EV_KEY, KEY_POWER, 1);
        let release = event(EV_KEY, KEY_POWER, 0);
        let sync = event(0, 0, 0);
        let other_key = event(EV_KEY, 30, 1);
        assert!(power_key_pressed(
            &[sync.clone(), press.clone(), sync.clone()].concat()
        ));
        assert!(!power_key_pressed(
            &[release, sync.clone(), other_key].concat()
        ));
        // A torn record is not read as a press.
        assert!(!power_key_pressed(&press[..EVENT_SIZE - 1]));
    }

    #[test]
    fn buttons_are_found_by_name() {
        let root = tempfile::tempdir().unwrap();
        let (sysfs, dev) = (root.path().join("class"), root.path().join("input"));
        std::fs::create_dir_all(&dev).unwrap();
        for (n, name) in [
            ("event0", "Power Button\n"),
            ("event1", "AT Keyboard\n"),
            ("mouse0", "Power Button\n"),
        ] {
            std::fs::create_dir_all(sysfs.join(n).join("device")).unwrap();
            std::fs::write(sysfs.join(n).join("device/name"), name).unwrap();
            std::fs::write(dev.join(n), "").unwrap();
        }
        assert_eq!(open_power_buttons(&sysfs, &dev).len(), 1);
        assert!(open_power_buttons(&root.path().join("none"), &dev).is_empty());
    }
}
