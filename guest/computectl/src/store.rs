//! Files that must survive a crash whole: the accepted spec, and computectl's configuration
//! files in PGDATA. Each is written aside, synced, then renamed over the old one.

use anyhow::Context;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use vmhost_compute_api::ComputeSpec;

/// The kernel command line parameter an image can bake a spec in with.
const CMDLINE_KEY: &str = "computectl.spec_path=";

/// Replaces `path` with `bytes` so that a crash leaves the old file or the new one: write
/// a temporary file, fsync, rename, fsync the directory. `owner` is (uid, gid).
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = dir.join(name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    // The mode given to open is filtered by the umask.
    file.set_permissions(Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    }
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    File::open(dir)?.sync_all()
}

/// Keeps the accepted spec on the VM's disk, readable by root only: it holds password
/// hashes.
pub fn save_spec(path: &Path, spec: &ComputeSpec) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let bytes = serde_json::to_vec_pretty(spec).context("cannot encode the spec")?;
    write_atomic(path, &bytes, 0o600, None)
        .with_context(|| format!("cannot save the spec to {}", path.display()))
}

/// The spec to start from: the one a configure saved, else the one the image names on the
/// kernel command line, else none (wait for a configure).
pub fn startup_spec(spec_path: &Path, cmdline: &str) -> Option<PathBuf> {
    if spec_path.exists() {
        Some(spec_path.to_path_buf())
    } else {
        spec_path_from_cmdline(cmdline)
    }
}

fn spec_path_from_cmdline(cmdline: &str) -> Option<PathBuf> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.strip_prefix(CMDLINE_KEY))
        .rfind(|path| !path.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_command_line_names_a_spec() {
        let cmdline = "console=ttyS0 computectl.spec_path=/etc/spec.json quiet\n";
        assert_eq!(
            spec_path_from_cmdline(cmdline),
            Some(PathBuf::from("/etc/spec.json"))
        );
        assert_eq!(
            spec_path_from_cmdline("console=ttyS0 computectl.spec_path="),
            None
        );
        assert_eq!(spec_path_from_cmdline("xcomputectl.spec_path=/a"), None);
        // The last one wins, as for kernel parameters.
        assert_eq!(
            spec_path_from_cmdline("computectl.spec_path=/a computectl.spec_path=/b"),
            Some(PathBuf::from("/b"))
        );
    }

    #[test]
    fn a_saved_spec_comes_before_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let saved = dir.path().join("state/spec.json");
        let cmdline = "computectl.spec_path=/image/spec.json";
        assert_eq!(
            startup_spec(&saved, cmdline),
            Some(PathBuf::from("/image/spec.json"))
        );
        assert_eq!(startup_spec(&saved, "quiet"), None);
        let spec = vmhost_compute_api::parse(br#"{"format_version": 1}"#).unwrap();
        save_spec(&saved, &spec).unwrap();
        assert_eq!(startup_spec(&saved, cmdline), Some(saved.clone()));
        let read = vmhost_compute_api::parse(&fs::read(&saved).unwrap()).unwrap();
        assert_eq!(read, spec);
        let mode = fs::metadata(&saved).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_rewrite_replaces_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("compute.conf");
        write_atomic(&path, b"a much longer first version\n", 0o644, None).unwrap();
        write_atomic(&path, b"short\n", 0o644, None).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"short\n");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
