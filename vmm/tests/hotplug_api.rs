//! The control API and the hotplug manager on a real KVM VM of the host (no guest runs, no VFIO device:
//! the host has none). What the rig cannot show cheaply: every request gets an answer, bad ones get
//! errors and leave the VMM serving, the guest-facing registers are on their ports, and `vmm remote`'s
//! exit codes and messages.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;

use vmm::api::{client, ApiServer, Request};
use vmm::hotplug::{Hotplug, HOTPLUG_PORT};
use vmm::memory::{self, Backing};
use vmm::vcpu::ExitHandler;
use vmm::vm::{SerialOutput, Vm};

fn socket(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("iovmm-{name}-{}.sock", std::process::id()))
}

#[test]
fn api_on_a_live_vm_answers_everything_and_survives_bad_requests() {
    let mem = memory::create(64 << 20, Backing::Anonymous { thp: false }).expect("guest memory");
    let vm = Vm::new(1, mem, SerialOutput::Off).expect("a KVM VM (is /dev/kvm usable?)");
    let hp = Hotplug::new(&vm, &[]).expect("hotplug set-up without devices");
    // The controller answers on its ports: nothing present, nothing pending.
    let mut d = [0xffu8; 4];
    vm.devices().pio_read(HOTPLUG_PORT + 0xc, &mut d);
    assert_eq!(d, [0; 4]);
    vm.devices().pio_read(HOTPLUG_PORT, &mut d);
    assert_eq!(d, [0; 4]);
    // A guest eject of slots nobody manages changes nothing.
    vm.devices()
        .pio_write(HOTPLUG_PORT + 8, &u32::MAX.to_le_bytes());

    let path = socket("hp-api");
    let server = ApiServer::start(&path, hp).expect("API server");
    let ok = |r: &Request| client::request(&path, r);
    assert_eq!(ok(&Request::Ping).unwrap(), serde_json::json!("pong"));
    assert_eq!(ok(&Request::ListDevices).unwrap(), serde_json::json!([]));
    let info = ok(&Request::Info).unwrap();
    assert_eq!(info["vfio"]["live_mapped_bytes"], 0);
    assert_eq!(info["kvm"]["msi_gsis"], 0);
    assert_eq!(info["memory_bytes"], 64 << 20);
    assert!(info["process"]["open_fds"].as_u64().unwrap_or(0) > 0);
    let e = ok(&Request::RemoveDevice {
        id: "nic9".into(),
        timeout_secs: Some(1),
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no device with id or BDF 'nic9'"), "{e}");
    let e = ok(&Request::AddDevice {
        path: "/sys/bus/pci/devices/0000:00:1f.7".into(),
        id: None,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no such device"), "{e}");
    let e = ok(&Request::DmaTest {
        id: "x".into(),
        force: false,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("no device"), "{e}");

    // Raw garbage on one connection: one error reply per line, then the server still serves.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(b"{\"command\":\n\x00\x01\n{\"command\":\"info\",\"x\":1}\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let lines: Vec<String> = BufReader::new(s).lines().map_while(Result::ok).collect();
    assert_eq!(lines.len(), 3, "{lines:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("{\"ok\":false")),
        "{lines:?}"
    );

    // Well-formed JSON the real backend must refuse before it acts: a timeout that would overflow the
    // clock, wrong types, a path with a NUL byte and one that escapes sysfs.
    let mut s = UnixStream::connect(&path).unwrap();
    s.write_all(
        concat!(
            r#"{"command":"remove-device","id":"nic0","timeout_secs":18446744073709551615}"#,
            "\n",
            r#"{"command":"dma-test","id":"nic0","force":"yes"}"#,
            "\n",
            r#"{"command":"add-device","path":"/sys/bus/pci/devices/0000:00:02.0\u0000"}"#,
            "\n",
            r#"{"command":"add-device","path":"../../../../etc"}"#,
            "\n",
        )
        .as_bytes(),
    )
    .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let lines: Vec<String> = BufReader::new(s).lines().map_while(Result::ok).collect();
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines[0].contains("more than 86400"), "{lines:?}");
    assert!(lines[1].contains("invalid type"), "{lines:?}");
    assert!(lines[2].contains("no such device"), "{lines:?}");
    assert!(lines[3].contains("not a PCI device"), "{lines:?}");
    assert!(
        lines.iter().all(|l| l.starts_with("{\"ok\":false")),
        "{lines:?}"
    );
    assert_eq!(ok(&Request::Ping).unwrap(), serde_json::json!("pong"));

    // The binary's client: exit 0 with the result on stdout, 1 with the error on stderr.
    let bin = env!("CARGO_BIN_EXE_vmm");
    let out = Command::new(bin)
        .args(["remote", "--api-socket"])
        .arg(&path)
        .arg("ping")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "\"pong\"");
    let out = Command::new(bin)
        .args(["remote", "--api-socket"])
        .arg(&path)
        .args(["remove-device", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device with id or BDF 'nope'"));
    let out = Command::new(bin)
        .args(["remote", "--api-socket"])
        .arg(&path)
        .args(["raw", "nonsense"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not JSON"));

    let hp = server.shutdown().expect("the backend comes back");
    drop(hp);
    assert!(!path.exists());
}

#[test]
fn remote_without_a_vmm_says_what_to_check() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["remote", "--api-socket", "/nonexistent/iovmm.sock", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("--api-socket"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["remote", "--api-socket", "/x", "add-device", "id=nic0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing path"));
}
