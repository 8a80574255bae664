//! Running Postgres's programs as the `postgres` user: initdb, and the postmaster in the
//! workload cgroup with its output in computectl's log.

use super::{Exit, Paths};
use anyhow::{bail, Context};
use nix::unistd::{Gid, Pid, Uid};
use std::collections::VecDeque;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::watch;

/// Lines of Postgres output kept for error reports.
const TAIL_LINES: usize = 10;
const TAIL_LINE_CHARS: usize = 300;
/// Longer output lines are cut: a client's failed statement can be logged whole.
const MAX_LINE_BYTES: usize = 4096;
/// vm-monitor creates the workload cgroup when it starts, which may be after computectl.
const CGROUP_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct PostgresUser {
    uid: Uid,
    gid: Gid,
}

impl PostgresUser {
    pub fn look_up() -> anyhow::Result<PostgresUser> {
        let user = nix::unistd::User::from_name("postgres")
            .context("cannot look up the user postgres")?
            .context("there is no user postgres")?;
        Ok(PostgresUser {
            uid: user.uid,
            gid: user.gid,
        })
    }

    pub fn ids(self) -> (u32, u32) {
        (self.uid.as_raw(), self.gid.as_raw())
    }
}

/// The last lines Postgres wrote.
#[derive(Debug, Default)]
pub struct LogTail(Mutex<VecDeque<String>>);

impl LogTail {
    fn push(&self, line: &str) {
        let mut lines = self.0.lock().unwrap();
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.chars().take(TAIL_LINE_CHARS).collect());
    }

    pub fn text(&self) -> String {
        let lines = self.0.lock().unwrap();
        if lines.is_empty() {
            return "(none)".into();
        }
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// Creates `dir` if needed, owned by postgres with `mode`.
pub fn ensure_dir(dir: &Path, mode: u32, user: PostgresUser) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (uid, gid) = user.ids();
    std::os::unix::fs::chown(dir, Some(uid), Some(gid))
        .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)))
        .with_context(|| format!("cannot give {} to postgres", dir.display()))
}

pub async fn wait_for_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    let deadline = tokio::time::Instant::now() + CGROUP_WAIT;
    while !procs.exists() {
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the workload cgroup {} does not exist (vm-monitor creates it)",
                cgroup.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

pub async fn initdb(paths: &Paths, user: PostgresUser) -> anyhow::Result<()> {
    let program = paths.pgbin.join("initdb");
    let mut command = Command::new(&program);
    command
        .arg("-D")
        .arg(&paths.pgdata)
        .args(["--auth-local=peer", "--auth-host=scram-sha-256"])
        .args(["-E", "UTF8", "-U", "postgres"])
        // Somewhere postgres may be; computectl's own directory may be closed to it.
        .current_dir("/")
        .stdin(Stdio::null());
    run_as(&mut command, user, None);
    tracing::info!(pgdata = %paths.pgdata.display(), "creating the cluster");
    let output = command
        .output()
        .await
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(TAIL_LINES).collect();
        bail!(
            "initdb failed ({}): {}",
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    Ok(())
}

/// Starts `postgres -D PGDATA` as postgres in the workload cgroup. Its output goes to
/// computectl's log; the [`Exit`] says how it ended, with its last lines.
pub fn spawn_postmaster(
    paths: &Paths,
    user: PostgresUser,
) -> anyhow::Result<(Pid, Exit, Arc<LogTail>)> {
    let procs = paths.cgroup.join("cgroup.procs");
    let procs = CString::new(procs.as_os_str().as_bytes()).context("a cgroup path with a NUL")?;
    let program = paths.pgbin.join("postgres");
    let mut command = Command::new(&program);
    command
        .arg("-D")
        .arg(&paths.pgdata)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Out of computectl's process group: a Ctrl-C in a terminal is for computectl.
        .process_group(0);
    run_as(&mut command, user, Some(procs));
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let pid = child.id().context("postgres exited at once")?;
    let pid = Pid::from_raw(i32::try_from(pid).context("a pid out of range")?);
    tracing::info!(%pid, "started postgres");
    let tail = Arc::new(LogTail::default());
    let pumps: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| tokio::spawn(pump(s, tail.clone()))),
        child
            .stderr
            .take()
            .map(|s| tokio::spawn(pump(s, tail.clone()))),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (sender, receiver) = watch::channel(None);
    let exit_tail = tail.clone();
    tokio::spawn(async move {
        let how = match child.wait().await {
            Ok(status) => status.to_string(),
            Err(e) => format!("cannot be waited for: {e}"),
        };
        // Backends hold the pipes too; they follow the postmaster out at once, normally.
        for pump in pumps {
            let _ = tokio::time::timeout(Duration::from_secs(2), pump).await;
        }
        let _ = sender.send(Some(format!(
            "postgres exited ({how}); its last output:\n{}",
            exit_tail.text()
        )));
    });
    Ok((pid, Exit::new(receiver), tail))
}

/// Makes `command` run as postgres, after joining the cgroup whose `cgroup.procs` is given.
fn run_as(command: &mut Command, user: PostgresUser, cgroup_procs: Option<CString>) {
    let PostgresUser { uid, gid } = user;
    // SAFETY: between fork and exec only async-signal-safe calls run: open, write, close,
    // setgroups, setgid, setuid; nothing allocates or takes a lock.
    unsafe {
        command.pre_exec(move || {
            if let Some(procs) = &cgroup_procs {
                // Joined as root and before exec, so the postmaster and every backend it
                // forks live in the workload cgroup. "0" moves the writer itself.
                let fd = nix::fcntl::open(
                    procs.as_c_str(),
                    nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )?;
                nix::unistd::write(&fd, b"0")?;
            }
            nix::unistd::setgroups(&[gid])?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        });
    }
}

/// Copies Postgres's output, line by line, to the log and the tail.
async fn pump(reader: impl AsyncRead + Unpin, tail: Arc<LogTail>) {
    let mut reader = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        let (used, complete) = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(buf) => {
                let end = buf.iter().position(|&b| b == b'\n');
                let chunk = &buf[..end.unwrap_or(buf.len())];
                let room = MAX_LINE_BYTES.saturating_sub(line.len());
                line.extend_from_slice(&chunk[..chunk.len().min(room)]);
                (end.map_or(buf.len(), |i| i + 1), end.is_some())
            }
        };
        reader.consume(used);
        if complete {
            emit(&line, &tail);
            line.clear();
        }
    }
    if !line.is_empty() {
        emit(&line, &tail);
    }
}

fn emit(line: &[u8], tail: &LogTail) {
    let text = String::from_utf8_lossy(line);
    tracing::info!(target: "postgres", "{text}");
    tail.push(&text);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_is_split_into_bounded_lines_and_the_tail_kept() {
        let long = "x".repeat(MAX_LINE_BYTES * 3);
        let text = format!("first\n{long}\n{}last without newline", "l\n".repeat(20));
        let tail = Arc::new(LogTail::default());
        pump(text.as_bytes(), tail.clone()).await;
        let kept = tail.text();
        let lines: Vec<&str> = kept.lines().collect();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(*lines.last().unwrap(), "last without newline");
        assert!(!kept.contains("first"));

        let tail = Arc::new(LogTail::default());
        pump(format!("{long}\nnext\n").as_bytes(), tail.clone()).await;
        let kept = tail.text();
        let lines: Vec<&str> = kept.lines().collect();
        assert_eq!(lines, [&"x".repeat(TAIL_LINE_CHARS) as &str, "next"]);
        assert_eq!(LogTail::default().text(), "(none)");
    }
}
