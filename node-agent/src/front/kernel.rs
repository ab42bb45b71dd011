//! Kernel forwarding for the front's TCP mode: an nftables table per front
//! that DNATs new connections from this machine to the public port straight
//! to the live backend, as Docker publishes ports. The bytes of such a
//! connection never pass the front; the front stays bound to the address
//! (it holds the port, and it serves every connection the rules do not
//! cover).
//!
//! Scope: the `output` nat hook only — connections opened on this machine
//! (a local nginx or Caddy terminating TLS, health checks, a benchmark).
//! Connections arriving from outside would need `route_localnet` to be
//! DNATed to a loopback backend; that global sysctl is not touched, and
//! they go through the front's own socket as before.
//!
//! A switch replaces the table in one `nft -f -` batch (one kernel
//! transaction: there is never a moment without a rule). Connections
//! already forwarded keep their translation (conntrack) and finish on the
//! old backend; the front counts them from `/proc/net/nf_conntrack` and
//! reports them under `draining` with its own.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// Environment variable naming the `nft` binary (default: `nft` on PATH).
pub const NFT_ENV: &str = "SLIPWAY_NFT";
/// Where the kernel lists its tracked connections (per network namespace).
pub const CONNTRACK: &str = "/proc/net/nf_conntrack";
/// Bytes of `nft`'s error output kept in an error.
const MAX_ERROR: usize = 2000;
/// Lines of the conntrack table read at most (a table at
/// `nf_conntrack_max` of a big machine; beyond, the count is a floor).
const MAX_CONNTRACK_LINES: usize = 4_000_000;

/// The front's table: `slipway_front_` and 12 hex digits of the SHA-256 of
/// the app's root path (one table per front, the same across restarts).
pub fn table_name(root: &Path) -> String {
    let digest = Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("slipway_front_{}", &hex::encode(digest)[..12])
}

/// The batch that makes the table forward `listen`'s new connections from
/// this machine to `backend`, replacing whatever the table held (created
/// empty first, so the `delete` never fails).
pub fn ruleset(table: &str, listen: SocketAddrV4, backend: SocketAddrV4) -> String {
    let daddr = if listen.ip().is_unspecified() {
        // 0.0.0.0: any of this machine's own addresses.
        "fib daddr type local".to_owned()
    } else {
        format!("ip daddr {}", listen.ip())
    };
    format!(
        "table ip {table} {{}}\n\
         delete table ip {table}\n\
         table ip {table} {{\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\t{daddr} tcp dport {} dnat to {}\n\
         \t}}\n\
         }}\n",
        listen.port(),
        backend
    )
}

/// The batch that removes the table if it exists.
pub fn removal(table: &str) -> String {
    format!("table ip {table} {{}}\ndelete table ip {table}\n")
}

fn nft_bin() -> std::ffi::OsString {
    std::env::var_os(NFT_ENV).unwrap_or_else(|| "nft".into())
}

/// Whether the table exists (`nft list table`, which changes nothing); a
/// missing or failing `nft` says no.
pub fn exists(table: &str) -> bool {
    Command::new(nft_bin())
        .args(["list", "table", "ip", table])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `nft -f -` with `batch` on stdin; its stderr in the error.
pub fn nft(batch: &str) -> Result<(), String> {
    let bin = nft_bin();
    let shown = Path::new(&bin).display().to_string();
    let mut child = Command::new(&bin)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A failure to write shows as nft's own failure below.
        let _ = stdin.write_all(batch.as_bytes());
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot wait for {shown}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    let mut err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if err.len() > MAX_ERROR {
        let mut cut = MAX_ERROR;
        while !err.is_char_boundary(cut) {
            cut -= 1;
        }
        err.truncate(cut);
        err.push('…');
    }
    Err(format!(
        "{shown} -f - exited with {}: {}",
        out.status,
        if err.is_empty() { "no message" } else { &err }
    ))
}

/// States of a tracked TCP connection whose backend may still send or
/// receive (TIME_WAIT, CLOSE, LAST_ACK: done).
const OPEN_STATES: [&str; 5] = [
    "SYN_SENT",
    "SYN_RECV",
    "ESTABLISHED",
    "FIN_WAIT",
    "CLOSE_WAIT",
];

/// From conntrack lines: per backend of `backends`, the TCP connections
/// still open that were made to port `public` and translated to it (the
/// original tuple's `dport` is `public`, the reply's source is the
/// backend). The front's own connections to a backend (original `dport`
/// the backend's port) are not counted: it counts those itself.
pub fn count_open<'a>(
    lines: impl Iterator<Item = &'a str>,
    public: u16,
    backends: &[SocketAddrV4],
) -> BTreeMap<SocketAddrV4, u64> {
    let mut counts = BTreeMap::new();
    for line in lines {
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some("ipv4") {
            continue;
        }
        let mut words = words.skip(1);
        if words.next() != Some("tcp") {
            continue;
        }
        // "6", timeout, state, then key=value pairs (the original tuple's,
        // then the reply's).
        let mut words = words.skip(2);
        let Some(state) = words.next() else { continue };
        if !OPEN_STATES.contains(&state) {
            continue;
        }
        let (mut src, mut sport, mut dport) = (Vec::new(), Vec::new(), Vec::new());
        for w in words {
            if let Some(v) = w.strip_prefix("src=") {
                src.push(v);
            } else if let Some(v) = w.strip_prefix("sport=") {
                sport.push(v);
            } else if let Some(v) = w.strip_prefix("dport=") {
                dport.push(v);
            }
        }
        let (Some(orig_dport), Some(reply_src), Some(reply_sport)) =
            (dport.first(), src.get(1), sport.get(1))
        else {
            continue;
        };
        if orig_dport.parse::<u16>().ok() != Some(public) {
            continue;
        }
        let (Ok(ip), Ok(port)) = (reply_src.parse::<Ipv4Addr>(), reply_sport.parse::<u16>()) else {
            continue;
        };
        let from = SocketAddrV4::new(ip, port);
        if backends.contains(&from) {
            *counts.entry(from).or_default() += 1;
        }
    }
    counts
}

/// [`count_open`] over this network namespace's conntrack table.
pub fn open_connections(
    public: u16,
    backends: &[SocketAddrV4],
) -> Result<BTreeMap<SocketAddrV4, u64>, String> {
    let file =
        std::fs::File::open(CONNTRACK).map_err(|e| format!("cannot read {CONNTRACK}: {e}"))?;
    let mut lines = Vec::new();
    let mut counts = BTreeMap::new();
    let mut reader = BufReader::new(file);
    let mut line = String::new();
    let mut read = 0usize;
    // In slices, so a big table is never held whole.
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| format!("cannot read {CONNTRACK}: {e}"))?;
        if n > 0 {
            lines.push(std::mem::take(&mut line));
            read += 1;
        }
        if n == 0 || lines.len() >= 4096 || read >= MAX_CONNTRACK_LINES {
            for (b, c) in count_open(lines.iter().map(String::as_str), public, backends) {
                *counts.entry(b).or_insert(0) += c;
            }
            lines.clear();
        }
        if n == 0 || read >= MAX_CONNTRACK_LINES {
            return Ok(counts);
        }
    }
}

/// The IPv4 form of a backend, for the rules.
pub fn v4(addr: SocketAddr) -> Option<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Some(a),
        SocketAddr::V6(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_stable_and_per_root() {
        let a = table_name(Path::new("/srv/web"));
        assert_eq!(a, table_name(Path::new("/srv/web")));
        assert_ne!(a, table_name(Path::new("/srv/api")));
        assert!(a.starts_with("slipway_front_") && a.len() == "slipway_front_".len() + 12);
    }

    #[test]
    fn the_ruleset_replaces_the_table_in_one_batch() {
        let b = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081);
        let r = ruleset("t", "127.0.0.1:3000".parse().unwrap(), b);
        assert!(
            r.starts_with("table ip t {}\ndelete table ip t\ntable ip t {"),
            "{r}"
        );
        assert!(
            r.contains("ip daddr 127.0.0.1 tcp dport 3000 dnat to 127.0.0.1:8081"),
            "{r}"
        );
        assert!(r.contains("hook output"), "{r}");
        assert!(!r.contains("prerouting"), "{r}");
        let any = ruleset("t", "0.0.0.0:3000".parse().unwrap(), b);
        assert!(
            any.contains("fib daddr type local tcp dport 3000 dnat to 127.0.0.1:8081"),
            "{any}"
        );
    }

    #[test]
    fn conntrack_counts_only_open_translated_connections_per_backend() {
        let old = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8081);
        let new = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8082);
        let text = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40000 dport=3000 src=127.0.0.1 dst=127.0.0.1 sport=8081 dport=40000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40001 dport=3000 src=127.0.0.1 dst=127.0.0.1 sport=8081 dport=40001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 119 TIME_WAIT src=127.0.0.1 dst=127.0.0.1 sport=40002 dport=3000 src=127.0.0.1 dst=127.0.0.1 sport=8081 dport=40002 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40003 dport=8081 src=127.0.0.1 dst=127.0.0.1 sport=8081 dport=40003 [ASSURED] mark=0 zone=0 use=2
ipv4     2 tcp      6 59 CLOSE_WAIT src=10.0.0.2 dst=10.0.0.1 sport=40004 dport=3000 src=127.0.0.1 dst=10.0.0.2 sport=8082 dport=40004 mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=127.0.0.1 dst=127.0.0.1 sport=5353 dport=3000 src=127.0.0.1 dst=127.0.0.1 sport=8081 dport=5353 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=127.0.0.1 dst=127.0.0.1 sport=40005 dport=3000 src=127.0.0.1 dst=127.0.0.1 sport=9999 dport=40005 [ASSURED] mark=0 zone=0 use=2
ipv6     10 tcp      6 431999 ESTABLISHED src=::1 dst=::1 sport=1 dport=3000 src=::1 dst=::1 sport=8081 dport=1 mark=0 zone=0 use=2
garbage
";
        let c = count_open(text.lines(), 3000, &[old, new]);
        // The front's own connection (dport 8081), TIME_WAIT, UDP, another
        // backend and IPv6 are not counted.
        assert_eq!(c.get(&old), Some(&2));
        assert_eq!(c.get(&new), Some(&1));
        assert_eq!(count_open(text.lines(), 3001, &[old, new]).len(), 0);
    }
}
