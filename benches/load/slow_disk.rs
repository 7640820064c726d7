//! A slow disk for the cold-read case: a block-I/O cgroup (v1 `blkio` or v2 `io`) that limits
//! the read rate of the processes put in it on the disk holding a given file. This machine's
//! virtual disk answers "cold" reads at ~3 GB/s from the host's cache, so without a limit a
//! read that blocks a worker costs too little to see; with it, a 2 MiB window takes
//! milliseconds, as on a real disk. Needs root and a mounted block-I/O controller; otherwise
//! `Throttle::new` says why and the benchmark skips these rows.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The cgroup, removed (its processes moved back to the root) when dropped.
pub struct Throttle {
    dir: PathBuf,
    root: PathBuf,
    /// What the limit file is called and the line that sets the limit.
    limit_file: &'static str,
    limit: String,
}

impl Throttle {
    /// A cgroup limiting reads from the disk holding `file` to `bytes_per_sec`.
    pub fn new(file: &Path, bytes_per_sec: u64) -> Result<Self, String> {
        let dev = std::fs::metadata(file).map_err(|e| e.to_string())?.dev();
        let disk = whole_disk(libc::major(dev), libc::minor(dev));
        let name = format!("transship-bench-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/blkio");
        let v2 = Path::new("/sys/fs/cgroup");
        let (root, limit_file, limit) = if v1.join("blkio.throttle.read_bps_device").exists() {
            (
                v1,
                "blkio.throttle.read_bps_device",
                format!("{disk} {bytes_per_sec}"),
            )
        } else if std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "io"))
        {
            // The controller must be enabled for the root's children (a no-op if it is).
            std::fs::write(v2.join("cgroup.subtree_control"), "+io")
                .map_err(|e| format!("enabling the io controller: {e}"))?;
            (v2, "io.max", format!("{disk} rbps={bytes_per_sec}"))
        } else {
            return Err("no block-I/O cgroup controller mounted".to_string());
        };
        let dir = root.join(name);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let throttle = Self {
            dir,
            root: root.to_path_buf(),
            limit_file,
            limit,
        };
        std::fs::write(throttle.dir.join(limit_file), &throttle.limit)
            .map_err(|e| format!("{limit_file}: {e}"))?;
        Ok(throttle)
    }

    /// Limits the reads of process `pid` and of its children (nginx's workers).
    pub fn attach(&self, pid: u32) {
        for p in std::iter::once(pid).chain(children(pid)) {
            std::fs::write(self.dir.join("cgroup.procs"), p.to_string())
                .unwrap_or_else(|e| panic!("moving {p} into {}: {e}", self.dir.display()));
        }
    }

    /// Lifts the limit from every process in it.
    pub fn detach_all(&self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines() {
            // A process that ended meanwhile cannot be moved; nothing to do for it.
            let _ = std::fs::write(self.root.join("cgroup.procs"), p);
        }
    }

    /// The limit as written, for the report.
    pub fn describe(&self) -> String {
        format!("{} = {:?}", self.limit_file, self.limit)
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.detach_all();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// "MAJ:MIN" of the whole disk a (partition) device belongs to: throttling works per disk.
fn whole_disk(major: u32, minor: u32) -> String {
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists()
        && let Ok(parent) = std::fs::read_to_string(sys.join("../dev"))
    {
        return parent.trim().to_string();
    }
    format!("{major}:{minor}")
}

/// The direct children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
