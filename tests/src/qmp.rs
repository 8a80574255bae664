//! A test's own look into a QEMU, through its second monitor socket: the one vmhostd holds
//! only while it migrates the VM. One command at a time, synchronous, and the socket closes
//! when the monitor is dropped, so a test never keeps that monitor from vmhostd for longer
//! than a command.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub struct Monitor {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The names of the events read while waiting for replies.
    pub events: Vec<String>,
}

impl Monitor {
    /// Connects and negotiates. While vmhostd holds the monitor, QEMU does not greet a
    /// second client, and this fails after `timeout`.
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Monitor, String> {
        let failed = |e: std::io::Error| format!("QMP at {}: {e}", socket.display());
        let stream = UnixStream::connect(socket).map_err(failed)?;
        stream.set_read_timeout(Some(timeout)).map_err(failed)?;
        stream.set_write_timeout(Some(timeout)).map_err(failed)?;
        let mut monitor = Monitor {
            reader: BufReader::new(stream.try_clone().map_err(failed)?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = monitor.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("no QMP greeting: {greeting:?}"));
        }
        monitor.execute("qmp_capabilities", json!({}))?;
        Ok(monitor)
    }

    /// Runs one command and returns what it returned.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|e| format!("{command}: {e}"))?;
        loop {
            let line = self.line()?;
            let mut reply: Value = serde_json::from_str(&line)
                .map_err(|e| format!("{command}: unreadable reply {line:?}: {e}"))?;
            if let Some(event) = reply["event"].as_str() {
                self.events.push(event.to_string());
            } else if let Some(error) = reply.get("error") {
                return Err(format!("{command}: {error}"));
            } else if let Some(result) = reply.get_mut("return") {
                return Ok(result.take());
            }
        }
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QEMU closed the monitor".into()),
            Ok(_) => Ok(line),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }
}
