//! Node metrics for `status` and the controller heartbeat, from sysinfo.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use serde::Serialize;
use sysinfo::{CpuRefreshKind, DiskRefreshKind, Disks, MemoryRefreshKind, RefreshKind, System};

/// One snapshot of the node.
#[derive(Debug, Clone, Serialize)]
pub struct NodeMetrics {
    pub hostname: Option<String>,
    /// Average over all cores since the previous snapshot of this process
    /// (the last heartbeat), or over [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`]
    /// for the first one.
    pub cpu_percent: f32,
    pub cores: usize,
    pub mem_used_bytes: u64,
    pub mem_total_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub uptime_secs: u64,
    /// The file system of each app root.
    pub disks: Vec<DiskUse>,
}

/// Use of the file system holding one path.
#[derive(Debug, Clone, Serialize)]
pub struct DiskUse {
    /// The app root asked about.
    pub path: PathBuf,
    /// Its file system's mount point, when found.
    pub mount: Option<PathBuf>,
    pub used_bytes: u64,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// Samples the node; `paths` are the app roots whose disks to report.
pub fn snapshot(paths: &[PathBuf]) -> NodeMetrics {
    // One sampler per process: CPU usage is the difference between two
    // samples, so keeping the last one makes a heartbeat report the CPU
    // since the previous heartbeat instead of building a new `System` and
    // sleeping for a second sample every time.
    static SAMPLER: Mutex<Option<(System, Instant)>> = Mutex::new(None);
    let mut sampler = SAMPLER.lock().unwrap_or_else(PoisonError::into_inner);
    let (sys, sampled_at) = sampler.get_or_insert_with(|| {
        let sys = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        (sys, Instant::now())
    });
    // Samples closer together than sysinfo's minimum give no usable figure.
    if let Some(wait) = sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.checked_sub(sampled_at.elapsed()) {
        std::thread::sleep(wait);
    }
    sys.refresh_cpu_usage();
    sys.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
    *sampled_at = Instant::now();
    let load = System::load_average();
    // Only the mount points are used (statvfs below measures each root):
    // refreshing nothing spares a statvfs of every mount, overlays included,
    // on every heartbeat.
    let disks = Disks::new_with_refreshed_list_specifics(DiskRefreshKind::nothing());
    NodeMetrics {
        hostname: System::host_name(),
        cpu_percent: sys.global_cpu_usage(),
        cores: sys.cpus().len(),
        mem_used_bytes: sys.used_memory(),
        mem_total_bytes: sys.total_memory(),
        load1: load.one,
        load5: load.five,
        load15: load.fifteen,
        uptime_secs: System::uptime(),
        disks: paths.iter().filter_map(|p| disk_use(p, &disks)).collect(),
    }
}

fn disk_use(path: &Path, disks: &Disks) -> Option<DiskUse> {
    // The root may not exist yet: measure its nearest existing ancestor.
    let existing = path.ancestors().find(|a| a.exists())?;
    let st = nix::sys::statvfs::statvfs(existing).ok()?;
    let frag = st.fragment_size() as u64;
    let total = st.blocks() as u64 * frag;
    let free = st.blocks_free() as u64 * frag;
    let canonical = std::fs::canonicalize(existing).unwrap_or_else(|_| existing.to_owned());
    let mount = disks
        .list()
        .iter()
        .map(|d| d.mount_point())
        .filter(|m| canonical.starts_with(m))
        .max_by_key(|m| m.as_os_str().len())
        .map(Path::to_path_buf);
    Some(DiskUse {
        path: path.to_owned(),
        mount,
        used_bytes: total.saturating_sub(free),
        total_bytes: total,
        available_bytes: st.blocks_available() as u64 * frag,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn back_to_back_snapshots_both_have_figures() {
        // The second comes sooner than sysinfo's minimum CPU interval after
        // the first: it waits for the rest of it instead of reporting noise.
        for _ in 0..2 {
            let m = snapshot(&[]);
            assert!((0.0..=100.0).contains(&m.cpu_percent));
            assert!(m.mem_total_bytes > 0 && m.mem_used_bytes <= m.mem_total_bytes);
        }
    }

    #[test]
    fn snapshot_has_sane_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let m = snapshot(&[dir.path().join("not/yet/created")]);
        assert!(m.mem_total_bytes > 0 && m.mem_used_bytes <= m.mem_total_bytes);
        assert!(m.cores >= 1);
        assert!((0.0..=100.0).contains(&m.cpu_percent));
        let d = &m.disks[0];
        assert!(d.total_bytes > 0 && d.used_bytes <= d.total_bytes);
        let mount = d
            .mount
            .as_ref()
            .expect("the temp dir's mount point is found");
        assert!(fs::canonicalize(dir.path()).unwrap().starts_with(mount));
    }
}
