//! Who listens on a local TCP port: a server run as a local process is reached by its port
//! alone, so before it is taken to be ready the listener must be one of its own processes,
//! not another program that took the port in the moment between the check and the bind.
//!
//! Read from Linux's `/proc` (the socket tables of this network namespace, and the open files
//! of the server's process group); elsewhere, or where `/proc` cannot tell, nothing is known.

use std::collections::HashSet;

/// Whether a process of group `group` (a server's processes: the group its leader made)
/// listens on TCP `port`; `None` when this cannot be told.
pub(crate) fn group_listens_on(group: u32, port: u16) -> Option<bool> {
    let sockets = listening_sockets(port)?;
    if sockets.is_empty() {
        return Some(false);
    }
    let mut unreadable = false;
    for pid in members_of(group)? {
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            // Gone since, or not ours to read (it changed user): it may be the one.
            unreadable = true;
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path())
                && let Some(inode) = socket_inode(&target.to_string_lossy())
                && sockets.contains(&inode)
            {
                return Some(true);
            }
        }
    }
    (!unreadable).then_some(false)
}

/// The inodes of the sockets listening on `port` (IPv4 and IPv6), from `/proc/net/tcp*`.
fn listening_sockets(port: u16) -> Option<HashSet<u64>> {
    let mut found = HashSet::new();
    let mut read = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        read = true;
        found.extend(text.lines().skip(1).filter_map(|l| listener_on(l, port)));
    }
    read.then_some(found)
}

/// A socket table line's inode when it is a listener on `port`.
/// (`sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...`)
fn listener_on(line: &str, port: u16) -> Option<u64> {
    let fields: Vec<&str> = line.split_whitespace().take(10).collect();
    let [_, local, _, state, _, _, _, _, _, inode] = fields[..] else {
        return None;
    };
    const LISTEN: &str = "0A";
    let (_, local_port) = local.rsplit_once(':')?;
    (state == LISTEN && u16::from_str_radix(local_port, 16).ok()? == port)
        .then(|| inode.parse().ok())
        .flatten()
}

/// `socket:[INODE]` (an open file's link target) → INODE.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The processes of group `group`.
fn members_of(group: u32) -> Option<Vec<u32>> {
    let entries = std::fs::read_dir("/proc").ok()?;
    Some(
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| group_of(&stat))
                    == Some(group)
            })
            .collect(),
    )
}

/// The process group in a `/proc/PID/stat` line: `pid (comm) state ppid pgrp ...`, where comm
/// may hold spaces and parentheses (so the fields are counted from the last `)`).
fn group_of(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_tables_and_stat_lines_are_read_field_by_field() {
        let line = "   3: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 424242 1 0000000000000000 100 0 0 10 0";
        assert_eq!(listener_on(line, 0x1F90), Some(424242));
        assert_eq!(listener_on(line, 0x1F91), None);
        let established = line.replace(" 0A ", " 01 ");
        assert_eq!(listener_on(&established, 0x1F90), None);
        assert_eq!(listener_on("garbage", 1), None);
        assert_eq!(socket_inode("socket:[424242]"), Some(424242));
        assert_eq!(socket_inode("pipe:[1]"), None);
        assert_eq!(group_of("77 (a) b (c) S 1 77 77 0"), Some(77));
    }

    #[test]
    fn a_listener_is_found_in_its_own_group_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stat = std::fs::read_to_string("/proc/self/stat").expect("Linux /proc");
        let own = group_of(&stat).unwrap();
        assert_eq!(group_listens_on(own, port), Some(true));
        // No process has group u32::MAX - 1: the listener is someone else's.
        assert_eq!(group_listens_on(u32::MAX - 1, port), Some(false));
        drop(listener);
        assert_eq!(group_listens_on(own, port), Some(false));
    }
}
