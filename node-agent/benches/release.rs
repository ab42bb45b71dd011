//! Release engine benchmarks: `cargo bench -p slipway-agent --bench release`.
//!
//! Each figure is compared in the same run with its baseline or goal:
//! - unpack throughput against `tar -xzf` of the same artifact (goal ≥ 0.9×);
//! - `current` switch latency p50/p99 (goal p99 ≤ 2 ms);
//! - redeploy of an unchanged 20 MB / 2,000-file artifact against its first
//!   deploy (goal ≥ 5× faster);
//! - disk used by 10 near-identical releases (goal < 2× one release);
//! - size of the shipped (dist profile) agent binary, when
//!   `cargo build --profile dist -p slipway-agent` has built it.
//!
//! `SLIPWAY_BENCH_QUICK=1` shrinks the workloads (for a smoke run).

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use slipway_agent::artifact::{pack_dir, Compression};
use slipway_agent::bridge::Bridge;
use slipway_agent::config::{AppConfig, UnpackLimits};
use slipway_agent::deploy::{DeployRequest, Deployer};
use slipway_agent::release::objects::ObjectStore;
use slipway_agent::release::{activate, unpack, ReleaseId};

struct Row {
    name: String,
    value: String,
    goal: String,
    ok: bool,
}

fn main() {
    // `cargo bench` passes `--bench`; anything else is ignored.
    let quick = std::env::var_os("SLIPWAY_BENCH_QUICK").is_some();
    let work = tempfile::tempdir_in(
        std::env::var_os("SLIPWAY_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let mut rows = Vec::new();
    unpack_throughput(work.path(), quick, &mut rows);
    switch_latency(work.path(), quick, &mut rows);
    redeploy_and_disk(work.path(), quick, &mut rows);
    binary_size(&mut rows);

    println!(
        "\n{:<44} {:>22}  {:<18} result",
        "benchmark", "value", "goal"
    );
    for r in &rows {
        println!(
            "{:<44} {:>22}  {:<18} {}",
            r.name,
            r.value,
            r.goal,
            if r.ok { "PASS" } else { "MISS" }
        );
    }
    let missed = rows.iter().filter(|r| !r.ok).count();
    println!("\n{} of {} goals met", rows.len() - missed, rows.len());
}

/// Deterministic pseudo-random text: compressible like source code, not trivially.
fn content(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "const ",
        "function ",
        "return ",
        "module.exports",
        " = ",
        "require(",
        "'./lib/",
        "');\n",
        "if (",
        ") {\n",
        "  ",
        "}\n",
        "await ",
        "async ",
        "this.",
        "value",
        "config",
        "request",
        "response",
        "error",
        "0x1f",
        "42",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(WORDS[(x % WORDS.len() as u64) as usize].as_bytes());
        if x.is_multiple_of(11) {
            out.extend_from_slice(format!("{:x}", x >> 20).as_bytes());
        }
    }
    out.truncate(len);
    out
}

/// A source tree of `files` files totalling about `bytes`, in 40 directories.
fn make_tree(dir: &Path, files: usize, bytes: usize, variant: u64) {
    let per = bytes / files;
    for i in 0..files {
        let sub = dir.join(format!("pkg{:02}", i % 40));
        fs::create_dir_all(&sub).unwrap();
        // Sizes vary from per/4 to ~2*per, like real trees.
        let len = per / 4 + (i * 7919 % (per * 7 / 4 + 1));
        fs::write(sub.join(format!("f{i:05}.js")), content(i as u64 + 1, len)).unwrap();
    }
    fs::write(dir.join("VERSION"), format!("variant {variant}\n")).unwrap();
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn tree_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            n += tree_bytes(&e.path());
        } else {
            n += m.len();
        }
    }
    n
}

fn unpack_throughput(work: &Path, quick: bool, rows: &mut Vec<Row>) {
    let (files, bytes, runs) = if quick {
        (500, 8 << 20, 3)
    } else {
        (4000, 96 << 20, 5)
    };
    let src = work.join("tp-src");
    make_tree(&src, files, bytes, 0);
    let art = work.join("tp.tar.gz");
    pack_dir(&src, &art, Compression::Gzip).unwrap();
    let expanded = tree_bytes(&src);
    println!(
        "unpack: {files} files, {:.1} MiB expanded, {:.1} MiB compressed, median of {runs} runs",
        expanded as f64 / 1048576.0,
        fs::metadata(&art).unwrap().len() as f64 / 1048576.0
    );
    let mut tar_t = Vec::new();
    let mut plain_t = Vec::new();
    let mut store_t = Vec::new();
    // Nothing is deleted until every run is done, and the order rotates:
    // ext4 makes the next file creations pay for recently deleted inodes, so
    // whoever runs right after a big delete is handicapped.
    let mut outputs = Vec::new();
    for run in 0..runs {
        for turn in 0..3 {
            match (run + turn) % 3 {
                0 => {
                    let d = work.join(format!("tp-tar-{run}"));
                    fs::create_dir_all(&d).unwrap();
                    let t = Instant::now();
                    let st = Command::new("tar")
                        .arg("-xzf")
                        .arg(&art)
                        .arg("-C")
                        .arg(&d)
                        .status()
                        .unwrap();
                    tar_t.push(t.elapsed());
                    assert!(st.success());
                    outputs.push(d);
                }
                k => {
                    let store_on = k == 2;
                    let d = work.join(format!("tp-slipway-{run}-{store_on}"));
                    let objects_dir = work.join(format!("tp-objects-{run}"));
                    let objects = ObjectStore::new(objects_dir.clone());
                    let opts = unpack::Options {
                        limits: UnpackLimits::default(),
                        store: store_on.then_some(&objects),
                        space: None,
                    };
                    let t = Instant::now();
                    let u = unpack::unpack(&art, &d, &opts).unwrap();
                    for o in &u.new_objects {
                        objects.adopt(&o.path, &o.sha256, o.mode).unwrap();
                    }
                    if store_on { &mut store_t } else { &mut plain_t }.push(t.elapsed());
                    outputs.push(d);
                    outputs.push(objects_dir);
                }
            }
        }
    }
    for d in outputs {
        slipway_agent::durable::remove_tree(&d).unwrap();
    }
    let mbps = |d: Duration| expanded as f64 / 1048576.0 / d.as_secs_f64();
    let (tar, plain, store) = (median(tar_t), median(plain_t), median(store_t));
    println!(
        "  tar -xzf {:.0} MiB/s, slipway (plain copies) {:.0} MiB/s, slipway (content store, hashing + objects) {:.0} MiB/s",
        mbps(tar),
        mbps(plain),
        mbps(store)
    );
    for (name, d) in [
        ("unpack throughput, plain copies", plain),
        ("unpack throughput, content store", store),
    ] {
        let ratio = tar.as_secs_f64() / d.as_secs_f64();
        rows.push(Row {
            name: name.into(),
            value: format!("{:.0} MiB/s = {ratio:.2}x tar", mbps(d)),
            goal: ">= 0.90x tar -xzf".into(),
            ok: ratio >= 0.9,
        });
    }
    fs::remove_dir_all(&src).unwrap();
}

fn switch_latency(work: &Path, quick: bool, rows: &mut Vec<Row>) {
    let n = if quick { 200 } else { 2000 };
    let root = work.join("switch");
    let ids: Vec<ReleaseId> = ["a", "b"]
        .iter()
        .map(|s| ReleaseId::new(s).unwrap())
        .collect();
    for id in &ids {
        fs::create_dir_all(root.join("releases").join(id.as_str())).unwrap();
    }
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        activate::switch(&root, &ids[i % 2]).unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();
    let p50 = lat[n / 2];
    let p99 = lat[n * 99 / 100];
    println!("switch: {n} switches (symlink + rename + directory fsync): p50 {p50:?}, p99 {p99:?}, max {:?}", lat[n - 1]);
    rows.push(Row {
        name: "switch latency p50 / p99".into(),
        value: format!(
            "{:.3} / {:.3} ms",
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        ),
        goal: "p99 <= 2 ms".into(),
        ok: p99 <= Duration::from_millis(2),
    });
}

fn app(root: PathBuf) -> AppConfig {
    let mut a = AppConfig::with_defaults("bench", root);
    a.keep = 100;
    a.free_space_margin = 1 << 20;
    a
}

fn deploy(store: &Deployer, art: &Path, id: &str) -> Duration {
    let t = Instant::now();
    let mut s = store.begin("deploy", None).unwrap();
    s.deploy(&DeployRequest {
        artifact: art.to_owned(),
        sha256: None,
        id: Some(ReleaseId::new(id).unwrap()),
        verified: None,
    })
    .unwrap();
    t.elapsed()
}

/// Bytes on disk under `dir`, counting each inode once (hardlinks share).
fn disk_usage(dir: &Path, seen: &mut HashSet<u64>) -> u64 {
    let mut n = 0;
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let m = fs::symlink_metadata(e.path()).unwrap();
        if m.is_dir() {
            n += m.blocks() * 512 + disk_usage(&e.path(), seen);
        } else if seen.insert(m.ino()) {
            n += m.blocks() * 512;
        }
    }
    n
}

fn redeploy_and_disk(work: &Path, quick: bool, rows: &mut Vec<Row>) {
    // The bench app has no driver; the pipeline wants a runtime all the same.
    let bridge = Bridge::owned().unwrap();
    let rounds = if quick { 2 } else { 5 };
    let src = work.join("rd-src");
    make_tree(&src, 2000, 20 << 20, 0);
    let art = work.join("rd.tar.gz");
    pack_dir(&src, &art, Compression::Gzip).unwrap();
    println!(
        "redeploy: 2000 files, {:.1} MiB expanded, {} rounds (each: fresh app root, full deploy with fsyncs)",
        tree_bytes(&src) as f64 / 1048576.0,
        rounds
    );
    let (mut first_t, mut again_t) = (Vec::new(), Vec::new());
    // Roots are removed only at the end (see unpack_throughput on why).
    let mut roots = Vec::new();
    for r in 0..rounds {
        let root = work.join(format!("rd-root-{r}"));
        let store = Deployer::new(&app(root.clone()), &bridge);
        first_t.push(deploy(&store, &art, "first"));
        again_t.push(deploy(&store, &art, "again"));
        roots.push(root);
    }
    for root in roots {
        slipway_agent::durable::remove_tree(&root).unwrap();
    }
    let (first, again) = (median(first_t), median(again_t));
    let speedup = first.as_secs_f64() / again.as_secs_f64();
    println!("  first deploy {first:?}, redeploy of the same artifact {again:?}: {speedup:.1}x");
    rows.push(Row {
        name: "redeploy unchanged 20 MB / 2,000 files".into(),
        value: format!(
            "{:.0} -> {:.0} ms = {speedup:.1}x",
            first.as_secs_f64() * 1e3,
            again.as_secs_f64() * 1e3
        ),
        goal: ">= 5x faster".into(),
        ok: speedup >= 5.0,
    });

    // Ten near-identical releases: each changes 20 of the 2,000 files.
    let root = work.join("disk-root");
    let store = Deployer::new(&app(root.clone()), &bridge);
    let mut one = 0;
    for v in 0..10u64 {
        let s = work.join(format!("disk-src-{v}"));
        make_tree(&s, 2000, 20 << 20, v);
        for k in 0..20 {
            let sub = s.join(format!("pkg{:02}", k % 40));
            fs::write(
                sub.join(format!("f{k:05}.js")),
                content(1000 * (v + 1) + k as u64, 4000),
            )
            .unwrap();
        }
        let a = work.join(format!("disk-{v}.tar.gz"));
        pack_dir(&s, &a, Compression::Gzip).unwrap();
        deploy(&store, &a, &format!("v{v}"));
        if v == 0 {
            one = disk_usage(&root.join("releases"), &mut HashSet::new());
        }
        fs::remove_dir_all(&s).unwrap();
    }
    let mut seen = HashSet::new();
    let ten = disk_usage(&root.join("releases"), &mut seen)
        + disk_usage(&root.join(".slipway/objects"), &mut seen);
    let ratio = ten as f64 / one as f64;
    println!(
        "disk: one release {:.1} MiB, ten near-identical releases {:.1} MiB (releases + object store, inodes counted once)",
        one as f64 / 1048576.0,
        ten as f64 / 1048576.0
    );
    rows.push(Row {
        name: "disk for 10 near-identical releases".into(),
        value: format!("{ratio:.2}x one release"),
        goal: "< 2x one release".into(),
        ok: ratio < 2.0,
    });
}

fn binary_size(rows: &mut Vec<Row>) {
    // The shipped binary is `cargo build --profile dist -p slipway-agent`
    // (fat LTO, one codegen unit, stripped), in target/dist/ next to the
    // target/release/ of this bench's own build. This bench's binary is not
    // that one: the bench profile inherits the quick-to-build release
    // profile, and its build has the tests' `fault-injection` feature.
    let own = Path::new(env!("CARGO_BIN_EXE_slipway-agent"));
    let dist = own
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("dist").join("slipway-agent"));
    let (bin, name) = match dist {
        Some(d) if d.is_file() => (d, "stripped agent binary (dist profile)"),
        _ => {
            println!(
                "binary: no target/dist/slipway-agent; `cargo build --profile dist -p slipway-agent` \
                 builds the shipped one. Reporting this bench's own build instead."
            );
            (
                own.to_path_buf(),
                "agent binary (release profile, not shipped)",
            )
        }
    };
    let bin = bin.as_path();
    let size = fs::metadata(bin).unwrap().len();
    // strip(1) (if present) to report the figure as a packager would: the
    // dist profile strips already, the release profile only debug info.
    let stripped =
        std::env::temp_dir().join(format!("slipway-agent-stripped-{}", std::process::id()));
    let final_size = match Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(bin)
        .status()
    {
        Ok(s) if s.success() => {
            let n = fs::metadata(&stripped).map(|m| m.len()).unwrap_or(size);
            let _ = fs::remove_file(&stripped);
            n
        }
        _ => size,
    };
    println!(
        "binary: {} is {:.2} MiB ({:.2} MiB after strip)",
        bin.display(),
        size as f64 / 1048576.0,
        final_size as f64 / 1048576.0
    );
    rows.push(Row {
        name: name.into(),
        value: format!("{:.2} MiB", final_size as f64 / 1048576.0),
        goal: "report".into(),
        ok: true,
    });
}
