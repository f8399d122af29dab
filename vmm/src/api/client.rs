//! `vmm remote --api-socket PATH <command>`: the client of the control API (like cloud-hypervisor's
//! `ch-remote`). It sends one request, prints the result as pretty JSON on stdout (one field per line, so
//! shell scripts can grep it) and exits 0; on an error reply it prints the error on stderr and exits 1.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};

use super::{Reply, Request};

/// Arguments of `vmm remote`.
#[derive(Debug, Args)]
pub struct RemoteArgs {
    /// The VMM's API socket (its --api-socket).
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,

    /// What to ask.
    #[command(subcommand)]
    pub command: RemoteCommand,
}

/// The requests `vmm remote` can send.
#[derive(Debug, Subcommand)]
pub enum RemoteCommand {
    /// Plug a host PCI device into the running guest: `path=/sys/bus/pci/devices/<BDF>[,id=NAME]`.
    /// A parked device is plugged again.
    AddDevice {
        /// `path=/sys/bus/pci/devices/<BDF>[,id=NAME]`.
        spec: String,
    },
    /// Unplug a device: the guest ejects it, then it is parked (blocked DMA, still held by the VMM).
    RemoveDevice {
        /// Its id (see list-devices) or BDF.
        id: String,
        /// Seconds to wait for the guest to eject it.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// List the passthrough devices and their state (plugged, unplugging, parked).
    ListDevices,
    /// VM and VMM counters (fds, RSS, VFIO map/unmap counters, containers, slots, GSIs).
    Info,
    /// Test command: the VMM drives the NIC's TX ring itself and reports whether its DMA went through.
    DmaTest {
        /// Its id or BDF.
        id: String,
        /// Run even though the guest has bus mastering on.
        #[arg(long)]
        force: bool,
    },
    /// Check that the VMM answers.
    Ping,
    /// Send one raw request line (for testing the protocol).
    Raw {
        /// The line to send, as is.
        line: String,
    },
}

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket could not be reached.
    #[error("cannot connect to {path}: {source}. Is the VMM running with --api-socket {path}?")]
    Connect {
        /// The socket.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Sending or receiving failed.
    #[error("talking to the VMM: {0}")]
    Io(#[from] std::io::Error),
    /// The VMM closed the connection without a reply.
    #[error("the VMM closed the connection without replying")]
    NoReply,
    /// The reply is not JSON.
    #[error("the VMM's reply is not JSON ({0})")]
    BadReply(String),
    /// A bad `add-device` argument.
    #[error("add-device: {0}")]
    Spec(String),
    /// The VMM refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Parses `path=...[,id=...]` (a bare path is accepted too).
pub fn parse_add_spec(s: &str) -> Result<Request, Error> {
    let mut path = None;
    let mut id = None;
    for part in s.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some(("path", v)) if !v.is_empty() => path = Some(v.to_string()),
            Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
            None if part.starts_with('/') => path = Some(part.to_string()),
            _ => {
                return Err(Error::Spec(format!(
                    "'{part}' not understood; expected path=/sys/bus/pci/devices/<BDF>[,id=NAME]"
                )))
            }
        }
    }
    let path =
        path.ok_or_else(|| Error::Spec("missing path=/sys/bus/pci/devices/<BDF>".to_string()))?;
    Ok(Request::AddDevice { path, id })
}

/// Sends one line and reads the reply.
pub fn send_line(socket: &std::path::Path, line: &str, wait: Duration) -> Result<Reply, Error> {
    let s = UnixStream::connect(socket).map_err(|source| Error::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    s.set_read_timeout(Some(wait))?;
    let mut w = s.try_clone()?;
    let sent = w
        .write_all(line.trim_end_matches('\n').as_bytes())
        .and_then(|()| w.write_all(b"\n"))
        .and_then(|()| w.flush());
    // To a line longer than it reads, the VMM replies with an error and closes at once: our write may
    // then fail (broken pipe), but the reply is there to read, and it says more than the write error.
    let mut reply = String::new();
    match (BufReader::new(s).read_line(&mut reply), sent) {
        (Ok(n), _) if n > 0 => {
            serde_json::from_str(reply.trim()).map_err(|e| Error::BadReply(e.to_string()))
        }
        (_, Err(e)) => Err(e.into()),
        (Ok(_), Ok(())) => Err(Error::NoReply),
        (Err(e), Ok(())) => Err(e.into()),
    }
}

/// Sends `req` and returns its result, or the VMM's error as [`Error::Refused`].
pub fn request(socket: &std::path::Path, req: &Request) -> Result<serde_json::Value, Error> {
    let wait = match req {
        Request::RemoveDevice { timeout_secs, .. } => {
            Duration::from_secs(timeout_secs.unwrap_or(60).saturating_add(60))
        }
        _ => Duration::from_secs(120),
    };
    let line = serde_json::to_string(req).map_err(|e| Error::Spec(e.to_string()))?;
    let r = send_line(socket, &line, wait)?;
    if r.ok {
        Ok(r.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(Error::Refused(
            r.error.unwrap_or_else(|| "refused without a reason".into()),
        ))
    }
}

/// Runs `vmm remote`.
pub fn run(args: &RemoteArgs) -> Result<ExitCode, Error> {
    let req = match &args.command {
        RemoteCommand::AddDevice { spec } => parse_add_spec(spec)?,
        RemoteCommand::RemoveDevice { id, timeout } => Request::RemoveDevice {
            id: id.clone(),
            timeout_secs: *timeout,
        },
        RemoteCommand::ListDevices => Request::ListDevices,
        RemoteCommand::Info => Request::Info,
        RemoteCommand::DmaTest { id, force } => Request::DmaTest {
            id: id.clone(),
            force: *force,
        },
        RemoteCommand::Ping => Request::Ping,
        RemoteCommand::Raw { line } => {
            let r = send_line(&args.api_socket, line, Duration::from_secs(120))?;
            println!("{}", r.to_line().trim_end());
            return Ok(if r.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
    };
    let result = request(&args.api_socket, &req)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&result).unwrap_or_else(|_| result.to_string())
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_specs() {
        assert_eq!(
            parse_add_spec("path=/sys/bus/pci/devices/0000:00:02.0,id=nic0").unwrap(),
            Request::AddDevice {
                path: "/sys/bus/pci/devices/0000:00:02.0".into(),
                id: Some("nic0".into())
            }
        );
        assert_eq!(
            parse_add_spec("/sys/x").unwrap(),
            Request::AddDevice {
                path: "/sys/x".into(),
                id: None
            }
        );
        assert!(parse_add_spec("id=x").is_err());
        assert!(parse_add_spec("path=/a,bogus=1").is_err());
        assert!(parse_add_spec("").is_err());
    }

    #[test]
    fn connecting_to_nothing_says_what_to_check() {
        let e = request(
            std::path::Path::new("/nonexistent/iovmm.sock"),
            &Request::Ping,
        )
        .unwrap_err();
        assert!(e.to_string().contains("--api-socket"), "{e}");
    }

    struct Pong;

    impl crate::api::Backend for Pong {
        fn handle(&mut self, _: Request) -> Reply {
            Reply::ok(serde_json::json!("pong"))
        }
    }

    #[test]
    fn an_over_long_line_gets_the_vmms_error_reply_not_a_broken_pipe() {
        let dir = std::env::temp_dir().join(format!("iovmm-client-test-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("api.sock");
        let server = crate::api::ApiServer::start(&path, Pong).unwrap();
        // Large enough that the write is still going when the server stops reading and closes.
        let line = "x".repeat(4 * crate::api::MAX_LINE);
        for _ in 0..20 {
            let r = send_line(&path, &line, Duration::from_secs(10)).unwrap();
            assert!(!r.ok);
            assert!(r.error.unwrap_or_default().contains("longer than"));
        }
        assert!(
            send_line(&path, r#"{"command":"ping"}"#, Duration::from_secs(10))
                .unwrap()
                .ok
        );
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
